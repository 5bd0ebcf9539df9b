"""The backends as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque call per
kernel launch (with a fake implementation for tracing) instead of tracing into launchers.

Every op declares exactly the tensors it writes. Writing the gradient into the logits' own
storage is a separate op (``*_inplace``) that declares the logits mutated, so a compiled graph
knows the gradient aliases them (and copies nothing) while the other ops leave them read-only.

``OpBackend`` offers the backend contract (``xent_prologue``, ``xent_forward``,
``xent_backward``, outputs passed in and written) on top of the ops; the
autograd layer drives it like a module.
"""

# No `from __future__ import annotations` here, and Optional rather than `X | None`: torch's
# custom-op schema inference reads these annotations, and older releases (the GPU machine runs
# torch 2.11) know only real typing objects.
from typing import Optional

import torch

from ._options import DistillOptions, LossOptions

_MODULES: dict = {}  # impl -> its backend module, imported on first use


def _module(impl: str):
    module = _MODULES.get(impl)
    if module is not None:
        return module
    if impl == "reference":
        from . import reference as module
    elif impl == "cpu":
        from . import cpu as module
    else:
        from .kernels import xent as module
    _MODULES[impl] = module
    return module


def _opts(weight, ignore_index, label_smoothing=0.0, lse_square_scale=0.0, logit_scale=1.0,
          softcap=None, class_offset=0, n_classes=0) -> LossOptions:  # fmt: skip
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


def _noop_fake(*args, **kwargs) -> None:
    return None


@torch.library.custom_op(
    "fused_xent::xent_prologue", mutates_args=("den", "counter"), device_types=None
)
def _xent_prologue(
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    den: torch.Tensor,
    counter: torch.Tensor,
    n_cols: int,
    reduction: str,
    ignore_index: int,
    impl: str,
) -> None:
    _module(impl).xent_prologue(target, _opts(weight, ignore_index), n_cols, reduction, den,
                                counter)  # fmt: skip


_xent_prologue.register_fake(_noop_fake)


def _forward(logits, target, weight, loss, stats, grad, grad_scale, total, den, counter,
             entropy, predicted, row_weight, logprob, reduction, ignore_index, label_smoothing,
             lse_square_scale, logit_scale, softcap, class_offset, n_classes, impl):  # fmt: skip
    opts = _opts(weight, ignore_index, label_smoothing, lse_square_scale, logit_scale, softcap,
                 class_offset, n_classes)  # fmt: skip
    _module(impl).xent_forward(logits, target, opts, loss, stats, grad, grad_scale, reduction,
                               total, den, counter, entropy, predicted, row_weight,
                               logprob)  # fmt: skip


@torch.library.custom_op(
    "fused_xent::xent_forward",
    mutates_args=("loss", "stats", "grad", "total", "counter", "entropy", "predicted"),
    device_types=None,
)
def _xent_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    loss: torch.Tensor,
    stats: torch.Tensor,
    grad: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    total: Optional[torch.Tensor],
    den: Optional[torch.Tensor],
    counter: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    predicted: Optional[torch.Tensor],
    row_weight: Optional[torch.Tensor],
    logprob: bool,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    logit_scale: float,
    softcap: Optional[float],
    class_offset: int,
    n_classes: int,
    impl: str,
) -> None:
    _forward(logits, target, weight, loss, stats, grad, grad_scale, total, den, counter,
             entropy, predicted, row_weight, logprob, reduction, ignore_index, label_smoothing,
             lse_square_scale, logit_scale, softcap, class_offset, n_classes, impl)  # fmt: skip


_xent_forward.register_fake(_noop_fake)


@torch.library.custom_op(
    "fused_xent::xent_forward_inplace",
    mutates_args=("logits", "loss", "stats", "entropy", "predicted"),
    device_types=None,
)
def _xent_forward_inplace(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    loss: torch.Tensor,
    stats: torch.Tensor,
    grad_scale: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    predicted: Optional[torch.Tensor],
    row_weight: Optional[torch.Tensor],
    logprob: bool,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    logit_scale: float,
    softcap: Optional[float],
    class_offset: int,
    n_classes: int,
    impl: str,
) -> None:
    """Per-row loss and statistics, and the gradient written over the logits."""
    _forward(logits, target, weight, loss, stats, logits, grad_scale, None, None, None, entropy,
             predicted, row_weight, logprob, "none", ignore_index, label_smoothing,
             lse_square_scale, logit_scale, softcap, class_offset, n_classes, impl)  # fmt: skip


_xent_forward_inplace.register_fake(_noop_fake)


def _backward(logits, target, weight, stats, dloss, den, grad, target_grad, dentropy, entropy,
              row_weight, logprob, reduction, skip_if_one, ignore_index, label_smoothing,
              logit_scale, softcap, class_offset, n_classes, impl):  # fmt: skip
    opts = _opts(weight, ignore_index, label_smoothing, 0.0, logit_scale, softcap, class_offset,
                 n_classes)  # fmt: skip
    _module(impl).xent_backward(logits, target, opts, stats, dloss, grad, reduction, den,
                                skip_if_one, target_grad, dentropy, entropy, row_weight,
                                logprob)  # fmt: skip


@torch.library.custom_op(
    "fused_xent::xent_backward", mutates_args=("grad", "target_grad"), device_types=None
)
def _xent_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    dloss: torch.Tensor,
    den: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    target_grad: Optional[torch.Tensor],
    dentropy: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    row_weight: Optional[torch.Tensor],
    logprob: bool,
    reduction: str,
    skip_if_one: bool,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: Optional[float],
    class_offset: int,
    n_classes: int,
    impl: str,
) -> None:
    _backward(logits, target, weight, stats, dloss, den, grad, target_grad, dentropy, entropy,
              row_weight, logprob, reduction, skip_if_one, ignore_index, label_smoothing,
              logit_scale, softcap, class_offset, n_classes, impl)  # fmt: skip


_xent_backward.register_fake(_noop_fake)


@torch.library.custom_op(
    "fused_xent::xent_backward_inplace", mutates_args=("logits", "target_grad"), device_types=None
)
def _xent_backward_inplace(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    dloss: torch.Tensor,
    den: Optional[torch.Tensor],
    target_grad: Optional[torch.Tensor],
    dentropy: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    row_weight: Optional[torch.Tensor],
    logprob: bool,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: Optional[float],
    class_offset: int,
    n_classes: int,
    impl: str,
) -> None:
    """The gradient written over the logits."""
    _backward(logits, target, weight, stats, dloss, den, logits, target_grad, dentropy, entropy,
              row_weight, logprob, reduction, False, ignore_index, label_smoothing, logit_scale,
              softcap, class_offset, n_classes, impl)  # fmt: skip


_xent_backward_inplace.register_fake(_noop_fake)


def _option_args(opts, forward: bool) -> tuple:
    z_loss = (opts.lse_square_scale,) if forward else ()
    return (opts.ignore_index, opts.label_smoothing, *z_loss, opts.logit_scale, opts.softcap,
            opts.class_offset, opts.n_classes or 0)  # fmt: skip


class OpBackend:
    """The backend contract of ``kernels/xent.py`` and ``reference.py``, through the ops while
    torch.compile traces, and straight to the backend module in eager mode (a custom op's
    Python dispatch costs tens of microseconds a call, more than a short row's kernel).

    A ``grad`` that is the logits tensor itself goes to the ``*_inplace`` ops."""

    def __init__(self, impl: str) -> None:
        self.impl = impl

    def __repr__(self) -> str:
        return f"OpBackend({self.impl!r})"

    def _eager(self):
        """The backend module, unless torch.compile is tracing (then the ops)."""
        return None if torch.compiler.is_compiling() else _module(self.impl)

    def xent_prologue(self, target, opts, n_cols, reduction, den, counter):
        if (m := self._eager()) is not None:
            return m.xent_prologue(target, opts, n_cols, reduction, den, counter)
        torch.ops.fused_xent.xent_prologue(
            target, opts.weight, den, counter, n_cols, reduction, opts.ignore_index, self.impl
        )

    def xent_forward(self, logits, target, opts, loss, stats, grad=None, grad_scale=None,
                     reduction="none", total=None, den=None, counter=None, entropy=None,
                     predicted=None, row_weight=None, logprob=False):  # fmt: skip
        if (m := self._eager()) is not None:
            return m.xent_forward(logits, target, opts, loss, stats, grad, grad_scale, reduction,
                                  total, den, counter, entropy, predicted, row_weight,
                                  logprob)  # fmt: skip
        if grad is logits:
            assert reduction == "none", "an in-place forward gradient has no reduction here"
            torch.ops.fused_xent.xent_forward_inplace(
                logits, target, opts.weight, loss, stats, grad_scale, entropy, predicted,
                row_weight, logprob, *_option_args(opts, True), self.impl,
            )  # fmt: skip
        else:
            torch.ops.fused_xent.xent_forward(
                logits, target, opts.weight, loss, stats, grad, grad_scale, total, den, counter,
                entropy, predicted, row_weight, logprob, reduction, *_option_args(opts, True),
                self.impl,
            )  # fmt: skip

    def xent_backward(self, logits, target, opts, stats, dloss, grad, reduction="none",
                      den=None, skip_if_one=False, target_grad=None, dentropy=None,
                      entropy=None, row_weight=None, logprob=False):  # fmt: skip
        if (m := self._eager()) is not None:
            return m.xent_backward(logits, target, opts, stats, dloss, grad, reduction, den,
                                   skip_if_one, target_grad, dentropy, entropy, row_weight,
                                   logprob)  # fmt: skip
        if grad is logits:
            torch.ops.fused_xent.xent_backward_inplace(
                logits, target, opts.weight, stats, dloss, den, target_grad, dentropy, entropy,
                row_weight, logprob, reduction, *_option_args(opts, False), self.impl,
            )  # fmt: skip
        else:
            torch.ops.fused_xent.xent_backward(
                logits, target, opts.weight, stats, dloss, den, grad, target_grad, dentropy,
                entropy, row_weight, logprob, reduction, skip_if_one,
                *_option_args(opts, False), self.impl,
            )  # fmt: skip

    # Knowledge distillation (``kernels/distill.py``; the CPU backend runs the reference).

    def _distill_eager(self):
        return None if torch.compiler.is_compiling() else _distill_module(self.impl)

    def distill_forward(self, student, teacher, target, opts, loss, stats, grad=None,
                        grad_scale=None):  # fmt: skip
        if (m := self._distill_eager()) is not None:
            return m.distill_forward(student, teacher, target, opts, loss, stats, grad, grad_scale)
        if grad is student:
            torch.ops.fused_xent.distill_forward_inplace(
                student, teacher, target, loss, stats, grad_scale, *_distill_args(opts), self.impl
            )
        else:
            torch.ops.fused_xent.distill_forward(
                student, teacher, target, loss, stats, grad, grad_scale, *_distill_args(opts),
                self.impl,
            )  # fmt: skip

    def distill_backward(self, student, teacher, target, opts, stats, dloss, grad,
                         reduction="none", den=None, skip_if_one=False):  # fmt: skip
        if (m := self._distill_eager()) is not None:
            return m.distill_backward(student, teacher, target, opts, stats, dloss, grad,
                                      reduction, den, skip_if_one)  # fmt: skip
        if grad is student:
            torch.ops.fused_xent.distill_backward_inplace(
                student, teacher, target, stats, dloss, den, reduction, *_distill_args(opts),
                self.impl,
            )  # fmt: skip
        else:
            torch.ops.fused_xent.distill_backward(
                student, teacher, target, stats, dloss, den, grad, reduction, skip_if_one,
                *_distill_args(opts), self.impl,
            )  # fmt: skip


REFERENCE = OpBackend("reference")  # the oracle: one general formulation
CPU = OpBackend("cpu")  # what impl="auto" runs off CUDA: fused_xent/cpu.py, fast, same numbers
TRITON = OpBackend("triton")


# --------------------------------------------------------------------------------------------
# Knowledge distillation: the ops behind OpBackend.distill_*
# --------------------------------------------------------------------------------------------


def _distill_module(impl: str):
    """The distillation backend: the kernels for "triton"; the reference otherwise (the CPU
    fallback has no distillation of its own)."""
    if impl == "triton":
        from .kernels import distill

        return distill
    from . import reference

    return reference


def _distill_args(opts) -> tuple:
    return (opts.beta, opts.temperature, opts.soft_weight, opts.hard_weight, opts.ignore_index)


def _distill_opts(beta, temperature, soft_weight, hard_weight, ignore_index):

    return DistillOptions(beta, temperature, soft_weight, hard_weight, ignore_index)


@torch.library.custom_op(
    "fused_xent::distill_forward", mutates_args=("loss", "stats", "grad"), device_types=None
)
def _distill_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    loss: torch.Tensor,
    stats: torch.Tensor,
    grad: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    beta: float,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    impl: str,
) -> None:
    opts = _distill_opts(beta, temperature, soft_weight, hard_weight, ignore_index)
    _distill_module(impl).distill_forward(student, teacher, target, opts, loss, stats, grad,
                                          grad_scale)  # fmt: skip


_distill_forward.register_fake(_noop_fake)


@torch.library.custom_op(
    "fused_xent::distill_forward_inplace",
    mutates_args=("student", "loss", "stats"),
    device_types=None,
)
def _distill_forward_inplace(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    loss: torch.Tensor,
    stats: torch.Tensor,
    grad_scale: Optional[torch.Tensor],
    beta: float,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    impl: str,
) -> None:
    """Per-row loss and statistics, and the gradient written over the student's logits."""
    opts = _distill_opts(beta, temperature, soft_weight, hard_weight, ignore_index)
    _distill_module(impl).distill_forward(student, teacher, target, opts, loss, stats, student,
                                          grad_scale)  # fmt: skip


_distill_forward_inplace.register_fake(_noop_fake)


@torch.library.custom_op("fused_xent::distill_backward", mutates_args=("grad",), device_types=None)
def _distill_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    stats: torch.Tensor,
    dloss: torch.Tensor,
    den: Optional[torch.Tensor],
    grad: torch.Tensor,
    reduction: str,
    skip_if_one: bool,
    beta: float,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    impl: str,
) -> None:
    opts = _distill_opts(beta, temperature, soft_weight, hard_weight, ignore_index)
    _distill_module(impl).distill_backward(student, teacher, target, opts, stats, dloss, grad,
                                           reduction, den, skip_if_one)  # fmt: skip


_distill_backward.register_fake(_noop_fake)


@torch.library.custom_op(
    "fused_xent::distill_backward_inplace", mutates_args=("student",), device_types=None
)
def _distill_backward_inplace(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    stats: torch.Tensor,
    dloss: torch.Tensor,
    den: Optional[torch.Tensor],
    reduction: str,
    beta: float,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    impl: str,
) -> None:
    """The gradient written over the student's logits."""
    opts = _distill_opts(beta, temperature, soft_weight, hard_weight, ignore_index)
    _distill_module(impl).distill_backward(student, teacher, target, opts, stats, dloss, student,
                                           reduction, den, False)  # fmt: skip


_distill_backward_inplace.register_fake(_noop_fake)
