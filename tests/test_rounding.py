"""The gradient is rounded to the logits' dtype once, after every scale is applied.

A float16 gradient of a "mean" loss is ``(p - onehot) / N``: rounded before GradScaler's 65536 is
applied it underflows (at N = 256 most entries of a wide row sit below float16's smallest
subnormal, 6e-8); a bfloat16 one is rounded twice whenever the incoming gradient is not 1 (a loss
divided by the accumulation steps). torch's autocast recipe (a float32 loss on half-precision
logits) rounds once; ours must be no less accurate than that recipe, at every incoming gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, IMPLS, dtype_id, make_logits, make_target, rel_err

from fused_xent import cross_entropy

# 256 rows: p / 256 underflows float16 for p < 1.5e-5, which a third of the logits of a wide
# row at scale 3 have. 1000 classes: not a multiple of 8 (the row edges' code too).
N, C = 256, 1000
# GradScaler's default scale, a gradient-accumulation divisor, and the plain backward().
INCOMING = (65536.0, 0.125, 1.0)


def _recipe_grad(x, t, reduction, g):
    """torch's autocast recipe: the loss in float32, the gradient rounded once to x's dtype."""
    x32 = x.detach().float().requires_grad_()
    F.cross_entropy(x32, t, reduction=reduction).backward(g)
    return x32.grad.to(x.dtype)


def _exact_grad(x, t, reduction, g):
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, t, reduction=reduction).backward(g.double())
    return x64.grad


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("incoming", INCOMING)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_rounded_once(impl, dtype, incoming, reduction, inplace):
    x = make_logits(N, C, dtype, seed=7)
    t = make_target(N, C, seed=7, ignored_rows=[5])
    g = torch.full((N,) if reduction == "none" else (), incoming, device=DEVICE)
    leaf = x.clone().requires_grad_()
    logits = leaf.view(N, C) if inplace else leaf  # in place writes into a non-leaf
    cross_entropy(logits, t, reduction=reduction, inplace_backward=inplace, impl=impl).backward(g)

    exact = _exact_grad(x, t, reduction, g)
    recipe = _recipe_grad(x, t, reduction, g)
    ours, theirs = rel_err(leaf.grad, exact), rel_err(recipe, exact)
    assert ours <= 1.25 * theirs + 1e-7, f"rel err {ours:.3g} vs torch's recipe {theirs:.3g}"
    # No more underflow than the recipe: entries flushed to zero where the exact gradient is not.
    lost = ((leaf.grad == 0) & (exact != 0)).sum()
    lost_recipe = ((recipe == 0) & (exact != 0)).sum()
    assert lost <= lost_recipe, f"{int(lost)} entries underflowed, the recipe {int(lost_recipe)}"


def test_the_case_underflows_without_care():
    """The sizes above do make a float16 p / N underflow (the test could fail)."""
    x = make_logits(N, C, torch.float16, seed=7).float()
    p_over_n = torch.softmax(x, dim=1) / N
    assert (p_over_n.half() == 0).float().mean() > 0.2
