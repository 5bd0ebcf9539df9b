"""One benchmark run of fused_xent and its peers: markdown tables, JSON and a plot.

    python bench/report.py [--quick] [--out DIR] [--device auto|cpu|cuda] [--no-plot]
                           [--sections xent,rl,linear,distill] [--impls A,B] [--cases ID,ID]

Section "xent", the cross-entropy on given logits: first the card's copy bandwidth (a 2 GiB fp32
device-to-device copy, bytes read + written), then for every case and implementation
(``benchlib.CUDA_CASES``, ``benchlib.IMPLS``):

* median ms: ``triton.testing.do_bench`` on CUDA, a synchronised host clock elsewhere, with the
  inputs rotated among several randn copies of the logits (``benchlib.Rotation``);
* GB/s counting one read of the logits and one write of the gradient (one read for forward
  only), and that as a % of the copy bandwidth (= floor / measured);
* peak extra memory: ``torch.cuda.max_memory_allocated`` during one step beyond what was
  allocated before it (the inputs), reset before each;
* relative error (norm-wise) of the loss and the gradient against a float64 computation on the
  same logits.

Section "rl", the reinforcement-learning step (``benchlib.RL_CUDA_CASES``, ``benchlib.RL_IMPLS``):
``token_logprobs(x, t, return_entropy=True)`` against the trainers' eager recipe
(``benchlib.rl_eager``: float32 log-softmax, gather, entropy from the probabilities) and its
torch.compile, forward + backward with random incoming gradients on log p and on the entropy; the
same four measurements as "xent", the bytes being one read of the logits in the forward and one
read + one write in the backward, and the errors those of log p, the entropy and the gradient.

Section "linear", the fused linear + cross-entropy (``benchlib.LINEAR_CUDA_CASES``,
``benchlib.LINEAR_IMPLS``): first the bf16 matrix product rate (an 8192^3 ``torch.mm``, 2 n^3
flops), then the same four measurements of forward + backward of a mean loss with the gradients of
the hidden states and the weight: ms (do_bench over 500 ms, the hidden states rotated, one shared
weight), % of the matrix floor (6 N D V flops at that rate), peak extra memory (the returned
gradients included), and the relative errors of the loss, d_hidden and d_weight against float64
(``linear_float64_reference``: plain torch ops, a block of rows at a time, full size). The peers
include torch's own ``F.linear_cross_entropy`` wherever the installed torch has it (2.13 on):
``torch_lce`` with ``options=None`` (its unchunked reference) and ``torch_lce_chunked`` with
``options=LinearCrossEntropyOptions()`` (its chunked path, default policy).

Section "distill", knowledge distillation on given logits (``benchlib.DISTILL_CUDA_CASES``: bf16
8192 x 128256 at beta 0, the forward KL, and 0.5, the generalized JSD): forward + backward of a
mean loss with the student's gradient, fused_xent's ``distillation_loss`` against the float32 eager
recipe (TRL's ``generalized_jsd_loss``: both log-softmaxes in float32, ``kl_div``): ms, GB/s
counting one read of each set of logits and one write of the gradient, % of the copy bandwidth,
peak extra memory, and the errors of the loss and the gradient against float64 (a block of rows
at a time). Then its linear form (``benchlib.LINEAR_DISTILL_CUDA_CASES``: bf16 8192 tokens, the
student's head 128256 x 4096, the teacher's 128256 x 5120, the same two betas), with d_hidden and
d_weight of the student: ``linear_distillation_loss`` against the unfused recipe (both heads'
logits by ``F.linear``, then the eager recipe) and Liger-Kernel's fused linear JSD where it
imports (skipped with the reason otherwise); ms, % of the larger of a flops floor and a bytes floor
(``benchlib.LinearDistillCase``), peak extra memory, and the errors of the loss, d_hidden and
d_weight against float64 (``linear_distill_float64_reference``, full size, a block of rows at a
time).

In each case the first fused_xent variant is timed again after all the peers, so the table shows
the noise. Writes report.md (also printed), report.json and, when the xent section ran,
report.png (% of copy bandwidth by vocabulary size) to --out (default bench/out/). The plot needs
matplotlib (``pip install -e .[bench]``); without it, or with ``--no-plot``, the run says the plot
was skipped and writes the other two. While it runs, partial.json holds the cases done so far (a
run cut short keeps them); it is removed once report.json is written.

``--sections``: run only some sections (default ``xent,rl,linear,distill``), for a short device
slot.
``--impls`` / ``--cases`` keep the named implementations / the cases whose id contains one of the
given strings, in either section.

``--quick``: the CPU smoke run, tiny shapes, fused_xent's reference path against torch eager,
a few ms of timing each (the linear case: ~0.1 s a step, bf16 products are slow on a CPU; the RL
and distill cases run fused_xent with impl="auto", its CPU path);
finishes in seconds and still writes every file.
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
import torch
from benchlib import FWD, FWD_BWD, Case, DistillCase, LinearCase, LinearDistillCase

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
        "cut_cross_entropy": benchlib.cce_version(),
        "python": platform.python_version(),
        "quick": quick,
        "timer": _timer(device, quick, 100),
        "timer_linear": _timer(device, quick, benchlib.LINEAR_REP_MS),
    }


def _timer(device: torch.device, quick: bool, rep_ms: int) -> str:
    if device.type != "cuda":
        return "host perf_counter after synchronisation, median"
    return "triton.testing.do_bench, median, " + (
        "warmup 5 ms, rep 20 ms" if quick else f"warmup 25 ms, rep {rep_ms} ms"
    )


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


# Float64 blocks of at most this many elements (256 MiB) in the accuracy checks: at the GPU
# shapes the full (N, V) float64 logits would take 4-17 GB.
BLOCK_ELEMS = 1 << 25


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_extra_bytes(step, *inputs, device: torch.device) -> int | None:
    """Peak allocated during one step beyond what was allocated before it (inputs included).

    The outputs are still alive when the peak is read: the gradients the step returns count.
    """
    if device.type != "cuda":
        return None
    benchlib.sync(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step(*inputs)
    benchlib.sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


def _rel_norm(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| for float64 ``ref``, a block of rows at a time."""
    rows = max(1, BLOCK_ELEMS // max(ref[0].numel(), 1))
    num = den = 0.0
    for r0 in range(0, ref.shape[0], rows):
        blk = ref[r0 : r0 + rows]
        num += float(a.detach()[r0 : r0 + rows].to(torch.float64).sub_(blk).square().sum())
        den += float(blk.square().sum())
    return num**0.5 / den**0.5 if den else num**0.5


def _xent64_rows(z64: torch.Tensor, t: torch.Tensor, n_rows: int) -> tuple[float, torch.Tensor]:
    """Summed loss of float64 logit rows, and their gradient of the mean loss over ``n_rows``.

    loss = lse - z[y]; dz = (softmax(z) - onehot(y)) / n_rows, written over ``z64``.
    """
    lse = torch.logsumexp(z64, dim=1)
    loss_sum = float((lse - z64.gather(1, t[:, None]).squeeze(1)).sum())
    dz = torch.exp(z64.sub_(lse[:, None]))
    dz.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -1.0))
    return loss_sum, dz.div_(n_rows)


def float64_errors(x, t, loss, dx) -> tuple[float, float | None]:
    """Relative error of ``loss`` (mean) and ``dx`` (N, C) against float64, norm-wise.

    The float64 reference is built a block of rows at a time, so the full-size cases need no
    (N, C) float64 buffer: loss = mean(lse - x[y]); dx = (softmax(x) - onehot(y)) / N.
    """
    n_rows, n_cols = x.shape
    x, loss = x.detach(), loss.detach()
    dx = None if dx is None else dx.detach()  # an in-place gradient is the leaf itself
    rows = max(1, BLOCK_ELEMS // n_cols)
    loss_sum, num, den = 0.0, 0.0, 0.0
    for r0 in range(0, n_rows, rows):
        blk_sum, ref = _xent64_rows(x[r0 : r0 + rows].to(torch.float64), t[r0 : r0 + rows], n_rows)
        loss_sum += blk_sum
        if dx is not None:
            diff = dx[r0 : r0 + rows].to(torch.float64).sub_(ref)
            num += float(diff.square().sum())
            den += float(ref.square().sum())
            del diff
        del ref
    loss_err = _rel(float(loss.double()), loss_sum / n_rows)
    grad_err = (num**0.5) / (den**0.5) if dx is not None else None
    return loss_err, grad_err


def rl_float64_errors(x, t, a, b, logp, entropy, dx) -> dict:
    """Relative errors (norm-wise) of log p, the entropy and dx (N, C) against float64.

    A block of rows at a time, as ``float64_errors``: with z = x / T, log p = z - lse(z),
    entropy = -sum(p log p), and the gradient of sum(a logp + b entropy):
    dz = a (onehot(t) - p) - b p (log p + entropy), dx = dz / T.
    """
    n_rows, n_cols = x.shape
    x, logp, entropy, dx = (v.detach() for v in (x, logp, entropy, dx))
    logp64 = torch.empty(n_rows, dtype=torch.float64, device=x.device)
    ent64 = torch.empty_like(logp64)
    rows = max(1, BLOCK_ELEMS // n_cols)
    num = den = 0.0
    for r0 in range(0, n_rows, rows):
        s, tt = slice(r0, r0 + rows), t[r0 : r0 + rows, None]
        lp = x[s].to(torch.float64).div_(benchlib.RL_TEMPERATURE)
        lp = lp.sub_(torch.logsumexp(lp, dim=1, keepdim=True))
        logp64[s] = lp.gather(1, tt).squeeze(1)
        p = lp.exp()
        ent64[s] = h = -(p * lp).sum(1)
        dz = p.mul_(lp.add_(h[:, None]).mul_(-b[s, None]).sub_(a[s, None]))
        dz.scatter_add_(1, tt, a[s, None].to(torch.float64)).div_(benchlib.RL_TEMPERATURE)
        num += float(dx[s].to(torch.float64).sub_(dz).square().sum())
        den += float(dz.square().sum())
        del lp, p, dz
    return {
        "logp_rel_err": _rel_norm(logp, logp64),
        "entropy_rel_err": _rel_norm(entropy, ent64),
        "grad_rel_err": num**0.5 / den**0.5 if den else num**0.5,
    }


def linear_float64_reference(h, w, t) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean loss, d_hidden (N, D) and d_weight (V, D) of cross_entropy(h @ w.T, t) in float64.

    Plain torch ops on float64 copies (not fused_xent, which is under test), a block of rows at
    a time: the products, then the same lse / softmax - onehot as ``float64_errors``. At the GPU
    shapes this holds ~9 GB (the float64 weight and d_weight) and takes ~2.6e13 float64 flops.
    """
    n_rows = h.shape[0]
    w64 = w.detach().to(torch.float64)
    d_h = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    d_w = torch.zeros_like(w64)
    rows = max(1, BLOCK_ELEMS // w.shape[0])
    loss_sum = 0.0
    for r0 in range(0, n_rows, rows):
        h64 = h.detach()[r0 : r0 + rows].to(torch.float64)
        blk_sum, dz = _xent64_rows(h64 @ w64.T, t[r0 : r0 + rows], n_rows)
        loss_sum += blk_sum
        torch.mm(dz, w64, out=d_h[r0 : r0 + rows])
        d_w.addmm_(dz.T, h64)
        del h64, dz
    return loss_sum / n_rows, d_h, d_w


def time_impls(
    case, impls, primary: str, rotation, new_row, on_timed, device, quick, n_grad=1, rep_ms=None
):
    """Time each implementation on rotated inputs, then ``primary`` again; one row per run.

    ``new_row(name, run)`` gives the section's row with every measurement None; ``on_timed(row)``
    fills the section's rates from ``row["ms"]`` and returns the tail of the log line. Returns the
    rows and the steps, for the accuracy check. ``n_grad`` goes to ``make_step``, ``rep_ms`` to
    ``time_ms``.
    """
    rows, steps = [], {}
    order = [(i, 1) for i in impls] + [(i, 2) for i in impls if i.name == primary]
    for impl, run in order:
        reason = impl.skip_reason(case, device)
        if reason:
            if run == 1:
                rows.append({**new_row(impl.name, run), "skipped": reason})
            continue
        r = new_row(impl.name, run)
        rows.append(r)
        try:
            if impl.name not in steps:
                loss_fn = impl.loss_fn(case, device)
                steps[impl.name] = benchlib.make_step(loss_fn, case.mode, n_grad)
            step = steps[impl.name]
            t0 = time.perf_counter()
            step(*rotation.next())  # Triton JIT / torch.compile happen here, untimed
            benchlib.sync(device)
            r["first_call_s"] = time.perf_counter() - t0
            r["ms"] = benchlib.time_ms(
                lambda s=step: s(*rotation.next()), device, quick=quick, rep_ms=rep_ms
            )
            tail = on_timed(r)
            if run == 1:
                r["peak_extra_bytes"] = peak_extra_bytes(step, *rotation.next(), device=device)
            log(f"  {impl.name:<20} run {run}: {r['ms']:9.4f} ms  {tail}")
        except Exception as exc:  # one failing peer must not lose the rest of the run
            r["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"  {impl.name:<20} run {run}: FAILED {r['error']}")
            log(traceback.format_exc())
    return rows, steps


def check_accuracy(rows: list[dict], steps: dict, inputs, errors) -> None:
    """Each timed implementation once on ``inputs()``; ``errors(*outputs)`` -> row fields."""
    for r in rows:
        if r["run"] != 1 or r["ms"] is None:
            continue
        try:
            out = steps[r["impl"]](*inputs())
            r.update(errors(*out))
            del out
        except Exception as exc:
            r["error"] = f"accuracy: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"  {r['impl']:<20} accuracy FAILED {r['error']}")


# The error columns of the byte-counted sections: row keys, from which the headers are made.
XENT_ERRORS = ("loss_rel_err", "grad_rel_err")
RL_ERRORS = ("logp_rel_err", "entropy_rel_err", "grad_rel_err")


def run_case(
    case: Case, device: torch.device, quick: bool, copy_bw: float, only: set[str] | None = None
) -> list[dict]:
    """A case of the "xent" section, or of the "rl" section (an ``RLCase``)."""
    rl = isinstance(case, benchlib.RLCase)
    impls = [
        i
        for i in (benchlib.RL_IMPLS if rl else benchlib.IMPLS)
        if not (case.mode == FWD and i.name == "fused_xent_inplace")
        and (only is None or i.name in only)
    ]
    rotation = (benchlib.RLRotation if rl else benchlib.Rotation)(case, device)

    def new_row(name, run):
        return {
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
            **dict.fromkeys(RL_ERRORS if rl else XENT_ERRORS),
            "first_call_s": None,
            "input_copies": len(rotation.bufs),
            "skipped": None,
            "error": None,
        }

    def on_timed(r):
        r["gbps"] = benchlib.gbps(case.bytes_moved, r["ms"])
        r["pct_copy"] = 100 * case.bytes_moved / (r["ms"] * 1e-3) / copy_bw
        return f"{r['pct_copy']:6.1f}% of copy"

    primary = benchlib.RL_PRIMARY if rl else benchlib.primary_impl(case)
    rows, steps = time_impls(case, impls, primary, rotation, new_row, on_timed, device, quick)
    rotation.release()
    free_memory(device)

    (rl_accuracy if rl else xent_accuracy)(case, device, rows, steps)
    del steps
    free_memory(device)
    return rows


def xent_accuracy(case: Case, device: torch.device, rows: list[dict], steps: dict) -> None:
    """Every implementation on a fresh copy of the same logits, against float64."""
    x, t = benchlib.make_inputs(case, device, seed=0)

    def errors(loss, dx):
        loss_err, grad_err = float64_errors(x, t, loss, dx)
        return {"loss_rel_err": loss_err, "grad_rel_err": grad_err}

    check_accuracy(rows, steps, lambda: (x.clone().requires_grad_(case.mode == FWD_BWD), t), errors)


def rl_accuracy(case: Case, device: torch.device, rows: list[dict], steps: dict) -> None:
    """Every implementation on a fresh copy of the same logits and incoming gradients."""
    x, t = benchlib.make_inputs(case, device, seed=0)
    a, b = benchlib.rl_grads(case, device)

    def errors(logp, entropy, dx):
        return rl_float64_errors(x, t, a, b, logp, entropy, dx)

    check_accuracy(rows, steps, lambda: (x.clone().requires_grad_(True), t, a, b), errors)


def _chunk_rows(case, device: torch.device, heads: int = 1) -> int | None:
    """The rows per chunk of fused_xent's row-chunk plan here (None if that helper moved)."""
    try:
        return benchlib.linear_chunk_rows(case.n_rows, case.vocab, case.dim, case.dtype, device,
                                          heads)  # fmt: skip
    except Exception:
        return None


def run_linear_case(
    case: LinearCase,
    device: torch.device,
    quick: bool,
    mm_rate: float,
    only: set[str] | None = None,
) -> list[dict]:
    impls = [i for i in benchlib.LINEAR_IMPLS if only is None or i.name in only]
    floor_ms = case.flops / mm_rate * 1e3
    chunk_rows = _chunk_rows(case, device)
    rotation = benchlib.LinearRotation(case, device)

    def new_row(name, run):
        return {
            "dtype": case.dtype_name,
            "n_rows": case.n_rows,
            "dim": case.dim,
            "vocab": case.vocab,
            "impl": name,
            "run": run,
            "flops": case.flops,
            "floor_ms": floor_ms,
            "ms": None,
            "tflops": None,
            "pct_floor": None,
            "peak_extra_bytes": None,
            "loss_rel_err": None,
            "dh_rel_err": None,
            "dw_rel_err": None,
            "first_call_s": None,
            "input_copies": len(rotation.bufs),
            "chunk_rows": chunk_rows if name == "fused_xent_rows" else None,
            "skipped": None,
            "error": None,
        }

    def on_timed(r):
        r["tflops"] = case.flops / (r["ms"] * 1e-3) / 1e12
        r["pct_floor"] = 100 * floor_ms / r["ms"]
        return f"{r['pct_floor']:6.1f}% of floor"

    rows, steps = time_impls(
        case, impls, benchlib.LINEAR_PRIMARY, rotation, new_row, on_timed, device, quick,
        n_grad=2, rep_ms=benchlib.LINEAR_REP_MS,
    )  # fmt: skip
    rotation.release()
    free_memory(device)

    if any(r["ms"] is not None for r in rows):
        linear_accuracy(case, device, rows, steps)
    del steps
    free_memory(device)
    return rows


def linear_accuracy(case: LinearCase, device: torch.device, rows: list[dict], steps: dict) -> None:
    """Every implementation on the same hidden states and weight, against float64."""
    w = benchlib.make_linear_weight(case, device)
    h, t = benchlib.make_linear_inputs(case, device, seed=0)
    loss64, dh64, dw64 = linear_float64_reference(h, w, t)

    def inputs():
        return h.clone().requires_grad_(True), w.detach().requires_grad_(True), t

    def errors(loss, dh, dw):
        return {
            "loss_rel_err": _rel(float(loss.detach().double()), loss64),
            "dh_rel_err": _rel_norm(dh, dh64),
            "dw_rel_err": _rel_norm(dw, dw64),
        }

    check_accuracy(rows, steps, inputs, errors)


def noise(rows: list[dict], fields: tuple[str, ...] = ("mode", "dtype", "n_rows", "n_cols")):
    """The primary fused_xent variant's two timings per case (``fields`` name the case)."""
    out = []
    by_key = {}
    for r in rows:
        by_key.setdefault((*(r[f] for f in fields), r["impl"]), {})[r["run"]] = r
    for key, runs in by_key.items():
        if 1 in runs and 2 in runs and runs[1]["ms"] and runs[2]["ms"]:
            ms1, ms2 = runs[1]["ms"], runs[2]["ms"]
            out.append(
                {
                    **dict(zip(fields, key[:-1], strict=True)),
                    "impl": key[-1],
                    "ms": [ms1, ms2],
                    "spread_pct": 100 * abs(ms2 - ms1) / min(ms1, ms2),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# Section "distill"
# --------------------------------------------------------------------------------------------


def distill_float64_errors(s, t, beta, loss, ds) -> tuple[float, float]:
    """Relative errors of the mean loss and of the student's gradient against float64, a block of
    rows at a time (the issue's definitions, autograd for the gradient)."""
    n_rows, n_cols = s.shape
    rows = max(1, BLOCK_ELEMS // n_cols)
    loss_sum = num = den = 0.0
    for r0 in range(0, n_rows, rows):
        s64 = s.detach()[r0 : r0 + rows].to(torch.float64).requires_grad_()
        t64 = t[r0 : r0 + rows].to(torch.float64)
        blk = benchlib.eager_distillation(s64, t64, beta) * (s64.shape[0] / n_rows)  # its share
        (ref,) = torch.autograd.grad(blk, s64)
        loss_sum += float(blk.detach())
        diff = ds.detach()[r0 : r0 + rows].to(torch.float64).sub_(ref)
        num += float(diff.square().sum())
        den += float(ref.square().sum())
        del s64, t64, ref, diff
    return _rel(float(loss.detach().double()), loss_sum), num**0.5 / den**0.5


def run_distill_case(case: DistillCase, device, quick: bool, copy_bw: float, only=None):
    impls = [i for i in benchlib.DISTILL_IMPLS if only is None or i.name in only]
    rotation = benchlib.DistillRotation(case, device)

    def new_row(name, run):
        return {
            "dtype": case.dtype_name, "n_rows": case.n_rows, "n_cols": case.n_cols,
            "beta": case.beta, "impl": name, "run": run, "bytes": case.bytes_moved,
            "floor_ms": case.bytes_moved / copy_bw * 1e3, "ms": None, "gbps": None,
            "pct_copy": None, "peak_extra_bytes": None, "loss_rel_err": None,
            "grad_rel_err": None, "first_call_s": None, "input_copies": len(rotation.bufs),
            "skipped": None, "error": None,
        }  # fmt: skip

    def on_timed(r):
        r["gbps"] = benchlib.gbps(case.bytes_moved, r["ms"])
        r["pct_copy"] = 100 * case.bytes_moved / (r["ms"] * 1e-3) / copy_bw
        return f"{r['pct_copy']:6.1f}% of copy"

    rows, steps = time_impls(
        case, impls, benchlib.DISTILL_PRIMARY, rotation, new_row, on_timed, device, quick
    )
    rotation.release()
    free_memory(device)
    s, t = benchlib.distill_inputs(case, device)

    def errors(loss, ds):
        loss_err, grad_err = distill_float64_errors(s, t, case.beta, loss, ds)
        return {"loss_rel_err": loss_err, "grad_rel_err": grad_err}

    check_accuracy(rows, steps, lambda: (s.detach().clone().requires_grad_(True), t), errors)
    del steps
    free_memory(device)
    return rows


def linear_distill_float64_reference(
    hs, ws, ht, wt, beta
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean loss, d_hidden (N, D_s) and d_weight (V, D_s) of the linear distillation in float64.

    Plain torch ops on float64 copies, a block of rows at a time, full size: both blocks of
    logits by float64 products, the loss by ``eager_distillation`` in float64 and its gradient by
    autograd, then d_hidden and d_weight by float64 products (as ``linear_float64_reference``).
    At the GPU shapes this holds ~14 GB (both float64 heads and d_weight) and takes ~3.7e13
    float64 flops.
    """
    n_rows = hs.shape[0]
    ws64, wt64 = ws.detach().to(torch.float64), wt.detach().to(torch.float64)
    d_h = torch.empty(hs.shape, dtype=torch.float64, device=hs.device)
    d_w = torch.zeros_like(ws64)
    rows = max(1, BLOCK_ELEMS // ws.shape[0])
    loss_sum = 0.0
    for r0 in range(0, n_rows, rows):
        h64 = hs.detach()[r0 : r0 + rows].to(torch.float64)
        z = (h64 @ ws64.T).requires_grad_()
        zt = ht.detach()[r0 : r0 + rows].to(torch.float64) @ wt64.T
        blk = benchlib.eager_distillation(z, zt, beta) * (z.shape[0] / n_rows)  # its share
        (dz,) = torch.autograd.grad(blk, z)
        loss_sum += float(blk.detach())
        torch.mm(dz, ws64, out=d_h[r0 : r0 + rows])
        d_w.addmm_(dz.T, h64)
        del h64, z, zt, blk, dz
    return loss_sum, d_h, d_w


def run_linear_distill_case(
    case: LinearDistillCase, device, quick: bool, copy_bw: float, mm_rate: float, only=None
) -> list[dict]:
    """The linear form's rows: the floor is the larger of the flops one (at the matrix product
    rate) and the bytes one (``LinearDistillCase.bytes_moved`` at the copy bandwidth)."""
    impls = [i for i in benchlib.LINEAR_DISTILL_IMPLS if only is None or i.name in only]
    floor_flops_ms = case.flops / mm_rate * 1e3
    floor_bytes_ms = case.bytes_moved / copy_bw * 1e3
    floor_ms = max(floor_flops_ms, floor_bytes_ms)
    chunk_rows = _chunk_rows(case, device, 2)  # both chunks of logits counted
    rotation = benchlib.LinearDistillRotation(case, device)

    def new_row(name, run):
        return {
            "dtype": case.dtype_name, "n_rows": case.n_rows, "dim": case.dim,
            "teacher_dim": case.teacher_dim, "vocab": case.vocab, "beta": case.beta,
            "impl": name, "run": run, "flops": case.flops, "bytes": case.bytes_moved,
            "floor_flops_ms": floor_flops_ms, "floor_bytes_ms": floor_bytes_ms,
            "floor_ms": floor_ms, "ms": None, "tflops": None, "pct_floor": None,
            "peak_extra_bytes": None, "loss_rel_err": None, "dh_rel_err": None,
            "dw_rel_err": None, "first_call_s": None, "input_copies": len(rotation.bufs),
            "chunk_rows": chunk_rows if name == "fused_xent_rows" else None,
            "skipped": None, "error": None,
        }  # fmt: skip

    def on_timed(r):
        r["tflops"] = case.flops / (r["ms"] * 1e-3) / 1e12
        r["pct_floor"] = 100 * floor_ms / r["ms"]
        return f"{r['pct_floor']:6.1f}% of floor"

    rows, steps = time_impls(
        case, impls, benchlib.DISTILL_PRIMARY, rotation, new_row, on_timed, device, quick,
        n_grad=2, rep_ms=benchlib.LINEAR_REP_MS,
    )  # fmt: skip
    rotation.release()
    free_memory(device)
    if any(r["ms"] is not None for r in rows):
        ws, wt = benchlib.make_linear_distill_weights(case, device)
        hs, ht = benchlib.make_linear_distill_inputs(case, device, seed=0)
        loss64, dh64, dw64 = linear_distill_float64_reference(hs, ws, ht, wt, case.beta)

        def inputs():
            return hs.clone().requires_grad_(True), ws.detach().requires_grad_(True), ht, wt

        def errors(loss, dh, dw):
            return {
                "loss_rel_err": _rel(float(loss.detach().double()), loss64),
                "dh_rel_err": _rel_norm(dh, dh64),
                "dw_rel_err": _rel_norm(dw, dw64),
            }

        check_accuracy(rows, steps, inputs, errors)
        del dh64, dw64
    del steps
    free_memory(device)
    return rows


def _linear_distill_label(r: dict) -> str:
    return (
        f"{r['dtype']} {r['n_rows']} x {r['dim']} (teacher {r['teacher_dim']}), W {r['vocab']}, "
        f"beta {r['beta']:g}"
    )


def _linear_table_rows(rows: list[dict], label_of) -> list[str]:
    """The rows of a linear-form table (cross-entropy or distillation: the same columns), then a
    blank line."""
    lines = []
    for r in rows:
        name = r["impl"] + (" (again)" if r["run"] == 2 else "")
        label = label_of(r)
        if r["skipped"] or r["error"]:
            why = r["skipped"] or f"error: {r['error']}"
            lines.append(f"| {label} | | {name} | {why} | | | | | | |")
            continue
        lines.append(
            f"| {label} | {r['floor_ms']:.3f} | {name} | {r['ms']:.3f} | {_g(r['tflops'])} "
            f"| {_g(r['pct_floor'])}% | {_gb(r['peak_extra_bytes'])} "
            f"| {_f(r['loss_rel_err'], '.1e')} | {_f(r['dh_rel_err'], '.1e')} "
            f"| {_f(r['dw_rel_err'], '.1e')} |"
        )
    return lines + [""]


def _distill_markdown(meta, rows, noise_rows, linear_rows=None, linear_noise=None) -> list[str]:
    cb, mm = meta["copy_bandwidth"], meta["matmul"]
    lines = [
        "## Knowledge distillation: forward + backward of a mean loss with the student's "
        "gradients, temperature 1",
        "",
        f"- Copy bandwidth, this run: {cb['gbps']:.0f} GB/s"
        + (f"; matrix product rate {_g(mm['tflops'])} TFLOP/s" if mm and linear_rows else "")
        + ". +GB and the errors as in the other sections (norm-wise, relative to float64 on the "
        "same inputs, a block of rows at a time).",
    ]
    if rows:
        lines += [
            "- On given logits (floor: read the student's and the teacher's logits + write the "
            "student's gradient, at the copy bandwidth): "
            + "; ".join(f"**{i.name}** = {i.note}" for i in benchlib.DISTILL_IMPLS)
            + ". The teacher's logits are randn x 2, the student's randn. On the CPU fused_xent "
            "runs impl='auto' (its CPU path: torch's softmaxes on float32 copies).",
            "",
            "| logits | floor ms | implementation | ms | GB/s | % of copy | +GB | loss rel err "
            "| grad rel err |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        name = r["impl"] + (" (again)" if r["run"] == 2 else "")
        label = f"{r['dtype']} {r['n_rows']} x {r['n_cols']}, beta {r['beta']:g}"
        if r["skipped"] or r["error"]:
            lines.append(f"| {label} | | {name} | {r['skipped'] or 'error: ' + r['error']} |||||")
            continue
        lines.append(
            f"| {label} | {r['floor_ms']:.3f} | {name} | {r['ms']:.3f} | {_g(r['gbps'])} "
            f"| {_g(r['pct_copy'])}% | {_gb(r['peak_extra_bytes'])} "
            f"| {_f(r['loss_rel_err'], '.1e')} | {_f(r['grad_rel_err'], '.1e')} |"
        )
    lines.append("")
    lines += _noise_line(noise_rows, lambda n: f"{n['dtype']} beta {n['beta']:g}")
    if not linear_rows:
        return lines
    chunks = "/".join(str(c) for c in sorted({r["chunk_rows"] for r in linear_rows
                                               if r["chunk_rows"]}))  # fmt: skip
    lines += [
        "The linear form, from both models' hidden states and heads (d_hidden and d_weight of the "
        "student):",
        "",
        f"- Timing: {meta['timer_linear']}; both models' hidden states rotate among "
        + "/".join(str(c) for c in sorted({r["input_copies"] for r in linear_rows}))
        + " distinct randn copies, the two heads shared (the student's randn / sqrt(D_s), the "
        "teacher's 2 randn / sqrt(D_t)).",
        "- Floor: the larger of 6·N·V·D_s + 2·N·V·D_t flops (the student's logits, d_hidden and "
        "d_weight, the teacher's logits) at the matrix product rate and, at the copy bandwidth, "
        "the bytes a chunked schedule moves: both heads and hidden states read once, d_hidden "
        "and d_weight written once, 7 x the bytes of each logit (each chunk of both models' "
        "logits written and read, the gradient written and read by two products); % = floor / "
        "ms. Both floors are in report.json.",
        "- Implementations: "
        + "; ".join(f"**{i.name}** = {i.note}" for i in benchlib.LINEAR_DISTILL_IMPLS)
        + ". Liger's jsd_beta is this package's beta (beta KL(P_t || M) + (1 - beta) KL(P_s || "
        "M), 0 the forward KL, 1 the reverse), its temperature divides both logits without a "
        "T^2 factor, and its loss is the token sum over the tokens not ignored (all here): the "
        "same mean. On the CPU fused_xent runs impl='auto' (the reference for the linear form)"
        + (f"; fused_xent_rows' chunk here: {chunks} rows." if chunks else "."),
        "",
        "| hidden, heads | floor ms | implementation | ms | TFLOP/s | % of floor | +GB "
        "| loss rel err | d_hidden rel err | d_weight rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _linear_table_rows(linear_rows, _linear_distill_label)
    return lines + _noise_line(linear_noise or [], _linear_distill_label)


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


def _noise_line(noise_rows: list[dict], label) -> list[str]:
    if not noise_rows:
        return []
    return [
        "Noise (same implementation timed first and last in its case): "
        + "; ".join(
            f"{label(n)} {n['ms'][0]:.3f} / {n['ms'][1]:.3f} ms ({n['spread_pct']:.1f}%)"
            for n in noise_rows
        )
        + ".",
        "",
    ]


def _gb(nbytes: int | None) -> str:
    return _f(None if nbytes is None else nbytes / GB, ".2f")


def markdown(
    meta: dict,
    rows: list[dict],
    noise_rows: list[dict],
    linear_rows: list[dict] | None = None,
    linear_noise: list[dict] | None = None,
    rl_rows: list[dict] | None = None,
    rl_noise: list[dict] | None = None,
    distill_rows: list[dict] | None = None,
    distill_noise: list[dict] | None = None,
    linear_distill_rows: list[dict] | None = None,
    linear_distill_noise: list[dict] | None = None,
) -> str:
    lines = [
        "# fused_xent benchmark report",
        "",
        f"{meta['date']} | {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"fused_xent {meta['fused_xent']} ({meta['git']}) | "
        f"Liger-Kernel {meta['liger_kernel'] or 'not importable'}"
        + (
            f" | cut-cross-entropy {meta['cut_cross_entropy'] or 'not importable'}"
            if linear_rows
            else ""
        )
        + (" | **--quick smoke run**" if meta["quick"] else ""),
        "",
    ]
    if rows:
        lines += _xent_markdown(meta, rows, noise_rows)
    if rl_rows:
        lines += _rl_markdown(meta, rl_rows, rl_noise or [])
    if linear_rows:
        lines += _linear_markdown(meta, linear_rows, linear_noise or [])
    if distill_rows or linear_distill_rows:
        lines += _distill_markdown(meta, distill_rows or [], distill_noise or [],
                                   linear_distill_rows, linear_distill_noise)  # fmt: skip
    return "\n".join(lines)


def _xent_markdown(meta: dict, rows: list[dict], noise_rows: list[dict]) -> list[str]:
    cb = meta["copy_bandwidth"]
    lines = [
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
        lines += [f"## {_MODE_TITLE[mode]}", ""] + _byte_table(mode_rows, XENT_ERRORS) + [""]
    return lines + _noise_line(
        noise_rows, lambda n: f"{n['dtype']} {n['n_rows']}x{n['n_cols']} {n['mode']}"
    )


def _byte_table(rows: list[dict], errors: tuple[str, ...]) -> list[str]:
    """The table of a byte-counted section, with one column per key of ``errors``."""
    heads = " | ".join(e.removesuffix("_rel_err").replace("_", " ") + " rel err" for e in errors)
    lines = [
        f"| logits | floor ms | implementation | ms | GB/s | % of copy | +GB | {heads} |",
        "|---" * (7 + len(errors)) + "|",
    ]
    for r in rows:
        name = r["impl"] + (" (again)" if r["run"] == 2 else "")
        label = f"{r['dtype']} {r['n_rows']} x {r['n_cols']}"
        if r["skipped"] or r["error"]:
            why = r["skipped"] or f"error: {r['error']}"
            lines.append(f"| {label} | | {name} | {why} |" + " |" * (3 + len(errors)))
            continue
        lines.append(
            f"| {label} | {r['floor_ms']:.3f} | {name} | {r['ms']:.3f} | {_g(r['gbps'])} "
            f"| {_g(r['pct_copy'])}% | {_gb(r['peak_extra_bytes'])} | "
            + " | ".join(_f(r[e], ".1e") for e in errors)
            + " |"
        )
    return lines


def _rl_markdown(meta: dict, rows: list[dict], noise_rows: list[dict]) -> list[str]:
    cb = meta["copy_bandwidth"]
    return (
        [
            "## RL step: log p of sampled tokens and the entropy, forward + backward "
            "(floor: read logits twice + write gradient)",
            "",
            f"- Copy bandwidth, this run: {cb['gbps']:.0f} GB/s; timing and inputs as the "
            "cross-entropy's, each copy of the logits with its own incoming gradients.",
            f"- Step: `logp, entropy = f(x, t)` at temperature {benchlib.RL_TEMPERATURE:g}, then "
            "`torch.autograd.grad((logp, entropy), x, (a, b))`, the gradient of "
            "`(logp * a + entropy * b).sum()`; a, b randn (N,) float32 (per-token advantages and "
            "entropy coefficients); targets uniform, none ignored.",
            "- Bytes: one read of the logits in the forward + one read and one write of the "
            "gradient in the backward (the incoming gradients arrive only in the backward, so "
            "the forward cannot write the gradient as a mean loss's does). floor = bytes / copy "
            "bandwidth; % = floor / ms.",
            "- +GB as above. Errors are norm-wise, relative to float64 on the same logits and "
            "incoming gradients (log p, entropy, d logits).",
            "- Implementations: "
            + "; ".join(f"**{i.name}** = {i.note}" for i in benchlib.RL_IMPLS)
            + ". On the CPU fused_xent runs impl='auto' (its CPU path).",
            "",
        ]
        + _byte_table(rows, RL_ERRORS)
        + [""]
        + _noise_line(noise_rows, lambda n: f"{n['dtype']} {n['n_rows']}x{n['n_cols']}")
    )


def _linear_label(r: dict) -> str:
    return f"{r['dtype']} {r['n_rows']} x {r['dim']}, W {r['vocab']} x {r['dim']}"


def _linear_markdown(meta: dict, rows: list[dict], noise_rows: list[dict]) -> list[str]:
    mm = meta["matmul"]
    copies = "/".join(str(c) for c in sorted({r["input_copies"] for r in rows}))
    chunks = "/".join(str(c) for c in sorted({r["chunk_rows"] for r in rows if r["chunk_rows"]}))
    lines = [
        "## Fused linear + cross-entropy: forward + backward of a mean loss "
        "(floor: 6·N·D·V flops at the matrix product rate)",
        "",
        f"- Matrix product rate, this run: **{_g(mm['tflops'])} TFLOP/s** ({mm['dtype']} "
        f"{mm['n']}^3 torch.mm, 2·n^3 flops, timed like the steps).",
        f"- Timing: {meta['timer_linear']}; the hidden states (N x D) rotate among {copies} "
        "distinct randn copies, each with its own targets, all with one weight (V x D), randn / "
        "sqrt(D) so that the logits are ~ N(0, 1).",
        "- Flops: three matrix products of 2·N·D·V each (logits, d_hidden, d_weight); floor = "
        "6·N·D·V / the matrix product rate; % = floor / ms (fused_xent's default recomputes the "
        "logits, four products: 75% is its own floor).",
        "- +GB = peak memory allocated during one step beyond the inputs (CUDA only), the "
        "returned d_hidden (N x D) and d_weight (V x D) included. Errors are norm-wise, relative "
        "to float64 computed with plain torch ops on the same inputs, a block of rows at a time. "
        "The gradients (hidden states and weight) are taken with torch.autograd.grad.",
        "- Implementations: "
        + "; ".join(f"**{i.name}** = {i.note}" for i in benchlib.LINEAR_IMPLS)
        + ". On the CPU fused_xent runs its reference path (impl='reference')"
        + (f". fused_xent_rows' chunk here: {chunks} rows." if chunks else "."),
        "",
        "| hidden, weight | floor ms | implementation | ms | TFLOP/s | % of floor | +GB "
        "| loss rel err | d_hidden rel err | d_weight rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _linear_table_rows(rows, _linear_label)
    return lines + _noise_line(noise_rows, _linear_label)


def plot(path: Path, meta: dict, rows: list[dict]) -> str | None:
    """% of copy bandwidth by vocabulary size, one line per implementation, drawn with matplotlib.

    The fwd+bwd cases of one dtype (bf16 where present); forward only if no fwd+bwd case ran.
    Returns why no PNG was written (matplotlib not importable), or None once it is.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # the GPU machine may lack it: the tables and JSON still count
        return f"matplotlib is not importable ({type(exc).__name__}; pip install -e .[bench])"
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

    fig, ax = plt.subplots(figsize=(9, 5.4), dpi=100)
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-s", ms=4, label=name)
    ys = [y for pts in series.values() for _, y in pts]
    if ys and max(ys) >= 50:  # the copy's 100% only where it does not squash the lines
        ax.axhline(100, color="0.4", ls="--", lw=1, label="100% (copy)")
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.grid(True, color="0.9")
    ax.set_title(f"{dtype} {what}: % of copy bandwidth - {meta['device']}", fontsize=11)
    ax.set_xlabel("vocabulary size C (log scale)")
    ax.set_ylabel("% of copy bandwidth")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


SECTIONS = ("xent", "rl", "linear", "distill")


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
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset of: xent (the cross-entropy on given logits), rl (log p and "
        "entropy of sampled tokens), linear (the fused linear + cross-entropy), distill "
        "(knowledge distillation); default all four",
    )
    ap.add_argument(
        "--impls",
        help="comma-separated subset of: "
        + ",".join(dict.fromkeys(i.name for i in benchlib.IMPLS + benchlib.LINEAR_IMPLS)),
    )
    ap.add_argument(
        "--cases",
        help="comma-separated substrings of case ids to keep, e.g. fwd+bwd-bf16-8192x128256, "
        "rl-bf16-16384x151936, linear-bf16-8192x4096x128256, distill-bf16-8192x128256-beta0.5, "
        "distill-linear-bf16-8192x4096x5120x128256-beta0.5",
    )
    ap.add_argument("--no-plot", action="store_true", help="write no report.png")
    args = ap.parse_args(argv)

    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        ap.error(f"unknown --sections {sorted(sections - set(SECTIONS))}")
    if args.device == "auto":
        device = torch.device("cpu") if args.quick else benchlib.default_device()
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    if device.type == "cpu" and not args.quick:
        log("no CUDA device: running the CPU smoke cases (as --quick, with longer timing)")
    cases = benchlib.cases_for(device, args.quick) if "xent" in sections else []
    rl_cases = benchlib.rl_cases_for(device, args.quick) if "rl" in sections else []
    linear_cases = benchlib.linear_cases_for(device, args.quick) if "linear" in sections else []
    distill_cases, linear_distill_cases = [], []
    if "distill" in sections:
        distill_cases = benchlib.distill_cases_for(device, args.quick)
        linear_distill_cases = benchlib.linear_distill_cases_for(device, args.quick)
    if args.cases:
        keep = args.cases.split(",")
        cases = [c for c in cases if any(k in c.id for k in keep)]
        rl_cases = [c for c in rl_cases if any(k in c.id for k in keep)]
        linear_cases = [c for c in linear_cases if any(k in c.id for k in keep)]
        distill_cases = [c for c in distill_cases if any(k in c.id for k in keep)]
        linear_distill_cases = [c for c in linear_distill_cases if any(k in c.id for k in keep)]
    only = None
    if args.impls:
        only = set(args.impls.split(","))
        unknown = only - set(benchlib.IMPLS_BY_NAME) - set(benchlib.RL_IMPLS_BY_NAME)
        unknown -= set(benchlib.LINEAR_IMPLS_BY_NAME) | set(benchlib.LINEAR_DISTILL_IMPLS_BY_NAME)
        if unknown:
            ap.error(f"unknown --impls {sorted(unknown)}")
        # A section none of whose implementations is asked for does not run.
        if not only & set(benchlib.IMPLS_BY_NAME):
            cases = []
        if not only & set(benchlib.RL_IMPLS_BY_NAME):
            rl_cases = []
        if not only & set(benchlib.LINEAR_IMPLS_BY_NAME):
            linear_cases = []
        if not only & set(benchlib.DISTILL_IMPLS_BY_NAME):
            distill_cases = []
        if not only & set(benchlib.LINEAR_DISTILL_IMPLS_BY_NAME):
            linear_distill_cases = []
    if not (cases or rl_cases or linear_cases or distill_cases or linear_distill_cases):
        ap.error("no case left to run")
    benchlib.cpu_threads(device)
    torch.manual_seed(0)

    meta = metadata(device, args.quick)
    meta["sections"] = [s for s in SECTIONS if s in sections]
    meta["copy_bandwidth"] = meta["matmul"] = None
    rows, rl_rows, linear_rows, distill_rows, linear_distill_rows = [], [], [], [], []
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:  # (after each case: a run cut short by a timeout keeps its cases)
        done = dict(
            meta=meta,
            results=rows,
            rl_results=rl_rows,
            linear_results=linear_rows,
            distill_results=distill_rows,
            linear_distill_results=linear_distill_rows,
        )
        (args.out / "partial.json").write_text(json.dumps(done, indent=1) + "\n")

    if cases or rl_cases or distill_cases or linear_distill_cases:
        bw, nbytes = benchlib.copy_bandwidth(device, quick=args.quick)
        meta["copy_bandwidth"] = {"gbps": bw / GB, "bytes": nbytes, "counted": "read + write"}
        log(f"{meta['device']}: copy bandwidth {bw / GB:.0f} GB/s")
        for case in cases:
            log(f"{case.mode} {case.label}: floor {case.bytes_moved / bw * 1e3:.4f} ms")
            rows += run_case(case, device, args.quick, bw, only)
            checkpoint()
        for case in rl_cases:
            log(f"rl {case.label}: floor {case.bytes_moved / bw * 1e3:.4f} ms")
            rl_rows += run_case(case, device, args.quick, bw, only)
            checkpoint()
    rate = None
    if linear_cases or linear_distill_cases:
        rate, n = benchlib.matmul_rate(device, quick=args.quick)
        meta["matmul"] = {"tflops": rate / 1e12, "n": n, "dtype": "bf16", "flops": 2 * n**3}
        log(f"{meta['device']}: bf16 {n}^3 matrix product {rate / 1e12:.3g} TFLOP/s")
        for case in linear_cases:
            log(f"linear {case.label}: floor {case.flops / rate * 1e3:.4f} ms")
            linear_rows += run_linear_case(case, device, args.quick, rate, only)
            checkpoint()
    for case in distill_cases:
        log(f"distill {case.label}: floor {case.bytes_moved / bw * 1e3:.4f} ms")
        distill_rows += run_distill_case(case, device, args.quick, bw, only)
        checkpoint()
    for case in linear_distill_cases:
        floors = case.flops / rate * 1e3, case.bytes_moved / bw * 1e3
        log(f"distill linear {case.label}: floor {max(floors):.4f} ms (flops {floors[0]:.4f}, "
            f"bytes {floors[1]:.4f})")  # fmt: skip
        linear_distill_rows += run_linear_distill_case(case, device, args.quick, bw, rate, only)
        checkpoint()
    noise_rows, rl_noise = noise(rows), noise(rl_rows)
    linear_noise = noise(linear_rows, ("dtype", "n_rows", "dim", "vocab"))
    distill_noise = noise(distill_rows, ("dtype", "n_rows", "n_cols", "beta"))
    linear_distill_noise = noise(
        linear_distill_rows, ("dtype", "n_rows", "dim", "teacher_dim", "vocab", "beta")
    )

    table = markdown(meta, rows, noise_rows, linear_rows, linear_noise, rl_rows, rl_noise,
                     distill_rows, distill_noise, linear_distill_rows,
                     linear_distill_noise)  # fmt: skip
    print(table)
    (args.out / "report.md").write_text(table + "\n")
    written = "report.json"
    # The plot is of the cross-entropy section; None once report.png is written.
    meta["plot_skipped"] = "no xent section" if not rows else "--no-plot" if args.no_plot else None
    (args.out / "report.png").unlink(missing_ok=True)  # never leave an older run's plot behind
    if meta["plot_skipped"] is None:
        meta["plot_skipped"] = plot(args.out / "report.png", meta, rows)
    written += ", report.png" if meta["plot_skipped"] is None else ""
    if meta["plot_skipped"]:
        written += f"; plot skipped: {meta['plot_skipped']}"
    doc = {
        "meta": meta,
        "cases": [c.id for c in cases],
        "results": rows,
        "noise": noise_rows,
        "rl_cases": [c.id for c in rl_cases],
        "rl_results": rl_rows,
        "rl_noise": rl_noise,
        "linear_cases": [c.id for c in linear_cases],
        "linear_results": linear_rows,
        "linear_noise": linear_noise,
        "distill_cases": [c.id for c in distill_cases],
        "distill_results": distill_rows,
        "distill_noise": distill_noise,
        "linear_distill_cases": [c.id for c in linear_distill_cases],
        "linear_distill_results": linear_distill_rows,
        "linear_distill_noise": linear_distill_noise,
    }
    (args.out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "partial.json").unlink(missing_ok=True)
    log(f"wrote {args.out / 'report.md'}, {written}")

    # A broken fused_xent is a failed run; a broken peer is only a note in the table.
    every = rows + rl_rows + linear_rows + distill_rows + linear_distill_rows
    failed = [r for r in every if r["error"] and r["impl"].startswith("fused_xent")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
