"""What the GPU would run, without a GPU: every launch configuration compiled, counted, predicted.

    python bench/static.py                  # sm_90, every scenario, an aligned table
    python bench/static.py --arch 80,90,100 # also A100 and B200 builds
    python bench/static.py --json           # the same as JSON
    python bench/static.py --quick          # a few scenarios, for CI (seconds once cached)

**How it compiles.** A stub Triton driver (``triton.runtime.driver.set_active``) reports a
``GPUTarget("cuda", 90, 32)`` (or 80 / 100) and ``JITFunction.run`` is patched to compile only
(Triton's own ``warmup=True`` path) and hand back the ``CompiledKernel``. The package's *real*
launchers are then called on CPU tensors: they pick BLOCK / num_warps / constexprs exactly as on a
GPU, and Triton specialises the arguments as for a real launch (torch's CPU allocations are 64-byte
aligned like a fresh CUDA tensor, so the pointers get the same divisibility-by-16 specialisation;
integer arguments by their values). The launchers' CUDA-only check is bypassed here, and nothing
is launched. Only 2 rows are allocated (``COMPILE_ROWS``), with the real number of columns.
The NVIDIA backend compiles with the ``ptxas`` shipped in Triton's package; ``cuobjdump`` (also
shipped) prints the SASS (``-sass``) and the resource usage (``-res-usage``). Compiled kernels
and cuobjdump's output land in Triton's usual cache (``TRITON_CACHE_DIR`` to move it), so a
second run takes seconds.
Autotuned kernels: every config the autotuner benchmarks is compiled (the stub's benchmarker
times nothing). ``TRITON_INTERPRET`` must be unset.

**What it reports**, per compiled kernel of each scenario (``SCENARIOS`` below):

* registers per thread, local memory (spills: stack/local bytes of ``cuobjdump -res-usage``, and
  ``LDL``/``STL`` instructions), shared memory (Triton's dynamic ``shared`` plus the cubin's static
  shared memory, at least the 1 KiB the driver reserves per CTA);
* programs resident per SM: the least of the register limit (registers rounded up to 256 per
  warp, out of 64 Ki per SM), the thread limit (2048), the shared-memory limit (228 KiB on sm_90
  and sm_100, 164 KiB on sm_80) and 32 CTAs;
* ``MUFU.EX2`` and SASS instructions per logit, and LDG / STG counts by width (``.128``, ``.64``,
  ``.32``, ``.U16`` ...: how well the loads and stores are vectorised; whole kernel), with
  the cache hint where there is one (``.128.EL``: evict_last, ``.128.EF``: evict_first);
* the predicted fraction of the byte floor (below).

**Per-logit counts.** NOPs and the trailing ``BRA``-to-itself padding are not counted. A loop is
a backward branch (a ``BRA`` to an earlier address); its body is the instructions from the target
to the branch, and an innermost loop is taken to be one pass over the row's column blocks (the
long-row kernels: pass 1 = max / sum of exponentials, pass 2 = the gradient). One iteration
covers ``rows x cols`` logits per program (``Step.tile``, from the compiled kernel's constexprs:
``1 x BLOCK`` for the current row kernels), i.e. ``rows * cols / (32 * num_warps)`` per thread, so
``per logit = body / (rows * cols / threads)``; a two-pass row shows each pass and their sum
(``9.4+6.1=15.5``). A kernel without a loop (a whole row in registers) is straight-line:
``per logit = all instructions / (rows * cols / threads)``. Instructions are counted as written,
both sides of a branch included (a rare-path branch inflates the count a little). Where ptxas
unrolled a loop (found from its induction step: ``R = R + u * cols``), the body is divided by
``u`` too. Marked ``~`` (approximate): an unrolled loop (it comes with remainder code, counted
outside the loop), or a tile of at most one logit per thread (tiny C: the layout repeats logits
across threads, and ptxas unrolls and versions such loops, so a loop is no longer one pass).
The split-row kernel (``kernels/split.py``, ``TICKET_KERNELS``) claims its work with an atomic
ticket and waits for the other programs of its row: its passes are the loops that load logits
through the caches (not the wait's or the reduction's strong loads), and in the prediction a row
takes ``ceil(C / SEGMENT)`` programs of ``SEGMENT`` logits (the wait itself is not counted).

**Predicted fraction of the floor.** For the scenario's prediction shape (``N x C``: the shapes
the performance issue names, 32768 x 2048, 16384 x 8192, 8192 x 32000, 8192 x 128256,
4096 x 256000; ``N = 8192`` otherwise):

* floor = bytes that must move / copy bandwidth: the logits read once (``b`` bytes each, ``b``
  the dtype's size), the gradient written once where the step writes one, probability targets
  read once; 3.0 TB/s on sm_90 (the copy bandwidth measured on an H100, bench/NOTES.md);
* issue time = warp-instructions / (4 per clock per SM x SMs x clock), 132 SMs at 1.98 GHz on
  sm_90. The warp-instructions are those one program issues for its row tile (code outside loops
  once, each innermost loop ``ceil(C / (u * cols))`` times) x ``num_warps`` x programs; for a
  whole-row kernel at C = BLOCK this is ``instructions per logit x N x C / 32``;
* predicted time = max(floor, issue time); the fraction printed is floor / predicted.

This ignores latency (a program waiting on its loads with too few programs resident to hide it),
the second read of a two-pass row (an L2 hit for a short row, DRAM again for a long one), the
tail of the last wave, and contention for the MUFU unit (16 per SM per clock on these parts, a
quarter of the FP32 rate); it says only whether the instruction stream alone could keep up with
the memory. The sm_80 / sm_100 numbers (bandwidth, SMs, clock in ``ARCHS``) are nominal, not
measured.

**Coverage.** Besides the scenarios, the full run *probes* the launchers (nothing compiled) at
every power of two of C and one more, each dtype, option set and step, recording the (kernel,
constexprs, num_warps) each call would compile; any not already in a scenario is compiled too, as
a "probe" row. So every configuration the launch table can pick appears at least once without this
tool re-implementing the table (``--no-probe`` skips that, ``--quick`` implies it).

Not in scope: how many kernels a step launches (another test counts launches).

Exit status 1 if any configuration fails to compile or spills.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
from fused_xent.kernels import _launch, distill, split, xent
from triton.backends.compiler import GPUTarget
from triton.runtime.cache import get_cache_manager
from triton.runtime.driver import driver as _driver
from triton.runtime.jit import JITFunction

from fused_xent import _alloc
from fused_xent._options import DistillOptions, LossOptions

# ============================================================================================
# What to compile. Re-point this section when the launchers change; nothing below reads the
# launch table (BLOCK, num_warps and the constexprs come from what was compiled).
# ============================================================================================

COMPILE_ROWS = 2  # rows allocated per compile: the launchers see the real C, little memory


def _row_outputs(n_rows):
    return torch.empty(n_rows), torch.empty(3, n_rows)  # per-row loss, (3, N) statistics


def _mean(t, opts, n_cols):
    """The prologue of a "mean" loss: (total, den, counter) for the forward's reduction."""
    total, den, counter = torch.empty(()), torch.empty(()), torch.empty((), dtype=torch.int32)
    xent.xent_prologue(t, opts, n_cols, "mean", den, counter)
    return dict(reduction="mean", total=total, den=den, counter=counter)


def _fwd(x, t, opts):
    """Forward of a "mean" loss with no gradient wanted (under no_grad): one read."""
    xent.xent_forward(x, t, opts, *_row_outputs(x.shape[0]), **_mean(t, opts, x.shape[1]))


def _fwd_grad(x, t, opts):
    """Forward of a "mean" loss: the gradient is written in the same launch."""
    loss, stats = _row_outputs(x.shape[0])
    grad = _alloc.grad_like(x)
    xent.xent_forward(x, t, opts, loss, stats, grad, **_mean(t, opts, x.shape[1]))


def _bwd(x, t, opts):
    """Backward of a "none" loss (and of every in-place one): one more read, one write."""
    _, stats = _row_outputs(x.shape[0])
    xent.xent_backward(x, t, opts, stats, torch.ones(x.shape[0]), _alloc.grad_like(x))


def _bwd_scaled(x, t, opts):
    """Backward of a "mean" loss after fwd+grad, with an incoming gradient other than 1 (with 1
    it only reads that gradient): the gradient recomputed from the logits, rounded once."""
    _, stats = _row_outputs(x.shape[0])
    xent.xent_backward(x, t, opts, stats, torch.full((), 0.5), _alloc.grad_like(x), "mean",
                       torch.ones(()), skip_if_one=True)  # fmt: skip


def _rl_fwd(x, t, opts):
    """token_logprobs' forward with the entropy: log p and entropy per row, one read."""
    logp, stats = _row_outputs(x.shape[0])
    xent.xent_forward(x, t, opts, logp, stats, entropy=torch.empty(x.shape[0]), logprob=True)


def _rl_bwd(x, t, opts):
    """Its backward with incoming gradients on log p and the entropy: one read, one write."""
    n = x.shape[0]
    _, stats = _row_outputs(n)
    xent.xent_backward(x, t, opts, stats, torch.ones(n), _alloc.grad_like(x),
                       dentropy=torch.ones(n), entropy=torch.empty(n), logprob=True)  # fmt: skip


def _row_block(kernel_name: str, constexprs: dict) -> tuple[int, int]:
    """(rows, cols) one program covers per iteration of its column loop (or in all); the
    reduction's prologue reads RBLOCK targets per iteration."""
    if "BLOCK" not in constexprs:
        return constexprs["RBLOCK"], 1
    return 1, constexprs["BLOCK"]


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable  # run(logits, target, opts): calls the real launcher(s)
    writes_grad: bool  # the floor counts a gradient write (the logits are always read once)
    tile: Callable[[str, dict], tuple[int, int]] = _row_block
    probe_options: tuple[str, ...] | None = None  # the OPTIONS the probe tries (None: all)
    reads: int = 1  # (N, C) inputs the floor counts a read of: 2 for a distillation's teacher


FWD = Step("fwd", _fwd, writes_grad=False)
FWD_GRAD = Step("fwd+grad", _fwd_grad, writes_grad=True)
BWD = Step("bwd", _bwd, writes_grad=True)
BWD_SCALED = Step("bwd(g!=1)", _bwd_scaled, writes_grad=True)  # g == 1 moves nothing
# token_logprobs: a class-index target, no class weight, smoothing or z-loss.
_RL_OPTIONS = ("plain", "softcap", "logit-scale")
RL_FWD = Step("rl-fwd", _rl_fwd, writes_grad=False, probe_options=_RL_OPTIONS)
RL_BWD = Step("rl-bwd", _rl_bwd, writes_grad=True, probe_options=_RL_OPTIONS)
STEPS = (FWD, FWD_GRAD, BWD, BWD_SCALED, RL_FWD, RL_BWD)


def _fwd_grad_split(x, t, opts):
    """Forward of a "mean" loss with the gradient, each row split over K programs that wait for
    each other (kernels/split.py, one launch): one read from DRAM, one from L2, one write."""
    loss, stats = _row_outputs(x.shape[0])
    grad = _alloc.grad_like(x)
    split.xent_forward_split(x, t, opts, loss, stats, grad, wait=True, **_mean(t, opts, x.shape[1]))


def _fwd_grad_split_eps(x, t, opts):
    """The same with the two options the split kernel supports: smoothing and a z-loss."""
    _fwd_grad_split(x, t, dataclasses.replace(opts, label_smoothing=0.1, lse_square_scale=1e-4))


# Not in STEPS (not probed): the split launcher serves only the long rows split_plan accepts, with
# plain options or these two; its constexprs vary with K alone, which the scenarios cover.
FWD_GRAD_SPLIT = Step("fwd+grad split", _fwd_grad_split, writes_grad=True)
FWD_GRAD_SPLIT_EPS = Step("fwd+grad split eps+z", _fwd_grad_split_eps, writes_grad=True)

# LossOptions fields, plus prob_target (a (N, C) probability target of the logits' dtype) and
# weight=True (a (C,) class weight of the logits' dtype).
OPTIONS = {
    "plain": {},
    "softcap": {"softcap": 30.0},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.1},
    "prob-target": {"prob_target": True},
    "logit-scale": {"logit_scale": 0.5},
    "all": {
        "weight": True,
        "label_smoothing": 0.1,
        "softcap": 30.0,
        "prob_target": True,
        "lse_square_scale": 1e-4,
        "logit_scale": 0.5,
    },
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The prediction's N for the shapes the performance issue names (151936: the RL issue's Qwen
# vocabulary); N = 8192 for any other C.
PREDICT_ROWS = {2048: 32768, 8192: 16384, 32000: 8192, 128256: 8192, 151936: 16384, 256000: 4096}


@dataclass(frozen=True)
class Scenario:
    step: Step
    dtype: str  # a key of DTYPES
    n_cols: int
    options: str = "plain"  # a key of OPTIONS
    quick: bool = False  # in the --quick subset
    n_rows: int | None = None  # the prediction's N; None: PREDICT_ROWS or 8192
    probe: bool = False  # added by the coverage probe

    @property
    def rows(self) -> int:
        return self.n_rows or PREDICT_ROWS.get(self.n_cols, 8192)


ALL_COLS = (2047, 2048, 8192, 16384, 32000, 50257, 128256, 151936, 256000)
QUICK = {
    (FWD_GRAD, "bf16", 2048, "plain"),
    (FWD_GRAD, "bf16", 16384, "plain"),
    (FWD_GRAD, "bf16", 128256, "plain"),
    (FWD_GRAD, "fp32", 128256, "plain"),
    (FWD_GRAD, "bf16", 8192, "all"),
    (FWD, "bf16", 128256, "plain"),
    (BWD, "bf16", 128256, "plain"),
    (FWD_GRAD, "bf16", 2047, "plain"),
    (FWD_GRAD, "bf16", 50257, "plain"),
    (RL_FWD, "bf16", 128256, "plain"),
    (RL_BWD, "bf16", 128256, "plain"),
    (FWD_GRAD_SPLIT, "bf16", 128256, "plain"),
    (FWD_GRAD_SPLIT, "fp32", 128256, "plain"),
    (FWD_GRAD_SPLIT_EPS, "bf16", 128256, "plain"),
}


def _scenarios() -> list[Scenario]:
    keys = [(FWD_GRAD, d, c, "plain") for d in DTYPES for c in ALL_COLS]
    keys += [(FWD, "bf16", c, "plain") for c in (2048, 8192, 16384, 32000, 128256)]
    keys += [(FWD, "fp32", 128256, "plain")]
    keys += [(BWD, "bf16", c, "plain") for c in (2048, 8192, 16384, 128256)]
    keys += [(BWD, "fp32", 128256, "plain")]
    keys += [(BWD_SCALED, "bf16", c, "plain") for c in (2048, 128256)]
    for opt in ("softcap", "weight+smoothing", "prob-target", "logit-scale", "all"):
        keys += [(FWD_GRAD, "bf16", c, opt) for c in (2048, 8192, 16384, 128256)]
    keys += [(step, "bf16", c, "all") for step in (FWD, BWD) for c in (2048, 16384, 128256)]
    keys += [(FWD_GRAD, "fp32", c, "all") for c in (8192, 128256)]
    # The RL step: a whole row (2048), the block cap its constexprs bring (8192: two passes of
    # 4096) and the report's vocabularies.
    keys += [
        (st, "bf16", c, "plain") for st in (RL_FWD, RL_BWD) for c in (2048, 8192, 128256, 151936)
    ]
    # Long rows split over K programs (kernels/split.py): the vocabularies it is for, K = 8-32.
    keys += [(FWD_GRAD_SPLIT, d, c, "plain") for d in DTYPES for c in (128256, 151936, 256000)]
    keys += [(FWD_GRAD_SPLIT_EPS, "bf16", c, "plain") for c in (128256, 256000)]
    return [Scenario(*k, quick=k in QUICK) for k in keys]


# Knowledge distillation (kernels/distill.py): the student and a teacher of the same dtype, read
# once each per pass; "kd" steps name the divergence (b = beta) and, with "+hard", a hard term at
# T = 2 (its own softmax: one more exponential a logit).


def _kd_step(name: str, beta: float, phase: str, hard: bool = False) -> Step:
    opts = DistillOptions(beta=beta, temperature=2.0 if hard else 1.0,
                          hard_weight=0.5 if hard else 0.0)  # fmt: skip

    def run(x, t, _):
        n = x.shape[0]
        teacher, target = torch.empty_like(x), t if hard else None
        loss, stats = torch.empty(n), torch.empty(distill.N_STATS, n)
        if phase == "bwd":
            distill.distill_backward(x, teacher, target, opts, stats, torch.ones(n),
                                     _alloc.grad_like(x))  # fmt: skip
        else:
            grad = _alloc.grad_like(x) if phase == "fwd+grad" else None
            distill.distill_forward(x, teacher, target, opts, loss, stats, grad)

    run.__doc__ = f"Distillation {name}: {phase}."
    return Step(f"kd-{name} {phase}", run, writes_grad=phase != "fwd", reads=2)


KD_BETAS = {"b=0": 0.0, "b=0.5": 0.5, "b=1": 1.0}
KD_STEPS = {
    (name, phase): _kd_step(name, beta, phase)
    for name, beta in KD_BETAS.items()
    for phase in ("fwd", "fwd+grad", "bwd")
}
KD_STEPS.update({("b=0+hard", p): _kd_step("b=0+hard", 0.0, p, True) for p in ("fwd+grad", "bwd")})
KD_QUICK = {("b=0", "fwd+grad", "bf16", 128256), ("b=0.5", "fwd+grad", "bf16", 128256),
            ("b=0.5", "fwd+grad", "bf16", 4096)}  # fmt: skip


def _kd_scenarios() -> list[Scenario]:
    keys = [(n, p, "bf16", c) for n in KD_BETAS for p in ("fwd", "fwd+grad", "bwd")
            for c in (4096, 128256)]  # fmt: skip
    keys += [("b=0+hard", p, "bf16", c) for p in ("fwd+grad", "bwd") for c in (4096, 128256)]
    keys += [(n, "fwd+grad", "fp32", c) for n in KD_BETAS for c in (2048, 128256)]
    keys += [(n, "fwd+grad", "bf16", c) for n in ("b=0", "b=0.5") for c in (2047, 32000)]
    return [
        Scenario(KD_STEPS[name, phase], dtype, c, quick=(name, phase, dtype, c) in KD_QUICK)
        for name, phase, dtype, c in keys
    ]


SCENARIOS = _scenarios() + _kd_scenarios()

# Columns the coverage probe tries: every power of two and one more (up to 2^18 = 262144).
PROBE_COLS = sorted({1 << k for k in range(19)} | {(1 << k) + 1 for k in range(18)})


@dataclass(frozen=True)
class Arch:
    name: str
    card: str
    regs_per_sm: int
    threads_per_sm: int
    smem_per_sm: int  # bytes
    ctas_per_sm: int
    sms: int
    clock_hz: float
    copy_bw: float  # bytes/s of a device-to-device copy, read + write counted
    issue_per_clock: int = 4  # warp-instructions per clock per SM (4 schedulers)


# sm_90: the H100 SXM the issue is about (3.0 TB/s: the copy measured in bench/NOTES.md).
# sm_80 / sm_100: nominal (A100 SXM 80GB, B200), copy bandwidth taken as 90% of the HBM peak
# (3.0 of 3.35 TB/s on the H100): 2.04 -> 1.8, 8.0 -> 7.2 TB/s.
ARCHS = {
    80: Arch("sm_80", "A100 SXM 80GB", 65536, 2048, 164 << 10, 32, 108, 1.41e9, 1.8e12),
    90: Arch("sm_90", "H100 SXM", 65536, 2048, 228 << 10, 32, 132, 1.98e9, 3.0e12),
    100: Arch("sm_100", "B200", 65536, 2048, 228 << 10, 32, 148, 1.965e9, 7.2e12),
}

# ============================================================================================
# Compiling without a GPU
# ============================================================================================

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(BIN, "cuobjdump")


class StubDriver:
    """Just enough of a Triton driver for JITFunction.run to compile for ``target``."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton keeps its compiled kernels (and the target) per device: one "device" per arch.
        return self.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        def bench(fn, *args, quantiles=None, **kwargs):
            fn()  # an autotuner's config: compiled by the patched run, timed as all equal
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass

    def __getattr__(self, name):  # utils, launcher_cls, ...: only a launch would need them
        raise AttributeError(f"the static-analysis stub driver has no {name!r} (nothing launches)")


@dataclass
class Call:
    """One kernel a launcher asked for: the JITFunction, its constexprs and what was compiled."""

    fn: JITFunction
    constexprs: dict
    num_warps: int | None
    kernel: object = None  # triton.compiler.CompiledKernel


class Capture:
    """Patches JITFunction.run: ``compile`` mode compiles (warmup) and records, ``probe`` mode
    records the constexprs only; either way nothing launches."""

    def __init__(self):
        self.mode = "compile"
        self.calls: list[Call] = []
        self._orig = JITFunction.run

    def __enter__(self):
        capture = self

        def run(fn, *args, grid, warmup, **kwargs):
            call = Call(fn, _constexprs(fn, args, kwargs), kwargs.get("num_warps"))
            if capture.mode == "compile":
                kernel = capture._orig(fn, *args, grid=grid, warmup=True, **kwargs)
                if hasattr(kernel, "result"):  # a future, under Triton's AsyncCompileMode
                    kernel = kernel.result()
                call.kernel = kernel
            capture.calls.append(call)
            return call.kernel

        JITFunction.run = run
        if _ORIG_CHECK is not None:
            xent._check_launchable = _check_launchable
        # Every launch through the patched run (kernels/_launch.py would call a kept kernel's
        # launcher itself, which this stub driver has not).
        self._fast, _launch.ENABLED = _launch.ENABLED, False
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._orig
        if _ORIG_CHECK is not None:
            xent._check_launchable = _ORIG_CHECK
        _launch.ENABLED = self._fast

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls


# The launchers refuse non-CUDA tensors unless INTERPRET (kernels/xent.py): bypassed here.
_ORIG_CHECK = getattr(xent, "_check_launchable", None)


def _check_launchable(logits):
    """The launchers' own check (strides ...), minus its refusal of non-CUDA tensors."""
    saved, xent.INTERPRET = xent.INTERPRET, True
    try:
        _ORIG_CHECK(logits)
    finally:
        xent.INTERPRET = saved


def _constexprs(fn: JITFunction, args, kwargs) -> dict:
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args, strict=False))
    bound.update((k, v) for k, v in kwargs.items() if k in names)
    defaults = inspect.signature(fn.fn).parameters
    out = {}
    for p in fn.params:
        if p.is_constexpr:
            value = bound.get(p.name, defaults[p.name].default)
            out[p.name] = getattr(value, "value", value)  # tl.constexpr -> its value
    return out


def _inputs(sc: Scenario, n_rows: int):
    dtype = DTYPES[sc.dtype]
    opts = dict(OPTIONS[sc.options])
    prob = opts.pop("prob_target", False)
    if opts.pop("weight", False):
        opts["weight"] = torch.ones(sc.n_cols, dtype=dtype)
    x = torch.empty(n_rows, sc.n_cols, dtype=dtype)
    if prob:
        t = torch.empty(n_rows, sc.n_cols, dtype=dtype)
    else:
        t = torch.zeros(n_rows, dtype=torch.int64)
    return x, t, LossOptions(**opts)


# ============================================================================================
# Reading the cubin
# ============================================================================================

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_WIDTHS = ("256", "128", "64", "U16", "S16", "16", "U8", "S8", "8")


_HINTS = ("EL", "EF", "LU", "NA")  # evict_last, evict_first, last use, no allocate (L1)


def _width(opcode: str) -> str:
    """``.128``, ``.U16`` ...; with the cache hint where the instruction has one: ``.128.EL``
    (evict_last), ``.128.EF`` (evict_first)."""
    parts = opcode.split(".")[1:]
    width = next((f".{w}" for w in _WIDTHS if w in parts), ".32")
    hint = next((f".{h}" for h in _HINTS if h in parts), "")
    return width + hint


@dataclass
class Region:
    """Instruction counts of a part of the kernel (a loop body, or the whole kernel)."""

    start: int
    end: int
    instrs: int = 0
    ex2: int = 0
    ldg: Counter = field(default_factory=Counter)
    stg: Counter = field(default_factory=Counter)
    local: int = 0  # LDL / STL
    steps: set = field(default_factory=set)  # immediates of `R = R + imm` (induction steps)


@dataclass
class Sass:
    whole: Region
    loops: list[Region]  # innermost loops over the logits (they load), in program order
    row: Region  # what every program runs: the kernel up to a reduction's arrival atomic


def parse_sass(text: str, function: str) -> Sass:
    instrs = []  # (address, opcode, text)
    current = None
    for line in text.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            continue
        m = _SASS_LINE.match(line)
        if m and current == function:
            body = m.group(2)
            ops = body.split()
            opcode = ops[1] if ops[0].startswith("@") else ops[0]
            instrs.append((int(m.group(1), 16), opcode, body))
    if not instrs:
        raise RuntimeError(f"no SASS for {function} in cuobjdump's output")
    branches = []
    counted = []
    for addr, opcode, body in instrs:
        if opcode.startswith("NOP"):
            continue
        if opcode.startswith("BRA"):
            targets = re.findall(r"0x([0-9a-f]+)", body.split(None, 1)[1] if " " in body else "")
            target = int(targets[-1], 16) if targets else None
            if target == addr:
                continue  # the padding after EXIT: BRA to itself
            if target is not None and target < addr:
                branches.append((target, addr))
        counted.append((addr, opcode, body))
    ends: dict[int, int] = {}  # loop header -> its last back-edge (a `continue` adds one)
    for start, end in branches:
        ends[start] = max(end, ends.get(start, end))
    loops = sorted(
        (s, e)
        for s, e in ends.items()
        if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in ends.items())
    )

    def region(start, end):
        r = Region(start, end)
        for addr, opcode, body in counted:
            if start <= addr <= end:
                r.instrs += 1
                step = _induction_step(opcode, body)
                if step:
                    r.steps.add(step)
                r.ex2 += opcode.startswith("MUFU.EX2")
                if opcode.startswith("LDG"):
                    r.ldg[_width(opcode)] += 1
                elif opcode.startswith("STG"):
                    r.stg[_width(opcode)] += 1
                elif opcode.startswith(("LDL", "STL")):
                    r.local += 1
        return r

    whole = region(0, counted[-1][0])
    if function in TICKET_KERNELS:
        # Its first atomic claims the program's work item; the wait and the reduction's sum are
        # loops of strong (L2) loads. A pass loads the logits, through the caches (with a hint);
        # the program's own code is everything but the other loops (run once: a wait's trips
        # are not known, the reduction's sum runs in one program of the launch).
        loads = [region(s, e) for s, e in loops]
        passes = [r for r in loads if any(".STRONG" not in op for op in _loads(r, counted))]
        row = region(0, counted[-1][0])
        for r in loads:
            if r not in passes:
                row = _minus(row, r)
        return Sass(whole, passes, row)
    # A reduction finishes in the program that arrives last at an atomic counter: the code from
    # the first atomic on runs once per launch, not once per row.
    end = next((a for a, op, _ in counted if op.startswith(("ATOM", "RED"))), None)
    end = counted[-1][0] if end is None else end - 1
    # A pass over a row loads its logits; a loop that only stores (a zero gradient row, written
    # without reading the logits) or comes after the atomic is not one.
    passes = [r for r in (region(s, e) for s, e in loops) if r.end <= end and sum(r.ldg.values())]
    return Sass(whole, passes, region(0, end))


# Kernels whose programs claim their work with an atomic ticket and then wait for each other
# (kernels/split.py): their first atomic is no reduction's.
TICKET_KERNELS = {"_xent_split_kernel"}


def _loads(r: Region, counted) -> list[str]:
    return [op for a, op, _ in counted if r.start <= a <= r.end and op.startswith("LDG")]


def _minus(a: Region, b: Region) -> Region:
    """``a`` without the instructions of ``b`` (inside it)."""
    return Region(a.start, a.end, a.instrs - b.instrs, a.ex2 - b.ex2, a.ldg - b.ldg, a.stg - b.stg,
                  a.local - b.local, a.steps)  # fmt: skip


def unroll(r: Region, cols: int, itemsize: int) -> int:
    """How many column blocks one trip through the loop covers: the smallest step of an
    induction variable that is a multiple of the block, else 1. ptxas unrolls loops with a short
    body (the scale kernel's: 4 blocks a trip). A step of ``cols * itemsize`` is a pointer moving
    by one block of bytes, not an unrolled element counter, unless nothing else steps."""
    multiples = [s // cols for s in r.steps if s % cols == 0 and 1 <= s // cols <= 64]
    counters = [u for u in multiples if u != itemsize]
    return min(counters or [u // itemsize for u in multiples if u % itemsize == 0] or [1])


_STEP = re.compile(r"^U?(?:IADD3|VIADD|IADD|IMAD\.IADD)\b")


def _induction_step(opcode: str, body: str) -> int | None:
    """imm of `R = R + imm` (an add whose destination is also a source): a loop's step."""
    if not _STEP.match(opcode):
        return None
    operands = [o.strip() for o in body.split(opcode, 1)[1].split(",")]
    imms = [o for o in operands[1:] if re.fullmatch(r"0x[0-9a-f]+", o)]
    if operands[0] in operands[1:] and len(imms) == 1:
        value = int(imms[0], 16)
        return value if value < 1 << 31 else None  # a negative step is no column step
    return None


@dataclass
class Analysis:
    regs: int
    stack: int  # bytes of local memory (spills) per thread: max of STACK and LOCAL
    static_smem: int
    sass: Sass


_DISASM: dict[str, Future] = {}  # kernel hash -> cuobjdump's output, run in the background
_ANALYSES: dict[str, Analysis] = {}
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)


def disassemble(kernel) -> None:
    """Start ``cuobjdump -res-usage -sass`` on the kernel's cubin (about 0.4 s, mostly starting
    the disassembler) while the next kernel compiles. Its output is kept in Triton's cache beside
    the kernel, under the kernel's hash, so a second run does not disassemble again."""
    if kernel.hash not in _DISASM:
        _DISASM[kernel.hash] = _POOL.submit(_cuobjdump, kernel.hash, kernel.asm["cubin"])


def _cuobjdump(key: str, cubin: bytes) -> str:
    name = "static_cuobjdump.txt"
    try:
        cache = get_cache_manager(key)
        path = cache.get_file(name)
    except Exception:  # an unusable cache only costs time
        cache = path = None
    if path:
        with open(path) as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        cmd = [CUOBJDUMP, "-res-usage", "-sass", cubin_path]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if cache is not None:
        try:
            cache.put(text, name, binary=False)
        except Exception:
            pass
    return text


def analyse(kernel) -> Analysis:
    key = kernel.hash
    if key not in _ANALYSES:
        disassemble(kernel)
        text = _DISASM[key].result()
        name = kernel.metadata.name
        usage = _res_usage(text, name)
        _ANALYSES[key] = Analysis(
            regs=usage["REG"],
            stack=max(usage.get("STACK", 0), usage.get("LOCAL", 0)),
            static_smem=usage.get("SHARED", 0),
            sass=parse_sass(text, name),
        )
    return _ANALYSES[key]


def _res_usage(text: str, function: str) -> dict:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(rf"\s*Function {re.escape(function)}:\s*", line):
            return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", lines[i + 1])}
    raise RuntimeError(f"no resource usage for {function} in cuobjdump's output")


# ============================================================================================
# Per configuration
# ============================================================================================


def occupancy(arch: Arch, regs: int, threads: int, smem: int) -> tuple[int, str]:
    """Programs resident per SM, and what limits it."""
    warps = threads // 32
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    limits = {
        "regs": arch.regs_per_sm // (regs_per_warp * warps),
        "threads": arch.threads_per_sm // threads,
        "smem": arch.smem_per_sm // smem if smem else arch.ctas_per_sm,
        "ctas": arch.ctas_per_sm,
    }
    which = min(limits, key=limits.get)
    return limits[which], which


def describe(sc: Scenario, call: Call, arch: Arch) -> dict:
    k = call.kernel
    a = analyse(k)
    md = k.metadata
    warps = md.num_warps
    threads = 32 * warps
    tile_rows, tile_cols = sc.step.tile(md.name, call.constexprs)
    per_thread = tile_rows * tile_cols / threads  # logits a thread covers per iteration

    def region(r: Region, loop: bool) -> dict:
        d = {"instrs": r.instrs, "ex2": r.ex2, "ldg": dict(r.ldg), "stg": dict(r.stg)}
        if loop:
            d["unroll"] = u = unroll(r, tile_cols, DTYPES[sc.dtype].itemsize)
            d["instr_per_logit"] = r.instrs / (u * per_thread)
            d["ex2_per_logit"] = r.ex2 / (u * per_thread)
        return d

    loops = a.sass.loops
    passes = [region(r, True) for r in loops]
    if not loops:  # straight-line: the whole row, up to a reduction's atomic
        whole = region(a.sass.row, False)
        passes = [{**whole, "unroll": 1}]
        passes[0]["instr_per_logit"] = whole["instrs"] / per_thread
        passes[0]["ex2_per_logit"] = whole["ex2"] / per_thread
    # At most one logit per thread per iteration: the layout repeats logits across threads, and
    # ptxas unrolls and versions such short loops. An unrolled loop comes with remainder code or
    # a remainder loop. Either way a loop is no longer exactly one pass.
    reliable = per_thread > 1 and all(p["unroll"] == 1 for p in passes)
    smem = md.shared + max(a.static_smem, 1024)
    ctas, limiter = occupancy(arch, a.regs, threads, smem)

    # The prediction: what one program issues for its tile of rows, times the programs. A row
    # split over programs of SEGMENT logits (kernels/split.py) has ceil(C / SEGMENT) of them.
    span = call.constexprs.get("SEGMENT", sc.n_cols)
    in_loops = sum(r.instrs for r in loops)
    per_program = a.sass.row.instrs - in_loops
    for r, p in zip(loops, passes[: len(loops)], strict=True):
        per_program += math.ceil(span / (p["unroll"] * tile_cols)) * r.instrs
    programs = math.ceil(sc.rows / tile_rows) * math.ceil(sc.n_cols / span)
    warp_instrs = per_program * warps * programs
    if "BLOCK" not in call.constexprs:  # the reduction's prologue: one program over the rows
        trips = math.ceil(sc.rows / tile_rows)
        warp_instrs = (a.sass.row.instrs - in_loops + trips * in_loops) * warps
    return {
        "kernel": md.name,
        "constexprs": call.constexprs,
        "num_warps": warps,
        "num_stages": getattr(md, "num_stages", None),
        "enable_fp_fusion": getattr(md, "enable_fp_fusion", None),
        "tile": [tile_rows, tile_cols],
        "registers": a.regs,
        "spill_bytes": a.stack,
        "local_instrs": a.sass.whole.local,
        "shared_bytes": smem,
        "programs_per_sm": ctas,
        "programs_per_sm_limit": limiter,
        "passes": passes,
        "per_logit_reliable": reliable,
        "instr_per_logit": sum(p["instr_per_logit"] for p in passes),
        "ex2_per_logit": sum(p["ex2_per_logit"] for p in passes),
        "whole": region(a.sass.whole, False),
        "warp_instrs": warp_instrs,
        "hash": k.hash,
    }


def predict(sc: Scenario, kernels: list[dict], arch: Arch) -> dict:
    b = DTYPES[sc.dtype].itemsize
    per_logit = b * (sc.step.reads + sc.step.writes_grad)
    per_logit += b if OPTIONS[sc.options].get("prob_target") else 0
    floor_bytes = per_logit * sc.rows * sc.n_cols
    floor_s = floor_bytes / arch.copy_bw
    rate = arch.issue_per_clock * arch.sms * arch.clock_hz
    issue_s = sum(k["warp_instrs"] for k in kernels) / rate
    return {
        "rows": sc.rows,
        "floor_bytes": floor_bytes,
        "floor_s": floor_s,
        "issue_s": issue_s,
        "predicted_s": max(floor_s, issue_s),
        "fraction_of_floor": floor_s / max(floor_s, issue_s),
    }


def compile_scenario(cap: Capture, sc: Scenario, arch_id: int) -> tuple[dict, list[Call]]:
    """Run the scenario's launchers under the stub driver: compile, start the disassembly."""
    _driver.set_active(StubDriver(arch_id))
    out = {
        "arch": ARCHS[arch_id].name,
        "step": sc.step.name,
        "dtype": sc.dtype,
        "n_cols": sc.n_cols,
        "options": sc.options,
        "probe": sc.probe,
    }
    t0 = time.perf_counter()
    calls = []
    try:
        cap.mode = "compile"
        cap.take()
        sc.step.run(*_inputs(sc, COMPILE_ROWS))
        calls = cap.take()
        if not calls:
            raise RuntimeError("the step launched no kernel")
        for c in calls:
            disassemble(c.kernel)
    except Exception as e:  # report it and carry on with the other scenarios
        cap.take()
        out["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
    out["compile_s"] = time.perf_counter() - t0
    return out, calls


def finish_scenario(out: dict, sc: Scenario, calls: list[Call], arch_id: int) -> dict:
    """The counts and the prediction, once the disassembly is in."""
    if "error" not in out:
        arch = ARCHS[arch_id]
        try:
            out["kernels"] = [describe(sc, c, arch) for c in calls]
            out["prediction"] = predict(sc, out["kernels"], arch)
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
    return out


def _key(call: Call) -> tuple:
    """A configuration: kernel, constexprs, num_warps (compiled, or what the launcher asked for,
    Triton's default 4 where it did not say)."""
    warps = call.kernel.metadata.num_warps if call.kernel is not None else call.num_warps or 4
    return (call.fn.fn.__name__, tuple(sorted(call.constexprs.items())), warps)


def probe(cap: Capture, arch_id: int, errors: list[str]) -> dict[tuple, Scenario]:
    """Every (kernel, constexprs, num_warps) the launchers pick on PROBE_COLS, with the first
    scenario that picked it; nothing is compiled. A launcher that refuses a shape or an option
    (an exception) is noted in ``errors``, not fatal."""
    _driver.set_active(StubDriver(arch_id))
    seen: dict[tuple, Scenario] = {}
    cap.mode = "probe"
    # Multiples of 16 first: a configuration is then shown at an aligned C where it has one.
    cols = sorted(set(PROBE_COLS) | {sc.n_cols for sc in SCENARIOS}, key=lambda c: (c % 16, c))
    try:
        for step in STEPS:
            for opt in step.probe_options or OPTIONS:
                for dtype in DTYPES:
                    for c in cols:
                        sc = Scenario(step, dtype, c, opt, probe=True)
                        cap.take()
                        try:
                            step.run(*_inputs(sc, COMPILE_ROWS))
                        except Exception as e:
                            errors.append(f"{step.name} {dtype} C={c} {opt}: {e}"[:300])
                        for call in cap.take():
                            seen.setdefault(_key(call), sc)
    finally:
        cap.mode = "compile"
    return seen


# ============================================================================================
# Output
# ============================================================================================


def _widths(counts: dict) -> str:
    order = {f".{w}": i for i, w in enumerate(_WIDTHS + ("32",))}
    items = sorted(counts.items(), key=lambda kv: (order.get("." + kv[0].split(".")[1], 99), kv[0]))
    return " ".join(f"{w}x{n}" for w, n in items) or "-"


def _per_pass(passes: list[dict], key: str, fmt: str, reliable: bool) -> str:
    vals = [p[key] for p in passes]
    text = format(vals[0], fmt)
    if len(vals) > 1:
        text = "+".join(format(v, fmt) for v in vals) + "=" + format(sum(vals), fmt)
    return text if reliable else "~" + text


_SHORT = {
    "_xent_fwd_kernel": "fwd",
    "_xent_bwd_kernel": "bwd",
    "_distill_fwd_kernel": "kd-fwd",
    "_distill_bwd_kernel": "kd-bwd",
    "_xent_split_kernel": "split",
}
_FLAGS = {
    "SINGLE_BLOCK": "1blk",
    "WRITE_GRAD": "grad",
    "PROB_TARGET": "prob",
    "HAS_WEIGHT": "w",
    "HAS_SMOOTHING": "eps",
    "HAS_SOFTCAP": "cap",
    "ROUND_BF16": "rnd",
    "LOGPROB": "logp",
    "ENT_GRAD": "dent",
}


def _flags(constexprs: dict) -> str:
    on = [_FLAGS.get(k, k) for k, v in constexprs.items() if v is True]
    other = [f"{k}={v}" for k, v in constexprs.items() if k != "BLOCK" and not isinstance(v, bool)]
    return ",".join(on + other) or "-"


def table(results: list[dict]) -> str:
    head = (
        "step", "dtype", "C", "options", "kernel", "BLOCK", "w", "flags", "regs", "spill",
        "smem", "CTA/SM", "EX2/logit", "instr/logit", "LDG", "STG", "N", "%floor",
    )  # fmt: skip
    rows = []
    for r in results:
        base = [r["step"] + (" (probe)" if r["probe"] else ""), r["dtype"], str(r["n_cols"])]
        base.append(r["options"])
        if "error" in r:
            rows.append(base + ["FAILED: " + r["error"].splitlines()[0][:120]])
            continue
        for i, k in enumerate(r["kernels"]):
            pred = r["prediction"]
            rows.append(
                base
                + [
                    _SHORT.get(k["kernel"], k["kernel"]),
                    str(k["constexprs"].get("BLOCK", "-")),
                    str(k["num_warps"]),
                    _flags(k["constexprs"]),
                    str(k["registers"]),
                    str(k["spill_bytes"]) + ("!" if k["spill_bytes"] or k["local_instrs"] else ""),
                    str(k["shared_bytes"]),
                    f"{k['programs_per_sm']} {k['programs_per_sm_limit']}",
                    _per_pass(k["passes"], "ex2_per_logit", ".2f", k["per_logit_reliable"]),
                    _per_pass(k["passes"], "instr_per_logit", ".1f", k["per_logit_reliable"]),
                    _widths(k["whole"]["ldg"]),
                    _widths(k["whole"]["stg"]),
                    str(pred["rows"]) if i == 0 else "",
                    f"{100 * pred['fraction_of_floor']:.0f}%" if i == 0 else "",
                ]
            )
    widths = [max(len(x[i]) for x in [head] + rows if i < len(x)) for i in range(len(head))]
    right = {2, 5, 6, 8, 9, 10, 16, 17}
    lines = []
    for x in [head] + rows:
        cells = [
            (c.rjust(w) if i in right else c.ljust(w)) if i < len(head) - 1 or i in right else c
            for i, (c, w) in enumerate(zip(x, widths, strict=False))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _name(r: dict) -> str:
    return f"{r['arch']} {r['step']} {r['dtype']} C={r['n_cols']} {r['options']}"


def _legend(arch: Arch) -> str:
    return (
        f"{arch.name} ({arch.card}): {arch.regs_per_sm} registers, {arch.threads_per_sm} "
        f"threads, {arch.smem_per_sm >> 10} KiB shared memory, {arch.ctas_per_sm} CTAs per SM; "
        f"floor at {arch.copy_bw / 1e12:.1f} TB/s, issue at {arch.issue_per_clock} warp-instr/clk "
        f"x {arch.sms} SMs x {arch.clock_hz / 1e9:.3g} GHz"
    )


NOTES = (
    "w = num_warps; spill = local-memory bytes per thread (! = spills); smem = bytes per CTA; "
    "CTA/SM = programs resident per SM and its limit; per-logit counts per pass (pass1+pass2=sum) "
    "for long rows (~: approximate, an unrolled loop or at most one logit per thread); "
    "LDG/STG = count by width, whole kernel; %floor = floor / max(floor, issue "
    "time) at N x C, ignoring latency (see the module docstring).",
    "Not in scope: the number of launches per step (another test counts launches).",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="comma-separated: 80, 90, 100 (default 90)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quick", action="store_true", help="a few scenarios, no probe (CI)")
    parser.add_argument("--no-probe", action="store_true", help="skip the coverage probe")
    args = parser.parse_args(argv)
    if xent.INTERPRET:
        parser.error("unset TRITON_INTERPRET: this tool compiles for the GPU")
    try:
        archs = [int(a) for a in args.arch.split(",")]
        for a in archs:
            ARCHS[a]  # noqa: B018
    except (ValueError, KeyError):
        parser.error(f"--arch takes a comma-separated subset of {sorted(ARCHS)}")
    # Triton 3.9 warns once that its FP-fusion default will change; a launch would compile the
    # same way (enable_fp_fusion is in the JSON).
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

    t0 = time.perf_counter()
    scenarios = [sc for sc in SCENARIOS if sc.quick or not args.quick]
    results, coverage = [], {}
    with Capture() as cap:
        saved = getattr(_driver, "_active", None)  # restored after (set_active has no undo)
        try:
            for a in archs:
                compiled = [(sc, *compile_scenario(cap, sc, a)) for sc in scenarios]
                if not (args.quick or args.no_probe):
                    errors: list[str] = []
                    picked = probe(cap, a, errors)
                    done = {_key(c) for _, _, calls in compiled for c in calls}
                    extra = [sc for key, sc in picked.items() if key not in done]
                    coverage[ARCHS[a].name] = {
                        "configurations": len(picked),
                        "added": len(extra),
                        "launcher_errors": len(errors),
                        "first_errors": errors[:5],
                    }
                    compiled += [(sc, *compile_scenario(cap, sc, a)) for sc in extra]
                results += [finish_scenario(out, sc, calls, a) for sc, out, calls in compiled]
        finally:
            _driver._active = saved
    elapsed = time.perf_counter() - t0

    failed = [r for r in results if "error" in r]
    spilled = [
        (r, k)
        for r in results
        for k in r.get("kernels", [])
        if k["spill_bytes"] or k["local_instrs"]
    ]
    if args.json:
        doc = {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "archs": {ARCHS[a].name: dataclasses.asdict(ARCHS[a]) for a in archs},
            "compile_rows": COMPILE_ROWS,
            "coverage": coverage,
            "results": results,
            "failed": len(failed),
            "spilled": len(spilled),
            "seconds": elapsed,
            "notes": list(NOTES),
        }
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(f"fused_xent static analysis: triton {triton.__version__}, torch {torch.__version__}")
        for a in archs:
            arch = ARCHS[a]
            print()
            print(_legend(arch))
            print(table([r for r in results if r["arch"] == arch.name]))
            if arch.name in coverage:
                c = coverage[arch.name]
                print(
                    f"coverage: {c['configurations']} (kernel, constexprs, num_warps) picked by "
                    "the launchers on C = powers of two and one more x dtypes x options x "
                    f"steps; {c['added']} not in a scenario, added as probe rows"
                )
                for e in c["first_errors"]:
                    print(f"  a launcher refused: {e}")
        print()
        for line in NOTES:
            print(line)
        for r in failed:
            print(f"FAILED {_name(r)}: {r['error']}")
        for r, k in spilled:
            print(
                f"SPILLS {_name(r)}: {k['kernel']} BLOCK {k['constexprs'].get('BLOCK')} x "
                f"{k['num_warps']} warps, {k['registers']} registers, {k['spill_bytes']} bytes "
                f"of local memory, {k['local_instrs']} LDL/STL"
            )
        print(
            f"{len(results)} scenarios, {len(_ANALYSES)} distinct kernels, {elapsed:.1f} s; "
            f"{len(failed)} failed, {len(spilled)} spilled"
        )
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
