"""Bad arguments raise a clear exception that names the argument; out-of-range targets.

Checks run before dispatch, so each is tried through every impl (a backend must not bypass
them), and the accepted edge of each range is checked to run.
"""

from __future__ import annotations

import math
import re

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
@pytest.mark.parametrize(
    "x_shape, t_shape",
    [
        ((4, 5), (3,)),  # one row short
        ((4, 5), (5,)),  # C rows instead of N
        ((4, 5), (4, 1)),  # a trailing singleton
        ((4, 5), (1, 4)),
        ((4, 5), ()),  # the unbatched target shape for a batched input
        ((5,), (1,)),  # unbatched input: the target is 0-dim
        ((5,), (5,)),
        ((2, 5, 3), (2,)),  # K-dim: the spatial dims missing
        ((2, 5, 3), (2, 5)),  # the class dim kept instead of the spatial one
        ((2, 5, 3), (3, 2)),  # the right numel, the wrong order
        ((2, 5, 3), (2, 3, 1)),
    ],
    ids=str,
)
def test_target_shape_mismatch(impl, x_shape, t_shape):
    x = torch.zeros(x_shape, device=DEVICE, requires_grad=True)
    t = torch.zeros(t_shape, dtype=torch.long, device=DEVICE)
    expected = x_shape[:1] + x_shape[2:] if len(x_shape) > 1 else ()
    match = re.escape(
        f"class-index target must have shape {expected} to match input {x_shape}, got {t_shape}"
    )
    with pytest.raises(ValueError, match=match):
        cross_entropy(x, t, impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_float_input(impl, dtype):
    x = torch.zeros(4, 5, dtype=dtype, device=DEVICE)
    with pytest.raises(TypeError, match=f"input must be .*got {dtype}"):
        cross_entropy(x, _t(), impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "dtype", [torch.int16, torch.uint8, torch.int8, torch.bool, torch.complex64], ids=str
)
def test_non_integer_target(impl, dtype):
    """Neither int64/int32 class indices nor floating probabilities."""
    t = _t().to(dtype)
    with pytest.raises(TypeError, match=f"target must hold int64 or int32 .*got {dtype}"):
        cross_entropy(_x(), t, impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_floating_target_of_class_index_shape(impl, dtype):
    """Class indices stored as floats are not silently taken as indices (nor as probabilities):
    a floating target must have the input's shape."""
    t = _t().to(dtype)
    match = r"floating \(probability\) target must have the input's shape \(4, 5\), got \(4,\)"
    with pytest.raises(ValueError, match=match):
        cross_entropy(_x(), t, impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "x_shape, t_shape",
    [
        ((4, 5), (4, 6)),  # one class too many
        ((4, 5), (5, 4)),  # transposed
        ((4, 5), (4, 5, 1)),
        ((4, 5), (20,)),  # the right numel, flattened
        ((5,), (1, 5)),  # unbatched input, batched target
        ((2, 5, 3), (2, 3, 5)),  # K-dim with the classes last instead of at dim 1
        ((2, 5, 3), (2, 5)),
    ],
    ids=str,
)
def test_probability_target_shape_mismatch(impl, x_shape, t_shape):
    x = torch.zeros(x_shape, device=DEVICE, requires_grad=True)
    t = torch.full(t_shape, 0.2, device=DEVICE)
    match = re.escape(
        f"a floating (probability) target must have the input's shape {x_shape}, got {t_shape}"
    )
    with pytest.raises(ValueError, match=match):
        cross_entropy(x, t, impl=impl)


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
def test_input_0d(impl):
    x = torch.zeros((), device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="input must have a class dimension"):
        cross_entropy(x, torch.zeros((), dtype=torch.long, device=DEVICE), impl=impl)


@pytest.mark.parametrize(
    "impl, shape",
    [
        pytest.param(impl, shape)
        for impl in IMPLS
        for shape, c1 in [
            ((5,), False),  # unbatched (C,): a 0-dim target
            ((2, 3, 5), False),  # (N, C, d1): C = 3, five positions per sample
            ((1, 1, 1, 5), True),  # C = 1 with two spatial dims: loss 0, gradient 0 everywhere
        ]
    ],
    ids=str,
)
def test_input_not_2d_is_accepted(impl, shape):
    """The shapes that used to be refused are F.cross_entropy's (C,) and (N, C, d1, ...) now, and
    must give torch's answer, not merely no error."""
    x = make_logits(1, math.prod(shape), torch.float32, 4).reshape(shape).requires_grad_()
    class_dim = 0 if len(shape) == 1 else 1
    t_shape = shape[:class_dim] + shape[class_dim + 1 :]
    t = torch.randint(0, shape[class_dim], t_shape, generator=torch.Generator().manual_seed(4))
    t = t.to(DEVICE)
    for reduction in REDUCTIONS:
        x.grad = None
        loss = cross_entropy(x, t, reduction=reduction, impl=impl)
        backward(loss)
        want_loss, want_grad = oracle(x, t, reduction=reduction)
        assert loss.shape == want_loss.shape
        check_loss(loss, want_loss, torch.float32)
        check_grad(x.grad, want_grad, torch.float32)


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


# --- the options' argument table -----------------------------------------------------------------

NOT_FINITE = [float("nan"), float("inf"), float("-inf")]
NOT_FLOATS = ["0.5", True, torch.tensor(0.5), [0.5], 0.5j]  # a bool is an int, not a float


def _bad(name, values, exc, match):
    return [pytest.param(name, v, exc, match, id=f"{name}={v!r}") for v in values]


BAD_OPTIONS = [
    *_bad("softcap", [0.0, -1.0, -1e-30], ValueError, "softcap must be > 0"),
    *_bad("logit_scale", [0.0, -0.5], ValueError, "logit_scale must be > 0"),
    *_bad(
        "lse_square_scale", [-1e-4, -1.0], ValueError, r"lse_square_scale must be .*\[0.0, inf\]"
    ),
    *_bad("label_smoothing", [-0.1, 1.1, 1 + 1e-9], ValueError, r"label_smoothing .*\[0.0, 1.0\]"),
    *[
        p
        for name in ("softcap", "logit_scale", "lse_square_scale", "label_smoothing")
        for p in _bad(name, NOT_FINITE, ValueError, f"{name} must be a finite float")
    ],
    *[
        p
        for name in ("softcap", "logit_scale", "lse_square_scale", "label_smoothing")
        for p in _bad(name, NOT_FLOATS, TypeError, f"{name} must be a float")
    ],
    # None means "no softcap"; for the others it is not a float
    *[
        p
        for name in ("logit_scale", "lse_square_scale", "label_smoothing")
        for p in _bad(name, [None], TypeError, f"{name} must be a float, got NoneType")
    ],
]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("name, value, exc, match", BAD_OPTIONS)
def test_bad_option(impl, name, value, exc, match):
    with pytest.raises(exc, match=match):
        cross_entropy(_x(), _t(), impl=impl, **{name: value})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, value",
    [
        ("softcap", None),
        ("softcap", 1e-3),  # tiny but positive: every logit pinned near +-1e-3
        ("softcap", 30),  # an int is a float here, as in torch
        ("logit_scale", 1e-3),
        ("lse_square_scale", 0),
        ("label_smoothing", 0.0),
        ("label_smoothing", 1.0),  # the whole target is uniform
    ],
    ids=repr,
)
def test_option_edges_accepted(impl, name, value):
    """The accepted edge of every range runs and gives a finite answer (the value checks of
    test_options.py cover what it is)."""
    x = _x()
    loss = cross_entropy(x, _t(), impl=impl, **{name: value})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "w_shape",
    [
        (4,),  # one class short
        (6,),  # one class too many
        (5, 1),
        (1, 5),
        (),
        (4, 5),  # the input's own shape
    ],
    ids=str,
)
def test_weight_wrong_shape(impl, w_shape):
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\), one per class"):
        cross_entropy(_x(), _t(), torch.ones(w_shape, device=DEVICE), impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_weight_shape_follows_the_class_dim(impl):
    """For (N, C, d1) inputs C is dim 1, and for (C,) inputs dim 0: a weight of the spatial or
    batch size is refused."""
    x = torch.zeros(2, 5, 3, device=DEVICE, requires_grad=True)
    t = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    for w_len in (2, 3):
        with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
            cross_entropy(x, t, torch.ones(w_len, device=DEVICE), impl=impl)
    x1 = torch.zeros(5, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        cross_entropy(x1, torch.tensor(0, device=DEVICE), torch.ones(1, device=DEVICE), impl=impl)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "weight",
    [
        torch.ones(5, dtype=torch.long),
        torch.ones(5, dtype=torch.int32),
        torch.ones(5, dtype=torch.bool),
        torch.ones(5, dtype=torch.complex64),
        [1.0] * 5,
        (1.0,) * 5,
    ],
    ids=lambda w: f"{type(w).__name__}-{getattr(w, 'dtype', '')}",
)
def test_weight_not_floating(impl, weight):
    if isinstance(weight, torch.Tensor):
        weight = weight.to(DEVICE)
    with pytest.raises(TypeError, match=r"weight must be a floating tensor of shape \(5,\)"):
        cross_entropy(_x(), _t(), weight, impl=impl)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_weight_on_other_device(impl):
    x = _x().detach().cuda().requires_grad_()
    with pytest.raises(ValueError, match="weight must be on the input's device"):
        cross_entropy(x, _t().cuda(), torch.ones(5), impl=impl)


def _prob_target(n=4, c=5):
    return torch.rand(n, c, generator=torch.Generator().manual_seed(1)).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_requiring_grad(impl):
    w = (torch.rand(5, generator=torch.Generator().manual_seed(2)) + 0.5).to(DEVICE)
    w.requires_grad_()
    with pytest.raises(ValueError, match=r"weight requires grad.*pass weight.detach\(\)"):
        cross_entropy(_x(), _t(), w, impl=impl)
    x = _x()
    with torch.no_grad():
        loss = cross_entropy(x, _t(), w, impl=impl)
    want_loss, _ = oracle(x, _t(), weight=w.detach())
    check_loss(loss, want_loss, torch.float32)


def test_unknown_keyword():
    for kw in ({"z_loss": 1e-4}, {"smoothing": 0.1}, {"logit_softcap": 30.0}, {"weights": None}):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            cross_entropy(_x(), _t(), **kw)


def test_llm_options_are_keyword_only():
    """Positionally, F.cross_entropy's six arguments end at label_smoothing."""
    with pytest.raises(TypeError, match="positional argument"):
        cross_entropy(_x(), _t(), None, -100, "mean", 0.0, 1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"target": "prob"},
        {"weight": True, "label_smoothing": 0.1},
        {"softcap": 5.0, "logit_scale": 0.5, "lse_square_scale": 1e-2},
    ],
    ids=["prob-target", "weight+smoothing", "llm-options"],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_raises_with_options(impl, reduction, options):
    options = dict(options)
    t = _prob_target() if options.pop("target", None) == "prob" else _t()
    if options.pop("weight", False):
        options["weight"] = torch.linspace(0.5, 2.0, 5, device=DEVICE)
    x = _x()
    loss = cross_entropy(x, t, reduction=reduction, impl=impl, **options)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss.sum(), x, create_graph=True)
