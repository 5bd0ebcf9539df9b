"""pytest-benchmark suite: fused_xent against its peers, run as ``pytest bench/``.

Each benchmark is one step of the issue's shapes: forward + backward of a mean loss (the gradient
taken with ``torch.autograd.grad``), or the forward alone under ``no_grad``. The GPU is
synchronised inside the timed function, so the host clock pytest-benchmark reads covers the work.
Inputs rotate among several randn copies (``benchlib.Rotation``) so a call does not find its
logits in L2. Peers are grouped per shape; ``extra_info`` holds the bytes the step must move and
the GB/s and fraction of the copy bandwidth that makes.

fused_xent runs twice in fwd+bwd: ``fused_xent_inplace`` (``inplace_backward=True``) is the
like-for-like comparison with Liger, which also writes the gradient over the logits;
``fused_xent`` allocates its gradient, as torch does.

The RL step (``benchlib.RL_CUDA_CASES``, ids ``rl-...``) runs in ``test_xent`` too: log p of the
sampled tokens and the entropy, forward + backward with random incoming gradients on both, against
the trainers' eager recipe and its torch.compile; its bytes are one read of the logits in the
forward, one read + one write in the backward.

``test_linear``: the fused linear + cross-entropy (``benchlib.LINEAR_CUDA_CASES``), forward +
backward of a mean loss with the gradients of the hidden states and the weight; the hidden states
rotate, the weight is shared. ``extra_info`` holds the flops (6 N D V), the floor (those flops at
the bf16 8192^3 matrix product rate measured once per session) and the % of it reached.

``test_distill``: knowledge distillation (``benchlib.DISTILL_CUDA_CASES``, ids ``distill-...``),
forward + backward of a mean loss with the student's gradient, fused_xent against the float32
eager recipe; its bytes are one read of each set of logits and one write of the gradient. Its
linear form (``benchlib.LINEAR_DISTILL_CUDA_CASES``, ids ``distill-linear-...``) against the
unfused recipe and Liger's fused linear JSD, with the student's d_hidden and d_weight; the hidden
states rotate, the heads are shared; ``extra_info`` holds its flops and bytes (both floors).

On a machine without CUDA the cases are tiny and fused_xent runs its reference path
(``impl="reference"``), against torch eager only: a smoke test of the suite, not a measurement.
For a table, a plot and the accuracy check, use ``python bench/report.py``.
"""

from __future__ import annotations

import benchlib
import pytest
import torch

DEVICE = benchlib.default_device()
CASES = benchlib.cases_for(DEVICE) + benchlib.rl_cases_for(DEVICE)
LINEAR_CASES = benchlib.linear_cases_for(DEVICE)
DISTILL_CASES = benchlib.distill_cases_for(DEVICE) + benchlib.linear_distill_cases_for(DEVICE)


# Forward only writes no gradient, so fused_xent_inplace would repeat the fused_xent run there.
PARAMS = [
    pytest.param(case, impl.name, id=f"{case.id}-{impl.name}")
    for case in CASES
    for impl in (benchlib.RL_IMPLS if isinstance(case, benchlib.RLCase) else benchlib.IMPLS)
    if not (case.mode == benchlib.FWD and impl.name == "fused_xent_inplace")
]


@pytest.mark.parametrize("case, impl_name", PARAMS)
def test_xent(benchmark, device, copy_bw, case, impl_name):
    rl = isinstance(case, benchlib.RLCase)
    impl = (benchlib.RL_IMPLS_BY_NAME if rl else benchlib.IMPLS_BY_NAME)[impl_name]
    reason = impl.skip_reason(case, device)
    if reason:
        pytest.skip(reason)

    step = benchlib.make_step(impl.loss_fn(case, device), case.mode)
    rotation = (benchlib.RLRotation if rl else benchlib.Rotation)(case, device)

    def run():
        out = step(*rotation.next())
        benchlib.sync(device)
        return out

    try:
        # Outside the timing: Triton JIT, torch.compile, allocator warm-up.
        assert torch.isfinite(run()[0]).all().item()
        benchmark.group = f"{'rl' if rl else case.mode} {case.label}"
        benchmark.extra_info["bytes"] = case.bytes_moved
        benchmark.extra_info["bytes_counted"] = case.bytes_counted
        benchmark(run)
    finally:
        rotation.release()  # pytest-benchmark may keep `run` alive; let the buffers go

    if benchmark.stats is not None:  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        rate = case.bytes_moved / median_s
        benchmark.extra_info["GB/s"] = round(rate / 1e9, 2)
        benchmark.extra_info["copy_GB/s"] = round(copy_bw() / 1e9, 2)
        benchmark.extra_info["pct_of_copy_bw"] = round(100 * rate / copy_bw(), 1)


LINEAR_PARAMS = [
    pytest.param(case, impl.name, id=f"{case.id}-{impl.name}")
    for case in LINEAR_CASES
    for impl in benchlib.LINEAR_IMPLS
]


@pytest.mark.parametrize("case, impl_name", LINEAR_PARAMS)
def test_linear(benchmark, device, matmul_rate, case, impl_name):
    impl = benchlib.LINEAR_IMPLS_BY_NAME[impl_name]
    reason = impl.skip_reason(case, device)
    if reason:
        pytest.skip(reason)

    step = benchlib.make_step(impl.loss_fn(case, device), case.mode, n_grad=2)
    rotation = benchlib.LinearRotation(case, device)

    def run():
        out = step(*rotation.next())
        benchlib.sync(device)
        return out

    try:
        loss, _, _ = run()  # outside the timing: Triton JIT, autotuning, allocator warm-up
        assert torch.isfinite(loss).item()
        benchmark.group = f"linear {case.label}"
        benchmark.extra_info["flops"] = case.flops
        benchmark.extra_info["flops_counted"] = "6 N D V: logits, d_hidden, d_weight products"
        benchmark(run)
    finally:
        rotation.release()

    if benchmark.stats is not None:  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        floor_s = case.flops / matmul_rate()
        benchmark.extra_info["TFLOP/s"] = round(case.flops / median_s / 1e12, 4)
        benchmark.extra_info["matmul_TFLOP/s"] = round(matmul_rate() / 1e12, 4)
        benchmark.extra_info["floor_ms"] = round(floor_s * 1e3, 4)
        benchmark.extra_info["pct_of_floor"] = round(100 * floor_s / median_s, 1)


DISTILL_PARAMS = [
    pytest.param(case, impl.name, id=f"{case.id}-{impl.name}")
    for case in DISTILL_CASES
    for impl in (
        benchlib.LINEAR_DISTILL_IMPLS
        if isinstance(case, benchlib.LinearDistillCase)
        else benchlib.DISTILL_IMPLS
    )
]


@pytest.mark.parametrize("case, impl_name", DISTILL_PARAMS)
def test_distill(benchmark, device, copy_bw, matmul_rate, case, impl_name):
    linear = isinstance(case, benchlib.LinearDistillCase)
    by_name = benchlib.LINEAR_DISTILL_IMPLS_BY_NAME if linear else benchlib.DISTILL_IMPLS_BY_NAME
    impl = by_name[impl_name]
    reason = impl.skip_reason(case, device)
    if reason:
        pytest.skip(reason)

    step = benchlib.make_step(impl.loss_fn(case, device), case.mode, n_grad=2 if linear else 1)
    rotation = (benchlib.LinearDistillRotation if linear else benchlib.DistillRotation)(
        case, device
    )

    def run():
        out = step(*rotation.next())
        benchlib.sync(device)
        return out

    try:
        assert torch.isfinite(run()[0]).item()  # outside the timing: JIT, allocator warm-up
        benchmark.group = f"distill {'linear ' if linear else ''}{case.label}"
        benchmark.extra_info["bytes"] = case.bytes_moved
        if linear:
            benchmark.extra_info["flops"] = case.flops
        benchmark(run)
    finally:
        rotation.release()

    if benchmark.stats is not None:  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        floor_s = case.bytes_moved / copy_bw()
        if linear:
            floor_s = max(floor_s, case.flops / matmul_rate())
            benchmark.extra_info["TFLOP/s"] = round(case.flops / median_s / 1e12, 4)
        benchmark.extra_info["GB/s"] = round(case.bytes_moved / median_s / 1e9, 2)
        benchmark.extra_info["floor_ms"] = round(floor_s * 1e3, 4)
        benchmark.extra_info["pct_of_floor"] = round(100 * floor_s / median_s, 1)


def test_trl_head_from_its_files():
    """TRL's fused LM head where ``trl`` itself does not import (the GPU machine has no
    transformers): ``benchlib._trl_head_files`` runs the wheel's own kernel file, whose loss must
    be float64 torch's. A child process with transformers hidden plays the GPU machine."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed")
    child = (
        "import sys; sys.modules['transformers'] = None\n"  # (import and find_spec then fail)
        "import torch, torch.nn.functional as F, benchlib\n"
        "assert benchlib._trl_head_files() is not None\n"
        "loss = benchlib._trl_head_loss()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h, w = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g)\n"
        "t = torch.randint(0, 100, (8,), generator=g)\n"
        "w.requires_grad_()\n"
        "got = loss(h, w, t)\n"
        "got.backward()\n"
        "w64 = w.detach().double().requires_grad_()\n"
        "want = F.cross_entropy(h.double() @ w64.t(), t)\n"
        "want.backward()\n"
        "assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()), (got, want)\n"
        "assert ((w.grad - w64.grad).norm() / w64.grad.norm()).item() <= 1e-5\n"
        "assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
