"""Bad arguments raise a clear exception that names the argument; out-of-range targets."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICE,
    IMPLS,
    REDUCTIONS,
    backward,
    check_grad,
    check_loss,
    make_logits,
    make_target,
    oracle,
)

from fused_xent import cross_entropy

ALL_IMPLS = ("auto", *IMPLS)


def _x(n=4, c=5, dtype=torch.float32):
    return make_logits(n, c, dtype, 0).requires_grad_()


def _t(n=4, c=5):
    return make_target(n, c, 0)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("t_shape", [(3,), (5,), (4, 1), (1, 4), ()], ids=str)
def test_target_shape_mismatch(impl, t_shape):
    t = torch.zeros(t_shape, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"target must have shape \(N,\) = \(4,\)"):
        cross_entropy(_x(), t, impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_float_input(impl, dtype):
    x = torch.zeros(4, 5, dtype=dtype, device=DEVICE)
    with pytest.raises(TypeError, match=f"input must be .*got {dtype}"):
        cross_entropy(x, _t(), impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool], ids=str
)
def test_non_integer_target(impl, dtype):
    t = _t().to(dtype)
    with pytest.raises(TypeError, match=f"target must hold int64 or int32 .*got {dtype}"):
        cross_entropy(_x(), t, impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_not_tensors(impl):
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        cross_entropy([[1.0, 2.0]], torch.zeros(1, dtype=torch.long), impl=impl)
    with pytest.raises(TypeError, match="target must be a torch.Tensor, got list"):
        cross_entropy(_x(), [0, 1, 2, 3], impl=impl)


@pytest.mark.parametrize("reduction", ["avg", "Mean", "batchmean", None, ""])
def test_unknown_reduction(reduction):
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(_x(), _t(), reduction=reduction)


@pytest.mark.parametrize("impl", ["cuda", "Triton", "torch", None, ""])
def test_unknown_impl(impl):
    with pytest.raises(ValueError, match="impl must be one of"):
        cross_entropy(_x(), _t(), impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 5), (1, 1, 1, 5)], ids=str)
def test_input_not_2d(impl, shape):
    x = torch.zeros(shape, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match=r"input must be 2-D \(N, C\)"):
        cross_entropy(x, _t(), impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("n", [3, 0])
def test_zero_classes(impl, n):
    x = torch.zeros(n, 0, device=DEVICE, requires_grad=True)
    t = torch.zeros(n, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="at least one class"):
        cross_entropy(x, t, impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("ignore_index", [-100.0, True, "-100", None, torch.tensor(-100)], ids=repr)
def test_ignore_index_not_int(impl, ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cross_entropy(_x(), _t(), ignore_index=ignore_index, impl=impl)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_target_on_other_device(impl):
    x = _x().detach().cuda().requires_grad_()
    with pytest.raises(ValueError, match="target must be on the input's device"):
        cross_entropy(x, _t().cpu(), impl=impl)


def test_float64_triton():
    with pytest.raises(TypeError, match=r"impl='triton' takes .*got torch.float64"):
        cross_entropy(_x(dtype=torch.float64), _t(), impl="triton")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_float64_reference_and_auto(impl, reduction):
    x = make_logits(6, 30, torch.float64, 1).requires_grad_()
    t = make_target(6, 30, 1, ignored_rows=[2])
    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    backward(loss)
    want_loss, want_grad = oracle(x, t, reduction=reduction)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=1e-12)
    check_grad(x.grad, want_grad, torch.float64)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    """Kernels compiled for the GPU get a CPU tensor: say how to run them there."""
    from fused_xent.kernels import xent

    monkeypatch.setattr(xent, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cross_entropy(_x().detach().cpu(), _t().cpu(), impl="triton")


# --- targets outside [0, C) that are not ignore_index ----------------------------------------

BAD_TARGETS = [5, -1, 10**6, -(10**6)]  # C, one below 0, far past the row, far before it


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad", BAD_TARGETS)
def test_out_of_range_target_reference_raises(bad, reduction, grad):
    x = _x().requires_grad_(grad)
    t = _t()
    t[2] = bad
    with pytest.raises(IndexError, match=f"target holds {bad}, outside \\[0, 5\\)"):
        cross_entropy(x, t, reduction=reduction, impl="reference")


@pytest.mark.parametrize("blocks", ["table", "small"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad", BAD_TARGETS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_out_of_range_target_triton_gives_nan_row(bad, reduction, blocks, request):
    """The kernel path flags the row with NaN (loss and gradient); other rows stay correct."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    n, c = 5, 40
    bad = {5: c}.get(bad, bad)  # "C" for this C
    x = make_logits(n, c, torch.float32, 2).requires_grad_()
    t = make_target(n, c, 2, ignored_rows=[4])
    t[1] = bad

    loss = cross_entropy(x, t, reduction=reduction, impl="triton")
    backward(loss)

    assert x.grad[1].isnan().all()
    if reduction != "none":
        assert loss.isnan()
        others = torch.tensor([0, 2, 3, 4], device=x.device)
        assert torch.isfinite(x.grad[others]).all()
        return
    assert loss[1].isnan()
    ok = t.clone()
    ok[1] = -100  # the oracle for the other rows: the bad row ignored
    want_loss, want_grad = oracle(x, ok, reduction="none")
    keep = torch.tensor([0, 2, 3, 4], device=x.device)
    check_loss(loss[keep], want_loss[keep], torch.float32)
    check_grad(x.grad[keep], want_grad[keep], torch.float32)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
@pytest.mark.parametrize("blocks", ["table", "small"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_out_of_range_target_stays_in_bounds(reduction, blocks, inplace, request):
    """Logits inside a larger buffer with guard values all round: a kernel that used a bad target
    as an address (x[C], x[-1]) when writing the gradient would hit a guard; none may change."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    n, c, pad, guard = 6, 40, 16, 1234.5
    leaf = torch.full((n + 2, c + 2 * pad), guard, device=DEVICE)
    leaf[1:-1, pad:-pad] = make_logits(n, c, torch.float32, 3)
    leaf.requires_grad_()
    inside = torch.zeros_like(leaf, dtype=torch.bool)
    inside[1:-1, pad:-pad] = True
    y = leaf * 1
    x = y[1:-1, pad:-pad]
    t = torch.tensor([0, c, -1, 3, 10**6, -(10**6)], device=DEVICE)

    loss = cross_entropy(x, t, reduction=reduction, inplace_backward=inplace, impl="triton")
    backward(loss)

    assert (y.detach()[~inside] == guard).all()  # nothing written outside the view
    assert (leaf.grad[~inside] == 0).all()
    bad = torch.tensor([False, True, True, False, True, True], device=DEVICE)
    grad = leaf.grad[1:-1, pad:-pad]
    assert grad[bad].isnan().all() and torch.isfinite(grad[~bad]).all()
    if reduction == "none":
        assert loss[bad].isnan().all() and torch.isfinite(loss[~bad]).all()
