"""distillation_loss / linear_distillation_loss (issue #14) against float64 torch formulas.

The oracle is written out from torch's own ops in float64 (``_loss64``): ``log_softmax`` of both
sets of logits at the temperature, ``sum p (log p - log q)`` for each KL with a class of
probability 0 adding 0, ``M = beta P_t + (1 - beta) P_s`` for the JSD, ``F.cross_entropy`` for the
hard term, and the gradient from autograd. Both paths run every test ("reference" and "triton";
without CUDA the kernels run under Triton's interpreter), and every output the package allocates
starts as NaN (conftest's poisoning), so an unwritten element fails.

Sizes: a few rows of 37 classes in blocks of 16 (the ``small_blocks`` fixture: two whole blocks,
a partial one, a 16-byte head and tail for 2-byte dtypes) exercise the long-row schedule; 9 and
300 classes with the launch table's own blocks a row held whole, and 4100 one past its block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    COMPILE_IMPLS,
    DEVICE,
    GRAD_RTOL,
    IMPLS,
    LOSS_RTOL,
    REDUCTIONS,
    dtype_id,
    rel_err,
)
from helpers import seeded as _gen
from helpers import shaped_ids as _ids
from helpers import shaped_logits as _logits

import fused_xent

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)
V = 37  # two whole blocks of 16, a partial one


def _kl(p, log_p, log_q):
    """sum p (log p - log q); a class with p = 0 adds 0 and passes no NaN to the gradient."""
    keep = p > 0
    diff = torch.where(keep, log_p, 0.0) - torch.where(keep, log_q, 0.0)
    return torch.where(keep, p * diff, 0.0).sum(-1)


def _loss64(s64, t, target=None, *, beta=0.0, temperature=1.0, soft_weight=1.0, hard_weight=0.0,
            ignore_index=-100, reduction="mean"):  # fmt: skip
    """The loss in float64 from float64 student logits ``s64`` (differentiable) and teacher
    logits ``t``, straight from the issue's definitions."""
    log_ps = torch.log_softmax(s64 / temperature, dim=-1)
    log_pt = torch.log_softmax(t.detach().to(torch.float64) / temperature, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0.0:
        div = _kl(pt, log_pt, log_ps)
    elif beta == 1.0:
        div = _kl(ps, log_ps, log_pt)
    else:
        m = beta * pt + (1.0 - beta) * ps
        log_m = torch.log(torch.where(m > 0, m, 1.0))
        div = beta * _kl(pt, log_pt, log_m) + (1.0 - beta) * _kl(ps, log_ps, log_m)
    loss = soft_weight * div
    n_kept = loss.numel()
    if target is not None:
        kept = target != ignore_index
        if hard_weight:
            ce = F.cross_entropy(
                s64.reshape(-1, s64.shape[-1]), target.reshape(-1).long(), reduction="none",
                ignore_index=ignore_index,
            ).reshape(target.shape)  # fmt: skip
            loss = loss + hard_weight * ce
        loss = torch.where(kept, loss, 0.0)
        n_kept = kept.sum()
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / n_kept


def _grad_out(reduction, shape, seed):
    g = torch.rand(shape if reduction == "none" else (), generator=_gen(seed + 2)) * 3 - 1.5
    return g.to(torch.float32).to(DEVICE)


def _check(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _run_and_check(s, t, target=None, impl="triton", grad_out=None, **opts):
    """distillation_loss and its gradient against float64; returns the gradient."""
    x = s.clone().requires_grad_()
    loss = fused_xent.distillation_loss(x, t, target, impl=impl, **opts)
    s64 = s.detach().to(torch.float64).requires_grad_()
    want = _loss64(s64, t, target, **opts)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    _check(loss, want, LOSS_RTOL, "loss")
    g64 = None if grad_out is None else grad_out.to(torch.float64)
    (want * (1.0 if g64 is None else g64)).sum().backward()
    (loss * (1.0 if grad_out is None else grad_out)).sum().backward()
    assert x.grad.dtype == s.dtype
    _check(x.grad, s64.grad, GRAD_RTOL[s.dtype], "gradient")
    return x.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_every_beta_and_temperature(small_blocks, impl, beta, temperature):
    """Each divergence at each temperature, with a hard term (its own softmax at T != 1) and an
    ignored position; rows of 37 classes cross blocks of 16."""
    s = _logits((5, V), torch.float32, seed=1)
    t = _logits((5, V), torch.float32, seed=2)
    y = _ids((5,), V, seed=3, ignored=(2,))
    _run_and_check(s, t, y, impl, beta=beta, temperature=temperature, hard_weight=0.3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_reductions_shapes_and_incoming_gradient(small_blocks, impl, reduction, beta):
    """(B, T, V) logits with ignored positions, every reduction, an incoming gradient other than 1
    (after a forward that wrote the gradient for 1, the backward recomputes it)."""
    s = _logits((2, 3, V), torch.float32, seed=4)
    t = _logits((2, 3, V), torch.float32, seed=5)
    y = _ids((2, 3), V, seed=6, ignored=(0, 4))
    g = _grad_out(reduction, (2, 3), seed=7)
    _run_and_check(s, t, y, impl, g, beta=beta, temperature=2.0, soft_weight=0.7,
                   hard_weight=0.2, reduction=reduction)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_target(small_blocks, impl, reduction):
    """No target: every position counts ("mean" over all of them), (N, V) logits."""
    s = _logits((4, V), torch.float32, seed=8)
    t = _logits((4, V), torch.float32, seed=9)
    _run_and_check(s, t, None, impl, beta=0.5, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_low_precision(small_blocks, impl, dtype, beta):
    """16-bit logits: the loss in float32 to 1e-5, the gradient rounded once to the dtype."""
    s = _logits((4, V), dtype, seed=10)
    t = _logits((4, V), dtype, seed=11)
    y = _ids((4,), V, seed=12, ignored=(1,))
    _run_and_check(s, t, y, impl, beta=beta, temperature=0.5, hard_weight=0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_and_strided_rows(small_blocks, impl):
    """A bfloat16 student against a float32 teacher (the kernels cut the rows element by element
    where the two differ), a teacher sliced from a wider tensor, a transposed (B, T, V) view."""
    s = _logits((4, V), torch.bfloat16, seed=13)
    t = _logits((4, V), torch.float32, seed=14)
    _run_and_check(s, t, None, impl, beta=0.9)
    wide = _logits((4, V + 5), torch.bfloat16, seed=15)
    _run_and_check(s, wide[:, 1 : V + 1], None, impl, beta=0.0, temperature=2.0)
    s3 = _logits((3, 2, V), torch.float32, seed=16).transpose(0, 1)
    t3 = _logits((2, 3, V), torch.float32, seed=17)
    _run_and_check(s3, t3, _ids((2, 3), V, seed=18, ignored=(1,)), impl, beta=1.0, hard_weight=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_rows_held_whole_and_one_past_the_block(impl, beta):
    """The launch table's own blocks: rows held in registers (9 classes; 300 bfloat16 ones with a
    16-byte head and tail) and a row one past the 16-bit block (4100 > 4096)."""
    for vocab, dtype in ((9, torch.float32), (300, torch.bfloat16), (4100, torch.bfloat16)):
        s = _logits((2, vocab), dtype, seed=vocab)
        t = _logits((2, vocab), dtype, seed=vocab + 1)
        y = _ids((2,), vocab, seed=vocab)
        _run_and_check(s, t, y, impl, beta=beta, temperature=2.0, hard_weight=0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_extreme_logits(small_blocks, impl, beta):
    """A nearly one-hot teacher (one logit 60 above the rest: the others' probability 1e-26 at
    T = 1, 1e-52 at T = 0.5), -inf in masked vocabulary entries of the teacher (beta = 1: of both,
    else KL(P_s || P_t) is infinite), and logits near 1e4 (nothing cancels)."""
    s = _logits((4, V), torch.float32, seed=19)
    t = torch.zeros(4, V, device=DEVICE)
    t[torch.arange(4), torch.tensor([0, 5, 17, 36])] = 60.0
    for temperature in (1.0, 0.5):
        _run_and_check(s, t, None, impl, beta=beta, temperature=temperature)
    t = _logits((4, V), torch.float32, seed=20)
    t[:, 20:] = float("-inf")
    t[0, :5] = float("-inf")
    if beta == 1.0:
        s = s.clone()
        s[t == float("-inf")] = float("-inf")
    grad = _run_and_check(s, t, None, impl, beta=beta)
    if beta == 1.0:
        assert torch.equal(grad[t == float("-inf")], torch.zeros_like(grad[t == float("-inf")]))
    s = _logits((3, V), torch.float32, seed=21) + 1.0e4
    t = _logits((3, V), torch.float32, seed=22) + 1.0e4
    _run_and_check(s, t, _ids((3,), V, seed=23), impl, beta=beta, temperature=2.0, hard_weight=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_and_ignored_positions(small_blocks, impl):
    """hard_weight alone is torch's cross-entropy; ignored positions give 0 and an exact-zero
    gradient; a target with hard_weight = 0 only masks; "mean" over no kept position is NaN with
    zero gradients (as torch)."""
    s = _logits((5, V), torch.float32, seed=24)
    t = _logits((5, V), torch.float32, seed=25)
    y = _ids((5,), V, seed=26, ignored=(0, 3))
    x = s.clone().requires_grad_()
    loss = fused_xent.distillation_loss(x, t, y, soft_weight=0.0, hard_weight=1.0, impl=impl,
                                        temperature=3.0)  # fmt: skip
    loss.backward()
    x64 = s.double().requires_grad_()
    want = F.cross_entropy(x64, y)
    want.backward()
    _check(loss, want, LOSS_RTOL, "hard loss")
    _check(x.grad, x64.grad, GRAD_RTOL[torch.float32], "hard gradient")
    for hard in (0.0, 0.5):
        x = s.clone().requires_grad_()
        loss = fused_xent.distillation_loss(x, t, y, beta=0.5, hard_weight=hard,
                                            reduction="none", impl=impl)  # fmt: skip
        loss.sum().backward()
        assert torch.equal(loss[[0, 3]], torch.zeros(2, device=DEVICE))
        assert torch.equal(x.grad[[0, 3]], torch.zeros(2, V, device=DEVICE))
        assert (loss[[1, 2, 4]] > 0).all()
    x = s.clone().requires_grad_()
    everything = torch.full((5,), -100, device=DEVICE)
    loss = fused_xent.distillation_loss(x, t, everything, hard_weight=1.0, impl=impl)
    loss.backward()
    assert loss.isnan() and torch.equal(x.grad, torch.zeros_like(x.grad))


def test_out_of_range_target_with_hard_term():
    """The kernels give NaN at that position (no out-of-bounds access); the reference raises.
    Without the hard term the target only masks, and any value is fine."""
    s = _logits((3, 20), torch.float32, seed=27).requires_grad_()
    t = _logits((3, 20), torch.float32, seed=28)
    y = torch.tensor([1, 20, 4], device=DEVICE)
    loss = fused_xent.distillation_loss(s, t, y, hard_weight=1.0, reduction="none", impl="triton")
    assert loss[1].isnan() and loss[[0, 2]].isfinite().all()
    loss[[0, 2]].sum().backward()
    assert s.grad[1].isnan().all() and s.grad[[0, 2]].isfinite().all()
    with pytest.raises(IndexError, match="outside"):
        fused_xent.distillation_loss(s, t, y, hard_weight=1.0, impl="reference")
    for impl in IMPLS:
        assert fused_xent.distillation_loss(s, t, y, impl=impl).isfinite()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_and_no_grad(small_blocks, impl, reduction):
    """The gradient in the student's own storage (the same numbers), a second backward refused;
    under no_grad the loss alone (the JSD's two passes)."""
    s = _logits((4, V), torch.float32, seed=29)
    t = _logits((4, V), torch.float32, seed=30)
    y = _ids((4,), V, seed=31, ignored=(2,))
    opts = dict(beta=0.5, temperature=2.0, hard_weight=0.5, reduction=reduction)
    want = _run_and_check(s, t, y, impl, **opts)
    leaf = s.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a model's output
    loss = fused_xent.distillation_loss(logits, t, y, inplace_backward=True, impl=impl, **opts)
    loss.sum().backward(retain_graph=True)
    assert rel_err(leaf.grad, want) <= 1e-6
    assert rel_err(logits.detach(), want) <= 1e-6  # the gradient lives in the logits' storage
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.sum().backward()
    with torch.no_grad():
        quiet = fused_xent.distillation_loss(s.requires_grad_(), t, y, impl=impl, **opts)
    _check(quiet, _loss64(s.double(), t, y, **opts), LOSS_RTOL, "no_grad loss")


def test_launches_forward_and_backward(monkeypatch):
    """One kernel each way; the reductions are torch sums of the per-row losses."""
    from test_launches import LaunchCount

    monkeypatch.setattr(fused_xent._alloc, "POISON", False)  # poisoning launches fills
    s = _logits((4, 40), torch.float32, seed=32).requires_grad_()
    t = _logits((4, 40), torch.float32, seed=33)
    y = _ids((4,), 40, seed=34)
    for reduction in ("none", "mean"):
        count = LaunchCount()
        with count:
            loss = fused_xent.distillation_loss(s, t, y, beta=0.5, reduction=reduction,
                                                impl="triton")  # fmt: skip
            loss.backward(torch.ones_like(loss))
        # "mean" wrote the gradient in the forward; its backward sees the incoming gradient 1 on
        # the device and keeps it.
        assert count.triton == ["_distill_fwd_kernel", "_distill_bwd_kernel"], str(count)


# --------------------------------------------------------------------------------------------
# The linear form
# --------------------------------------------------------------------------------------------


def _linear_case(n, d_s, d_t, vocab, dtype, seed, bias=True):
    h = _logits((n, d_s), dtype, seed, scale=1.0)
    w = _logits((vocab, d_s), dtype, seed + 1, scale=d_s**-0.5 * 2)
    b = _logits((vocab,), dtype, seed + 2, scale=0.5) if bias else None
    ht = _logits((n, d_t), dtype, seed + 3, scale=1.0)
    wt = _logits((vocab, d_t), dtype, seed + 4, scale=d_t**-0.5 * 3)
    bt = _logits((vocab,), dtype, seed + 5, scale=0.5) if bias else None
    return h, w, b, ht, wt, bt


@pytest.mark.parametrize("plan", ["rows", "slabs"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_linear_matches_float64(small_blocks, monkeypatch, impl, reduction, beta, plan):
    """7 rows in chunks of 3 (the last one short), or the default vocabulary slabs forced to 16
    classes (37: two whole, one short), student hidden size 8, teacher 12, biases on both: the
    loss and the student's three gradients against float64 products."""
    chunk_size = 3
    if plan == "slabs":
        chunk_size = None
        monkeypatch.setattr(fused_xent.autograd, "pick_vocab_slab", lambda *a: 32)
    h, w, b, ht, wt, bt = _linear_case(7, 8, 12, V, torch.float32, seed=40)
    y = _ids((7,), V, seed=41, ignored=(3,))
    opts = dict(beta=beta, temperature=2.0, hard_weight=0.3, reduction=reduction)
    g = _grad_out(reduction, (7,), seed=42)
    leaves = [p.clone().requires_grad_() for p in (h, w, b)]
    loss = fused_xent.linear_distillation_loss(
        leaves[0], leaves[1], ht, wt, y, student_bias=leaves[2], teacher_bias=bt,
        chunk_size=chunk_size, impl=impl, **opts,
    )  # fmt: skip
    (loss * g).sum().backward()
    leaves64 = [p.double().requires_grad_() for p in (h, w, b)]
    s64 = leaves64[0] @ leaves64[1].T + leaves64[2]
    t64 = ht.double() @ wt.double().T + bt.double()
    want = _loss64(s64, t64, y, **opts)
    (want * g.double()).sum().backward()
    _check(loss, want, LOSS_RTOL, "loss")
    for name, got, ref in zip(("d_hidden", "d_weight", "d_bias"), leaves, leaves64, strict=True):
        assert got.grad.dtype == torch.float32
        _check(got.grad, ref.grad, GRAD_RTOL[torch.float32], name)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_low_precision_and_no_grad(small_blocks, impl):
    """bfloat16 heads without biases, (B, T, D) inputs, no target, the default chunking; under
    no_grad the same loss."""
    h, w, _, ht, wt, _ = _linear_case(6, 8, 4, V, torch.bfloat16, seed=43, bias=False)
    h, ht = h.reshape(2, 3, 8), ht.reshape(2, 3, 4)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_xent.linear_distillation_loss(hl, wl, ht, wt, beta=0.1, impl=impl)
    loss.backward()
    # The oracle at the logits torch's bfloat16 products make (the loss's input), then the
    # gradients' products in float64.
    s64 = (h @ w.T).double().requires_grad_()
    want = _loss64(s64, ht @ wt.T, beta=0.1)
    want.backward()
    _check(loss, want, LOSS_RTOL, "loss")
    d_hidden = (s64.grad @ w.double()).reshape(h.shape)
    d_weight = s64.grad.reshape(-1, V).T @ h.double().reshape(-1, 8)
    _check(hl.grad, d_hidden, GRAD_RTOL[torch.bfloat16], "d_hidden")
    _check(wl.grad, d_weight, GRAD_RTOL[torch.bfloat16], "d_weight")
    with torch.no_grad():
        quiet = fused_xent.linear_distillation_loss(h, w, ht, wt, beta=0.1, impl=impl)
    assert rel_err(quiet, loss.detach()) <= 1e-6


def test_modules():
    s = _logits((3, V), torch.float32, seed=44)
    t = _logits((3, V), torch.float32, seed=45)
    y = _ids((3,), V, seed=46)
    module = fused_xent.DistillationLoss(beta=0.5, temperature=2.0, hard_weight=0.1)
    assert "beta=0.5" in repr(module) and "hard_weight=0.1" in repr(module)
    want = fused_xent.distillation_loss(s, t, y, beta=0.5, temperature=2.0, hard_weight=0.1)
    assert torch.equal(module(s, t, y), want)
    h, w, b, ht, wt, bt = _linear_case(5, 8, 6, V, torch.float32, seed=47)
    module = fused_xent.LinearDistillationLoss(beta=1.0, reduction="sum", chunk_size=2)
    got = module(h, w, ht, wt, student_bias=b, teacher_bias=bt)
    want = fused_xent.linear_distillation_loss(h, w, ht, wt, student_bias=b, teacher_bias=bt,
                                               beta=1.0, reduction="sum", chunk_size=2)  # fmt: skip
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", COMPILE_IMPLS)
def test_compile_fullgraph(impl):
    """Both forms traced by torch.compile(fullgraph=True) with the eager numbers, through all four
    custom ops: the gradient written in the forward (into a new buffer: "mean"; over the chunk's
    logits: the linear "mean"), in the backward (a new buffer: "none"; in place)."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 30).to(DEVICE)
    h = _logits((2, 5, 8), torch.float32, seed=48, scale=1.0)
    ht = _logits((10, 6), torch.float32, seed=49, scale=1.0)
    wt = _logits((30, 6), torch.float32, seed=50)
    teacher = _logits((2, 5, 30), torch.float32, seed=51)
    y = _ids((2, 5), 30, seed=52, ignored=(3,))

    def step(h):
        logits = lin(h)
        soft = fused_xent.distillation_loss(logits, teacher, y, beta=0.5, temperature=2.0,
                                            hard_weight=0.5, impl=impl)  # fmt: skip
        rows = fused_xent.distillation_loss(logits, teacher, beta=0.0, reduction="none",
                                            impl=impl)  # fmt: skip
        inplace = fused_xent.distillation_loss(lin(h), teacher, y, beta=1.0,
                                               inplace_backward=True, impl=impl)  # fmt: skip
        linear = fused_xent.linear_distillation_loss(
            h.reshape(10, 8), lin.weight, ht, wt, y.reshape(10), student_bias=lin.bias,
            beta=0.9, chunk_size=4, impl=impl,
        )  # fmt: skip
        slabs = fused_xent.linear_distillation_loss(  # the default plan: vocabulary slabs
            h.reshape(10, 8), lin.weight, ht, wt, y.reshape(10), student_bias=lin.bias,
            beta=0.3, temperature=2.0, hard_weight=0.5, impl=impl,
        )  # fmt: skip
        return soft + rows.sum() + inplace + linear + slabs

    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        lin.zero_grad()
        loss = fn(h)
        loss.backward()
        results.append((loss.detach(), lin.weight.grad.clone(), lin.bias.grad.clone()))
    for got, want in zip(results[0], results[1], strict=True):
        assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_target_outside_the_vocabulary(small_blocks, impl):
    """The default plan decides an out-of-range target of the hard term as every route does
    (README, "Edge cases"): IndexError where a host read is free, NaN in that row (loss and
    gradient) on the kernels' route, the other rows untouched."""
    h, w, b, ht, wt, bt = _linear_case(4, 8, 6, V, torch.float32, seed=59)
    y = torch.tensor([1, V, -100, 2], device=DEVICE)
    hl = h.clone().requires_grad_()

    def call():
        return fused_xent.linear_distillation_loss(hl, w, ht, wt, y, hard_weight=0.5,
                                                   reduction="none", impl=impl)  # fmt: skip

    if impl != "triton":
        with pytest.raises(IndexError, match=f"outside \\[0, {V}\\)"):
            call()
        return
    loss = call()
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(hl.grad[1]).all()
    assert loss[2] == 0 and (hl.grad[2] == 0).all()
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(hl.grad[[0, 3]]).all()


def test_linear_under_autocast():
    """As F.linear under autocast: the products in bfloat16, the loss in float32, the
    gradients in the parameters' dtype."""
    h, w, b, ht, wt, bt = _linear_case(5, 8, 6, V, torch.float32, seed=58)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fused_xent.linear_distillation_loss(hl, wl, ht, wt, beta=0.5, impl="reference")
    loss.backward()
    assert loss.dtype == torch.float32 and hl.grad.dtype == wl.grad.dtype == torch.float32
    want = fused_xent.linear_distillation_loss(
        h.bfloat16(), w.bfloat16(), ht.bfloat16(), wt.bfloat16(), beta=0.5, impl="reference"
    )
    assert rel_err(loss, want) <= 1e-6


def test_errors():
    s = _logits((2, 5), torch.float32, seed=53)
    t = _logits((2, 5), torch.float32, seed=54)
    y = _ids((2,), 5, seed=55)
    loss = fused_xent.distillation_loss
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            loss(s, t, beta=beta)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            loss(s, t, temperature=temperature)
    with pytest.raises(ValueError, match="hard_weight.*needs a target"):
        loss(s, t, hard_weight=0.5)
    with pytest.raises(ValueError, match="soft_weight"):
        loss(s, t, soft_weight=-1.0)
    with pytest.raises(ValueError, match="vocabulary"):
        loss(s, _logits((2, 6), torch.float32, seed=56))
    with pytest.raises(ValueError, match="leading shape"):
        loss(s, _logits((3, 5), torch.float32, seed=56))
    with pytest.raises(ValueError, match="target must have shape"):
        loss(s, t, y[:1])
    with pytest.raises(TypeError, match="target must hold"):
        loss(s, t, y.float())
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        loss(s.requires_grad_(), t.clone().requires_grad_())
    with torch.no_grad():  # nothing would flow: accepted
        loss(s, t.clone().requires_grad_())
    with pytest.raises(TypeError, match="teacher_logits must be"):
        loss(s, t.long())
    with pytest.raises(ValueError, match="reduction"):
        loss(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match="impl"):
        loss(s, t, impl="cuda")
    h, w, _, ht, wt, _ = _linear_case(2, 8, 4, 5, torch.float32, seed=57, bias=False)
    lin = fused_xent.linear_distillation_loss
    with pytest.raises(ValueError, match="teacher_weight must have the student's vocabulary"):
        lin(h, w, ht, wt[:4])
    with pytest.raises(ValueError, match="teacher_input must have the student's leading shape"):
        lin(h, w, ht[:1], wt)
    with pytest.raises(ValueError, match="teacher_weight must have shape"):
        lin(h, w, ht, w)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        lin(h, w, ht, wt.clone().requires_grad_())
    with pytest.raises(ValueError, match="teacher_input requires grad"):
        lin(h, w, ht.clone().requires_grad_(), wt)
    with pytest.raises(ValueError, match="hard_weight"):
        lin(h, w, ht, wt, hard_weight=1.0)
    with pytest.raises(ValueError, match="beta"):
        lin(h, w, ht, wt, beta=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        lin(h, w, ht, wt, chunk_size=0)


# --------------------------------------------------------------------------------------------
# Small CPU calls: torch's log-softmax on float32 copies (distillation._torch_cpu)
# --------------------------------------------------------------------------------------------

CPU = torch.device("cpu")
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _spy_paths(monkeypatch):
    """Which path each CPU call takes: 'torch' (distillation._torch_cpu) or 'function' (the
    autograd Function / no-grad path over the backends, fused_xent/reference.py here)."""
    from fused_xent import distillation

    seen = []
    small, function, no_grad = (distillation._torch_cpu, distillation.DistillationFunction.apply,
                                distillation.distill_no_grad)  # fmt: skip

    def spy(name, fn):
        def call(*args, **kwargs):
            seen.append(name)
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(distillation, "_torch_cpu", spy("torch", small))
    monkeypatch.setattr(distillation.DistillationFunction, "apply", spy("function", function))
    monkeypatch.setattr(distillation, "distill_no_grad", spy("function", no_grad))
    return seen


def _cpu_check(monkeypatch, s, t, target=None, grad_out=None, path="torch", **opts):
    """impl="auto" on CPU tensors against float64 and against the reference path; returns
    (loss, gradient)."""
    seen = _spy_paths(monkeypatch)
    x = s.clone().requires_grad_()
    loss = fused_xent.distillation_loss(x, t, target, **opts)
    g = torch.ones(()) if grad_out is None else grad_out
    (grad,) = torch.autograd.grad(loss, x, g.expand(loss.shape).to(loss.dtype))
    assert seen == [path]
    s64 = s.double().requires_grad_()
    want = _loss64(s64, t, target, **opts)
    (want_grad,) = torch.autograd.grad(want, s64, g.expand(want.shape).double())
    if target is not None:  # exact zeros (the oracle's autograd makes 0 * inf = NaN where the
        want_grad[target == -100] = 0.0  # divergence of an ignored position is infinite)
    float64 = s.dtype == torch.float64
    assert loss.dtype == (torch.float64 if float64 else torch.float32)
    assert loss.shape == want.shape and grad.dtype == s.dtype
    _check(loss, want, 1e-12 if float64 else LOSS_RTOL, "loss")
    _check(grad, want_grad, GRAD_RTOL[s.dtype], "gradient")
    # The reference's numbers: the same float32 math, one rounding of the gradient apart.
    x = s.clone().requires_grad_()
    ref = fused_xent.distillation_loss(x, t, target, impl="reference", **opts)
    (ref_grad,) = torch.autograd.grad(ref, x, g.expand(ref.shape).to(ref.dtype))
    _check(loss, ref, 1e-13 if float64 else 1e-6, "loss against the reference")
    _check(grad, ref_grad, {torch.float64: 1e-13, torch.float32: 5e-6}.get(s.dtype, 1e-2),
           "gradient against the reference")  # fmt: skip
    return loss, grad


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_cpu_fast_path_every_beta_and_temperature(monkeypatch, beta, temperature):
    """impl="auto" on small CPU calls runs torch's ops under autograd, with the reference's
    numbers: each divergence at each temperature, soft and hard weights, an ignored position."""
    s = _logits((5, V), torch.float32, seed=60).to(CPU)
    t = _logits((5, V), torch.float32, seed=61).to(CPU)
    y = _ids((5,), V, seed=62, ignored=(2,)).to(CPU)
    _cpu_check(monkeypatch, s, t, y, beta=beta, temperature=temperature, soft_weight=0.7,
               hard_weight=0.3)  # fmt: skip


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_cpu_fast_path_dtypes_reductions_and_shapes(monkeypatch, dtype, reduction):
    """(B, T, V) logits of every dtype (a float32 teacher beside 16-bit students), every
    reduction with an incoming gradient other than 1, with and without a target."""
    s = _logits((2, 3, V), dtype, seed=63).to(CPU)
    t = _logits((2, 3, V), torch.float32 if dtype != torch.float64 else dtype, seed=64).to(CPU)
    y = _ids((2, 3), V, seed=65, ignored=(0, 4)).to(CPU)
    g = _grad_out(reduction, (2, 3), seed=66).cpu()
    for beta in (0.0, 0.5, 1.0):
        _cpu_check(monkeypatch, s, t, y, g, beta=beta, temperature=2.0, hard_weight=0.2,
                   reduction=reduction)  # fmt: skip
        monkeypatch.undo()
    _cpu_check(monkeypatch, s, t, None, g, beta=0.9, reduction=reduction)


@pytest.mark.parametrize("beta", BETAS)
def test_cpu_fast_path_masked_vocabulary_and_extreme_logits(monkeypatch, beta):
    """-inf teacher entries add exactly 0 with no NaN anywhere; -inf in both (the guarded
    formulas); an ignored position whose divergence is infinite still gives 0 and a zero
    gradient; a nearly one-hot teacher; logits near 1e4."""
    s = _logits((4, V), torch.float32, seed=67).cpu()
    t = _logits((4, V), torch.float32, seed=68).cpu()
    t[:, 20:] = float("-inf")
    t[0, :5] = float("-inf")
    both = s.clone()
    both[t == float("-inf")] = float("-inf")
    for student in (both,) if beta == 1.0 else (s, both):
        loss, grad = _cpu_check(monkeypatch, student, t, beta=beta, temperature=0.5)
        monkeypatch.undo()
        assert loss.isfinite() and grad.isfinite().all()
        if student is both:  # no mass on either side: exactly no gradient
            masked = t == float("-inf")
            assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
    # Row 1 ignored: the student finite where the teacher is -inf, so KL(P_s || P_t) is infinite
    # there (and the forward KL where the student is -inf and the teacher not).
    inf_row = both.clone()
    inf_row[1] = s[1] if beta > 0.0 else torch.where(t[1] == float("-inf"), 0.0, float("-inf"))
    inf_row[1, 0] = 0.0
    y = _ids((4,), V, seed=69, ignored=(1,)).cpu()
    for reduction in REDUCTIONS:
        loss, grad = _cpu_check(monkeypatch, inf_row, t, y, beta=beta, reduction=reduction)
        monkeypatch.undo()
        assert loss.isfinite().all() and torch.equal(grad[1], torch.zeros(V))
    one_hot = torch.zeros(4, V)
    one_hot[torch.arange(4), torch.tensor([0, 5, 17, 36])] = 60.0
    # (test_extreme_logits' student: against other students the gradient can be ~1e-6 of its
    # terms, where no float32 formula, the reference's included, keeps 1e-5)
    _cpu_check(monkeypatch, _logits((4, V), torch.float32, seed=19).cpu(), one_hot, beta=beta,
               temperature=0.5)  # fmt: skip
    monkeypatch.undo()
    _cpu_check(monkeypatch, s + 1.0e4, t.nan_to_num(neginf=0.0) + 1.0e4, y, beta=beta,
               hard_weight=1.0, temperature=2.0)  # fmt: skip


def test_cpu_fast_path_contract(monkeypatch):
    """Double backward refused (as on the kernel path); no gradient to the teacher (one that
    requires grad refused, accepted under no_grad); an out-of-range target raises IndexError with
    the hard term, as the reference, and only masks without it; "mean" over no kept position is
    NaN with zero gradients; under no_grad the same loss."""
    seen = _spy_paths(monkeypatch)
    s = _logits((3, 20), torch.bfloat16, seed=70).cpu().requires_grad_()
    t = _logits((3, 20), torch.float32, seed=71).cpu()
    y = torch.tensor([1, 20, 4])
    loss = fused_xent.distillation_loss(s, t, y, beta=0.5)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        fused_xent.distillation_loss(s, t.clone().requires_grad_())
    with torch.no_grad():
        quiet = fused_xent.distillation_loss(s, t.clone().requires_grad_(), y, beta=0.5)
    assert torch.equal(quiet, loss.detach())
    with pytest.raises(IndexError, match="outside"):
        fused_xent.distillation_loss(s, t, y, hard_weight=1.0)
    nothing = torch.full((3,), -100)
    loss = fused_xent.distillation_loss(s, t, nothing, hard_weight=1.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.isnan() and torch.equal(grad, torch.zeros_like(grad))
    # The teacher requiring grad is refused before; the NaN "mean" over nothing is tried on the
    # small route, then decided by the general one (the small route keeps only finite results).
    assert seen == ["torch"] * 4 + ["function"]


@pytest.mark.parametrize("case", ["inplace_backward", "large", "impl=reference"])
def test_cpu_inplace_large_and_reference_calls_take_the_function(monkeypatch, case):
    """inplace_backward, more than _TORCH_CPU_MAX_ELEMENTS logits (here 11: 2^18 in use) or
    impl="reference": the autograd Function over the reference, as before the fast path."""

    if case == "large":
        monkeypatch.setattr(fused_xent.functional, "_TORCH_CPU_MAX_ELEMENTS", 11)
    s = _logits((3, 4), torch.float32, seed=72, scale=1.0).cpu()
    t = _logits((3, 4), torch.float32, seed=73, scale=1.0).cpu()
    seen = _spy_paths(monkeypatch)
    x = s.clone().requires_grad_()
    kwargs = {"inplace_backward": True} if case == "inplace_backward" else {}
    if case == "impl=reference":
        kwargs["impl"] = "reference"
    loss = fused_xent.distillation_loss(x * 1.0, t, beta=0.5, **kwargs)
    loss.backward()
    assert seen == ["function"]
    s64 = s.double().requires_grad_()
    want = _loss64(s64, t, beta=0.5)
    want.backward()
    _check(loss, want, LOSS_RTOL, "loss")
    _check(x.grad, s64.grad, GRAD_RTOL[torch.float32], "gradient")
