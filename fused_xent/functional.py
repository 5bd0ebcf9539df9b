"""Public functional API: argument checks, then dispatch to the kernels or the reference."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _dtensor, distributed, ops
from ._options import LossOptions, mean_denominator
from .autograd import (
    _SLAB_MIN_LOGITS,
    CrossEntropyFunction,
    LinearCrossEntropyFunction,
    PlainCrossEntropyFunction,
    SlabLinearCrossEntropyFunction,
    forward_no_grad,
    linear_forward_no_grad,
    lse_of,
    plain_outputs,
    refuse_double_backward,
    slab_forward_no_grad,
    token_stats_outputs,
)

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INPUT_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_TARGET_DTYPES = (torch.int64, torch.int32)


def _check_float(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low}, {high}]"
        raise ValueError(f"{name} must be a finite float{bounds}, got {value}")
    return value


def _check_common(tensors: dict, reduction, impl) -> None:
    """What both losses check first: tensor arguments, reduction, impl, the input's dtype."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if tensors["input"].dtype not in _INPUT_DTYPES:
        raise TypeError(
            "input must be float32, float16 or bfloat16 (float64 on the reference path), "
            f"got {tensors['input'].dtype}"
        )


def _check_tensors(input, target, weight, reduction, impl, sharded=False) -> None:
    _check_common({"input": input, "target": target}, reduction, impl)
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: (C,), (N, C) or (N, C, d1, ...)")
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    if n_classes == 0 and not sharded:  # sharded: the layout check fails on every rank alike
        raise ValueError("input must have at least one class (C >= 1), got C = 0")
    if target.device != input.device:
        raise ValueError(
            f"target must be on the input's device {input.device}, got {target.device}"
        )
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"a floating (probability) target must have the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if target.dtype not in _INPUT_DTYPES:
            raise TypeError(f"a probability target must be a float dtype, got {target.dtype}")
    else:
        if target.dtype not in _TARGET_DTYPES:
            raise TypeError(
                f"target must hold int64 or int32 class indices, or floating probabilities, "
                f"got {target.dtype}"
            )
        expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
        if target.shape != expected:
            raise ValueError(
                f"class-index target must have shape {tuple(expected)} to match input "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
    if sharded and target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "target requires grad, but with process_group fused_xent does not differentiate "
            "with respect to probability targets; pass target.detach()"
        )
    _check_class_weight(weight, n_classes, input.device)


def check_inplace(name: str, x: torch.Tensor, inplace_backward: bool) -> None:
    """``inplace_backward=True`` writes the gradient into ``x``'s storage: refused, on every
    route, where two elements of ``x`` share memory (an expanded view), whose gradients would
    overwrite each other. Decided from the strides alone: the dimensions that take steps in
    memory, sorted by stride, must each step past everything the smaller ones span."""
    if not inplace_backward or x.numel() == 0:
        return
    span = 0
    for size, stride in sorted(zip(x.shape, x.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride <= span:
            raise ValueError(
                f"inplace_backward=True writes the gradient into {name}, whose elements overlap "
                f"in memory (shape {tuple(x.shape)}, strides {tuple(x.stride())}: an expanded "
                f"view?); pass {name}.contiguous(), or inplace_backward=False"
            )
        span += (size - 1) * stride


def _check_class_weight(weight, n_classes: int, device) -> None:
    """Class weights: None, or a floating (C,) tensor on the input's device, not requiring grad."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor of shape ({n_classes},)")
    if weight.shape != (n_classes,):
        raise ValueError(
            f"weight must have shape ({n_classes},), one per class, got {tuple(weight.shape)}"
        )
    if weight.device != device:
        raise ValueError(f"weight must be on the input's device {device}, got {weight.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight requires grad, but fused_xent does not differentiate with respect to "
            "class weights; pass weight.detach()"
        )


class TokenStats(NamedTuple):
    """Per-token statistics from the loss's own pass (``return_stats=True``), in the "none"
    shape, not differentiable: ``lse`` and ``entropy`` of the transformed logits (float32;
    float64 for float64 input) and ``predicted``, the argmax class (int64, lowest on ties)."""

    lse: torch.Tensor
    entropy: torch.Tensor
    predicted: torch.Tensor


def _check_token_weight(token_weight, target, row_shape) -> None:
    if token_weight is None:
        return
    if not isinstance(token_weight, torch.Tensor) or not token_weight.is_floating_point():
        got = token_weight.dtype if isinstance(token_weight, torch.Tensor) else type(token_weight)
        raise TypeError(
            f"token_weight must be a floating tensor of shape {tuple(row_shape)} or None, got {got}"
        )
    if tuple(token_weight.shape) != tuple(row_shape):
        raise ValueError(
            f"token_weight must have the loss's 'none' shape {tuple(row_shape)} (one weight "
            f"per position), got {tuple(token_weight.shape)}"
        )
    if token_weight.device != target.device:
        raise ValueError(
            f"token_weight must be on the input's device {target.device}, got {token_weight.device}"
        )
    if token_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "token_weight requires grad, but fused_xent does not differentiate with respect to "
            "token weights; pass token_weight.detach()"
        )


def _options(ignore_index, weight, label_smoothing, lse_square_scale, softcap, logit_scale):
    """The checked options (frozen: the same plain-number arguments without class weights share
    one object, remembered by value and type, so a call does not rebuild and recheck them)."""
    plain = (int, float, type(None))
    if weight is None and all(
        type(v) in plain
        for v in (ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale)
    ):
        return _options_of(ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale)
    return _build_options(ignore_index, weight, label_smoothing, lse_square_scale, softcap,
                          logit_scale)  # fmt: skip


@functools.lru_cache(maxsize=256, typed=True)
def _options_of(ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale):
    return _build_options(ignore_index, None, label_smoothing, lse_square_scale, softcap,
                          logit_scale)  # fmt: skip


def _build_options(ignore_index, weight, label_smoothing, lse_square_scale, softcap,
                   logit_scale):  # fmt: skip
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if softcap is not None:
        softcap = _check_float("softcap", softcap)
        if softcap <= 0.0:
            raise ValueError(f"softcap must be > 0 (or None for no softcap), got {softcap}")
    logit_scale = _check_float("logit_scale", logit_scale)
    if logit_scale <= 0.0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    return LossOptions(
        ignore_index=ignore_index,
        weight=weight.contiguous() if weight is not None else None,  # the kernels index it
        label_smoothing=_check_float("label_smoothing", label_smoothing, 0.0, 1.0),
        lse_square_scale=_check_float("lse_square_scale", lse_square_scale, 0.0),
        logit_scale=logit_scale,
        softcap=softcap,
    )


def _backend(impl: str, input: torch.Tensor):
    if impl == "reference":
        return ops.REFERENCE
    if impl == "auto" and input.device.type != "cuda":
        return ops.CPU  # the reference's numbers, a few full passes instead of a dozen
    if impl == "auto" and input.dtype not in _KERNEL_DTYPES:
        return ops.REFERENCE  # float64 on a GPU: the reference reads no value on the host
    if input.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"impl='triton' takes float32, float16 or bfloat16 input, got {input.dtype}"
        )
    if "xent" not in _KERNELS:
        try:
            from .kernels import xent  # (fail here, with a clear message)
        except ImportError as exc:  # no triton on this platform
            raise RuntimeError(
                f"impl='triton' needs Triton, which failed to import: {exc}"
            ) from exc
        _KERNELS["xent"] = xent
    return ops.TRITON


_KERNELS: dict = {}  # the kernels' module once imported (an import statement per call costs)
_PLANS: dict = {}  # the plain calls' launch plans, by what fixes them (_plain_plan)


def option_off(value, default: float) -> bool:
    """Whether a number option is its default, given as a float or an int (``0``, ``1``): an
    option that is off costs the plain route nothing. Anything else (a bool, a tensor, a NumPy
    number) takes the general route, which checks it."""
    return type(value) in _NUMBERS and value == default


_NUMBERS = (float, int)


def _plain_options(weight, token_weight, process_group, label_smoothing, lse_square_scale,
                   softcap, logit_scale) -> bool:  # fmt: skip
    """Whether the options are all off (``option_off``)."""
    return (
        weight is None
        and token_weight is None
        and process_group is None
        and softcap is None
        and option_off(label_smoothing, 0.0)
        and option_off(lse_square_scale, 0.0)
        and option_off(logit_scale, 1.0)
    )


def _plain_loss(logits, target, plan):
    """The reduced loss of a plain call (``_plain_plan``)."""
    if logits.requires_grad and torch.is_grad_enabled():
        return PlainCrossEntropyFunction.apply(logits, target, plan)
    total, work = plain_outputs(logits)
    plan.forward(logits, target, total, work)
    return total


def _plain_plan(input, target, ignore_index, reduction, impl):
    """The kernels' plan (``kernels/xent.py``'s ``PlainXent``; ``PlainLogprob`` for
    ``reduction="logprob"``, ``token_logprobs``) for a plain call with these tensors, or None for
    the general route (which decides, and checks, everything else): two plain tensors on the
    current device, (N, C) logits with ``plain_rows``, (N,) class indices, a reduced loss, the
    kernels' backend, eager. Checked here: what can change from call to call with the same plan;
    the rest when the plan is made."""
    if type(input) is not torch.Tensor or type(target) is not torch.Tensor:
        return None  # (DTensors and other subclasses: the general route)
    if torch.compiler.is_compiling():
        return None  # (traced: the custom ops)
    if input.dim() != 2 or target.dim() != 1 or reduction == "none":
        return None
    n_rows = input.shape[0]
    if n_rows == 0 or target.shape[0] != n_rows or type(ignore_index) is not int:
        return None
    xent = _KERNELS.get("xent")
    # (the launch configuration's function in the key: tests replace it to force small blocks;
    # and whether long rows are split, which the plain route leaves to xent_forward)
    key = (input.dtype, target.dtype, input.shape[1], ignore_index, reduction, impl,
           input.device, target.device, xent and xent._launch_config,
           xent and xent.SPLIT_ROWS)  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 1024:  # (a bound on what many shapes keep; plans are cheap to make)
            _PLANS.clear()
        plan = _PLANS[key] = _new_plan(input, target, ignore_index, reduction, impl)
        xent = _KERNELS.get("xent")
    if plan is False:
        return None
    if not xent.plain_rows(input) or (input.is_cuda and plan.device != xent.current_device()):
        return None
    return plan


def _new_plan(input, target, ignore_index, reduction, impl):
    """A ``PlainXent`` for calls like this one (``PlainLogprob`` for ``reduction="logprob"``,
    ``token_logprobs``), or False where the general route must take them (it then also raises
    the errors)."""
    if impl not in ("auto", "triton") or reduction not in ("mean", "sum", "logprob"):
        return False
    if impl == "auto" and not input.is_cuda:
        return False
    if target.device != input.device or target.dtype not in _TARGET_DTYPES:
        return False
    if input.dtype not in _KERNEL_DTYPES or input.shape[1] == 0:
        return False
    if _backend(impl, input) is not ops.TRITON:
        return False
    xent = _KERNELS["xent"]
    xent._check_launchable(input)  # (CPU tensors without the interpreter: its error)
    if reduction != "logprob" and xent.split_wanted(input.shape[1], input.dtype):
        return False  # (xent_forward's split rows: long rows, where host time is no matter)
    if reduction == "logprob":
        return xent.PlainLogprob(input.shape[1], input.dtype, target.dtype, ignore_index,
                                 input.get_device())  # fmt: skip
    return xent.PlainXent(input.shape[1], input.dtype, target.dtype, ignore_index, reduction,
                          input.get_device())  # fmt: skip


# Small CPU calls with the options torch has: torch's own kernels on float32 (float64) copies.
# At these sizes a call is dominated by fixed per-op costs, and torch's fused log-softmax + NLL
# makes the fewest ops (measured with bench/cpu_fallback.py on a 2-core EPYC, one thread: bf16
# 64 x 512 forward+backward 48 us against torch's 41 us on the bf16 tensor itself, where the
# autograd.Function path of fused_xent/cpu.py takes 173 us). Above this size the chunked path of
# fused_xent/cpu.py is the faster one (bf16 upcast copies cost more than its passes).
_TORCH_CPU_MAX_ELEMENTS = 1 << 18


def small_cpu_call(backend, input: torch.Tensor) -> bool:
    """Whether a call may take the small-call route (torch's ops on an upcast copy): CPU
    tensors, at most ``_TORCH_CPU_MAX_ELEMENTS`` logits, eager. Traced by torch.compile the
    call takes the custom ops instead (the route reads values on the host)."""
    return (
        backend is ops.CPU
        and input.numel() <= _TORCH_CPU_MAX_ELEMENTS
        and not torch.compiler.is_compiling()
    )


def upcast_kept(x: torch.Tensor, ignored: torch.Tensor | None, class_dim: int = -1) -> torch.Tensor:
    """The float32 (float64) copy the small-call route differentiates through, with ignored rows
    zeroed where there are any: their gradient is then exactly 0 even where they hold NaN or
    -inf (torch's log-softmax backward would give NaN there)."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if ignored is None or not bool(ignored.any()):
        return x
    return torch.where(ignored.unsqueeze(class_dim), 0.0, x)


def all_finite(*outputs: torch.Tensor) -> bool:
    """The small-call route keeps its result only where every output is finite: anything else
    (a -inf logit under a zero target or class weight, +inf, a "mean" over a zero denominator) is
    recomputed by the general route, where those cases are decided (README, "Edge cases")."""
    return all(bool(torch.isfinite(out).all()) for out in outputs)


class _BackwardHook:
    """A hook on the small-call route's outputs: double backward is refused as on every route,
    and so is a second backward through a reduced loss (the other routes hand its gradient out
    once)."""

    def __init__(self, once: bool) -> None:
        self.once, self.seen = once, False

    def __call__(self, grad):
        refuse_double_backward()
        if self.once and self.seen:
            raise RuntimeError(
                "fused_xent: backward ran twice through one cross_entropy call (retain_graph); "
                "a reduced loss's gradient is handed out once. Call the loss again, or use "
                "reduction='none'."
            )
        self.seen = True
        return grad


def guard_backward(out: torch.Tensor, once: bool = False) -> None:
    if out.requires_grad:
        out.register_hook(_BackwardHook(once))


def _torch_cpu(input, target, opts, reduction):
    """The loss from ``F.cross_entropy`` on an upcast copy: same contract (float32 loss for
    every input dtype, the gradient in the input's dtype rounded once, by the copy's backward);
    None where the general route must decide (a non-finite result)."""
    prob_target = target.is_floating_point()
    ignored = None
    if prob_target:
        target = target.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
    else:
        if target.dtype != torch.int64:
            target = target.long()
        ignored = target == opts.ignore_index
    x = upcast_kept(input, ignored, 1 if input.dim() > 1 else 0)
    weight = None if opts.weight is None else opts.weight.to(x.dtype)
    loss = torch.nn.functional.cross_entropy(
        x, target, weight, reduction=reduction, label_smoothing=opts.label_smoothing,
        # Unused with probabilities (as documented); torch refuses any but its default there.
        ignore_index=-100 if prob_target else opts.ignore_index,
    )  # fmt: skip
    if not all_finite(loss):
        return None
    guard_backward(loss, once=reduction != "none")
    return loss


def _dtensor_call(fn, name, logits, class_dim, process_group, tensors, kwargs):
    """``fn`` on the local shards of DTensor arguments, vocabulary-parallel over the mesh
    dimension that shards the classes of ``logits`` (see ``fused_xent._dtensor``)."""
    if process_group is not None:
        raise ValueError(
            "process_group cannot be given with DTensor arguments: their device mesh says how the "
            "vocabulary is sharded"
        )
    if not _dtensor.is_dtensor(logits):
        raise ValueError(
            f"DTensor arguments need {name} to be a DTensor too (on the same device mesh)"
        )
    layout = _dtensor.vocab_layout(name, logits, class_dim)
    x = logits.to_local()
    local = {}
    for arg, value in tensors.items():
        if arg == "weight":
            local[arg] = _dtensor.class_slice(arg, value, layout, x.shape[class_dim])
        elif arg == "target" and value.is_floating_point():  # probabilities: sharded as logits
            local[arg] = _dtensor.local(arg, value, layout, class_dim)
        else:
            local[arg] = _dtensor.local(arg, value, layout)
    out = fn(x, **local, process_group=layout.group, **kwargs)
    return _dtensor.replicate(out, layout)


def _dtensor_linear_call(fn, input, linear_weight, linear_bias, process_group, tensors, kwargs):
    """A linear loss with DTensor arguments: vocabulary-parallel over the mesh dimension that
    shards the head's rows when the hidden states are a (replicated) DTensor; with plain hidden
    states a sharded head is gathered as FSDP2 would (see ``fused_xent._dtensor``)."""
    if process_group is not None:
        raise ValueError(
            "process_group cannot be given with DTensor arguments: their device mesh says how the "
            "vocabulary is sharded"
        )
    if not _dtensor.is_dtensor(linear_weight):
        raise ValueError("DTensor arguments need linear_weight to be a DTensor too")
    if not _dtensor.is_dtensor(input):
        if any(_dtensor.is_dtensor(v) for v in tensors.values()):
            raise ValueError(
                "with plain (not DTensor) input the head is gathered (FSDP2); the targets and "
                "weights must then be plain tensors too"
            )
        weight = _dtensor.gathered_weight("linear_weight", linear_weight)
        bias = None
        if linear_bias is not None:
            bias = (
                _dtensor.gathered_weight("linear_bias", linear_bias)
                if _dtensor.is_dtensor(linear_bias)
                else linear_bias
            )
        return fn(input, weight, **tensors, linear_bias=bias, **kwargs)
    layout = _dtensor.vocab_layout("linear_weight", linear_weight, 0)
    weight = linear_weight.to_local()
    bias = None if linear_bias is None else _dtensor.local("linear_bias", linear_bias, layout, 0)
    hidden = _dtensor.local("input", input, layout)
    local = {}
    for arg, value in tensors.items():
        if arg == "weight":
            local[arg] = _dtensor.class_slice(arg, value, layout, weight.shape[0])
        elif arg == "target" and value.is_floating_point():  # probabilities: (..., V) sharded
            local[arg] = _dtensor.local(arg, value, layout, -1)
        else:
            local[arg] = _dtensor.local(arg, value, layout)
    out = fn(hidden, weight, **local, linear_bias=bias, process_group=layout.group, **kwargs)
    return _dtensor.replicate(out, layout)


def _as_rows(input: torch.Tensor, target: torch.Tensor):
    """(C,) / (N, C) / (N, C, d1, ...) -> (rows, C) logits and matching targets."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0)
    if input.dim() == 2:
        return input, target
    n_classes = input.shape[1]
    rows = input.movedim(1, -1).reshape(-1, n_classes)
    if target.is_floating_point():
        return rows, target.movedim(1, -1).reshape(-1, n_classes)
    return rows, target.reshape(-1)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    return_stats: bool = False,
    token_weight: torch.Tensor | None = None,
    inplace_backward: bool = False,
    process_group=None,
    impl: str = "auto",
):
    """Softmax cross-entropy with a fused gradient: a drop-in for ``F.cross_entropy``.

    The loss is computed in float32 and returned as float32 for every input dtype (float64 for
    float64 input); the gradient has the input's dtype and shape.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, ..., dK); float32 / float16 /
            bfloat16 (float64 runs on the reference path).
        target: class indices, int64 or int32, of shape (), (N,) or (N, d1, ..., dK), each in
            [0, C) or ``ignore_index``; or class probabilities, floating, with ``input``'s shape
            (rows need not sum to 1).
        weight: optional (C,) class weights, as torch: with class indices a row's loss is scaled
            by ``weight[target]`` and "mean" divides by the sum of those over non-ignored rows;
            the smoothing term weighs each class by its own weight; with probabilities each
            class's term is scaled and "mean" divides by the number of rows.
        ignore_index: class-index rows with this target give loss 0 and gradient 0 and leave the
            "mean" denominator; unused with probability targets (as torch).
        reduction: "mean" (NaN when every row is ignored, as torch), "sum", or "none" (the
            target's shape; 0 on ignored rows).
        label_smoothing: in [0, 1]; blends the target with the uniform distribution, as torch.
        lse_square_scale: z-loss; adds ``lse_square_scale * lse**2`` to every non-ignored row's
            loss (unweighted by ``weight``) before the reduction, so "mean" divides it by the
            same denominator as the rest.
        softcap: if given (> 0), logits become ``softcap * tanh(logits / softcap)`` first.
        logit_scale: (> 0) logits are multiplied by it before the softcap.
        return_lse: also return the per-row log-sum-exp of the transformed logits (float32;
            float64 for float64 input; the "none" shape, not differentiable), e.g. to log the
            z-loss or perplexity.
        return_stats: also return a ``TokenStats(lse, entropy, predicted)`` computed in the same
            pass, each in the "none" shape and not differentiable: the log-sum-exp and entropy of
            the transformed logits (float32) and the argmax class (int64, the lowest on ties;
            global when sharded), for every row (ignored ones too). Token accuracy is
            ``(predicted == target)`` over the kept rows.
        token_weight: a floating tensor of the "none" shape multiplying
            each row's loss before the reduction; "mean" keeps torch's denominator. Weights may
            be negative (an advantage-weighted policy-gradient loss is
            ``cross_entropy(logits, sampled, token_weight=advantages)``); no gradient flows to
            them (one that requires grad is refused).
        inplace_backward: write the gradient into ``input``'s own storage, so no second buffer
            of its size exists. For "mean"/"sum" it is written during the forward, for "none"
            during the backward; either way ``input``'s version counter is bumped, so autograd
            raises where anything saved the logits for its own backward. Read the logits you
            still need before calling the loss. Inputs whose class dimension is not the
            innermost one are copied first, and then the copy receives the gradient.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded: this
            rank's ``input`` holds its contiguous slice of the classes, in rank order (slices may
            differ in size); ``target`` holds global class indices, the same on every rank;
            ``weight`` and probability targets are this rank's slices. Every rank gets the
            unsharded loss, and the gradient of its own slice. See ``fused_xent.distributed``
            for what goes over the wire.
        impl: "auto" (the Triton kernels for CUDA tensors; on the CPU torch's own
            ``F.cross_entropy`` on a float32 copy for small calls, ``fused_xent/cpu.py`` for the
            rest; the reference for float64 on a GPU), "triton" (force the kernels; on CPU
            tensors they need ``TRITON_INTERPRET=1``), "reference" (the pure-PyTorch oracle).

    Returns:
        The loss (0-dim, or the target's shape for "none"); with ``return_lse`` and/or
        ``return_stats`` a tuple ``(loss, lse, stats)`` of what was asked for, in that order.

    On the kernel path a class-index target outside [0, C) that is not ``ignore_index`` gives that
    row a NaN loss (and NaN gradient) without any out-of-bounds access; the reference raises
    ``IndexError``.
    """
    plain = _plain_options(weight, token_weight, process_group, label_smoothing,
                           lse_square_scale, softcap, logit_scale)  # fmt: skip
    if (
        plain
        and not (return_lse or return_stats or inplace_backward)
        and (plan := _plain_plan(input, target, ignore_index, reduction, impl)) is not None
    ):
        return _plain_loss(input, target, plan)
    if _dtensor.any_dtensor(input, target, weight, token_weight):
        return _dtensor_call(
            cross_entropy, "input", input, 0 if input.dim() == 1 else 1, process_group,
            dict(target=target, weight=weight, token_weight=token_weight),
            dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                 lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale,
                 return_lse=return_lse, return_stats=return_stats,
                 inplace_backward=inplace_backward, impl=impl),
        )  # fmt: skip
    _check_tensors(input, target, weight, reduction, impl, process_group is not None)
    check_inplace("input", input, inplace_backward)
    opts = _options(ignore_index, weight, label_smoothing, lse_square_scale, softcap, logit_scale)
    row_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    _check_token_weight(token_weight, target, row_shape)
    backend = _backend(impl, input)
    if (
        small_cpu_call(backend, input)
        and process_group is None
        and not (return_lse or return_stats or inplace_backward or opts.lse_square_scale)
        and token_weight is None
        and opts.softcap is None
        and opts.logit_scale == 1.0
    ):
        loss = _torch_cpu(input, target, opts, reduction)
        if loss is not None:
            return loss
    rows, row_target = _as_rows(input, target)
    row_weight = None if token_weight is None else token_weight.reshape(-1)
    if backend is ops.TRITON:
        # The kernels stride over rows, not over classes.
        if rows.shape[1] > 1 and rows.stride(1) != 1:
            rows = rows.contiguous()
        if row_target.is_floating_point() and rows.shape[1] > 1 and row_target.stride(1) != 1:
            row_target = row_target.contiguous()
    wants_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    if process_group is not None:
        opts = distributed.shard_options(
            opts, process_group, rows.shape[0], rows.shape[1], row_target.is_floating_point(),
            reduction, rows.device,
        )  # fmt: skip
        if wants_grad:
            out = distributed.ShardedCrossEntropyFunction.apply(
                rows, row_target, opts, reduction, inplace_backward, backend, process_group,
                row_weight, return_stats,
            )  # fmt: skip
        else:
            out = distributed.sharded_forward_no_grad(
                rows, row_target, opts, reduction, backend, process_group, row_weight,
                return_stats,
            )  # fmt: skip
        loss, lse, token_stats = out[0], out[1], out[2:]
    elif wants_grad:
        with_lse = return_lse or return_stats
        out = CrossEntropyFunction.apply(
            rows, row_target, opts, reduction, inplace_backward, backend, with_lse, row_weight,
            return_stats,
        )  # fmt: skip
        out = out if isinstance(out, tuple) else (out,)
        loss = out[0]
        lse = out[1] if with_lse else None
        token_stats = out[1 + with_lse :]
    else:
        token_stats = token_stats_outputs(rows) if return_stats else ()
        loss, stats = forward_no_grad(rows, row_target, opts, reduction, backend,
                                      token_stats or None, row_weight)  # fmt: skip
        lse = lse_of(stats) if return_lse or return_stats else None
    if reduction == "none":
        loss = loss.reshape(row_shape)
    out = (loss,)
    if return_lse:
        out += (lse.reshape(row_shape),)
    if return_stats:
        entropy, predicted = token_stats
        out += (TokenStats(lse.reshape(row_shape), entropy.reshape(row_shape),
                           predicted.reshape(row_shape)),)  # fmt: skip
    return out if len(out) > 1 else loss


def _check_linear(input, linear_weight, target, linear_bias, weight, sharded=False):
    """After _check_common (and autocast's casts): shapes, dtypes and devices, as torch's
    ``F.linear_cross_entropy`` defines them (logits of shape (*lead, C, d1, ..., dK))."""
    if input.dim() < 1:
        raise ValueError("input must have shape (D,) or (N, D), got a 0-dim tensor")
    if linear_weight.dim() < 2:
        raise ValueError(
            f"linear_weight must have shape (C, D) or (C, d1, ..., dK, D), got "
            f"{tuple(linear_weight.shape)}"
        )
    dim = input.shape[-1]
    if linear_weight.shape[-1] != dim:
        raise ValueError(
            f"linear_weight's last dimension must be D = input.shape[-1] = {dim}, got shape "
            f"{tuple(linear_weight.shape)}"
        )
    n_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if n_classes == 0 and not sharded:  # sharded: the layout check fails on every rank alike
        raise ValueError("linear_weight must have at least one class (C >= 1)")
    if out_features and input.dim() != 2:
        raise ValueError(
            f"a K-dimensional linear_weight {tuple(linear_weight.shape)} needs batched input "
            f"(N, {dim}), got {tuple(input.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight must have the input's dtype {input.dtype}, got {linear_weight.dtype}"
        )
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor):
            raise TypeError(
                f"linear_bias must be a torch.Tensor or None, got {type(linear_bias).__name__}"
            )
        if linear_bias.shape != linear_weight.shape[:-1]:
            raise ValueError(
                f"linear_bias must have shape (C, d1, ..., dK) = "
                f"{tuple(linear_weight.shape[:-1])}, got {tuple(linear_bias.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(
                f"linear_bias must have the input's dtype {input.dtype}, got {linear_bias.dtype}"
            )
    lead = tuple(input.shape[:-1])
    logits_shape = (*lead, n_classes, *out_features)
    if target.is_floating_point():
        if target.dtype not in _INPUT_DTYPES:
            raise TypeError(f"a probability target must be a float dtype, got {target.dtype}")
        if tuple(target.shape) != logits_shape:
            raise ValueError(
                f"a floating (probability) target must have the logits' shape "
                f"{logits_shape} = (*input.shape[:-1], *linear_weight.shape[:-1]), got "
                f"{tuple(target.shape)}"
            )
        if sharded and target.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "target requires grad, but with process_group fused_xent does not differentiate "
                "with respect to probability targets; pass target.detach()"
            )
    else:
        if target.dtype not in _TARGET_DTYPES:
            raise TypeError(
                f"target must hold int64 or int32 class indices, or floating probabilities, "
                f"got {target.dtype}"
            )
        if tuple(target.shape) != (*lead, *out_features):
            raise ValueError(
                f"class-index target must have shape {(*lead, *out_features)} = "
                f"(*input.shape[:-1], *linear_weight.shape[1:-1]), got {tuple(target.shape)}"
            )
    for name, value in (("linear_weight", linear_weight), ("target", target),
                        ("linear_bias", linear_bias)):  # fmt: skip
        if value is not None and value.device != input.device:
            raise ValueError(
                f"{name} must be on the input's device {input.device}, got {value.device}"
            )
    _check_class_weight(weight, n_classes, input.device)


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _chunk_from_options(options, chunk_size, n_rows: int, dim: int, n_classes: int):
    """Our chunk_size from torch's ``LinearCrossEntropyOptions``: its ``batch_chunk_size``, or an
    explicit ``chunking_method="aspect_ratio[:k]"`` by the formula torch documents; "auto" leaves
    the choice to ours. Its other fields (acc_policy, acc_dtype, allow_retain_graph) have no
    counterpart here and are ignored."""
    if options is None:
        return chunk_size
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if (options_type is not None and not isinstance(options, options_type)) or not hasattr(
        options, "batch_chunk_size"
    ):
        raise TypeError(
            f"options must be a torch.nn.LinearCrossEntropyOptions or None, got "
            f"{type(options).__name__}"
        )
    size = options.batch_chunk_size
    if size is not None:
        size = min(size, max(n_rows, 1))
    method = getattr(options, "chunking_method", None)
    if isinstance(method, str) and method.startswith("aspect_ratio"):
        factor = int(method.partition(":")[2] or 1)
        per_row = max(1, -(-n_classes // max(dim, 1)))  # ceil(C / D): logits per hidden value
        rows = -(-n_rows // per_row)
        picked = max(1, min((1 << (rows - 1).bit_length()) // factor, n_rows))
        if size is not None and size != picked:
            raise ValueError(
                f"options.batch_chunk_size (={options.batch_chunk_size}) and "
                f"options.chunking_method ({method!r}) give different chunk sizes ({size} vs "
                f"{picked}); pass only one"
            )
        size = picked
    if size is None:
        return chunk_size
    if chunk_size is not None and min(chunk_size, max(n_rows, 1)) != size:
        raise ValueError(
            f"chunk_size={chunk_size} and options' chunk size {size} disagree; pass only one"
        )
    return size


class _MeanOverPositions(torch.autograd.Function):
    """``total / den`` whose backward is 0 (not 0 * inf = NaN) when den is 0: "mean" over no
    kept position is NaN with zero gradients, as torch (K-dimensional heads)."""

    @staticmethod
    def forward(ctx, total, den):
        ctx.save_for_backward(den)
        return total / den

    @staticmethod
    def backward(ctx, grad):
        (den,) = ctx.saved_tensors
        return torch.where(den == 0, torch.zeros_like(grad), grad / den), None


def _linear_2d(hidden, head, bias, target, opts, reduction, chunk_size, fp32, backend, group,
               row_weight=None, return_stats=False):  # fmt: skip
    """(loss, lse) of ``cross_entropy(hidden @ head.T + bias, target)``, hidden (N, D), head
    (C, D), target (N,) indices or (N, C) probabilities, by vocabulary slabs (``chunk_size``
    None) or over chunks of rows, with or without a ``group`` holding the head's rows; with
    ``return_stats`` also (entropy, predicted)."""
    if target.is_floating_point() and backend is not ops.REFERENCE and target.shape[1] > 1:
        if target.stride(1) != 1:  # the kernels stride over rows, not over classes
            target = target.contiguous()
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, head, bias, target)
    )
    if group is not None:
        if chunk_size is None:  # the default: vocabulary slabs of this rank's rows of the head
            return distributed.sharded_slab_linear_cross_entropy(
                hidden, head, bias, target, opts, reduction, backend, group, row_weight,
                return_stats, wants_grad,
            )  # fmt: skip
        if wants_grad:
            return distributed.ShardedLinearCrossEntropyFunction.apply(
                hidden, head, bias, target, opts, reduction, chunk_size, fp32, backend, group,
                row_weight, return_stats,
            )  # fmt: skip
        return distributed.sharded_linear_forward_no_grad(
            hidden, head, bias, target, opts, reduction, chunk_size, backend, group, row_weight,
            return_stats,
        )  # fmt: skip
    if chunk_size is None:  # the default: vocabulary slabs (the memory people pick this for)
        if wants_grad:
            return SlabLinearCrossEntropyFunction.apply(
                hidden, head, bias, target, opts, reduction, backend, row_weight, return_stats
            )
        return slab_forward_no_grad(hidden, head, bias, target, opts, reduction, backend,
                                    row_weight, return_stats)  # fmt: skip
    if wants_grad:
        return LinearCrossEntropyFunction.apply(
            hidden, head, bias, target, opts, reduction, chunk_size, fp32, backend, row_weight,
            return_stats,
        )  # fmt: skip
    return linear_forward_no_grad(hidden, head, bias, target, opts, reduction, chunk_size, backend,
                                  row_weight, return_stats)  # fmt: skip


def _small_plain_linear(input, head, bias, target, reduction, impl) -> bool:
    """Plain tensors for ``F.linear`` (an (N, D) input and a (C, D) head of its dtype, a bias
    of (C,) or none) on the kernels' device, within one vocabulary slab, an (N,) target and a
    reduced loss (``_plain_plan`` then decides the rest of the plain route)."""
    return (
        type(input) is torch.Tensor
        and type(head) is torch.Tensor
        and type(target) is torch.Tensor
        and (impl == "triton" or (impl == "auto" and input.is_cuda))
        and reduction != "none"
        and target.dim() == 1
        and input.dim() == 2
        and head.dim() == 2
        and head.shape[1] == input.shape[1]
        and head.dtype == input.dtype
        and 0 < input.shape[0] * head.shape[0] <= _SLAB_MIN_LOGITS
        and (
            bias is None
            or (
                type(bias) is torch.Tensor
                and bias.shape == head.shape[:1]
                and bias.dtype == input.dtype
            )
        )  # fmt: skip
    )


def autocast_linear(input, weight, bias):
    """(input, weight, bias) as F.linear under autocast takes them: in the autocast dtype when
    autocast is on for the input's device (the loss itself follows torch's float32 policy:
    computed in float32, returned as float32); unchanged otherwise."""
    device_type = input.device.type if isinstance(input, torch.Tensor) else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (input, weight, bias)]
    return cast[0], cast[1], cast[2]


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    return_stats: bool = False,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = True,
    process_group=None,
    impl: str = "auto",
):
    """``F.linear_cross_entropy``: ``cross_entropy(linear(input, linear_weight, linear_bias),
    target, ...)`` without the full logits; torch's signature and semantics.

    The rows are processed in chunks: a chunk's logits come from one matrix product (cuBLAS via
    torch), the cross-entropy kernel turns them in place into the gradient of the per-row losses,
    and two more products add that chunk's share to the input and head gradients, kept in
    float32. Only one chunk of logits exists at a time. Gradients flow to ``input``,
    ``linear_weight`` and ``linear_bias``; each is rounded to its parameter's dtype once, after the
    incoming gradient and the "mean" denominator are applied (a float16 gradient of a
    GradScaler-scaled loss does not underflow, a bfloat16 one is not rounded twice).

    Args:
        input: (N, D) or (D,) hidden states, float32 / float16 / bfloat16 (float64 on the
            reference path). With a (C, D) head any (..., D) is accepted (the logits are then
            (..., C), as ``F.linear`` makes them).
        linear_weight: the head, (C, D) as stored by ``nn.Linear`` / an LM head, or
            (C, d1, ..., dK, D) for a K-dimensional loss (logits (N, C, d1, ..., dK); input must
            be (N, D)); the input's dtype.
        target: class indices, int64 / int32, of shape (*input.shape[:-1], d1, ..., dK), each in
            [0, C) or ``ignore_index``; or class probabilities, floating, of the logits' shape
            (*input.shape[:-1], C, d1, ..., dK) (rows need not sum to 1).
        linear_bias: optional, of shape (C, d1, ..., dK); the input's dtype.
        weight: optional (C,) class weights, as :func:`cross_entropy` (and torch).
        reduction: "mean", "sum" or "none", as :func:`cross_entropy`; with a K-dimensional head
            "mean" divides by the kept weight over every (n, d1, ..., dK) position.
        ignore_index: a class index whose rows are ignored; None (the default) means -100 for
            class-index targets. Giving one with probability targets is an error, as in torch.
        label_smoothing: in [0, 1], as :func:`cross_entropy`.
        options: a ``torch.nn.LinearCrossEntropyOptions`` or None. Every call is chunked here;
            its ``batch_chunk_size`` (or an explicit ``chunking_method="aspect_ratio[:k]"``)
            sets ``chunk_size``; its other fields have no counterpart and are ignored.
        lse_square_scale, softcap, logit_scale, return_lse, return_stats, token_weight, impl:
            as :func:`cross_entropy` (``return_stats`` and ``token_weight`` with a (C, D) head).
        chunk_size: ``None`` (the default): vocabulary slabs, never the whole logits nor a
            V x D accumulator: the forward sweeps the head's rows in slabs and merges their
            statistics, the backward sweeps again and writes each slab's weight gradient with
            one product (four products instead of three; peak memory the weight gradient, a
            float32 d_hidden, the input gradient and one slab of at most
            ``min(N * V * b / 16, fused_xent.autograd.SLAB_BYTES)`` logits). An int: rows per
            chunk of the row-chunk plan, memory for speed (three products; a chunk's logits and
            a float32 V x D accumulator), as :func:`fused_xent.autograd.pick_chunk_size` would
            pick them. The same with ``process_group``: slabs of this rank's rows of the head
            by default, row chunks with an int.
        fp32_weight_grad: the row-chunk plan only (the slabs write each weight-gradient row
            once, from one product): with a float16 / bfloat16 weight, accumulate the weight
            gradient over the chunks in float32 and round once at the end, so it matches
            torch's single matrix product; costs a float32 (C, D) buffer from the forward to
            the backward.
            ``False`` accumulates in the weight's dtype (one rounding per chunk, half the memory;
            a float16 one holds the sum times 1 / 2**floor(log2 N), so that it stays in float16's
            range). The hidden-state and bias gradients are always accumulated in float32 (N x D
            and C floats).
        process_group: a ``torch.distributed`` group over which the head is sharded by rows:
            ``linear_weight`` (and ``linear_bias``, class weights, probability targets) hold this
            rank's contiguous slice of the classes, in rank order; ``input`` and class-index
            targets (global indices) are the same on every rank. Every rank gets the unsharded
            loss, the gradient of its own head slice, and the full gradient of ``input`` (summed
            over the ranks). Not with a K-dimensional head.

    Returns:
        The loss (0-dim, or the target's shape for "none": (*input.shape[:-1], d1, ..., dK));
        with ``return_lse`` and/or ``return_stats`` a tuple ``(loss, lse, stats)`` of what was
        asked for, in that order, each of that "none" shape.

    For "mean"/"sum" all gradients are accumulated during the forward and the float32
    accumulators live until the backward, which makes each gradient as ``acc * (g / den)`` in one
    op on the device; for "none" the backward recomputes each chunk's logits once more. Nothing of
    size N x C is ever held beyond one chunk. A K-dimensional head is the composition over its
    d1 x ... x dK positions: position j is a linear cross-entropy with head
    ``linear_weight[:, j]`` over the N rows.
    """
    plain = _plain_options(weight, token_weight, process_group, label_smoothing,
                           lse_square_scale, softcap, logit_scale)  # fmt: skip
    if (
        plain
        and chunk_size is None
        and options is None
        and not (return_lse or return_stats)
        and _small_plain_linear(input, linear_weight, linear_bias, target, reduction, impl)
    ):
        # A call whose logits are no more than the least a vocabulary slab holds anyway
        # (_SLAB_MIN_LOGITS rows x classes): what the slabs compute (one product, the kernels'
        # rows, two products back) is then F.linear and the plain loss, with torch's own
        # autograd for the products and one host step per kernel (bench/host_time.py). The
        # logits and their gradient (at most 2**14 each) live until the backward.
        logits = F.linear(input, linear_weight, linear_bias)
        index = -100 if ignore_index is None else ignore_index
        plan = _plain_plan(logits, target, index, reduction, impl)
        if plan is not None:
            return _plain_loss(logits, target, plan)
    if _dtensor.any_dtensor(input, linear_weight, linear_bias, target, weight, token_weight):
        return _dtensor_linear_call(
            linear_cross_entropy, input, linear_weight, linear_bias, process_group,
            dict(target=target, weight=weight, token_weight=token_weight),
            dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                 options=options, lse_square_scale=lse_square_scale, softcap=softcap,
                 logit_scale=logit_scale, return_lse=return_lse, return_stats=return_stats,
                 chunk_size=chunk_size, fp32_weight_grad=fp32_weight_grad, impl=impl),
        )  # fmt: skip
    _check_common(
        {"input": input, "linear_weight": linear_weight, "target": target}, reduction, impl
    )
    input, linear_weight, linear_bias = autocast_linear(input, linear_weight, linear_bias)
    sharded = process_group is not None
    _check_linear(input, linear_weight, target, linear_bias, weight, sharded)
    _check_chunk_size(chunk_size)
    prob_target = target.is_floating_point()
    if ignore_index is not None and prob_target:
        raise ValueError(
            "ignore_index cannot be given with probability targets (as torch); leave it None"
        )
    if ignore_index is None:
        ignore_index = -100
    opts = _options(ignore_index, weight, label_smoothing, lse_square_scale, softcap, logit_scale)
    backend = _backend(impl, input)
    dim, n_classes = input.shape[-1], linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if sharded and out_features:
        raise ValueError(
            "process_group is not supported with a K-dimensional linear_weight "
            f"{tuple(linear_weight.shape)}; pass a (C, D) head"
        )
    hidden = input.reshape(-1, dim)
    n_rows = hidden.shape[0]
    if sharded:  # first: ranks that disagree fail here, all alike
        opts = distributed.shard_options(
            opts, process_group, n_rows, n_classes, prob_target, reduction, hidden.device
        )
    chunk_size = _chunk_from_options(options, chunk_size, n_rows, dim, n_classes)
    fp32 = bool(fp32_weight_grad)
    lead = tuple(input.shape[:-1])
    if out_features and (return_stats or token_weight is not None):
        raise ValueError(
            "return_stats and token_weight need a (C, D) linear_weight, got a K-dimensional "
            f"head {tuple(linear_weight.shape)}"
        )
    if not out_features:
        _check_token_weight(token_weight, target, lead)
        rows_target = target.reshape(-1, n_classes) if prob_target else target.reshape(-1)
        out = _linear_2d(
            hidden, linear_weight, linear_bias, rows_target, opts, reduction, chunk_size, fp32,
            backend, process_group, None if token_weight is None else token_weight.reshape(-1),
            return_stats,
        )  # fmt: skip
        loss, lse = out[0], out[1]
        if reduction == "none":
            loss = loss.reshape(lead)
        result = (loss,)
        if return_lse:
            result += (lse.reshape(lead),)
        if return_stats:
            entropy, predicted = out[2:]
            result += (TokenStats(lse.reshape(lead), entropy.reshape(lead),
                                  predicted.reshape(lead)),)  # fmt: skip
        return result if len(result) > 1 else loss
    # K-dimensional: position j of the P = d1 x ... x dK positions is a linear cross-entropy with
    # head linear_weight[:, j] (and bias linear_bias[:, j]) over the N rows.
    n_pos = math.prod(out_features)
    heads = linear_weight.reshape(n_classes, n_pos, dim).unbind(1)
    biases = (
        linear_bias.reshape(n_classes, n_pos).unbind(1)
        if linear_bias is not None
        else (None,) * n_pos
    )
    if prob_target:
        targets = target.reshape(n_rows, n_classes, n_pos).unbind(2)
    else:
        targets = target.reshape(n_rows, n_pos).unbind(1)
    per_position = "none" if reduction == "none" else "sum"
    losses, lses = [], []
    for head, bias, pos_target in zip(heads, biases, targets, strict=True):
        loss, lse = _linear_2d(
            hidden, head, bias, pos_target, opts, per_position, chunk_size, fp32, backend, None
        )
        losses.append(loss)
        lses.append(lse)
    lse = torch.stack(lses, dim=1).reshape(n_rows, *out_features)
    if reduction == "none":
        loss = torch.stack(losses, dim=1).reshape(n_rows, *out_features)
    else:
        loss = torch.stack(losses).sum()
        if reduction == "mean":
            if prob_target:  # torch: the number of positions, whatever the class weights
                den = torch.full((), float(n_rows * n_pos), dtype=loss.dtype, device=loss.device)
            else:
                den = mean_denominator(target.reshape(-1), opts, n_classes, loss.dtype)
            loss = _MeanOverPositions.apply(loss, den)
    return (loss, lse) if return_lse else loss
