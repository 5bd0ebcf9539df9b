"""Public functional API: argument checks, then dispatch to the kernels or the reference."""

from __future__ import annotations

import math

import torch

from . import distributed, ops
from ._options import LossOptions
from .autograd import (
    CrossEntropyFunction,
    LinearCrossEntropyFunction,
    forward_no_grad,
    linear_forward_no_grad,
    lse_of,
    pick_chunk_size,
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
        raise ValueError(f"{name} must be a finite float in [{low}, {high}], got {value}")
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
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor of shape ({n_classes},)")
        if weight.shape != (n_classes,):
            raise ValueError(
                f"weight must have shape ({n_classes},), one per class, got {tuple(weight.shape)}"
            )
        if weight.device != input.device:
            raise ValueError(
                f"weight must be on the input's device {input.device}, got {weight.device}"
            )
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "weight requires grad, but fused_xent does not differentiate with respect to "
                "class weights; pass weight.detach()"
            )


def _options(ignore_index, weight, label_smoothing, lse_square_scale, softcap, logit_scale):
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
    try:
        from .kernels import xent  # noqa: F401  (fail here, with a clear message)
    except ImportError as exc:  # no triton on this platform
        raise RuntimeError(f"impl='triton' needs Triton, which failed to import: {exc}") from exc
    return ops.TRITON


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
        impl: "auto" (Triton kernels for CUDA tensors, the reference elsewhere), "triton"
            (force the kernels; on CPU tensors they need ``TRITON_INTERPRET=1``), "reference".

    Returns:
        The loss (0-dim, or the target's shape for "none"); with ``return_lse`` a pair
        ``(loss, lse)``.

    On the kernel path a class-index target outside [0, C) that is not ``ignore_index`` gives that
    row a NaN loss (and NaN gradient) without any out-of-bounds access; the reference raises
    ``IndexError``.
    """
    _check_tensors(input, target, weight, reduction, impl, process_group is not None)
    opts = _options(ignore_index, weight, label_smoothing, lse_square_scale, softcap, logit_scale)
    backend = _backend(impl, input)
    rows, row_target = _as_rows(input, target)
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
            loss, lse = distributed.ShardedCrossEntropyFunction.apply(
                rows, row_target, opts, reduction, inplace_backward, backend, process_group
            )
        else:
            loss, lse = distributed.sharded_forward_no_grad(
                rows, row_target, opts, reduction, backend, process_group
            )
    elif wants_grad:
        out = CrossEntropyFunction.apply(
            rows, row_target, opts, reduction, inplace_backward, backend, return_lse
        )
        loss, lse = out if return_lse else (out, None)
    else:
        loss, stats = forward_no_grad(rows, row_target, opts, reduction, backend)
        lse = lse_of(stats) if return_lse else None
    row_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    if reduction == "none":
        loss = loss.reshape(row_shape)
    return (loss, lse.reshape(row_shape)) if return_lse else loss


def _check_linear(input, weight, target, bias, chunk_size, sharded=False):
    """After _check_common (and autocast's casts): shapes, dtypes, devices, chunk_size."""
    if input.dim() < 1:
        raise ValueError("input must have shape (..., D), got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, D) with D = input.shape[-1] = {input.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 and not sharded:  # sharded: the layout check fails on every rank
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have the input's dtype {input.dtype}, got {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != input.dtype:
            raise TypeError(f"bias must have the input's dtype {input.dtype}, got {bias.dtype}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must hold int64 or int32 class indices, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(input.shape[:-1])} (input's leading dims), "
            f"got {tuple(target.shape)}"
        )
    for name, value in (("weight", weight), ("target", target), ("bias", bias)):
        if value is not None and value.device != input.device:
            raise ValueError(
                f"{name} must be on the input's device {input.device}, got {value.device}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = True,
    process_group=None,
    impl: str = "auto",
):
    """``cross_entropy(F.linear(input, weight, bias), target, ...)`` without the full logits.

    The rows are processed in chunks: a chunk's logits come from one matrix product (cuBLAS via
    torch), the cross-entropy kernel turns them in place into the gradient of the per-row losses,
    and two more products add that chunk's share to the input and weight gradients, kept in
    float32. Only one chunk of logits exists at a time. Gradients flow to ``input``, ``weight``
    and ``bias``; each is rounded to its parameter's dtype once, after the incoming gradient and
    the "mean" denominator are applied (a float16 gradient of a GradScaler-scaled loss does not
    underflow, a bfloat16 one is not rounded twice).

    Args:
        input: (..., D) hidden states, float32 / float16 / bfloat16.
        weight: (V, D), as stored by ``nn.Linear`` / an LM head; the input's dtype.
        target: (...) int64 / int32 class indices in [0, V) or ``ignore_index``; the input's
            leading shape.
        bias: optional (V,), the input's dtype.
        ignore_index, reduction, label_smoothing, lse_square_scale, softcap, logit_scale,
            return_lse, impl: as :func:`cross_entropy` (no class weights here).
        chunk_size: rows per chunk. ``None`` picks them from the shapes alone (the same on
            every call; nothing asks the device, so it is safe in a CUDA graph capture): the
            fewest rows, a multiple of 128, for which the float32 weight-gradient accumulator,
            read and written once per chunk (``8 * D / rows`` bytes per logit), moves at most a
            quarter of what the chunk itself moves (``6 * b`` bytes per logit, ``b`` the dtype's
            size), and fewer if the chunk's logits would exceed
            ``fused_xent.autograd.CHUNK_BUDGET_BYTES`` (4 GiB; on the reference path counted as
            eight float32 copies); at least 128 rows, at most all of them. At 8192 x 4096 x
            128256 bf16 that is all 8192 rows in one chunk (1.96 GiB of logits); larger batches
            go in chunks of 11008 rows. A smaller ``chunk_size`` saves memory and costs
            accumulator traffic.
        fp32_weight_grad: with a float16 / bfloat16 weight, accumulate the weight gradient over
            the chunks in float32 and round once at the end, so it matches torch's single
            matrix product; costs a float32 (V, D) buffer from the forward to the backward.
            ``False`` accumulates in the weight's dtype (one rounding per chunk, half the memory;
            a float16 one holds the sum times 1 / 2**floor(log2 N), so that it stays in float16's
            range). The hidden-state and bias gradients are always accumulated in float32 (N x D
            and V floats).
        process_group: a ``torch.distributed`` group over which the LM head is sharded by rows:
            ``weight`` (and ``bias``) hold this rank's contiguous slice of the vocabulary, in rank
            order; ``input`` and ``target`` (global class indices) are the same on every rank.
            Every rank gets the unsharded loss, the gradient of its own weight slice, and the
            full gradient of ``input`` (summed over the ranks).

    Returns:
        The loss (0-dim, or the target's shape for "none"); with ``return_lse`` ``(loss, lse)``.

    For "mean"/"sum" all gradients are accumulated during the forward and the float32
    accumulators live until the backward, which makes each gradient as ``acc * (g / den)`` in one
    op on the device; for "none" the backward recomputes each chunk's logits once more. Nothing of
    size N x V is ever held beyond one chunk.
    """
    _check_common({"input": input, "weight": weight, "target": target}, reduction, impl)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        # As F.linear under autocast: the product runs in the autocast dtype; the loss itself
        # follows torch's float32 policy (computed in float32, returned as float32).
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if isinstance(bias, torch.Tensor) else bias
    _check_linear(input, weight, target, bias, chunk_size, process_group is not None)
    opts = _options(ignore_index, None, label_smoothing, lse_square_scale, softcap, logit_scale)
    backend = _backend(impl, input)
    hidden = input.reshape(-1, input.shape[-1])
    rows_target = target.reshape(-1)
    if process_group is not None:  # first: ranks that disagree fail here, all alike
        opts = distributed.shard_options(
            opts, process_group, hidden.shape[0], weight.shape[0], False, reduction, hidden.device
        )
    if chunk_size is None:
        chunk_size = pick_chunk_size(
            hidden.shape[0], weight.shape[0], hidden.shape[1], input.dtype,
            backend is not ops.TRITON,
        )  # fmt: skip
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    )
    if process_group is not None:
        if wants_grad:
            loss, lse = distributed.ShardedLinearCrossEntropyFunction.apply(
                hidden, weight, bias, rows_target, opts, reduction, chunk_size,
                bool(fp32_weight_grad), backend, process_group,
            )  # fmt: skip
        else:
            loss, lse = distributed.sharded_linear_forward_no_grad(
                hidden, weight, bias, rows_target, opts, reduction, chunk_size, backend,
                process_group,
            )  # fmt: skip
    elif wants_grad:
        loss, lse = LinearCrossEntropyFunction.apply(
            hidden, weight, bias, rows_target, opts, reduction, chunk_size,
            bool(fp32_weight_grad), backend,
        )  # fmt: skip
    else:
        loss, lse = linear_forward_no_grad(
            hidden, weight, bias, rows_target, opts, reduction, chunk_size, backend
        )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return (loss, lse.reshape(target.shape)) if return_lse else loss
