"""The CPU route against torch: ``python bench/cpu_fallback.py [--threads N] [--check]``.

Issue #19's criterion: one step of forward + ``torch.autograd.grad`` of the loss on (N, C) CPU
logits, ``fused_xent.cross_entropy(..., impl="auto")`` (torch's kernels on a float32 copy for
small calls, ``functional._torch_cpu``, else ``fused_xent/cpu.py``) against ``F.cross_entropy``
on the same tensor with the same options, at torch's default thread count, timed as wall clock;
the ratio auto / torch is printed, and ``--check`` exits with status 1 if one exceeds 1.5 (timing
on a shared machine is noisy: not a CI check). ``--rows`` adds ``cpu.py`` with the small-call
route switched off; ``--forward`` times the forward alone, under ``no_grad``.

Each number (microseconds) is the median of the runs in a round (0.15 s of runs, at least 3);
the implementations take turns round by round, and the lowest round median is kept, so that
other work on a shared machine does not decide it. ``--threads 1`` times the CPU time of this
thread (on a busy 2-core machine a second intra-op thread waits for a core and stalls for
milliseconds); more threads, or torch's default, wall clock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

import fused_xent
from fused_xent import functional

bf16, fp32 = torch.bfloat16, torch.float32
SHAPES = [(bf16, 64, 512), (fp32, 64, 2048), (fp32, 256, 32000), (bf16, 512, 8192),
          (bf16, 256, 32000), (fp32, 1024, 8192)]  # fmt: skip
# weight: class weights; ignore: every 8th target is ignore_index; probs: probability targets.
OPTIONS = {
    "plain": {}, "sum": {"reduction": "sum"}, "none": {"reduction": "none"},
    "weight": {"weight": True}, "smooth": {"label_smoothing": 0.1}, "ignore": {"ignore": True},
    "probs": {"probs": True}, "w+s+i": {"weight": True, "label_smoothing": 0.1, "ignore": True},
}  # fmt: skip
LIMIT = 1.5


@contextmanager
def rows_only():
    old = functional._TORCH_CPU_MAX_ELEMENTS
    functional._TORCH_CPU_MAX_ELEMENTS = -1
    try:
        yield
    finally:
        functional._TORCH_CPU_MAX_ELEMENTS = old


def case(dtype, n, c, opt):
    """(logits, target, keyword arguments) of one case, seeded."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    kw = dict(OPTIONS[opt])
    if kw.pop("ignore", False):
        t[::8] = -100
    if kw.pop("probs", False):
        t = torch.softmax(torch.randn(n, c, generator=gen), 1).to(dtype)
    if kw.get("weight"):
        kw["weight"] = (torch.rand(c, generator=gen) + 0.5).to(dtype)  # torch wants x's dtype
    return x, t, kw


def steps(x, t, kw, forward: bool) -> dict:
    xg = x.clone().requires_grad_()
    grad_out = torch.ones(x.shape[0]) if kw.get("reduction") == "none" else None

    def make(loss_fn, ctx=nullcontext):
        def fb():
            with ctx():
                loss = loss_fn(xg)
                torch.autograd.grad(loss, xg, None if grad_out is None else grad_out.to(loss))

        def f():
            with torch.no_grad(), ctx():
                loss_fn(x)

        return f if forward else fb

    def fused(v):
        return fused_xent.cross_entropy(v, t, impl="auto", **kw)

    return {
        "torch": make(lambda v: F.cross_entropy(v, t, **kw)),
        "auto": make(fused),
        "rows": make(fused, rows_only),
    }


def measure(fns: dict, rounds: int, per_round: float) -> dict:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (torch's default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="", help="cases whose name holds this string")
    parser.add_argument("--rows", action="store_true", help="also time cpu.py for every size")
    parser.add_argument("--forward", action="store_true", help="the forward alone (no_grad)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a ratio > {LIMIT}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    clock = "thread CPU time" if threads == 1 else "wall time"
    names = ["torch", "auto"] + (["rows"] if args.rows else [])
    mode = "forward" if args.forward else "forward+backward"
    print(f"torch {torch.__version__}, {threads} thread(s), {mode}; us, lowest round median of "
          f"{clock}")  # fmt: skip
    print(f"{'case':<26}" + "".join(f"{n:>9}" for n in names) + f"{'auto/torch':>11}")
    worst = 0.0
    for dtype, n, c in SHAPES:
        for opt in OPTIONS:
            name = f"{str(dtype)[6:]} {n}x{c} {opt}"
            if args.only not in name:
                continue
            fns = steps(*case(dtype, n, c, opt), args.forward)
            r = measure({k: fns[k] for k in names}, args.rounds, 0.15)
            ratio = r["auto"] / r["torch"]
            worst = max(worst, ratio)
            flag = "  >" if ratio > LIMIT else ""
            cells = "".join(f"{r[k]:>9.0f}" for k in names)
            print(f"{name:<26}{cells}{ratio:>11.2f}{flag}", flush=True)
    print(f"worst auto/torch: {worst:.2f}")
    return 1 if args.check and worst > LIMIT else 0


if __name__ == "__main__":
    sys.exit(main())
