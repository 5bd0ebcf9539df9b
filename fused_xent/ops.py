"""The backends as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque call per
kernel launch (with a fake implementation for tracing) instead of tracing into launchers.

``OpBackend`` offers the backend contract (``xent_forward``, ``xent_backward``, ``scale_grad_``,
outputs passed in and written) on top of the ops; the autograd layer drives it like a module.
"""

# No `from __future__ import annotations` here, and Optional rather than `X | None`: torch's
# custom-op schema inference reads these annotations, and older releases (the GPU machine runs
# torch 2.11) know only real typing objects.
from typing import Optional

import torch

from ._options import LossOptions


def _module(impl: str):
    if impl == "reference":
        from . import reference

        return reference
    from .kernels import xent

    return xent


def _opts(weight, ignore_index, label_smoothing, lse_square_scale, logit_scale, softcap,
          class_offset, n_classes) -> LossOptions:  # fmt: skip
    return LossOptions(
        ignore_index=ignore_index,
        weight=weight,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        logit_scale=logit_scale,
        softcap=softcap,
        class_offset=class_offset,
        n_classes=n_classes or None,
    )


@torch.library.custom_op(
    "fused_xent::xent_forward", mutates_args=("loss", "stats", "grad"), device_types=None
)
def _xent_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    loss: torch.Tensor,
    stats: torch.Tensor,
    grad: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    logit_scale: float,
    softcap: Optional[float],
    class_offset: int,
    n_classes: int,
    impl: str,
) -> None:
    opts = _opts(weight, ignore_index, label_smoothing, lse_square_scale, logit_scale, softcap,
                 class_offset, n_classes)  # fmt: skip
    _module(impl).xent_forward(logits, target, opts, loss, stats, grad, grad_scale)


@_xent_forward.register_fake
def _(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("fused_xent::xent_backward", mutates_args=("grad",), device_types=None)
def _xent_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    dloss: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: Optional[float],
    class_offset: int,
    n_classes: int,
    impl: str,
) -> None:
    opts = _opts(weight, ignore_index, label_smoothing, 0.0, logit_scale, softcap, class_offset,
                 n_classes)  # fmt: skip
    _module(impl).xent_backward(logits, target, opts, stats, dloss, grad)


@_xent_backward.register_fake
def _(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("fused_xent::scale_grad_", mutates_args=("grad",), device_types=None)
def _scale_grad(grad: torch.Tensor, g: torch.Tensor, impl: str) -> None:
    _module(impl).scale_grad_(grad, g)


@_scale_grad.register_fake
def _(*args, **kwargs) -> None:
    return None


class OpBackend:
    """The backend contract of ``kernels/xent.py`` and ``reference.py``, through the ops."""

    def __init__(self, impl: str) -> None:
        self.impl = impl

    def __repr__(self) -> str:
        return f"OpBackend({self.impl!r})"

    def xent_forward(self, logits, target, opts, loss, stats, grad=None, grad_scale=None):
        torch.ops.fused_xent.xent_forward(
            logits, target, opts.weight, loss, stats, grad, grad_scale, opts.ignore_index,
            opts.label_smoothing, opts.lse_square_scale, opts.logit_scale, opts.softcap,
            opts.class_offset, opts.n_classes or 0, self.impl,
        )  # fmt: skip

    def xent_backward(self, logits, target, opts, stats, dloss, grad):
        torch.ops.fused_xent.xent_backward(
            logits, target, opts.weight, stats, dloss, grad, opts.ignore_index,
            opts.label_smoothing, opts.logit_scale, opts.softcap, opts.class_offset,
            opts.n_classes or 0, self.impl,
        )  # fmt: skip

    def scale_grad_(self, grad, g):
        torch.ops.fused_xent.scale_grad_(grad, g, self.impl)


REFERENCE = OpBackend("reference")
TRITON = OpBackend("triton")
