"""The loss options, checked once by the functional API and read by the autograd layer and both
backends (the Triton launchers and the reference)."""

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
