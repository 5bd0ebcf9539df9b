"""The split-row kernel (kernels/split.py): loss, statistics and gradient against float64 torch,
with rows cut into several small segments so every test crosses segment boundaries.

Under the interpreter the kernel runs as two launches (partials, then combine and gradient); on a
GPU the same tests run its one-launch mode, whose programs wait for their row's other segments.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_xent.kernels import split, xent
from helpers import (
    CUDA,
    DEVICE,
    DTYPES,
    REDUCTIONS,
    check_grad,
    check_loss,
    dtype_id,
    make_logits,
    make_target,
    random_grad_out,
    rel_err,
)

from fused_xent import _alloc
from fused_xent._options import LossOptions

C = 1000  # 8 segments of 128: the last one partial (104), not a multiple of the segment
SEGMENT = 128  # 2 blocks of 64 (the loops run) in 16-byte multiples of every dtype
# Targets: first segment, the last column (last, partial segment), ignored, a segment boundary,
# the middle, the first column.
TARGETS = (3, C - 1, -100, 2 * SEGMENT, 500, 0)


# On a GPU the tests below run the one-launch mode, whose programs wait for each other: never run
# on a GPU before (2026-12-08). A child process runs it first, small and at full size, under a
# timeout, so that a hang fails this module with its name instead of stalling the suite.
_CANARY = r"""
import torch
from fused_xent.kernels import split
from fused_xent._options import LossOptions
for n, c, segment in ((16, 1000, 128), (8, 128256, None)):
    x = torch.randn(n, c, device="cuda").to(torch.bfloat16)
    t = torch.randint(0, c, (n,), device="cuda")
    loss, stats = torch.empty(n, device="cuda"), torch.empty(3, n, device="cuda")
    split.xent_forward_split(x, t, LossOptions(), loss, stats, torch.empty_like(x),
                             segment=segment, wait=True)
    torch.cuda.synchronize()
print("one launch ok")
"""


@pytest.fixture(scope="module", autouse=True)
def _one_launch_does_not_hang():
    if not CUDA:
        return
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _CANARY], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the split kernel's one-launch mode hung (killed after 120 s)", pytrace=False)
    if out.returncode != 0:
        pytest.fail(f"the split kernel's one-launch mode failed: {out.stderr[-2000:]}",
                    pytrace=False)  # fmt: skip


def _target():
    return torch.tensor(TARGETS, device=DEVICE)


def _oracle(x, t, reduction, eps=0.0, zloss=0.0, grad_out=None):
    """float64 torch: (loss, gradient); the z-loss added on kept rows."""
    x64 = x.detach().to(torch.float64).requires_grad_()
    rows = F.cross_entropy(x64, t, reduction="none", label_smoothing=eps)
    kept = t != -100
    if zloss:
        rows = rows + zloss * torch.logsumexp(x64, 1) ** 2 * kept
    out = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / kept.sum()}[reduction]
    g = torch.ones_like(out) if grad_out is None else grad_out.to(torch.float64)
    out.backward(g)
    return out.detach(), x64.grad


def _split(x, t, opts, reduction="none", segment=SEGMENT, grad=True, grad_scale=None, wait=None):
    """Poisoned outputs, the prologue, the split kernel: (loss, stats, grad, total)."""
    n = x.shape[0]
    loss = _alloc.empty((n,), torch.float32, x.device)
    stats = _alloc.empty((3, n), torch.float32, x.device)
    g = _alloc.grad_like(x) if grad is True else grad
    total = den = counter = None
    if reduction != "none":
        total = _alloc.empty((), torch.float32, x.device)
        den = _alloc.empty((), torch.float32, x.device)
        counter = torch.full((), -1, dtype=torch.int32, device=x.device)
        xent.xent_prologue(t, opts, x.shape[1], reduction, den, counter)
    split.xent_forward_split(x, t, opts, loss, stats, g, reduction, total, den, counter,
                             segment=segment, wait=wait, grad_scale=grad_scale)  # fmt: skip
    return loss, stats, g, total


def _xent_stats(x, t, opts):
    n = x.shape[0]
    loss, stats = torch.empty(n, device=x.device), torch.empty(3, n, device=x.device)
    xent.xent_forward(x, t, opts, loss, stats)
    return stats


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_float64(dtype, reduction):
    x = make_logits(len(TARGETS), C, dtype, seed=1)
    t = _target()
    loss, stats, grad, total = _split(x, t, LossOptions(), reduction)
    want_loss, want_grad = _oracle(x, t, reduction)
    check_loss(loss if reduction == "none" else total, want_loss, dtype)
    if reduction != "none":
        check_loss(loss, _oracle(x, t, "none")[0], dtype)
    check_grad(grad, want_grad, dtype)
    # The statistics xent_backward reads: _xent_fwd_kernel's, up to the order of the sums.
    assert rel_err(stats, _xent_stats(x, t, LossOptions())) <= 1e-6


@pytest.mark.parametrize(
    "eps, zloss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-3)], ids=["smoothing", "z-loss", "both"]
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_options(dtype, eps, zloss):
    # Logits offset by 50: the smoothing sum is taken relative to the row's first logit.
    x = make_logits(len(TARGETS), C, dtype, seed=2) + 50.0
    t = _target()
    opts = LossOptions(label_smoothing=eps, lse_square_scale=zloss)
    loss, stats, grad, total = _split(x, t, opts, "mean")
    want_loss, want_grad = _oracle(x, t, "mean", eps, zloss)
    check_loss(total, want_loss, dtype)
    check_loss(loss, _oracle(x, t, "none", eps, zloss)[0], dtype)
    check_grad(grad, want_grad, dtype)
    assert rel_err(stats, _xent_stats(x, t, opts)) <= 1e-6


@pytest.mark.parametrize("inplace", (False, True), ids=["out", "inplace"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_misaligned_rows(dtype, inplace):
    # Rows that start 3 elements past a 16-byte boundary, with a padded stride: every segment
    # has a head and a tail; in place, the gradient overwrites the logits it is computed from.
    c = 997  # odd: no row length is a multiple of the vector
    big = make_logits(len(TARGETS), c + 11, dtype, seed=3)
    x = big[:, 3 : 3 + c]
    t = _target()
    t[1] = c - 1
    want_loss, want_grad = _oracle(x, t, "sum")
    if inplace:
        _, _, grad, total = _split(x, t, LossOptions(), "sum", grad=x)
        assert grad is x
    else:
        _, _, grad, total = _split(x, t, LossOptions(), "sum")
    check_loss(total, want_loss, dtype)
    check_grad(grad, want_grad, dtype)


@pytest.mark.parametrize(
    "n, c, segment",
    [(1, 300, 64), (3, 100, 128), (2, 513, 256)],
    ids=["one-row", "one-segment", "one-past-two-segments"],
)
def test_shapes(n, c, segment):
    x = make_logits(n, c, torch.float32, seed=4)
    t = make_target(n, c, seed=4)
    loss, _, grad, total = _split(x, t, LossOptions(), "mean", segment=segment)
    want_loss, want_grad = _oracle(x, t, "mean")
    check_loss(total, want_loss, torch.float32)
    check_grad(grad, want_grad, torch.float32)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_one_launch(reduction):
    # The one-launch protocol (tickets, arrivals, the wait) where the interpreter can run it: one
    # segment a row, so no program waits for another.
    x = make_logits(4, 120, torch.bfloat16, seed=12)
    t = make_target(4, 120, seed=12, ignored_rows=(2,))
    opts = LossOptions(label_smoothing=0.1, lse_square_scale=1e-3)
    _, _, grad, total = _split(x, t, opts, reduction, wait=True)
    want_loss, want_grad = _oracle(x, t, reduction, 0.1, 1e-3)
    check_loss(total, want_loss, torch.bfloat16)
    check_grad(grad, want_grad, torch.bfloat16)


def test_no_rows():
    x = torch.empty(0, C, device=DEVICE)
    t = torch.empty(0, dtype=torch.int64, device=DEVICE)
    for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
        _, _, _, total = _split(x, t, LossOptions(), reduction)
        torch.testing.assert_close(total.cpu(), torch.tensor(want), equal_nan=True)


def test_every_row_ignored():
    # "mean" over nothing: NaN loss, a gradient of exact zeros (fused_xent._options).
    x = make_logits(3, C, torch.bfloat16, seed=5)
    t = torch.full((3,), -100, device=DEVICE)
    loss, _, grad, total = _split(x, t, LossOptions(), "mean")
    assert total.isnan()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_invalid_target():
    # Never an address: a NaN loss and a NaN gradient row, as _xent_fwd_kernel.
    x = make_logits(3, C, torch.float32, seed=6)
    t = torch.tensor([5, C + 7, -3], device=DEVICE)
    loss, _, grad, _ = _split(x, t, LossOptions())
    assert not loss[0].isnan() and loss[1:].isnan().all()
    assert not grad[0].isnan().any() and grad[1:].isnan().all()


def test_deterministic():
    x = make_logits(len(TARGETS), C, torch.bfloat16, seed=7)
    t = _target()
    opts = LossOptions(label_smoothing=0.1, lse_square_scale=1e-4)
    first = _split(x, t, opts, "mean")
    second = _split(x, t, opts, "mean")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=dtype_id)
def test_backward_from_stats(dtype, reduction):
    # xent_backward recomputes the gradient for an incoming gradient other than 1 from the
    # split kernel's statistics.
    opts = LossOptions(label_smoothing=0.1)
    x = make_logits(len(TARGETS), C, dtype, seed=8)
    t = _target()
    _, stats, _, _ = _split(x, t, opts, reduction, grad=None)
    g = random_grad_out(reduction, len(TARGETS), seed=8, device=DEVICE)
    grad = _alloc.grad_like(x)
    den = None
    if reduction == "mean":
        den = torch.empty((), device=DEVICE)
        xent.xent_prologue(t, opts, C, "mean", den, torch.empty((), dtype=torch.int32))
    xent.xent_backward(x, t, opts, stats, g, grad, reduction, den)
    check_grad(grad, _oracle(x, t, reduction, 0.1, grad_out=g)[1], dtype)


def test_grad_scale():
    x = make_logits(len(TARGETS), C, torch.float32, seed=9)
    t = _target()
    scale = torch.tensor(0.375, device=DEVICE)
    _, _, grad, _ = _split(x, t, LossOptions(), "sum", grad_scale=scale)
    check_grad(grad, _oracle(x, t, "sum")[1] * 0.375, torch.float32)


def test_split_plan():
    plan = split.split_plan
    cpu = torch.device("cpu")
    ok = LossOptions(label_smoothing=0.1, lse_square_scale=1e-4)
    if not CUDA:  # under the interpreter every long row gets a plan (run as two launches)
        assert plan(64, 128256, torch.bfloat16, cpu, LossOptions()) == (8, 16384)
        assert plan(64, 256000, torch.bfloat16, cpu, ok) == (16, 16384)
        assert plan(64, 128256, torch.float32, cpu, LossOptions()) == (16, 8192)
    # Short rows, no rows, no gradient, unsupported options: None.
    assert plan(64, 32000, torch.bfloat16, DEVICE, LossOptions()) is None
    assert plan(0, 128256, torch.bfloat16, DEVICE, LossOptions()) is None
    assert plan(64, 128256, torch.bfloat16, DEVICE, LossOptions(), write_grad=False) is None
    assert plan(64, 128256, torch.bfloat16, DEVICE, LossOptions(), prob_target=True) is None
    weight = torch.ones(128256, device=DEVICE)
    sharded = LossOptions(class_offset=5, n_classes=200000)
    unsupported = (LossOptions(weight=weight), LossOptions(softcap=30.0),
                   LossOptions(logit_scale=0.5), sharded)  # fmt: skip
    for opts in unsupported:
        assert plan(64, 128256, torch.bfloat16, DEVICE, opts) is None


def test_refused():
    x = make_logits(2, C, torch.float32, seed=10)
    t = make_target(2, C, seed=10)
    with pytest.raises(ValueError, match="segment"):
        _split(x, t, LossOptions(), segment=30)  # 120 bytes: not a multiple of 16
    with pytest.raises(ValueError, match="does not support"):
        _split(x, t, LossOptions(softcap=30.0))
    if not CUDA:
        with pytest.raises(ValueError, match="hang"):
            _split(x, t, LossOptions(), wait=True)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=dtype_id)
def test_full_size_waiting(dtype):
    # The vocabulary the kernel is for, one launch whose programs wait, against float64.
    n, c = 64, 128256
    x = make_logits(n, c, dtype, seed=11)
    t = make_target(n, c, seed=11, ignored_rows=(3,))
    k, segment = split.split_plan(n, c, dtype, x.device, LossOptions())
    _, stats, grad, total = _split(x, t, LossOptions(), "mean", segment=segment, wait=True)
    want_loss, want_grad = _oracle(x, t, "mean")
    check_loss(total, want_loss, dtype)
    check_grad(grad, want_grad, dtype)
    assert rel_err(stats, _xent_stats(x, t, LossOptions())) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_routed_behind_the_launch_table(monkeypatch, reduction):
    """FUSED_XENT_SPLIT_ROWS (xent.SPLIT_ROWS) sends a long row's forward with gradient through
    the split kernel, the plain route included; off (the default) nothing reaches it. Long is
    shrunk here to C = 1000 so the interpreter runs it."""
    import fused_xent
    from fused_xent import functional

    calls = []
    real = split.xent_forward_split
    monkeypatch.setattr(
        split, "xent_forward_split", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    monkeypatch.setattr(split, "_SPLIT_MIN_ROW_BYTES", 256)
    monkeypatch.setattr(split, "_SEGMENT_BYTES", SEGMENT * 4)
    monkeypatch.setattr(functional, "_PLANS", {})
    x = make_logits(len(TARGETS), C, torch.float32, seed=31)
    t = _target()
    results = []
    for on in (False, True):
        monkeypatch.setattr(xent, "SPLIT_ROWS", on)
        leaf = x.clone().requires_grad_()
        loss = fused_xent.cross_entropy(leaf, t, reduction=reduction, impl="triton")
        loss.backward()
        assert bool(calls) == on
        results.append((loss.detach(), leaf.grad))
    want_loss, want_grad = _oracle(x, t, reduction)
    for loss, grad in results:
        check_loss(loss, want_loss, torch.float32)
        check_grad(grad, want_grad, torch.float32)
