"""How many kernels a loss launches, counted on the CPU, so the count cannot regress.

Counted: every Triton launch (under the interpreter here, compiled on a GPU) and every torch op
that would launch a CUDA kernel (a ``TorchDispatchMode`` sees each op; allocations and views
launch nothing). fused_xent's own custom ops are not counted themselves: what they launch is (the
Triton kernels inside them). The caller's own work (making the incoming gradient) happens outside
the count, as it would in a training step.

Budgets (kernels in all, forward + backward): "mean" and "sum" 3, "none" 2; under ``no_grad``
"mean"/"sum" 2, "none" 1; ``return_lse`` adds the one addition that makes the log-sum-exp.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, make_logits, make_target
from torch.utils._python_dispatch import TorchDispatchMode

import fused_xent
import fused_xent._alloc

# aten ops that allocate, alias or describe a tensor: no kernel runs.
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "as_strided",
    "view",
    "_unsafe_view",
    "alias",
    "detach",
    "t",
    "transpose",
    "expand",
    "select",
    "slice",
    "unsqueeze",
    "squeeze",
    "permute",
    "reshape",
    "lift_fresh",
    "_reshape_alias",
    "set_",
    "is_same_size",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
}


class LaunchCount(TorchDispatchMode):
    """Kernels launched inside the block: ``triton`` (launches) and ``torch`` (op names)."""

    def __init__(self):
        super().__init__()
        self.torch: list[str] = []
        self.triton: list[str] = []
        self._patched = []
        self._in_launch = 0

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        for cls in (JITFunction, InterpretedFunction):
            original = cls.run

            def run(fn, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False):
                    self.triton.append(getattr(fn, "__name__", None) or fn.fn.__name__)
                # The interpreter's own copies of the arguments are not the package's launches.
                self._in_launch += 1
                try:
                    return _original(fn, *args, **kwargs)
                finally:
                    self._in_launch -= 1

            self._patched.append((cls, original))
            cls.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, original in self._patched:
            cls.run = original
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        namespace = func.namespace
        if namespace != "fused_xent" and name not in _NO_KERNEL and not self._in_launch:
            self.torch.append(f"{namespace}.{name}")
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return len(self.torch) + len(self.triton)

    def __str__(self) -> str:
        return f"triton {self.triton}, torch {self.torch}"


N, C = 6, 40  # small: the interpreter runs every row


@pytest.fixture(autouse=True)
def _no_poison(monkeypatch):
    # Poisoning fills every output with NaN: a kernel of its own that a real run does not have.
    monkeypatch.setattr(fused_xent._alloc, "POISON", False)


def _inputs(impl_inplace: bool):
    x = make_logits(N, C, torch.float32, seed=1)
    leaf = x.clone().requires_grad_()
    # In place needs a non-leaf (the logits a model produced); a view's backward launches nothing.
    logits = leaf.view(N, C) if impl_inplace else leaf
    return leaf, logits, make_target(N, C, seed=1, ignored_rows=[2])


BUDGET = {"mean": 3, "sum": 3, "none": 2}
BUDGET_NO_GRAD = {"mean": 2, "sum": 2, "none": 1}


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_backward_launches(reduction, inplace):
    leaf, logits, target = _inputs(inplace)
    g = torch.ones(N, device=DEVICE) if reduction == "none" else torch.tensor(0.5, device=DEVICE)
    count = LaunchCount()
    with count:
        loss = fused_xent.cross_entropy(
            logits, target, reduction=reduction, inplace_backward=inplace, impl="triton"
        )
        loss.backward(g)
    assert count.total <= BUDGET[reduction], str(count)
    assert count.triton, "the kernels were not counted"  # the counter itself works
    assert leaf.grad is not None and leaf.grad.isfinite().all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_grad_launches(reduction):
    _, logits, target = _inputs(False)
    count = LaunchCount()
    with count, torch.no_grad():
        fused_xent.cross_entropy(logits, target, reduction=reduction, impl="triton")
    assert count.total <= BUDGET_NO_GRAD[reduction], str(count)


def test_lse_only_when_asked():
    """return_lse costs three element-wise ops on N floats (max + log-sum, and +inf where a row
    holds +inf: ``autograd.lse_of``); without it nothing makes the log-sum-exp."""
    _, logits, target = _inputs(False)
    counts = []
    for return_lse in (False, True):
        count = LaunchCount()
        with count, torch.no_grad():
            fused_xent.cross_entropy(logits, target, return_lse=return_lse, impl="triton")
        counts.append(count)
    assert counts[1].total == counts[0].total + 3, f"{counts[0]} / {counts[1]}"


def test_counter_sees_torch_ops():
    """The counter is not blind: torch's own loss launches several kernels."""
    _, logits, target = _inputs(False)
    count = LaunchCount()
    with count:
        torch.nn.functional.cross_entropy(logits, target).backward()
    assert len(count.torch) >= 3, str(count)
