"""fused_xent.cpu (the fast CPU backend) against fused_xent.reference and against torch in float64.

Every output starts as NaN, so an element the backend forgot to write fails. Each case is checked
twice: against the reference (to float32 rounding: the same outputs, statistics included) and
against torch's own ``F.cross_entropy`` on float64 copies (the loss to 1e-5, the gradient to the
house tolerances), with the transforms and the z-loss the reference adds written out in float64.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import GRAD_RTOL, LOSS_RTOL, dtype_id

from fused_xent import cpu, ops, reference
from fused_xent._options import LossOptions

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Ours against the reference: both compute in float32 and round once, so they agree to float32
# rounding (statistics, loss) or to one rounding of the gradient's dtype where the two float32
# values straddle a rounding boundary.
REF_RTOL = {torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-13}
STAT_RTOL = {torch.float64: 1e-13}  # float32 compute otherwise: 2e-6
GRAD_SCALES = (1.0, 1.0 / 8, 65536.0)
C = 50  # classes in the option tests


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_x(n, c, dtype, seed, scale=3.0, offset=0.0):
    x = torch.randn(n, c, generator=_gen(seed), dtype=torch.float64) * scale + offset
    return x.to(dtype)


def make_t(n, c, seed, ignored=(), ignore_index=-100):
    t = torch.randint(0, c, (n,), generator=_gen(seed + 1))
    t[list(ignored)] = ignore_index
    return t


def class_weight(c, seed, zeros=()):
    w = torch.rand(c, generator=_gen(seed + 2), dtype=torch.float64) + 0.25
    w[list(zeros)] = 0.0
    return w.to(torch.float32)


# The options of the fast path: every combination (32), named "plain" or e.g. "smooth+softcap";
# and label smoothing 1 (no target term left).
_OPTION_PARTS = {
    "smooth": {"label_smoothing": 0.2},
    "weight": {"weight": True},
    "scale": {"logit_scale": 1.5},
    "softcap": {"softcap": 6.0},
    "zloss": {"lse_square_scale": 1e-2},
}
OPTIONS = {
    "+".join(parts) or "plain": {k: v for part in parts for k, v in _OPTION_PARTS[part].items()}
    for n in range(len(_OPTION_PARTS) + 1)
    for parts in itertools.combinations(_OPTION_PARTS, n)
}
OPTIONS["smooth1"] = {"label_smoothing": 1.0}
OPTIONS["all"] = OPTIONS["smooth+weight+scale+softcap+zloss"]


def make_opts(name, c, seed, ignore_index=-100, **extra) -> LossOptions:
    kw = dict(OPTIONS[name], **extra)
    if kw.get("weight") is True:
        kw["weight"] = class_weight(c, seed)
    return LossOptions(ignore_index=ignore_index, **kw)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def forward(mod, x, t, opts, grad_scale=None, grad=None):
    """mod.xent_forward into NaN-filled outputs: (loss, stats, grad or None)."""
    n, dtype = x.shape[0], compute_dtype(x.dtype)
    loss, stats = nan_like((n,), dtype), nan_like((3, n), dtype)
    scale = None
    if grad_scale is not None:
        grad = nan_like(x.shape, x.dtype) if grad is None else grad
        scale = torch.tensor(grad_scale, dtype=dtype)
    mod.xent_forward(x, t, opts, loss, stats, grad, scale)
    return loss, stats, grad


def backward(mod, x, t, opts, stats, dloss):
    grad = nan_like(x.shape, x.dtype)
    mod.xent_backward(x, t, opts, stats, dloss, grad)
    return grad


def assert_close(actual, expected, rtol, what=""):
    """NaN and +-inf at the same places; the finite entries within ``rtol``, norm-wise."""
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert a.shape == e.shape, what
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN in different places"
    assert torch.equal(a.isinf() & (a > 0), e.isinf() & (e > 0)), f"{what}: +inf differs"
    assert torch.equal(a.isinf() & (a < 0), e.isinf() & (e < 0)), f"{what}: -inf differs"
    keep = torch.isfinite(e)
    err = float((a[keep] - e[keep]).norm() / e[keep].norm().clamp_min(1e-30))
    assert err <= rtol, f"{what}: rel err {err:.3g} > {rtol}"


def check_against_reference(ours, ref, dtype):
    """(loss, stats, grad) of fused_xent.cpu against the reference's."""
    stat_tol = STAT_RTOL.get(dtype, 2e-6)
    assert_close(ours[0], ref[0], stat_tol, "loss")
    for i, name in enumerate(("max", "log_sum", "coef")):
        assert_close(ours[1][i], ref[1][i], stat_tol, name)
    if ref[2] is not None:
        assert ours[2].dtype == dtype
        assert_close(ours[2], ref[2], REF_RTOL[dtype], "grad")


def oracle64(x, t, opts, row_scale):
    """Per-row loss and d(sum_i row_scale_i * loss_i)/dx, by torch in float64.

    ``F.cross_entropy(reduction="none")`` on the transformed logits, plus the z-loss on rows that
    are not ignored; the transforms go through autograd.
    """
    x64 = x.detach().to(torch.float64).requires_grad_()
    z = x64 * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    w = None if opts.weight is None else opts.weight.to(torch.float64)
    loss = F.cross_entropy(
        z, t.long(), weight=w, ignore_index=opts.ignore_index, reduction="none",
        label_smoothing=opts.label_smoothing,
    )  # fmt: skip
    if opts.lse_square_scale:
        kept = (t != opts.ignore_index).to(torch.float64)
        loss = loss + opts.lse_square_scale * torch.logsumexp(z, 1) ** 2 * kept
    (loss * row_scale.to(torch.float64)).sum().backward()
    return loss.detach(), x64.grad


def check_against_torch(loss, grad, expected_loss, expected_grad, dtype):
    assert_close(loss, expected_loss, 1e-12 if dtype == torch.float64 else LOSS_RTOL, "loss")
    if grad is None:
        return
    finite = torch.isfinite(grad)
    if not bool(finite.all()):  # only a gradient past the dtype's range may overflow
        big = expected_grad.abs() >= torch.finfo(dtype).max * (1 - 2.0**-10)
        assert bool((big | finite).all()), "non-finite gradient"
    assert_close(grad[finite], expected_grad[finite], GRAD_RTOL[dtype], "grad")


@pytest.fixture(autouse=True, params=["one-chunk", "small-chunks"])
def chunking(request, monkeypatch):
    """Every test twice: as it comes (small inputs: one chunk of rows) and with chunks of about
    100 logits (1 or 2 rows here, the last chunk partial)."""
    if request.param == "small-chunks":
        monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 100)
    return request.param


# --------------------------------------------------------------------------------------------
# Forward (with and without the gradient) and backward, every dtype and option
# --------------------------------------------------------------------------------------------


def _forward_params():
    """Every option set without a gradient and with grad_scale 1/8; every grad_scale with a few."""
    for opt in OPTIONS:
        for grad_scale in GRAD_SCALES:
            if grad_scale == 1.0 / 8 or opt in ("plain", "smooth+weight", "all"):
                yield pytest.param(opt, grad_scale, id=f"{opt}-gs{grad_scale}")
        yield pytest.param(opt, None, id=f"{opt}-no-grad")


@pytest.mark.parametrize("opt,grad_scale", list(_forward_params()))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_forward(dtype, opt, grad_scale):
    seed = _seed("fwd", dtype_id(dtype), opt, grad_scale)
    n = 37
    x, t = make_x(n, C, dtype, seed), make_t(n, C, seed, ignored=(0, 5, 6))
    opts = make_opts(opt, C, seed)
    ours = forward(cpu, x, t, opts, grad_scale)
    check_against_reference(ours, forward(reference, x, t, opts, grad_scale), dtype)
    row_scale = torch.full((n,), 1.0 if grad_scale is None else grad_scale)
    expected_loss, expected_grad = oracle64(x, t, opts, row_scale)
    check_against_torch(ours[0], ours[2], expected_loss, expected_grad, dtype)
    if grad_scale is not None:
        ignored = t == opts.ignore_index
        assert bool((ours[0][ignored] == 0).all()) and bool((ours[2][ignored] == 0).all())


@pytest.mark.parametrize("stats_from", ["cpu", "reference"])
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_backward(dtype, opt, stats_from):
    seed = _seed("bwd", dtype_id(dtype), opt, stats_from)
    n = 29
    x, t = make_x(n, C, dtype, seed), make_t(n, C, seed, ignored=(3,))
    opts = make_opts(opt, C, seed)
    _, stats, _ = forward(cpu if stats_from == "cpu" else reference, x, t, opts)
    dloss = torch.rand(n, generator=_gen(seed + 3)) * 3 - 1.5
    dloss[[1, 7]] = 0.0  # a zero incoming gradient: exact zeros
    dloss = dloss.to(stats.dtype)
    # The backward gets the options as ops.py passes them: no z-loss (it is in the coefficient).
    bwd_opts = LossOptions(**{**opts.__dict__, "lse_square_scale": 0.0})
    grad = backward(cpu, x, t, bwd_opts, stats, dloss)
    assert grad.dtype == dtype
    assert_close(grad, backward(reference, x, t, bwd_opts, stats, dloss), REF_RTOL[dtype], "grad")
    assert bool((grad[[1, 3, 7]] == 0).all())
    _, expected_grad = oracle64(x, t, opts, dloss)
    assert_close(grad, expected_grad, GRAD_RTOL[dtype], "grad vs torch")


@pytest.mark.parametrize("n,c", [(1, 1), (4, 1), (1, 2), (5, 2049), (3, 32000)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_shapes(dtype, n, c):
    """C = 1 (loss 0, gradient 0), one row, rows past any block size."""
    seed = _seed("shape", dtype_id(dtype), n, c)
    x, t = make_x(n, c, dtype, seed), make_t(n, c, seed)
    opts = LossOptions(label_smoothing=0.1, lse_square_scale=1e-3)
    ours = forward(cpu, x, t, opts, 0.5)
    check_against_reference(ours, forward(reference, x, t, opts, 0.5), dtype)
    expected_loss, expected_grad = oracle64(x, t, opts, torch.full((n,), 0.5))
    check_against_torch(ours[0], ours[2], expected_loss, expected_grad, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_no_rows(dtype):
    x, t = torch.empty(0, 7, dtype=dtype), torch.empty(0, dtype=torch.long)
    loss, stats, grad = forward(cpu, x, t, LossOptions(), 1.0)
    assert loss.shape == (0,) and stats.shape == (3, 0) and grad.shape == (0, 7)
    stats = torch.empty(3, 0, dtype=compute_dtype(dtype))
    backward(cpu, x, t, LossOptions(), stats, torch.empty(0, dtype=stats.dtype))


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in a row-strided view (big[:, :C]) or a transposed (column-major) matrix."""
    n, c = x.shape
    if layout == "row-strided":
        big = torch.full((n, c + 13), float("nan"), dtype=x.dtype)
        big[:, :c] = x
        return big[:, :c]
    return x.t().contiguous().t()


@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
@pytest.mark.parametrize("opt", ["plain", "smooth", "all"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_strided(dtype, opt, layout):
    """Logits and gradient in a strided layout, int32 targets; forward and backward."""
    seed = _seed("strided", dtype_id(dtype), opt, layout)
    x = _layout(make_x(23, C, dtype, seed), layout)
    t = make_t(23, C, seed, ignored=(4,)).int()
    opts = make_opts(opt, C, seed)
    x_before = x.clone()
    grad = _layout(nan_like((23, C), dtype), layout)
    ours = forward(cpu, x, t, opts, 0.25, grad=grad)
    check_against_reference(ours, forward(reference, x, t, opts, 0.25), dtype)
    expected_loss, expected_grad = oracle64(x, t, opts, torch.full((23,), 0.25))
    check_against_torch(ours[0], ours[2], expected_loss, expected_grad, dtype)
    dloss = torch.linspace(-1, 2, 23, dtype=compute_dtype(dtype))
    bwd_opts = LossOptions(**{**opts.__dict__, "lse_square_scale": 0.0})
    grad = _layout(nan_like((23, C), dtype), layout)
    cpu.xent_backward(x, t, bwd_opts, ours[1], dloss, grad)
    expected = backward(reference, x, t, bwd_opts, ours[1], dloss)
    assert_close(grad, expected, REF_RTOL[dtype], "bwd")
    assert torch.equal(x, x_before)  # the logits are read, never written


def test_logits_that_require_grad():
    """Called with grad enabled on logits that require grad (no graph is built)."""
    x = make_x(9, C, torch.float32, 12).requires_grad_()
    t = make_t(9, C, 12)
    opts = make_opts("all", C, 12)
    ours = forward(cpu, x, t, opts, 1.0)
    check_against_reference(ours, forward(reference, x.detach(), t, opts, 1.0), torch.float32)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_gradient_into_the_logits(dtype):
    """grad given as the logits themselves (inplace_backward, the linear path's chunks)."""
    seed = _seed("inplace", dtype_id(dtype))
    x, t = make_x(19, C, dtype, seed), make_t(19, C, seed, ignored=(2,))
    opts = make_opts("smooth+weight", C, seed)
    expected = forward(reference, x, t, opts, 0.125)
    x_in = x.clone()
    ours = forward(cpu, x_in, t, opts, 0.125, grad=x_in)
    assert ours[2] is x_in
    check_against_reference(ours, expected, dtype)
    x_in = x.clone()
    dloss = torch.linspace(-2, 1, 19, dtype=compute_dtype(dtype))
    cpu.xent_backward(x_in, t, opts, expected[1], dloss, x_in)
    ref_grad = backward(reference, x, t, opts, expected[1], dloss)
    assert_close(x_in, ref_grad, REF_RTOL[dtype], "bwd into logits")


@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_ignore_index(ignore_index):
    """ignore_index among the classes: those rows are ignored, others with that class too."""
    seed = _seed("ignore", ignore_index)
    x = make_x(40, 10, torch.float32, seed)
    t = make_t(40, 10, seed, ignored=(1, 2), ignore_index=ignore_index)
    opts = make_opts("smooth+weight", 10, seed, ignore_index=ignore_index, lse_square_scale=0.1)
    ours = forward(cpu, x, t, opts, 0.5)
    check_against_reference(ours, forward(reference, x, t, opts, 0.5), torch.float32)
    ignored = t == ignore_index
    assert bool((ours[0][ignored] == 0).all()) and bool((ours[2][ignored] == 0).all())
    expected_loss, expected_grad = oracle64(x, t, opts, torch.full((40,), 0.5))
    check_against_torch(ours[0], ours[2], expected_loss, expected_grad, torch.float32)


def test_all_rows_ignored():
    x, t = make_x(6, 9, torch.float32, 1), torch.full((6,), -100)
    for opt in ("plain", "all"):
        opts = make_opts(opt, 9, 1)
        ours = forward(cpu, x, t, opts, 1.0)
        check_against_reference(ours, forward(reference, x, t, opts, 1.0), torch.float32)
        assert bool((ours[0] == 0).all()) and bool((ours[2] == 0).all())


@pytest.mark.parametrize("bad", [-1, 9, 100, -101])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_out_of_range_target_raises_as_reference(bad, direction):
    x, t = make_x(5, 9, torch.float32, 2), torch.tensor([1, -100, bad, 3, bad])
    opts = LossOptions()
    messages = []
    for mod in (reference, cpu):
        with pytest.raises(IndexError) as info:
            if direction == "forward":
                forward(mod, x, t, opts, 1.0)
            else:
                backward(mod, x, t, opts, torch.zeros(3, 5), torch.ones(5))
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert str(bad) in messages[1]


# --------------------------------------------------------------------------------------------
# Edge cases: the results the reference gives
# --------------------------------------------------------------------------------------------


def _edge_logits(dtype):
    x = make_x(8, 12, torch.float64, 5)
    x[0] = float("-inf")  # all -inf: max 0, log_sum -inf, NaN loss and gradient
    x[1, [0, 3, 7]] = float("-inf")  # some -inf, among them a zero-weight class (3)
    x[2, 4] = float("nan")
    x[3, 5] = float("inf")
    x[4] = float("-inf")  # all -inf, but the row is ignored
    x[6, :] = x[6, :] * 1e-3  # nearly flat
    return x.to(dtype)


@pytest.mark.parametrize("opt", ["plain", "smooth", "weight", "smooth+weight", "all"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_non_finite_logits_as_reference(dtype, opt):
    x = _edge_logits(dtype)
    t = torch.tensor([1, 3, 2, 2, -100, 7, 0, 11])
    opts = make_opts(opt, 12, 3)
    if opts.weight is not None:
        opts = LossOptions(**{**opts.__dict__, "weight": class_weight(12, 3, zeros=(3, 9))})
    for gs in (None, 1.0, 0.0):
        ours = forward(cpu, x, t, opts, gs)
        check_against_reference(ours, forward(reference, x, t, opts, gs), dtype)
    stats = forward(reference, x, t, opts)[1]
    dloss = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 0.0, -1.0, 3.0], dtype=stats.dtype)
    bwd_opts = LossOptions(**{**opts.__dict__, "lse_square_scale": 0.0})
    grad = backward(cpu, x, t, bwd_opts, stats, dloss)
    assert_close(grad, backward(reference, x, t, bwd_opts, stats, dloss), REF_RTOL[dtype], "bwd")


@pytest.mark.parametrize("opt", ["plain", "smooth", "smooth+weight", "zloss"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_large_logits_keep_accuracy(dtype, opt):
    """Logits offset by 1e4 (per row, up to 3e4; 1e4 alone in float16) lose no accuracy."""
    seed = _seed("large", dtype_id(dtype), opt)
    n = 16
    offset = torch.linspace(-1e4, 1e4 if dtype == torch.float16 else 3e4, n)[:, None]
    x = (make_x(n, C, torch.float64, seed) + offset.double()).to(dtype)
    t = make_t(n, C, seed)
    opts = make_opts(opt, C, seed)
    ours = forward(cpu, x, t, opts, 1.0)
    check_against_reference(ours, forward(reference, x, t, opts, 1.0), dtype)
    expected_loss, expected_grad = oracle64(x, t, opts, torch.ones(n))
    check_against_torch(ours[0], ours[2], expected_loss, expected_grad, dtype)


@pytest.mark.parametrize("opt", ["plain", "smooth", "smooth+weight", "all"])
@pytest.mark.parametrize("offset", [0, 30, 45])
def test_vocabulary_shard(offset, opt):
    """One rank's classes [offset, offset + 15) of 60: targets elsewhere, smoothing over 60."""
    seed = _seed("shard", offset, opt)
    x = make_x(21, 15, torch.float32, seed)
    t = make_t(21, 60, seed, ignored=(0,))
    opts = make_opts(opt, 15, seed, class_offset=offset, n_classes=60)
    ours = forward(cpu, x, t, opts, 0.5)
    check_against_reference(ours, forward(reference, x, t, opts, 0.5), torch.float32)
    dloss = torch.linspace(-1, 1, 21)
    bwd_opts = LossOptions(**{**opts.__dict__, "lse_square_scale": 0.0})
    grad = backward(cpu, x, t, bwd_opts, ours[1], dloss)
    ref_grad = backward(reference, x, t, bwd_opts, ours[1], dloss)
    assert_close(grad, ref_grad, REF_RTOL[torch.float32], "bwd")


@pytest.mark.parametrize("opt", ["plain", "smooth", "smooth+weight", "softcap"])
def test_vocabulary_shard_backward_from_global_stats(opt):
    """Each rank's backward from the statistics of all 60 classes (as the combine gives them):
    the slices' gradients are the unsharded gradient's columns, also where a slice is all -inf."""
    seed = _seed("shard-bwd", opt)
    x = make_x(21, 60, torch.float32, seed)
    x[2, 15:30] = float("-inf")  # one rank sees only -inf in this row
    t = make_t(21, 60, seed, ignored=(0,))
    t[2] = 40
    full_opts = make_opts(opt, 60, seed)
    stats = forward(reference, x, t, full_opts)[1]
    dloss = torch.linspace(-1, 1, 21)
    expected = backward(reference, x, t, full_opts, stats, dloss)
    parts = []
    for offset in (0, 15, 30, 45):
        w = None if full_opts.weight is None else full_opts.weight[offset : offset + 15]
        opts = LossOptions(**{**full_opts.__dict__, "weight": w, "class_offset": offset,
                              "n_classes": 60})  # fmt: skip
        x_r = x[:, offset : offset + 15]
        parts.append(backward(cpu, x_r, t, opts, stats, dloss))
        ref_part = backward(reference, x_r, t, opts, stats, dloss)
        assert_close(parts[-1], ref_part, REF_RTOL[torch.float32], f"rank at {offset}")
    assert_close(torch.cat(parts, 1), expected, REF_RTOL[torch.float32], "all ranks")


def test_deterministic_algorithms():
    """Runs under torch.use_deterministic_algorithms(True), and twice gives the same bits."""
    x, t = make_x(24, 300, torch.bfloat16, 13), make_t(24, 300, 13, ignored=(5,))
    opts = make_opts("smooth+weight", 300, 13)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = forward(cpu, x, t, opts, 0.5), forward(cpu, x, t, opts, 0.5)
        dloss = torch.linspace(-1, 1, 24)
        grads = [backward(cpu, x, t, opts, first[1], dloss) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in [*zip(first, second, strict=True), grads]:
        assert torch.equal(a, b)


def test_probability_targets_delegate():
    """With a softcap, probability targets go to the reference."""
    x = make_x(7, 11, torch.bfloat16, 9)
    t = torch.rand(7, 11, generator=_gen(9)).softmax(1)
    opts = make_opts("all", 11, 9)
    ours = forward(cpu, x, t, opts, 0.5)
    check_against_reference(ours, forward(reference, x, t, opts, 0.5), torch.bfloat16)


def _prob_target(n, c, seed, dtype):
    t = torch.rand(n, c, generator=_gen(seed + 3), dtype=torch.float64).softmax(1)
    t[1, 3:] = 0.0  # no mass on most classes
    return t.to(dtype)


@pytest.mark.parametrize("grad_scale", [None, 0.5])
@pytest.mark.parametrize("opt", [o for o in OPTIONS if "softcap" not in o and o != "all"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_probability_targets(dtype, opt, grad_scale):
    """The fast path of probability targets: forward (loss, statistics, gradient) and backward
    (a per-row incoming gradient, zeros included) as the reference's."""
    seed = _seed("prob", dtype_id(dtype), opt, grad_scale)
    x, t = make_x(13, C, dtype, seed), _prob_target(13, C, seed, dtype)
    opts = make_opts(opt, C, seed)
    ours = forward(cpu, x, t, opts, grad_scale)
    check_against_reference(ours, forward(reference, x, t, opts, grad_scale), dtype)
    dloss = torch.linspace(-1, 1, 13)
    dloss[4] = 0.0
    bwd_opts = LossOptions(**{**opts.__dict__, "lse_square_scale": 0.0})
    stats = forward(reference, x, t, bwd_opts)[1]
    grad = backward(cpu, x, t, bwd_opts, stats, dloss)
    assert_close(grad, backward(reference, x, t, bwd_opts, stats, dloss), REF_RTOL[dtype], "bwd")
    assert bool((grad[4] == 0).all())


@pytest.mark.parametrize("opt", ["plain", "smooth+weight"])
def test_probability_targets_non_finite_and_shard(opt):
    """-inf logits where a row has no target mass, +inf, NaN: as the reference; and one rank's
    classes [15, 30) of 60."""
    seed = _seed("prob-edge", opt)
    x, t = make_x(9, C, torch.float32, seed), _prob_target(9, C, seed, torch.float32)
    x[1, 10:20] = float("-inf")  # no mass there
    x[2, 0] = float("-inf")
    x[3, 7] = float("inf")
    x[5, 2] = float("nan")
    x[6] = float("-inf")
    opts = make_opts(opt, C, seed)
    ours = forward(cpu, x, t, opts, 0.5)
    check_against_reference(ours, forward(reference, x, t, opts, 0.5), torch.float32)
    x, t = make_x(9, 15, torch.float32, seed), _prob_target(9, 15, seed, torch.float32)
    opts = make_opts(opt, 15, seed, class_offset=15, n_classes=60)
    ours = forward(cpu, x, t, opts, 0.5)
    check_against_reference(ours, forward(reference, x, t, opts, 0.5), torch.float32)


# --------------------------------------------------------------------------------------------
# Through the public API and the autograd layer
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_backend(monkeypatch):
    """impl="reference" routed to fused_xent.cpu, as the dispatch will do on the CPU."""
    module = ops._module
    monkeypatch.setattr(ops, "_module", lambda impl: cpu if impl == "reference" else module(impl))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_cross_entropy_api(cpu_backend, dtype, reduction, inplace):
    import fused_xent

    seed = _seed("api", dtype_id(dtype), reduction, inplace)
    x, t = make_x(33, C, dtype, seed), make_t(33, C, seed, ignored=(4,))
    w = class_weight(C, seed)
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    leaf = x.clone().requires_grad_()
    inp = leaf * 1 if inplace else leaf  # inplace_backward needs a non-leaf
    loss = fused_xent.cross_entropy(inp, t, inplace_backward=inplace, impl="reference", **kw)
    grad_out = torch.rand(loss.shape, generator=_gen(seed + 5), dtype=loss.dtype) + 0.5
    (grad,) = torch.autograd.grad(loss, leaf, grad_out)
    x64 = x.detach().double().requires_grad_()
    expected = F.cross_entropy(x64, t, weight=w.double(), label_smoothing=0.1, reduction=reduction)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad_out.double())
    check_against_torch(loss.reshape(-1), grad, expected.reshape(-1), expected_grad, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_api(cpu_backend, reduction):
    """The linear path: chunks of logits whose gradient overwrites them, (3, chunk) views of
    the statistics."""
    import fused_xent

    gen = _gen(_seed("linear", reduction))
    hidden = torch.randn(70, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=gen, dtype=torch.float64) / 4
    t = torch.randint(0, 40, (70,), generator=gen)
    t[3] = -100
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = fused_xent.linear_cross_entropy(
        h32, w32, t, reduction=reduction, label_smoothing=0.1, chunk_size=32, impl="reference"
    )
    grad_out = torch.rand(loss.shape, generator=gen) + 0.5
    grads = torch.autograd.grad(loss, (h32, w32), grad_out)
    h64, w64 = hidden.requires_grad_(), weight.requires_grad_()
    expected = F.cross_entropy(h64 @ w64.t(), t, label_smoothing=0.1, reduction=reduction)
    expected_grads = torch.autograd.grad(expected, (h64, w64), grad_out.double())
    assert_close(loss.reshape(-1), expected.reshape(-1), LOSS_RTOL, "loss")
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e, GRAD_RTOL[torch.float32], "grad")


def test_checks_can_fail():
    """The comparisons above catch a wrong target column, a wrong max and an unwritten row."""
    x, t = make_x(12, C, torch.float32, 8), make_t(12, C, 8)
    opts = LossOptions(label_smoothing=0.1)
    ref = forward(reference, x, t, opts, 1.0)
    ours = forward(cpu, x, t, opts, 1.0)
    broken_grad = ours[2].clone()
    broken_grad[3, t[3]] += 1e-3
    with pytest.raises(AssertionError):
        check_against_reference((ours[0], ours[1], broken_grad), ref, torch.float32)
    broken_stats = ours[1].clone()
    broken_stats[0, 5] += 1.0
    with pytest.raises(AssertionError):
        check_against_reference((ours[0], broken_stats, ours[2]), ref, torch.float32)
    unwritten = ours[0].clone()
    unwritten[7] = float("nan")
    with pytest.raises(AssertionError):
        check_against_reference((unwritten, ours[1], ours[2]), ref, torch.float32)
    expected_loss, expected_grad = oracle64(x, t, LossOptions(), torch.ones(12))  # no smoothing
    with pytest.raises(AssertionError):
        check_against_torch(ours[0], ours[2], expected_loss, expected_grad, torch.float32)


# --------------------------------------------------------------------------------------------
# Small CPU calls: torch's kernels on upcast copies (functional._torch_cpu)
# --------------------------------------------------------------------------------------------


def _spy_paths(monkeypatch):
    """Which CPU path each call takes: 'torch' (functional._torch_cpu) or 'rows' (cpu.py)."""
    from fused_xent import functional

    seen = []
    small, forward = functional._torch_cpu, cpu.xent_forward

    def spy_small(*args):
        seen.append("torch")
        return small(*args)

    def spy_rows(*args, **kwargs):
        seen.append("rows")
        return forward(*args, **kwargs)

    monkeypatch.setattr(functional, "_torch_cpu", spy_small)
    monkeypatch.setattr(cpu, "xent_forward", spy_rows)
    return seen


_SMALL_CASES = {
    "plain": {},
    "smooth": {"label_smoothing": 0.15},
    "weight": {"weight": True},
    "ignore": {"ignored": (1, 4)},
    "weight+smooth+ignore": {"weight": True, "label_smoothing": 0.3, "ignored": (0,)},
    "prob": {"prob": True},
    "prob+smooth+weight": {"prob": True, "label_smoothing": 0.2, "weight": True},
}


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("case", list(_SMALL_CASES), ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_small_cpu_calls_take_torch_and_match_float64(monkeypatch, dtype, case, reduction):
    import fused_xent

    spec = _SMALL_CASES[case]
    seed = _seed("small", dtype, case, reduction)
    x = make_x(6, 3, dtype, seed).reshape(2, 3, 3).transpose(1, 2)  # (N, C, d): strided classes
    x = x.contiguous().requires_grad_()
    if spec.get("prob"):
        t = torch.rand(2, 3, 3, generator=_gen(seed), dtype=torch.float64).to(dtype)
    else:
        t = make_t(6, 3, seed, spec.get("ignored", ())).reshape(2, 3).to(torch.int32)
    w = class_weight(3, seed) if spec.get("weight") else None
    kw = {"label_smoothing": spec.get("label_smoothing", 0.0), "reduction": reduction}
    seen = _spy_paths(monkeypatch)
    loss = fused_xent.cross_entropy(x, t, w, **kw)
    g = torch.randn(loss.shape, generator=_gen(seed + 5), dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, x, g.to(loss.dtype))
    assert seen == ["torch"]

    x64 = x.detach().double().requires_grad_()
    t64 = t.double() if t.is_floating_point() else t.long()
    want = F.cross_entropy(x64, t64, None if w is None else w.double(), **kw)
    (want_grad,) = torch.autograd.grad(want, x64, g)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert float((loss.detach().double() - want).norm() / want.norm()) <= LOSS_RTOL
    assert float((grad.double() - want_grad).norm() / want_grad.norm()) <= GRAD_RTOL[dtype]
    with torch.no_grad():
        again = fused_xent.cross_entropy(x, t, w, **kw)
    assert torch.equal(again, loss.detach())


def test_small_cpu_calls_refuse_double_backward_like_the_kernels(monkeypatch):
    import fused_xent

    seen = _spy_paths(monkeypatch)
    x = make_x(4, 5, torch.float32, 1).requires_grad_()
    loss = fused_xent.cross_entropy(x, make_t(4, 5, 1))
    assert seen == ["torch"]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"softcap": 5.0},
        {"logit_scale": 0.5},
        {"lse_square_scale": 1e-3},
        {"return_lse": True},
        {"inplace_backward": True},
        {"big": True},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_options_torch_lacks_and_large_calls_take_the_row_path(monkeypatch, kwargs):
    import fused_xent
    from fused_xent import functional

    kwargs = dict(kwargs)
    rows = functional._TORCH_CPU_MAX_ELEMENTS + 1 if kwargs.pop("big", False) else 4
    seen = _spy_paths(monkeypatch)
    x = make_x(rows, 1, torch.float32, 2).expand(rows, 3).contiguous().requires_grad_()
    fused_xent.cross_entropy(x.clone() if kwargs.get("inplace_backward") else x,
                             make_t(rows, 3, 2), **kwargs)  # fmt: skip
    assert seen == ["rows"]
