"""Public functional API: argument checks, then dispatch to the kernels or the reference."""

from __future__ import annotations

import torch

from . import reference
from .autograd import CrossEntropyFunction, forward_no_grad

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INPUT_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_TARGET_DTYPES = (torch.int64, torch.int32)


def _check_args(input, target, ignore_index, reduction, impl) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"input must be float32, float16 or bfloat16 (float64 on the reference path), "
            f"got {input.dtype}"
        )
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must hold int64 or int32 class indices, got {target.dtype}")
    if input.dim() != 2:
        raise ValueError(f"input must be 2-D (N, C), got shape {tuple(input.shape)}")
    if input.shape[1] == 0:
        raise ValueError("input must have at least one class (C >= 1), got C = 0")
    if target.shape != input.shape[:1]:
        raise ValueError(
            f"target must have shape (N,) = {tuple(input.shape[:1])} to match input "
            f"{tuple(input.shape)}, got {tuple(target.shape)}"
        )
    if target.device != input.device:
        raise ValueError(
            f"target must be on the input's device {input.device}, got {target.device}"
        )


def _backend(impl: str, input: torch.Tensor):
    if impl == "reference" or (
        impl == "auto" and (input.device.type != "cuda" or input.dtype not in _KERNEL_DTYPES)
    ):
        return reference
    if input.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"impl='triton' takes float32, float16 or bfloat16 input, got {input.dtype}"
        )
    try:
        from .kernels import xent
    except ImportError as exc:  # no triton on this platform
        raise RuntimeError(f"impl='triton' needs Triton, which failed to import: {exc}") from exc
    return xent


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    inplace_backward: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy of logits against class indices, with a fused gradient.

    A drop-in for ``torch.nn.functional.cross_entropy`` on (N, C) logits. The loss is computed in
    float32 and returned as float32 for every input dtype (float64 for float64 input); the gradient
    has the input's dtype and shape.

    Args:
        input: (N, C) logits, float32 / float16 / bfloat16 (float64 runs on the reference).
        target: (N,) int64 or int32 class indices in [0, C), or ``ignore_index``.
        ignore_index: rows with this target contribute loss 0 and gradient 0, and are left out of
            the "mean" denominator.
        reduction: "mean" (over non-ignored rows; NaN if every row is ignored, as torch),
            "sum", or "none" (per-row float32 losses, 0 on ignored rows).
        inplace_backward: write the gradient into ``input``'s own storage, so no second (N, C)
            buffer exists. For "mean"/"sum" it is written during the forward, for "none" during
            the backward; either way ``input``'s version counter is bumped, so autograd raises
            where anything saved the logits for its own backward. Read the logits you still need
            before calling the loss.
        impl: "auto" (Triton kernels for CUDA tensors, the reference elsewhere), "triton"
            (force the kernels; on CPU tensors they need ``TRITON_INTERPRET=1``), "reference".

    Returns:
        The loss: a 0-dim float32 tensor, or (N,) for ``reduction="none"``.

    On the kernel path a target outside [0, C) that is not ``ignore_index`` gives that row a NaN
    loss (and NaN gradient) without any out-of-bounds access; the reference path raises
    ``IndexError``.
    """
    _check_args(input, target, ignore_index, reduction, impl)
    backend = _backend(impl, input)
    if backend is not reference and input.stride(1) != 1:
        input = input.contiguous()  # the kernels stride over rows, not over classes
    if torch.is_grad_enabled() and input.requires_grad:
        return CrossEntropyFunction.apply(
            input, target, ignore_index, reduction, inplace_backward, backend
        )
    return forward_no_grad(input, target, ignore_index, reduction, backend)
