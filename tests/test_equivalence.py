"""Both implementations against torch's F.cross_entropy on float64 copies of the same inputs.

Sizes are chosen against the launch table in kernels/xent.py (each one says why it is here); the
`small_blocks` fixture forces a 16-wide block so that a few dozen logits already cross blocks.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    GRAD_RTOL,
    IMPLS,
    LOSS_RTOL,
    LOW_PRECISION,
    REDUCTIONS,
    backward,
    check_grad,
    check_loss,
    check_no_worse_than_torch,
    dtype_id,
    make_logits,
    make_target,
    oracle,
    random_grad_out,
    rel_err,
)

import fused_xent._alloc
from fused_xent import cross_entropy

requires_cuda = pytest.mark.requires_cuda


def shape(n: int, c: int, *marks):
    return pytest.param(n, c, id=f"{n}x{c}", marks=marks)


SHAPES = [
    shape(1, 2),  # minimal: one row, two classes
    shape(3, 3),  # the seed's shape
    shape(37, 100),  # a few dozen rows (odd count), C not a power of two: 28 masked lanes
    shape(5, 2047),  # one under the 2048 single-block threshold (block 2048, 4 warps)
    shape(5, 2048),  # exactly the threshold: a full 2048 block, no masked lane
    shape(5, 2049),  # one past it: block 4096, 8 warps, 2047 masked lanes
    shape(2, 16384),  # the largest row the launch table keeps in registers in one block
    shape(2, 16385),  # one past it: the two-pass long-row path, a 1-element last block
    shape(2, 70000),  # several long blocks (8192 fp32, 16384 half) and a partial last block
    # Full size where a GPU runs the kernels compiled (skipped on CPU; too slow interpreted):
    shape(4096, 32000, requires_cuda),  # LLaMA-2 vocabulary, a real batch
    shape(512, 128256, requires_cuda),  # LLaMA-3 vocabulary: 16 fp32 / 8 half blocks, last partial
    shape(64, 262144, requires_cuda),  # 2^18 (Gemma vocabulary): 32 / 16 full blocks, none partial
]
# The same path boundaries at block 16 (helpers.SMALL_BLOCK), cheap enough for every option.
SMALL_BLOCK_SHAPES = [
    shape(3, 1),  # C = 1: loss 0 and gradient 0 in every row, 15 masked lanes
    shape(4, 16),  # exactly one block: the single-block path
    shape(4, 17),  # one past a block: two-pass path, the last block holds one element
    shape(4, 32),  # an exact multiple: two full blocks, nothing masked
    shape(5, 45),  # a partial last block (16 + 16 + 13)
]
# A few shapes for the tests of options: one single-block and one two-pass row per kernel path.
OPTION_SHAPES = [
    shape(6, 50),  # single block, several rows
    shape(3, 16385),  # two-pass long row
    shape(1024, 50000, requires_cuda),
]


def _seed(*parts) -> int:
    """A seed per parameter set, stable across processes (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode())


def test_poison_is_on():
    """The comparisons below rely on outputs starting as NaN (conftest's autouse fixture)."""
    assert fused_xent._alloc.empty((4,), torch.float32, DEVICE).isnan().all()
    assert fused_xent._alloc.empty_like(torch.zeros(2, 3)).isnan().all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n, c", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_torch(impl, n, c, dtype, reduction):
    seed = _seed(n, c, dtype, reduction)
    x = make_logits(n, c, dtype, seed).requires_grad_()
    t = make_target(n, c, seed)

    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    backward(loss)

    want_loss, want_grad = oracle(x, t, reduction=reduction)
    check_loss(loss, want_loss, dtype)
    check_grad(x.grad, want_grad, dtype)
    if dtype in LOW_PRECISION:
        check_no_worse_than_torch(x.grad, x, t, want_grad, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n, c", SMALL_BLOCK_SHAPES)
def test_block_boundaries(small_blocks, n, c, dtype, reduction):
    """Triton only (the reference has no blocks), with a random incoming gradient and one ignored
    row, so the scaling kernel and the ignore mask also run across block edges."""
    seed = _seed(n, c, dtype, reduction, "small")
    x = make_logits(n, c, dtype, seed).requires_grad_()
    t = make_target(n, c, seed, ignored_rows=[1])
    g = random_grad_out(reduction, n, seed)

    loss = cross_entropy(x, t, reduction=reduction, impl="triton")
    backward(loss, g)

    want_loss, want_grad = oracle(x, t, reduction=reduction, grad_out=g)
    check_loss(loss, want_loss, dtype)
    check_grad(x.grad, want_grad, dtype)


IGNORE_CASES = {
    # name: (ignore_index, rows whose target is set to ignore_index)
    "some": (-100, [1, 4]),
    "all": (-100, [0, 1, 2, 3, 4]),  # mean -> NaN loss and zero gradient (as torch); sum -> 0
    "real-class": (0, [2]),  # ignore_index is class 0: any row targeting 0 is ignored
}


@pytest.mark.parametrize("blocks", ["table", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", IGNORE_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index(impl, reduction, case, dtype, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    n, c = 5, 40  # 40 = 16 + 16 + 8 under the small block
    ignore_index, rows = IGNORE_CASES[case]
    seed = _seed(reduction, case, dtype, blocks)
    x = make_logits(n, c, dtype, seed).requires_grad_()
    t = make_target(n, c, seed, ignored_rows=rows, ignore_index=ignore_index)
    if case == "real-class":
        t[3] = 0  # a second row hitting the ignored class, set through its label
    n_ignored = int((t == ignore_index).sum())
    assert n_ignored == n if case == "all" else 2 <= n_ignored < n

    loss = cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction, impl=impl)
    backward(loss)

    want_loss, want_grad = oracle(x, t, ignore_index=ignore_index, reduction=reduction)
    check_loss(loss, want_loss, dtype)
    check_grad(x.grad, want_grad, dtype)
    ignored = t == ignore_index
    assert (x.grad[ignored] == 0).all()
    if reduction == "none":
        assert (loss[ignored] == 0).all()
    if case == "all":
        if reduction == "mean":
            assert loss.isnan()
        else:
            assert (loss == 0).all()


@pytest.mark.parametrize("blocks", ["table", "small"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fill", [float("-inf"), float("nan")], ids=["-inf", "nan"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the -inf
def test_ignored_row_with_nonfinite_logits(impl, reduction, blocks, fill, request):
    """An ignored (padding) row's logits are never looked at: loss 0 and gradient exactly 0 there
    (the documented contract), and the other rows are unaffected."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    n, c = 4, 40
    x = make_logits(n, c, torch.float32, 11)
    x[2] = fill
    x.requires_grad_()
    t = make_target(n, c, 11, ignored_rows=[2])

    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    backward(loss)

    keep = torch.tensor([0, 1, 3], device=x.device)
    sub = x.detach()[keep]
    want_loss, want_grad = oracle(sub, t[keep], reduction="sum" if reduction != "none" else "none")
    if reduction == "mean":
        want_loss, want_grad = want_loss / 3, want_grad / 3
    check_loss(loss if reduction != "none" else loss[keep], want_loss, torch.float32)
    if reduction == "none":
        assert loss[2] == 0
    assert (x.grad[2] == 0).all(), f"ignored row's gradient: {x.grad[2, :4].tolist()}"
    check_grad(x.grad[keep], want_grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n, c", OPTION_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_incoming_gradient(impl, reduction, n, c, dtype):
    """(loss * g).sum().backward() with a random g: a scalar, or one value per row for none."""
    seed = _seed(reduction, n, c, dtype, "g")
    x = make_logits(n, c, dtype, seed).requires_grad_()
    t = make_target(n, c, seed, ignored_rows=[1])
    g = random_grad_out(reduction, n, seed)
    assert (g != 1).all()

    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    backward(loss, g)

    want_loss, want_grad = oracle(x, t, reduction=reduction, grad_out=g)
    check_loss(loss, want_loss, dtype)
    check_grad(x.grad, want_grad, dtype)
    if dtype in LOW_PRECISION:
        check_no_worse_than_torch(x.grad, x, t, want_grad, reduction=reduction, grad_out=g)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n, c", OPTION_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward(impl, reduction, n, c, dtype, inplace):
    """With inplace_backward the gradient lands in the input's own storage (same data_ptr)."""
    seed = _seed(reduction, n, c, dtype, "inplace")
    leaf = make_logits(n, c, dtype, seed).requires_grad_()
    t = make_target(n, c, seed, ignored_rows=[1])
    g = random_grad_out(reduction, n, seed)
    want_loss, want_grad = oracle(leaf, t, reduction=reduction, grad_out=g)

    x = leaf * 1  # a non-leaf: its storage may be overwritten
    seen = []
    x.register_hook(lambda grad: seen.append(grad.data_ptr()))
    loss = cross_entropy(x, t, reduction=reduction, inplace_backward=inplace, impl=impl)
    backward(loss, g)

    check_loss(loss, want_loss, dtype)
    check_grad(leaf.grad, want_grad, dtype)
    assert (seen[0] == x.data_ptr()) == inplace
    if inplace:
        check_grad(x.detach(), want_grad, dtype)  # the logits' storage now holds the gradient
    else:
        assert torch.equal(x.detach(), leaf.detach())  # and otherwise is left alone


@pytest.mark.parametrize("blocks", ["table", "small"])
@pytest.mark.parametrize("mode", ["no_grad", "requires_grad_false"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_loss_only(impl, reduction, mode, blocks, request):
    """No gradient wanted: the loss alone, and the input untouched even with inplace_backward."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    n, c = 6, 40
    x = make_logits(n, c, torch.bfloat16, 5, scale=10.0)
    t = make_target(n, c, 5, ignored_rows=[0])
    before = x.clone()
    if mode == "no_grad":
        x.requires_grad_()
        with torch.no_grad():
            loss = cross_entropy(x, t, reduction=reduction, inplace_backward=True, impl=impl)
    else:
        loss = cross_entropy(x, t, reduction=reduction, inplace_backward=True, impl=impl)

    assert not loss.requires_grad
    want_loss, _ = oracle(x, t, reduction=reduction)
    check_loss(loss, want_loss, torch.bfloat16)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
@pytest.mark.parametrize("impl", IMPLS)
def test_strided_input(impl, layout, reduction, inplace):
    """A view of a wider buffer (row stride > C) and a transposed input (class stride > 1)."""
    n, c = 6, 37
    seed = _seed(layout, reduction, inplace)
    values = make_logits(n, c, torch.float32, seed)
    t_full = make_target(2 * n, c, seed)
    t = t_full[::2]  # a strided target too
    g = random_grad_out(reduction, n, seed)
    want_loss, want_grad = oracle(values, t, reduction=reduction, grad_out=g)

    if layout == "row-strided":
        big = torch.full((n, c + 11), 7.0, device=DEVICE)
        big[:, :c] = values
        leaf = big.requires_grad_()
        x = (leaf * 1)[:, :c]
        assert x.stride() == (c + 11, 1)
    else:
        leaf = values.t().contiguous().requires_grad_()  # (C, N)
        x = (leaf * 1).t()
        assert x.stride() == (1, n)

    loss = cross_entropy(x, t, reduction=reduction, inplace_backward=inplace, impl=impl)
    backward(loss, g)

    check_loss(loss, want_loss, torch.float32)
    grad = leaf.grad[:, :c] if layout == "row-strided" else leaf.grad.t()
    check_grad(grad, want_grad, torch.float32)
    if layout == "row-strided":
        assert (leaf.grad[:, c:] == 0).all()  # the columns outside the view get no gradient
        assert x._base is not None and (x._base.detach()[:, c:] == 7.0).all()  # nor any write


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_int32_target(impl, reduction):
    n, c = 9, 50
    x = make_logits(n, c, torch.float32, 3).requires_grad_()
    t = make_target(n, c, 3, ignored_rows=[4]).to(torch.int32)
    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    backward(loss)
    want_loss, want_grad = oracle(x, t, reduction=reduction)
    check_loss(loss, want_loss, torch.float32)
    check_grad(x.grad, want_grad, torch.float32)


@pytest.mark.parametrize("blocks", ["table", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the -inf
def test_masked_vocab_padding(impl, reduction, dtype, blocks, request):
    """-inf logits (a vocabulary padded to a round size and masked): finite loss, as torch."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    n, c, real = 5, 70, 37  # 33 masked columns: under block 16 the last two blocks are all -inf
    x = make_logits(n, c, dtype, 9)
    x[:, real:] = float("-inf")
    x[1, 3:9] = float("-inf")  # and a few inside one row's vocabulary
    x.requires_grad_()
    t = make_target(n, real, 9)
    t[1] = 20

    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    backward(loss)

    assert torch.isfinite(loss).all()
    want_loss, want_grad = oracle(x, t, reduction=reduction)
    check_loss(loss, want_loss, dtype)
    check_grad(x.grad, want_grad, dtype)
    assert (x.grad[:, real:] == 0).all()


def _shifted_pair(n, c, offset, seed):
    """Logits on a 1/64 grid in [-10, 10), and the same shifted by ``offset``: all exact in fp32."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randint(-640, 640, (n, c), generator=gen).to(torch.float32) / 64
    x0 = grid.clone().to(DEVICE).requires_grad_()
    x1 = (grid + offset).to(DEVICE).requires_grad_()
    assert torch.equal(x1.detach().double() - offset, x0.detach().double())
    return x0, x1


def _run_both(xs, t, reduction, impl):
    losses, grads = [], []
    for x in xs:
        loss = cross_entropy(x, t, reduction=reduction, impl=impl)
        backward(loss)
        losses.append(loss.detach())
        grads.append(x.grad)
    return losses, grads


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_do_not_overflow(impl, reduction, offset):
    """Logits near +-1e4, where exp() overflows float32 without the max shift: the answer stays
    within a few float32 ulps of 1e4 (2^-10 each) of torch's, in loss and gradient."""
    n, c = 6, 40
    _, x1 = _shifted_pair(n, c, offset, 21)
    t = make_target(n, c, 21, ignored_rows=[2])

    (loss,), (grad,) = _run_both((x1,), t, reduction, impl)

    want_loss, want_grad = oracle(x1, t, reduction=reduction)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=0, atol=n * 4 * 2**-10)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=4 * 2**-10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_large_logits_shift_invariance(impl, reduction, offset):
    """Adding 1e4 to exactly representable logits changes nothing mathematically: both the
    shifted and unshifted answers must meet the house tolerances (torch fp32 meets them, 3e-8)."""
    n, c = 6, 40
    x0, x1 = _shifted_pair(n, c, offset, 21)
    t = make_target(n, c, 21, ignored_rows=[2])

    losses, grads = _run_both((x0, x1), t, reduction, impl)

    want_loss, want_grad = oracle(x1, t, reduction=reduction)
    check_loss(losses[1], want_loss, torch.float32)
    check_grad(grads[1], want_grad, torch.float32)
    assert rel_err(losses[1], losses[0].double()) <= LOSS_RTOL
    assert rel_err(grads[1], grads[0].double()) <= GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_auto_on_cpu_uses_reference(dtype):
    """impl="auto" on CPU tensors takes the reference, float64 included (float64 loss then)."""
    x = make_logits(7, 30, dtype, 4, device="cpu").requires_grad_()
    t = make_target(7, 30, 4, device="cpu")
    loss = cross_entropy(x, t)
    backward(loss)
    want_loss, want_grad = oracle(x, t)
    check_loss(loss, want_loss, dtype)
    check_grad(x.grad, want_grad, dtype)
