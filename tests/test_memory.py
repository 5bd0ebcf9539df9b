"""Peak memory of the fused linear forms, measured: torch's profiler records every allocation
and free on the CPU (autograd's saved tensors included), and the running sum's maximum over one
forward + backward must stay within the default plan's bound (issue #20):

    V*D*b_w (the weight gradient itself) + N*D*4 (a float32 d_hidden) + N*D*b (the input
    gradient) + 64*N (row statistics) + min(N*V*b / 16, 64 MiB) (logits in flight) + 1 MiB

at a shape where that bound is far below the whole logits (N x V), on every route the CPU has:
``impl="auto"`` (the CPU fallback), the reference, and the kernels under the interpreter. The
row-chunk plan (an explicit ``chunk_size``: memory for speed) holds a chunk's logits and a
float32 V x D accumulator, and is shown to exceed it, so the measurement can fail.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA
from torch.profiler import ProfilerActivity, profile

import fused_xent
from fused_xent.autograd import SLAB_BYTES

pytestmark = pytest.mark.skipif(
    CUDA, reason="measures the CPU allocator (the GPU report prints the CUDA peak)"
)

N, D, V = 128, 16, 16384  # logits 4 MiB in bf16; the bound about 1.8 MiB
ROUTES = ("auto", "reference", "triton")


def peak_bytes(step) -> int:
    """The largest amount of CPU memory allocated at once during ``step()`` beyond what was
    allocated before it (its outputs, the gradients, included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def bound(n, d, v, dtype) -> int:
    b = dtype.itemsize
    return v * d * b + n * d * 4 + n * d * b + 64 * n + min(n * v * b // 16, SLAB_BYTES) + (1 << 20)


def _inputs(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    t[3] = -100
    return h, w, t


def _xent(h, w, t, impl):
    return fused_xent.linear_cross_entropy(h, w, t, impl=impl)


def _xent_options(h, w, t, impl):
    return fused_xent.linear_cross_entropy(
        h, w, t, impl=impl, reduction="none", label_smoothing=0.1, lse_square_scale=1e-4,
        softcap=30.0,
    ).sum()  # fmt: skip


def _logprobs(h, w, t, impl):
    logp, entropy = fused_xent.linear_token_logprobs(
        h, w, t, impl=impl, temperature=0.7, return_entropy=True
    )
    return logp.sum() + entropy.sum()


_TEACHER = {}


def _distill(h, w, t, impl):
    """The JSD (three sweeps) with the hard term at a temperature; the teacher's head (the
    student's hidden size, a different head) is an input, allocated before the step."""
    if not _TEACHER:
        gen = torch.Generator().manual_seed(1)
        _TEACHER["h"] = torch.randn(N, D, generator=gen).to(h.dtype)
        _TEACHER["w"] = (torch.randn(V, D, generator=gen) * 0.3).to(w.dtype)
    return fused_xent.linear_distillation_loss(
        h, w, _TEACHER["h"], _TEACHER["w"], t, beta=0.5, temperature=2.0, hard_weight=0.5,
        impl=impl,
    )  # fmt: skip


CALLS = {"linear_cross_entropy": _xent, "linear_cross_entropy none+options": _xent_options,
         "linear_token_logprobs": _logprobs, "linear_distillation_loss": _distill}  # fmt: skip
# The kernels under the interpreter are slow at these sizes: the plain call alone there (the
# driver of the slabs is the same for every backend).
CASES = [(name, route) for name in CALLS for route in ROUTES
         if route != "triton" or name == "linear_cross_entropy"]  # fmt: skip


@pytest.mark.parametrize("name,route", CASES)
def test_default_plan_within_the_bound(name, route):
    h, w, t = _inputs()
    call = CALLS[name]

    def step():
        return torch.autograd.grad(call(h, w, t, route), (h, w))

    step()  # warm up (first-call caches)
    got = peak_bytes(step)
    logits = N * V * h.element_size()
    assert got <= bound(N, D, V, h.dtype), f"{got / 2**20:.2f} MiB"
    assert got < logits / 2, f"{got / 2**20:.2f} MiB against the logits' {logits / 2**20:.2f}"


def test_row_chunks_spend_memory_for_speed():
    """The documented trade-off: chunk_size=N is today's one-chunk, three-product plan, holding
    the whole logits and a float32 V x D accumulator, above the default's bound."""
    h, w, t = _inputs()

    def step():
        loss = fused_xent.linear_cross_entropy(h, w, t, chunk_size=N, impl="reference")
        return torch.autograd.grad(loss, (h, w))

    assert peak_bytes(step) > N * V * h.element_size() + V * D * 4
