"""Properties of the math that hold for any input (hypothesis; few examples, derandomized).

* Shift invariance: adding a constant to a row changes neither its loss nor its gradient.
* Each non-ignored row of the gradient sums to zero (softmax sums to one, the one-hot to one);
  an ignored row is exactly zero.
"""

from __future__ import annotations

from contextlib import nullcontext
from unittest import mock

import torch
from helpers import DEVICE, GRAD_RTOL, IMPLS, LOSS_RTOL, SMALL_BLOCK, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_xent import cross_entropy

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
