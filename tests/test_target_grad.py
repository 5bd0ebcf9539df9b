"""Gradients with respect to a probability target that requires grad, as torch computes them:
``d loss / d t_c = -w_c (1 - eps) log p_c`` times the reduction's scale, against float64 torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, DTYPES, IMPLS, LOSS_RTOL, dtype_id, make_logits, rel_err

from fused_xent import cross_entropy, linear_cross_entropy

# Tolerance of the target's gradient by the target's dtype (it is rounded to it once).
TARGET_GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def _target(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=gen, dtype=torch.float64).softmax(dim=1)
    return t.to(dtype).to(DEVICE)


def _torch64(x, t, g, *, weight=None, **kw):
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    t64 = t.detach().double().requires_grad_()
    w64 = None if weight is None else weight.double()
    loss = F.cross_entropy(x64, t64, weight=w64, **kw)
    loss.backward(g.double())
    return loss.detach(), x64.grad, t64.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.2}, {"weight": True, "label_smoothing": 0.1}],
    ids=["plain", "smoothing", "weight+smoothing"],
)
def test_target_grad_matches_torch(impl, dtype, reduction, options, small_blocks):
    """Both gradients in one pass, rows crossing block boundaries (small_blocks), every
    reduction, with an incoming gradient other than 1."""
    n, c = 5, 37
    options = dict(options)
    weight = None
    if options.pop("weight", False):
        weight = (torch.rand(c, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEVICE)
    x = make_logits(n, c, dtype, seed=4).requires_grad_()
    t = _target((n, c), dtype, seed=4).requires_grad_()
    g = torch.full((n,) if reduction == "none" else (), 0.75, device=DEVICE)
    loss = cross_entropy(x, t, weight, reduction=reduction, impl=impl, **options)
    loss.backward(g)
    want_loss, want_dx, want_dt = _torch64(x, t, g, weight=weight, reduction=reduction, **options)
    assert rel_err(loss, want_loss) <= LOSS_RTOL
    assert rel_err(t.grad, want_dt) <= TARGET_GRAD_RTOL[dtype], "target gradient"
    assert t.grad.dtype == dtype
    tol = TARGET_GRAD_RTOL[dtype]
    assert rel_err(x.grad, want_dx) <= tol, "logits gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_target_grad_alone_and_k_dim(impl):
    """Only the target requires grad (the logits are data), K-dimensional (N, C, d1) input."""
    x = make_logits(3 * 4, 6, torch.float32, seed=5).reshape(3, 4, 6).permute(0, 2, 1)
    t = _target((3, 4, 6), torch.float32, seed=5).permute(0, 2, 1).requires_grad_()
    loss = cross_entropy(x, t, impl=impl)
    loss.backward()
    _, _, want_dt = _torch64(x, t, torch.tensor(1.0))
    assert x.grad is None
    assert rel_err(t.grad, want_dt) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_target_grad_costs_nothing_when_not_asked(impl):
    """A target without requires_grad keeps the fused schedule: the gradient of the logits is
    written in the forward (it is ready before backward) — and the target gets no .grad."""
    x = make_logits(4, 9, torch.float32, seed=6).requires_grad_()
    t = _target((4, 9), torch.float32, seed=6)
    loss = cross_entropy(x, t, impl=impl)
    assert loss.grad_fn is not None
    loss.backward()
    assert t.grad is None and x.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_target_grad_matches_torch(impl, reduction):
    """The linear form too: the target's gradient beside the input's and the head's, chunked
    (chunk_size 3 does not divide the 7 rows)."""
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(7, 5, generator=gen).to(DEVICE).requires_grad_()
    w = (torch.randn(11, 5, generator=gen) / 2).to(DEVICE).requires_grad_()
    t = _target((7, 11), torch.float32, seed=8).requires_grad_()
    g = torch.full((7,) if reduction == "none" else (), 1.5, device=DEVICE)
    loss = linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=3, impl=impl,
                                label_smoothing=0.1)  # fmt: skip
    loss.backward(g)
    h64, w64 = (v.detach().double().requires_grad_() for v in (h, w))
    t64 = t.detach().double().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), t64, reduction=reduction, label_smoothing=0.1).backward(
        g.double()
    )
    for ours, want in ((h.grad, h64.grad), (w.grad, w64.grad), (t.grad, t64.grad)):
        assert rel_err(ours, want) <= 1e-5
