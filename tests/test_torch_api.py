"""fused_xent as a drop-in for torch 2.13's ``F.linear_cross_entropy`` and
``nn.LinearCrossEntropyLoss``: the same signature, the same semantics (class weights, probability
targets, label smoothing, every reduction, K-dimensional heads, unbatched input), ``options``
mapped onto the chunk size, and a module whose state_dict loads into torch's and back.

The oracle is torch's own ``F.linear_cross_entropy`` (options=None: F.linear then F.cross_entropy)
on float64 copies of the inputs. Where the installed torch lacks it (before 2.13) the module is
skipped. Sizes are tiny: impl="triton" runs the kernels under the interpreter on the CPU.
"""

from __future__ import annotations

import inspect
import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_RTOL, IMPLS, LOSS_RTOL, rel_err

import fused_xent
from fused_xent import LinearCrossEntropyLoss, linear_cross_entropy
from fused_xent.functional import _chunk_from_options

if not hasattr(F, "linear_cross_entropy"):
    pytest.skip(
        f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)",
        allow_module_level=True,
    )
LCEO = torch.nn.LinearCrossEntropyOptions

N, D, C = 9, 6, 11  # 9 rows: chunks of 4 leave a partial last chunk
OUT = (2, 3)  # the K-dimensional head's d1, d2


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_case(seed, *, out=(), prob=False, bias=False, class_weight=False, unbatched=False,
              ignored=(), ignore_index=-100, lead=None):  # fmt: skip
    """float64 on the CPU: input, linear_weight (C, *out, D) scaled to logits ~ N(0, 2^2), the
    target (class indices with some ignored, or probabilities), linear_bias, class weights."""
    gen = torch.Generator().manual_seed(seed)
    lead = lead if lead is not None else (() if unbatched else (N,))
    x = torch.randn(*lead, D, generator=gen, dtype=torch.float64)
    w = torch.randn(C, *out, D, generator=gen, dtype=torch.float64) * (2.0 / D**0.5)
    b = torch.randn(C, *out, generator=gen, dtype=torch.float64) if bias else None
    cw = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5 if class_weight else None
    if prob:
        logits = torch.randn(*lead, C, *out, generator=gen, dtype=torch.float64) * 2
        t = torch.softmax(logits, dim=len(lead))  # over the classes
    else:
        t = torch.randint(0, C, (*lead, *out), generator=gen)
        if ignored:
            t.view(-1)[list(ignored)] = ignore_index
    return x, w, t, b, cw


def _leaf(a, dtype):
    return None if a is None else a.detach().to(dtype).to(DEVICE).requires_grad_()


def run(fn, x, w, t, b, cw, dtype, grad_seed, **kw):
    """fn on ``dtype`` copies (leaves) with a random incoming gradient: (loss, dx, dw, db)."""
    xl, wl, bl = _leaf(x, dtype), _leaf(w, dtype), _leaf(b, dtype)
    tt = t.to(dtype if t.is_floating_point() else t.dtype).to(DEVICE)
    cwt = None if cw is None else cw.to(dtype).to(DEVICE)
    loss = fn(xl, wl, tt, linear_bias=bl, weight=cwt, **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    g = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) * 2 - 0.5).to(loss.dtype)
    (loss * g.to(loss.device)).sum().backward()
    return loss.detach(), xl.grad, wl.grad, None if bl is None else bl.grad


def check(x, w, t, b, cw, *, impl, dtype=torch.float32, seed=0, chunk_size=4, **kw):
    """Ours (``dtype``, ``impl``) against torch's F.linear_cross_entropy in float64 (its
    reference path: ``options`` go to ours only)."""
    torch_kw = {k: v for k, v in kw.items() if k != "options"}
    want = run(F.linear_cross_entropy, x, w, t, b, cw, torch.float64, seed, **torch_kw)
    got = run(linear_cross_entropy, x, w, t, b, cw, dtype, seed, impl=impl,
              chunk_size=chunk_size, **kw)  # fmt: skip
    assert got[0].shape == want[0].shape
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss_tol = 1e-12 if dtype == torch.float64 else LOSS_RTOL
    for name, a, e in zip(("loss", "d_input", "d_linear_weight", "d_linear_bias"), got, want,
                          strict=True):  # fmt: skip
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == e.shape, name
        tol = loss_tol if name == "loss" else GRAD_RTOL[dtype]
        err = rel_err(a, e)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol}"
    return got


# --------------------------------------------------------------------------------------------
# 1. Semantics against torch
# --------------------------------------------------------------------------------------------

CASES = {
    # (N, D) input, (C, D) head: the chunked path
    "indices": dict(ignored=(2,)),
    "indices-bias-weight-smoothing": dict(
        bias=True, class_weight=True, ignored=(0, 8), label_smoothing=0.2
    ),
    "indices-ignore_index=4": dict(ignored=(1, 5), ignore_index=4),
    "prob": dict(prob=True),
    "prob-bias-weight-smoothing": dict(
        prob=True, bias=True, class_weight=True, label_smoothing=0.1
    ),
    "unbatched-indices": dict(unbatched=True, bias=True, class_weight=True),
    "unbatched-prob": dict(unbatched=True, prob=True, label_smoothing=0.1),
    # (C, d1, d2, D) head: the K-dimensional loss, composed over the 6 positions
    "kdim-indices-bias-weight": dict(out=OUT, bias=True, class_weight=True, ignored=(0, 7, 30)),
    "kdim-indices-smoothing-ignore_index=2": dict(
        out=OUT, ignored=(3, 4), ignore_index=2, label_smoothing=0.15, class_weight=True
    ),
    "kdim-prob-bias-weight-smoothing": dict(
        out=OUT, prob=True, bias=True, class_weight=True, label_smoothing=0.1
    ),
    "kdim1-prob": dict(out=(3,), prob=True),
}
_TRITON_CASES = {  # each interpreted case costs ~1-3 s: one or two reductions each
    ("indices-bias-weight-smoothing", "mean"),
    ("indices-bias-weight-smoothing", "none"),
    ("prob-bias-weight-smoothing", "mean"),
    ("prob-bias-weight-smoothing", "none"),
    ("unbatched-prob", "sum"),
    ("kdim-indices-bias-weight", "mean"),
    ("kdim-prob-bias-weight-smoothing", "none"),
    ("kdim1-prob", "mean"),
}


def _split(spec):
    spec = dict(spec)
    kw = {k: spec.pop(k) for k in ("label_smoothing",) if k in spec}
    if "ignore_index" in spec:
        kw["ignore_index"] = spec["ignore_index"]
    return spec, kw


@pytest.mark.parametrize(
    "impl, case, reduction",
    [
        pytest.param(impl, case, reduction, id=f"{impl}-{case}-{reduction}")
        for impl in IMPLS
        for case in CASES
        for reduction in ("mean", "sum", "none")
        if impl == "reference" or (case, reduction) in _TRITON_CASES
    ],
)
def test_against_torch(impl, case, reduction):
    spec, kw = _split(CASES[case])
    seed = _seed(case, reduction)
    args = make_case(seed, **spec)
    check(*args, impl=impl, seed=seed, reduction=reduction, **kw)


@pytest.mark.parametrize(
    "case", ["indices-bias-weight-smoothing", "kdim-prob-bias-weight-smoothing"]
)
def test_float64_reference_is_exact(case):
    """float64 on the reference: torch's numbers to 1e-12, chunked or K-dimensional."""
    spec, kw = _split(CASES[case])
    seed = _seed("f64", case)
    for reduction in ("mean", "none"):
        check(*make_case(seed, **spec), impl="reference", dtype=torch.float64, seed=seed,
              reduction=reduction, **kw)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_prob_weight(impl, dtype):
    """Half-precision head with probability targets and class weights: close to torch's float64
    numbers (the loss in float32; gradients within the dtype's rounding of the products)."""
    seed = _seed("half", dtype)
    x, w, t, b, cw = make_case(seed, prob=True, bias=True, class_weight=True)
    want = run(F.linear_cross_entropy, x, w, t, b, cw, torch.float64, seed, label_smoothing=0.1)
    got = run(linear_cross_entropy, x, w, t, b, cw, dtype, seed, label_smoothing=0.1, impl=impl,
              chunk_size=4)  # fmt: skip
    assert got[0].dtype == torch.float32
    for a, e in zip(got[1:], want[1:], strict=True):
        assert a.dtype == dtype
        assert rel_err(a, e) <= 3e-2
    assert rel_err(got[0], want[0]) <= 1e-2


def test_lead_dims_extension():
    """Beyond torch (which takes (D,) or (N, D)): with a (C, D) head any (..., D) input works,
    the logits being (..., C) as F.linear makes them; the same numbers as the rows flattened."""
    seed = _seed("lead")
    for prob in (False, True):
        x, w, t, b, cw = make_case(seed, lead=(2, 3), prob=prob, bias=True, class_weight=True)
        flat_t = t.reshape(6, C) if prob else t.reshape(6)
        for reduction in ("mean", "none"):
            kw = dict(linear_bias=b, weight=cw, reduction=reduction)
            got = linear_cross_entropy(x, w, t, impl="reference", **kw)
            want = F.linear_cross_entropy(x.reshape(6, D), w, flat_t, **kw)
            assert got.shape == ((2, 3) if reduction == "none" else ())
            assert rel_err(got.reshape(-1), want.reshape(-1)) <= 1e-12


def test_kdim_all_ignored_mean():
    """ "mean" over no kept position is NaN with exactly zero gradients, as torch."""
    x, w, t, b, cw = make_case(_seed("kdim-ignored"), out=OUT, bias=True)
    t.fill_(-100)
    for impl in ("reference", "triton"):
        got = run(linear_cross_entropy, x, w, t, b, cw, torch.float32, 0, impl=impl, chunk_size=4)
        want = run(F.linear_cross_entropy, x, w, t, b, cw, torch.float64, 0)
        assert got[0].isnan() and want[0].isnan()
        for grad, torch_grad in zip(got[1:], want[1:], strict=True):
            assert (grad == 0).all() and (torch_grad == 0).all()


def test_return_lse_kdim():
    x, w, t, b, _ = make_case(_seed("lse"), out=OUT, bias=True)
    loss, lse = linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", return_lse=True)
    logits = F.linear(x, w.reshape(-1, D), b.reshape(-1)).reshape(N, C, *OUT)
    assert lse.shape == loss.shape == (N, *OUT) and not lse.requires_grad
    assert rel_err(lse, torch.logsumexp(logits, dim=1)) <= 1e-12


# --------------------------------------------------------------------------------------------
# 2. The signature and torch's options
# --------------------------------------------------------------------------------------------


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signature_extends_torchs():
    """torch's parameters, in torch's order, kinds and defaults, then ours (keyword-only)."""
    theirs, ours = _params(F.linear_cross_entropy), _params(linear_cross_entropy)
    assert ours[: len(theirs)] == theirs
    extras = ours[len(theirs) :]
    assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, kind, _ in extras)
    assert {name for name, _, _ in extras} == {
        "lse_square_scale", "softcap", "logit_scale", "return_lse", "return_stats",
        "token_weight", "chunk_size", "fp32_weight_grad", "process_group", "impl",
    }  # fmt: skip
    theirs = _params(torch.nn.LinearCrossEntropyLoss.__init__)
    ours = _params(LinearCrossEntropyLoss.__init__)
    assert ours[: len(theirs)] == theirs


def test_old_positional_bias_is_refused():
    """The bias is keyword-only now (torch's linear_bias): a fourth positional argument raises
    instead of being taken for something else."""
    x, w, t, b, _ = make_case(0, bias=True)
    with pytest.raises(TypeError):
        linear_cross_entropy(x, w, t, b)


def test_options_batch_chunk_size_is_the_chunk_size(monkeypatch):
    """options.batch_chunk_size sets our chunk_size; the other fields are accepted and ignored;
    the numbers are torch's with either."""
    seen = []
    real = fused_xent.functional._linear_2d

    def spy(*args):
        seen.append(args[6])  # chunk_size
        return real(*args)

    monkeypatch.setattr(fused_xent.functional, "_linear_2d", spy)
    x, w, t, b, cw = make_case(_seed("options"), bias=True, class_weight=True, ignored=(3,))
    options = LCEO(batch_chunk_size=2, allow_retain_graph=True, acc_policy="accurate",
                   acc_dtype=torch.float32)  # fmt: skip
    check(x, w, t, b, cw, impl="reference", chunk_size=None, options=options)
    assert seen == [2]
    seen.clear()
    check(x, w, t, b, cw, impl="reference", chunk_size=None, options=LCEO())  # "auto": ours
    assert seen == [None]  # the choice left to ours: the default plan, vocabulary slabs
    seen.clear()
    # Probability targets and label smoothing: torch falls back from its chunked path (with a
    # warning); ours stays chunked.
    x, w, t, b, cw = make_case(_seed("options-prob"), prob=True)
    check(x, w, t, b, cw, impl="reference", chunk_size=None, label_smoothing=0.1,
          options=LCEO(batch_chunk_size=3))  # fmt: skip
    assert seen == [3]


@pytest.mark.parametrize(
    "n, d, c, method", [(9, 6, 11, "aspect_ratio"), (1000, 64, 5000, "aspect_ratio:2"),
                        (4096, 16, 32000, "aspect_ratio:4"), (7, 100, 3, "aspect_ratio")]
)  # fmt: skip
def test_options_aspect_ratio_matches_torch(n, d, c, method):
    """An explicit chunking_method gives the chunk torch's own options would pick."""
    options = LCEO(chunking_method=method)
    want = options._adjust(n, d, c, torch.float32, torch.device("cpu")).batch_chunk_size
    assert _chunk_from_options(options, None, n, d, c) == want


def test_options_conflicts_and_types():
    x, w, t, _, _ = make_case(0)
    with pytest.raises(ValueError, match="chunk_size=5 and options' chunk size 2 disagree"):
        linear_cross_entropy(x, w, t, chunk_size=5, options=LCEO(batch_chunk_size=2))
    # The same size twice is no conflict.
    linear_cross_entropy(x, w, t, chunk_size=2, options=LCEO(batch_chunk_size=2))
    with pytest.raises(ValueError, match="batch_chunk_size .* and options.chunking_method"):
        linear_cross_entropy(x, w, t, options=LCEO(batch_chunk_size=1,
                                                   chunking_method="aspect_ratio"))  # fmt: skip
    with pytest.raises(TypeError, match="options must be a torch.nn.LinearCrossEntropyOptions"):
        linear_cross_entropy(x, w, t, options={"batch_chunk_size": 2})


# --------------------------------------------------------------------------------------------
# 3. Errors that name the argument
# --------------------------------------------------------------------------------------------


def _bad(**changes):
    x, w, t, b, cw = make_case(1, bias=True, class_weight=True)
    args = dict(input=x, linear_weight=w, target=t, linear_bias=b, weight=cw)
    args.update(changes)
    return args


def _zeros(*shape, dtype=torch.float64, **kw):
    return torch.zeros(*shape, dtype=dtype, **kw)


BAD = {
    "ignore_index with probabilities": (
        dict(target=_zeros(N, C), ignore_index=-100), ValueError,
        "ignore_index cannot be given with probability targets",
    ),
    "kdim head, unbatched input": (
        dict(input=_zeros(D), linear_weight=_zeros(C, 2, D), linear_bias=None,
             target=torch.zeros(2, dtype=torch.long)), ValueError,
        r"a K-dimensional linear_weight \(11, 2, 6\) needs batched input \(N, 6\)",
    ),
    "kdim head, 3-D input": (
        dict(input=_zeros(2, N, D), linear_weight=_zeros(C, 2, D), linear_bias=None),
        ValueError, "needs batched input",
    ),
    "kdim bias shape": (
        dict(linear_weight=_zeros(C, 2, D), linear_bias=_zeros(C),
             target=torch.zeros(N, 2, dtype=torch.long)), ValueError,
        r"linear_bias must have shape \(C, d1, \.\.\., dK\) = \(11, 2\), got \(11,\)",
    ),
    "kdim class-index target": (
        dict(linear_weight=_zeros(C, 2, D), linear_bias=None), ValueError,
        r"class-index target must have shape \(9, 2\)",
    ),
    "kdim probability target": (
        dict(linear_weight=_zeros(C, 2, D), linear_bias=None, target=_zeros(N, C)), ValueError,
        r"a floating \(probability\) target must have the logits' shape \(9, 11, 2\)",
    ),
    "class weight size": (
        dict(weight=_zeros(C + 1)), ValueError, r"weight must have shape \(11,\), one per class"
    ),
    "class weight int": (
        dict(weight=torch.ones(C, dtype=torch.long)), TypeError, "weight must be a floating"
    ),
    "class weight requires grad": (
        dict(weight=_zeros(C, requires_grad=True)), ValueError, "weight requires grad"
    ),
    "ignore_index float": (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    "label_smoothing": (dict(label_smoothing=1.5), ValueError, "label_smoothing must be"),
    "process_group with a kdim head": (
        dict(linear_weight=_zeros(C, 2, D), linear_bias=None,
             target=torch.zeros(N, 2, dtype=torch.long), process_group=object()), ValueError,
        "process_group is not supported with a K-dimensional linear_weight",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case):
    changes, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        linear_cross_entropy(**_bad(**changes), impl="reference")


# --------------------------------------------------------------------------------------------
# 4. The module: torch's parameters, buffers and initialisation
# --------------------------------------------------------------------------------------------

MODULE_KW = {
    "plain": dict(),
    "bias": dict(bias=True),
    "kdim-bias-weight": dict(
        out_features=OUT, bias=True, weight=torch.rand(C, dtype=torch.float64) + 0.5
    ),
    "smoothing-ignore_index": dict(label_smoothing=0.1, ignore_index=3, reduction="sum"),
}


@pytest.mark.parametrize("case", MODULE_KW)
def test_module_is_torchs(case):
    """Same seed, same parameters (nn.Linear's initialisation, torch's names); state_dicts load
    both ways; the same loss and parameter gradients as torch's module."""
    kw = MODULE_KW[case]
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(D, C, dtype=torch.float64, **kw)
    torch.manual_seed(0)
    ours = LinearCrossEntropyLoss(D, C, dtype=torch.float64, impl="reference", chunk_size=4, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    # Load a perturbed state into ours and back into torch's.
    state = {k: v + 0.25 if k.startswith("linear") else v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    t = torch.randint(0, C, (N, *kw.get("out_features", ())), generator=gen)
    t.view(-1)[1] = kw.get("ignore_index", -100)
    losses = []
    for module in (ours, theirs):
        module.zero_grad()
        loss = module(x, t)
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (l_ours, g_ours), (l_theirs, g_theirs) = losses
    assert rel_err(l_ours, l_theirs) <= 1e-12
    for a, e in zip(g_ours, g_theirs, strict=True):
        assert rel_err(a, e) <= 1e-12


def test_module_repr_buffers_and_extras():
    cw = torch.rand(C) + 0.5
    module = LinearCrossEntropyLoss(D, C, out_features=(2,), bias=True, weight=cw, softcap=5.0,
                                    options=LCEO(batch_chunk_size=2))  # fmt: skip
    assert module.linear.weight.shape == (C * 2, D) and module.linear.bias.shape == (C * 2,)
    assert torch.equal(module.weight, cw) and "weight" in dict(module.named_buffers())
    text = repr(module)
    for part in ("in_features=6", "num_classes=11", "out_features=(2,)", "bias=True",
                 "softcap=5.0", "options=LinearCrossEntropyOptions"):  # fmt: skip
        assert part in text, part
    x, t = torch.randn(N, D), torch.randint(0, C, (N, 2))
    loss = module(x, t)
    want = linear_cross_entropy(
        x, module.linear.weight.reshape(C, 2, D), t, linear_bias=module.linear.bias.reshape(C, 2),
        weight=cw, softcap=5.0, chunk_size=2,
    )  # fmt: skip
    assert torch.equal(loss, want)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(weight=torch.ones(C + 1)), r"weight must be a tensor of shape \(11,\)"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 1\]"),
        (dict(out_features=(2, 0)), "out_features must be a tuple of positive ints"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
    ],
    ids=["weight", "label_smoothing", "out_features", "chunk_size"],
)
def test_module_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LinearCrossEntropyLoss(D, C, **kw)


def test_no_grad_and_frozen_head():
    """Loss only, and a frozen head (only the input requires grad), on a K-dimensional head."""
    x, w, t, b, cw = make_case(_seed("frozen"), out=OUT, bias=True, class_weight=True)
    want = F.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, chunk_size=4)
    assert loss.grad_fn is None and rel_err(loss, want) <= 1e-12
    xl = x.clone().requires_grad_()
    linear_cross_entropy(xl, w, t, linear_bias=b, weight=cw, chunk_size=4).backward()
    x64 = x.clone().requires_grad_()
    F.linear_cross_entropy(x64, w, t, linear_bias=b, weight=cw).backward()
    assert rel_err(xl.grad, x64.grad) <= 1e-12 and w.grad is None


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the new forms without graph breaks: a K-dimensional
    head with class weights and options, and probability targets on a (C, D) head."""
    torch._dynamo.reset()
    x, w, t, b, cw = make_case(_seed("compile"), out=OUT, bias=True, class_weight=True)
    _, w2, tp, _, _ = make_case(_seed("compile-prob"), prob=True)

    def kdim(x, w, b):
        return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1,
                                    options=LCEO(batch_chunk_size=4))  # fmt: skip

    def prob(x, w):
        return linear_cross_entropy(x, w, tp, reduction="sum", chunk_size=4)

    for fn, params in ((kdim, (x, w, b)), (prob, (x, w2))):
        out = []
        for f in (torch.compile(fn, fullgraph=True), fn):
            leaves = [p.clone().requires_grad_() for p in params]
            loss = f(*leaves)
            out.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
        for a, e in zip(*out, strict=True):
            assert rel_err(a, e) <= 1e-12
