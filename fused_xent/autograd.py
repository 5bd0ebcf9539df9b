"""The autograd Function behind ``fused_xent.cross_entropy``: no kernel code, no reference code.

It drives a *backend* (``fused_xent.kernels.xent`` or ``fused_xent.reference``), both of which
offer ``xent_forward``, ``xent_backward`` and ``scale_grad_`` with one contract, on (N, C) logits;
the functional layer has already flattened any other shape to that.

Two schedules, chosen by what the forward can know:

* "mean" / "sum" with a gradient wanted: the incoming gradient is one scalar, so the forward
  writes the gradient divided by the "mean" denominator in the same launch that computes the
  loss, and the backward multiplies it by that scalar on the device (a no-op when it is 1).
* "none": the per-row incoming gradient is only known in the backward, so the forward stores three
  floats per row (``stats``: max, log-sum, softmax coefficient) and the backward makes one more
  pass over the logits.

With ``inplace_backward=True`` the gradient is written into the logits' own storage and the
logits' version counter is bumped, so any autograd node that saved the logits raises instead of
silently reading gradients.
"""

from __future__ import annotations

import torch

from . import _alloc


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _mean_denominator(target, opts, n_cols, dtype) -> torch.Tensor:
    """What "mean" divides by, as torch does; stays on the device (no host synchronisation)."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=dtype, device=target.device)
    kept = target != opts.ignore_index
    if opts.weight is None:
        return kept.sum().to(dtype)
    # Out-of-range targets are clamped only to keep this gather in bounds; their loss is NaN.
    w_target = opts.weight.to(dtype).gather(0, target.long().clamp(0, n_cols - 1))
    return torch.where(kept, w_target, 0.0).sum()


def _row_outputs(logits):
    """The per-row loss, and the (3, N) statistics the backends write beside it."""
    dtype, n_rows = _loss_dtype(logits), logits.shape[0]
    return _alloc.empty((n_rows,), dtype, logits.device), _alloc.empty(
        (3, n_rows), dtype, logits.device
    )


def _lse(stats):
    return stats[0] + stats[1]


def _reduce(loss, target, opts, n_cols, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _mean_denominator(target, opts, n_cols, loss.dtype)


def forward_no_grad(logits, target, opts, reduction, backend):
    """(loss, lse) alone: one read of the logits, no gradient written."""
    loss, stats = _row_outputs(logits)
    backend.xent_forward(logits, target, opts, loss, stats)
    return _reduce(loss, target, opts, logits.shape[1], reduction), _lse(stats)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, opts, reduction, inplace_backward, backend):
        loss, stats = _row_outputs(logits)
        n_cols = logits.shape[1]
        ctx.backend, ctx.opts, ctx.inplace_backward = backend, opts, inplace_backward
        ctx.fused = reduction != "none"
        if ctx.fused:
            if reduction == "mean":
                grad_scale = 1.0 / _mean_denominator(target, opts, n_cols, loss.dtype)
            else:
                grad_scale = torch.ones((), dtype=loss.dtype, device=logits.device)
            grad = logits if inplace_backward else _alloc.empty_like(logits)
            backend.xent_forward(logits, target, opts, loss, stats, grad, grad_scale)
            if inplace_backward:
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(grad)
            ctx.consumed = False
        else:
            backend.xent_forward(logits, target, opts, loss, stats)
            ctx.save_for_backward(logits, target, stats)
        lse = _lse(stats)
        ctx.mark_non_differentiable(lse)
        return _reduce(loss, target, opts, n_cols, reduction), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        del grad_lse  # lse is returned for logging; it is not differentiable
        if torch.is_grad_enabled():
            # create_graph=True: the gradient computed here is not itself differentiable, and a
            # gradient penalty built on it would silently be a constant.
            raise RuntimeError(
                "fused_xent: double backward (create_graph=True) is not supported; its gradient "
                "is not differentiable. Use torch.nn.functional.cross_entropy for that step."
            )
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
            logits, target, stats = ctx.saved_tensors
            grad = logits if ctx.inplace_backward else _alloc.empty_like(logits)
            ctx.backend.xent_backward(logits, target, ctx.opts, stats, grad_loss, grad)
            if ctx.inplace_backward:
                torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None
