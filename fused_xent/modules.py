"""``nn.Module`` wrappers of the functional API."""

from __future__ import annotations

import torch

from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fused_xent.cross_entropy`; same arguments, same semantics."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        inplace_backward: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward
        self.impl = impl

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            self.ignore_index,
            self.reduction,
            inplace_backward=self.inplace_backward,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"inplace_backward={self.inplace_backward}, impl={self.impl!r}"
        )
