"""Rows that do not start on 16-byte boundaries: the kernels cut each row into a head, whole
16-byte vectors and a tail (kernels/xent.py), and the gradient buffers have the logits' alignment
row by row (``_alloc.grad_like``). Every cut must give torch's numbers."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, DTYPES, check_grad, check_loss, dtype_id, make_target, oracle

from fused_xent import _alloc, cross_entropy

# Columns: fewer than a vector (a row that is all head), one past a vector, odd and long enough
# to have head, body and tail; offsets: 1 element past a boundary, and 5.
COLS = (3, 9, 37)
OFFSETS = (1, 5)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("c", COLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_misaligned_rows(dtype, c, offset, reduction, inplace, small_blocks):
    n = 5
    gen = torch.Generator().manual_seed(c * 10 + offset)
    values = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    # A view starting `offset` elements into its storage, rows `c + offset` apart.
    big = torch.full((n, c + 2 * offset), float("nan"), dtype=dtype, device=DEVICE)
    big[:, offset : offset + c] = values
    leaf = big.clone().requires_grad_()
    x = leaf.view(n, -1)[:, offset : offset + c]
    t = make_target(n, c, seed=c, ignored_rows=[1])
    loss = cross_entropy(x, t, reduction=reduction, inplace_backward=inplace, impl="triton")
    loss.sum().backward()
    want_loss, want_grad = oracle(values, t, reduction=reduction)
    check_loss(loss, want_loss, dtype)
    check_grad(leaf.grad[:, offset : offset + c], want_grad, dtype)
    # Nothing outside the row was written.
    outside = torch.cat([leaf.grad[:, :offset], leaf.grad[:, offset + c :]], dim=1)
    assert (outside == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grad_like_keeps_alignment(dtype):
    big = torch.zeros(4, 50, dtype=dtype, device=DEVICE)
    x = big[:, 3:40]
    g = _alloc.grad_like(x)
    assert g.shape == x.shape and g.stride(1) == 1
    vec = 16 // x.element_size()
    assert g.data_ptr() % 16 == x.data_ptr() % 16
    assert (g.stride(0) - x.stride(0)) % vec == 0


def test_gradient_buffer_cut_differently():
    """A gradient buffer whose rows are not aligned like the logits' falls back to element-wise
    rows (still exact) instead of cutting the two differently."""
    from fused_xent.kernels import xent

    from fused_xent._options import LossOptions

    n, c = 4, 21
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(n, c, generator=gen) * 3).to(torch.float16).to(DEVICE)
    big = torch.zeros(n, c + 3, dtype=torch.float16, device=DEVICE)
    big[:, 1 : 1 + c] = values
    x = big[:, 1 : 1 + c]
    t = make_target(n, c, seed=0)
    loss, stats = torch.empty(n, device=DEVICE), torch.empty(3, n, device=DEVICE)
    xent.xent_forward(x, t, LossOptions(), loss, stats)
    grad = torch.full((n, c), float("nan"), dtype=torch.float16, device=DEVICE)  # cut otherwise
    xent.xent_backward(x, t, LossOptions(), stats, torch.ones(n, device=DEVICE), grad)
    _, want = oracle(values, t, reduction="none")
    check_grad(grad, want, torch.float16)
