"""The autograd Function behind ``fused_xent.cross_entropy``: no kernel code, no reference code.

It drives a *backend* (``fused_xent.kernels.xent`` or ``fused_xent.reference``), both of which
offer ``xent_forward``, ``xent_backward`` and ``scale_grad_`` with one contract.

Two schedules, chosen by what the forward can know:

* "mean" / "sum" with a gradient wanted: the incoming gradient is one scalar, so the forward
  writes ``(softmax - onehot) / n_valid`` (or ``* 1``) in the same launch that computes the loss,
  and the backward multiplies it by that scalar on the device (a no-op when it is 1).
* "none": the per-row incoming gradient is only known in the backward, so the forward stores the
  per-row lse and the backward makes one more pass over the logits.

With ``inplace_backward=True`` the gradient is written into the logits' own storage and the
logits' version counter is bumped, so any autograd node that saved the logits raises instead of
silently reading gradients.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _alloc


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _n_valid(target: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    # Stays on the device: no host synchronisation.
    return (target != ignore_index).sum().to(dtype)


def forward_no_grad(logits, target, ignore_index, reduction, backend) -> torch.Tensor:
    """The loss alone: one read of the logits, no gradient written."""
    dtype = _loss_dtype(logits)
    loss = _alloc.empty(logits.shape[:1], dtype, logits.device)
    lse = _alloc.empty(logits.shape[:1], dtype, logits.device)
    backend.xent_forward(logits, target, ignore_index, loss, lse)
    return _reduce(loss, target, ignore_index, reduction)


def _reduce(loss, target, ignore_index, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _n_valid(target, ignore_index, loss.dtype)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, inplace_backward, backend):
        dtype = _loss_dtype(logits)
        loss = _alloc.empty(logits.shape[:1], dtype, logits.device)
        lse = _alloc.empty(logits.shape[:1], dtype, logits.device)
        ctx.backend = backend
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.fused = reduction != "none"
        if ctx.fused:
            if reduction == "mean":
                grad_scale = 1.0 / _n_valid(target, ignore_index, dtype)
            else:
                grad_scale = torch.ones((), dtype=dtype, device=logits.device)
            grad = logits if inplace_backward else _alloc.empty_like(logits)
            backend.xent_forward(logits, target, ignore_index, loss, lse, grad, grad_scale)
            if inplace_backward:
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(grad)
            ctx.consumed = False
        else:
            backend.xent_forward(logits, target, ignore_index, loss, lse)
            ctx.save_for_backward(logits, target, lse)
        return _reduce(loss, target, ignore_index, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.fused:
            if ctx.consumed:
                raise RuntimeError(
                    "fused_xent: backward ran twice through one cross_entropy call (retain_graph); "
                    "its gradient is computed in the forward and handed out once. Call the loss "
                    "again, or use reduction='none' and reduce it yourself."
                )
            ctx.consumed = True
            (grad,) = ctx.saved_tensors
            ctx.backend.scale_grad_(grad, grad_loss)
        else:
            logits, target, lse = ctx.saved_tensors
            grad = logits if ctx.inplace_backward else _alloc.empty_like(logits)
            ctx.backend.xent_backward(logits, target, lse, grad_loss, ctx.ignore_index, grad)
            if ctx.inplace_backward:
                torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None
