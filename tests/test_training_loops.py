"""fused_xent inside training steps: torch.compile, CUDA graphs, autocast, loss scaling,
determinism, and the errors for what is not supported (double backward, retain_graph in place)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import COMPILE_IMPLS, CUDA, DEVICE, IMPLS, oracle, rel_err

import fused_xent

N, C, D = 12, 37, 16  # 37: not a power of two, so the kernels mask a partial block


def _batch(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=gen) * 3).to(dtype).to(DEVICE)
    t = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    t[3] = -100  # an ignored row
    return x, t


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the custom ops keep Dynamo from breaking the graph
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", COMPILE_IMPLS)
def test_compile_fullgraph_cross_entropy(impl):
    """A model + loss compiled with fullgraph=True (any graph break would raise) gives the eager
    numbers, loss and gradients, for the fused ("mean") and the two-pass ("none") schedules."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(C, C).to(DEVICE)
    x, t = _batch(0)

    def step(x, t, reduction):
        logits = lin(x)
        return fused_xent.cross_entropy(
            logits, t, reduction=reduction, label_smoothing=0.1, impl=impl
        )

    compiled = torch.compile(step, fullgraph=True)
    for reduction in ("mean", "none"):
        grads = []
        for fn in (compiled, step):
            lin.zero_grad()
            loss = fn(x, t, reduction)
            loss.sum().backward()
            grads.append((loss.detach(), lin.weight.grad.clone()))
        (l_c, g_c), (l_e, g_e) = grads
        assert rel_err(l_c, l_e) <= 1e-6
        assert rel_err(g_c, g_e) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_inplace_backward_makes_no_copy(reduction):
    """inplace_backward=True compiled: the custom ops declare that the gradient is written into
    the logits (``xent_backward_inplace`` mutates them), so the compiled step gives the eager
    gradients and allocates no second (N, C) buffer for them."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    lin = torch.nn.Linear(C, C).to(DEVICE)
    x, t = _batch(2)

    def step(x, t):
        logits = lin(x)
        return fused_xent.cross_entropy(
            logits, t, reduction=reduction, inplace_backward=True, impl="reference"
        )

    def run(fn):
        lin.zero_grad()
        loss = fn(x, t)
        loss.sum().backward()
        return loss.detach(), lin.weight.grad.clone()

    (l_c, g_c), codes = run_and_get_code(run, torch.compile(step, fullgraph=True))
    l_e, g_e = run(step)
    assert rel_err(l_c, l_e) <= 1e-6 and rel_err(g_c, g_e) <= 1e-6
    backward_code = codes[-1]
    assert "xent_backward_inplace" in backward_code
    assert f"empty_strided_{DEVICE.type}(({N}, {C})" not in backward_code, "an (N, C) buffer"


def test_compile_fullgraph_linear_cross_entropy():
    """The chunked linear form compiles without graph breaks (reference path on the CPU)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, D, generator=gen).to(DEVICE).requires_grad_()
    w = (torch.randn(C, D, generator=gen) / 4).to(DEVICE).requires_grad_()
    t = torch.randint(0, C, (2, 5), generator=gen).to(DEVICE)

    def step(h, w, t):
        return fused_xent.linear_cross_entropy(h, w, t, chunk_size=4)

    compiled = torch.compile(step, fullgraph=True)
    out = []
    for fn in (compiled, step):
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for a, b in zip(*out, strict=True):
        assert rel_err(a, b) <= 1e-6


# --------------------------------------------------------------------------------------------
# Autocast, loss scaling, gradient accumulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_float32_policy(impl):
    """Inside autocast, torch's loss follows its float32 policy; so does ours (a float32 loss),
    reading the bf16 logits as they are, with the same value as torch's within bf16 logits."""
    device_type = DEVICE.type
    lin = torch.nn.Linear(D, C).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(N, D, generator=gen).to(DEVICE)
    t = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        logits = lin(h)
        ours = fused_xent.cross_entropy(logits, t, impl=impl)
        theirs = F.cross_entropy(logits, t)
        fused = fused_xent.linear_cross_entropy(h, lin.weight, t, linear_bias=lin.bias, impl=impl)
    assert logits.dtype == torch.bfloat16
    assert ours.dtype == theirs.dtype == fused.dtype == torch.float32
    assert rel_err(ours, theirs) <= 1e-5
    assert rel_err(fused, theirs) <= 1e-5  # same bf16 products, float32 loss
    fused.backward()
    assert lin.weight.grad.dtype == torch.float32  # the parameter's dtype, through the cast


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("impl", IMPLS)
def test_loss_scaling_and_accumulation(impl, reduction):
    """GradScaler-style scaling (x 65536) and accumulation over two micro-batches of loss / 2
    give exactly the oracle's scaled / accumulated gradient."""
    x1, t1 = _batch(3)
    x2, t2 = _batch(4)
    leaf = torch.cat([x1, x2]).requires_grad_()
    for part, t in ((leaf[:N], t1), (leaf[N:], t2)):
        loss = fused_xent.cross_entropy(part, t, reduction=reduction, impl=impl)
        (loss * 65536.0 / 2).backward()
    want = torch.cat([oracle(x, t, reduction=reduction)[1] for x, t in ((x1, t1), (x2, t2))]) * (
        65536.0 / 2
    )
    assert rel_err(leaf.grad, want) <= 1e-5


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bitwise_deterministic(impl):
    """Same inputs, same device: bitwise-identical loss and gradients, run after run, with
    torch.use_deterministic_algorithms(True) in force (nothing we call is refused by it)."""
    x, t = _batch(5, torch.bfloat16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            leaf = x.clone().requires_grad_()
            loss = fused_xent.cross_entropy(leaf, t, label_smoothing=0.1, impl=impl)
            loss.backward()
            h = x.float()[:, :D].clone().requires_grad_()
            w = torch.linspace(-1, 1, C * D, device=DEVICE).reshape(C, D).requires_grad_()
            lin = fused_xent.linear_cross_entropy(h, w, t, chunk_size=5, impl=impl)
            lin.backward()
            runs.append([loss, leaf.grad, lin, h.grad, w.grad])
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# What is refused, clearly
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_retain_graph_with_inplace_raises(impl, reduction):
    """After an in-place backward the logits hold the gradient: a second backward must refuse
    instead of computing from them."""
    x, t = _batch(6)
    logits = (x * 1).requires_grad_()
    loss = fused_xent.cross_entropy(
        logits, t, reduction=reduction, inplace_backward=True, impl=impl
    )
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.sum().backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_retain_graph_without_inplace_none_works(impl):
    """The two-pass schedule ("none", not in place) supports a second backward, as torch does."""
    x, t = _batch(7)
    leaf = x.clone().requires_grad_()
    loss = fused_xent.cross_entropy(leaf, t, reduction="none", impl=impl)
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()
    assert rel_err(leaf.grad, 2 * oracle(x, t, reduction="none")[1]) <= 1e-5


# --------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# --------------------------------------------------------------------------------------------


def _replayed(step, x, t, seed: int):
    """``step()`` on the static ``x`` and ``t``: warmed up on a side stream (the kernels compile
    there), captured in a CUDA graph (``x.grad`` cleared before each), then replayed on a new
    batch copied into them: (what the captured step returned, the new logits, the new target)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        out = step()
    new_x, new_t = _batch(seed, x.dtype)
    with torch.no_grad():
        x.copy_(new_x)
    t.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()
    return out, new_x, new_t


@pytest.mark.requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_capture_forward_backward(reduction):
    """Forward + backward captured in a CUDA graph and replayed on new data in the same buffers
    gives the eager result: no host synchronisation, no allocation that depends on values."""
    assert CUDA
    static_x, static_t = _batch(8, torch.bfloat16)
    static_x.requires_grad_()

    def step():
        loss = fused_xent.cross_entropy(static_x, static_t, reduction=reduction)
        loss.sum().backward()
        return loss

    static_loss, new_x, new_t = _replayed(step, static_x, static_t, seed=9)
    want_loss, want_grad = oracle(new_x, new_t, reduction=reduction)
    assert rel_err(static_loss, want_loss) <= 1e-5
    assert rel_err(static_x.grad, want_grad) <= 8e-3


@pytest.mark.requires_cuda
def test_cuda_graph_capture_token_logprobs():
    """The RL step (``token_logprobs`` with entropy, incoming gradients on both: the plain
    route's two launches) captured and replayed on new data: float64 torch's values."""
    assert CUDA
    static_x, static_t = _batch(10, torch.bfloat16)
    static_x.requires_grad_()
    gen = torch.Generator().manual_seed(11)
    a, b = (torch.randn(N, generator=gen).to(DEVICE) for _ in range(2))

    def step():
        logp, ent = fused_xent.token_logprobs(static_x, static_t, return_entropy=True)
        (logp * a + ent * b).sum().backward()
        return logp, ent

    (static_logp, static_ent), new_x, new_t = _replayed(step, static_x, static_t, seed=12)
    x64 = new_x.double().requires_grad_()
    logp_all = torch.log_softmax(x64, -1)
    kept = new_t != -100
    want_logp = torch.where(kept, logp_all.gather(-1, new_t.clamp_min(0)[:, None])[:, 0], 0.0)
    want_ent = torch.where(kept, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    (want_logp * a.double() + want_ent * b.double()).sum().backward()
    assert rel_err(static_logp, want_logp) <= 1e-5
    assert rel_err(static_ent, want_ent) <= 1e-5
    assert rel_err(static_x.grad, x64.grad) <= 8e-3
