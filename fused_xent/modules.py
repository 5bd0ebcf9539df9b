"""``nn.Module`` wrappers of the functional API."""

from __future__ import annotations

import torch

from .functional import cross_entropy


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
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
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
