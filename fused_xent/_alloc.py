"""Output allocation in one place, so tests can poison every output before a kernel writes it."""

from __future__ import annotations

import torch

# Tests set this to True: every output then starts as NaN, and an element a kernel forgot to write
# fails the comparison instead of passing on whatever the allocator left there.
POISON = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON else out
