"""What the pytest-benchmark suite and ``report.py`` share: the cases, the peers, the byte counts.

Bytes counted per case (``b`` = bytes per element of the logits dtype, targets and losses ignored):

* forward + backward of a mean loss: ``2 * N * C * b``  (read the logits once + write dx once)
* forward only (under ``no_grad``):  ``N * C * b``      (read the logits once)

That is the least any implementation must move, so bytes / time is an honest lower bound on the
bandwidth it reached, and the floor is those bytes at the copy bandwidth measured in the same run.

Nothing here needs more than torch (and Triton's ``do_bench`` on CUDA): the GPU machine has only
torch, triton, pytest and pytest-benchmark, and maybe a carried Liger-Kernel wheel.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fused_xent

FWD_BWD = "fwd+bwd"
FWD = "fwd"

# Rotate among enough distinct copies of the logits that one call never finds the previous call's
# data in L2 (50 MB on an H100): at least this many bytes, 2 to 8 copies.
ROTATE_BYTES = 1 << 30
ROTATE_MIN, ROTATE_MAX = 2, 8

# The copy that sets the floor: 2 GiB of fp32 copied device to device, read + write bytes counted
# (as in shared/anchors-h100.md). On the CPU a small copy only keeps the "%" column defined.
COPY_BYTES_CUDA = 2 << 30
COPY_BYTES_CPU = 32 << 20

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SHORT = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Case:
    mode: str  # FWD_BWD or FWD
    dtype: torch.dtype
    n_rows: int
    n_cols: int

    @property
    def nbytes_logits(self) -> int:
        return self.n_rows * self.n_cols * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_moved(self) -> int:
        # fwd+bwd: read x once + write dx once; fwd: read x once.
        return self.nbytes_logits * (2 if self.mode == FWD_BWD else 1)

    @property
    def dtype_name(self) -> str:
        return _SHORT[self.dtype]

    @property
    def shape(self) -> str:
        return f"{self.n_rows}x{self.n_cols}"

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.dtype_name}-{self.shape}"

    @property
    def label(self) -> str:
        return f"{self.dtype_name} {self.n_rows} x {self.n_cols}"


# The shapes: LLM vocabularies (32000 Llama-2, 128256 Llama-3, 256000 Gemma) at a few
# thousand tokens, plus two short rows (8192, 2048) where the whole row fits one block.
CUDA_CASES = [
    Case(FWD_BWD, torch.bfloat16, 32768, 2048),
    Case(FWD_BWD, torch.bfloat16, 16384, 8192),
    Case(FWD_BWD, torch.bfloat16, 8192, 32000),
    Case(FWD_BWD, torch.bfloat16, 8192, 128256),
    Case(FWD_BWD, torch.bfloat16, 4096, 256000),
    Case(FWD_BWD, torch.float32, 8192, 128256),
    Case(FWD, torch.bfloat16, 8192, 128256),
]

# CPU smoke shapes: tiny, a few vocabulary sizes so the plot has lines; milliseconds each.
CPU_CASES = [
    Case(FWD_BWD, torch.bfloat16, 64, 512),
    Case(FWD_BWD, torch.bfloat16, 64, 2048),
    Case(FWD_BWD, torch.bfloat16, 32, 8192),
    Case(FWD_BWD, torch.float32, 64, 2048),
    Case(FWD, torch.bfloat16, 64, 2048),
]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_threads(device: torch.device) -> None:
    """One intra-op thread for the CPU smoke runs.

    The CPU shapes are tiny, and waking a thread pool costs more than the work: on a busy 2-core
    machine torch eager fwd+bwd of 64 x 512 bf16 took ~24 ms with 2 threads, ~1 ms with one.
    """
    if device.type == "cpu":
        torch.set_num_threads(1)


def cases_for(device: torch.device, quick: bool = False) -> list[Case]:
    return CUDA_CASES if device.type == "cuda" and not quick else CPU_CASES


# --------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _first(out) -> torch.Tensor:
    # Liger versions return the loss, (loss, z_loss, ...) or an output object with .loss.
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "loss", out)


def _liger_loss() -> LossFn | None:
    """Liger's cross-entropy (mean), or None where Liger-Kernel does not import."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        module = LigerCrossEntropyLoss(reduction="mean")
        return lambda x, t: _first(module(x, t))
    except Exception:  # e.g. liger_kernel.transformers wants Hugging Face transformers
        pass
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception:
        return None
    # The Function's positional arguments changed across versions (``weight`` was added):
    # fill them by name, defaults for the rest.
    known = {"ignore_index": -100, "weight": None, "reduction": "mean"}
    params = list(inspect.signature(LigerCrossEntropyFunction.forward).parameters.values())[3:]
    if any(p.name not in known and p.default is inspect.Parameter.empty for p in params):
        return None
    if "reduction" not in [p.name for p in params]:
        return None
    last = [p.name for p in params].index("reduction")
    rest = [known.get(p.name, p.default) for p in params[: last + 1]]
    return lambda x, t: _first(LigerCrossEntropyFunction.apply(x, t, *rest))


def liger_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("liger-kernel", "liger_kernel", "liger-kernel-nightly"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


@dataclass(frozen=True)
class Impl:
    name: str
    note: str  # how it is called, for the report

    def skip_reason(self, case: Case, device: torch.device) -> str | None:
        if self.name == "torch.compile" and device.type != "cuda":
            # ~25 s to compile one tiny case on a 2-core machine: more than the whole CPU run.
            return "torch.compile is left out on the CPU (it compiles for longer than the run)"
        if self.name == "liger":
            if device.type != "cuda":
                return "Liger is Triton only: needs CUDA"
            if _liger_loss() is None:
                return "Liger-Kernel is not importable"
        if self.name == "fused_xent_inplace" and case.mode == FWD:
            return "forward only writes no gradient: in place is the same run as fused_xent"
        return None

    def loss_fn(self, case: Case, device: torch.device) -> LossFn:
        # The kernels on CUDA; on the CPU the reference path (the Triton interpreter is far too
        # slow to time, and its times would say nothing about the kernels).
        impl = "triton" if device.type == "cuda" else "reference"
        if self.name == "fused_xent":
            return lambda x, t: fused_xent.cross_entropy(x, t, impl=impl)
        if self.name == "fused_xent_inplace":
            return lambda x, t: fused_xent.cross_entropy(x, t, inplace_backward=True, impl=impl)
        if self.name == "torch":
            return F.cross_entropy
        if self.name == "torch.compile":
            # A fresh compile per case: one compiled function across many shapes would hit
            # dynamo's recompile limit (and fall back to eager) or go dynamic-shape.
            torch._dynamo.reset()
            return torch.compile(F.cross_entropy, dynamic=False)
        if self.name == "liger":
            fn = _liger_loss()
            assert fn is not None
            return fn
        raise ValueError(self.name)


IMPLS = [
    Impl(
        "fused_xent_inplace",
        "fused_xent.cross_entropy(x, t, inplace_backward=True): gradient over the logits, "
        "the comparison with Liger",
    ),
    Impl(
        "fused_xent",
        "fused_xent.cross_entropy(x, t): gradient in a new buffer, the comparison with torch",
    ),
    Impl("torch", "torch.nn.functional.cross_entropy, eager"),
    Impl("torch.compile", "torch.compile(F.cross_entropy, dynamic=False), compiled per case"),
    Impl("liger", "Liger-Kernel LigerCrossEntropyLoss(reduction='mean'): gradient in place"),
]
IMPLS_BY_NAME = {i.name: i for i in IMPLS}


def primary_impl(case: Case) -> str:
    """The fused_xent variant timed twice (first and last) to show the run-to-run noise."""
    return "fused_xent_inplace" if case.mode == FWD_BWD else "fused_xent"


def make_step(loss_fn: LossFn, mode: str):
    """One timed step: (x, t) -> (loss, dx or None).

    The gradient comes from ``torch.autograd.grad``, not ``loss.backward()``: with
    ``.backward()`` autograd's accumulate-into-``.grad`` clones a gradient that aliases the leaf
    (fused_xent's and Liger's in-place gradients), which would add a full read + write of the
    logits to exactly the implementations that avoid one.
    """
    if mode == FWD_BWD:

        def step(x, t):
            loss = loss_fn(x, t)
            (dx,) = torch.autograd.grad(loss, x)
            return loss, dx

    else:

        def step(x, t):
            with torch.no_grad():
                return loss_fn(x, t), None

    return step


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_inputs(
    case: Case, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """randn logits (never zeros: exp of a constant row is not what a real run sees) + targets."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.n_rows, case.n_cols, generator=g, device=device, dtype=case.dtype)
    t = torch.randint(0, case.n_cols, (case.n_rows,), generator=g, device=device)
    return x, t


class Rotation:
    """Several distinct copies of the logits (and targets), handed out in turn.

    In-place implementations overwrite their copy with its gradient; the next call on that copy
    then reads those (finite, non-zero) values: the bytes moved are the same.
    """

    def __init__(self, case: Case, device: torch.device, copies: int | None = None):
        if copies is None:
            copies = math.ceil(ROTATE_BYTES / max(case.nbytes_logits, 1))
            copies = max(ROTATE_MIN, min(ROTATE_MAX, copies))
        self.bufs = []
        for i in range(copies):
            x, t = make_inputs(case, device, seed=1000 + i)
            self.bufs.append((x.requires_grad_(case.mode == FWD_BWD), t))
        self._i = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, t = self.bufs[self._i]
        self._i = (self._i + 1) % len(self.bufs)
        return x, t

    def release(self) -> None:
        self.bufs.clear()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, quick: bool = False) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call), median.
    Elsewhere: a host clock read after a synchronisation, over a short time budget.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 100)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    budget_s, min_reps = (0.005, 3) if quick else (0.05, 5)
    fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start_all < budget_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: torch.device, *, quick: bool = False) -> tuple[float, int]:
    """(bytes per second, bytes copied) of a device-to-device fp32 copy, read + write counted."""
    nbytes = COPY_BYTES_CUDA if device.type == "cuda" else COPY_BYTES_CPU
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
    return 2 * nbytes / (ms * 1e-3), nbytes  # read src + write dst


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9
