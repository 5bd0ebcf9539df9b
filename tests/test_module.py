"""CrossEntropyLoss with every option: the same answer as the functional form, and ``weight`` a
registered buffer (state_dict, load_state_dict, .to())."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, IMPLS, REDUCTIONS, backward, check_grad, check_loss, oracle

from fused_xent import CrossEntropyLoss, cross_entropy

N, C = 5, 37  # 37: a partial last block under small blocks (16 + 16 + 5)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=gen) * 3).to(DEVICE)
    t = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    t[1] = 2  # a row hitting ignore_index=2 below
    w = (torch.rand(C, generator=gen) * 1.5 + 0.25).to(DEVICE)
    return x, t, w


EVERY_OPTION = dict(
    ignore_index=2,  # a real class, so the module must pass it on
    label_smoothing=0.1,
    lse_square_scale=1e-2,
    softcap=5.0,
    logit_scale=0.7,
    return_lse=True,
)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", ["reference", "triton", "triton-small-blocks"])
def test_module_every_option(variant, reduction, inplace, request):
    """Bit for bit the functional call with the same options (loss, lse and gradient); and each
    option changes the answer, so one the module dropped would show."""
    impl = variant
    if variant == "triton-small-blocks":
        request.getfixturevalue("small_blocks")
        impl = "triton"
    x, t, w = _inputs()
    module = CrossEntropyLoss(
        w, reduction=reduction, inplace_backward=inplace, impl=impl, **EVERY_OPTION
    )
    g = torch.rand(N if reduction == "none" else (), generator=torch.Generator().manual_seed(1))
    g = g.to(DEVICE) + 0.5

    results = []
    for call in (
        module,
        lambda a, b: cross_entropy(
            a, b, w, reduction=reduction, inplace_backward=inplace, impl=impl, **EVERY_OPTION
        ),
    ):
        leaf = x.clone().requires_grad_()
        loss, lse = call(leaf * 1, t)
        backward(loss, g)
        results.append((loss.detach(), lse, leaf.grad))

    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert results[0][0].shape == ((N,) if reduction == "none" else ())
    # The options are all live: without them the loss is another number.
    plain = cross_entropy(x, t, reduction=reduction, impl=impl)
    assert not torch.allclose(results[0][0], plain, rtol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_is_a_buffer(impl):
    x, t, w = _inputs(3)
    module = CrossEntropyLoss(w, label_smoothing=0.1, impl=impl)

    assert dict(module.named_buffers()).keys() == {"weight"}
    assert list(module.parameters()) == []
    state = module.state_dict()
    assert state.keys() == {"weight"} and torch.equal(state["weight"], w)

    # load_state_dict brings a checkpoint's weight into a module built with another one
    other = CrossEntropyLoss(torch.ones(C, device=DEVICE), label_smoothing=0.1, impl=impl)
    other.load_state_dict(state)
    assert torch.equal(other.weight, w)
    xx = x.clone().requires_grad_()
    loss = other(xx, t)
    loss.backward()
    want_loss, want_grad = oracle(x, t, weight=w, label_smoothing=0.1)
    check_loss(loss, want_loss, torch.float32)
    check_grad(xx.grad, want_grad, torch.float32)


def test_weight_follows_to():
    """.to(dtype) casts the weight, .to(device) moves it (the meta device stands in for a GPU
    where there is none); a plain attribute would stay where it was."""
    _, _, w = _inputs(4)
    module = CrossEntropyLoss(w.cpu())
    assert module.to(torch.float64).weight.dtype == torch.float64
    assert module.half().weight.dtype == torch.float16
    assert module.to("meta").weight.device.type == "meta"

    # the float64 weight then serves a float64 input (reference path), as torch's would
    x, t, w = _inputs(4)
    module = CrossEntropyLoss(w.cpu()).to(torch.float64)
    x64 = x.cpu().double().requires_grad_()
    loss = module(x64, t.cpu())
    loss.backward()
    want_loss, want_grad = oracle(x64, t.cpu(), weight=w.cpu())
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=0)
    check_grad(x64.grad, want_grad, torch.float64)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_weight_moves_to_cuda(impl):
    x, t, w = _inputs(5)
    module = CrossEntropyLoss(w.cpu(), impl=impl).to("cuda")
    assert module.weight.is_cuda
    xx = x.cuda().requires_grad_()
    loss = module(xx, t.cuda())
    loss.backward()
    want_loss, want_grad = oracle(xx, t.cuda(), weight=w.cuda())
    check_loss(loss, want_loss, torch.float32)
    check_grad(xx.grad, want_grad, torch.float32)


def test_no_weight_no_buffer_entry():
    module = CrossEntropyLoss()
    assert module.weight is None
    assert module.state_dict() == {}  # as torch.nn.CrossEntropyLoss() without a weight


def test_module_argument_errors():
    """Unknown options fail at construction; bad values at the first call, as the functional."""
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        CrossEntropyLoss(z_loss=1e-4)
    with pytest.raises(TypeError, match="positional argument"):
        CrossEntropyLoss(None, -100, "mean", 0.0, 1e-4)
    x, t, _ = _inputs()
    for kw, exc in [
        (dict(softcap=0.0), ValueError),
        (dict(logit_scale=-1.0), ValueError),
        (dict(lse_square_scale=-1.0), ValueError),
        (dict(label_smoothing=2.0), ValueError),
        (dict(softcap="30"), TypeError),
        (dict(weight=torch.ones(C - 1, device=DEVICE)), ValueError),
        (dict(weight=torch.ones(C, dtype=torch.long, device=DEVICE)), TypeError),
    ]:
        with pytest.raises(exc):
            CrossEntropyLoss(**kw)(x, t)
