"""Randomized differential suite: both implementations against torch's F.cross_entropy on float64
copies, over the whole F.cross_entropy surface (input shapes, class-index and probability targets,
class weights, label smoothing, reductions, ignored rows), with a non-unit incoming gradient.

The full product of the factors below is 3 * 4 * 3 * 2 * 2 * 2 * 3 = 1728 cases per implementation,
far too many for Triton's CPU interpreter. Instead a seeded greedy sample covers every *pair* of
factor values at least once (most pairs several times) and is parametrized by index, so a failing
case is named, reproducible, and rerun alone with ``-k``.
"""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    IMPLS,
    LOW_PRECISION,
    REDUCTIONS,
    backward,
    check_grad,
    check_loss,
    check_no_worse_than_torch,
    dtype_id,
    oracle,
)

from fused_xent import cross_entropy

IGNORE_INDEX = -100

FACTORS = {
    "dtype": DTYPES,
    "layout": ("1d", "2d", "3d", "4d"),
    "c": (
        5,  # a tiny row: one block, 11 of the 16 lanes masked even under small blocks
        37,  # not a power of two; 16 + 16 + 5 under small blocks (a partial last block)
        100,  # 6 full small blocks + 4; block 128 (28 masked lanes) from the launch table
    ),
    "target": ("index", "prob"),
    "weight": (False, True),
    "smoothing": (0.0, 0.1),
    "reduction": REDUCTIONS,
}
N_CASES = 24  # the greedy pair cover needs ~16; the rest are random, for some triples


def _pairs(case: dict) -> set:
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(FACTORS, 2)}


def _sample(n_cases: int, seed: int) -> list[dict]:
    """A seeded sample of factor combinations in which every pair of values occurs."""
    rng = random.Random(seed)
    every_pair = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(FACTORS, 2)
        for va in FACTORS[a]
        for vb in FACTORS[b]
    }
    uncovered, cases = set(every_pair), []
    while uncovered or len(cases) < n_cases:
        candidates = [{k: rng.choice(v) for k, v in FACTORS.items()} for _ in range(64)]
        best = max(candidates, key=lambda case: len(_pairs(case) & uncovered))
        cases.append(best)
        uncovered -= _pairs(best)
    return cases


CASES = _sample(N_CASES, seed=20240611)


def _case_id(i: int, case: dict) -> str:
    return "-".join(
        [
            f"{i:02d}",
            dtype_id(case["dtype"]),
            f"{case['layout']}c{case['c']}",
            case["target"],
            "w" if case["weight"] else "now",
            f"ls{case['smoothing']}",
            case["reduction"],
        ]
    )


def _input_shape(layout: str, c: int) -> tuple[int, ...]:
    return {
        "1d": (c,),  # unbatched: one row, a 0-dim class-index target
        "2d": (5, c),  # a few rows (odd count)
        "3d": (2, c, 3),  # class dim not innermost: 6 rows, copied to (rows, C)
        "4d": (2, c, 1, 3),  # two spatial dims, one of size 1: 6 rows
    }[layout]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_problem(case: dict, seed: int):
    """(x, target, weight, incoming gradient) for one case; x is a leaf requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    shape, c = _input_shape(case["layout"], case["c"]), case["c"]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(case["dtype"])
    class_dim = 0 if len(shape) == 1 else 1
    row_shape = shape[:class_dim] + shape[class_dim + 1 :]
    if case["target"] == "prob":
        # Unnormalised rows (they need not sum to 1), a third of the entries exactly zero.
        t = torch.rand(shape, generator=gen)
        t = torch.where(torch.rand(shape, generator=gen) < 0.3, 0.0, t)
    else:
        t = torch.randint(0, c, row_shape, generator=gen)
        n_rows = t.numel()
        if n_rows > 1:  # a quarter of the rows ignored (never the only row of an unbatched input)
            ignored = torch.randperm(n_rows, generator=gen)[: max(1, n_rows // 4)]
            t.view(-1)[ignored] = IGNORE_INDEX
    w = torch.rand(c, generator=gen) * 1.5 + 0.25 if case["weight"] else None
    g_shape = row_shape if case["reduction"] == "none" else ()
    g = (torch.rand(g_shape, generator=gen, dtype=torch.float64) * 3 - 1.5).to(torch.float32)
    w = None if w is None else w.to(DEVICE)
    return x.to(DEVICE).requires_grad_(), t.to(DEVICE), w, g.to(DEVICE)


@pytest.mark.parametrize("impl", ["reference", "triton", "triton-small-blocks"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(i, c) for i, c in enumerate(CASES)])
def test_matches_torch(case, impl, request):
    if impl == "triton-small-blocks":
        request.getfixturevalue("small_blocks")
        impl = "triton"
    x, t, w, g = make_problem(case, _seed(case))
    kw = dict(weight=w, reduction=case["reduction"], label_smoothing=case["smoothing"])

    loss = cross_entropy(x, t, ignore_index=IGNORE_INDEX, impl=impl, **kw)
    backward(loss, g)

    want_loss, want_grad = oracle(x, t, ignore_index=IGNORE_INDEX, grad_out=g, **kw)
    assert loss.shape == want_loss.shape
    check_loss(loss, want_loss, case["dtype"])
    check_grad(x.grad, want_grad, case["dtype"])
    # Apple's check only where our gradient is rounded once. With "mean"/"sum" and g != 1 the
    # gradient is rounded to the input dtype in the forward and again after the backward's * g:
    # over 30 seeds of 6 x 100 bf16 that is still better than torch on median (ratio 0.8-0.88),
    # but single samples of this size reach 2.2x, so there it is held to GRAD_RTOL alone.
    if case["dtype"] in LOW_PRECISION and case["reduction"] == "none":
        check_no_worse_than_torch(
            x.grad, x, t, want_grad, ignore_index=IGNORE_INDEX, grad_out=g, **kw
        )
    if t.is_floating_point():
        return
    ignored = (t == IGNORE_INDEX).unsqueeze(0 if x.dim() == 1 else 1).expand_as(x)
    assert (x.grad[ignored] == 0).all()  # exactly zero, not merely small


def test_sample_covers_every_pair():
    """The claim in the module docstring, checked: every pair of factor values is sampled."""
    covered = set().union(*map(_pairs, CASES))
    for a, b in itertools.combinations(FACTORS, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            assert ((a, va), (b, vb)) in covered, f"{a}={va} with {b}={vb} never sampled"


# --- layouts the kernels must not take at face value --------------------------------------------


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
@pytest.mark.parametrize("impl", IMPLS)
def test_strided_input_with_options(impl, layout, reduction, target_kind):
    """A view of a wider buffer (row stride > C) and a transposed input (class stride > 1), with
    weight and smoothing; a probability target gets the same layout as the input."""
    c, pad = 37, 11  # 37: a partial last block; 11 guard columns right of each row
    case = dict(
        dtype=torch.float32, layout="2d", c=c, target=target_kind, weight=True, smoothing=0.1,
        reduction=reduction,
    )  # fmt: skip
    values, t_values, w, g = make_problem(case, _seed(layout, reduction, target_kind))
    values, n = values.detach(), values.shape[0]
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    want_loss, want_grad = oracle(values, t_values, grad_out=g, **kw)

    if layout == "row-strided":
        big = torch.full((n, c + pad), 7.0, device=DEVICE)
        big[:, :c] = values
        leaf = big.requires_grad_()
        x = (leaf * 1)[:, :c]
        assert x.stride() == (c + pad, 1)
        t = t_values
        if target_kind == "prob":
            t_big = torch.full((n, c + pad), 5.0, device=DEVICE)
            t_big[:, :c] = t_values
            t = t_big[:, :c]
    else:
        leaf = values.t().contiguous().requires_grad_()  # (C, N)
        x = (leaf * 1).t()
        assert x.stride() == (1, n)
        t = t_values.t().contiguous().t() if target_kind == "prob" else t_values
        assert target_kind == "index" or t.stride() == (1, n)

    loss = cross_entropy(x, t, impl=impl, **kw)
    backward(loss, g)

    check_loss(loss, want_loss, torch.float32)
    grad = leaf.grad[:, :c] if layout == "row-strided" else leaf.grad.t()
    check_grad(grad, want_grad, torch.float32)
    if layout == "row-strided":
        assert (leaf.grad[:, c:] == 0).all()  # the guard columns get no gradient


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_strided_weight(impl, reduction):
    """weight as a non-contiguous view (every other element of a longer vector)."""
    c = 37
    case = dict(
        dtype=torch.float32, layout="2d", c=c, target="index", weight=False, smoothing=0.1,
        reduction=reduction,
    )  # fmt: skip
    x, t, _, g = make_problem(case, _seed("strided-weight", reduction))
    w_big = torch.rand(2 * c, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.25
    w = w_big.to(DEVICE)[::2]
    assert w.stride() == (2,)

    loss = cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, impl=impl)
    backward(loss, g)

    want_loss, want_grad = oracle(
        x, t, weight=w, reduction=reduction, label_smoothing=0.1, grad_out=g
    )
    check_loss(loss, want_loss, torch.float32)
    check_grad(x.grad, want_grad, torch.float32)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("impl", IMPLS)
def test_kdim_channels_last(impl, target_kind, inplace):
    """A K-dim input whose class dim is innermost in memory (channels-last): the flattening to
    rows is a view, not a copy, so the gradient flows back through that view (and with
    inplace_backward lands in the input's own storage)."""
    n, c, d = 2, 37, 3
    gen = torch.Generator().manual_seed(17)
    leaf = (torch.randn(n, d, c, generator=gen) * 3).to(DEVICE).requires_grad_()
    if target_kind == "prob":
        t = torch.rand(n, d, c, generator=gen).to(DEVICE).permute(0, 2, 1)
    else:
        t = torch.randint(0, c, (n, d), generator=gen).to(DEVICE)
        t[1, 0] = IGNORE_INDEX
    g = torch.rand(n, d, generator=gen).to(DEVICE) + 0.5
    want_loss, want_grad = oracle(leaf.detach().permute(0, 2, 1), t, reduction="none", grad_out=g)

    x = (leaf * 1).permute(0, 2, 1)  # (N, C, d), class stride 1
    assert x.stride(1) == 1
    loss = cross_entropy(x, t, reduction="none", inplace_backward=inplace, impl=impl)
    backward(loss, g)

    check_loss(loss, want_loss, torch.float32)
    check_grad(leaf.grad.permute(0, 2, 1), want_grad, torch.float32)


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize(
    "layout",
    [
        "kdim",  # (N, 1, d): the rows view (N * d, 1) has class stride d
        "transposed",  # (1, N).t(): class stride N
        "contiguous",  # (N, 1): class stride 1, the control
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_single_class_views(impl, layout, target_kind, request):
    """C = 1 (torch accepts it: loss 0, gradient 0) in the layouts where a class stride can be
    anything, since a size-1 dim's stride is not normalised by .contiguous()."""
    n, d = 4, 3
    x_values = torch.randn(n, 1, d, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    leaf = x_values.requires_grad_() if layout == "kdim" else x_values[:, :, 0].clone()
    if layout == "transposed":
        leaf = torch.empty(1, n, device=DEVICE).copy_(leaf.t()).requires_grad_()  # strides (n, 1)
        x = leaf.t()
    else:
        leaf = leaf.requires_grad_()
        x = leaf
    rows_stride = x.movedim(1, -1).reshape(-1, 1).stride(1)
    assert (rows_stride == 1) == (layout == "contiguous")
    row_shape = x.shape[:1] + x.shape[2:]
    if target_kind == "prob":
        t = torch.full(x.shape, 0.7, device=DEVICE)  # a single class with mass 0.7
    else:
        t = torch.zeros(row_shape, dtype=torch.long, device=DEVICE)
    g = torch.rand(row_shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    loss = cross_entropy(x, t, reduction="none", impl=impl)
    backward(loss, g)

    want_loss, want_grad = oracle(x, t, reduction="none", grad_out=g)
    assert (want_loss == 0).all() and (want_grad == 0).all()  # what torch says about C = 1
    assert loss.shape == row_shape and (loss == 0).all()
    assert (leaf.grad == 0).all()


@pytest.mark.parametrize("ignore_index", [0, 3, -100])
@pytest.mark.parametrize("impl", IMPLS)
def test_probability_target_has_no_ignored_rows(impl, ignore_index):
    """ignore_index is a class-index notion: with probabilities every row counts, whatever
    ignore_index says (0 and 3 are real classes here), and "mean" divides by the row count."""
    case = dict(
        dtype=torch.float32, layout="2d", c=37, target="prob", weight=True, smoothing=0.0,
        reduction="mean",
    )  # fmt: skip
    x, t, w, g = make_problem(case, _seed("prob-ignore"))

    loss = cross_entropy(x, t, w, ignore_index=ignore_index, impl=impl)
    backward(loss, g)

    want_loss, want_grad = oracle(x, t, weight=w, grad_out=g)
    check_loss(loss, want_loss, torch.float32)
    check_grad(x.grad, want_grad, torch.float32)
    assert (x.grad.abs().sum(1) > 0).all()  # no row dropped
