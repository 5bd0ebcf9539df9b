"""linear_cross_entropy / LinearCrossEntropyLoss against torch's F.linear + F.cross_entropy.

The oracle runs torch on float64 copies of the same (rounded) inputs; the LLM options (logit_scale,
softcap, z-loss) are written out as the formula the docstring states. Half-precision inputs are
also held to Apple's check: our error against float64 may be at most 1.5x torch's own error when
torch runs the same step in that dtype (F.linear in the dtype, the loss on logits upcast to
float32, as Hugging Face models do).

Sizes are tiny on purpose: without CUDA, impl="triton" runs the kernels under Triton's CPU
interpreter at roughly 20 ms per row and pass, so a 26-row case costs about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICE,
    GRAD_RTOL,
    IMPLS,
    LOSS_RTOL,
    REDUCTIONS,
    backward,
    dtype_id,
    random_grad_out,
    rel_err,
)
from torch.utils._python_dispatch import TorchDispatchMode

import fused_xent._alloc
from fused_xent import LinearCrossEntropyLoss, autograd, linear_cross_entropy
from fused_xent.autograd import CHUNK_BUDGET_BYTES, pick_chunk_size

requires_cuda = pytest.mark.requires_cuda

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Apple's check for linear + cross-entropy. torch rounds the logits, their gradient and the
# products once each; the chunked path rounds the logits and their gradient once each and keeps
# the products in float32 until the incoming gradient and the "mean" denominator are applied,
# then rounds once. Both round the logits' gradient, at different scales, so on these small
# tensors one draw's error ratio scatters (measured up to 1.34x on a 50-class d_bias, all options,
# bf16); test_rounded_once holds 1.25x on larger ones. TORCH_EPS covers errors both at the
# float32 floor.
TORCH_ERR_FACTOR = 1.5
TORCH_EPS = 1e-6

D = 16  # hidden size: big enough for real products, small for the interpreter
V = 50  # vocabulary: not a power of two, so the kernel's 64-wide block has 14 masked lanes
N = 26  # rows: 5 and 8 do not divide it, so the last chunk is partial
LOGIT_STD = 3.0  # the softmax is far from flat (house style, as make_logits)

# Options at values where each one visibly changes loss and gradient at LOGIT_STD:
SMOOTHING = dict(label_smoothing=0.1)
SOFTCAP = dict(softcap=3.0)  # about one logit std: tanh is far from linear over the logits
LOGIT_SCALE = dict(logit_scale=0.5)
Z_LOSS = dict(lse_square_scale=0.1)  # large, so lse^2 is a sizeable share of loss and gradient
ALL_OPTIONS = {**SMOOTHING, **SOFTCAP, **LOGIT_SCALE, **Z_LOSS}


def _seed(*parts) -> int:
    """A seed per parameter set, stable across processes (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode())


def make_case(lead, v, d, dtype, seed, *, bias=True, ignored=(), ignore_index=-100):
    """(input (*lead, d), weight (v, d), bias (v,) or None, target lead): logits ~ N(0, 3^2)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * (LOGIT_STD / d**0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, lead, generator=gen)
    t.view(-1)[list(ignored)] = ignore_index

    def cast(a):
        return None if a is None else a.to(dtype).to(DEVICE)

    return cast(x), cast(w), cast(b), t.to(DEVICE)


def grad_out_for(reduction, shape, seed) -> torch.Tensor:
    """A random, non-unit incoming gradient: a scalar for mean/sum, the target's shape for none."""
    n = 1
    for s in shape:
        n *= s
    g = random_grad_out(reduction, n, seed)
    return g.reshape(shape) if reduction == "none" else g


def torch_linear_xent(
    x,
    w,
    b,
    t,
    *,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    logit_scale=1.0,
):
    """The documented semantics with torch's own ops: (loss, lse).

    F.linear runs in the inputs' dtype; the loss on logits upcast to float32 (float64 for float64
    inputs), as Hugging Face models do. z = softcap * tanh(logit_scale * logits / softcap); per
    row CE(z) + lse_square_scale * lse(z)^2 on non-ignored rows; "mean" over non-ignored rows.
    """
    logits = F.linear(x, w, b)
    z = logits.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    z = z.reshape(-1, w.shape[0]) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows_t = t.reshape(-1).long()
    lse = torch.logsumexp(z, dim=1)
    ce = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    if lse_square_scale == 0.0:
        loss = F.cross_entropy(z, rows_t, reduction=reduction, **ce)
    else:
        kept = rows_t != ignore_index
        rows = F.cross_entropy(z, rows_t, reduction="none", **ce)
        rows = rows + torch.where(kept, lse_square_scale * lse * lse, 0.0)
        loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / kept.sum()}[reduction]
    if reduction == "none":
        loss = loss.reshape(t.shape)
    return loss, lse.reshape(t.shape).detach()


def _leaves(x, w, b, dtype=None):
    return [
        None if a is None else a.detach().to(dtype or a.dtype).requires_grad_() for a in (x, w, b)
    ]


def run_torch(x, w, b, t, grad_out, dtype, **opts):
    """torch on copies of x, w, b in ``dtype``: (loss, lse, d_input, d_weight, d_bias)."""
    xl, wl, bl = _leaves(x, w, b, dtype)
    loss, lse = torch_linear_xent(xl, wl, bl, t, **opts)
    backward(loss, grad_out.to(loss.dtype))
    return loss.detach(), lse, xl.grad, wl.grad, None if bl is None else bl.grad


def run_ours(x, w, b, t, grad_out, **kw):
    """linear_cross_entropy with return_lse: (loss, lse, d_input, d_weight, d_bias)."""
    xl, wl, bl = _leaves(x, w, b)
    loss, lse = linear_cross_entropy(xl, wl, t, linear_bias=bl, return_lse=True, **kw)
    assert not lse.requires_grad, "lse is for logging; it must not be differentiable"
    assert lse.dtype == torch.float32 and lse.shape == t.shape
    backward(loss, grad_out)
    for leaf in (xl, wl, bl):
        if leaf is not None:
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype
            assert leaf.grad.shape == leaf.shape
    return loss.detach(), lse, xl.grad, wl.grad, None if bl is None else bl.grad


NAMES = ("loss", "lse", "d_input", "d_weight", "d_bias")


def check_against_torch(x, w, b, t, grad_out, *, impl, chunk_size=None, **opts):
    """Our loss, lse and gradients against float64 torch; half precision also against torch's
    own error in that dtype (Apple's check). Returns ours, as run_ours."""
    dtype = x.dtype
    ours = run_ours(x, w, b, t, grad_out, impl=impl, chunk_size=chunk_size, **opts)
    want = run_torch(x, w, b, t, grad_out, torch.float64, **opts)
    assert ours[0].dtype == torch.float32, "the loss is float32 for every input dtype"
    assert ours[0].shape == want[0].shape
    if dtype == torch.float32:
        for name, got, exp in zip(NAMES, ours, want, strict=True):
            if exp is None:
                continue
            tol = LOSS_RTOL if name in ("loss", "lse") else GRAD_RTOL[dtype]
            err = rel_err(got, exp)
            assert err <= tol, f"{name}: rel err {err:.3g} > {tol}"
        return ours
    theirs = run_torch(x, w, b, t, grad_out, dtype, **opts)
    for name, got, lowp, exp in zip(NAMES, ours, theirs, want, strict=True):
        if exp is None:
            continue
        err, torch_err = rel_err(got, exp), rel_err(lowp, exp)
        bound = TORCH_ERR_FACTOR * torch_err + TORCH_EPS
        assert err <= bound, f"{name}: rel err {err:.3g} > torch's own {torch_err:.3g} x1.5"
    return ours


# --------------------------------------------------------------------------------------------
# 1. Loss, lse and gradients against torch
# --------------------------------------------------------------------------------------------


def impl_params(cases, on_triton=lambda *case: True):
    """Every case on the reference (cheap), those ``on_triton`` accepts on the kernels too (each
    interpreted case costs about a second)."""
    return [
        pytest.param(impl, *case.values, id=f"{impl}-{case.id}")
        for impl in IMPLS
        for case in cases
        if impl == "reference" or on_triton(*case.values)
    ]


CHUNKS = [
    5,  # 6 chunks, the last holds one row
    8,  # 4 chunks, the last holds two rows
    N,  # exactly one chunk
    100,  # more than the rows: one chunk, clipped
    None,  # pick_chunk_size: all 26 rows at this vocabulary
]
CHUNK_CASES = [
    pytest.param(chunk, reduction, id=f"chunk{chunk}-{reduction}")
    for chunk in CHUNKS
    for reduction in REDUCTIONS
]


# On the kernels: chunks of 5 (the one-row last chunk) with every reduction, chunks of 8 through
# the backward kernel, one whole chunk (26, 100 and None give the kernels the same slices).
_TRITON_CHUNKS = {(5, "mean"), (5, "sum"), (5, "none"), (8, "none"), (None, "mean")}


@pytest.mark.parametrize(
    "impl, chunk_size, reduction", impl_params(CHUNK_CASES, lambda *c: c in _TRITON_CHUNKS)
)
def test_chunks(impl, chunk_size, reduction):
    """Every chunking gives torch's loss and gradients; three ignored rows (one in the partial
    last chunk of 5 and of 8) and a random incoming gradient."""
    seed = _seed("chunks", chunk_size, reduction)
    x, w, b, t = make_case((N,), V, D, torch.float32, seed, ignored=(0, 11, 25))
    check_against_torch(
        x, w, b, t, grad_out_for(reduction, t.shape, seed), impl=impl, chunk_size=chunk_size,
        reduction=reduction,
    )  # fmt: skip


LEADS = {
    "2d": (N,),  # (N, D) hidden states
    "3d": (2, 13),  # (B, T, D): 26 rows; a chunk of 8 straddles the two sequences
}
LAYOUT_CASES = [
    pytest.param(dtype, lead, bias, reduction, id=f"{dtype_id(dtype)}-{lead}-{b_id}-{reduction}")
    for dtype in (torch.float32, *LOW_PRECISION)
    for lead in LEADS
    for bias, b_id in ((True, "bias"), (False, "no_bias"))
    for reduction in ("mean", "none")
]


# On the kernels: every dtype, once 2-D with bias through the fused forward ("mean") and once
# 3-D without bias through the backward kernel ("none").
@pytest.mark.parametrize(
    "impl, dtype, lead, bias, reduction",
    impl_params(
        LAYOUT_CASES, lambda dt, lead, bias, r: (lead, bias, r) in (("2d", True, "mean"),
                                                                    ("3d", False, "none"))
    ),
)  # fmt: skip
def test_dtypes_shapes_bias(impl, dtype, lead, bias, reduction):
    seed = _seed("dtypes", dtype, bias, lead, reduction)
    x, w, b, t = make_case(LEADS[lead], V, D, dtype, seed, bias=bias, ignored=(3,))
    check_against_torch(
        x, w, b, t, grad_out_for(reduction, t.shape, seed), impl=impl, chunk_size=8,
        reduction=reduction,
    )  # fmt: skip


OPTIONS = {
    "label_smoothing": SMOOTHING,
    "softcap": SOFTCAP,
    "logit_scale": LOGIT_SCALE,
    "lse_square_scale": Z_LOSS,
    "all": ALL_OPTIONS,
}
OPTION_CASES = [
    pytest.param(name, dtype, reduction, id=f"{name}-{dtype_id(dtype)}-{reduction}")
    for name, dtype in [*((name, torch.float32) for name in OPTIONS), ("all", torch.bfloat16)]
    for reduction in ("mean", "none")
]
# On the kernels: each option alone through one of the two kernels (fused forward for "mean",
# backward for "none"), all of them together through both in float32, and in bfloat16 once.
_ONE_KERNEL = {"label_smoothing": "mean", "softcap": "none", "logit_scale": "mean",
               "lse_square_scale": "none"}  # fmt: skip


@pytest.mark.parametrize(
    "impl, name, dtype, reduction",
    impl_params(
        OPTION_CASES,
        lambda name, dt, r: (
            (name, dt, r) == ("all", torch.bfloat16, "mean")
            or (name == "all" and dt == torch.float32)
            or _ONE_KERNEL.get(name) == r
        ),
    ),
)
def test_llm_options(impl, name, dtype, reduction):
    """The options against the formula, lse included (that of the transformed logits z)."""
    seed = _seed("options", name, dtype, reduction)
    x, w, b, t = make_case((N,), V, D, dtype, seed, ignored=(4, 20))
    check_against_torch(
        x, w, b, t, grad_out_for(reduction, t.shape, seed), impl=impl, chunk_size=8,
        reduction=reduction, **OPTIONS[name],
    )  # fmt: skip


IGNORE_CASES = [
    "all_ignored",  # mean: 0/0 = NaN (as torch), gradients exactly zero
    "custom_index",  # ignore_index = 7, a valid class: rows with target 7 drop out
    "no_rows",  # (0, D) input: nothing to chunk
]


# On the kernels: a custom ignore_index through each of the two kernels.
@pytest.mark.parametrize(
    "impl, case, reduction",
    impl_params(
        [pytest.param(c, r, id=f"{c}-{r}") for c in IGNORE_CASES for r in REDUCTIONS],
        lambda c, r: c != "custom_index" or r != "sum",
    ),
)
def test_ignored_rows(impl, case, reduction):
    n = 0 if case == "no_rows" else 8  # 8 rows in chunks of 5: a partial last chunk
    seed = _seed("ignore", case, reduction)
    x, w, b, t = make_case((n,), V, D, torch.float32, seed)
    ignore_index = -100
    if case == "all_ignored":
        t.fill_(ignore_index)
    elif case == "custom_index":
        ignore_index = 7
        t[[1, 5, 7]] = 7
    grad_out = grad_out_for(reduction, t.shape, seed)
    ours = check_against_torch(
        x, w, b, t, grad_out, impl=impl, chunk_size=5, reduction=reduction,
        ignore_index=ignore_index, **Z_LOSS,
    )  # fmt: skip
    if case != "custom_index":
        if reduction == "mean":
            assert ours[0].isnan(), "mean over no rows is 0/0 = NaN, as torch"
        else:
            assert (ours[0] == 0).all()
        for grad in ours[2:]:
            assert (grad == 0).all(), "no row counts: every gradient is exactly zero"


def test_float64_on_the_reference():
    """float64 runs on the reference (a tight oracle for the chunking itself); Triton refuses."""
    seed = _seed("float64")
    x, w, b, t = make_case((N,), V, D, torch.float64, seed, ignored=(2,))
    grad_out = grad_out_for("mean", (), seed).double()
    xl, wl, bl = _leaves(x, w, b)
    loss, lse = linear_cross_entropy(
        xl, wl, t, linear_bias=bl, chunk_size=5, return_lse=True, impl="reference", **ALL_OPTIONS
    )
    backward(loss, grad_out)
    want = run_torch(x, w, b, t, grad_out, torch.float64, **ALL_OPTIONS)
    assert loss.dtype == torch.float64
    for name, got, exp in zip(NAMES, (loss, lse, xl.grad, wl.grad, bl.grad), want, strict=True):
        assert rel_err(got, exp) <= 1e-12, name
    with pytest.raises(TypeError, match="impl='triton'"):
        linear_cross_entropy(x, w, t, linear_bias=b, impl="triton")


def _relayout(layout, x, w, b, t):
    """The same values in another memory layout (torch's ops accept them all)."""
    if layout == "strided_input":  # every other hidden unit of a wider buffer: not dense
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "column_major_input":  # dense, but the hidden dimension is not innermost
        x = x.t().contiguous().t()
    elif layout == "column_major_weight":  # a head stored as (D, V), transposed
        w = w.t().contiguous().t()
    elif layout == "offset_weight":  # a slice of a bigger buffer: nonzero storage offset
        tall = torch.zeros(w.shape[0] + 3, w.shape[1], dtype=w.dtype, device=w.device)
        tall[3:] = w
        w = tall[3:]
    elif layout == "strided_int32_target":
        wide = torch.zeros(2 * t.shape[0], dtype=torch.int32, device=t.device)
        wide[::2] = t
        t = wide[::2]
    return x, w, b, t


LAYOUT_CASES = [
    pytest.param(
        impl, layout, reduction, id=f"{impl}-{layout}-{reduction}",
    )
    for impl in IMPLS
    for layout in ("strided_input", "column_major_input", "column_major_weight", "offset_weight",
                   "strided_int32_target")
    for reduction in ("mean", "none")
    # The kernels see contiguous logits whatever the weight's layout: only the reference for those.
    if impl == "reference" or "weight" not in layout
]  # fmt: skip


@pytest.mark.parametrize("impl, layout, reduction", LAYOUT_CASES)
def test_layouts(impl, layout, reduction):
    n = 8  # a partial last chunk of 5
    seed = _seed("layout", layout, reduction)
    x, w, b, t = _relayout(layout, *make_case((n,), V, D, torch.float32, seed, ignored=(1,)))
    check_against_torch(
        x, w, b, t, grad_out_for(reduction, t.shape, seed), impl=impl, chunk_size=5,
        reduction=reduction,
    )  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_target_out_of_range(impl):
    """As cross_entropy: the reference raises IndexError; the kernels give that row a NaN loss
    without reading out of bounds, and leave the other rows alone."""
    x, w, b, t = make_case((6,), V, D, torch.float32, _seed("out_of_range"))
    t[2] = V
    if impl == "reference":
        with pytest.raises(IndexError, match="outside"):
            linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", chunk_size=4, impl=impl)
        return
    loss = linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", chunk_size=4, impl=impl)
    assert loss[2].isnan() and loss[[0, 1, 3, 4, 5]].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_auto_on_cpu_matches_the_reference(dtype):
    """On the CPU impl='auto' runs fused_xent/cpu.py: the reference's numbers, to the rounding of
    the dtype (its softmax sums in another order)."""
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA impl='auto' picks the kernels")
    seed = _seed("auto", dtype)
    x, w, b, t = make_case((N,), V, D, dtype, seed)
    auto = run_ours(x, w, b, t, torch.ones(()), impl="auto", chunk_size=8)
    ref = run_ours(x, w, b, t, torch.ones(()), impl="reference", chunk_size=8)
    for name, a, r in zip(NAMES, auto, ref, strict=True):
        tol = 1e-6 if a.dtype == torch.float32 else GRAD_RTOL[dtype]
        assert rel_err(a, r) <= tol, name


def test_module_matches_functional():
    """The module owns its head (``linear.weight`` / ``linear.bias``, as torch's module)."""
    options = dict(reduction="none", ignore_index=5, chunk_size=8, impl="reference", **ALL_OPTIONS)
    seed = _seed("module")
    x, w, b, t = make_case((2, 13), V, D, torch.float32, seed, ignored=(0, 9), ignore_index=5)
    for bias in (b, None):
        module = LinearCrossEntropyLoss(D, V, bias=bias is not None, return_lse=True, **options)
        assert "chunk_size=8" in repr(module) and "impl='reference'" in repr(module)
        with torch.no_grad():
            module.linear.weight.copy_(w)
            if bias is not None:
                module.linear.bias.copy_(bias)
        got_loss, got_lse = module(x, t)
        want_loss, want_lse = linear_cross_entropy(
            x, w, t, linear_bias=bias, return_lse=True, **options
        )
        assert torch.equal(got_loss, want_loss) and torch.equal(got_lse, want_lse)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("wanted", ["input", "weight", "bias", "weight+bias"])
def test_some_leaves_need_grad(wanted, reduction):
    """Only the leaves that require grad get one (a frozen head, frozen hidden states); the
    others stay None, and the ones computed are torch's."""
    seed = _seed("leaves", wanted, reduction)
    x, w, b, t = make_case((N,), V, D, torch.float32, seed, ignored=(6,))
    grad_out = grad_out_for(reduction, t.shape, seed)
    leaves = dict(zip(("input", "weight", "bias"), (x.clone(), w.clone(), b.clone()), strict=True))
    for name, leaf in leaves.items():
        leaf.requires_grad_(name in wanted.split("+"))
    loss = linear_cross_entropy(
        leaves["input"], leaves["weight"], t, linear_bias=leaves["bias"], reduction=reduction,
        chunk_size=5, impl="reference",
    )  # fmt: skip
    backward(loss, grad_out)
    want = dict(zip(("input", "weight", "bias"), run_torch(
        x, w, b, t, grad_out, torch.float64, reduction=reduction)[2:], strict=True))  # fmt: skip
    for name, leaf in leaves.items():
        if leaf.requires_grad:
            assert rel_err(leaf.grad, want[name]) <= GRAD_RTOL[torch.float32], name
        else:
            assert leaf.grad is None, name


# --------------------------------------------------------------------------------------------
# 2. fp32_weight_grad: the weight gradient summed over many chunks
# --------------------------------------------------------------------------------------------

FP32_WGRAD_CASES = [
    pytest.param("reference", torch.bfloat16, "mean"),
    pytest.param("reference", torch.bfloat16, "none"),  # accumulated in the backward instead
    pytest.param("reference", torch.float16, "mean"),
    pytest.param("triton", torch.bfloat16, "mean"),
]


@pytest.mark.parametrize("impl, dtype, reduction", FP32_WGRAD_CASES)
def test_fp32_weight_grad(impl, dtype, reduction):
    """Summing 16 chunk products in float32 rounds d_weight once, as torch's single product
    does; summing in the weight's dtype rounds it 16 times (measured: 1.3-1.5x the error).
    d_bias is summed in float32 either way."""
    n, chunk = 32, 2  # 16 chunks of 2 rows: 16 roundings of d_weight with fp32_weight_grad=False
    seed = _seed("fp32_wgrad", impl, dtype, reduction)
    x, w, b, t = make_case((n,), V, D, dtype, seed, ignored=(9,))
    grad_out = grad_out_for(reduction, t.shape, seed)
    want = run_torch(x, w, b, t, grad_out, torch.float64, reduction=reduction)
    theirs = run_torch(x, w, b, t, grad_out, dtype, reduction=reduction)
    errs = {}
    for fp32 in (True, False):
        got = run_ours(
            x, w, b, t, grad_out, impl=impl, chunk_size=chunk, fp32_weight_grad=fp32,
            reduction=reduction,
        )  # fmt: skip
        errs[fp32] = [rel_err(got[i], want[i]) for i in (3, 4)]  # d_weight, d_bias
    for i, name in enumerate(("d_weight", "d_bias")):
        torch_err = rel_err(theirs[3 + i], want[3 + i])
        assert errs[True][i] <= errs[False][i], f"{name}: float32 accumulation is less accurate"
        if name == "d_weight":
            assert errs[True][i] < errs[False][i], "fp32_weight_grad made no difference"
        bound = TORCH_ERR_FACTOR * torch_err + TORCH_EPS
        assert errs[True][i] <= bound, f"{name}: {errs[True][i]:.3g} > torch's {torch_err:.3g}"


def test_float16_weight_grad_in_dtype_stays_in_range():
    """fp32_weight_grad=False with float16: the chunk gradients are not divided by N, so their
    running sum over 4096 rows of coherent hidden states (-30 x 4096 for the target class) would
    pass float16's 65504 although the "mean" gradient (about -30) does not; the accumulator holds
    the sum over 2**12, so the gradient comes out finite and right."""
    n, v, d = 4096, 8, 4
    h = torch.full((n, d), 30.0, dtype=torch.float16, device=DEVICE)
    w = torch.linspace(-0.5, 0.5, v * d, device=DEVICE).reshape(v, d).half()
    t = torch.zeros(n, dtype=torch.long, device=DEVICE)
    wl = w.clone().requires_grad_()
    linear_cross_entropy(
        h, wl, t, chunk_size=512, fp32_weight_grad=False, impl="reference"
    ).backward()
    _, _, _, want, _ = run_torch(h, w, None, t, torch.ones(()), torch.float64)
    assert want.abs().max() < 65504 < n * want.abs().max()
    assert wl.grad.isfinite().all() and rel_err(wl.grad, want) <= GRAD_RTOL[torch.float16]


# --------------------------------------------------------------------------------------------
# 3. Autograd corners: loss only, retain_graph, create_graph
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", ["no_grad", "nothing_requires_grad"])
@pytest.mark.parametrize("impl", IMPLS)
def test_loss_only(impl, mode, reduction):
    n = 12  # a partial last chunk of 5; loss only, so one pass
    seed = _seed("loss_only", mode, reduction)
    x, w, b, t = make_case((n,), V, D, torch.float32, seed, ignored=(2,))
    want = run_torch(x, w, b, t, torch.ones(()), torch.float64, reduction=reduction)
    if mode == "no_grad":
        x, w, b = _leaves(x, w, b)
    with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
        loss, lse = linear_cross_entropy(
            x, w, t, linear_bias=b, reduction=reduction, chunk_size=5, return_lse=True, impl=impl
        )
    assert loss.grad_fn is None and not loss.requires_grad
    assert rel_err(loss, want[0]) <= LOSS_RTOL and rel_err(lse, want[1]) <= LOSS_RTOL
    assert all(a.grad is None for a in (x, w, b))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph(reduction):
    """mean/sum hand out gradients computed in the forward once: a second backward raises.
    "none" recomputes in its backward, so a second one works and accumulates."""
    seed = _seed("retain", reduction)
    x, w, b, t = make_case((N,), V, D, torch.float32, seed)
    x, w, b = _leaves(x, w, b)
    loss = linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, chunk_size=8, impl="reference"
    )
    loss.sum().backward(retain_graph=True)
    first = [a.grad.clone() for a in (x, w, b)]
    if reduction == "none":
        loss.sum().backward()
        for a, g in zip((x, w, b), first, strict=True):
            assert torch.allclose(a.grad, 2 * g, rtol=1e-6, atol=0)
    else:
        with pytest.raises(RuntimeError, match="backward ran twice"):
            loss.sum().backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_create_graph_raises(reduction):
    seed = _seed("create_graph", reduction)
    x, w, b, t = make_case((N,), V, D, torch.float32, seed)
    x, w, b = _leaves(x, w, b)
    loss = linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, chunk_size=8, impl="reference"
    )
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss.sum(), (x, w), create_graph=True)


# --------------------------------------------------------------------------------------------
# 4. Memory: the full (N, V) logits never exist
# --------------------------------------------------------------------------------------------

# Runs in a fresh interpreter so that this process's allocations do not blur the peak. Writing
# "5" to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from fused_xent import linear_cross_entropy

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    n, v, d, chunk, reduction = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).requires_grad_()
    w = (torch.randn(v, d, generator=gen) * 0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    # Warm-up on a few rows: thread pools, lazy imports and first-call buffers are not the loss's.
    linear_cross_entropy(x[:2], w, t[:2], reduction=reduction, impl="reference").sum().backward()
    x.grad = w.grad = None
    try:
        base = reset_peak()
    except OSError as exc:
        print(json.dumps(dict(skip=f"cannot reset the peak RSS: {exc}")))
        sys.exit()
    start = time.perf_counter()
    loss = linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=chunk, impl="reference")
    loss.sum().backward()
    seconds = time.perf_counter() - start
    fused = status("VmHWM") - base
    finite = all(bool(a.isfinite().all()) for a in (loss, x.grad, w.grad))
    del loss
    base = reset_peak()
    full = torch.ones(n, v)  # the control: the full logits, which this measurement must see
    control = status("VmHWM") - base
    print(json.dumps(dict(fused=fused, control=control, seconds=seconds, finite=finite)))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peak_memory_cpu(reduction):
    """Peak RSS growth over a forward + backward stays well under the full logits' size."""
    # float32 logits of 1024 x 32768 = 128 MiB in full; chunks of 16 rows hold 2 MiB, and the
    # reference's float32 temporaries about 6 chunks (measured: 11% of the full logits). One
    # thread, a few seconds of compute: more threads only contend with the test workers.
    n, v, d, chunk = 1024, 32768, 16, 16
    full = n * v * 4
    # glibc's dynamic mmap threshold keeps freed chunk buffers on the heap, where the peak then
    # measures the allocator's retention; a fixed threshold returns them, as the package does.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, json.dumps([n, v, d, chunk, reduction])],
        capture_output=True, text=True, timeout=120, check=True, env=env,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["finite"]
    assert result["control"] >= 0.9 * full, "the measurement must see a full-logits allocation"
    assert result["fused"] < 0.4 * full, (
        f"peak RSS grew {result['fused'] / 2**20:.0f} MiB; the full logits are {full / 2**20:.0f}"
    )


@requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peak_memory_cuda(reduction):
    """The kernel path with the default chunk: peak allocation far below the full logits."""
    # float32 logits of 4096 x 131072 = 2 GiB in full; the default chunk (384 rows: 8 D / rows
    # at most a quarter of 6 x 4 bytes) holds 192 MiB, and the float32 weight gradient 128 MiB.
    n, v, d = 4096, 131072, 256
    full = n * v * 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen).requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=gen) * 0.1).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(x, w, t, reduction=reduction)
    loss.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert loss.isfinite().all() and x.grad.isfinite().all() and w.grad.isfinite().all()
    assert peak < 0.4 * full, f"peak {peak / 2**20:.0f} MiB; the full logits are {full / 2**20:.0f}"


# --------------------------------------------------------------------------------------------
# 5. Bad input: a clear error that names the argument
# --------------------------------------------------------------------------------------------


def _bad_args(**changes):
    x, w, b, t = make_case((4,), 10, 8, torch.float32, 0)  # D = 8, C = 10, 4 rows
    args = dict(input=x, linear_weight=w, target=t, linear_bias=b)
    args.update(changes)
    return args


def _on_device(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


# (changed arguments, exception, message): each message names the argument at fault.
BAD_INPUTS = {
    "mismatched_D": (
        dict(linear_weight=_on_device(10, 7)), ValueError,
        r"linear_weight's last dimension must be D = input.shape\[-1\] = 8, got shape \(10, 7\)",
    ),
    "weight_1d": (
        dict(linear_weight=_on_device(10)), ValueError, r"linear_weight must have shape \(C, D\)"
    ),
    # A 3-D head is a K-dimensional loss (C = 2, d1 = 10): the targets must say so.
    "weight_3d": (
        dict(linear_weight=_on_device(2, 10, 8), linear_bias=None), ValueError,
        r"class-index target must have shape \(4, 10\)",
    ),
    "weight_empty": (
        dict(linear_weight=_on_device(0, 8), linear_bias=None), ValueError,
        "linear_weight must have at least one class",
    ),
    "weight_list": (
        dict(linear_weight=[[1.0] * 8] * 10), TypeError, "linear_weight must be a torch.Tensor"
    ),
    "weight_dtype": (
        dict(linear_weight=_on_device(10, 8, dtype=torch.float64)), TypeError,
        "linear_weight must have the input's dtype",
    ),
    "bias_size": (
        dict(linear_bias=_on_device(9)), ValueError,
        r"linear_bias must have shape \(C, d1, \.\.\., dK\) = \(10,\)",
    ),
    "bias_2d": (dict(linear_bias=_on_device(10, 1)), ValueError, "linear_bias must have shape"),
    "bias_dtype": (
        dict(linear_bias=_on_device(10, dtype=torch.bfloat16)), TypeError,
        "linear_bias must have the input's dtype",
    ),
    "target_rows": (
        dict(target=_on_device(5, dtype=torch.long)), ValueError,
        r"class-index target must have shape \(4,\)",
    ),
    "target_ndim": (
        dict(target=_on_device(4, 1, dtype=torch.long)), ValueError,
        r"class-index target must have shape \(4,\)",
    ),
    "float_target": (
        dict(target=_on_device(4)), ValueError,
        r"a floating \(probability\) target must have the logits' shape \(4, 10\)",
    ),
    "uint8_target": (
        dict(target=_on_device(4, dtype=torch.uint8)), TypeError, "target must hold int64 or int32"
    ),
    "int_input": (dict(input=_on_device(4, 8, dtype=torch.int32)), TypeError, "input must be"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction must be one of"),
    "impl": (dict(impl="cuda"), ValueError, "impl must be one of"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    changes, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        linear_cross_entropy(**_bad_args(**changes))


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True, "8"], ids=repr)
def test_bad_chunk_size(chunk_size):
    """True is an int to Python, but not a row count."""
    with pytest.raises((ValueError, TypeError), match="chunk_size must be a positive int"):
        linear_cross_entropy(**_bad_args(), chunk_size=chunk_size)
    with pytest.raises((ValueError, TypeError), match="chunk_size must be a positive int"):
        LinearCrossEntropyLoss(8, 10, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# 6. The chunk size: from the shapes and a fixed budget, large enough for the accumulator
# --------------------------------------------------------------------------------------------

# LM heads (V, D) of common models.
LLM_HEADS = {
    "llama3_8b": (128256, 4096),
    "qwen2_7b": (152064, 3584),
    "mistral_7b": (32768, 4096),
    "llama3_1b": (128256, 2048),
}
LLM_ROWS = (1024, 8192, 20000, 65536)  # 20000: not a multiple of any chunk the rule picks


def _never(*args, **kwargs):
    raise AssertionError("the chunk size asked the driver for the free memory")


def test_chunk_size_ignores_device_memory(monkeypatch):
    """The same rows for the same shapes, call after call, whatever the device's memory holds:
    the free memory is never asked for (it ignores torch's cached blocks, changes from call to
    call, and so would change the summation order and break CUDA graphs)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", _never)
    shapes = [(n, v, d, dtype) for n in LLM_ROWS for v, d in LLM_HEADS.values()
              for dtype in (torch.bfloat16, torch.float32)]  # fmt: skip
    first = [pick_chunk_size(*shape) for shape in shapes]
    hog = torch.empty(64 << 20, dtype=torch.uint8, device=DEVICE)  # less free memory now
    assert [pick_chunk_size(*shape) for shape in shapes] == first
    del hog
    # ... and the functional form with chunk_size=None asks nothing either (on CUDA: the kernels).
    x, w, b, t = make_case((N,), V, D, torch.float32, _seed("no_mem_get_info"))
    run_ours(x, w, b, t, torch.ones(()), chunk_size=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("head", LLM_HEADS)
def test_chunk_size_bounds_accumulator_traffic(head, dtype):
    """At LLM shapes, the float32 weight-gradient accumulator, read and written once per chunk,
    moves at most a quarter of what the chunk itself moves per logit (6 elements: the product's
    write, two kernel reads and a write, two product reads): 8 D / rows <= 6 b / 4. Chunks stay
    within the budget and a multiple of 128 rows; a batch smaller than that is one chunk."""
    v, d = LLM_HEADS[head]
    size = dtype.itemsize
    for n in LLM_ROWS:
        rows = pick_chunk_size(n, v, d, dtype)
        assert 1 <= rows <= n
        assert rows * v * size <= CHUNK_BUDGET_BYTES, "a chunk's logits beyond the budget"
        if rows == n:  # one chunk: the accumulator is only written, once
            continue
        assert rows % 128 == 0
        assert 8 * d / rows <= 6 * size / 4, f"{8 * d / rows:.2f} bytes a logit at {rows} rows"
        # ... and no larger than that needs (the chunk memory is the price).
        assert 8 * d / (rows - 128) > 6 * size / 4
        chunks = autograd._chunks(n, rows)
        assert sum(e - s for s, e in chunks) == n and chunks[-1][1] == n
    # The numbers: 8192 x 4096 x 128256 bf16 is one chunk (1.96 GiB of logits, the
    # accumulator written once: 2 bytes a logit); larger batches take chunks of 11008 rows.
    assert pick_chunk_size(8192, 128256, 4096, torch.bfloat16) == 8192
    assert pick_chunk_size(65536, 128256, 4096, torch.bfloat16) == 11008


def test_chunk_size_budget_wins():
    """Where the rule would ask for more than the budget (a 256000-class head at D = 3584), the
    chunk is the largest multiple of 128 rows within it; the reference path counts eight float32
    copies of a chunk; never fewer than 128 rows, nor more than the batch."""
    v, d, bf16 = 256000, 3584, torch.bfloat16
    rows = pick_chunk_size(65536, v, d, bf16)
    assert rows % 128 == 0 and rows * v * 2 <= CHUNK_BUDGET_BYTES < (rows + 128) * v * 2
    ref = pick_chunk_size(65536, v, d, bf16, reference=True)
    assert ref % 128 == 0 and ref * v * 32 <= CHUNK_BUDGET_BYTES < (ref + 128) * v * 32
    assert pick_chunk_size(1000, 50_000_000, 16, torch.float32) == 128  # the floor
    assert pick_chunk_size(26, 100, 16, torch.float32) == 26  # a small batch: one chunk
    assert pick_chunk_size(0, 100, 16, torch.float32) == 1  # no rows: still a valid step


def test_row_chunks_with_a_partial_last_one(monkeypatch):
    """The row-chunk plan (an explicit chunk_size) on a batch that is not a multiple of the
    chunk: 300 rows go as 128, 128 and 44, and the result is torch's."""
    seen = []
    chunks = autograd._chunks

    def spy(n_rows, chunk_size):
        seen.append(chunk_size)
        return chunks(n_rows, chunk_size)

    monkeypatch.setattr(autograd, "_chunks", spy)
    seed = _seed("partial_default")
    x, w, b, t = make_case((300,), V, D, torch.float32, seed, ignored=(299,))
    check_against_torch(x, w, b, t, grad_out_for("mean", (), seed), impl="reference",
                        chunk_size=128)  # fmt: skip
    assert seen and set(seen) == {128}
    assert autograd._chunks(300, 128)[-1] == (256, 300)


@pytest.mark.parametrize("impl", ["reference", "triton", "auto"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1},
                                     {"softcap": 5.0, "lse_square_scale": 1e-3}])  # fmt: skip
def test_default_slabs_with_a_partial_last_one(monkeypatch, impl, options):
    """chunk_size=None (the default) sweeps the vocabulary in slabs, the last one partial, in the
    forward and again in the backward, and the result is torch's (the merged statistics across
    slabs: smoothing over the whole vocabulary, softcap and z-loss)."""
    seen = []
    slabs = autograd._slabs

    def spy(vocab, slab):
        out = slabs(vocab, slab)
        seen.append(out)
        return out

    monkeypatch.setattr(autograd, "_slabs", spy)
    monkeypatch.setattr(autograd, "pick_vocab_slab", lambda *args: 16)
    seed = _seed("partial_slab")
    x, w, b, t = make_case((30,), V, D, torch.float32, seed, ignored=(29,))
    check_against_torch(x, w, b, t, grad_out_for("mean", (), seed), impl=impl, **options)
    assert seen == [[(0, 16), (16, 32), (32, 48), (48, 50)]] * 2


# --------------------------------------------------------------------------------------------
# 7. No zero-fill: the first chunk's products write the accumulators
# --------------------------------------------------------------------------------------------


class _FillWatch(TorchDispatchMode):
    """Records the zero-fills and fills (aten zero_, zeros, zeros_like, new_zeros, fill_, full,
    ...) whose result has one of ``shapes``."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in shapes}
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if any(word in name for word in ("zero", "fill", "full")):
            results = out if isinstance(out, (tuple, list)) else (out,)
            for r in results:
                if isinstance(r, torch.Tensor) and tuple(r.shape) in self.shapes:
                    self.seen.append((name, tuple(r.shape)))
        return out


@pytest.mark.parametrize("fp32_wgrad", [True, False], ids=["fp32_wgrad", "wgrad_in_dtype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_zero_fill(monkeypatch, reduction, dtype, fp32_wgrad):
    """Forward + backward fill nothing of the weight's (V, D) or the hidden states' (N, D) size:
    the first chunk's products write the accumulators, the later ones add to them (so does the
    bias's first chunk sum)."""
    monkeypatch.setattr(fused_xent._alloc, "POISON", False)  # the tests' NaN fill is no zero-fill
    n, v, d = 24, 40, 16  # chunks of 8 rows: (8, 40) logits, unlike (24, 16) and (40, 16)
    seed = _seed("zero_fill", reduction, dtype)
    x, w, b, t = make_case((n,), v, d, dtype, seed, ignored=(3,))
    xl, wl, bl = _leaves(x, w, b)
    watch = _FillWatch([(n, d), (v, d), (v,)])
    with watch:
        loss = linear_cross_entropy(
            xl, wl, t, linear_bias=bl, reduction=reduction, chunk_size=8,
            fp32_weight_grad=fp32_wgrad,
            impl="reference",
        )  # fmt: skip
        backward(loss, grad_out_for(reduction, t.shape, seed))
    assert watch.seen == [], f"filled: {watch.seen}"
    want = run_torch(x, w, b, t, grad_out_for(reduction, t.shape, seed), torch.float64,
                     reduction=reduction)  # fmt: skip
    for name, got, exp in zip(NAMES[2:], (xl.grad, wl.grad, bl.grad), want[2:], strict=True):
        assert rel_err(got, exp) <= GRAD_RTOL[dtype] * (4 if not fp32_wgrad else 1), name


def test_fill_watch_sees_zero_fills():
    """The watch above does see the fills it looks for (the test could fail)."""
    watch = _FillWatch([(40, 16)])
    with watch:
        torch.zeros(40, 16)
        torch.empty(40, 16).zero_()
        torch.empty(40, 16).fill_(0.0)
        torch.empty(3).zero_()  # another shape
    assert [name for name, _ in watch.seen] == ["aten::zeros", "aten::zero_", "aten::fill_"]


# --------------------------------------------------------------------------------------------
# 8. The out_dtype product probe
# --------------------------------------------------------------------------------------------


def _mm_operands():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
    b = torch.randn(5, 4, generator=gen).to(torch.bfloat16)
    return a, b


def _patch_addmm(monkeypatch, behaviour):
    """torch.addmm with out_dtype= doing ``behaviour`` (an exception to raise, or "emulate"),
    counting those calls; without out_dtype, torch's own. The probe runs on this device type."""
    monkeypatch.setattr(autograd, "_OUT_DTYPE_MM", {})
    real = torch.addmm
    calls = []

    def addmm(*args, **kwargs):
        if "out_dtype" not in kwargs:
            return real(*args, **kwargs)
        calls.append(kwargs["out_dtype"])
        if behaviour != "emulate":
            raise behaviour
        out_dtype = kwargs.pop("out_dtype")
        acc, a, b = args
        return real(acc, a.to(out_dtype), b.to(out_dtype), **kwargs)

    monkeypatch.setattr(torch, "addmm", addmm)
    return calls


def test_out_dtype_probe_lets_out_of_memory_through(monkeypatch):
    """An out-of-memory error says nothing about whether the op exists: it reaches the caller,
    no fallback is taken, nothing is warned, and the next call probes again."""
    calls = _patch_addmm(monkeypatch, torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    a, b = _mm_operands()
    acc = torch.full((6, 4), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(torch.OutOfMemoryError, match="simulated"):
                autograd._accumulate_mm(acc, a, b, first=True)
    assert len(calls) == 2, "after an out-of-memory error the op must be probed again"
    assert DEVICE.type not in autograd._OUT_DTYPE_MM or DEVICE.type == "cuda"
    assert "cpu" not in autograd._OUT_DTYPE_MM


@pytest.mark.parametrize(
    "error", [RuntimeError("no kernel for addmm.dtype_out"), TypeError("unexpected out_dtype")],
    ids=["RuntimeError", "TypeError"],
)  # fmt: skip
def test_out_dtype_probe_falls_back_with_one_warning(monkeypatch, error):
    """Where the op fails (no kernel, an older torch) the products use float32 copies: the same
    numbers, and exactly one warning that names the reason, over many calls."""
    calls = _patch_addmm(monkeypatch, error)
    a, b = _mm_operands()
    want = a.float() @ b.float()
    acc = torch.full((6, 4), float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autograd._accumulate_mm(acc, a, b, first=True)
        for _ in range(3):
            autograd._accumulate_mm(acc, a, b)
        seed = _seed("probe_fallback")
        x, w, bias, t = make_case((N,), V, D, torch.bfloat16, seed)
        run_ours(x, w, bias, t, torch.ones(()), chunk_size=8, impl="reference")
    ours = [w for w in caught if "out_dtype" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert str(error) in str(ours[0].message) and type(error).__name__ in str(ours[0].message)
    assert len(calls) == 1, "the probe runs once"
    assert torch.allclose(acc, 4 * want, rtol=1e-6, atol=1e-6)
    assert autograd._OUT_DTYPE_MM == {"cpu": False}


def test_out_dtype_probe_success_is_remembered(monkeypatch):
    """Where the op runs it is used from then on, without a warning, and accumulates."""
    calls = _patch_addmm(monkeypatch, "emulate")
    a, b = _mm_operands()
    acc = torch.full((6, 4), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autograd._accumulate_mm(acc, a, b, first=True)
        autograd._accumulate_mm(acc, a, b, alpha=0.5)
    assert len(calls) == 2 and autograd._OUT_DTYPE_MM == {DEVICE.type: True}
    assert torch.allclose(acc, 1.5 * (a.float() @ b.float()), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 9. Rounded once: no float16 underflow, no second rounding
# --------------------------------------------------------------------------------------------

# 256 rows: a "mean" chunk gradient p / 256 underflows float16 for p < 1.5e-5, which about a
# third of the logits of a 1000-class row at scale 3 have. GradScaler's default scale, a
# gradient-accumulation divisor, and the plain backward().
ROUND_N, ROUND_V, ROUND_D = 256, 1000, 32
INCOMING = (65536.0, 0.125, 1.0)


def _rounding_case(dtype):
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(ROUND_N, ROUND_D, generator=gen, dtype=torch.float64)
    w = torch.randn(ROUND_V, ROUND_D, generator=gen, dtype=torch.float64) * (3 / ROUND_D**0.5)
    b = torch.randn(ROUND_V, generator=gen, dtype=torch.float64)
    t = torch.randint(0, ROUND_V, (ROUND_N,), generator=gen)
    t[5] = -100
    return [a.to(dtype).to(DEVICE) for a in (h, w, b)], t.to(DEVICE)


def _grads_of(loss_fn, params, g):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    loss_fn(*leaves).backward(g.to(DEVICE))
    return [leaf.grad for leaf in leaves]


def _err_where_representable(got, exact, dtype):
    """Norm-wise relative error over the entries whose exact value rounds to a finite ``dtype``
    value (any non-finite result there is an infinite error)."""
    fits = exact.to(dtype).isfinite()
    g, e = got.double().cpu()[fits], exact[fits]
    if not g.isfinite().all():
        return float("inf")
    return float((g - e).norm() / e.norm().clamp_min(1e-30))


# On the kernels (10 s a case interpreted): what the kernel writes does not depend on a uniform
# incoming gradient (it is applied to the float32 accumulators), so each reduction once at
# GradScaler's scale, and "mean" at the accumulation divisor too.
_TRITON_ROUNDING = {("mean", 65536.0), ("mean", 0.125), ("sum", 65536.0), ("none", 65536.0)}
ROUNDING_CASES = [
    pytest.param(impl, dtype, incoming, reduction,
                 id=f"{impl}-{dtype_id(dtype)}-{incoming:g}-{reduction}")
    for impl in IMPLS
    for dtype in LOW_PRECISION
    for incoming in INCOMING
    for reduction in REDUCTIONS
    if impl == "reference" or (reduction, incoming) in _TRITON_ROUNDING
]  # fmt: skip


@pytest.mark.parametrize("impl, dtype, incoming, reduction", ROUNDING_CASES)
def test_rounded_once(impl, dtype, incoming, reduction):
    """d_hidden, d_weight and d_bias against float64 torch: no less accurate than torch's autocast
    recipe (products in the dtype, the loss in float32: the logits' gradient rounded once, then
    the products) by more than 1.25x, within the dtype's tolerance, and no more normal entries
    flushed to zero. The chunk gradients are neither divided by N nor multiplied by the incoming
    gradient (p / N underflows float16; a scaled result rounds twice): the float32 accumulators
    are, once. Entries whose exact value float16 cannot hold (x 65536) must come out infinite."""
    (h, w, b), t = _rounding_case(dtype)
    g = torch.full((ROUND_N,) if reduction == "none" else (), incoming)
    exact = _grads_of(
        lambda h, w, b: F.cross_entropy(F.linear(h, w, b), t, reduction=reduction),
        [a.double() for a in (h, w, b)], g.double(),
    )  # fmt: skip
    recipe = _grads_of(
        lambda h, w, b: F.cross_entropy(F.linear(h, w, b).float(), t, reduction=reduction),
        (h, w, b), g,
    )  # fmt: skip
    ours = _grads_of(
        lambda h, w, b: linear_cross_entropy(
            h, w, t, linear_bias=b, reduction=reduction, impl=impl
        ),
        (h, w, b), g,
    )  # fmt: skip
    for name, got, theirs, want in zip(NAMES[2:], ours, recipe, exact, strict=True):
        assert got.dtype == dtype
        err = _err_where_representable(got, want, dtype)
        err_recipe = _err_where_representable(theirs, want, dtype)
        assert err <= 1.25 * err_recipe + 1e-7, (
            f"{name}: {err:.3g} vs the recipe's {err_recipe:.3g}"
        )
        assert err <= GRAD_RTOL[dtype], f"{name}: rel err {err:.3g} > {GRAD_RTOL[dtype]}"
        beyond = ~want.to(dtype).isfinite()
        assert torch.equal(got.cpu()[beyond], want.to(dtype)[beyond]), f"{name}: overflow"
        # Flushed to zero: a normal number of the dtype come out as 0. (Below the normal range
        # the rounding step, 6e-8 in float16, is the size of the products' own error, so a
        # value there can round to 0 either way.)
        normal = want.abs() >= torch.finfo(dtype).tiny
        lost = int(((got.cpu() == 0) & normal).sum())
        lost_recipe = int(((theirs.cpu() == 0) & normal).sum())
        assert lost <= lost_recipe, f"{name}: {lost} entries flushed to 0, the recipe {lost_recipe}"


def test_row_scale():
    """ "none": the per-row incoming gradient over the smallest power of two at least its largest
    magnitude (exact), multiplied back once at the end; a uniform gradient gives exactly 1."""
    for values, s in (([65536.0] * 3, 65536.0), ([1.0], 1.0), ([0.125, -0.2], 0.25),
                      ([3.0, -5.0], 8.0), ([0.0, 0.0], 1.0), ([], 1.0)):  # fmt: skip
        dloss = torch.tensor(values, device=DEVICE)
        scaled, got = autograd.row_scale(dloss)
        assert got.item() == s and torch.equal(scaled * got, dloss), values
        assert scaled.abs().max().item() <= 1.0 if values else scaled.numel() == 0


def test_the_rounding_case_underflows_without_care():
    """The sizes above do make a float16 "mean" chunk gradient p / N underflow (the rounding test
    could fail)."""
    (h, w, b), _ = _rounding_case(torch.float16)
    p = torch.softmax(F.linear(h.double(), w.double(), b.double()), dim=1)
    assert ((p / ROUND_N).half() == 0).double().mean() > 0.1
