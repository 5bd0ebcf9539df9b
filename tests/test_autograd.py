"""The autograd contract: version counters, single use of the fused gradient, accumulation,
the incoming gradient, double backward, and the nn.Module wrapper."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    IMPLS,
    REDUCTIONS,
    backward,
    check_grad,
    check_loss,
    make_logits,
    make_target,
    oracle,
)

from fused_xent import CrossEntropyLoss, cross_entropy

N, C = 5, 40


def _inputs(seed=0, dtype=torch.float32):
    x = make_logits(N, C, dtype, seed).requires_grad_()
    return x, make_target(N, C, seed, ignored_rows=[3])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_bumps_version(impl, reduction):
    """sin() saved y for its backward; the loss then overwrites y with its gradient. Autograd must
    refuse instead of differentiating sin at the gradient's values."""
    leaf, t = _inputs()
    y = leaf * 1
    w = y.sin()
    version = y._version
    loss = cross_entropy(y, t, reduction=reduction, inplace_backward=True, impl=impl)
    # Every reduction writes an in-place gradient in the backward (so it is rounded once, with
    # the incoming gradient applied); the forward leaves the logits alone.
    assert y._version == version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss.sum() + w.sum()).backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_backward_leaves_saved_logits_alone(impl):
    """Without inplace_backward the same graph is fine and matches torch."""
    leaf, t = _inputs()
    y = leaf * 1
    w = y.sin()
    loss = cross_entropy(y, t, impl=impl)
    (loss + w.sum()).backward()
    _, want = oracle(leaf, t)
    check_grad(leaf.grad, want + leaf.detach().double().cos(), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("impl", IMPLS)
def test_second_backward_raises(impl, reduction):
    """The fused gradient is computed in the forward and handed out once."""
    x, t = _inputs()
    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_second_backward_none_accumulates(impl):
    """reduction="none" recomputes its gradient in the backward, so a retained graph works."""
    x, t = _inputs()
    loss = cross_entropy(x, t, reduction="none", impl=impl)
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()
    _, want = oracle(x, t, reduction="none")
    check_grad(x.grad, 2 * want, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_raises(impl, reduction):
    x, t = _inputs()
    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    # a grad_outputs that requires grad, as in a gradient penalty on an upstream quantity
    g = torch.ones_like(loss, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, grad_outputs=g, create_graph=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_create_graph_is_not_silently_constant(impl):
    x, t = _inputs()
    loss = cross_entropy(x, t, impl=impl)
    # Not a tensor outside the graph, which would make grad.square().sum() a silent constant:
    # the request for a differentiable gradient is refused outright.
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("g", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("impl", IMPLS)
def test_scalar_grad_output(impl, reduction, dtype, g):
    x, t = _inputs(dtype=dtype)
    loss = cross_entropy(x, t, reduction=reduction, impl=impl)
    loss.backward(torch.tensor(g))
    want_loss, want = oracle(x, t, reduction=reduction)
    check_loss(loss, want_loss, dtype)
    if g == 0.0:
        assert (x.grad == 0).all()  # exactly zero, not merely small
    else:
        check_grad(x.grad, g * want, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_grad_output_none(impl):
    x, t = _inputs()
    loss = cross_entropy(x, t, reduction="none", impl=impl)
    loss.backward(torch.zeros(N))
    assert (x.grad == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_accumulates(impl, reduction):
    """Two calls on one leaf add into its .grad."""
    x, t1 = _inputs(seed=1)
    t2 = make_target(N, C, 2)
    backward(cross_entropy(x, t1, reduction=reduction, impl=impl))
    backward(cross_entropy(x, t2, reduction=reduction, impl=impl))
    _, g1 = oracle(x, t1, reduction=reduction)
    _, g2 = oracle(x, t2, reduction=reduction)
    check_grad(x.grad, g1 + g2, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_module_matches_functional(impl, reduction):
    x = make_logits(N, C, torch.float32, 0).requires_grad_()
    t = make_target(N, C, 0, ignored_rows=[3], ignore_index=7)
    module = CrossEntropyLoss(ignore_index=7, reduction=reduction, impl=impl)
    x2 = x.detach().clone().requires_grad_()
    a = module(x, t)
    b = cross_entropy(x2, t, ignore_index=7, reduction=reduction, impl=impl)
    backward(a)
    backward(b)
    assert torch.equal(a, b)
    assert torch.equal(x.grad, x2.grad)
    want_loss, want = oracle(x, t, ignore_index=7, reduction=reduction)
    check_loss(a, want_loss, torch.float32)
    check_grad(x.grad, want, torch.float32)


def test_module_repr():
    """ignore_index and reduction always; every other option only where it is not the default."""
    module = CrossEntropyLoss(ignore_index=3, reduction="sum", inplace_backward=True, impl="triton")
    assert repr(module) == (
        "CrossEntropyLoss(ignore_index=3, reduction='sum', inplace_backward=True, impl='triton')"
    )
    assert repr(CrossEntropyLoss()) == "CrossEntropyLoss(ignore_index=-100, reduction='mean')"
    every = CrossEntropyLoss(
        torch.ones(3),
        ignore_index=0,
        reduction="none",
        label_smoothing=0.1,
        lse_square_scale=1e-4,
        softcap=30.0,
        logit_scale=0.5,
        return_lse=True,
        inplace_backward=True,
        impl="reference",
    )
    assert repr(every) == (
        "CrossEntropyLoss(ignore_index=0, reduction='none', label_smoothing=0.1, "
        "lse_square_scale=0.0001, softcap=30.0, logit_scale=0.5, return_lse=True, "
        "inplace_backward=True, impl='reference')"
    )
