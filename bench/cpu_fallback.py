"""The CPU fallback against torch: ``python bench/cpu_fallback.py [--threads N] [--quick]``.

Times, on this CPU, one step of a mean loss on (N, C) logits with int64 targets: forward +
``torch.autograd.grad`` ("fb") and the forward under ``no_grad`` ("f"), for

* ``torch``: ``F.cross_entropy`` on the tensor itself;
* ``auto``: ``fused_xent.cross_entropy`` as users call it on the CPU (``impl="auto"``): torch's
  kernels on float32 copies for small calls (``functional._torch_cpu``), else the row path;
* ``rows``: the same call with the small-call path switched off: API -> autograd.Function ->
  ``fused_xent/cpu.py``;
* ``math``: the ``cpu.py`` calls alone, on preallocated outputs (``xent_forward`` with the
  gradient and the backward's g == 1 check; or ``xent_forward``);
* ``ref``: ``impl="reference"``, the oracle.

Each number (microseconds) is the median of the runs in a round (0.15 s of runs, at least 3);
the implementations take turns round by round, and the lowest round median is kept, so that
other work on a shared machine does not decide it. One thread by default (as bench/benchlib.py:
on a busy 2-core machine a second intra-op thread waits for a core and stalls for milliseconds),
timed as the CPU time of this thread; ``--threads 2`` times wall clock.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

import fused_xent
from fused_xent import cpu, functional
from fused_xent._options import LossOptions

SHAPES = [(torch.bfloat16, 64, 512), (torch.float32, 64, 2048), (torch.float32, 512, 8192),
          (torch.bfloat16, 256, 32000)]  # fmt: skip
OPTIONS = {"plain": {}, "smooth": {"label_smoothing": 0.1}, "weight": {"weight": True}}


@contextmanager
def rows_only():
    old = functional._TORCH_CPU_MAX_ELEMENTS
    functional._TORCH_CPU_MAX_ELEMENTS = -1
    try:
        yield
    finally:
        functional._TORCH_CPU_MAX_ELEMENTS = old


def steps(x, t, kw):
    """name -> (fb step, f step)."""
    xg = x.clone().requires_grad_()

    def fused(inp, impl="auto"):
        return fused_xent.cross_entropy(inp, t, impl=impl, **kw)

    def ref(inp):
        return fused(inp, "reference")

    def fb(loss_fn, ctx=nullcontext):
        def run():
            with ctx():
                torch.autograd.grad(loss_fn(xg), xg)

        return run

    def f(loss_fn, ctx=nullcontext):
        def run():
            with torch.no_grad(), ctx():
                loss_fn(x)

        return run

    n, opts = x.shape[0], LossOptions(**kw)
    loss, stats, one = torch.empty(n), torch.empty(3, n), torch.ones(())

    def math_fb():
        grad = torch.empty_like(x)
        cpu.xent_forward(x, t, opts, loss, stats, grad, one / n)
        cpu.xent_backward(x, t, opts, stats, one, grad, "sum", None, True)  # g == 1: nothing

    return {
        "torch": (
            fb(lambda v: F.cross_entropy(v, t, **kw)),
            f(lambda v: F.cross_entropy(v, t, **kw)),
        ),
        "auto": (fb(fused), f(fused)),
        "rows": (fb(fused, rows_only), f(fused, rows_only)),
        "math": (math_fb, lambda: cpu.xent_forward(x, t, opts, loss, stats)),
        "ref": (fb(ref), f(ref)),
    }


def measure(fns: dict, rounds: int, per_round: float) -> dict:
    # One intra-op thread does all the work in this thread: count its CPU time, not the time the
    # scheduler gave to other processes. Several threads: wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    medians = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            times, end = [], time.perf_counter() + per_round
            while len(times) < 3 or time.perf_counter() < end:
                start = clock()
                fn()
                times.append(clock() - start)
            medians[name].append(statistics.median(times))
    return {k: min(v) * 1e6 for k, v in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="the two small shapes, 3 rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    shapes, rounds = (SHAPES[:2], 3) if args.quick else (SHAPES, args.rounds)
    names = ["torch", "auto", "rows", "math", "ref"]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); us, lowest round median of {clock}"
    )
    print(
        f"{'case':<28}" + "".join(f"{n:>9}" for n in names) + f"{'auto/torch':>11}{'ref/torch':>10}"
    )
    for dtype, n, c in shapes:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(n, c, generator=gen) * 3).to(dtype)
        t = torch.randint(0, c, (n,), generator=gen)
        for opt, kw in OPTIONS.items():
            w = (torch.rand(c, generator=gen) + 0.5).to(dtype)  # torch wants the input's dtype
            kw = {k: w if v is True else v for k, v in kw.items()}
            pairs = steps(x, t, kw)
            for i, mode in enumerate(("fb", "f")):
                r = measure({k: v[i] for k, v in pairs.items()}, rounds, 0.15)
                case = f"{str(dtype)[6:]} {n}x{c} {opt} {mode}"
                cells = "".join(f"{r[k]:>9.0f}" for k in names)
                ratios = f"{r['auto'] / r['torch']:>11.2f}{r['ref'] / r['torch']:>10.2f}"
                print(f"{case:<28}{cells}{ratios}", flush=True)


if __name__ == "__main__":
    main()
