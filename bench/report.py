"""One benchmark run of fused_xent and its peers: markdown table, JSON and a plot.

    python bench/report.py [--quick] [--out DIR] [--device auto|cpu|cuda] [--no-matplotlib]

First the card's copy bandwidth (a 2 GiB fp32 device-to-device copy, bytes read + written), then
for every case and implementation (``benchlib.CUDA_CASES``, ``benchlib.IMPLS``):

* median ms: ``triton.testing.do_bench`` on CUDA, a synchronised host clock elsewhere, with the
  inputs rotated among several randn copies of the logits (``benchlib.Rotation``);
* GB/s counting one read of the logits and one write of the gradient (one read for forward
  only), and that as a % of the copy bandwidth (= floor / measured);
* peak extra memory: ``torch.cuda.max_memory_allocated`` during one step beyond what was
  allocated before it (the inputs), reset before each;
* relative error (norm-wise) of the loss and the gradient against a float64 computation on the
  same logits.

The first fused_xent variant is timed again after all the peers, so the table shows the noise.
Writes report.md (also printed), report.json and report.png to --out (default bench/out/).

``--quick``: the CPU smoke run, tiny shapes, fused_xent's reference path against torch eager,
a few ms of timing each; finishes in seconds and still writes all three files.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import benchlib
import pngplot
import torch
from benchlib import FWD, FWD_BWD, Case

import fused_xent

HERE = Path(__file__).resolve().parent
GB = 1e9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Run metadata
# --------------------------------------------------------------------------------------------


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except Exception:
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def metadata(device: torch.device, quick: bool) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        n = torch.get_num_threads()
        name = f"CPU {cpu} ({n} thread{'s' if n > 1 else ''})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fused_xent": fused_xent.__version__,
        "git": _git_rev(),
        "liger_kernel": benchlib.liger_version(),
        "python": platform.python_version(),
        "quick": quick,
        "timer": (
            "triton.testing.do_bench, median, "
            + ("warmup 5 ms, rep 20 ms" if quick else "warmup 25 ms, rep 100 ms")
            if device.type == "cuda"
            else "host perf_counter after synchronisation, median"
        ),
    }


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def peak_extra_bytes(step, x, t, device: torch.device) -> int | None:
    """Peak allocated during one step beyond what was allocated before it (inputs included)."""
    if device.type != "cuda":
        return None
    benchlib.sync(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step(x, t)
    benchlib.sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


def float64_errors(x, t, loss, dx) -> tuple[float, float | None]:
    """Relative error of ``loss`` (mean) and ``dx`` (N, C) against float64, norm-wise.

    The float64 reference is built a block of rows at a time, so the full-size cases need no
    (N, C) float64 buffer: loss = mean(lse - x[y]); dx = (softmax(x) - onehot(y)) / N.
    """
    n_rows, n_cols = x.shape
    x, loss = x.detach(), loss.detach()
    dx = None if dx is None else dx.detach()  # an in-place gradient is the leaf itself
    rows = max(1, (1 << 25) // n_cols)
    loss_sum, num, den = 0.0, 0.0, 0.0
    for r0 in range(0, n_rows, rows):
        x64 = x[r0 : r0 + rows].to(torch.float64)
        t_blk = t[r0 : r0 + rows]
        lse = torch.logsumexp(x64, dim=1)
        loss_sum += float((lse - x64.gather(1, t_blk[:, None]).squeeze(1)).sum())
        if dx is not None:
            ref = torch.exp(x64.sub_(lse[:, None]))
            ref.scatter_add_(1, t_blk[:, None], torch.full_like(lse[:, None], -1.0))
            ref.div_(n_rows)
            diff = dx[r0 : r0 + rows].to(torch.float64).sub_(ref)
            num += float(diff.square().sum())
            den += float(ref.square().sum())
            del ref, diff
        del x64
    loss_err = _rel(float(loss.double()), loss_sum / n_rows)
    grad_err = (num**0.5) / (den**0.5) if dx is not None else None
    return loss_err, grad_err


def run_case(
    case: Case, device: torch.device, quick: bool, copy_bw: float, only: set[str] | None = None
) -> list[dict]:
    impls = [
        i
        for i in benchlib.IMPLS
        if not (case.mode == FWD and i.name == "fused_xent_inplace")
        and (only is None or i.name in only)
    ]
    primary = benchlib.primary_impl(case)
    rows, steps = [], {}
    rotation = benchlib.Rotation(case, device)

    def row(name, run, **kw):
        r = {
            "mode": case.mode,
            "dtype": case.dtype_name,
            "n_rows": case.n_rows,
            "n_cols": case.n_cols,
            "impl": name,
            "run": run,
            "bytes": case.bytes_moved,
            "floor_ms": case.bytes_moved / copy_bw * 1e3,
            "ms": None,
            "gbps": None,
            "pct_copy": None,
            "peak_extra_bytes": None,
            "loss_rel_err": None,
            "grad_rel_err": None,
            "first_call_s": None,
            "input_copies": len(rotation.bufs),
            "skipped": None,
            "error": None,
        }
        r.update(kw)
        rows.append(r)
        return r

    # Timing + memory, on rotated buffers.
    order = [(i, 1) for i in impls]
    if any(i.name == primary for i in impls):
        order.append((benchlib.IMPLS_BY_NAME[primary], 2))
    for impl, run in order:
        reason = impl.skip_reason(case, device)
        if reason:
            if run == 1:
                row(impl.name, run, skipped=reason)
            continue
        r = row(impl.name, run)
        try:
            if impl.name not in steps:
                steps[impl.name] = benchlib.make_step(impl.loss_fn(case, device), case.mode)
            step = steps[impl.name]
            t0 = time.perf_counter()
            step(*rotation.next())  # Triton JIT / torch.compile happen here, untimed
            benchlib.sync(device)
            r["first_call_s"] = time.perf_counter() - t0
            ms = benchlib.time_ms(lambda s=step: s(*rotation.next()), device, quick=quick)
            r.update(ms=ms, gbps=benchlib.gbps(case.bytes_moved, ms))
            r["pct_copy"] = 100 * case.bytes_moved / (ms * 1e-3) / copy_bw
            if run == 1:
                r["peak_extra_bytes"] = peak_extra_bytes(step, *rotation.next(), device)
            log(f"  {impl.name:<20} run {run}: {ms:9.4f} ms  {r['pct_copy']:6.1f}% of copy")
        except Exception as exc:  # one failing peer must not lose the rest of the run
            r["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"  {impl.name:<20} run {run}: FAILED {r['error']}")
            log(traceback.format_exc())
    rotation.release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Accuracy: every implementation on a fresh copy of the same logits, against float64.
    x, t = benchlib.make_inputs(case, device, seed=0)
    for r in rows:
        if r["run"] != 1 or r["ms"] is None:
            continue
        try:
            xi = x.clone().requires_grad_(case.mode == FWD_BWD)
            loss, dx = steps[r["impl"]](xi, t)
            r["loss_rel_err"], r["grad_rel_err"] = float64_errors(x, t, loss, dx)
            del xi, loss, dx
        except Exception as exc:
            r["error"] = f"accuracy: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"  {r['impl']:<20} accuracy FAILED {r['error']}")
    del x, t, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def noise(rows: list[dict]) -> list[dict]:
    """The primary fused_xent variant's two timings per case."""
    out = []
    by_key = {}
    for r in rows:
        by_key.setdefault((r["mode"], r["dtype"], r["n_rows"], r["n_cols"], r["impl"]), {})[
            r["run"]
        ] = r
    for key, runs in by_key.items():
        if 1 in runs and 2 in runs and runs[1]["ms"] and runs[2]["ms"]:
            ms1, ms2 = runs[1]["ms"], runs[2]["ms"]
            out.append(
                {
                    "mode": key[0],
                    "dtype": key[1],
                    "n_rows": key[2],
                    "n_cols": key[3],
                    "impl": key[4],
                    "ms": [ms1, ms2],
                    "spread_pct": 100 * abs(ms2 - ms1) / min(ms1, ms2),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

_MODE_TITLE = {
    FWD_BWD: "Forward + backward of a mean loss (floor: read logits + write gradient)",
    FWD: "Forward only, under no_grad (floor: read logits once)",
}


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:g} MiB"


def _g(v: float) -> str:
    """Three significant figures or whole numbers: 2410, 54.3, 0.912."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def markdown(meta: dict, rows: list[dict], noise_rows: list[dict]) -> str:
    cb = meta["copy_bandwidth"]
    lines = [
        "# fused_xent benchmark report",
        "",
        f"{meta['date']} | {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"fused_xent {meta['fused_xent']} ({meta['git']}) | "
        f"Liger-Kernel {meta['liger_kernel'] or 'not importable'}"
        + (" | **--quick smoke run**" if meta["quick"] else ""),
        "",
        f"- Copy bandwidth, this run: **{cb['gbps']:.0f} GB/s** "
        f"({_size(cb['bytes'])} fp32 device-to-device copy, read + write bytes counted).",
        f"- Timing: {meta['timer']}; the inputs rotate among 2-8 distinct randn copies of the "
        "logits (1 GiB in all where 8 copies allow; count per case in report.json).",
        "- Bytes: forward + backward = one read of the logits + one write of the gradient; "
        "forward only = one read. floor = bytes / copy bandwidth; % = floor / ms.",
        "- +GB = peak memory allocated during one step beyond the inputs (CUDA only). Errors are "
        "norm-wise, relative to float64 on the same logits. The gradient is taken with "
        "torch.autograd.grad.",
        "- Implementations: "
        + "; ".join(f"**{i.name}** = {i.note}" for i in benchlib.IMPLS)
        + ". On the CPU fused_xent runs its reference path (impl='reference').",
        "",
    ]
    for mode in (FWD_BWD, FWD):
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        lines += [
            f"## {_MODE_TITLE[mode]}",
            "",
            "| logits | floor ms | implementation | ms | GB/s | % of copy | +GB "
            "| loss rel err | grad rel err |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mode_rows:
            name = r["impl"] + (" (again)" if r["run"] == 2 else "")
            label = f"{r['dtype']} {r['n_rows']} x {r['n_cols']}"
            if r["skipped"] or r["error"]:
                why = r["skipped"] or f"error: {r['error']}"
                lines.append(f"| {label} | | {name} | {why} | | | | | |")
                continue
            mem = r["peak_extra_bytes"]
            lines.append(
                f"| {label} | {r['floor_ms']:.3f} | {name} | {r['ms']:.3f} | {_g(r['gbps'])} "
                f"| {_g(r['pct_copy'])}% | {_f(None if mem is None else mem / GB, '.2f')} "
                f"| {_f(r['loss_rel_err'], '.1e')} | {_f(r['grad_rel_err'], '.1e')} |"
            )
        lines.append("")
    if noise_rows:
        lines.append(
            "Noise (same implementation timed first and last in its case): "
            + "; ".join(
                f"{n['dtype']} {n['n_rows']}x{n['n_cols']} {n['mode']} "
                f"{n['ms'][0]:.3f} / {n['ms'][1]:.3f} ms ({n['spread_pct']:.1f}%)"
                for n in noise_rows
            )
            + "."
        )
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, meta: dict, rows: list[dict], use_matplotlib: bool) -> str:
    """% of copy bandwidth by vocabulary size, one line per implementation.

    The fwd+bwd cases of one dtype (bf16 where present); forward only if no fwd+bwd case ran.
    """
    done = [r for r in rows if r["run"] == 1 and r["ms"] is not None]
    mode = FWD_BWD if any(r["mode"] == FWD_BWD for r in done) else FWD
    done = [r for r in done if r["mode"] == mode]
    dtypes = [r["dtype"] for r in done]
    dtype = "bf16" if "bf16" in dtypes or not dtypes else dtypes[0]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in done:
        if r["dtype"] == dtype:
            series.setdefault(r["impl"], []).append((float(r["n_cols"]), r["pct_copy"]))
    what = "forward+backward" if mode == FWD_BWD else "forward only"
    return pngplot.plot(
        str(path),
        series,
        title=f"{dtype} {what}: % of copy bandwidth - {meta['device']}",
        xlabel="vocabulary size C (log scale)",
        ylabel="% of copy bandwidth",
        hline=100.0,
        use_matplotlib=use_matplotlib,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, seconds")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output directory")
    ap.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cpu with --quick, else cuda when available",
    )
    ap.add_argument(
        "--impls",
        help="comma-separated subset of: " + ",".join(i.name for i in benchlib.IMPLS),
    )
    ap.add_argument(
        "--cases",
        help="comma-separated substrings of case ids to keep, e.g. fwd+bwd-bf16-8192x128256",
    )
    ap.add_argument(
        "--no-matplotlib", action="store_true", help="draw the PNG with the built-in rasterizer"
    )
    args = ap.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cpu") if args.quick else benchlib.default_device()
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    if device.type == "cpu" and not args.quick:
        log("no CUDA device: running the CPU smoke cases (as --quick, with longer timing)")
    cases = benchlib.cases_for(device, args.quick)
    if args.cases:
        keep = args.cases.split(",")
        cases = [c for c in cases if any(k in c.id for k in keep)]
    only = None
    if args.impls:
        only = set(args.impls.split(","))
        unknown = only - set(benchlib.IMPLS_BY_NAME)
        if unknown:
            ap.error(f"unknown --impls {sorted(unknown)}")
    if not cases:
        ap.error("no case left to run")
    benchlib.cpu_threads(device)
    torch.manual_seed(0)

    meta = metadata(device, args.quick)
    bw, nbytes = benchlib.copy_bandwidth(device, quick=args.quick)
    meta["copy_bandwidth"] = {"gbps": bw / GB, "bytes": nbytes, "counted": "read + write"}
    log(f"{meta['device']}: copy bandwidth {bw / GB:.0f} GB/s")

    rows = []
    for case in cases:
        log(f"{case.mode} {case.label}: floor {case.bytes_moved / bw * 1e3:.4f} ms")
        rows += run_case(case, device, args.quick, bw, only)
    noise_rows = noise(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(meta, rows, noise_rows)
    print(table)
    (args.out / "report.md").write_text(table + "\n")
    backend = plot(args.out / "report.png", meta, rows, not args.no_matplotlib)
    meta["plot_backend"] = backend
    doc = {"meta": meta, "cases": [c.id for c in cases], "results": rows, "noise": noise_rows}
    (args.out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.out / 'report.md'}, report.json, report.png (plot: {backend})")

    # A broken fused_xent is a failed run; a broken peer is only a note in the table.
    failed = [r for r in rows if r["error"] and r["impl"].startswith("fused_xent")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
