"""``nn.Module`` wrappers of the functional API."""

from __future__ import annotations

import torch

from .functional import cross_entropy, linear_cross_entropy


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
        inplace_backward: bool = False,
        process_group=None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
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

    def forward(self, input: torch.Tensor, target: torch.Tensor):
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
            ("inplace_backward", False),
            ("impl", "auto"),
        ):
            if getattr(self, name) != default:
                options.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(options)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fused_xent.linear_cross_entropy`; ``forward(input, weight, target,
    bias=None)`` takes the LM head's weight (and bias) as arguments, so the head stays where the
    model keeps it."""

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        self.process_group = process_group
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.chunk_size = chunk_size
        self.fp32_weight_grad = fp32_weight_grad
        self.impl = impl

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(
            input,
            weight,
            target,
            bias,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            return_lse=self.return_lse,
            chunk_size=self.chunk_size,
            fp32_weight_grad=self.fp32_weight_grad,
            process_group=self.process_group,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"chunk_size={self.chunk_size}, impl={self.impl!r}"
        )
