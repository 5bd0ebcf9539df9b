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


@dataclass(frozen=True)
class DistillOptions:
    """The distillation options (``fused_xent.distillation``), checked there."""

    beta: float = 0.0
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
