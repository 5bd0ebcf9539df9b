"""Output allocation in one place, so tests can poison every output before a kernel writes it."""

from __future__ import annotations

import torch

# Tests set this to True: every output then starts as NaN (-1 for integer outputs), and an element a
# kernel forgot to write fails the comparison instead of passing on whatever the allocator left.
POISON = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # (size=: torch parses a positional tuple as varargs, about 0.5 us more a call on the host)
    size = shape if isinstance(shape, (tuple, list)) else (shape,)
    out = torch.empty(size=size, dtype=dtype, device=device)
    if not POISON:
        return out
    return out.fill_(float("nan") if dtype.is_floating_point else -1)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON else out


def grad_like(logits: torch.Tensor) -> torch.Tensor:
    """An (N, C) buffer for the gradient of ``logits`` with the same 16-byte alignment row by row,
    so the kernels cut a gradient row into 16-byte vectors exactly as its logits row: contiguous
    for contiguous logits; a row-strided view ``big[:, :C]`` gets rows padded by fewer than 16
    bytes, not ``big``'s stride."""
    # Traced by torch.compile there is no address yet: assume an aligned one (the launcher checks
    # at run time, and cuts rows element by element if the two were to differ).
    compiling = torch.compiler.is_compiling()
    if not compiling and logits.is_contiguous() and logits.data_ptr() % 16 == 0:
        return empty_like(logits)  # (the same layout, one call)
    n_rows, n_cols = logits.shape
    size = logits.element_size()
    vec = 16 // size
    lead = 0 if compiling else (logits.data_ptr() % 16) // size
    stride = logits.stride(0) if n_rows > 1 else n_cols
    row = n_cols + (stride - n_cols) % vec
    flat = empty((n_rows * row + lead,), logits.dtype, logits.device)
    return flat.as_strided((n_rows, n_cols), (row, 1), lead)
