"""What the pytest-benchmark suite and ``report.py`` share: the cases, the peers, the byte counts.

Bytes counted per case (``b`` = bytes per element of the logits dtype, targets and losses ignored):

* forward + backward of a mean loss: ``2 * N * C * b``  (read the logits once + write dx once)
* forward only (under ``no_grad``):  ``N * C * b``      (read the logits once)

That is the least any implementation must move, so bytes / time is an honest lower bound on the
bandwidth it reached, and the floor is those bytes at the copy bandwidth measured in the same run.

The RL step (``RLCase``: log p of sampled tokens and the entropy, incoming gradients on both):
``3 * N * C * b``. The incoming gradients arrive only in the backward, so unlike a mean loss's the
gradient cannot be written in the forward: read the logits once in the forward, once more in the
backward, and write the gradient once.

The fused linear + cross-entropy (``LinearCase``: hidden (N, D), weight (V, D)) is counted in
flops instead: ``6 * N * D * V`` for forward + backward, the three matrix products of
``2 * N * D * V`` each (logits, d_hidden, d_weight); its floor is those flops at the bf16 matrix
product rate measured in the same run (``matmul_rate``).

Knowledge distillation (``DistillCase``, on given logits): ``3 * N * V * b``, one read of the
student's logits and of the teacher's and one write of the student's gradient. Its linear form
(``LinearDistillCase``: both models' hidden states and LM heads) has two floors, and the larger
one counts: flops, ``6 * N * V * D_s + 2 * N * V * D_t`` (the student's three products, the
teacher's forward one), at the matrix product rate; and bytes, at the copy bandwidth
(``LinearDistillCase.bytes_moved`` says what is counted).

Nothing here needs more than torch (and Triton's ``do_bench`` on CUDA): the GPU machine has only
torch, triton, pytest and pytest-benchmark, and maybe carried Liger-Kernel, cut-cross-entropy and
TRL wheels (TRL's fused head then runs from its own file, ``_trl_head_files``).
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

# The matrix product that sets the linear floor: bf16 (n x n) @ (n x n), 2 n^3 flops (as in
# shared/anchors-h100.md: 8192^3). The CPU has no fast bf16 product (~1 GFLOP/s on one thread
# here): 128^3 keeps the column defined in ~5 ms a call.
MATMUL_N_CUDA = 8192
MATMUL_N_CPU = 128

# do_bench's time budget for one linear step: 20-150 ms a step, so the default 100 ms would be a
# median of one to five calls; 500 ms gives at least three at the slowest peer.
LINEAR_REP_MS = 500

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
    def bytes_counted(self) -> str:
        return "read logits + write grad" if self.mode == FWD_BWD else "read logits"

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


@dataclass(frozen=True)
class RLCase(Case):
    """``token_logprobs(x, t, return_entropy=True)``, forward + backward (mode ``FWD_BWD``)."""

    @property
    def bytes_moved(self) -> int:
        # Forward: read x once; backward: read x once more + write dx once (module docstring).
        return 3 * self.nbytes_logits

    @property
    def bytes_counted(self) -> str:
        return "read logits twice + write grad"

    @property
    def id(self) -> str:
        return f"rl-{self.dtype_name}-{self.shape}"


# The RL step: Llama-3 and Qwen vocabularies at a rollout batch's tokens.
RL_CUDA_CASES = [
    RLCase(FWD_BWD, torch.bfloat16, 8192, 128256),
    RLCase(FWD_BWD, torch.bfloat16, 16384, 151936),
]
RL_CPU_CASES = [RLCase(FWD_BWD, torch.bfloat16, 64, 2048)]

# GRPO's default sampling temperature in TRL and verl; the trainers' recipe divides by it anyway.
RL_TEMPERATURE = 1.0


@dataclass(frozen=True)
class LinearCase:
    """Loss of ``hidden (N, D) @ weight (V, D).T`` against (N,) targets, forward + backward."""

    n_rows: int  # N tokens
    dim: int  # D hidden size
    vocab: int  # V classes
    dtype: torch.dtype = torch.bfloat16

    mode = FWD_BWD

    @property
    def flops(self) -> int:
        # logits = h @ W.T, d_hidden = dlogits @ W, d_weight = dlogits.T @ h: 2 N D V each.
        return 6 * self.n_rows * self.dim * self.vocab

    @property
    def nbytes_hidden(self) -> int:
        return self.n_rows * self.dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return _SHORT[self.dtype]

    @property
    def id(self) -> str:
        return f"linear-{self.dtype_name}-{self.n_rows}x{self.dim}x{self.vocab}"

    @property
    def label(self) -> str:
        return f"{self.dtype_name} {self.n_rows} x {self.dim}, W {self.vocab} x {self.dim}"


# The LM heads, as the anchors measured the peers: Llama-3 (V 128256, D 4096) and
# Gemma-2-2B (V 256000, D 2304) at 8192 tokens, Llama-2 (V 32000, D 4096) at 16384.
LINEAR_CUDA_CASES = [
    LinearCase(8192, 4096, 128256),
    LinearCase(8192, 2304, 256000),
    LinearCase(16384, 4096, 32000),
]

# One CPU smoke shape: bf16 products run at ~1 GFLOP/s on this CPU, so even this is ~0.15 s a step.
LINEAR_CPU_CASES = [LinearCase(256, 64, 2048)]


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


def rl_cases_for(device: torch.device, quick: bool = False) -> list[RLCase]:
    return RL_CUDA_CASES if device.type == "cuda" and not quick else RL_CPU_CASES


def linear_cases_for(device: torch.device, quick: bool = False) -> list[LinearCase]:
    return LINEAR_CUDA_CASES if device.type == "cuda" and not quick else LINEAR_CPU_CASES


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
    rest = _args_by_name(LigerCrossEntropyFunction, 2, {"weight": None})
    if rest is None:
        return None
    return lambda x, t: _first(LigerCrossEntropyFunction.apply(x, t, *rest))


def _args_by_name(function, n_lead: int, known: dict) -> list | None:
    """The positional arguments of a Liger autograd Function after its first ``n_lead`` tensors.

    Their order changed across versions (``weight``, ``ce_weight``, ``lse_square_scale`` were
    added in the middle): fill them by name up to ``reduction``, defaults for the rest. None when
    one without a default is not known here, or when there is no ``reduction``.
    """
    known = {"ignore_index": -100, "reduction": "mean", **known}
    params = list(inspect.signature(function.forward).parameters.values())[1 + n_lead :]  # ctx
    if any(p.name not in known and p.default is inspect.Parameter.empty for p in params):
        return None
    names = [p.name for p in params]
    if "reduction" not in names:
        return None
    return [known.get(p.name, p.default) for p in params[: names.index("reduction") + 1]]


def _dist_version(*dists: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def liger_version() -> str | None:
    return _dist_version("liger-kernel", "liger_kernel", "liger-kernel-nightly")


def cce_version() -> str | None:
    return _dist_version("cut-cross-entropy", "cut_cross_entropy")


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


# --------------------------------------------------------------------------------------------
# The RL step: log p of the sampled tokens and the entropy, with gradients through both
# --------------------------------------------------------------------------------------------


def rl_eager(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(t) and the entropy as RL trainers compute them (TRL's ``selective_log_softmax`` and
    ``entropy_from_logits``, without their loops over rows): a float32 log-softmax of the logits
    over the temperature, a gather, and the entropy from the probabilities."""
    logp_all = torch.log_softmax(x.float() / RL_TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@dataclass(frozen=True)
class RLImpl(Impl):
    """An RL peer: ``loss_fn(x, t, *incoming gradients) -> (logp, entropy)`` (``make_step``)."""

    def loss_fn(self, case: Case, device: torch.device):
        # impl="auto" on the CPU: its fast path there (the Triton interpreter is too slow to time).
        impl = "triton" if device.type == "cuda" else "auto"
        if self.name.startswith("fused_xent"):
            inplace = self.name == "fused_xent_inplace"
            return lambda x, t, *_: fused_xent.token_logprobs(
                x, t, temperature=RL_TEMPERATURE, return_entropy=True,
                inplace_backward=inplace, impl=impl,
            )  # fmt: skip
        if self.name == "torch":
            return lambda x, t, *_: rl_eager(x, t)
        if self.name == "torch.compile":
            torch._dynamo.reset()  # a fresh compile per case, as Impl.loss_fn
            fn = torch.compile(rl_eager, dynamic=False)
            return lambda x, t, *_: fn(x, t)
        raise ValueError(self.name)


RL_IMPLS = [
    RLImpl(
        "fused_xent",
        "fused_xent.token_logprobs(x, t, return_entropy=True): gradient in a new buffer",
    ),
    RLImpl("fused_xent_inplace", "the same with inplace_backward=True: gradient over the logits"),
    RLImpl(
        "torch",
        "the trainers' eager recipe (benchlib.rl_eager): float32 log_softmax(x / T), gather, "
        "entropy from the probabilities",
    ),
    RLImpl("torch.compile", "torch.compile(rl_eager, dynamic=False), compiled per case"),
]
RL_IMPLS_BY_NAME = {i.name: i for i in RL_IMPLS}
RL_PRIMARY = "fused_xent"  # timed twice, first and last, as primary_impl()


# --------------------------------------------------------------------------------------------
# The fused linear + cross-entropy implementations
# --------------------------------------------------------------------------------------------

LinearLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (h, W, t)


def _liger_linear_loss() -> LinearLossFn | None:
    """Liger's fused linear cross-entropy (mean) as ``(h, W, t) -> loss``, or None."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        module = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        # forward(lin_weight, _input, target, bias=None) in every version seen: weight first.
        first = next(iter(inspect.signature(module.forward).parameters))
        if "weight" in first:
            return lambda h, w, t: _first(module(w, h, t))
        return lambda h, w, t: _first(module(h, w, t))
    except Exception:  # e.g. liger_kernel.transformers wants Hugging Face transformers
        pass
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction as Function,
        )
    except Exception:
        return None
    # forward(ctx, _input, weight, target, bias, [ce_weight,] ignore_index, ...)
    rest = _args_by_name(Function, 3, {"bias": None, "ce_weight": None})
    if rest is None:
        return None
    return lambda h, w, t: _first(Function.apply(h, w, t, *rest))


def _cce_loss() -> LinearLossFn | None:
    """Apple's cut-cross-entropy with its defaults (impl "cce", mean), or None."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return None
    return lambda h, w, t: linear_cross_entropy(h, w, t)  # (embeddings, classifier, targets)


def _torch_lce_loss(chunked: bool) -> LinearLossFn | None:
    """torch's own ``F.linear_cross_entropy`` (torch >= 2.13), or None where torch lacks it.

    ``options=None`` is its reference path (``F.linear`` then ``F.cross_entropy``: the full
    logits); ``LinearCrossEntropyOptions()`` its chunked path with the defaults ("auto" chunking
    and accumulation policy per device and dtype).
    """
    fn = getattr(F, "linear_cross_entropy", None)
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or (chunked and options_type is None):
        return None
    options = options_type() if chunked else None
    return lambda h, w, t: fn(h, w, t, options=options)


def _trl_head_files():
    """``(ChunkedLogProbFunction, tile)`` from the installed TRL wheel's own files where the
    package does not import (the GPU machine has no transformers, datasets or pandas, which
    ``import trl.kernels`` pulls in): ``trl/kernels/chunked_logprob.py`` loaded as it is, under a
    package name of its own, with the two names it imports from elsewhere given: transformers'
    ``is_triton_available`` (Triton imports) and ``trl.trainer.utils.maybe_gather_lm_head_ctx``
    (a null context, what it returns without DeepSpeed ZeRO-3); the tile is read from
    ``trl/trainer/utils.py``. None without the files."""
    import contextlib
    import importlib.util
    import re
    import sys
    import types

    spec = importlib.util.find_spec("trl")  # (finds the package without running it)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = spec.submodule_search_locations[0]
    try:
        with open(f"{root}/trainer/utils.py") as f:
            tile = int(re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE = (\d+)", f.read(), re.M)[1])
    except (OSError, TypeError):
        return None
    name = "_fused_xent_bench_trl"
    if name + ".kernels.chunked_logprob" in sys.modules:
        return sys.modules[name + ".kernels.chunked_logprob"].ChunkedLogProbFunction, tile
    utils = types.ModuleType("transformers.utils")
    utils.is_triton_available = lambda: importlib.util.find_spec("triton") is not None
    trainer_utils = types.ModuleType(name + ".trainer.utils")
    trainer_utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    packages = {name: f"{root}", name + ".kernels": f"{root}/kernels", name + ".trainer": ""}
    for pkg, path in packages.items():
        sys.modules[pkg] = types.ModuleType(pkg)
        sys.modules[pkg].__path__ = [path]
    sys.modules[name + ".trainer.utils"] = trainer_utils
    try:  # (a stub only for the file's import line)
        stub = importlib.util.find_spec("transformers") is None
    except ValueError:  # (a module without a spec in sys.modules: stands in for none)
        stub = True
    before = {m: sys.modules.get(m, sys) for m in ("transformers", "transformers.utils")}
    if stub:
        sys.modules["transformers"] = types.ModuleType("transformers")
        sys.modules["transformers.utils"] = utils
    try:
        file_spec = importlib.util.spec_from_file_location(
            name + ".kernels.chunked_logprob", f"{root}/kernels/chunked_logprob.py"
        )
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[file_spec.name] = module
        file_spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name + ".kernels.chunked_logprob", None)
        return None
    finally:
        for m, was in before.items() if stub else ():  # (as it was: absent, or None)
            if was is sys:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = was
    return module.ChunkedLogProbFunction, tile


def _trl_head_loss() -> LinearLossFn | None:
    """TRL's own fused LM head (``ChunkedLogProbFunction``, ``trl/kernels/``) as SFT calls it
    (log-probs, entropy and top-1 asked for, TRL's vocabulary tile), the loss the mean of -log p;
    None where TRL (>= 1.16) is neither importable nor installed (``_trl_head_files``). Its own
    function, never fused_xent's dispatch."""
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as tile
    except Exception:
        found = _trl_head_files()
        if found is None:
            return None
        ChunkedLogProbFunction, tile = found
    outputs = ("log_probs", "entropy", "is_top1")

    def loss(h, w, t):
        logp = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, tile, None, 1.0, outputs)[0]
        return -logp.mean()

    return loss


def _hf_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Hugging Face's LM loss: full logits in the weight's dtype, upcast to float32, then the loss.
    return F.cross_entropy(F.linear(h, w).float(), t)


@dataclass(frozen=True)
class LinearImpl:
    name: str
    note: str  # how it is called, for the report

    def skip_reason(self, case: LinearCase, device: torch.device) -> str | None:
        if self.name in ("liger", "cce"):
            if device.type != "cuda":
                return "Triton only: needs CUDA"
            if (_liger_linear_loss if self.name == "liger" else _cce_loss)() is None:
                what = "Liger-Kernel" if self.name == "liger" else "cut-cross-entropy"
                return f"{what} is not importable"
        if (
            self.name.startswith("torch_lce")
            and _torch_lce_loss(self.name.endswith("chunked")) is None
        ):
            return f"torch {torch.__version__} has no F.linear_cross_entropy / its options"
        if self.name == "trl" and _trl_head_loss() is None:
            return "TRL (>= 1.16, its trl.kernels) is not importable"
        return None

    def loss_fn(self, case: LinearCase, device: torch.device) -> LinearLossFn:
        impl = "triton" if device.type == "cuda" else "reference"  # as Impl.loss_fn
        if self.name == "fused_xent":
            return lambda h, w, t: fused_xent.linear_cross_entropy(h, w, t, impl=impl)
        if self.name == "fused_xent_logprobs":
            return lambda h, w, t: (
                -fused_xent.linear_token_logprobs(h, w, t, return_entropy=True, impl=impl)[0].mean()
            )
        if self.name == "fused_xent_rows":
            rows = linear_chunk_rows(case.n_rows, case.vocab, case.dim, case.dtype, device)
            return lambda h, w, t: fused_xent.linear_cross_entropy(
                h, w, t, chunk_size=rows, impl=impl
            )
        if self.name == "torch":
            return _hf_loss
        if self.name.startswith("torch_lce"):
            fn = _torch_lce_loss(self.name.endswith("chunked"))
            assert fn is not None
            return fn
        fn = {"liger": _liger_linear_loss, "cce": _cce_loss, "trl": _trl_head_loss}[self.name]()
        assert fn is not None
        return fn


def linear_chunk_rows(n_rows, vocab, dim, dtype, device, heads: int = 1) -> int:
    """The rows per chunk of the row-chunk plan as fused_xent picks it (``heads`` logit chunks
    at once: 2 for distillation)."""
    from fused_xent.autograd import pick_chunk_size

    return int(pick_chunk_size(n_rows, heads * vocab, dim, dtype, device.type != "cuda"))


LINEAR_IMPLS = [
    LinearImpl(
        "fused_xent",
        "fused_xent.linear_cross_entropy(h, W, t), the default plan: vocabulary slabs (four "
        "products, one slab of logits in flight, d_weight[slab] one product)",
    ),
    LinearImpl(
        "fused_xent_rows",
        "the same with chunk_size= the rows fused_xent's row-chunk rule picks: memory for speed "
        "(three products, a float32 (V, D) d_weight accumulator)",
    ),
    LinearImpl(
        "fused_xent_logprobs",
        "fused_xent.linear_token_logprobs(h, W, t, return_entropy=True), loss = mean of -log p: "
        "what fused_xent.hf serves TRL's fused head with (compare with trl)",
    ),
    LinearImpl(
        "torch",
        "F.cross_entropy(F.linear(h, W).float(), t), eager, as Hugging Face computes the loss",
    ),
    LinearImpl(
        "torch_lce",
        "torch's own F.linear_cross_entropy(h, W, t) (torch >= 2.13), options=None: its "
        "reference path, F.linear then F.cross_entropy on the full logits",
    ),
    LinearImpl(
        "torch_lce_chunked",
        "F.linear_cross_entropy(h, W, t, options=LinearCrossEntropyOptions()): torch's chunked "
        "path with its defaults (chunk size and accumulation policy 'auto' per device and dtype)",
    ),
    LinearImpl(
        "liger",
        "Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction='mean')(W, h, t)",
    ),
    LinearImpl(
        "cce",
        "cut_cross_entropy.linear_cross_entropy(h, W, t), defaults (impl 'cce', its gradient "
        "filtering on)",
    ),
    LinearImpl(
        "trl",
        "TRL's fused LM head, trl.kernels.ChunkedLogProbFunction, as its SFT trainer asks it "
        "(log-probs, entropy, top-1; its 32768-class tiles), loss = mean of -log p: what TRL "
        "users have without fused_xent",
    ),
]
LINEAR_IMPLS_BY_NAME = {i.name: i for i in LINEAR_IMPLS}
LINEAR_PRIMARY = "fused_xent"  # timed twice, first and last, as primary_impl()


# --------------------------------------------------------------------------------------------
# Knowledge distillation: on given logits, and from the hidden states (the linear form)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillCase:
    """Distillation of (N, V) student logits towards a teacher's, forward + backward of a mean."""

    dtype: torch.dtype
    n_rows: int
    n_cols: int
    beta: float

    mode = FWD_BWD

    @property
    def nbytes_logits(self) -> int:
        return self.n_rows * self.n_cols * self.dtype.itemsize

    @property
    def bytes_moved(self) -> int:
        return 3 * self.nbytes_logits  # read the student + read the teacher + write its gradient

    @property
    def bytes_counted(self) -> str:
        return "read student and teacher logits + write grad"

    @property
    def dtype_name(self) -> str:
        return _SHORT[self.dtype]

    @property
    def id(self) -> str:
        return f"distill-{self.dtype_name}-{self.n_rows}x{self.n_cols}-beta{self.beta:g}"

    @property
    def label(self) -> str:
        return f"{self.dtype_name} {self.n_rows} x {self.n_cols}, beta {self.beta:g}"


# The issue's shape: Llama-3's vocabulary at 8192 tokens, the forward KL and the JSD.
DISTILL_CUDA_CASES = [
    DistillCase(torch.bfloat16, 8192, 128256, 0.0),
    DistillCase(torch.bfloat16, 8192, 128256, 0.5),
]
DISTILL_CPU_CASES = [
    DistillCase(torch.bfloat16, 64, 2048, 0.0),
    DistillCase(torch.bfloat16, 64, 2048, 0.5),
]


@dataclass(frozen=True)
class LinearDistillCase:
    """Distillation from hidden states: student (N, D_s) with head (V, D_s), teacher (N, D_t)
    with head (V, D_t), forward + backward of a mean with d_hidden and d_weight of the student."""

    n_rows: int  # N tokens
    dim: int  # D_s, the student's hidden size
    teacher_dim: int  # D_t
    vocab: int  # V
    beta: float
    dtype: torch.dtype = torch.bfloat16

    mode = FWD_BWD

    @property
    def flops(self) -> int:
        # The student's logits, d_hidden and d_weight (2 N V D_s each) and the teacher's logits.
        return 2 * self.n_rows * self.vocab * (3 * self.dim + self.teacher_dim)

    @property
    def nbytes_hidden(self) -> int:
        return self.n_rows * (self.dim + self.teacher_dim) * self.dtype.itemsize

    @property
    def bytes_moved(self) -> int:
        """What any implementation that makes the logits a chunk of rows at a time moves: read
        both heads and both hidden states once, write d_hidden and d_weight once (in the
        parameters' dtype; a float32 accumulator is an implementation's choice, not counted),
        and per logit 7 x its bytes: each chunk of student and teacher logits written by its
        product and read by the loss (4), the student's gradient written (1) and read by the
        d_hidden and d_weight products (2). A fused kernel that kept the logits on chip would
        need less; none of the peers here does."""
        b = self.dtype.itemsize
        heads = self.vocab * (self.dim + self.teacher_dim) * b
        grads = (self.n_rows + self.vocab) * self.dim * b
        return heads + self.nbytes_hidden + grads + 7 * self.n_rows * self.vocab * b

    @property
    def dtype_name(self) -> str:
        return _SHORT[self.dtype]

    @property
    def id(self) -> str:
        dims = f"{self.n_rows}x{self.dim}x{self.teacher_dim}x{self.vocab}"
        return f"distill-linear-{self.dtype_name}-{dims}-beta{self.beta:g}"

    @property
    def label(self) -> str:
        return (
            f"{self.dtype_name} {self.n_rows} x {self.dim} (teacher {self.teacher_dim}), "
            f"W {self.vocab}, beta {self.beta:g}"
        )


# Llama-3's head (V 128256, D 4096) as the student, a wider teacher (D 5120: 6% more flops than
# 4096, and the hidden sizes differ, as the API allows) at 8192 tokens.
LINEAR_DISTILL_CUDA_CASES = [
    LinearDistillCase(8192, 4096, 5120, 128256, 0.0),
    LinearDistillCase(8192, 4096, 5120, 128256, 0.5),
]
# CPU smoke shapes: about a millisecond a step.
LINEAR_DISTILL_CPU_CASES = [
    LinearDistillCase(64, 32, 48, 512, 0.0),
    LinearDistillCase(64, 32, 48, 512, 0.5),
]


def distill_cases_for(device: torch.device, quick: bool = False) -> list[DistillCase]:
    return DISTILL_CUDA_CASES if device.type == "cuda" and not quick else DISTILL_CPU_CASES


def linear_distill_cases_for(device: torch.device, quick: bool = False):
    cuda = device.type == "cuda" and not quick
    return LINEAR_DISTILL_CUDA_CASES if cuda else LINEAR_DISTILL_CPU_CASES


def eager_distillation(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized_jsd_loss at temperature 1, "batchmean": float32 log-softmaxes of both
    (float64 for float64 logits: the accuracy reference)."""
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    log_s = torch.log_softmax(s.to(dtype), dim=-1)
    log_t = torch.log_softmax(t.to(dtype), dim=-1)
    if beta == 0.0:
        div = F.kl_div(log_s, log_t, reduction="none", log_target=True)
    elif beta == 1.0:
        div = F.kl_div(log_t, log_s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_s.dtype, device=s.device)
        log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), 0)
        div = beta * F.kl_div(log_m, log_t, reduction="none", log_target=True) + (
            1 - beta
        ) * F.kl_div(log_m, log_s, reduction="none", log_target=True)
    return div.sum() / div.shape[0]


def linear_distill_eager(hs, ws, ht, wt, beta: float) -> torch.Tensor:
    """The unfused linear form: both heads' full logits by F.linear in the inputs' dtype (the
    teacher's under no_grad, as a trainer runs its teacher), then ``eager_distillation``."""
    with torch.no_grad():
        teacher = F.linear(ht, wt)
    return eager_distillation(F.linear(hs, ws), teacher, beta)


def _liger_linear_jsd(beta: float):
    """Liger-Kernel's fused linear JSD as ``(hs, ws, ht, wt) -> loss`` at temperature 1, or
    (None, why) where it does not import or its signature is not the one whose equivalence was
    checked.

    Checked in its source (``liger_kernel/ops/jsd.py``, ``fused_linear_jsd.py``): with X the
    student's log-probabilities and Y the teacher's, ``jsd_beta`` gives ``beta KL(P_t || M) +
    (1 - beta) KL(P_s || M)``, ``M = beta P_t + (1 - beta) P_s``, beta 0 the forward KL and 1 the
    reverse: this package's parameterisation. Both logits are divided by ``temperature``, with
    no ``T**2`` factor. The loss is the sum over tokens divided by the tokens not ignored (all of
    them without labels, as here): its "batchmean" over tokens is the "mean" of
    ``distillation_loss`` without a target.
    """
    try:
        try:
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        except Exception:  # liger_kernel.transformers may want Hugging Face transformers
            LigerFusedLinearJSD = None
        if LigerFusedLinearJSD is not None:
            init = inspect.signature(LigerFusedLinearJSD.__init__).parameters
            if {"jsd_beta", "temperature"} <= set(init):
                module = LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)
                # forward(student_input, student_weight, teacher_input, teacher_weight,
                # shift_labels)
                return (lambda hs, ws, ht, wt: _first(module(hs, ws, ht, wt, None))), None
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction as Function
    except Exception as exc:
        return None, f"Liger-Kernel's fused linear JSD is not importable ({type(exc).__name__})"
    known = {"shift_labels": None, "jsd_beta": beta, "ignore_index": -100, "temperature": 1.0}
    params = list(inspect.signature(Function.forward).parameters.values())[5:]  # ctx + 4 tensors
    names = [p.name for p in params]
    if not {"jsd_beta", "temperature"} <= set(names) or any(
        p.name not in known and p.default is inspect.Parameter.empty for p in params
    ):
        return None, f"Liger's LigerFusedLinearJSDFunction{tuple(names)}: parameters not known here"
    rest = [known.get(p.name, p.default) for p in params]
    return (lambda hs, ws, ht, wt: _first(Function.apply(hs, ws, ht, wt, *rest))), None


@dataclass(frozen=True)
class DistillImpl:
    """A distillation peer on given logits: ``loss_fn(s, t)``, or on hidden states
    (``linear``): ``loss_fn(hs, ws, ht, wt)``; the mean loss at temperature 1."""

    name: str
    note: str
    linear: bool = False

    def skip_reason(self, case, device: torch.device) -> str | None:
        if self.name == "liger":
            if device.type != "cuda":
                return "Triton only: needs CUDA"
            return _liger_linear_jsd(case.beta)[1]
        return None

    def loss_fn(self, case, device: torch.device):
        # impl="auto" on the CPU: its fast path there (and the reference for the linear form).
        impl = "triton" if device.type == "cuda" else "auto"
        beta = case.beta
        if self.name.startswith("fused_xent") and self.linear:
            rows = None
            if self.name == "fused_xent_rows":
                rows = linear_chunk_rows(case.n_rows, case.vocab, case.dim, case.dtype, device, 2)
            return lambda hs, ws, ht, wt: fused_xent.linear_distillation_loss(
                hs, ws, ht, wt, beta=beta, chunk_size=rows, impl=impl
            )
        if self.name == "fused_xent":
            return lambda s, t: fused_xent.distillation_loss(s, t, beta=beta, impl=impl)
        if self.name == "torch" and self.linear:
            return lambda hs, ws, ht, wt: linear_distill_eager(hs, ws, ht, wt, beta)
        if self.name == "torch":
            return lambda s, t: eager_distillation(s, t, beta)
        if self.name == "liger":
            fn, why = _liger_linear_jsd(beta)
            assert fn is not None, why
            return fn
        raise ValueError(self.name)


DISTILL_IMPLS = [
    DistillImpl("fused_xent", "fused_xent.distillation_loss(s, t, beta=beta): gradient in a new "
                "buffer"),
    DistillImpl("torch", "the float32 eager recipe (TRL's generalized_jsd_loss): log_softmax of "
                "both in float32, F.kl_div, sum / N"),
]  # fmt: skip
LINEAR_DISTILL_IMPLS = [
    DistillImpl("fused_xent", "fused_xent.linear_distillation_loss(hs, Ws, ht, Wt, beta=beta), "
                "the default plan: vocabulary slabs", linear=True),
    DistillImpl("fused_xent_rows", "the same with chunk_size= the row-chunk rule's rows (memory "
                "for speed)", linear=True),
    DistillImpl("torch", "unfused: F.linear of both in bf16 (the teacher's under no_grad), then "
                "the float32 eager recipe", linear=True),
    DistillImpl("liger", "Liger-Kernel LigerFusedLinearJSD(jsd_beta=beta, temperature=1)(hs, Ws, "
                "ht, Wt, None) (or LigerFusedLinearJSDFunction), its defaults otherwise",
                linear=True),
]  # fmt: skip
DISTILL_IMPLS_BY_NAME = {i.name: i for i in DISTILL_IMPLS}
LINEAR_DISTILL_IMPLS_BY_NAME = {i.name: i for i in LINEAR_DISTILL_IMPLS}
DISTILL_PRIMARY = "fused_xent"  # timed twice, first and last, as primary_impl()


def make_step(loss_fn, mode: str, n_grad: int = 1):
    """One timed step: ``(*inputs) -> (loss, *gradients of the first n_grad inputs)``.

    Cross-entropy: ``(x, t) -> (loss, dx)``, ``(loss, None)`` forward only. Linear (``n_grad=2``):
    ``(h, W, t) -> (loss, d_hidden, d_weight)``. RL (a ``loss_fn`` that returns the tuple
    ``(logp, entropy)``): ``(x, t, a, b) -> (logp, entropy, dx)``, ``a`` and ``b`` their incoming
    gradients (the gradient of ``(logp * a + entropy * b).sum()``).

    The gradients come from ``torch.autograd.grad``, not ``loss.backward()``: with
    ``.backward()`` autograd's accumulate-into-``.grad`` clones a gradient that aliases the leaf
    (fused_xent's and Liger's in-place gradients), which would add a full read + write of the
    logits to exactly the implementations that avoid one. For the linear loss ``.backward()``
    would also need ``W.grad`` reset between timed calls, or each call would add its d_weight into
    it: one more (V, D) read + write.
    """
    if mode == FWD_BWD:

        def step(*inputs):
            loss = loss_fn(*inputs)
            if isinstance(loss, tuple):  # RL: the inputs after (x, t) are the incoming gradients
                return (*loss, *torch.autograd.grad(loss, inputs[:n_grad], inputs[2:]))
            return (loss, *torch.autograd.grad(loss, inputs[:n_grad]))

    else:

        def step(*inputs):
            with torch.no_grad():
                return loss_fn(*inputs), None

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


def make_linear_weight(case: LinearCase, device: torch.device, seed: int = 7) -> torch.Tensor:
    """randn (V, D) weight scaled by D^-1/2, so that randn hidden states give logits ~ N(0, 1).

    Unscaled, the logits would have a standard deviation of sqrt(D) = 48-64 and each row's
    softmax would be one-hot: an easy, unrealistic loss.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(case.vocab, case.dim, generator=g, device=device, dtype=case.dtype)
    return w.mul_(case.dim**-0.5)


def make_linear_inputs(
    case: LinearCase, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """randn hidden states (N, D) + targets (N,); the weight comes from make_linear_weight."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(case.n_rows, case.dim, generator=g, device=device, dtype=case.dtype)
    t = torch.randint(0, case.vocab, (case.n_rows,), generator=g, device=device)
    return h, t


def _rotation_copies(nbytes: int) -> int:
    return max(ROTATE_MIN, min(ROTATE_MAX, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


class Rotation:
    """Several distinct copies of the logits (and targets), handed out in turn.

    In-place implementations overwrite their copy with its gradient; the next call on that copy
    then reads those (finite, non-zero) values: the bytes moved are the same.
    """

    def __init__(self, case: Case, device: torch.device, copies: int | None = None):
        copies = copies or _rotation_copies(case.nbytes_logits)
        self.bufs = []
        for i in range(copies):
            x, t = make_inputs(case, device, seed=1000 + i)
            self.bufs.append((x.requires_grad_(case.mode == FWD_BWD), t))
        self._i = 0

    def next(self) -> tuple[torch.Tensor, ...]:
        inputs = self.bufs[self._i]
        self._i = (self._i + 1) % len(self.bufs)
        return inputs

    def release(self) -> None:
        self.bufs.clear()


def rl_grads(case: Case, device: torch.device, seed: int = 99) -> tuple[torch.Tensor, ...]:
    """Incoming gradients of log p and the entropy: randn (N,) float32 each (per-token advantages
    and entropy coefficients; both terms of the gradient are then of the same size)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(2, case.n_rows, generator=g, device=device))


class RLRotation(Rotation):
    """The logits' copies with the incoming gradients of the RL step: ``next()`` gives
    ``(x, t, a, b)``."""

    def __init__(self, case: RLCase, device: torch.device, copies: int | None = None):
        super().__init__(case, device, copies)
        self.bufs = [(x, t, *rl_grads(case, device, seed=i)) for i, (x, t) in enumerate(self.bufs)]


class LinearRotation(Rotation):
    """Distinct hidden states (and targets) in turn, all with the one weight, as in training.

    ``next()`` gives ``(h, W, t)``, h and W requiring grad. The copy count follows the same rule
    on the hidden bytes (36-128 MiB at the GPU shapes: 8 copies).
    """

    def __init__(self, case: LinearCase, device: torch.device, copies: int | None = None):
        copies = copies or _rotation_copies(case.nbytes_hidden)
        w = make_linear_weight(case, device).requires_grad_(True)
        self.bufs = []
        for i in range(copies):
            h, t = make_linear_inputs(case, device, seed=1000 + i)
            self.bufs.append((h.requires_grad_(True), w, t))
        self._i = 0


def distill_inputs(case: DistillCase, device: torch.device, seed: int = 0):
    """randn student logits (requiring grad) and a sharper teacher's (randn x 2)."""
    shape = Case(FWD_BWD, case.dtype, case.n_rows, case.n_cols)
    s, _ = make_inputs(shape, device, seed=1000 + seed)
    t, _ = make_inputs(shape, device, seed=2000 + seed)
    return s.requires_grad_(True), t.mul_(2)


class DistillRotation(Rotation):
    """Distinct (student, teacher) pairs in turn (2-8, 1 GiB in all where 8 allow)."""

    def __init__(self, case: DistillCase, device: torch.device, copies: int | None = None):
        copies = copies or _rotation_copies(2 * case.nbytes_logits)
        self.bufs = [distill_inputs(case, device, seed=1 + i) for i in range(copies)]
        self._i = 0


def make_linear_distill_weights(case: LinearDistillCase, device: torch.device):
    """The student's and the teacher's heads, randn scaled by D^-1/2 (logits ~ N(0, 1)), the
    teacher's by 2 D^-1/2 (sharper, as ``distill_inputs``'s teacher)."""
    ws = make_linear_weight(LinearCase(1, case.dim, case.vocab, case.dtype), device, seed=7)
    wt = make_linear_weight(LinearCase(1, case.teacher_dim, case.vocab, case.dtype), device, 8)
    return ws, wt.mul_(2)


def make_linear_distill_inputs(case: LinearDistillCase, device: torch.device, seed: int = 0):
    """randn hidden states of the student (N, D_s) and of the teacher (N, D_t)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hs = torch.randn(case.n_rows, case.dim, generator=g, device=device, dtype=case.dtype)
    ht = torch.randn(case.n_rows, case.teacher_dim, generator=g, device=device, dtype=case.dtype)
    return hs, ht


class LinearDistillRotation(Rotation):
    """Distinct hidden states of both models in turn, the two heads shared, as in training:
    ``next()`` gives ``(hs, Ws, ht, Wt)``, the student's requiring grad."""

    def __init__(self, case: LinearDistillCase, device: torch.device, copies: int | None = None):
        copies = copies or _rotation_copies(case.nbytes_hidden)
        ws, wt = make_linear_distill_weights(case, device)
        ws.requires_grad_(True)
        self.bufs = []
        for i in range(copies):
            hs, ht = make_linear_distill_inputs(case, device, seed=1000 + i)
            self.bufs.append((hs.requires_grad_(True), ws, ht, wt))
        self._i = 0


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, quick: bool = False, rep_ms: int | None = None) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call), median, over
    ``rep_ms`` (default 100 ms; 20 ms with ``quick``). Elsewhere: a host clock read after a
    synchronisation, over a short time budget.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, rep_ms or 100)
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


def matmul_rate(device: torch.device, *, quick: bool = False) -> tuple[float, int]:
    """(flop/s, n) of a bf16 (n x n) @ (n x n) ``torch.mm`` into a preallocated output."""
    n = MATMUL_N_CUDA if device.type == "cuda" else MATMUL_N_CPU
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    ms = time_ms(lambda: torch.mm(a, b, out=out), device, quick=quick)
    return 2 * n**3 / (ms * 1e-3), n


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------
# One plain step, checked and timed (bench/long_rows.py, bench/tune_launch.py)
# --------------------------------------------------------------------------------------------


def plain_step(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of fused_xent's "mean" cross-entropy on the kernels (the default
    route): (loss, gradient)."""
    leaf = x.detach().requires_grad_()
    loss = fused_xent.cross_entropy(leaf, t, impl="triton")
    loss.backward()
    return loss.detach(), leaf.grad


def check_plain_step(x, t, loss, grad, rows: int = 16) -> tuple[float, float]:
    """(relative loss error, relative gradient error of the first ``rows`` rows) of a
    ``plain_step`` against float64 torch (the loss from row blocks of ``logsumexp``)."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], 1024):
        x64 = x[start : start + 1024].double()
        lse = torch.logsumexp(x64, 1)
        total += (lse - x64.gather(1, t[start : start + 1024, None])[:, 0]).sum()
    want = total / x.shape[0]
    rows = min(rows, x.shape[0])
    x64 = x[:rows].double()
    g64 = torch.softmax(x64, 1)
    g64[torch.arange(rows), t[:rows]] -= 1
    g64 /= x.shape[0]
    loss_err = ((loss.double() - want).abs() / want.abs()).item()
    grad_err = ((grad[:rows].double() - g64).norm() / g64.norm()).item()
    return loss_err, grad_err


def time_vs_copy(x: torch.Tensor, step: Callable[[], object]) -> dict:
    """The median ms of ``step()`` (``triton.testing.do_bench``, CUDA) and that as a fraction of
    one read + one write of ``x`` at the copy bandwidth measured just before (``y.copy_(x)``,
    which moves exactly those bytes)."""
    from triton.testing import do_bench

    def time_copy() -> float:  # (its buffer freed before the step is timed)
        y = torch.empty_like(x)
        return do_bench(lambda: y.copy_(x), return_mode="median")

    copy_ms = time_copy()
    ms = do_bench(step, return_mode="median")
    nbytes = 2 * x.numel() * x.element_size()
    return dict(ms=ms, copy_tb_s=nbytes / (copy_ms * 1e-3) / 1e12, of_floor=copy_ms / ms)
