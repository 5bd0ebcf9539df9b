"""Host time per call, measured without a GPU: the Python a step costs before the GPU sees it.

A short row's step is bound by the host (the issue's 32768 x 2048 step spent 72 us of 1.16 ms
in the kernels), so this measures what the package costs on the host per forward + backward,
against the eager recipe it replaces, in the same process:

* fused_xent runs its real Triton path (API -> autograd -> op -> launcher -> ``JITFunction.run``
  -> the compiled kernel's launcher) with a stub driver: the kernels are compiled for sm_90 once
  (as ``bench/static.py`` does) and the C launcher is a no-op, so everything but the launch
  itself is timed; the tensors are tiny CPU tensors (their data is never read).
* the peers are torch's own ops on the same tiny CPU tensors (their kernels do next to nothing at
  that size, so their time is their host time, kernels included: an upper bound of theirs).

Prints, per case: microseconds per step (the median of repeats), fused_xent / peer, the kernel
launches and the tensors allocated per step (a ``TorchDispatchMode`` count of the ATen ops), and
with ``--profile`` the functions taking the most time (cProfile, Python calls per step). Then the
autograd floor (a Function that only allocates) and where a ``cross_entropy`` step's time goes:
forward and whole step of torch's, the floor's and fused_xent's, and fused_xent's pieces alone
(the route's checks, the allocations, each launch).
``--check`` exits 1 where a ratio exceeds ``--max-ratio`` (CI runs it).

    python bench/host_time.py [--repeat N] [--profile] [--check] [--max-ratio R]

Run it in its own process (it needs the kernels imported without TRITON_INTERPRET).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench/host_time.py: run without TRITON_INTERPRET (it stubs the launches instead)")

import static  # noqa: E402  (bench/static.py: its stub driver)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fused_xent.kernels import xent  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.driver import driver as _driver  # noqa: E402

import fused_xent  # noqa: E402

LAUNCHES = Counter()


class _Utils:
    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}  # fmt: skip

    @staticmethod
    def load_binary(name, kernel, shared, device):
        return 0, 0, 64, 0, 1024  # module, function, registers, spills, max threads


def _launcher(src, metadata):
    name = getattr(src, "name", "kernel")

    def launch(*args):
        LAUNCHES[name] += 1

    return launch


class StubDriver(static.StubDriver):
    """``bench/static.py``'s stub (compiles for sm_90), with a launcher that launches nothing."""

    def __init__(self):
        super().__init__(90)
        self.utils = _Utils()
        self.launcher_cls = _launcher


def _launchable(logits):  # the launchers' own check, minus its refusal of CPU tensors
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("the kernels need unit stride along the class dimension")


class Allocations(TorchDispatchMode):
    """Counts the ATen ops that make a tensor (empty, zeros, full, as_strided, ...)."""

    MAKERS = ("empty", "zeros", "ones", "full", "new_", "as_strided", "clone", "_to_copy")

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name.startswith(m) for m in self.MAKERS):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


N, C = 8, 256  # tiny: the kernels' work is nothing; the host's is everything


def _inputs(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, C, (N,), generator=g)
    return x, t


def _linear_inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, 64, generator=g).to(dtype).requires_grad_()
    w = torch.randn(C, 64, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, C, (N,), generator=g)
    return h, w, t


def _steps():
    """(name, fused_xent step, eager step, what it measures)."""
    x, t = _inputs()

    def xent_ours():
        fused_xent.cross_entropy(x, t, impl="triton").backward()

    def xent_torch():
        F.cross_entropy(x, t).backward()

    def rl_ours():
        logp, ent = fused_xent.token_logprobs(x, t, return_entropy=True, impl="triton")
        (logp.sum() + ent.sum()).backward()

    def rl_torch():
        logp_all = torch.log_softmax(x.float(), dim=-1)
        logp = logp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        (logp.sum() + ent.sum()).backward()

    h, w, tl = _linear_inputs()

    def linear_ours():
        fused_xent.linear_cross_entropy(h, w, tl, impl="triton").backward()

    def linear_torch():
        F.cross_entropy(F.linear(h, w).float(), tl).backward()

    return [
        ("cross_entropy", xent_ours, xent_torch, "mean loss, forward + backward"),
        ("token_logprobs", rl_ours, rl_torch, "log p and entropy, forward + backward of both"),
        ("linear_cross_entropy", linear_ours, linear_torch, "mean loss, forward + backward"),
    ]


class _Nothing(torch.autograd.Function):
    """The autograd floor: a Function that allocates its output and hands back a gradient it
    already holds, nothing else (what any Python autograd.Function pays, in the same process)."""

    @staticmethod
    def forward(ctx, x):
        ctx.grad = torch.empty_like(x)
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return ctx.grad


def _floor_step():
    x, _ = _inputs()

    def step():
        _Nothing.apply(x).backward()

    return step


def _breakdown(repeat: int, number: int) -> list[tuple[str, float]]:
    """Where a plain ``cross_entropy`` step's host time goes, beside torch's and the autograd
    floor's: each piece timed alone (the fastest of ``repeat`` runs, so the pieces add up)."""
    from fused_xent import autograd, functional

    x, t = _inputs()
    plan = functional._plain_plan(x, t, -100, "mean", "triton")
    total, work = autograd.plain_outputs(x)
    grad, one = torch.empty_like(x), torch.ones(())

    def fast(fn):
        for _ in range(3):
            fn()
        return min(_time(fn, 1, number) for _ in range(repeat))

    return [
        ("F.cross_entropy: forward", fast(lambda: F.cross_entropy(x, t))),
        ("F.cross_entropy: forward + backward", fast(lambda: F.cross_entropy(x, t).backward())),
        ("autograd floor: forward", fast(lambda: _Nothing.apply(x))),
        ("autograd floor: forward + backward", fast(_floor_step())),
        ("fused_xent: forward", fast(lambda: fused_xent.cross_entropy(x, t, impl="triton"))),
        ("fused_xent: forward + backward",
         fast(lambda: fused_xent.cross_entropy(x, t, impl="triton").backward())),
        ("  of which the route's checks and plan",
         fast(lambda: functional._plain_options(None, None, None, 0.0, 0.0, None, 1.0)
              and functional._plain_plan(x, t, -100, "mean", "triton"))),
        ("  of which the outputs (3 allocations)",
         fast(lambda: (torch.empty_like(x), autograd.plain_outputs(x)))),
        ("  of which the forward's 2 launches",
         fast(lambda: plan.forward(x, t, total, work, grad))),
        ("  of which the backward's launch", fast(lambda: plan.backward(x, t, work, one, grad))),
    ]  # fmt: skip


def _time(fn, repeat: int, number: int) -> float:
    """Median microseconds per call over ``repeat`` runs of ``number`` calls."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--number", type=int, default=40)
    p.add_argument("--profile", action="store_true", help="the top functions per case")
    p.add_argument("--check", action="store_true", help="exit 1 above --max-ratio")
    p.add_argument("--max-ratio", type=float, default=1.0)
    p.add_argument("--cases", default="", help="comma-separated substrings of case names")
    args = p.parse_args(argv)

    _driver.set_active(StubDriver())
    xent._check_launchable = _launchable
    torch.set_num_threads(1)
    print(f"host time per step, launches stubbed (sm_90, Triton), one thread, N x C = {N} x {C} "
          f"bf16, torch {torch.__version__}")  # fmt: skip
    print(f"{'case':22} {'fused_xent us':>14} {'eager us':>9} {'ratio':>6} {'launches':>9} "
          f"{'allocs':>7} {'eager allocs':>13}")  # fmt: skip
    worst, ran = 0.0, []
    for name, ours, theirs, what in _steps():
        if args.cases and not any(c in name for c in args.cases.split(",")):
            continue
        ran.append(name)
        for fn in (ours, theirs):  # compile, warm caches
            for _ in range(3):
                fn()
        LAUNCHES.clear()
        ours()
        launches = sum(LAUNCHES.values())
        counts = []
        for fn in (ours, theirs):
            with Allocations() as mode:
                fn()
            counts.append(sum(mode.ops.values()))
        t_ours = _time(ours, args.repeat, args.number)
        t_theirs = _time(theirs, args.repeat, args.number)
        ratio = t_ours / t_theirs
        worst = max(worst, ratio)
        print(f"{name:22} {t_ours:14.1f} {t_theirs:9.1f} {ratio:6.2f} {launches:9d} "
              f"{counts[0]:7d} {counts[1]:13d}   ({what})")  # fmt: skip
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                ours()
            prof.disable()
            stats = pstats.Stats(prof)
            print(f"  {stats.total_calls / 100:.0f} Python calls a step; the top 12 by own time:")
            stats.sort_stats("tottime").print_stats(12)
    floor = _floor_step()
    for _ in range(3):
        floor()
    t_floor = _time(floor, args.repeat, args.number)
    print(f"autograd floor: a torch.autograd.Function that only allocates, forward + backward: "
          f"{t_floor:.1f} us")  # fmt: skip
    if "cross_entropy" in ran:
        print("where a cross_entropy step's time goes (each piece alone, the fastest run, us):")
        for what, us in _breakdown(args.repeat, args.number):
            print(f"  {what:44} {us:6.1f}")
    if args.check and worst > args.max_ratio:
        print(f"host_time: a ratio of {worst:.2f} is above --max-ratio {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
