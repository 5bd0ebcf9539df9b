"""The LLM options (softcap, logit_scale, lse_square_scale, return_lse) against a float64 formula
written here from their definition, not through the package's reference:

    z    = softcap * tanh(logit_scale * x / softcap)       (z = logit_scale * x without a softcap)
    lse  = log(sum_c exp(z_c))
    loss = CE(z) + lse_square_scale * lse**2               for every non-ignored row

with CE torch's cross-entropy (class weights, label smoothing, probability targets), and the z-loss
term not multiplied by the class weight; "mean" divides the whole row loss by torch's denominator.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICE,
    GRAD_RTOL,
    LOSS_RTOL,
    REDUCTIONS,
    backward,
    check_grad,
    check_loss,
    dtype_id,
    rel_err,
)

from fused_xent import cross_entropy

IMPL_VARIANTS = ["reference", "triton", "triton-small-blocks"]
IGNORE_INDEX = -100


def _impl(variant: str, request) -> str:
    if variant == "triton-small-blocks":
        request.getfixturevalue("small_blocks")
        return "triton"
    return variant


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def formula(
    x,
    target,
    *,
    weight=None,
    ignore_index=IGNORE_INDEX,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    logit_scale=1.0,
    grad_out=None,
):
    """The definition above in float64, on any input shape: (loss, lse, gradient)."""
    x64 = x.detach().to(torch.float64).requires_grad_()
    class_dim = 0 if x.dim() == 1 else 1
    n_classes = x.shape[class_dim]
    z = logit_scale * x64.movedim(class_dim, -1)  # (..., C)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse.unsqueeze(-1)
    w = torch.ones(n_classes, dtype=torch.float64, device=x.device)
    if weight is not None:
        w = weight.to(torch.float64)
    eps = label_smoothing
    if target.is_floating_point():
        t = (1 - eps) * target.to(torch.float64).movedim(class_dim, -1) + eps / n_classes
        ce = -(w * t * logp).sum(-1)
        kept = torch.ones_like(lse, dtype=torch.bool)
        denominator = torch.tensor(float(lse.numel()), dtype=torch.float64)
    else:
        kept = target != ignore_index
        y = torch.where(kept, target, 0).long()
        w_y = w[y]
        nll = -w_y * logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        smooth = -(w * logp).sum(-1)
        ce = (1 - eps) * nll + eps / n_classes * smooth
        denominator = (w_y * kept).sum() if weight is not None else kept.sum().to(torch.float64)
    row = torch.where(kept, ce + lse_square_scale * lse**2, 0.0)
    loss = {"none": row, "sum": row.sum(), "mean": row.sum() / denominator}[reduction]
    backward(loss, None if grad_out is None else grad_out.to(torch.float64))
    return loss.detach(), lse.detach(), x64.grad


def make_problem(n, c, dtype, seed, *, scale=8.0, prob=False, ignored=(1,), weight=False):
    """Logits ~ N(0, scale^2) (8: many beyond a softcap of 5, so the tanh bends), target, weight."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if prob:
        t = torch.rand(n, c, generator=gen)
    else:
        t = torch.randint(0, c, (n,), generator=gen)
        t[list(ignored)] = IGNORE_INDEX
    w = torch.rand(c, generator=gen) * 1.5 + 0.25 if weight else None
    return (
        x.to(DEVICE).requires_grad_(),
        t.to(DEVICE),
        None if w is None else w.to(DEVICE),
    )


def random_g(reduction, n, seed):
    gen = torch.Generator().manual_seed(seed + 7)
    shape = (n,) if reduction == "none" else ()
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 3 - 1.5).float().to(DEVICE)


OPTION_SETS = {
    "softcap": dict(softcap=5.0),  # logits ~ N(0, 8^2): most of them are bent by the tanh
    "logit_scale": dict(logit_scale=0.6),
    # 1e-2 rather than the usual 1e-4: lse ~ 5-20 here, so the term is well above the tolerance
    "z-loss": dict(lse_square_scale=1e-2),
    "softcap+scale": dict(softcap=5.0, logit_scale=2.5),
    "all": dict(softcap=5.0, logit_scale=2.5, lse_square_scale=1e-2),
}


def test_formula_without_options_is_torch():
    """The oracle itself: with no LLM option it is F.cross_entropy (weight, smoothing, ignore)."""
    x, t, w = make_problem(6, 37, torch.float64, 1, weight=True)
    w, tp = w.double(), torch.rand(6, 37, dtype=torch.float64, device=DEVICE)
    for target in (t, tp):
        for reduction in REDUCTIONS:
            kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
            want, _, want_grad = formula(x, target, **kw)
            x64 = x.detach().double().requires_grad_()
            torch_loss = F.cross_entropy(x64, target, ignore_index=IGNORE_INDEX, **kw)
            backward(torch_loss)
            torch.testing.assert_close(want, torch_loss.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(want_grad, x64.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("variant", IMPL_VARIANTS)
def test_option_matches_formula(variant, options, reduction, request):
    """Each option alone and combined, with an ignored row and a non-unit incoming gradient."""
    impl = _impl(variant, request)
    n, c = 5, 37  # 37: a partial last block (16 + 16 + 5 under small blocks, 64 from the table)
    opts = OPTION_SETS[options]
    seed = _seed(options, reduction)
    x, t, _ = make_problem(n, c, torch.float32, seed)
    g = random_g(reduction, n, seed)

    loss = cross_entropy(x, t, reduction=reduction, impl=impl, **opts)
    backward(loss, g)

    want_loss, _, want_grad = formula(x, t, reduction=reduction, grad_out=g, **opts)
    check_loss(loss, want_loss, torch.float32)
    check_grad(x.grad, want_grad, torch.float32)
    assert (x.grad[1] == 0).all()  # the ignored row, exactly
    # The options move the answer far beyond the tolerance, so ignoring one would fail here.
    plain_loss, _, plain_grad = formula(x, t, reduction=reduction, grad_out=g)
    assert rel_err(plain_loss, want_loss) > 100 * LOSS_RTOL
    assert rel_err(plain_grad, want_grad) > 100 * GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", IMPL_VARIANTS)
def test_options_with_weight_and_smoothing(variant, reduction, target_kind, request):
    """Every option at once with class weights and label smoothing: the z-loss term unweighted,
    "mean" dividing the whole row loss by torch's denominator (the weight sum of kept rows for
    class indices, the row count for probabilities)."""
    impl = _impl(variant, request)
    n, c = 5, 37
    seed = _seed(reduction, target_kind, "weighted")
    x, t, w = make_problem(n, c, torch.float32, seed, prob=target_kind == "prob", weight=True)
    g = random_g(reduction, n, seed)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, **OPTION_SETS["all"])

    loss = cross_entropy(x, t, impl=impl, **kw)
    backward(loss, g)

    want_loss, _, want_grad = formula(x, t, grad_out=g, **kw)
    check_loss(loss, want_loss, torch.float32)
    check_grad(x.grad, want_grad, torch.float32)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("variant", IMPL_VARIANTS)
def test_options_low_precision(variant, dtype, inplace, request):
    """fp16 / bf16 logits with every option: loss in float32, gradient rounded once to the dtype."""
    impl = _impl(variant, request)
    n, c = 5, 37
    x, t, w = make_problem(n, c, dtype, _seed(dtype, "lowp"), weight=True)
    g = random_g("none", n, 3)
    kw = dict(weight=w, reduction="none", label_smoothing=0.1, **OPTION_SETS["all"])

    y = x * 1  # a non-leaf, so inplace_backward may overwrite it
    loss = cross_entropy(y, t, inplace_backward=inplace, impl=impl, **kw)
    backward(loss, g)

    want_loss, _, want_grad = formula(x, t, grad_out=g, **kw)
    check_loss(loss, want_loss, dtype)
    check_grad(x.grad, want_grad, dtype)


@pytest.mark.parametrize(
    "options, layout",
    [
        ("none", "3d"),  # plain logits; K-dim: lse in the (N, d1) shape
        ("softcap+scale", "1d"),  # unbatched: a 0-dim lse
        ("all", "2d"),  # the z-loss changes the loss, not the lse
        ("all", "3d"),
    ],
)
@pytest.mark.parametrize("variant", IMPL_VARIANTS)
def test_return_lse(variant, options, layout, request):
    """lse of the transformed logits z, every row (ignored ones included), float32, in the "none"
    shape, not differentiable, and the same from each kernel path: the forward that also writes
    the gradient ("mean"), the forward alone ("none"), and no gradient wanted (no_grad)."""
    impl = _impl(variant, request)
    c = 37
    shape = {"1d": (c,), "2d": (5, c), "3d": (2, c, 3)}[layout]
    gen = torch.Generator().manual_seed(_seed(options, layout))
    x = (torch.randn(shape, generator=gen) * 8).to(DEVICE).requires_grad_()
    row_shape = shape[:0] if layout == "1d" else shape[:1] + shape[2:]
    t = torch.randint(0, c, row_shape, generator=gen).to(DEVICE)
    if layout != "1d":
        t.view(-1)[1] = IGNORE_INDEX
    opts = OPTION_SETS.get(options, {})
    _, want_lse, _ = formula(x, t, **opts)

    lses = []
    for reduction in ("mean", "none"):
        loss, lse = cross_entropy(x, t, reduction=reduction, return_lse=True, impl=impl, **opts)
        assert loss.requires_grad and not lse.requires_grad
        want_loss, _, _ = formula(x, t, reduction=reduction, **opts)
        check_loss(loss, want_loss, torch.float32)
        lses.append(lse)
    with torch.no_grad():
        lses.append(cross_entropy(x, t, return_lse=True, impl=impl, **opts)[1])

    for lse in lses:
        assert lse.dtype == torch.float32
        assert lse.shape == row_shape
        assert rel_err(lse, want_lse) <= LOSS_RTOL
    # the lse of every reduction comes from the same per-row statistics
    assert all(torch.equal(lse, lses[0]) for lse in lses)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_return_lse_low_precision_and_prob_target(impl):
    """lse is float32 for bf16 logits and for probability targets (where no row is ignored)."""
    x, _, _ = make_problem(4, 37, torch.bfloat16, 5)
    tp = torch.rand(4, 37, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    loss, lse = cross_entropy(x, tp, reduction="none", return_lse=True, impl=impl, softcap=5.0)
    _, want_lse, _ = formula(x, tp, softcap=5.0)
    assert loss.dtype == lse.dtype == torch.float32
    assert rel_err(lse, want_lse) <= LOSS_RTOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_zloss_term_is_unweighted(impl, reduction):
    """Taking the package's own answers apart: with class weights w, adding the z-loss adds
    lse_square_scale * sum(lse^2) over kept rows, not weighted by w; "mean" divides that by the
    same denominator as the cross-entropy, sum_kept w[y]."""
    n, c, lss = 6, 37, 0.1  # 0.1: the z-term is about as large as the cross-entropy
    x, t, w = make_problem(n, c, torch.float32, 9, scale=3.0, ignored=(2, 4), weight=True)
    x = x.detach()
    kept = t != IGNORE_INDEX
    kw = dict(weight=w, reduction=reduction, impl=impl)

    with_z, lse = cross_entropy(x, t, lse_square_scale=lss, return_lse=True, **kw)
    without_z = cross_entropy(x, t, **kw)

    z_term = lss * (lse.double()[kept] ** 2).sum()
    if reduction == "mean":
        z_term = z_term / w.double()[t[kept]].sum()
    torch.testing.assert_close((with_z - without_z).double(), z_term, rtol=1e-5, atol=1e-6)
    # and weighting the z-term by w[y] would have been visibly different
    weighted = lss * (w.double()[t[kept]] * lse.double()[kept] ** 2).sum()
    if reduction == "mean":
        weighted = weighted / w.double()[t[kept]].sum()
    assert abs(float(weighted - z_term)) > 1e-2 * float(z_term)


# --- the softcap at the end of a row -----------------------------------------------------------


@pytest.mark.parametrize(
    "c",
    [
        1,  # only one real lane: loss and gradient exactly 0 if no mass leaks
        5,  # one block, 11 masked lanes under small blocks (59 from the table's block 64)
        37,  # a partial last block: 16 + 16 + 5, 11 masked lanes after the real ones
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", ["triton", "triton-small-blocks"])
def test_softcap_does_not_leak_past_row_end(variant, reduction, c, request):
    """Masked lanes past the row are -inf; through the tanh they would become -softcap and each
    add exp(-softcap - lse) of probability mass. softcap = 1 and logits near -1 make that leak
    large (a masked lane as likely as a real one), so the formula comparison would catch it."""
    impl = _impl(variant, request)
    n, pad = 4, 11
    gen = torch.Generator().manual_seed(c)
    values = (torch.randn(n, c, generator=gen) * 0.5 - 1.0).to(DEVICE)
    t = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    g = random_g(reduction, n, c)
    # A row-strided view, so lanes past the row end are real memory holding a guard value.
    big = torch.full((n, c + pad), -1.0, device=DEVICE)
    big[:, :c] = values
    leaf = big.requires_grad_()
    x = (leaf * 1)[:, :c]

    loss = cross_entropy(x, t, reduction=reduction, softcap=1.0, impl=impl)
    backward(loss, g)

    want_loss, _, want_grad = formula(values, t, reduction=reduction, softcap=1.0, grad_out=g)
    check_loss(loss, want_loss, torch.float32)
    check_grad(leaf.grad[:, :c], want_grad, torch.float32)
    assert (leaf.grad[:, c:] == 0).all()
    assert (x._base.detach()[:, c:] == -1.0).all()
    if c == 1:
        assert (loss == 0).all() and (leaf.grad == 0).all()


def _softcap_case(softcap, impl):
    return pytest.param(impl, softcap, id=f"{impl}-{softcap:g}")


@pytest.mark.parametrize(
    "impl, softcap",
    [
        _softcap_case(softcap, impl)
        for impl in ("reference", "triton")
        for softcap in (
            30.0,  # Gemma 2's final-logit cap, logits ~3: |u| ~ 0.1, little cancellation
            1e4,  # a cap far above the logits, as a "nearly off" setting: u ~ 3e-4
            1e5,
        )
    ],
)
def test_large_softcap_accuracy(impl, softcap):
    """A softcap far above the logits barely bends them, and must still be as accurate as the
    float32 tolerances: z = softcap * tanh(x / softcap) has to keep x's own relative accuracy."""
    n, c = 6, 37
    x, t, _ = make_problem(n, c, torch.float32, 13, scale=3.0)
    g = random_g("none", n, 13)

    loss = cross_entropy(x, t, reduction="none", softcap=softcap, impl=impl)
    backward(loss, g)

    want_loss, _, want_grad = formula(x, t, reduction="none", softcap=softcap, grad_out=g)
    check_loss(loss, want_loss, torch.float32)
    check_grad(x.grad, want_grad, torch.float32)
