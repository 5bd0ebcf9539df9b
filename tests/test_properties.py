"""Properties of the math that hold for any input (hypothesis; few examples, derandomized).

* Shift invariance: adding a constant to a row changes neither its loss nor its gradient.
* Each non-ignored row of the gradient sums to zero (softmax sums to one, the one-hot to one);
  an ignored row is exactly zero.
"""

from __future__ import annotations

from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from helpers import DEVICE, GRAD_RTOL, IMPLS, LOSS_RTOL, SMALL_BLOCK, rel_err

from fused_xent import cross_entropy

# The GPU machine has pytest but maybe not hypothesis: skip there rather than fail to collect.
pytest.importorskip("hypothesis", reason="the property tests need hypothesis (.[test] extra)")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# derandomize: the same examples on every run and in CI; database=None: nothing written to disk.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def problems(draw, dtypes):
    """A small (logits, target, ignore_index, impl, small_blocks) problem from one drawn seed."""
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 3 * SMALL_BLOCK + 3))  # up to four blocks when blocks are forced
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    ignore_index = draw(st.sampled_from([-100, 0]))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 10.0]))
    x = (torch.randn(n, c, generator=gen) * scale).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    ignored = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    t[ignored] = ignore_index
    impl = draw(st.sampled_from(IMPLS))
    small_blocks = draw(st.booleans())
    return x.to(DEVICE), t.to(DEVICE), ignore_index, impl, small_blocks


def _small_blocks(on: bool):
    if not on:
        return nullcontext()
    from fused_xent.kernels import xent

    return mock.patch.object(xent, "_launch_config", lambda n_cols, dtype: (SMALL_BLOCK, 4))


def _loss_and_grad(x, t, ignore_index, impl, small_blocks):
    x = x.detach().clone().requires_grad_()
    with _small_blocks(small_blocks and impl == "triton"):
        loss = cross_entropy(x, t, ignore_index=ignore_index, reduction="none", impl=impl)
        loss.sum().backward()
    return loss.detach(), x.grad


@SETTINGS
@given(problem=problems([torch.float32, torch.bfloat16]), shift_seed=st.integers(0, 2**31 - 1))
def test_row_shift_invariance(problem, shift_seed):
    x, t, ignore_index, impl, small_blocks = problem
    # Logits on a grid of 1/4 (|x| <= 8) and integer shifts (|c| <= 24), so that every shifted
    # entry is exact even in bfloat16 (8 significant bits); only the kernels' own rounding remains.
    x = (x.float() * 4).round().clamp(-32, 32).div(4).to(x.dtype)
    gen = torch.Generator().manual_seed(shift_seed)
    shift = torch.randint(-24, 25, (x.shape[0], 1), generator=gen).to(x.device)
    shifted = (x.double() + shift).to(x.dtype)
    assert torch.equal(shifted.double() - shift, x.double())

    loss0, grad0 = _loss_and_grad(x, t, ignore_index, impl, small_blocks)
    loss1, grad1 = _loss_and_grad(shifted, t, ignore_index, impl, small_blocks)

    # the loss is float32 for every input dtype; its lse is rounded at |x + shift| <= 32
    torch.testing.assert_close(loss1, loss0, rtol=LOSS_RTOL, atol=4 * 32 * 2**-24)
    assert rel_err(grad1, grad0) <= GRAD_RTOL[x.dtype]


@SETTINGS
@given(problem=problems([torch.float32, torch.float16, torch.bfloat16]))
def test_gradient_rows_sum_to_zero(problem):
    x, t, ignore_index, impl, small_blocks = problem
    _, grad = _loss_and_grad(x, t, ignore_index, impl, small_blocks)

    ignored = t == ignore_index
    assert (grad[ignored] == 0).all()
    g = grad[~ignored].double()
    row_sum = g.sum(1).abs()
    # each element is rounded to the gradient dtype: the sum may be off by tol * sum |g|
    bound = GRAD_RTOL[x.dtype] * g.abs().sum(1) + 1e-30
    assert (row_sum <= bound).all(), f"row sums {row_sum.tolist()} > {bound.tolist()}"


# --- the same properties with the options ------------------------------------------------------


@st.composite
def option_problems(draw, dtypes, softcap: bool, lse_square: bool):
    """A small problem with torch's options (weight, smoothing, probability targets) and the
    LLM ones that were asked for; logits on a 1/4 grid in [-8, 8] (exact in every dtype)."""
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 3 * SMALL_BLOCK + 3))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(n, c, generator=gen) * 3).mul(4).round().clamp(-32, 32).div(4).to(dtype)
    if draw(st.booleans()):
        # unnormalised rows, some entries exactly zero
        t = torch.rand(n, c, generator=gen)
        t = torch.where(torch.rand(n, c, generator=gen) < 0.3, 0.0, t)
        ignore_index = -100
    else:
        ignore_index = draw(st.sampled_from([-100, 0]))
        t = torch.randint(0, c, (n,), generator=gen)
        ignored = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        t[ignored] = ignore_index
    w = torch.rand(c, generator=gen) * 1.5 + 0.25 if draw(st.booleans()) else None
    opts = dict(
        ignore_index=ignore_index,
        weight=None if w is None else w.to(DEVICE),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        # powers of two: logit_scale * x stays exact, so shifts stay exact too
        logit_scale=draw(st.sampled_from([1.0, 0.5, 2.0])),
    )
    if softcap:
        # 50: with |x| <= 8 (+ shifts) the tanh bends, but 1 - (z / softcap)^2 stays >= 0.15
        opts["softcap"] = draw(st.sampled_from([None, 50.0]))
    if lse_square:
        opts["lse_square_scale"] = draw(st.sampled_from([0.0, 1e-4, 0.1]))
    impl = draw(st.sampled_from(IMPLS))
    return x.to(DEVICE), t.to(DEVICE), opts, impl, draw(st.booleans())


def _run(x, t, opts, impl, small_blocks, **kw):
    """(per-row loss, lse, gradient of the summed loss) with reduction "none"."""
    x = x.detach().clone().requires_grad_()
    with _small_blocks(small_blocks and impl == "triton"):
        loss, lse = cross_entropy(x, t, reduction="none", return_lse=True, impl=impl, **opts, **kw)
        loss.sum().backward()
    return loss.detach(), lse, x.grad


def _row_mass(x, t, opts) -> torch.Tensor:
    """sum_c w_c t'_c per row: what the loss is a weighted sum of lse - z_c over."""
    n, c = x.shape
    w = torch.ones(c, dtype=torch.float64) if opts["weight"] is None else opts["weight"].double()
    eps = opts["label_smoothing"]
    if t.is_floating_point():
        tt = (1 - eps) * t.double() + eps / c
    else:
        tt = torch.full((n, c), eps / c, dtype=torch.float64)
        kept = t != opts["ignore_index"]
        tt[kept, t[kept]] += 1 - eps
    return (w.cpu() * tt.cpu()).sum(1)


@SETTINGS
@given(
    problem=option_problems([torch.float32, torch.bfloat16], softcap=False, lse_square=False),
    shift_seed=st.integers(0, 2**31 - 1),
)
def test_row_shift_invariance_with_options(problem, shift_seed):
    """Adding a constant to a row leaves loss and gradient alone with class weights, smoothing,
    probability targets (normalised or not) and logit_scale: the loss is sum_c w_c t'_c (lse - z_c)
    and lse - z_c does not move. (Not so with a softcap, which bends z, or the z-loss, lse^2.)"""
    x, t, opts, impl, small_blocks = problem
    gen = torch.Generator().manual_seed(shift_seed)
    shift = torch.randint(-24, 25, (x.shape[0], 1), generator=gen).to(x.device)
    shifted = (x.double() + shift).to(x.dtype)
    assert torch.equal(shifted.double() - shift, x.double())

    loss0, _, grad0 = _run(x, t, opts, impl, small_blocks)
    loss1, _, grad1 = _run(shifted, t, opts, impl, small_blocks)

    # lse - z is formed at |z| <= 2 * 32 and rounded there, then weighted by the row's mass
    atol = 4 * 64 * 2**-24 * (_row_mass(x, t, opts) + 1)
    diff = (loss1.double() - loss0.double()).abs().cpu()
    assert (diff <= LOSS_RTOL * loss0.double().abs().cpu() + atol).all(), diff.tolist()
    assert rel_err(grad1, grad0) <= GRAD_RTOL[x.dtype]


@SETTINGS
@given(
    problem=option_problems(
        [torch.float32, torch.float16, torch.bfloat16], softcap=True, lse_square=True
    )
)
def test_gradient_rows_sum_with_options(problem):
    """Per row, dloss/dz = A p - w t' with A = sum_c w_c t'_c + 2 lss lse (t' the smoothed target,
    one-hot for class indices), so sum_c dloss/dz_c = 2 * lse_square_scale * lse: zero without the
    z-loss, whatever the weight, smoothing, or probability mass of the row. The gradient the
    package returns is dx = dz * logit_scale * (1 - (z / softcap)^2); undo that and sum."""
    x, t, opts, impl, small_blocks = problem
    _, lse, grad = _run(x, t, opts, impl, small_blocks)

    z = opts["logit_scale"] * x.double()
    chain = torch.full_like(z, opts["logit_scale"])
    if opts["softcap"] is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
        chain = chain * (1 - (z / opts["softcap"]) ** 2)
    dz = grad.double() / chain
    kept = torch.ones_like(lse, dtype=torch.bool)
    if not t.is_floating_point():
        kept = t != opts["ignore_index"]
        assert (grad[~kept] == 0).all()
    row_sum = dz[kept].sum(1)
    want = 2 * opts["lse_square_scale"] * lse.double()[kept]
    # each element is rounded to the gradient dtype: the sum may be off by tol * sum |dz|
    tol = GRAD_RTOL[x.dtype]
    bound = tol * (dz[kept].abs().sum(1) + want.abs()) + 1e-30
    err = (row_sum - want).abs()
    assert (err <= bound).all(), f"row sums {row_sum.tolist()}, expected {want.tolist()}"


@settings(SETTINGS, max_examples=15)
@given(
    problem=option_problems([torch.float32], softcap=True, lse_square=False),
    k=st.sampled_from([0.25, 3.0]),
)
def test_mean_weight_scaling(problem, k):
    """Scaling every class weight by k: with class indices "mean" divides by the weight sum of
    the kept rows, so the loss does not change; with probabilities it divides by the row count,
    so the loss scales by k. The gradient follows the loss."""
    x, t, opts, impl, small_blocks = problem
    # something to scale, and not a NaN mean from all rows ignored (test_equivalence has that)
    assume(opts["weight"] is not None)
    assume(t.is_floating_point() or (t != opts["ignore_index"]).any())
    scaled = dict(opts, weight=opts["weight"] * k)
    factor = k if t.is_floating_point() else 1.0

    results = []
    for o in (opts, scaled):
        xx = x.detach().clone().requires_grad_()
        with _small_blocks(small_blocks and impl == "triton"):
            loss = cross_entropy(xx, t, reduction="mean", impl=impl, **o)
            loss.backward()
        results.append((loss.detach(), xx.grad))
    (loss0, grad0), (loss1, grad1) = results

    assert rel_err(loss1, factor * loss0.double()) <= 4 * LOSS_RTOL
    assert rel_err(grad1, factor * grad0.double()) <= 4 * GRAD_RTOL[torch.float32]
