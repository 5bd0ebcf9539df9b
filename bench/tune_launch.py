"""The launch table (``kernels/xent.py``'s ``_launch_config``: BLOCK and ``num_warps`` by row
length and dtype) measured against its neighbours, for the short and medium rows where it was
chosen by counting, not by timing.

For each shape, forward + backward of a bf16 "mean" loss (``fused_xent.cross_entropy``, the
plain route, as a training loop calls it) under the table's own choice and under each candidate:
rows held whole (BLOCK the row rounded up to a power of two) or in two passes of half that, and
8 to 64 logits a thread. Each candidate is forced for that shape alone (``_launch_config``
replaced, as the tests force small blocks), checked against float64 first
(``benchlib.check_plain_step``), then timed (``triton.testing.do_bench``, median) as a fraction of
one read + one write of the logits at the copy bandwidth measured beside it. Candidates go round
the shapes (every shape's first before any shape's second), the table's own choice first, each
line printed (and the JSON rewritten) as it comes; ``--budget`` stops starting new ones after
the table's own choices, so a short device lease still leaves every shape's baseline, with the
GPU time of each kernel its step launches (the profiler's: the prologue, the forward, the
backward). A candidate that fails to compile or launch is recorded with its error and the rest
go on (a wrong number fails the run, and so does an error under the table's own choice). The
end is a summary: per shape the table's choice, the fastest, and by how much.

    python bench/tune_launch.py [--dry] [--budget SECONDS] [--out FILE.json]

``--dry``: small shapes under Triton's interpreter (set here), blocks shrunk so that both the
whole-row and the two-pass kernels run: a check that the script runs, no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

START = time.monotonic()  # (--budget counts from here: imports and CUDA start-up included)
DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import benchlib  # noqa: E402
import torch  # noqa: E402
from fused_xent.kernels import xent  # noqa: E402

# The short and medium rows (#22), and the row lengths between them.
SHAPES = [(32768, 2048), (16384, 4096), (16384, 8192), (8192, 32000)]
DRY_SHAPES = [(5, 100), (3, 300)]
PER_THREAD = (32, 16, 64, 8)  # logits a thread, in the order tried after the table's choice


def candidates(n_cols: int, dtype: torch.dtype, long_block: int,
               per_thread: tuple = PER_THREAD) -> list[tuple[int, int]]:  # fmt: skip
    """(BLOCK, num_warps) to try for rows of ``n_cols``: the table's choice first; then rows held
    whole (BLOCK the row rounded up to a power of two, at most ``long_block``) and in two passes
    (half that block), or for longer rows blocks of half, one and two ``long_block``; each with
    ``per_thread`` logits a thread (1 to 16 warps)."""
    whole = min(max(1 << max(n_cols - 1, 0).bit_length(), 32), long_block)
    blocks = (whole, whole // 2) if n_cols <= long_block else (long_block // 2, long_block,
                                                                 2 * long_block)  # fmt: skip
    out = [xent._launch_config(n_cols, dtype)]
    for logits in per_thread:
        for block in blocks:
            warps = block // (32 * logits)
            if 1 <= warps <= 16 and block >= 32 and (block, warps) not in out:
                out.append((block, warps))
    return out


def kernel_times(step, repeat: int = 5) -> dict[str, float]:
    """Microseconds of GPU time per step of each kernel ``step()`` launches (the prologue, the
    forward, the backward, torch's own), from the profiler's CUDA activity over ``repeat``
    steps after one warm-up."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us:
            times[event.key[:60]] = round(us / repeat, 2)
    return times


def _forced(real, shape, config):
    """``_launch_config`` with ``config`` for rows of ``shape`` (n_cols, dtype) alone."""

    def launch_config(n_cols, dtype):
        return config if (n_cols, dtype) == shape else real(n_cols, dtype)

    return launch_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="small shapes under the interpreter")
    p.add_argument("--budget", type=float, default=None, help="seconds; then no new candidate")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = "cpu" if args.dry else "cuda"
    dtype = torch.bfloat16
    shapes = DRY_SHAPES if args.dry else SHAPES
    long_block = 128 if args.dry else xent._LONG_ROW_BLOCK
    gen = torch.Generator(device=device).manual_seed(0)
    inputs, queues = {}, {}
    for n, c in shapes:
        x = (torch.randn(n, c, generator=gen, device=device) * 3).to(dtype)
        inputs[n, c] = x, torch.randint(0, c, (n,), generator=gen, device=device)
        queues[n, c] = candidates(c, dtype, long_block, (2, 1) if args.dry else PER_THREAD)
    real = xent._launch_config
    results, stopped = [], False

    def save(summary=()):
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name() if not args.dry else "cpu",
                               triton=xent.triton.__version__, results=results,
                               summary=list(summary)), f, indent=1)  # fmt: skip

    try:
        for i in range(max(len(q) for q in queues.values())):
            for (n, c), queue in queues.items():
                if i >= len(queue):
                    continue
                if i and args.budget is not None and time.monotonic() - START > args.budget:
                    stopped = True
                    break
                block, warps = queue[i]
                xent._launch_config = _forced(real, (c, dtype), (block, warps))
                x, t = inputs[n, c]
                row = dict(n=n, c=c, dtype=str(dtype), block=block, num_warps=warps, table=i == 0)
                try:
                    loss, grad = benchlib.plain_step(x, t)
                    errors = benchlib.check_plain_step(x, t, loss, grad)
                    row.update(loss_err=errors[0], grad_err=errors[1])
                    del loss, grad
                    if not args.dry:
                        row.update(benchlib.time_vs_copy(x, lambda: benchlib.plain_step(x, t)))  # noqa: B023
                except Exception as exc:  # (out of resources, a compile error: its own row)
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                if i == 0 and not args.dry and "error" not in row:
                    try:  # (where the table's step spends its GPU time, kernel by kernel)
                        row["kernel_us"] = kernel_times(lambda: benchlib.plain_step(x, t))  # noqa: B023
                    except Exception as exc:
                        row["kernel_us"] = f"{type(exc).__name__}: {exc}"[:200]
                results.append(row)
                print(json.dumps(row), flush=True)
                save()
            if stopped:
                print(f"tune_launch: --budget {args.budget:g} s spent, later candidates skipped")
                break
    finally:
        xent._launch_config = real
    # A wrong number fails the run, and so does an error under the table's own choice; another
    # candidate's error (Triton out of resources) only leaves it out.
    bad = [r for r in results if ("error" in r and r["table"])
           or ("error" not in r and (r["loss_err"] > 1e-5 or r["grad_err"] > 1e-2))]  # fmt: skip
    for r in results:
        if r in bad or "error" in r:
            print("tune_launch:", "FAILED" if r in bad else "left out", r)
    summary = []
    for n, c in shapes:
        rows = [r for r in results
                if (r["n"], r["c"]) == (n, c) and "ms" in r and r not in bad]  # fmt: skip
        if not rows:
            continue
        table = next((r for r in rows if r["table"]), None)
        best = min(rows, key=lambda r: r["ms"])
        summary.append(dict(n=n, c=c, table=table, best=best, tried=len(rows)))
        if table is not None:
            print(f"{n} x {c} bf16: table BLOCK {table['block']} x {table['num_warps']} warps "
                  f"{table['ms']:.3f} ms ({table['of_floor']:.0%}); fastest of {len(rows)} "
                  f"BLOCK {best['block']} x {best['num_warps']} warps {best['ms']:.3f} ms "
                  f"({best['of_floor']:.0%}), {table['ms'] / best['ms']:.2f}x")  # fmt: skip
    save(summary)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
