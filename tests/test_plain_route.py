"""The plain route (``functional._plain_plan``: ``kernels/xent.py``'s ``PlainXent``) against the
general one and against float64 torch.

The plain route takes the calls a training loop makes most (class indices, no option but
``ignore_index``, a reduced loss, contiguous aligned logits) with fewer host steps; it launches
the same kernels with the same constexprs (its small outputs packed in one buffer), so its
numbers must be the general route's bit for bit. The general route is forced by
``_general_route`` (the plain route then refuses every call).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_RTOL, LOSS_RTOL, dtype_id, make_logits, make_target

import fused_xent
from fused_xent import functional

IMPL = "triton"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(x, t, grad_out=None, **kw):
    """(loss, gradient) of fused_xent.cross_entropy on a leaf copy of ``x``."""
    leaf = x.detach().clone().requires_grad_()
    loss = fused_xent.cross_entropy(leaf, t, impl=IMPL, **kw)
    loss.backward(grad_out)
    return loss.detach(), leaf.grad


@contextlib.contextmanager
def _general_route():
    """Every call inside takes the general route."""
    with pytest.MonkeyPatch.context() as m:
        for module in (functional, fused_xent.logprobs):
            m.setattr(module, "_plain_plan", lambda *args: None)
        yield


def _plans_made(monkeypatch):
    """The plans of the calls that took the plain route, as they come (fresh plans: the small
    blocks of a test are in its plans)."""
    made = []
    real = functional._plain_loss

    def spy(logits, target, plan):
        made.append(plan)
        return real(logits, target, plan)

    monkeypatch.setattr(functional, "_plain_loss", spy)
    monkeypatch.setattr(functional, "_PLANS", {})
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "n, c",
    [
        (1, 1),  # one row of one class: the loss is exactly 0
        (5, 7),  # a class count that is no multiple of a 16-byte vector
        (17, 64),  # 17 rows: one past a multiple of 16 (the row count's specialisation)
        (3, 100),  # several blocks a row under small_blocks
    ],
)
def test_plain_route_matches_general_and_float64(monkeypatch, small_blocks, dtype, reduction, n,
                                                  c):  # fmt: skip
    made = _plans_made(monkeypatch)
    x = make_logits(n, c, dtype, seed=n * c)
    t = make_target(n, c, seed=n + c, ignored_rows=[0] if n > 2 else [])
    g = torch.tensor(0.75, device=DEVICE)  # an incoming gradient that is not 1
    for grad_out in (None, g):
        loss, grad = _run(x, t, grad_out, reduction=reduction)
        assert made and all(made), "the plain route was not taken"
        with _general_route():
            general_loss, general_grad = _run(x, t, grad_out, reduction=reduction)
        assert torch.equal(loss, general_loss)
        assert torch.equal(grad, general_grad)
        x64 = x.double().requires_grad_()
        want = F.cross_entropy(x64, t, reduction=reduction)
        want.backward(None if grad_out is None else grad_out.double())
        assert _rel(loss, want) <= LOSS_RTOL
        assert _rel(grad, x64.grad) <= GRAD_RTOL[dtype]
    with torch.no_grad():
        assert torch.equal(fused_xent.cross_entropy(x, t, reduction=reduction, impl=IMPL), loss)


def test_plain_route_edge_rows(monkeypatch):
    """Every row ignored ("mean": NaN, gradient 0), and a target out of range (NaN row), as
    decided for every route (_options.py)."""
    made = _plans_made(monkeypatch)
    x = make_logits(4, 8, torch.float32, seed=3)
    t = torch.full((4,), -100, device=DEVICE)
    loss, grad = _run(x, t)
    assert made and torch.isnan(loss) and torch.equal(grad, torch.zeros_like(grad))
    bad = torch.tensor([1, 8, 2, 3], device=DEVICE)
    loss, grad = _run(x, bad, reduction="sum")
    assert torch.isnan(loss) and torch.isnan(grad[1]).all() and not torch.isnan(grad[0]).any()


def test_plain_route_autograd_behaviour(monkeypatch):
    """The loss is a tensor of its own (in-place ops on it are allowed), its gradient handed out
    once (a second backward is refused), not differentiable twice."""
    made = _plans_made(monkeypatch)
    x = make_logits(6, 10, torch.float32, seed=5).requires_grad_()
    t = make_target(6, 10, seed=6)
    loss = fused_xent.cross_entropy(x, t, impl=IMPL)
    assert made and loss._base is None
    want = F.cross_entropy(x.detach().double(), t)
    (loss * 1).mul_(2).backward()
    x64 = x.detach().double().requires_grad_()
    (F.cross_entropy(x64, t) * 2).backward()
    assert _rel(x.grad, x64.grad) <= GRAD_RTOL[torch.float32] and _rel(loss, want) <= LOSS_RTOL
    loss = fused_xent.cross_entropy(x, t, impl=IMPL)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    loss = fused_xent.cross_entropy(x, t, impl=IMPL)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_plain_route_leaves_the_rest_to_the_general_one(monkeypatch):
    """Misaligned or strided logits, "none", options as other types, and errors go the general
    way (its checks and messages)."""
    made = _plans_made(monkeypatch)
    base = make_logits(4, 9, torch.float32, seed=7)
    t = make_target(4, 8, seed=8)
    fused_xent.cross_entropy(base[:, 1:], t, impl=IMPL)  # strided rows
    fused_xent.cross_entropy(base.flatten()[1:33].view(4, 8), t, impl=IMPL)  # 4 bytes off
    fused_xent.cross_entropy(base[:, :8].contiguous(), t, reduction="none", impl=IMPL)
    assert not any(made)
    with pytest.raises(ValueError, match="reduction"):
        fused_xent.cross_entropy(base[:, :8].contiguous(), t, reduction="avg", impl=IMPL)
    with pytest.raises(TypeError, match="target"):
        fused_xent.cross_entropy(base[:, :8].contiguous(), t.to(torch.int8), impl=IMPL)
    with pytest.raises(ValueError, match="target"):
        fused_xent.cross_entropy(base[:, :8].contiguous(), t[:3], impl=IMPL)


def test_options_off_as_ints_take_the_plain_route(monkeypatch):
    """An option at its default costs nothing, given as a float or an int (``option_off``): the
    same plain route, the same bits; a bool is left to the general route (which refuses it)."""
    made = _plans_made(monkeypatch)
    x = make_logits(5, 12, torch.float32, seed=9)
    t = make_target(5, 12, seed=10, ignored_rows=[2])
    loss, grad = _run(x, t)
    assert made and all(made)
    made.clear()
    same = _run(x, t, label_smoothing=0, lse_square_scale=0, logit_scale=1)
    assert made and all(made), "options off as ints left the plain route"
    assert torch.equal(same[0], loss) and torch.equal(same[1], grad)
    made.clear()
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        _run(x, t, label_smoothing=False)
    assert not made
    spied = []
    real = functional._plain_plan
    monkeypatch.setattr(
        fused_xent.logprobs, "_plain_plan", lambda *a: spied.append(real(*a)) or spied[-1]
    )
    logp = fused_xent.token_logprobs(x, t, temperature=1, logit_scale=1, impl=IMPL)
    assert spied and all(p is not None for p in spied)
    assert torch.equal(logp, fused_xent.token_logprobs(x, t, impl=IMPL))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_route(monkeypatch, dtype, bias):
    """A linear cross-entropy within one vocabulary slab: F.linear, then the plain loss; the
    gradients of the input, the head and the bias against float64 torch, as the slab route's."""
    made = _plans_made(monkeypatch)
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(6, 16, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(40, 16, generator=gen) / 4).to(dtype).to(DEVICE)
    b = torch.randn(40, generator=gen).to(dtype).to(DEVICE) if bias else None
    t = make_target(6, 40, seed=12, ignored_rows=[2])
    g = torch.tensor(1.5, device=DEVICE)
    leaves = [v.detach().clone().requires_grad_() for v in (h, w, b) if v is not None]
    loss = fused_xent.linear_cross_entropy(*leaves[:2], t, linear_bias=leaves[2] if bias else None,
                                           impl=IMPL)  # fmt: skip
    loss.backward(g)
    assert made and all(made), "the small linear call did not take the plain route"
    ref = [v.detach().double().requires_grad_() for v in (h, w, b) if v is not None]
    want = F.cross_entropy(F.linear(*ref), t)
    want.backward(g.double())
    assert _rel(loss, want) <= LOSS_RTOL * 10  # (the logits are rounded to the dtype first)
    for mine, theirs in zip(leaves, ref, strict=True):
        assert _rel(mine.grad, theirs.grad) <= max(GRAD_RTOL[dtype], 2e-5) * 4
    # the slab route (forced by a chunk size) agrees
    slab = [v.detach().clone().requires_grad_() for v in (h, w, b) if v is not None]
    other = fused_xent.linear_cross_entropy(*slab[:2], t, linear_bias=slab[2] if bias else None,
                                            chunk_size=6, impl=IMPL)  # fmt: skip
    other.backward(g)
    assert _rel(loss, other) <= LOSS_RTOL * 10
    for mine, theirs in zip(leaves, slab, strict=True):
        assert _rel(mine.grad, theirs.grad) <= max(GRAD_RTOL[dtype], 2e-5) * 4


def _logprobs(x, t, return_entropy, grads, **kw):
    """(log p, entropy, the logits' gradient) of token_logprobs on a leaf copy of ``x``, for
    incoming gradients ``grads`` = (of log p, of the entropy), either None."""
    leaf = x.detach().clone().requires_grad_()
    out = fused_xent.token_logprobs(leaf, t, return_entropy=return_entropy, impl=IMPL, **kw)
    logp, ent = out if return_entropy else (out, None)
    pairs = [(o, g) for o, g in zip((logp, ent), grads, strict=True) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return logp.detach(), None if ent is None else ent.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
def test_plain_token_logprobs(monkeypatch, small_blocks, dtype, which):
    """(B, T, V) logits, an ignored position: the plain route equals the general one bit for bit
    and float64 torch."""
    made = _plans_made(monkeypatch)
    spied = []
    real = functional._plain_plan
    monkeypatch.setattr(
        fused_xent.logprobs, "_plain_plan", lambda *a: spied.append(real(*a)) or spied[-1]
    )
    b, s, v = 2, 3, 40
    x = make_logits(b * s, v, dtype, seed=21).view(b, s, v)
    t = make_target(b * s, v, seed=22, ignored_rows=[4]).view(b, s)
    gen = torch.Generator().manual_seed(23)
    g_logp = torch.randn(b, s, generator=gen).to(DEVICE) if which != "entropy" else None
    g_ent = torch.randn(b, s, generator=gen).to(DEVICE) if which != "logp" else None
    ent_wanted = which != "logp"
    logp, ent, grad = _logprobs(x, t, ent_wanted, (g_logp, g_ent))
    assert spied and all(p is not None for p in spied), "the plain route was not taken"
    with _general_route():
        other = _logprobs(x, t, ent_wanted, (g_logp, g_ent))
    assert torch.equal(logp, other[0]) and torch.equal(grad, other[2])
    assert ent is None or torch.equal(ent, other[1])
    x64 = x.double().requires_grad_()
    logp_all = torch.log_softmax(x64, -1)
    kept = t != -100
    want_logp = torch.where(kept, logp_all.gather(-1, t.clamp_min(0)[..., None])[..., 0], 0.0)
    want_ent = torch.where(kept, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    outs = [(want_logp, g_logp), (want_ent, g_ent)]
    torch.autograd.backward([o for o, g in outs if g is not None],
                            [g.double() for _, g in outs if g is not None])  # fmt: skip
    assert _rel(logp, want_logp) <= LOSS_RTOL
    if ent is not None:
        assert _rel(ent, want_ent) <= LOSS_RTOL
    assert _rel(grad, x64.grad) <= GRAD_RTOL[dtype]
    with torch.no_grad():
        plain = fused_xent.token_logprobs(x, t, impl=IMPL)
    assert torch.equal(plain, logp)
    assert not made  # (token_logprobs has its own route; the loss's was not taken)
