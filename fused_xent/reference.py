"""Pure-PyTorch cross-entropy: the CPU fallback and the test oracle.

Same contract as the launchers in ``fused_xent.kernels.xent`` (outputs are passed in and written),
so the autograd layer drives either one; the math is stated once, in that module's docstring.
Computes in float32 (float64 for float64 logits). Unlike the kernels, a target outside ``[0, C)``
that is not ``ignore_index`` raises ``IndexError`` here (which reads the targets on the host).
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    n_cols = logits.shape[1]
    x = logits.to(_compute_dtype(logits.dtype))
    target = target.long()
    ignored = target == ignore_index
    bad = ~ignored & ((target < 0) | (target >= n_cols))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise IndexError(
            f"target holds {first}, outside [0, {n_cols}) and not ignore_index={ignore_index}"
        )
    safe_target = torch.where(ignored, torch.zeros_like(target), target)
    return x, safe_target, ignored


def _softmax_minus_onehot(x, safe_target, ignored, lse, row_scale):
    dx = torch.exp(x - lse[:, None]) * row_scale[:, None]
    dx.scatter_add_(1, safe_target[:, None], -row_scale[:, None])
    return dx.masked_fill_(ignored[:, None], 0.0)


def xent_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """Per-row loss and lse, and the gradient scaled by ``grad_scale`` when ``grad`` is given."""
    x, safe_target, ignored = _prepare(logits, target, ignore_index)
    row_lse = torch.logsumexp(x, dim=1)
    x_target = x.gather(1, safe_target[:, None]).squeeze(1)
    loss.copy_(torch.where(ignored, torch.zeros_like(row_lse), row_lse - x_target))
    lse.copy_(row_lse)
    if grad is not None:
        row_scale = torch.where(ignored, 0.0, grad_scale.to(x.dtype).expand(len(x)))
        grad.copy_(_softmax_minus_onehot(x, safe_target, ignored, row_lse, row_scale))


def xent_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    ignore_index: int,
    grad: torch.Tensor,
) -> None:
    """grad = (softmax(logits) - onehot(target)) * dloss[:, None]."""
    x, safe_target, ignored = _prepare(logits, target, ignore_index)
    row_scale = torch.where(ignored, 0.0, dloss.to(x.dtype))
    grad.copy_(_softmax_minus_onehot(x, safe_target, ignored, lse.to(x.dtype), row_scale))


def scale_grad_(grad: torch.Tensor, g: torch.Tensor) -> None:
    """grad *= g in place."""
    grad.copy_(grad.to(_compute_dtype(grad.dtype)) * g)
