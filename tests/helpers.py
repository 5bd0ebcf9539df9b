"""Oracle, tolerances and inputs shared by the test modules (imported as ``helpers``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

IMPLS = ("reference", "triton")
# The compile tests also trace the default, the route users get on each device.
COMPILE_IMPLS = ("auto", *IMPLS)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
SMALL_BLOCK = 16  # forced kernel block (conftest's small_blocks): a few dozen logits cross blocks

# Relative, norm-wise errors against float64 (house style). The loss is accumulated and returned in
# float32 for every input dtype, so one loss tolerance; the gradient is rounded to the input dtype.
LOSS_RTOL = 1e-5
GRAD_RTOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 8e-3,
    torch.float64: 1e-12,
}
# Apple's check: our low-precision gradient may be at most this much worse than torch's own.
TORCH_ERR_FACTOR = 1.25
TORCH_ERR_EPS = 1e-6


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_logits(n, c, dtype, seed, scale=3.0, device=DEVICE) -> torch.Tensor:
    """(n, c) logits ~ N(0, scale^2): scaled so the softmax is far from flat."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def make_target(n, c, seed, ignored_rows=(), ignore_index=-100, device=DEVICE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, c, (n,), generator=gen)
    t[list(ignored_rows)] = ignore_index
    return t.to(device)


def random_grad_out(reduction, n, seed, device=DEVICE) -> torch.Tensor:
    """A non-unit incoming gradient: a scalar for mean/sum, one value per row for none."""
    gen = torch.Generator().manual_seed(seed + 2)
    shape = (n,) if reduction == "none" else ()
    g = torch.rand(shape, generator=gen, dtype=torch.float64) * 3 - 1.5
    return g.to(torch.float32).to(device)


def backward(loss: torch.Tensor, grad_out: torch.Tensor | None = None) -> None:
    """loss.backward() with ones (None) or ``grad_out`` as the incoming gradient."""
    if grad_out is None:
        loss.sum().backward()
    else:
        (loss * grad_out).sum().backward()


def _torch_target(target, dtype):
    """Class indices as int64; probability targets in the dtype the logits are computed in."""
    return target.to(dtype) if target.is_floating_point() else target.long()


def oracle(
    x,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    grad_out=None,
):
    """torch's own F.cross_entropy on a float64 copy of ``x``: (loss, gradient), both float64.

    ``target`` holds class indices or (floating) probabilities; ``weight`` and the probability
    target are taken in float64 as well.
    """
    x64 = x.detach().to(torch.float64).requires_grad_()
    loss = F.cross_entropy(
        x64,
        _torch_target(target, torch.float64),
        weight=None if weight is None else weight.to(torch.float64),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    backward(loss, None if grad_out is None else grad_out.to(torch.float64))
    return loss.detach(), x64.grad


def weighted_oracle(z, target, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                    lse_square_scale=0.0, token_weight=None, reduction="mean"):  # fmt: skip
    """torch's F.cross_entropy of float64 logits ``z`` (classes in dim 1; class indices or
    probabilities) plus the z-loss on the kept rows, each row's loss times ``token_weight``,
    reduced with torch's own "mean" denominator: the kept rows' count or class weights (every
    row for probabilities). The denominator is checked against torch's "mean" first."""
    prob = target.is_floating_point()
    weight = None if weight is None else weight.double()
    kw = dict(weight=weight, label_smoothing=label_smoothing)
    if not prob:
        kw["ignore_index"] = ignore_index
    rows = F.cross_entropy(z, target, reduction="none", **kw)
    kept = torch.ones_like(rows, dtype=torch.bool) if prob else target != ignore_index
    if prob:
        den = torch.tensor(float(rows.numel()), dtype=rows.dtype, device=rows.device)
    elif weight is None:
        den = kept.sum().double()
    else:
        den = (weight[torch.where(kept, target, 0)] * kept).sum()
    torch_mean = F.cross_entropy(z, target, reduction="mean", **kw)
    if not torch.allclose(rows.sum() / den, torch_mean, rtol=1e-12, atol=0, equal_nan=True):
        raise AssertionError("the oracle's mean denominator is not torch's")
    if lse_square_scale:
        lse = torch.logsumexp(z, dim=1)
        rows = rows + torch.where(kept, lse_square_scale * lse * lse, 0.0)
    if token_weight is not None:
        rows = rows * token_weight.double()
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / den


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the finite entries of ``expected``.

    NaN must sit at the same places in both. Where ``expected`` is all zero the error is the
    plain norm of ``actual``, so an exact zero is required up to 1e-30.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.equal(a.isnan(), e.isnan()), "NaN in different places"
    keep = ~e.isnan()
    a, e = a[keep], e[keep]
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def check_loss(loss, expected, input_dtype) -> None:
    want = torch.float64 if input_dtype == torch.float64 else torch.float32
    assert loss.dtype == want
    err = rel_err(loss, expected)
    assert err <= LOSS_RTOL, f"loss rel err {err:.3g} > {LOSS_RTOL}"


def check_grad(grad, expected, input_dtype) -> None:
    assert grad is not None
    assert grad.dtype == input_dtype
    tol = GRAD_RTOL[input_dtype]
    err = rel_err(grad, expected)
    assert err <= tol, f"gradient rel err {err:.3g} > {tol}"


def torch_lowp_grad_err(x, target, *, weight=None, grad_out=None, **kw):
    """Relative error of torch's own F.cross_entropy gradient computed in ``x.dtype``."""
    x_lp = x.detach().clone().requires_grad_()
    w_lp = None if weight is None else weight.to(x.dtype)
    loss = F.cross_entropy(x_lp, _torch_target(target, x.dtype), weight=w_lp, **kw)
    backward(loss, None if grad_out is None else grad_out.to(x.dtype))
    _, expected = oracle(x, target, weight=weight, grad_out=grad_out, **kw)
    return rel_err(x_lp.grad, expected)


def check_no_worse_than_torch(grad, x, target, expected, **kw) -> None:
    ours = rel_err(grad, expected)
    theirs = torch_lowp_grad_err(x, target, **kw)
    bound = TORCH_ERR_FACTOR * theirs + TORCH_ERR_EPS
    assert ours <= bound, f"gradient rel err {ours:.3g} > torch's own {theirs:.3g} (x1.25)"


def seeded(seed) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def shaped_logits(shape, dtype, seed, scale=3.0, device=DEVICE) -> torch.Tensor:
    """randn logits of any shape (made in float64 on the CPU, then cast)."""
    x = torch.randn(shape, generator=seeded(seed), dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def shaped_ids(shape, vocab, seed, ignored=(), device=DEVICE) -> torch.Tensor:
    """Random class ids of any shape; the flat positions ``ignored`` hold -100."""
    t = torch.randint(0, vocab, shape, generator=seeded(seed + 1))
    t.view(-1)[list(ignored)] = -100
    return t.to(device)
