"""token_logprobs / linear_token_logprobs, and the per-token statistics and weights of the
cross-entropy (``return_stats``, ``token_weight``), against float64 torch.

The oracle is written out from torch's own ops in float64: ``log_softmax`` + ``gather`` for the
log-probs, ``-(p * log p).sum()`` for the entropy, ``F.cross_entropy(reduction="none") * weight``
for the weighted loss, ``argmax`` for the prediction. Every output the package allocates starts as
NaN (-1 for the argmax; conftest's poisoning), so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    COMPILE_IMPLS,
    DEVICE,
    DTYPES,
    GRAD_RTOL,
    IMPLS,
    LOSS_RTOL,
    REDUCTIONS,
    dtype_id,
    rel_err,
    weighted_oracle,
)
from helpers import seeded as _gen
from helpers import shaped_ids as _ids
from helpers import shaped_logits as _logits

import fused_xent

TEMPERATURES = (0.7, 1.0, 2.0)
# name -> (logit_scale, softcap)
TRANSFORMS = {"plain": (1.0, None), "scale": (0.5, None), "softcap": (1.5, 4.0)}


def _z64(x, temperature=1.0, logit_scale=1.0, softcap=None):
    z = x.detach().to(torch.float64) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def oracle_logprobs(x64, target, ignore_index=-100, **transform):
    """(logp, entropy) in float64 from a float64 leaf ``x64`` (differentiable)."""
    z = x64 * transform.get("logit_scale", 1.0)
    if transform.get("softcap") is not None:
        z = transform["softcap"] * torch.tanh(z / transform["softcap"])
    z = z / transform.get("temperature", 1.0)
    logsm = torch.log_softmax(z, dim=-1)
    kept = target != ignore_index
    logp = logsm.gather(-1, torch.where(kept, target, 0).long().unsqueeze(-1)).squeeze(-1)
    entropy = _entropy64(logsm)
    return torch.where(kept, logp, 0.0), torch.where(kept, entropy, 0.0)


def _entropy64(logsm):
    """-sum(p log p), a class of probability 0 (a -inf logit) adding 0 (and no NaN gradient)."""
    finite = torch.where(torch.isinf(logsm), 0.0, logsm)
    return -(logsm.exp() * finite).sum(-1)


def _check(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _run_and_check(x, t, impl, wants=("logp", "entropy"), seed=0, **kw):
    """token_logprobs against float64 for the incoming gradients ``wants`` (either or both)."""
    xg = x.clone().requires_grad_()
    logp, entropy = fused_xent.token_logprobs(xg, t, return_entropy=True, impl=impl, **kw)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == t.shape
    x64 = x.detach().to(torch.float64).requires_grad_()
    want_logp, want_entropy = oracle_logprobs(x64, t, **kw)
    _check(logp, want_logp, LOSS_RTOL, "logp")
    _check(entropy, want_entropy, LOSS_RTOL, "entropy")
    gens = [torch.randn(t.shape, generator=_gen(seed + i), dtype=torch.float64) for i in (7, 8)]
    g_logp, g_ent = (g.to(DEVICE) for g in gens)
    ours, theirs = 0.0, 0.0
    if "logp" in wants:
        ours, theirs = ours + (logp * g_logp.float()).sum(), theirs + (want_logp * g_logp).sum()
    if "entropy" in wants:
        ours = ours + (entropy * g_ent.float()).sum()
        theirs = theirs + (want_entropy * g_ent).sum()
    (grad,) = torch.autograd.grad(ours, xg)
    (want_grad,) = torch.autograd.grad(theirs, x64)
    assert grad.dtype == x.dtype
    _check(grad, want_grad, GRAD_RTOL[x.dtype], "gradient")
    return grad


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "vocab",
    [1, 7, 67, 300],  # one class (logp 0, entropy 0); odd head/tail edges; several blocks
)
def test_matches_float64_over_vocab_sizes(small_blocks, impl, dtype, vocab):
    x = _logits((2, 3, vocab), dtype, seed=vocab)
    t = _ids((2, 3), vocab, seed=vocab, ignored=(4,))
    _run_and_check(x, t, impl, seed=vocab)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_temperature_softcap_and_scale(small_blocks, impl, temperature, transform):
    scale, cap = TRANSFORMS[transform]
    x = _logits((5, 45), torch.float32, seed=11, scale=6.0)
    t = _ids((5,), 45, seed=11, ignored=(2,))
    _run_and_check(x, t, impl, temperature=temperature, logit_scale=scale, softcap=cap)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wants", [("logp",), ("entropy",), ("logp", "entropy")], ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_incoming_gradient_on_either_output(small_blocks, impl, wants, dtype):
    """Either output may be unused: its gradient is None in the backward, and the other's alone
    must come out (a whole row: 40 classes in blocks of 16; a single-block row: 9)."""
    for vocab in (40, 9):
        x = _logits((4, vocab), dtype, seed=vocab + 3)
        t = _ids((4,), vocab, seed=vocab, ignored=(1,))
        _run_and_check(x, t, impl, wants=wants, temperature=0.7)


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_rows_in_registers(impl):
    """The launch table's own blocks (no forced small block): a row held whole and the two-pass
    schedule with its integer-grid reference (4100 classes: one past the options' block)."""
    for vocab in (300, 4100):
        x = _logits((2, vocab), torch.bfloat16, seed=vocab, scale=4.0)
        t = _ids((2,), vocab, seed=vocab)
        _run_and_check(x, t, impl, temperature=0.7)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(small_blocks, impl):
    """A slice of a wider tensor (rows padded), a (B, T, V) view with a transposed batch, and a
    non-contiguous target."""
    wide = _logits((6, 50), torch.float32, seed=5)
    t_wide = _ids((6, 2), 37, seed=5)
    _run_and_check(wide[:, :37], t_wide[:, 0], impl)
    btv = _logits((3, 2, 37), torch.float32, seed=6).transpose(0, 1)
    _run_and_check(btv, _ids((2, 3), 37, seed=6, ignored=(0,)), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logit_offsets(small_blocks, impl):
    """Logits near 1e4: the entropy is taken relative to the row max, not from lse - sum(p z)
    of two large numbers."""
    x = _logits((3, 40), torch.float32, seed=9) + 1.0e4
    t = _ids((3,), 40, seed=9)
    _run_and_check(x, t, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_minus_inf(small_blocks, impl):
    """-inf logits (a masked vocabulary) take no probability and add nothing to the entropy."""
    x = _logits((3, 40), torch.float32, seed=10)
    x[:, 20:] = float("-inf")
    t = torch.tensor([3, 7, 19], device=DEVICE)
    _run_and_check(x, t, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_positions_are_zero_with_zero_gradient(impl):
    x = _logits((4, 30), torch.float32, seed=12).requires_grad_()
    t = _ids((4,), 30, seed=12, ignored=(0, 2))
    logp, entropy = fused_xent.token_logprobs(x, t, return_entropy=True, impl=impl)
    assert torch.equal(logp[[0, 2]], torch.zeros(2, device=DEVICE))
    assert torch.equal(entropy[[0, 2]], torch.zeros(2, device=DEVICE))
    assert not torch.signbit(logp[[0, 2]]).any()  # +0, not -0
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(x.grad[[0, 2]], torch.zeros(2, 30, device=DEVICE))
    assert x.grad[[1, 3]].abs().sum() > 0


def test_out_of_range_target():
    """The kernels give NaN at that position (no out-of-bounds access); the reference raises."""
    x = _logits((3, 20), torch.float32, seed=13).requires_grad_()
    t = torch.tensor([1, 20, 4], device=DEVICE)
    logp, entropy = fused_xent.token_logprobs(x, t, return_entropy=True, impl="triton")
    assert logp[1].isnan() and entropy[1].isnan()
    assert logp[[0, 2]].isfinite().all() and entropy[[0, 2]].isfinite().all()
    (logp[[0, 2]].sum() + entropy[[0, 2]].sum()).backward()
    assert x.grad[1].isnan().all() and x.grad[[0, 2]].isfinite().all()
    with pytest.raises(IndexError, match="outside"):
        fused_xent.token_logprobs(x, t, impl="reference")


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_and_int32_targets(small_blocks, impl):
    x = _logits((2, 3, 41), torch.bfloat16, seed=14)
    t = _ids((2, 3), 41, seed=14, ignored=(3,))
    with torch.no_grad():
        logp, entropy = fused_xent.token_logprobs(
            x, t.int(), temperature=2.0, return_entropy=True, impl=impl
        )
        only = fused_xent.token_logprobs(x, t, temperature=2.0, impl=impl)
    want_logp, want_entropy = oracle_logprobs(x.double(), t, temperature=2.0)
    _check(logp, want_logp, LOSS_RTOL, "logp")
    _check(entropy, want_entropy, LOSS_RTOL, "entropy")
    assert torch.equal(only, logp)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward(small_blocks, impl):
    x = _logits((4, 37), torch.float32, seed=15)
    t = _ids((4,), 37, seed=15, ignored=(2,))
    want = _run_and_check(x, t, impl, seed=3)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a model's output
    logp, entropy = fused_xent.token_logprobs(
        logits, t, return_entropy=True, inplace_backward=True, impl=impl
    )
    g = [torch.randn(4, generator=_gen(3 + i), dtype=torch.float64).to(DEVICE) for i in (7, 8)]
    ((logp * g[0].float()).sum() + (entropy * g[1].float()).sum()).backward(retain_graph=True)
    assert rel_err(leaf.grad, want) <= 1e-6
    assert rel_err(logits.detach(), want) <= 1e-6  # the gradient lives in the logits' storage
    with pytest.raises(RuntimeError, match="backward ran twice"):
        ((logp * g[0].float()).sum()).backward()


def test_launches_forward_backward_and_no_grad(monkeypatch):
    """One kernel forward, one backward, nothing else (the incoming gradients aside)."""
    from test_launches import LaunchCount

    monkeypatch.setattr(fused_xent._alloc, "POISON", False)  # poisoning launches fills

    x = _logits((4, 40), torch.float32, seed=16).requires_grad_()
    t = _ids((4,), 40, seed=16)
    g = torch.ones(4, device=DEVICE)
    count = LaunchCount()
    with count:
        logp, entropy = fused_xent.token_logprobs(x, t, return_entropy=True, impl="triton")
        torch.autograd.backward((logp, entropy), (g, g))
    assert count.triton == ["_xent_fwd_kernel", "_xent_bwd_kernel"], str(count)
    assert count.total == 2, str(count)
    count = LaunchCount()
    with count, torch.no_grad():
        fused_xent.token_logprobs(x, t, return_entropy=True, impl="triton")
    assert count.total == 1, str(count)


@pytest.mark.parametrize("impl", COMPILE_IMPLS)
def test_compile_fullgraph(impl):
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 30).to(DEVICE)
    h = _logits((2, 5, 8), torch.float32, seed=17)
    t = _ids((2, 5), 30, seed=17, ignored=(3,))

    def step(h, t):
        logp, entropy = fused_xent.token_logprobs(
            lin(h), t, temperature=0.7, return_entropy=True, impl=impl
        )
        return logp, entropy, (logp.sum() - 0.01 * entropy.sum())

    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        lin.zero_grad()
        logp, entropy, loss = fn(h, t)
        loss.backward()
        results.append((logp.detach(), entropy.detach(), lin.weight.grad.clone()))
    for got, want in zip(results[0], results[1], strict=True):
        assert rel_err(got, want) <= 1e-6


def test_errors():
    x = _logits((2, 5), torch.float32, seed=18)
    t = _ids((2,), 5, seed=18)
    with pytest.raises(ValueError, match="temperature"):
        fused_xent.token_logprobs(x, t, temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        fused_xent.token_logprobs(x, t, temperature="hot")
    with pytest.raises(ValueError, match="target must have shape"):
        fused_xent.token_logprobs(x, t[:1])
    with pytest.raises(TypeError, match="token ids"):
        fused_xent.token_logprobs(x, t.float())
    with pytest.raises(TypeError, match="logits must be"):
        fused_xent.token_logprobs(x.long(), t)
    with pytest.raises(ValueError, match="softcap"):
        fused_xent.token_logprobs(x, t, softcap=-1.0)
    w = _logits((5, 3), torch.float32, seed=19)
    h = _logits((2, 3), torch.float32, seed=20)
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        fused_xent.linear_token_logprobs(h, w.t(), t)
    with pytest.raises(TypeError, match="linear_weight must have the input's dtype"):
        fused_xent.linear_token_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_xent.linear_token_logprobs(h, w, t, chunk_size=0)


# --------------------------------------------------------------------------------------------
# linear_token_logprobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])  # 7 does not divide 19 rows
def test_linear_matches_float64(small_blocks, impl, bias, chunk_size):
    n, d, v = 19, 8, 45
    h = _logits((n, d), torch.float32, seed=21, scale=1.0)
    w = _logits((v, d), torch.float32, seed=22, scale=1.0)
    b = _logits((v,), torch.float32, seed=23) if bias else None
    t = _ids((n,), v, seed=21, ignored=(4, 11))
    params = [p.clone().requires_grad_() for p in (h, w, b) if p is not None]
    logp, entropy = fused_xent.linear_token_logprobs(
        params[0], params[1], t, linear_bias=params[2] if bias else None, temperature=0.7,
        softcap=5.0, return_entropy=True, chunk_size=chunk_size, impl=impl,
    )  # fmt: skip
    p64 = [p.detach().double().requires_grad_() for p in params]
    z64 = p64[0] @ p64[1].t() + (p64[2] if bias else 0.0)
    want_logp, want_entropy = oracle_logprobs(z64, t, temperature=0.7, softcap=5.0)
    _check(logp, want_logp, LOSS_RTOL, "logp")
    _check(entropy, want_entropy, LOSS_RTOL, "entropy")
    g = [torch.randn(n, generator=_gen(i), dtype=torch.float64).to(DEVICE) for i in (1, 2)]
    grads = torch.autograd.grad((logp * g[0].float() + entropy * g[1].float()).sum(), params)
    wants = torch.autograd.grad((want_logp * g[0] + want_entropy * g[1]).sum(), p64)
    for name, got, want in zip("hwb", grads, wants, strict=False):
        _check(got, want, 1e-5, f"d{name}")


def test_linear_bf16_and_entropy_alone():
    d, v = 16, 33
    h = _logits((2, 5, d), torch.bfloat16, seed=24, scale=0.5).requires_grad_()
    w = _logits((v, d), torch.bfloat16, seed=25, scale=0.5).requires_grad_()
    t = _ids((2, 5), v, seed=24, ignored=(0,))
    logp, entropy = fused_xent.linear_token_logprobs(h, w, t, return_entropy=True, chunk_size=3)
    # The outputs from the bf16 logits the product makes (rounded once, as in F.linear)...
    want_logp, want_entropy = oracle_logprobs((h @ w.t()).detach().double(), t)
    _check(logp, want_logp, LOSS_RTOL, "logp")
    _check(entropy, want_entropy, LOSS_RTOL, "entropy")
    # ... the gradients against float64 products, to bf16's tolerance.
    h64, w64 = (p.detach().double().requires_grad_() for p in (h, w))
    want_entropy = oracle_logprobs(h64 @ w64.t(), t)[1]
    grads = torch.autograd.grad(entropy.sum(), (h, w))
    wants = torch.autograd.grad(want_entropy.sum(), (h64, w64))
    for got, want in zip(grads, wants, strict=True):
        assert got.dtype == torch.bfloat16
        _check(got, want, GRAD_RTOL[torch.bfloat16], "gradient")
    with torch.no_grad():
        again = fused_xent.linear_token_logprobs(h, w, t, chunk_size=4)
    assert rel_err(again, logp.detach()) <= 1e-6


# --------------------------------------------------------------------------------------------
# cross_entropy / linear_cross_entropy: return_stats and token_weight
# --------------------------------------------------------------------------------------------


def _check_stats(stats, x, **transform):
    z = _z64(x, **transform)
    logsm = torch.log_softmax(z, -1)
    _check(stats.lse, torch.logsumexp(z, -1), LOSS_RTOL, "lse")
    _check(stats.entropy, _entropy64(logsm), LOSS_RTOL, "entropy")
    assert stats.predicted.dtype == torch.int64
    assert torch.equal(stats.predicted, z.argmax(-1))
    for s in stats:
        assert not s.requires_grad


CE_OPTIONS = {
    "plain": {},
    "smooth+weight": {"label_smoothing": 0.2, "weight": True},
    "softcap": {"softcap": 3.0, "logit_scale": 1.5},
}


@pytest.mark.parametrize("impl", ("auto", *IMPLS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", list(CE_OPTIONS))
def test_cross_entropy_stats_and_token_weight(small_blocks, impl, reduction, options):
    kw = dict(CE_OPTIONS[options])
    n, v = 6, 37
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(v, generator=_gen(30), dtype=torch.float64) + 0.5).float()
        kw["weight"] = kw["weight"].to(DEVICE)
    x = _logits((n, v), torch.float32, seed=31)
    x[2, 5] = x[2, 30] = x[2].max() + 1.0  # a tie: the lowest class wins
    t = _ids((n,), v, seed=31, ignored=(1,))
    tw = torch.randn(n, generator=_gen(32), dtype=torch.float64).float().to(DEVICE)  # some < 0
    xg = x.clone().requires_grad_()
    loss, lse, stats = fused_xent.cross_entropy(
        xg, t, reduction=reduction, token_weight=tw, return_lse=True, return_stats=True,
        impl=impl, **kw,
    )  # fmt: skip
    transform = {k: kw[k] for k in ("softcap", "logit_scale") if k in kw}
    _check_stats(stats, x, **transform)
    assert stats.predicted[2] == 5
    assert torch.equal(lse, stats.lse)
    ce_kw = {k: v for k, v in kw.items() if k not in transform}
    x_leaf = x.detach().double().requires_grad_()
    z = _transformed(x_leaf, kw)
    want = weighted_oracle(z, t, reduction=reduction, token_weight=tw, **ce_kw)
    _check(loss, want, LOSS_RTOL, "loss")
    g = torch.randn(loss.shape, generator=_gen(33), dtype=torch.float64).to(DEVICE)
    (grad,) = torch.autograd.grad(loss, xg, g.float())
    (want_grad,) = torch.autograd.grad(want, x_leaf, g)
    _check(grad, want_grad, GRAD_RTOL[torch.float32], "gradient")
    with torch.no_grad():
        again, stats2 = fused_xent.cross_entropy(
            x, t, reduction=reduction, token_weight=tw, return_stats=True, impl=impl, **kw
        )
    assert rel_err(again, loss.detach()) <= 1e-6
    assert torch.equal(stats2.predicted, stats.predicted)


def _transformed(x64, kw):
    z = x64 * kw.get("logit_scale", 1.0)
    if kw.get("softcap") is not None:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    return z


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_of_two_pass_rows_and_ties_across_blocks(small_blocks, impl):
    """Rows of several blocks: the max tied in two blocks (the first block's column wins), and in
    the head/tail edge lanes of an unaligned row."""
    x = _logits((3, 70), torch.bfloat16, seed=34)
    x[0, 3] = x[0, 60] = 20.0
    x[1, 69] = 20.0
    x[2, 0] = x[2, 1] = 20.0
    view = torch.cat([torch.zeros(3, 1, dtype=x.dtype, device=DEVICE), x], 1)[:, 1:]  # unaligned
    _, stats = fused_xent.cross_entropy(view, _ids((3,), 70, seed=34), return_stats=True, impl=impl)
    assert stats.predicted.tolist() == [3, 69, 0]
    _check_stats(stats, x)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_weight_probability_targets_and_errors(impl):
    x = _logits((4, 9), torch.float32, seed=35)
    p = torch.softmax(_logits((4, 9), torch.float64, seed=36), -1).float()
    tw = torch.tensor([1.0, -0.5, 0.0, 2.0], device=DEVICE)
    xg = x.clone().requires_grad_()
    loss = fused_xent.cross_entropy(xg, p, token_weight=tw, impl=impl)
    x64 = x.double().requires_grad_()
    want = (F.cross_entropy(x64, p.double(), reduction="none") * tw.double()).mean()
    _check(loss, want, LOSS_RTOL, "loss")
    loss.backward()
    want.backward()
    _check(xg.grad, x64.grad, GRAD_RTOL[torch.float32], "gradient")
    t = _ids((4,), 9, seed=35)
    with pytest.raises(ValueError, match="token_weight must have"):
        fused_xent.cross_entropy(x, t, token_weight=tw[:3], impl=impl)
    with pytest.raises(TypeError, match="token_weight must be a floating"):
        fused_xent.cross_entropy(x, t, token_weight=t, impl=impl)
    with pytest.raises(ValueError, match="requires grad"):
        fused_xent.cross_entropy(x, t, token_weight=tw.clone().requires_grad_(), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_stats_and_token_weight(small_blocks, impl, reduction):
    n, d, v = 13, 8, 29
    h = _logits((n, d), torch.float32, seed=37, scale=1.0)
    w = _logits((v, d), torch.float32, seed=38, scale=1.0)
    b = _logits((v,), torch.float32, seed=39)
    t = _ids((n,), v, seed=37, ignored=(2,))
    tw = torch.randn(n, generator=_gen(40), dtype=torch.float64).float().to(DEVICE)
    params = [p.clone().requires_grad_() for p in (h, w, b)]
    loss, stats = fused_xent.linear_cross_entropy(
        params[0], params[1], t, linear_bias=params[2], reduction=reduction, token_weight=tw,
        return_stats=True, chunk_size=5, label_smoothing=0.1, impl=impl,
    )  # fmt: skip
    p64 = [p.detach().double().requires_grad_() for p in params]
    z64 = p64[0] @ p64[1].t() + p64[2]
    _check_stats(stats, z64.detach())
    want = weighted_oracle(z64, t, reduction=reduction, token_weight=tw, label_smoothing=0.1)
    _check(loss, want, LOSS_RTOL, "loss")
    g = torch.randn(loss.shape, generator=_gen(41), dtype=torch.float64)
    grads = torch.autograd.grad(loss, params, g.float().to(DEVICE))
    wants = torch.autograd.grad(want, p64, g.to(DEVICE))
    for got, want_g in zip(grads, wants, strict=True):
        _check(got, want_g, 1e-5, "gradient")
    with pytest.raises(ValueError, match="K-dimensional"):
        fused_xent.linear_cross_entropy(
            h, w.reshape(v, 1, d), t.reshape(n, 1), return_stats=True, impl=impl
        )


def test_cpu_fallback_in_chunks(monkeypatch):
    """impl="auto" on the CPU: the reference on chunks of rows (40 logits a chunk: 1 row of 37
    classes), for the log-probs, the stats and the token weights."""
    from fused_xent import cpu

    if DEVICE.type != "cpu":
        pytest.skip("the CPU fallback")
    monkeypatch.setattr(cpu, "REFERENCE_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(fused_xent.functional, "_TORCH_CPU_MAX_ELEMENTS", -1)  # not the small path
    x = _logits((5, 37), torch.bfloat16, seed=42)
    t = _ids((5,), 37, seed=42, ignored=(3,))
    _run_and_check(x, t, "auto", temperature=0.7, softcap=6.0)
    tw = torch.linspace(-1.0, 1.0, 5)
    xg = x.clone().requires_grad_()
    loss, stats = fused_xent.cross_entropy(
        xg, t, reduction="none", token_weight=tw, return_stats=True
    )
    want = weighted_oracle(x.double().requires_grad_(), t, reduction="none", token_weight=tw)
    _check(loss, want, LOSS_RTOL, "loss")
    _check_stats(stats, x)


@pytest.mark.parametrize("impl", COMPILE_IMPLS)
def test_compile_fullgraph_linear_and_stats(impl):
    """The linear form and the statistics traced without graph breaks, with the eager numbers."""
    torch._dynamo.reset()
    h = _logits((6, 8), torch.float32, seed=43, scale=1.0)
    w0 = _logits((30, 8), torch.float32, seed=44, scale=1.0)
    t = _ids((6,), 30, seed=43, ignored=(2,))
    tw = torch.linspace(0.5, 1.5, 6, device=DEVICE)

    def step(h, w, t):
        logp, entropy = fused_xent.linear_token_logprobs(
            h, w, t, return_entropy=True, chunk_size=4, impl=impl
        )
        loss, stats = fused_xent.cross_entropy(
            h @ w.t(), t, token_weight=tw, return_stats=True, impl=impl
        )
        return logp.sum() + entropy.sum() + loss, stats.entropy, stats.predicted

    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        w = w0.clone().requires_grad_()
        total, entropy, predicted = fn(h, w, t)
        total.backward()
        results.append((total.detach(), entropy, predicted, w.grad))
    for got, want in zip(results[0], results[1], strict=True):
        assert torch.equal(got, want) if got.dtype == torch.int64 else rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_cpu_calls(dtype):
    """impl="auto" on small CPU calls: torch's log-softmax on a float32 copy, the same contract
    (float64 numbers, 0 and no gradient where ignored, -inf classes, double backward refused,
    out-of-range ids raise)."""
    if DEVICE.type != "cpu":
        pytest.skip("the CPU fallback")
    x = _logits((2, 3, 29), dtype, seed=45)
    x[0, 0, 5:] = float("-inf")
    t = _ids((2, 3), 29, seed=45, ignored=(2,))
    t[0, 0] = 3
    for kw in ({}, {"temperature": 0.7, "softcap": 4.0, "logit_scale": 1.5}):
        for wants in (("logp",), ("entropy",), ("logp", "entropy")):
            _run_and_check(x, t, "auto", wants=wants, **kw)
    xg = x.clone().requires_grad_()
    logp = fused_xent.token_logprobs(xg, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(logp.sum(), xg, create_graph=True)
    with pytest.raises(IndexError, match="outside"):
        fused_xent.token_logprobs(x, torch.full_like(t, 29))
