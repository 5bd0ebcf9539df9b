"""The loss options (cross-entropy and distillation), checked once by the functional API and read
by the autograd layer and both backends (the Triton launchers and the reference), and the "mean"
denominator they define."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossOptions:
    ignore_index: int = -100
    weight: torch.Tensor | None = None  # (C,) floating, on the logits' device
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    logit_scale: float = 1.0
    softcap: float | None = None
    # A vocabulary sharded across ranks: the logits hold classes
    # [class_offset, class_offset + C_local) of n_classes (None: the logits hold them all).
    class_offset: int = 0
    n_classes: int | None = None


def mean_denominator(target, opts, n_cols, dtype) -> torch.Tensor:
    """What "mean" divides by, as torch does; stays on the device (no host synchronisation)."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=dtype, device=target.device)
    kept = target != opts.ignore_index
    if opts.weight is None:
        return kept.sum().to(dtype)
    # Out-of-range targets are clamped only to keep this gather in bounds; their loss is NaN.
    w_target = opts.weight.to(dtype).gather(0, target.long().clamp(0, n_cols - 1))
    return torch.where(kept, w_target, 0.0).sum()


# "mean" over a zero denominator (every row ignored, or the kept rows' class weights summing to
# 0) is decided here, once, for every route: the loss is NaN (torch's 0 / 0), and the gradient is
# exactly 0 for any incoming gradient (torch gives NaN where kept rows have weight 0; a gradient
# that scales nothing is 0 here). The kernels mirror these two lines (kernels/xent.py,
# ``_mean_rcp`` and ``_finish_reduction``).


def reduce_total(row_loss_sum: torch.Tensor, den: torch.Tensor | None) -> torch.Tensor:
    """The reduced loss from the sum of the rows' losses: "sum" (den None) or "mean"."""
    if den is None:
        return row_loss_sum
    return torch.where(den == 0, float("nan"), row_loss_sum / den)


def over_den(grad_scale: torch.Tensor, den: torch.Tensor | None) -> torch.Tensor:
    """The gradient scale of a reduced loss: the incoming gradient over the "mean" denominator
    ("sum": den None, unchanged); 0 where den is 0."""
    if den is None:
        return grad_scale
    return torch.where(den == 0, 0.0, grad_scale / den)


@dataclass(frozen=True)
class DistillOptions:
    """The distillation options (``fused_xent.distillation``), checked there."""

    beta: float = 0.0
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
