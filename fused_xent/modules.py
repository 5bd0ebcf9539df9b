"""``nn.Module`` wrappers of the functional API."""

from __future__ import annotations

import math

import torch

from .distillation import distillation_loss, linear_distillation_loss
from .functional import _check_chunk_size, cross_entropy, linear_cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fused_xent.cross_entropy`; same options, same semantics.

    ``weight`` is a registered buffer, as in ``torch.nn.CrossEntropyLoss``, so it follows
    ``.to(device)`` and lands in the ``state_dict``.
    """

    def __init__(
        self,
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
        inplace_backward: bool = False,
        process_group=None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.return_stats = return_stats
        self.process_group = process_group
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.impl = impl

    def forward(self, input: torch.Tensor, target: torch.Tensor, token_weight=None):
        """``token_weight``: optional per-position weights (see :func:`cross_entropy`)."""
        return cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            return_lse=self.return_lse,
            return_stats=self.return_stats,
            token_weight=token_weight,
            inplace_backward=self.inplace_backward,
            process_group=self.process_group,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        options = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        for name, default in (
            ("label_smoothing", 0.0),
            ("lse_square_scale", 0.0),
            ("softcap", None),
            ("logit_scale", 1.0),
            ("return_lse", False),
            ("return_stats", False),
            ("inplace_backward", False),
            ("impl", "auto"),
        ):
            if getattr(self, name) != default:
                options.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(options)


class LinearCrossEntropyLoss(torch.nn.Module):
    """``torch.nn.LinearCrossEntropyLoss``: a loss that owns its linear layer (the LM head),
    computed by :func:`fused_xent.linear_cross_entropy` in chunks.

    As torch's module: ``self.linear`` is an ``nn.Linear(in_features, num_classes *
    prod(out_features), bias=bias)`` (so its parameters are named ``linear.weight`` /
    ``linear.bias``, initialised as ``nn.Linear`` does, stored flat and reshaped to
    (C, d1, ..., dK, D) / (C, d1, ..., dK) in :meth:`forward`), and the class weights are the
    buffer ``weight``; a ``state_dict`` loads into either module. ``forward(input, target)``.

    The extras (``lse_square_scale``, ``softcap``, ``logit_scale``, ``return_lse``,
    ``return_stats``, ``chunk_size``, ``fp32_weight_grad``, ``process_group``, ``impl``) are as in
    :func:`fused_xent.linear_cross_entropy` (``forward(input, target, token_weight=None)``); with
    ``process_group`` ``num_classes`` is this rank's
    slice of the classes. To keep the head elsewhere (tied embeddings, your own ``nn.Linear``),
    call the functional form with its weight.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        return_lse: bool = False,
        return_stats: bool = False,
        chunk_size: int | None = None,
        fp32_weight_grad: bool = True,
        process_group=None,
        impl: str = "auto",
    ) -> None:
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        out_features = tuple(out_features)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in out_features):
            raise ValueError(f"out_features must be a tuple of positive ints, got {out_features}")
        if weight is not None and (
            not isinstance(weight, torch.Tensor) or weight.shape != (num_classes,)
        ):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise ValueError(f"weight must be a tensor of shape ({num_classes},), got {got}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        _check_chunk_size(chunk_size)
        super().__init__()
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = out_features
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        # As torch: nn.Linear keeps 2-D weights, so a K-dimensional head is stored flat.
        self.linear = torch.nn.Linear(
            in_features,
            math.prod(out_features, start=num_classes),
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.options = options
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.return_stats = return_stats
        self.chunk_size = chunk_size
        self.fp32_weight_grad = fp32_weight_grad
        self.process_group = process_group
        self.impl = impl

    def forward(self, input: torch.Tensor, target: torch.Tensor, token_weight=None):
        """``token_weight``: optional per-position weights (see :func:`linear_cross_entropy`)."""
        linear_weight = self.linear.weight.reshape(
            (self.num_classes, *self.out_features, self.linear.in_features)
        )
        linear_bias = self.linear.bias
        if linear_bias is not None:
            linear_bias = linear_bias.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            return_lse=self.return_lse,
            return_stats=self.return_stats,
            token_weight=token_weight,
            chunk_size=self.chunk_size,
            fp32_weight_grad=self.fp32_weight_grad,
            process_group=self.process_group,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        options = [
            f"in_features={self.linear.in_features}",
            f"num_classes={self.num_classes}",
            f"out_features={self.out_features}",
            f"bias={self.linear.bias is not None}",
            f"reduction={self.reduction}",
            f"ignore_index={self.ignore_index}",
            f"label_smoothing={self.label_smoothing}",
        ]
        for name, default in (
            ("options", None),
            ("lse_square_scale", 0.0),
            ("softcap", None),
            ("logit_scale", 1.0),
            ("return_lse", False),
            ("return_stats", False),
            ("chunk_size", None),
            ("fp32_weight_grad", True),
            ("impl", "auto"),
        ):
            if getattr(self, name) != default:
                options.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(options)


class _DistillModule(torch.nn.Module):
    """The distillation options both modules hold, passed on as keywords (``_options``)."""

    _NAMES = ("beta", "temperature", "soft_weight", "hard_weight", "ignore_index", "reduction")
    _DEFAULTS = (0.0, 1.0, 1.0, 0.0, -100, "mean")

    def __init__(self, options: dict, impl: str) -> None:
        super().__init__()
        for name, value in options.items():
            setattr(self, name, value)
        self.impl = impl

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in (*self._NAMES, "impl")}

    def _repr(self, extra) -> str:
        options = [f"beta={self.beta}", f"temperature={self.temperature}"]
        defaults = (*zip(self._NAMES[2:], self._DEFAULTS[2:], strict=True), *extra)
        for name, default in (*defaults, ("impl", "auto")):
            if getattr(self, name) != default:
                options.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(options)


class DistillationLoss(_DistillModule):
    """Module form of :func:`fused_xent.distillation_loss`; same options, same semantics:
    ``forward(student_logits, teacher_logits, target=None)``."""

    def __init__(
        self,
        *,
        beta: float = 0.0,
        temperature: float = 1.0,
        soft_weight: float = 1.0,
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        inplace_backward: bool = False,
        impl: str = "auto",
    ) -> None:
        options = dict(beta=beta, temperature=temperature, soft_weight=soft_weight,
                       hard_weight=hard_weight, ignore_index=ignore_index,
                       reduction=reduction)  # fmt: skip
        super().__init__(options, impl)
        self.inplace_backward = inplace_backward

    def forward(self, student_logits, teacher_logits, target=None) -> torch.Tensor:
        return distillation_loss(
            student_logits, teacher_logits, target, inplace_backward=self.inplace_backward,
            **self._options(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return self._repr((("inplace_backward", False),))


class LinearDistillationLoss(_DistillModule):
    """Module form of :func:`fused_xent.linear_distillation_loss`: ``forward(student_input,
    student_weight, teacher_input, teacher_weight, target=None, *, student_bias=None,
    teacher_bias=None)``.

    It owns no parameters: the student's head belongs to the student (often tied to its
    embeddings) and the teacher's to the teacher, so both are passed in, as Liger's fused JSD
    takes them."""

    def __init__(
        self,
        *,
        beta: float = 0.0,
        temperature: float = 1.0,
        soft_weight: float = 1.0,
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
        impl: str = "auto",
    ) -> None:
        _check_chunk_size(chunk_size)
        options = dict(beta=beta, temperature=temperature, soft_weight=soft_weight,
                       hard_weight=hard_weight, ignore_index=ignore_index,
                       reduction=reduction)  # fmt: skip
        super().__init__(options, impl)
        self.chunk_size = chunk_size

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, target=None,
                *, student_bias=None, teacher_bias=None) -> torch.Tensor:  # fmt: skip
        return linear_distillation_loss(
            student_input, student_weight, teacher_input, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            **self._options(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return self._repr((("chunk_size", None),))
