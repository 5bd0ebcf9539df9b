"""Seeded differential fuzz test: every route of every loss against float64 torch and each other.

For inputs drawn by hypothesis (from a drawn seed: the shapes, options and kinds of values are
drawn, the tensors made from the seed) each function runs on every route:

* ``torch``: ``impl="auto"`` on CPU tensors as shipped, so calls of at most 2**18 logits with only
  torch's options take the small-call route (``fused_xent.functional._torch_cpu`` and its
  counterparts in ``logprobs`` / ``distillation``);
* ``cpu``: ``impl="auto"`` with ``_TORCH_CPU_MAX_ELEMENTS = -1`` in every module that reads it,
  so the same small calls take ``fused_xent/cpu.py`` (distillation: the reference);
* ``reference``: ``impl="reference"``;
* ``triton``: ``impl="triton"``, the kernels under Triton's interpreter (conftest sets
  ``TRITON_INTERPRET=1``), with the launch table's blocks or with blocks of ``SMALL_BLOCK``
  (as conftest's ``small_blocks`` fixture), so that rows of a few dozen logits cross every block
  boundary and take the long-row schedule.

The oracle is torch in float64 on the very values passed (after their rounding to the input
dtype): the documented formulas written out (``z = softcap * tanh(logit_scale * x / softcap)``,
``CE(z) + lse_square_scale * lse(z)**2``, a term whose coefficient is 0 adds 0 even against an
infinite log-probability, "mean" over a zero denominator is NaN with zero gradients, ...), the
gradients from float64 autograd. Values are compared norm-wise: the loss (and lse, entropy,
log-probs) to 1e-5 relative, the gradients to 1e-5 / 2e-3 / 8e-3 (float32 / float16 /
bfloat16), plus a floor of a few float32 roundings of the magnitudes that enter each value (a
float32 loss cannot resolve ``log(1 + 1e-9)`` of a row that is one-hot on its target, nor a
gradient ``p - 1`` finer than 2**-24). NaN and infinite values must sit at the same places with
the same signs, and values the contract makes exactly zero (ignored rows, a zero incoming
gradient or token weight, a -inf logit without target mass) must be exactly zero. Documented
errors must be raised, with the same exception type, on every route.

Profiles, chosen with the environment variable ``FUSED_XENT_FUZZ``:

* unset or ``ci``: derandomized (the same examples on every run), a fixed budget of examples per
  test (the whole file about 2.5 minutes on one core of this project's 2-core CPU), no shrinking;
* ``long``: random examples on every run, about ten times as many (about 20 minutes), shrinking
  on (minimal failing examples), e.g.
  ``FUSED_XENT_FUZZ=long .venv/bin/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider``.

``FUSED_XENT_FUZZ_EXAMPLES=N`` sets the number of examples of every fuzz test in either profile;
``FUSED_XENT_FUZZ_COLLECT=path`` appends every failing example (its disagreements and its case) to
``path`` as one line instead of failing, so that one long run surveys all of them.
Below the fuzz tests, plain regression tests pin down disagreements found by hand or by the
fuzzer, each exactly as reproduced.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import GRAD_RTOL, LOSS_RTOL, SMALL_BLOCK

import fused_xent

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (.[test] extra)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's numpy sees -inf
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="CPU routes (the CUDA suite runs elsewhere)"
    ),
]

# --- profiles ----------------------------------------------------------------------------------

PROFILE = os.environ.get("FUSED_XENT_FUZZ", "ci").strip().lower() or "ci"
if PROFILE not in ("ci", "long"):
    raise ValueError(f"FUSED_XENT_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
_EXAMPLES = os.environ.get("FUSED_XENT_FUZZ_EXAMPLES")
_COLLECT = os.environ.get("FUSED_XENT_FUZZ_COLLECT")


def _fuzz(ci_examples: int, long_examples: int):
    """hypothesis settings of one fuzz test under the selected profile."""
    n = int(_EXAMPLES) if _EXAMPLES else (ci_examples if PROFILE == "ci" else long_examples)
    common = dict(
        max_examples=n,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    if PROFILE == "ci":
        phases = (Phase.explicit, Phase.reuse, Phase.generate)  # no shrinking: a fixed budget
        return settings(derandomize=True, phases=phases, **common)
    return settings(derandomize=False, **common)


# --- routes ------------------------------------------------------------------------------------

ROUTES = ("torch", "cpu", "reference", "triton")
LINEAR_ROUTES = ("cpu", "reference", "triton")  # linear_cross_entropy has no small-call route
_IMPL = {"torch": "auto", "cpu": "auto", "reference": "reference", "triton": "triton"}


@contextmanager
def _route(route: str, small_blocks: bool = False):
    """The ``impl`` of ``route``, with the small-call route turned off ("cpu") or the kernels'
    blocks forced to SMALL_BLOCK ("triton" with ``small_blocks``) for the duration."""
    with ExitStack() as stack:
        if route == "cpu":
            for name, module in list(sys.modules.items()):
                if name.startswith("fused_xent") and hasattr(module, "_TORCH_CPU_MAX_ELEMENTS"):
                    stack.enter_context(mock.patch.object(module, "_TORCH_CPU_MAX_ELEMENTS", -1))
        if route == "triton" and small_blocks:
            from fused_xent.kernels import xent

            stack.enter_context(
                mock.patch.object(xent, "_launch_config", lambda n_cols, dtype: (SMALL_BLOCK, 4))
            )
        yield _IMPL[route]


# --- comparison --------------------------------------------------------------------------------

F64 = torch.float64
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TINY = {  # the smallest subnormal: a gradient rounded to the dtype may flush below it
    torch.float16: 2.0**-24,
    torch.bfloat16: 2.0**-133,
    torch.float32: 2.0**-149,
    torch.float64: 0.0,
}


def _unit(dtype) -> float:
    """The unit roundoff of the arithmetic the package does for ``dtype`` input."""
    return 2.0**-53 if dtype == F64 else 2.0**-24


def _loss_rtol(dtype) -> float:
    return 1e-11 if dtype == F64 else LOSS_RTOL


def _pow2(v: float) -> bool:
    return v > 0 and math.frexp(v)[0] == 0.5


def _finite0(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _close(what, actual, expected, rtol, floor=None, zero=None, skip=None) -> list[str]:
    """[] if ``actual`` matches ``expected`` (float64): NaN and +-inf at the same places, exact
    zeros where ``zero`` says, and ``||a - e|| <= rtol ||e|| + ||floor||`` over the finite rest;
    entries where ``skip`` is set are not compared. Otherwise one line saying how it differs."""
    if actual is None:
        return [f"{what}: missing"]
    if tuple(actual.shape) != tuple(expected.shape):
        return [f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"]
    a = actual.detach().to(F64).reshape(-1).cpu()
    e = expected.detach().to(F64).reshape(-1).cpu()
    keep = torch.ones_like(e, dtype=torch.bool) if skip is None else ~skip.reshape(-1)
    f = torch.zeros_like(e) if floor is None else _finite0(floor.detach().to(F64).reshape(-1))
    a, e, f = a[keep], e[keep], f[keep]
    out = []
    if not torch.equal(a.isnan(), e.isnan()):
        bad = (a.isnan() != e.isnan()).nonzero().flatten()[:4].tolist()
        out.append(f"{what}: NaN at different places (flat {bad}: got {a[bad].tolist()}, "
                   f"want {e[bad].tolist()})")  # fmt: skip
    inf = e.isinf() | a.isinf()
    if not torch.equal(a[inf], e[inf]):
        bad = (inf & (a != e)).nonzero().flatten()[:4].tolist()
        out.append(f"{what}: infinities differ (flat {bad}: got {a[bad].tolist()}, "
                   f"want {e[bad].tolist()})")  # fmt: skip
    if zero is not None:
        z = zero.reshape(-1).cpu()[keep]
        if (a[z] != 0).any():
            bad = (z & (a != 0)).nonzero().flatten()[:4].tolist()
            out.append(f"{what}: not exactly 0 where it must be (flat {bad}: {a[bad].tolist()})")
    fin = e.isfinite() & a.isfinite()
    err = float((a[fin] - e[fin]).norm())
    tol = rtol * float(e[fin].norm()) + float(f[fin].norm())
    if not err <= tol:
        scale = float(e[fin].norm())
        out.append(f"{what}: error {err:.3g} > tolerance {tol:.3g} (relative "
                   f"{err / max(scale, 1e-300):.3g}; |expected| {scale:.3g})")  # fmt: skip
    return out


def _outcome(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (any exception is an outcome to compare)
        return exc


def _judge(case, outcomes: dict, expected_error, compare) -> None:
    """Every route's outcome against the oracle (``compare``), and the errors against each other.

    ``expected_error(route)``: None (must not raise), an exception type or tuple (must raise
    it), or "either" (all routes must agree on raising, and on the type).
    """
    failures = []
    for route, outcome in outcomes.items():
        want = expected_error(route)
        if isinstance(outcome, Exception):
            if want is None:
                failures.append(f"{route}: raised {type(outcome).__name__}: {outcome}")
            elif want != "either" and not isinstance(outcome, want):
                failures.append(
                    f"{route}: raised {type(outcome).__name__} ({outcome}), want {want}"
                )
        elif want not in (None, "either"):
            failures.append(f"{route}: did not raise {want}")
        else:
            failures += [f"{route}: {line}" for line in compare(route, outcome)]
    either = [r for r in outcomes if expected_error(r) == "either"]
    kinds = {type(outcomes[r]).__name__ if isinstance(outcomes[r], Exception) else "ok"
             for r in either}  # fmt: skip
    if len(kinds) > 1:
        failures.append("routes disagree on raising: " + ", ".join(
            f"{r}: {type(outcomes[r]).__name__}" for r in either))  # fmt: skip
    if failures and _COLLECT:
        with open(_COLLECT, "a") as log:
            log.write(repr({"failures": failures, "case": case}) + "\n")
        return
    assert not failures, "\n".join(failures) + f"\ncase: {case}"


def _incoming(kind: str, shape, gen, dtype_cap: float | None = None) -> torch.Tensor:
    """The incoming gradient: ones, random in [-1.5, 1.5), zeros, or GradScaler's 65536."""
    if kind == "ones":
        return torch.ones(shape, dtype=F64)
    if kind == "zero":
        return torch.zeros(shape, dtype=F64)
    if kind == "scaled":
        return torch.full(shape, 65536.0, dtype=F64)
    return (torch.rand(shape, generator=gen, dtype=F64) * 3 - 1.5).float().double()


def _untouched(x: torch.Tensor, values: torch.Tensor) -> bool:
    a, b = x.detach(), values
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# --- logits in every layout ----------------------------------------------------------------------

LAYOUTS = ("contiguous", "row-strided", "transposed", "expanded", "kdim", "unbatched")


class Logits:
    """(rows, C) values ``R`` (float64, exact in ``dtype``) as the input of one call in ``layout``,
    with the map of a gradient of that input back to (rows, C)."""

    def __init__(self, R: torch.Tensor, dtype, layout: str, col0: int = 0):
        rows, C = R.shape
        Rd = R.to(dtype)
        self.layout, self.C, self.col0 = layout, C, col0
        self.base = None
        if layout == "row-strided":  # big[:, col0 : col0 + C]: rows of any alignment
            big = torch.full((rows, C + 5), 7.0, dtype=dtype)
            big[:, col0 : col0 + C] = Rd
            self.leaf = big.requires_grad_()
            self.base = self.leaf * 1
            self.x = self.base[:, col0 : col0 + C]
        elif layout == "transposed":
            self.leaf = Rd.t().contiguous().requires_grad_()
            self.x = (self.leaf * 1).t()
        elif layout == "expanded":
            self.leaf = Rd[:1].clone() if rows else torch.zeros(1, C, dtype=dtype)
            self.leaf.requires_grad_()
            self.x = (self.leaf * 1).expand(rows, C)
        elif layout == "kdim":  # (n, C, 2): the class dimension is not innermost
            self.leaf = Rd.reshape(rows // 2, 2, C).permute(0, 2, 1).contiguous().requires_grad_()
            self.x = self.leaf * 1
        elif layout == "unbatched":  # (C,)
            self.leaf = Rd[0].clone().requires_grad_()
            self.x = self.leaf * 1
        else:
            self.leaf = Rd.clone().requires_grad_()
            self.x = self.leaf * 1
        self.values = self.x.detach().clone()
        self.grads: list[torch.Tensor] = []

    def capture(self) -> None:
        self.x.register_hook(lambda g: self.grads.append(g.detach().clone()))

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of the input's shape as (rows, C)."""
        if self.layout == "kdim":
            return t.movedim(1, -1).reshape(-1, self.C)
        return t.reshape(-1, self.C)

    def grad_rows(self):
        if not self.grads:
            return None
        return self.rows_of(self.grads[0])

    def layout_checks(self) -> list[str]:
        out = []
        if self.base is not None:  # row-strided: nothing outside the view is written
            outside = torch.ones(self.base.shape[1], dtype=torch.bool)
            outside[self.col0 : self.col0 + self.C] = False
            if not bool((self.base.detach()[:, outside] == 7.0).all()):
                out.append("wrote outside the row-strided view")
            if self.leaf.grad is not None and bool((self.leaf.grad[:, outside] != 0).any()):
                out.append("gradient outside the row-strided view")
        return out


def shape_rows(t: torch.Tensor, layout: str, rows: int, prob: bool = False) -> torch.Tensor:
    """A per-row tensor (rows,) or per-logit (rows, C) in the shape ``layout`` takes."""
    if layout == "kdim":
        if prob:
            return t.reshape(rows // 2, 2, t.shape[-1]).permute(0, 2, 1)
        return t.reshape(rows // 2, 2)
    if layout == "unbatched":
        return t[0]
    return t


def _transform64(x, logit_scale, softcap):
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _stats64(z: torch.Tensor, u: float, inexact: bool):
    """lse, entropy and their floors of float64 logits ``z`` (rows, C), any values: lse as
    torch.logsumexp; the entropy 0 for an all -inf row, NaN for a row holding NaN, and not
    defined (``ent_skip``) for a row holding +inf."""
    rows, C = z.shape
    lse = torch.logsumexp(z, 1) if C else torch.full((rows,), -math.inf, dtype=F64)
    m = z.amax(1) if C else lse
    has_nan = z.isnan().any(1)
    pos_inf = (z == math.inf).any(1)
    all_neg = (z == -math.inf).all(1)
    regular = ~has_nan & ~pos_inf & ~all_neg
    shift = torch.where(regular, m, 0.0)
    zs = torch.where(regular[:, None], z - shift[:, None], 0.0)
    lse_rel = torch.logsumexp(zs, 1)
    lse = torch.where(regular, shift + lse_rel, lse)
    logp = zs - lse_rel[:, None]
    p = torch.where(regular[:, None], logp.exp(), 0.0)
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(1)
    ent = torch.where(all_neg, 0.0, ent)
    ent = torch.where(has_nan, math.nan, ent)
    zr = _finite0((z - torch.where(regular, m, 0.0)[:, None]).abs())
    log_sum = _finite0(lse - m).abs()
    zabs = _finite0(z.abs()).amax(1) if C else torch.zeros(rows, dtype=F64)
    lse_floor = 8 * u * (_finite0(lse.abs()) + 1 + (zabs if inexact else 0))
    ent_floor = 8 * u * (log_sum + (p * zr).sum(1) + 1 + (zabs if inexact else 0))
    return lse, ent, pos_inf, lse_floor, ent_floor


def _check_predicted(pred, z: torch.Tensor) -> list[str]:
    """The argmax: int64, at a maximal logit (up to the float32 rounding of the transform)."""
    if pred is None:
        return ["predicted: missing"]
    if pred.dtype != torch.int64:
        return [f"predicted: dtype {pred.dtype}"]
    pred = pred.reshape(-1)
    if pred.numel() != z.shape[0]:
        return [f"predicted: {pred.numel()} entries for {z.shape[0]} rows"]
    ok_rows = ~z.isnan().any(1)
    if not bool(ok_rows.any()):
        return []
    zz, pp = z[ok_rows], pred[ok_rows]
    if bool(((pp < 0) | (pp >= z.shape[1])).any()):
        return [f"predicted: outside [0, C): {pp.tolist()}"]
    m = zz.amax(1)
    at = zz.gather(1, pp[:, None]).squeeze(1)
    slack = 1e-5 * (1 + _finite0(m.abs()))
    good = (at == m) | (at >= m - slack)
    if not bool(good.all()):
        bad = (~good).nonzero().flatten().tolist()
        return [f"predicted: {pp.tolist()} not at the row maxima (rows {bad})"]
    return []


# =================================================================================================
# cross_entropy
# =================================================================================================


@st.composite
def ce_cases(draw):
    c = {}
    c["dtype"] = draw(st.sampled_from(DTYPES))
    c["layout"] = draw(st.sampled_from(LAYOUTS))
    n = draw(st.integers(0, 6))
    if c["layout"] == "unbatched":
        n = 1
    c["rows"] = 2 * n if c["layout"] == "kdim" else n
    c["C"] = draw(st.integers(1, 3 * SMALL_BLOCK + 5))
    c["prob"] = draw(st.booleans())
    c["target_dtype"] = draw(st.sampled_from(["input", "float32", "float64"]))
    c["ignore_index"] = draw(st.sampled_from([-100, -100, 0, 1]))
    c["p_ignore"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    c["weight"] = draw(st.sampled_from([None, None, "positive", "zeros", "all-zero"]))
    c["weight_dtype"] = draw(st.sampled_from(["float32", "input"]))
    c["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0, 0.37]))
    c["lse_square_scale"] = draw(st.sampled_from([0.0, 0.0, 1e-4, 0.1]))
    c["softcap"] = draw(st.sampled_from([None, None, 5.0, 30.0]))
    c["logit_scale"] = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.7]))
    c["return_lse"] = draw(st.booleans())
    c["return_stats"] = draw(st.booleans())
    c["token_weight"] = draw(st.sampled_from([None, None, "random", "zeros"]))
    c["inplace"] = draw(st.booleans())
    c["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    c["scale"] = draw(st.sampled_from([0.1, 3.0, 30.0]))
    c["offset"] = draw(st.sampled_from([0.0, 0.0, 1e4, -1e4]))
    c["neg_inf"] = draw(st.sampled_from([None, None, "masked", "at-target"]))
    c["bad_row"] = draw(st.sampled_from([None, None, "nan", "-inf", "+inf"]))
    c["grad"] = draw(st.sampled_from(["ones", "random", "zero", "scaled"]))
    c["mode"] = draw(st.sampled_from(["grad", "grad", "grad", "no_grad"]))
    c["target_grad"] = draw(st.booleans()) and c["prob"]
    c["small_blocks"] = draw(st.booleans())
    c["col0"] = draw(st.sampled_from([0, 1, 3]))  # row-strided: where the view starts
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    if c["offset"]:  # keep the transform exact at |x| ~ 1e4 (float32 cannot scale it exactly)
        c["logit_scale"] = 1.0 if c["logit_scale"] == 0.7 else c["logit_scale"]
    if draw(st.booleans()):  # only torch's options: impl="auto" takes its small-call route
        c.update(return_lse=False, return_stats=False, inplace=False, lse_square_scale=0.0,
                 token_weight=None, softcap=None, logit_scale=1.0)  # fmt: skip
    return c


def _ce_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    rows, C, dtype = c["rows"], c["C"], c["dtype"]
    R = torch.randn(rows, C, generator=gen, dtype=F64) * c["scale"]
    if c["offset"]:
        R += c["offset"] * (torch.rand(rows, 1, generator=gen) < 0.6)
    ii = c["ignore_index"]
    out = {"y": None, "T": None}
    if c["prob"]:
        T = torch.rand(rows, C, generator=gen, dtype=F64)
        T = torch.where(torch.rand(rows, C, generator=gen) < 0.3, 0.0, T)
        ignored = torch.zeros(rows, dtype=torch.bool)
    else:
        y = torch.randint(0, C, (rows,), generator=gen)
        y[torch.rand(rows, generator=gen) < c["p_ignore"]] = ii
        ignored = y == ii
    if c["neg_inf"] and C > 1:
        mask = torch.rand(rows, C, generator=gen) < 0.3
        if c["prob"]:
            T = torch.where(mask, 0.0, T)
            if c["neg_inf"] == "at-target" and rows:  # some mass on a -inf logit: loss inf
                T[0, 0], mask[0, 0] = 0.5, True
        else:
            safe_y = torch.where(ignored, 0, y)
            mask[torch.arange(rows), safe_y] = False
            if c["neg_inf"] == "at-target" and rows and not ignored[0]:
                mask[0, y[0]] = True  # the target's logit is -inf: loss inf, as torch
        mask[:, -1] &= ~mask[:, :-1].all(1)  # every row keeps a finite logit
        if c["layout"] == "expanded":
            mask[:] = mask[:1]
        R[mask] = -math.inf
    if c["layout"] == "expanded" and rows:
        R = R[:1].expand(rows, C).clone()
    elif c["bad_row"] and not c["prob"] and bool(ignored.any()):
        r = int(ignored.nonzero()[0])
        if c["bad_row"] == "+inf":
            R[r, int(torch.randint(0, C, (), generator=gen))] = math.inf
        else:
            R[r] = math.nan if c["bad_row"] == "nan" else -math.inf
    out["R"] = R.to(dtype).to(F64)
    if c["prob"]:
        tdt = {"input": dtype, "float32": torch.float32, "float64": F64}[c["target_dtype"]]
        out["T"] = T.to(tdt)
    else:
        out["y"] = y
    w = None
    if c["weight"]:
        w = torch.rand(C, generator=gen, dtype=F64) * 1.5 + 0.25
        if c["weight"] == "zeros":
            w = torch.where(torch.rand(C, generator=gen) < 0.4, 0.0, w)
        elif c["weight"] == "all-zero":
            w = torch.zeros(C, dtype=F64)
        w = w.to(dtype if c["weight_dtype"] == "input" else torch.float32)
    out["w"] = w
    tw = None
    if c["token_weight"]:
        tw = torch.randn(rows, generator=gen, dtype=F64)
        if c["token_weight"] == "zeros":
            tw = torch.where(torch.rand(rows, generator=gen) < 0.5, 0.0, tw)
        tw = tw.float()
    out["tw"] = tw
    shape = (rows,) if c["reduction"] == "none" else ()
    out["g"] = _incoming(c["grad"], shape, gen)
    return out


def _ce_oracle(c, inp, g):
    """Everything the routes are compared with, in float64, for incoming gradient ``g``."""
    R, dtype = inp["R"], c["dtype"]
    rows, C = R.shape
    u = _unit(dtype)
    eps, lss = c["label_smoothing"], c["lse_square_scale"]
    scale, softcap = c["logit_scale"], c["softcap"]
    inexact = softcap is not None or not _pow2(scale)
    prob = c["prob"]
    x = R.clone().requires_grad_()
    T = None
    if prob:
        T = inp["T"].to(F64).clone().requires_grad_(c["target_grad"])
        ignored = torch.zeros(rows, dtype=torch.bool)
    else:
        y = inp["y"]
        ignored = y == c["ignore_index"]
    w = inp["w"].to(F64) if inp["w"] is not None else torch.ones(C, dtype=F64)
    xs = torch.where(ignored[:, None], 0.0, x)  # an ignored row is never looked at
    z = _transform64(xs, scale, softcap)
    # shifted by the (constant) row max, so that float64 keeps every digit at |z| ~ 1e4 too
    zmax = z.detach().amax(1)
    zrel = z - zmax[:, None]
    lse_rel = torch.logsumexp(zrel, 1)
    lse = zmax + lse_rel
    nlp = lse_rel[:, None] - zrel  # -log p
    if prob:
        wt = w * ((1.0 - eps) * T + eps / C)
        den = torch.tensor(float(rows), dtype=F64)
    else:
        ys = torch.where(ignored, 0, y)
        onehot = F.one_hot(ys, C).to(F64)
        wt = (eps / C) * w + onehot * ((1.0 - eps) * w[ys])[:, None]
        den = torch.where(ignored, 0.0, w[ys]).sum()
    zero_coef = (wt.detach() == 0) & nlp.detach().isinf()  # 0 * inf := 0
    row = (wt * torch.where(zero_coef, 0.0, nlp)).sum(1)
    if lss:
        row = row + lss * lse * lse
    row = torch.where(ignored, 0.0, row)
    tw = inp["tw"].to(F64) if inp["tw"] is not None else torch.ones(rows, dtype=F64)
    row = row * tw
    red = c["reduction"]
    if red == "none":
        loss, r = row, g
    elif red == "sum":
        loss, r = row.sum(), g.expand(rows)
    else:
        loss = row.sum() / den if den != 0 else torch.tensor(math.nan, dtype=F64)
        r = (g / den if den != 0 else g * 0).expand(rows)
    e = {"loss": loss.detach(), "den": den}
    with torch.no_grad():
        zd, lsed, wtd = z.detach(), lse.detach(), wt.detach()
        m = zd.amax(1) if C else lsed
        log_sum = (lsed - m).abs()
        zr = _finite0((zd - m[:, None]).abs())
        mag = (
            zr + log_sum[:, None] + 1 + ((_finite0(zd.abs()) + m.abs()[:, None]) if inexact else 0)
        )
        M = torch.where(wtd != 0, wtd.abs() * mag, 0.0).sum(1) + 4 * lss * lsed**2
        M = torch.where(ignored, 0.0, _finite0(M) + _finite0(row.detach().abs())) * tw.abs()
        floor_rows = 8 * u * M
        if red == "none":
            e["loss_zero"] = ignored | ((tw == 0) & row.detach().isfinite())  # inf * 0 is NaN
            e["loss_floor"] = floor_rows
        else:
            e["loss_floor"] = floor_rows.sum() / (den.abs() if red == "mean" and den != 0 else 1)
            e["loss_zero"] = None
        # the gradient's floor: p and coef * p - wt, each in float32
        p = torch.exp(zd - lsed[:, None])
        coef = wtd.sum(1) + 2 * lss * lsed
        gmag = coef.abs()[:, None] * p * (mag + 1) + wtd.abs()
        if softcap is not None:
            gmag = gmag + 4 * (coef[:, None] * p - wtd).abs()
        rr = (r * tw).abs()
        e["grad_floor"] = 8 * u * rr[:, None] * scale * _finite0(gmag) + _TINY[dtype]
        zero = ignored[:, None] | (r * tw == 0)[:, None]
        if softcap is None:
            zero = zero | ((R == -math.inf) & (wtd == 0))
        e["grad_zero"] = zero.expand(rows, C)
    if c["mode"] == "grad" and rows:
        S = (row * r).sum()
        want = [x] + ([T] if c["target_grad"] else [])
        grads = torch.autograd.grad(S, want, allow_unused=True)
        e["grad"] = grads[0] if grads[0] is not None else torch.zeros_like(R)
        if c["target_grad"]:
            gt = grads[1] if grads[1] is not None else torch.zeros_like(R)
            e["target_grad"] = gt
            tmag = (w * (1 - eps))[None, :] * (_finite0(nlp.detach().abs()) + log_sum[:, None] + 1)
            e["target_grad_floor"] = 8 * u * rr[:, None] * tmag + _TINY[dtype]
    elif c["mode"] == "grad":
        e["grad"] = torch.zeros_like(R)
        e["target_grad"] = e["target_grad_floor"] = torch.zeros_like(R)
    # statistics of every row, ignored ones included, from the logits as given
    zf = _transform64(R, scale, softcap)
    e["zf"] = zf
    e["lse"], e["entropy"], e["ent_skip"], e["lse_floor"], e["ent_floor"] = _stats64(zf, u, inexact)
    return e


def _ce_expected_error(c):
    def want(route):
        if c["dtype"] == F64 and route == "triton":
            return (TypeError, ValueError)  # the kernels take 16- and 32-bit floats
        if c["layout"] == "expanded" and c["inplace"] and c["rows"] > 1:
            # overlapping logits cannot receive a gradient in place
            return ValueError if c["mode"] == "grad" else "either"
        return None

    return want


def _ce_call(c, inp, route):
    lg = Logits(inp["R"], c["dtype"], c["layout"], c["col0"])
    rows, layout = c["rows"], c["layout"]
    if c["prob"]:
        target = shape_rows(inp["T"], layout, rows, prob=True).clone()
        if c["target_grad"] and c["mode"] == "grad":
            target.requires_grad_()
    else:
        target = shape_rows(inp["y"], layout, rows).clone()
    tw = inp["tw"]
    if tw is not None:
        tw = shape_rows(tw, layout, rows).clone()
    grad_mode = c["mode"] == "grad"
    if grad_mode:
        lg.capture()
    with _route(route, c["small_blocks"]) as impl, nullcontext() if grad_mode else torch.no_grad():
        out = fused_xent.cross_entropy(
            lg.x, target, inp["w"], c["ignore_index"], c["reduction"], c["label_smoothing"],
            lse_square_scale=c["lse_square_scale"], softcap=c["softcap"],
            logit_scale=c["logit_scale"], return_lse=c["return_lse"],
            return_stats=c["return_stats"], token_weight=tw, inplace_backward=c["inplace"],
            impl=impl,
        )  # fmt: skip
        outs = out if isinstance(out, tuple) else (out,)
        loss = outs[0]
        if grad_mode:
            torch.autograd.backward(loss, inp["g_used"].float().reshape(loss.shape))
    res = {"loss": loss.detach(), "lg": lg, "n_out": len(outs)}
    i = 1
    if c["return_lse"]:
        res["lse"] = outs[i] if len(outs) > i else None
        i += 1
    if c["return_stats"]:
        res["stats"] = outs[i] if len(outs) > i else None
    if grad_mode:
        res["grad"] = lg.grad_rows()
        if c["target_grad"]:
            res["target_grad"] = (
                None
                if target.grad is None
                else (
                    target.grad.reshape(-1, c["C"]) if layout != "kdim" else lg.rows_of(target.grad)
                )
            )
    return res


def _none_shape(layout, rows):
    return {"kdim": (rows // 2, 2), "unbatched": ()}.get(layout, (rows,))


def _ce_compare(c, e):
    dtype, rows, C = c["dtype"], c["rows"], c["C"]
    want_loss_dtype = F64 if dtype == F64 else torch.float32

    def compare(route, res):
        out = []
        loss = res["loss"]
        n_out = 1 + c["return_lse"] + c["return_stats"]
        if res["n_out"] != n_out:
            return [f"returned {res['n_out']} outputs, want {n_out}"]
        if loss.dtype != want_loss_dtype:
            out.append(f"loss dtype {loss.dtype}")
        if c["reduction"] == "none":
            shape = _none_shape(c["layout"], rows)
            if tuple(loss.shape) != shape:
                return out + [f"loss shape {tuple(loss.shape)} != {shape}"]
            loss = loss.reshape(-1)
        out += _close("loss", loss, e["loss"], _loss_rtol(dtype), e["loss_floor"], e["loss_zero"])
        lse_want = _none_shape(c["layout"], rows)
        for name, t in (("lse", res.get("lse")),
                        ("stats.lse", res["stats"].lse if res.get("stats") else None)):  # fmt: skip
            if (name == "lse" and not c["return_lse"]) or (name != "lse" and not c["return_stats"]):
                continue
            if t is None or tuple(t.shape) != lse_want:
                out.append(f"{name}: shape {None if t is None else tuple(t.shape)} != {lse_want}")
                continue
            out += _close(name, t.reshape(-1), e["lse"], _loss_rtol(dtype), e["lse_floor"])
        if c["return_stats"] and res.get("stats") is not None:
            st_ = res["stats"]
            out += _close("stats.entropy", st_.entropy.reshape(-1), e["entropy"],
                          _loss_rtol(dtype), e["ent_floor"], skip=e["ent_skip"])  # fmt: skip
            out += _check_predicted(st_.predicted, e["zf"])
        lg = res["lg"]
        out += lg.layout_checks()
        if c["mode"] == "grad":
            g = res["grad"]
            if g is None and rows and C:
                g = torch.zeros(rows, C, dtype=dtype)  # no gradient flowed: zeros
            if g is not None and g.dtype != dtype:
                out.append(f"gradient dtype {g.dtype}")
            if g is not None:
                out += _close("gradient", g, e["grad"], GRAD_RTOL[dtype], e["grad_floor"],
                              e["grad_zero"])  # fmt: skip
            if c["target_grad"]:
                tdt = {"input": dtype, "float32": torch.float32, "float64": F64}[c["target_dtype"]]
                compute = F64 if dtype == F64 else torch.float32
                rtol = max(GRAD_RTOL[tdt], GRAD_RTOL[compute])  # rounded to the target's dtype
                tg = res.get("target_grad")
                if tg is not None and tg.dtype != tdt:
                    out.append(f"target gradient dtype {tg.dtype}, want {tdt}")
                out += _close("target gradient", tg, e["target_grad"], rtol,
                              e["target_grad_floor"])  # fmt: skip
            if not c["inplace"] and not _untouched(lg.x, lg.values):
                out.append("logits changed without inplace_backward")
        elif not _untouched(lg.x, lg.values):
            out.append("logits changed under no_grad")
        return out

    return compare


def _fix_fp16_scale(c, inp, oracle):
    """GradScaler's 65536 on a float16 gradient larger than 1 overflows float16 (as torch's
    would): halve it until the float64 gradient fits."""
    g = inp["g"]
    while True:
        e = oracle(c, inp, g)
        fp16 = [e.get("grad")] if c["dtype"] == torch.float16 else []
        if c.get("target_grad") and c.get("target_dtype") == "input" and fp16:
            fp16.append(e.get("target_grad"))
        fp16 = [t for t in fp16 if t is not None and t.numel()]
        if c["grad"] != "scaled" or not fp16:
            break
        if max(float(_finite0(t.abs()).max()) for t in fp16) < 6e4:
            break
        g = g / 4
    inp["g_used"] = g
    return e


@_fuzz(ci_examples=450, long_examples=3000)
@given(case=ce_cases())
def test_fuzz_cross_entropy(case):
    if case["target_grad"] and (case["neg_inf"] or case["mode"] != "grad"):
        case = dict(case, target_grad=False)  # d loss / d t at a -inf logit: not specified
    inp = _ce_inputs(case)
    e = _fix_fp16_scale(case, inp, _ce_oracle)
    outcomes = {r: _outcome(lambda r=r: _ce_call(case, inp, r)) for r in ROUTES}
    _judge(case, outcomes, _ce_expected_error(case), _ce_compare(case, e))


# =================================================================================================
# token_logprobs
# =================================================================================================


@st.composite
def logprob_cases(draw):
    c = {}
    c["dtype"] = draw(st.sampled_from(DTYPES))
    c["layout"] = draw(st.sampled_from(("contiguous", "row-strided", "transposed", "expanded",
                                        "3d")))  # fmt: skip
    n = draw(st.integers(0, 6))
    c["rows"] = 2 * n if c["layout"] == "3d" else n
    c["C"] = draw(st.integers(1, 3 * SMALL_BLOCK + 5))
    c["ignore_index"] = draw(st.sampled_from([-100, 0]))
    c["p_ignore"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    c["temperature"] = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.7]))
    c["logit_scale"] = draw(st.sampled_from([1.0, 1.0, 0.5, 1.3]))
    c["softcap"] = draw(st.sampled_from([None, None, 5.0, 30.0]))
    c["return_entropy"] = draw(st.booleans())
    c["inplace"] = draw(st.booleans())
    c["scale"] = draw(st.sampled_from([0.1, 3.0, 30.0]))
    c["offset"] = draw(st.sampled_from([0.0, 0.0, 1e4, -1e4]))
    c["neg_inf"] = draw(st.sampled_from([None, None, "masked", "at-target"]))
    c["bad_row"] = draw(st.sampled_from([None, None, "nan", "-inf", "+inf"]))
    c["grad_logp"] = draw(st.sampled_from(["ones", "random", "zero", "scaled"]))
    c["grad_entropy"] = draw(st.sampled_from(["ones", "random", "zero", "unused"]))
    c["mode"] = draw(st.sampled_from(["grad", "grad", "grad", "no_grad"]))
    c["small_blocks"] = draw(st.booleans())
    c["col0"] = draw(st.sampled_from([0, 1, 3]))  # row-strided: where the view starts
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    if c["offset"]:
        c["temperature"] = 1.0 if c["temperature"] == 0.7 else c["temperature"]
        c["logit_scale"] = 1.0 if c["logit_scale"] == 1.3 else c["logit_scale"]
    return c


def _lp_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    rows, C, dtype = c["rows"], c["C"], c["dtype"]
    R = torch.randn(rows, C, generator=gen, dtype=F64) * c["scale"]
    if c["offset"]:
        R += c["offset"] * (torch.rand(rows, 1, generator=gen) < 0.6)
    y = torch.randint(0, C, (rows,), generator=gen)
    y[torch.rand(rows, generator=gen) < c["p_ignore"]] = c["ignore_index"]
    ignored = y == c["ignore_index"]
    if c["neg_inf"] and C > 1:
        mask = torch.rand(rows, C, generator=gen) < 0.3
        mask[torch.arange(rows), torch.where(ignored, 0, y)] = False
        if c["neg_inf"] == "at-target" and rows and not ignored[0]:
            mask[0, y[0]] = True  # log p of the target is -inf
        mask[:, -1] &= ~mask[:, :-1].all(1)
        if c["layout"] == "expanded":
            mask[:] = mask[:1]
        R[mask] = -math.inf
    if c["layout"] == "expanded" and rows:
        R = R[:1].expand(rows, C).clone()
    elif c["bad_row"] and bool(ignored.any()):
        r = int(ignored.nonzero()[0])
        if c["bad_row"] == "+inf":
            R[r, int(torch.randint(0, C, (), generator=gen))] = math.inf
        else:
            R[r] = math.nan if c["bad_row"] == "nan" else -math.inf
    inp = {"R": R.to(dtype).to(F64), "y": y}
    inp["g1"] = _incoming(c["grad_logp"], (rows,), gen)
    kind = c["grad_entropy"] if c["return_entropy"] else "unused"
    inp["g2"] = None if kind == "unused" else _incoming(kind, (rows,), gen)
    return inp


def _lp_oracle(c, inp, g1, g2):
    R, y, dtype = inp["R"], inp["y"], c["dtype"]
    rows, C = R.shape
    u = _unit(dtype)
    T, scale, softcap = c["temperature"], c["logit_scale"], c["softcap"]
    s = scale / T
    inexact = softcap is not None or not _pow2(s)
    ignored = y == c["ignore_index"]
    x = R.clone().requires_grad_()
    xs = torch.where(ignored[:, None], 0.0, x)
    z = _transform64(xs, scale, softcap) / T
    zmax = z.detach().amax(1)
    lse_rel = torch.logsumexp(z - zmax[:, None], 1)
    lse = zmax + lse_rel
    ys = torch.where(ignored, 0, y)
    logsm = (z - zmax[:, None]) - lse_rel[:, None]
    logp = torch.where(ignored, 0.0, logsm.gather(1, ys[:, None]).squeeze(1))
    p = logsm.exp()
    ent = -(p * torch.where(p.detach() > 0, logsm, 0.0)).sum(1)
    ent = torch.where(ignored, 0.0, ent)
    e = {"logp": logp.detach(), "entropy": ent.detach()}
    with torch.no_grad():
        zd, lsed, pd = z.detach(), lse.detach(), p.detach()
        m = zd.amax(1) if C else lsed
        log_sum = (lsed - m).abs()
        zr = _finite0((zd - m[:, None]).abs())
        extra = (_finite0(zd.abs()) + m.abs()[:, None]) if inexact else torch.zeros_like(zd)
        zy = zr.gather(1, ys[:, None]).squeeze(1) + extra.gather(1, ys[:, None]).squeeze(1)
        e["logp_floor"] = torch.where(ignored, 0.0, 8 * u * (zy + log_sum + 1))
        ent_mag = log_sum + (pd * (zr + extra)).sum(1) + 1
        e["ent_floor"] = torch.where(ignored, 0.0, 8 * u * ent_mag)
        e["zero_rows"] = ignored
        gm = pd * (zr + log_sum[:, None] + 1 + extra)
        floor = 8 * u * s * g1.abs()[:, None] * (gm + F.one_hot(ys, C).to(F64))
        zero = ignored.clone()
        if g2 is not None:
            floor = floor + 16 * u * s * g2.abs()[:, None] * (gm * (1 + ent.detach()[:, None]))
            zero |= (g1 == 0) & (g2 == 0)
        else:
            zero |= g1 == 0
        if softcap is not None:
            floor = floor * 2
        e["grad_floor"] = _finite0(floor) + _TINY[dtype]
        gz = zero[:, None].expand(rows, C).clone()
        if softcap is None:
            gz |= (R == -math.inf) & ~F.one_hot(ys, C).bool()  # p = 0 off the target
        e["grad_zero"] = gz
    if c["mode"] == "grad" and rows:
        S = (logp * g1).sum() + ((ent * g2).sum() if g2 is not None else 0.0)
        (gx,) = torch.autograd.grad(S, [x], allow_unused=True)
        e["grad"] = gx if gx is not None else torch.zeros_like(R)
    elif c["mode"] == "grad":
        e["grad"] = torch.zeros_like(R)
    return e


class _Lp3d(Logits):
    """(n, 2, V) logits, the vocabulary last (token_logprobs' layout)."""

    def __init__(self, R, dtype):
        rows, C = R.shape
        self.layout, self.C, self.base = "3d", C, None
        self.leaf = R.to(dtype).reshape(rows // 2, 2, C).clone().requires_grad_()
        self.x = self.leaf * 1
        self.values = self.x.detach().clone()
        self.grads = []

    def rows_of(self, t):
        return t.reshape(-1, self.C)


def _lp_call(c, inp, route):
    rows = c["rows"]
    if c["layout"] == "3d":
        lg = _Lp3d(inp["R"], c["dtype"])
        target = inp["y"].reshape(rows // 2, 2).clone()
    else:
        lg = Logits(inp["R"], c["dtype"], c["layout"], c["col0"])
        target = inp["y"].clone()
    grad_mode = c["mode"] == "grad"
    if grad_mode:
        lg.capture()
    with _route(route, c["small_blocks"]) as impl, nullcontext() if grad_mode else torch.no_grad():
        out = fused_xent.token_logprobs(
            lg.x, target, temperature=c["temperature"], logit_scale=c["logit_scale"],
            softcap=c["softcap"], ignore_index=c["ignore_index"],
            return_entropy=c["return_entropy"], inplace_backward=c["inplace"], impl=impl,
        )  # fmt: skip
        logp, ent = out if c["return_entropy"] else (out, None)
        if grad_mode:
            tensors, grads = [logp], [inp["g1_used"].float().reshape(logp.shape)]
            if inp["g2_used"] is not None:
                tensors.append(ent)
                grads.append(inp["g2_used"].float().reshape(ent.shape))
            torch.autograd.backward(tensors, grads)
    res = {"logp": logp.detach(), "entropy": None if ent is None else ent.detach(), "lg": lg}
    if grad_mode:
        res["grad"] = lg.grad_rows()
    return res


def _lp_compare(c, e):
    dtype, rows, C = c["dtype"], c["rows"], c["C"]
    want_dtype = F64 if dtype == F64 else torch.float32
    shape = (rows // 2, 2) if c["layout"] == "3d" else (rows,)

    def compare(route, res):
        out = []
        for name in ("logp", "entropy"):
            t = res[name]
            if name == "entropy" and not c["return_entropy"]:
                continue
            if t is None or tuple(t.shape) != shape or t.dtype != want_dtype:
                out.append(f"{name}: {None if t is None else (tuple(t.shape), t.dtype)}")
                continue
            out += _close(name, t.reshape(-1), e[name], _loss_rtol(dtype),
                          e[f"{'logp' if name == 'logp' else 'ent'}_floor"],
                          e["zero_rows"])  # fmt: skip
        lg = res["lg"]
        out += lg.layout_checks()
        if c["mode"] == "grad":
            g = res["grad"]
            if g is None and rows and C:
                g = torch.zeros(rows, C, dtype=dtype)
            if g is not None:
                if g.dtype != dtype:
                    out.append(f"gradient dtype {g.dtype}")
                out += _close("gradient", g, e["grad"], GRAD_RTOL[dtype], e["grad_floor"],
                              e["grad_zero"])  # fmt: skip
            if not c["inplace"] and not _untouched(lg.x, lg.values):
                out.append("logits changed without inplace_backward")
        elif not _untouched(lg.x, lg.values):
            out.append("logits changed under no_grad")
        return out

    return compare


@_fuzz(ci_examples=350, long_examples=2000)
@given(case=logprob_cases())
def test_fuzz_token_logprobs(case):
    inp = _lp_inputs(case)
    g1, g2 = inp["g1"], inp["g2"]
    while True:  # GradScaler's 65536 must not overflow a float16 gradient (see _fix_fp16_scale)
        e = _lp_oracle(case, inp, g1, g2)
        if not (case["dtype"] == torch.float16 and "grad" in e):
            break
        if not e["grad"].numel() or float(_finite0(e["grad"].abs()).max()) < 6e4:
            break
        g1, g2 = g1 / 4, (None if g2 is None else g2 / 4)
    inp["g1_used"], inp["g2_used"] = g1, g2

    def want(route):
        if case["dtype"] == F64 and route == "triton":
            return (TypeError, ValueError)
        if case["layout"] == "expanded" and case["inplace"] and case["rows"] > 1:
            return ValueError if case["mode"] == "grad" else "either"
        return None

    outcomes = {r: _outcome(lambda r=r: _lp_call(case, inp, r)) for r in ROUTES}
    _judge(case, outcomes, want, _lp_compare(case, e))


# =================================================================================================
# distillation_loss
# =================================================================================================


@st.composite
def distill_cases(draw):
    c = {}
    c["dtype"] = draw(st.sampled_from(DTYPES))
    c["teacher_dtype"] = draw(st.sampled_from(["same", "float32", "bfloat16"]))
    c["layout"] = draw(st.sampled_from(("contiguous", "row-strided", "transposed", "expanded",
                                        "3d")))  # fmt: skip
    n = draw(st.integers(0, 5))
    c["rows"] = 2 * n if c["layout"] == "3d" else n
    c["C"] = draw(st.integers(1, 3 * SMALL_BLOCK + 5))
    c["beta"] = draw(st.sampled_from([0.0, 1.0, 0.5, 0.1, 0.9, 0.3]))
    c["temperature"] = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.7]))
    c["soft_weight"] = draw(st.sampled_from([1.0, 1.0, 0.5, 0.0]))
    c["hard_weight"] = draw(st.sampled_from([0.0, 0.0, 0.3]))
    c["target"] = draw(st.sampled_from([None, "ids"])) if not c["hard_weight"] else "ids"
    c["ignore_index"] = draw(st.sampled_from([-100, 0]))
    c["p_ignore"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    c["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    c["inplace"] = draw(st.booleans())
    c["scale"] = draw(st.sampled_from([0.1, 3.0, 10.0]))
    c["teacher"] = draw(st.sampled_from(["independent", "independent", "close", "one-hot"]))
    c["offset"] = draw(st.sampled_from([0.0, 0.0, 1e4]))
    c["masked"] = draw(st.sampled_from([None, None, "both", "teacher", "student"]))
    c["bad_row"] = draw(st.sampled_from([None, None, "nan", "-inf"]))
    c["grad"] = draw(st.sampled_from(["ones", "random", "zero", "scaled"]))
    c["mode"] = draw(st.sampled_from(["grad", "grad", "grad", "no_grad"]))
    c["small_blocks"] = draw(st.booleans())
    c["col0"] = draw(st.sampled_from([0, 1, 3]))  # row-strided: where the view starts
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    if c["offset"]:
        c["temperature"] = 1.0 if c["temperature"] == 0.7 else c["temperature"]
    return c


def _dist_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    rows, C, dtype = c["rows"], c["C"], c["dtype"]
    tdtype = {"same": dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        c["teacher_dtype"]
    ]
    S = torch.randn(rows, C, generator=gen, dtype=F64) * c["scale"]
    if c["teacher"] == "close":
        Tt = S + 1e-2 * torch.randn(rows, C, generator=gen, dtype=F64)
    elif c["teacher"] == "one-hot":
        Tt = torch.randn(rows, C, generator=gen, dtype=F64)
        Tt[:, 0] += 60.0
    else:
        Tt = torch.randn(rows, C, generator=gen, dtype=F64) * c["scale"]
    if c["offset"]:
        off = c["offset"] * (torch.rand(rows, 1, generator=gen) < 0.6)
        S, Tt = S + off, Tt + off
    y = None
    ignored = torch.zeros(rows, dtype=torch.bool)
    if c["target"]:
        y = torch.randint(0, C, (rows,), generator=gen)
        y[torch.rand(rows, generator=gen) < c["p_ignore"]] = c["ignore_index"]
        ignored = y == c["ignore_index"]
    if c["masked"] and C > 1:
        mask = torch.rand(rows, C, generator=gen) < 0.3
        if y is not None:
            mask[torch.arange(rows), torch.where(ignored, 0, y)] = False
        mask[:, -1] &= ~mask[:, :-1].all(1)
        if c["layout"] == "expanded":
            mask[:] = mask[:1]
        if c["masked"] in ("both", "teacher"):
            Tt[mask] = -math.inf
        if c["masked"] in ("both", "student"):
            S[mask] = -math.inf
    if c["layout"] == "expanded" and rows:
        S = S[:1].expand(rows, C).clone()
    elif c["bad_row"] and bool(ignored.any()):
        r = int(ignored.nonzero()[0])
        S[r] = math.nan if c["bad_row"] == "nan" else -math.inf
        Tt[r] = math.nan if c["bad_row"] == "nan" else -math.inf
    inp = {"S": S.to(dtype).to(F64), "T": Tt.to(tdtype), "y": y}
    shape = (rows,) if c["reduction"] == "none" else ()
    inp["g"] = _incoming(c["grad"], shape, gen)
    return inp


def _dist_oracle(c, inp, g):
    S, y, dtype = inp["S"], inp["y"], c["dtype"]
    Tt = inp["T"].to(F64)
    rows, C = S.shape
    u = _unit(dtype)
    beta, T = c["beta"], c["temperature"]
    sw, hw = c["soft_weight"], c["hard_weight"]
    inexact = not _pow2(1.0 / T)
    ignored = (y == c["ignore_index"]) if y is not None else torch.zeros(rows, dtype=torch.bool)
    x = S.clone().requires_grad_()
    ss = torch.where(ignored[:, None], 0.0, x)
    tt = torch.where(ignored[:, None], 0.0, Tt)
    ls = torch.log_softmax(ss / T, 1)
    lt = torch.log_softmax(tt / T, 1)
    ps, pt = ls.exp(), lt.exp()
    kps, kpt = ps.detach() > 0, pt > 0
    lm = None
    if beta == 0.0:
        D = (pt * torch.where(kpt, lt - ls, 0.0)).sum(1)
    elif beta == 1.0:
        D = (ps * torch.where(kps, ls - lt, 0.0)).sum(1)
    else:
        both0 = ~kps & ~kpt
        a = torch.where(both0, 0.0, lt + math.log(beta))
        b = torch.where(both0, 0.0, ls + math.log1p(-beta))
        lm = torch.logaddexp(a, b)
        D = beta * (pt * torch.where(kpt, lt - lm, 0.0)).sum(1) + (1 - beta) * (
            ps * torch.where(kps, ls - lm, 0.0)
        ).sum(1)
    row = sw * D
    l1 = None
    if hw:
        l1 = torch.log_softmax(ss, 1)
        ys = torch.where(ignored, 0, y)
        row = row - hw * l1.gather(1, ys[:, None]).squeeze(1)
    row = torch.where(ignored, 0.0, row)
    den = (~ignored).sum().to(F64)
    red = c["reduction"]
    if red == "none":
        loss, r = row, g
    elif red == "sum":
        loss, r = row.sum(), g.expand(rows)
    else:
        loss = row.sum() / den if den != 0 else torch.tensor(math.nan, dtype=F64)
        r = (g / den if den != 0 else g * 0).expand(rows)
    e = {"loss": loss.detach()}
    with torch.no_grad():
        lsd, ltd, psd, ptd = ls.detach(), lt, ps.detach(), pt
        terms = _finite0(lsd.abs()) + _finite0(ltd.abs()) + 1
        if lm is not None:
            terms = terms + _finite0(lm.detach().abs())
        if inexact:
            terms = terms + _finite0((ss.detach() / T).abs()) + _finite0((tt / T).abs())
        M = sw * ((psd + ptd) * terms).sum(1)
        gm = sw / T * (psd + ptd) * (terms + _finite0(D.detach().abs())[:, None])
        if hw:
            l1d = l1.detach()
            zr = _finite0(l1d.abs())
            M = M + hw * (zr.gather(1, torch.where(ignored, 0, y)[:, None]).squeeze(1) + 1)
            gm = gm + hw * (l1d.exp() * (zr + 1) + F.one_hot(torch.where(ignored, 0, y), C))
        M = torch.where(ignored, 0.0, _finite0(M) + _finite0(row.detach().abs()))
        floor_rows = 8 * u * M
        if red == "none":
            e["loss_floor"], e["loss_zero"] = floor_rows, ignored
        else:
            e["loss_floor"] = floor_rows.sum() / (den if red == "mean" and den != 0 else 1)
            e["loss_zero"] = None
        e["grad_floor"] = 8 * u * r.abs()[:, None] * _finite0(gm) + _TINY[dtype]
        e["grad_zero"] = (ignored | (r == 0))[:, None].expand(rows, C)
        # the gradient of a row whose divergence is infinite is specified only for beta = 0
        skip = (
            ~ignored & ~row.detach().isfinite() if beta > 0 else torch.zeros(rows, dtype=torch.bool)
        )
        e["grad_skip"] = skip[:, None].expand(rows, C)
    if c["mode"] == "grad":
        if rows:
            (gx,) = torch.autograd.grad((row * r).sum(), [x], allow_unused=True)
            e["grad"] = gx if gx is not None else torch.zeros_like(S)
        else:
            e["grad"] = torch.zeros_like(S)
    return e


def _dist_call(c, inp, route):
    rows, C = c["rows"], c["C"]
    if c["layout"] == "3d":
        lg = _Lp3d(inp["S"], c["dtype"])
        teacher = inp["T"].reshape(rows // 2, 2, C).clone()
        target = None if inp["y"] is None else inp["y"].reshape(rows // 2, 2).clone()
    else:
        lg = Logits(inp["S"], c["dtype"], c["layout"], c["col0"])
        teacher = inp["T"].clone()
        if c["layout"] == "row-strided":  # the teacher strided too
            big = torch.full((rows, C + 3), 5.0, dtype=teacher.dtype)
            big[:, :C] = teacher
            teacher = big[:, :C]
        target = None if inp["y"] is None else inp["y"].clone()
    grad_mode = c["mode"] == "grad"
    if grad_mode:
        lg.capture()
    with _route(route, c["small_blocks"]) as impl, nullcontext() if grad_mode else torch.no_grad():
        loss = fused_xent.distillation_loss(
            lg.x, teacher, target, beta=c["beta"], temperature=c["temperature"],
            soft_weight=c["soft_weight"], hard_weight=c["hard_weight"],
            ignore_index=c["ignore_index"], reduction=c["reduction"],
            inplace_backward=c["inplace"], impl=impl,
        )  # fmt: skip
        if grad_mode:
            torch.autograd.backward(loss, inp["g_used"].float().reshape(loss.shape))
    res = {"loss": loss.detach(), "lg": lg}
    if grad_mode:
        res["grad"] = lg.grad_rows()
    return res


def _dist_compare(c, e):
    dtype, rows, C = c["dtype"], c["rows"], c["C"]
    want_dtype = F64 if dtype == F64 else torch.float32

    def compare(route, res):
        out = []
        loss = res["loss"]
        if loss.dtype != want_dtype:
            out.append(f"loss dtype {loss.dtype}")
        if c["reduction"] == "none":
            shape = (rows // 2, 2) if c["layout"] == "3d" else (rows,)
            if tuple(loss.shape) != shape:
                return out + [f"loss shape {tuple(loss.shape)} != {shape}"]
            loss = loss.reshape(-1)
        out += _close("loss", loss, e["loss"], _loss_rtol(dtype), e["loss_floor"], e["loss_zero"])
        lg = res["lg"]
        out += lg.layout_checks()
        if c["mode"] == "grad":
            g = res["grad"]
            if g is None and rows and C:
                g = torch.zeros(rows, C, dtype=dtype)
            if g is not None:
                if g.dtype != dtype:
                    out.append(f"gradient dtype {g.dtype}")
                out += _close("gradient", g, e["grad"], GRAD_RTOL[dtype], e["grad_floor"],
                              e["grad_zero"], skip=e["grad_skip"])  # fmt: skip
            if not c["inplace"] and not _untouched(lg.x, lg.values):
                out.append("student logits changed without inplace_backward")
        elif not _untouched(lg.x, lg.values):
            out.append("student logits changed under no_grad")
        return out

    return compare


@_fuzz(ci_examples=300, long_examples=2000)
@given(case=distill_cases())
def test_fuzz_distillation(case):
    inp = _dist_inputs(case)
    e = _fix_fp16_scale(case, inp, _dist_oracle)

    def want(route):
        if route == "triton" and (case["dtype"] == F64):
            return (TypeError, ValueError)
        if case["layout"] == "expanded" and case["inplace"] and case["rows"] > 1:
            return ValueError if case["mode"] == "grad" else "either"
        return None

    outcomes = {r: _outcome(lambda r=r: _dist_call(case, inp, r)) for r in ROUTES}
    _judge(case, outcomes, want, _dist_compare(case, e))


# =================================================================================================
# linear_cross_entropy
# =================================================================================================


@st.composite
def linear_cases(draw):
    c = {}
    c["dtype"] = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, F64]))
    c["shape"] = draw(st.sampled_from(["2d", "2d", "1d", "3d"]))
    n = draw(st.integers(0, 6))
    c["rows"] = {"1d": 1, "3d": 2 * n}.get(c["shape"], n)
    c["D"] = draw(st.integers(1, 8))
    c["C"] = draw(st.integers(1, 2 * SMALL_BLOCK + 5))
    c["bias"] = draw(st.booleans())
    c["prob"] = draw(st.booleans())
    c["ignore_index"] = draw(st.sampled_from([None, None, -100, 1]))
    c["p_ignore"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    c["weight"] = draw(st.sampled_from([None, None, "positive", "zeros"]))
    c["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1]))
    c["lse_square_scale"] = draw(st.sampled_from([0.0, 0.0, 1e-2]))
    c["softcap"] = draw(st.sampled_from([None, None, 5.0]))
    c["logit_scale"] = draw(st.sampled_from([1.0, 1.0, 0.5]))
    c["token_weight"] = draw(st.sampled_from([None, None, "random"]))
    c["return_lse"] = draw(st.booleans())
    c["return_stats"] = draw(st.booleans())
    c["chunk_size"] = draw(st.sampled_from([None, None, 1, 2, 3]))
    c["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    c["grad"] = draw(st.sampled_from(["ones", "random", "zero", "scaled"]))
    c["small_blocks"] = draw(st.booleans())
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    if c["prob"]:
        c["ignore_index"] = None  # giving one with probabilities is an error (as torch)
    return c


def _lin_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    rows, C, D, dtype = c["rows"], c["C"], c["D"], c["dtype"]
    h = (torch.randn(rows, D, generator=gen, dtype=F64) * 2).to(dtype)
    W = (torch.randn(C, D, generator=gen, dtype=F64)).to(dtype)
    b = (torch.randn(C, generator=gen, dtype=F64)).to(dtype) if c["bias"] else None
    # the logits as the package's product makes them: one product in the input dtype
    logits = (
        F.linear(h, W, b).to(F64)
        if dtype != torch.float32
        else (h.to(F64) @ W.to(F64).T + (b.to(F64) if b is not None else 0.0))
    )
    ii = -100 if c["ignore_index"] is None else c["ignore_index"]
    inp = {"h": h, "W": W, "b": b, "R": logits, "y": None, "T": None}
    if c["prob"]:
        T = torch.rand(rows, C, generator=gen, dtype=F64)
        inp["T"] = torch.where(torch.rand(rows, C, generator=gen) < 0.3, 0.0, T).float()
    else:
        y = torch.randint(0, C, (rows,), generator=gen)
        y[torch.rand(rows, generator=gen) < c["p_ignore"]] = ii
        inp["y"] = y
    w = None
    if c["weight"]:
        w = torch.rand(C, generator=gen) * 1.5 + 0.25
        if c["weight"] == "zeros":
            w = torch.where(torch.rand(C, generator=gen) < 0.4, 0.0, w)
    inp["w"] = w
    inp["tw"] = torch.randn(rows, generator=gen) if c["token_weight"] else None
    shape = (rows,) if c["reduction"] == "none" else ()
    inp["g"] = _incoming(c["grad"], shape, gen)
    return inp


def _lin_oracle(c, inp, g):
    cc = dict(c, ignore_index=-100 if c["ignore_index"] is None else c["ignore_index"],
              target_grad=False, mode="grad", layout="contiguous")  # fmt: skip
    inexact_c = dict(cc, logit_scale=c["logit_scale"] * (1 + 2**-30))  # products round: inexact
    e = _ce_oracle(inexact_c if c["dtype"] != F64 else cc, dict(inp, R=inp["R"]), g)
    # _ce_oracle ran at the perturbed scale only to widen the floors; redo the values exactly
    exact = _ce_oracle(cc, inp, g)
    for k in ("loss", "grad", "lse", "entropy", "zf", "grad_zero", "loss_zero", "ent_skip"):
        e[k] = exact[k]
    dR = e["grad"]
    h, W = inp["h"].to(F64), inp["W"].to(F64)
    e["dh"], e["dW"], e["db"] = dR @ W, dR.T @ h, dR.sum(0)
    fl = e["grad_floor"]
    D = c["D"]
    # the float32 products of the gradient add at most ~D roundings of |dR| |W| (|dR|^T |h|)
    u = _unit(c["dtype"])
    e["dh_floor"] = fl @ W.abs() + 4 * D * u * dR.abs() @ W.abs()
    e["dW_floor"] = fl.T @ h.abs() + 4 * max(c["rows"], 1) * u * dR.abs().T @ h.abs()
    e["db_floor"] = fl.sum(0) + 4 * max(c["rows"], 1) * u * dR.abs().sum(0)
    return e


def _lin_call(c, inp, route):
    rows, C, D = c["rows"], c["C"], c["D"]
    h = inp["h"].clone().requires_grad_()
    W = inp["W"].clone().requires_grad_()
    b = None if inp["b"] is None else inp["b"].clone().requires_grad_()
    shape = c["shape"]
    x = h[0] if shape == "1d" else (h.reshape(rows // 2, 2, D) if shape == "3d" else h)
    lead = tuple(x.shape[:-1])
    if c["prob"]:
        target = inp["T"].reshape(*lead, C)
    else:
        target = inp["y"].reshape(lead)
    tw = None if inp["tw"] is None else inp["tw"].reshape(lead)
    with _route(route, c["small_blocks"]) as impl:
        out = fused_xent.linear_cross_entropy(
            x, W, target, linear_bias=b, weight=inp["w"], reduction=c["reduction"],
            ignore_index=c["ignore_index"], label_smoothing=c["label_smoothing"],
            lse_square_scale=c["lse_square_scale"], softcap=c["softcap"],
            logit_scale=c["logit_scale"], return_lse=c["return_lse"],
            return_stats=c["return_stats"], token_weight=tw, chunk_size=c["chunk_size"],
            impl=impl,
        )  # fmt: skip
        outs = out if isinstance(out, tuple) else (out,)
        loss = outs[0]
        torch.autograd.backward(loss, inp["g_used"].float().reshape(loss.shape))
    res = {"loss": loss.detach(), "n_out": len(outs), "lead": lead}
    i = 1
    if c["return_lse"]:
        res["lse"] = outs[i]
        i += 1
    if c["return_stats"]:
        res["stats"] = outs[i]
    res["dh"], res["dW"] = h.grad, W.grad
    res["db"] = None if b is None else b.grad
    return res


def _lin_compare(c, e):
    dtype = c["dtype"]
    lo = dtype in (torch.bfloat16, torch.float16)
    loss_rtol = _loss_rtol(dtype)

    def compare(route, res):
        out = []
        n_out = 1 + c["return_lse"] + c["return_stats"]
        if res["n_out"] != n_out:
            return [f"returned {res['n_out']} outputs, want {n_out}"]
        loss = res["loss"]
        if c["reduction"] == "none":
            if tuple(loss.shape) != res["lead"]:
                return [f"loss shape {tuple(loss.shape)} != {res['lead']}"]
            loss = loss.reshape(-1)
        out += _close("loss", loss, e["loss"], loss_rtol, e["loss_floor"], e["loss_zero"])
        if c["return_lse"]:
            out += _close("lse", res["lse"].reshape(-1), e["lse"], loss_rtol, e["lse_floor"])
        if c["return_stats"]:
            st_ = res["stats"]
            out += _close("stats.lse", st_.lse.reshape(-1), e["lse"], loss_rtol, e["lse_floor"])
            out += _close("stats.entropy", st_.entropy.reshape(-1), e["entropy"], loss_rtol,
                          e["ent_floor"], skip=e["ent_skip"])  # fmt: skip
            out += _check_predicted(st_.predicted, e["zf"])
        gtol = GRAD_RTOL[dtype] * (2 if lo else 1)  # a product of rounded gradients
        for name in ("dh", "dW", "db"):
            if name == "db" and not c["bias"]:
                continue
            g = res[name]
            want = e[name]
            if g is None:
                g = torch.zeros_like(want)
            out += _close(f"gradient {name}", g.reshape(want.shape), want, gtol, e[f"{name}_floor"])
        return out

    return compare


@_fuzz(ci_examples=110, long_examples=1000)
@given(case=linear_cases())
def test_fuzz_linear_cross_entropy(case):
    inp = _lin_inputs(case)
    inp["g_used"] = inp["g"]
    e = _lin_oracle(case, inp, inp["g"])

    def want(route):
        if case["dtype"] == F64 and route == "triton":
            return (TypeError, ValueError)
        return None

    outcomes = {r: _outcome(lambda r=r: _lin_call(case, inp, r)) for r in LINEAR_ROUTES}
    _judge(case, outcomes, want, _lin_compare(case, e))


# =================================================================================================
# documented errors: the same exception type on every route
# =================================================================================================


def _x(n=3, c=5, **kw):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(0), **kw).requires_grad_()


def _t(n=3, c=5):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(1))


def _double_backward(impl, reduction="mean"):
    x = _x()
    loss = fused_xent.cross_entropy(x, _t(), reduction=reduction, impl=impl)
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    g.sum().backward()


def _second_backward(impl, reduction="mean", **kw):
    loss = fused_xent.cross_entropy(_x(), _t(), reduction=reduction, impl=impl, **kw)
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()


ERROR_CASES = {
    # name: (call(impl), exception type)
    "smoothing>1": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), label_smoothing=1.5, impl=i),
        ValueError,
    ),
    "smoothing<0": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), label_smoothing=-0.1, impl=i),
        ValueError,
    ),
    "smoothing-nan": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), label_smoothing=math.nan, impl=i),
        ValueError,
    ),
    "softcap=0": (lambda i: fused_xent.cross_entropy(_x(), _t(), softcap=0.0, impl=i), ValueError),
    "softcap<0": (lambda i: fused_xent.cross_entropy(_x(), _t(), softcap=-1.0, impl=i), ValueError),
    "logit_scale=0": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), logit_scale=0.0, impl=i),
        ValueError,
    ),
    "lse_square<0": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), lse_square_scale=-1.0, impl=i),
        ValueError,
    ),
    "weight-size": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), torch.ones(4), impl=i),
        ValueError,
    ),
    "weight-int": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), torch.ones(5, dtype=torch.long), impl=i),
        TypeError,
    ),
    "weight-requires-grad": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), torch.ones(5, requires_grad=True), impl=i),
        ValueError,
    ),
    "target-shape": (lambda i: fused_xent.cross_entropy(_x(), _t(2), impl=i), ValueError),
    "target-int16": (
        lambda i: fused_xent.cross_entropy(_x(), _t().to(torch.int16), impl=i),
        TypeError,
    ),
    "prob-target-shape": (
        lambda i: fused_xent.cross_entropy(_x(), torch.rand(3, 4), impl=i),
        ValueError,
    ),
    "reduction": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), reduction="avg", impl=i),
        ValueError,
    ),
    "input-int": (
        lambda i: fused_xent.cross_entropy(torch.ones(3, 5, dtype=torch.long), _t(), impl=i),
        TypeError,
    ),
    "input-0d": (
        lambda i: fused_xent.cross_entropy(torch.tensor(1.0), torch.tensor(0), impl=i),
        ValueError,
    ),
    "C=0": (
        lambda i: fused_xent.cross_entropy(
            torch.zeros(3, 0), torch.zeros(3, dtype=torch.long), impl=i
        ),
        ValueError,
    ),
    "token_weight-shape": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), token_weight=torch.ones(2), impl=i),
        ValueError,
    ),
    "token_weight-int": (
        lambda i: fused_xent.cross_entropy(
            _x(), _t(), token_weight=torch.ones(3, dtype=torch.long), impl=i
        ),
        TypeError,
    ),
    "token_weight-requires-grad": (
        lambda i: fused_xent.cross_entropy(
            _x(), _t(), token_weight=torch.ones(3, requires_grad=True), impl=i
        ),
        ValueError,
    ),
    "ignore_index-float": (
        lambda i: fused_xent.cross_entropy(_x(), _t(), ignore_index=1.0, impl=i),
        TypeError,
    ),
    "unknown-keyword": (lambda i: fused_xent.cross_entropy(_x(), _t(), bogus=1, impl=i), TypeError),
    "double-backward": (_double_backward, RuntimeError),
    "second-backward-mean": (_second_backward, RuntimeError),
    "second-backward-sum": (lambda i: _second_backward(i, "sum"), RuntimeError),
    "logprobs-temperature=0": (
        lambda i: fused_xent.token_logprobs(_x(), _t(), temperature=0.0, impl=i),
        ValueError,
    ),
    "logprobs-target-float": (
        lambda i: fused_xent.token_logprobs(_x(), _t().float(), impl=i),
        TypeError,
    ),
    "logprobs-target-shape": (lambda i: fused_xent.token_logprobs(_x(), _t(2), impl=i), ValueError),
    "logprobs-V=0": (
        lambda i: fused_xent.token_logprobs(torch.zeros(3, 0), _t(), impl=i),
        ValueError,
    ),
    "logprobs-softcap=0": (
        lambda i: fused_xent.token_logprobs(_x(), _t(), softcap=0.0, impl=i),
        ValueError,
    ),
    "distill-beta>1": (
        lambda i: fused_xent.distillation_loss(_x(), _x().detach(), beta=1.5, impl=i),
        ValueError,
    ),
    "distill-temperature<0": (
        lambda i: fused_xent.distillation_loss(_x(), _x().detach(), temperature=-1.0, impl=i),
        ValueError,
    ),
    "distill-hard-without-target": (
        lambda i: fused_xent.distillation_loss(_x(), _x().detach(), hard_weight=0.5, impl=i),
        ValueError,
    ),
    "distill-teacher-requires-grad": (
        lambda i: fused_xent.distillation_loss(_x(), _x(), impl=i),
        ValueError,
    ),
    "distill-shape": (
        lambda i: fused_xent.distillation_loss(_x(), _x(4).detach(), impl=i),
        ValueError,
    ),
    "distill-vocab": (
        lambda i: fused_xent.distillation_loss(_x(), _x(3, 6).detach(), impl=i),
        ValueError,
    ),
    "distill-soft_weight<0": (
        lambda i: fused_xent.distillation_loss(_x(), _x().detach(), soft_weight=-1.0, impl=i),
        ValueError,
    ),
    "distill-target-float": (
        lambda i: fused_xent.distillation_loss(_x(), _x().detach(), _t().float(), impl=i),
        TypeError,
    ),
    "linear-ignore_index-with-probabilities": (
        lambda i: fused_xent.linear_cross_entropy(
            _x(3, 4), _x(5, 4), torch.rand(3, 5), ignore_index=-100, impl=i
        ),
        ValueError,
    ),
    "linear-head-width": (
        lambda i: fused_xent.linear_cross_entropy(_x(3, 4), _x(5, 3), _t(), impl=i),
        ValueError,
    ),
    "linear-chunk_size=0": (
        lambda i: fused_xent.linear_cross_entropy(_x(3, 4), _x(5, 4), _t(), chunk_size=0, impl=i),
        ValueError,
    ),
    "linear-bias-positional": (
        lambda i: fused_xent.linear_cross_entropy(_x(3, 4), _x(5, 4), _t(), torch.zeros(5), impl=i),
        TypeError,
    ),
}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_documented_errors_on_every_route(name):
    call, exc_type = ERROR_CASES[name]
    raised = {}
    for route in ROUTES:
        with _route(route) as impl:
            try:
                call(impl)
            except Exception as exc:  # noqa: BLE001
                raised[route] = exc
            else:
                raised[route] = None
    wrong = {r: (None if e is None else f"{type(e).__name__}: {e}") for r, e in raised.items()
             if not isinstance(e, exc_type)}  # fmt: skip
    assert not wrong, f"want {exc_type.__name__} on every route; got {wrong}"


# =================================================================================================
# regression tests: disagreements between routes, each exactly as reproduced
# =================================================================================================


def _routes_run(fn):
    """{route: fn(impl)} for every route (the "cpu" one with the small-call route off)."""
    out = {}
    for route in ROUTES:
        with _route(route) as impl:
            out[route] = fn(impl)
    return out


# 1. inplace_backward on overlapping (expanded) logits must raise on every route


def _expanded_logits():
    base = torch.randn(1, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    return base, (base * 1).expand(4, 6)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fn", ["cross_entropy", "token_logprobs", "distillation_loss"])
def test_regression_inplace_backward_on_overlapping_logits_raises(fn, route):
    target = torch.tensor([0, 1, 2, 3])
    teacher = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    calls = {
        "cross_entropy": lambda x, i, ip: fused_xent.cross_entropy(
            x, target, inplace_backward=ip, impl=i),
        "token_logprobs": lambda x, i, ip: fused_xent.token_logprobs(
            x, target, inplace_backward=ip, impl=i).sum(),
        "distillation_loss": lambda x, i, ip: fused_xent.distillation_loss(
            x, teacher, inplace_backward=ip, impl=i),
    }  # fmt: skip
    torch_fns = {
        "cross_entropy": lambda x: F.cross_entropy(x, target),
        "token_logprobs": lambda x: torch.log_softmax(x, -1).gather(1, target[:, None]).sum(),
        "distillation_loss": lambda x: F.kl_div(
            torch.log_softmax(x, -1), torch.log_softmax(teacher.double(), -1),
            log_target=True, reduction="sum") / 4,
    }  # fmt: skip
    with _route(route) as impl:
        base, x = _expanded_logits()
        with pytest.raises(ValueError, match="inplace_backward|overlap"):
            calls[fn](x, impl, True)
        # without inplace_backward such logits work, and get torch's gradient
        base, x = _expanded_logits()
        calls[fn](x, impl, False).backward()
    want_base = base.detach().double().requires_grad_()
    torch_fns[fn](want_base.expand(4, 6)).backward()
    torch.testing.assert_close(base.grad.double(), want_base.grad, rtol=1e-5, atol=1e-7)


# 2. N = 0 on the kernels: "sum" gives 0, "mean" NaN (as torch)


@pytest.mark.parametrize("route", ROUTES)
def test_regression_zero_rows(route):
    with _route(route) as impl:
        s = fused_xent.cross_entropy(torch.randn(0, 256), torch.zeros(0, dtype=torch.long),
                                     reduction="sum", impl=impl)  # fmt: skip
        m = fused_xent.cross_entropy(torch.randn(0, 256), torch.zeros(0, dtype=torch.long),
                                     reduction="mean", impl=impl)  # fmt: skip
    assert s.item() == 0.0
    assert math.isnan(m.item())


# 3. the reference's JSD with a float32-subnormal student probability


def test_regression_distillation_subnormal_student_probability():
    s, t = torch.tensor([[0.0, -102.5]]), torch.tensor([[60.0, -60.0]])
    losses = _routes_run(lambda i: fused_xent.distillation_loss(s, t, beta=0.9, impl=i))
    # The JSD is 0.1 a log(10) + 0.9 b log(b / (0.1 a)) + O(a^2) ~ 7.7e-46 (a = P_s[1] =
    # e^-102.5, b = P_t[1] = e^-120): zero to within the float32 rounding of its O(1) terms.
    a, b = math.exp(-102.5), math.exp(-120.0)
    want = 0.1 * a * math.log(10.0) + 0.9 * b * math.log(b / (0.1 * a))
    for route, loss in losses.items():
        assert torch.isfinite(loss), (route, losses)
        assert abs(loss.item() - want) <= 8 * 2.0**-24, (route, losses)


# 4. the small-call route of impl="auto"


def test_regression_auto_probability_target_with_ignore_index():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    t = torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), -1)
    losses = _routes_run(lambda i: fused_xent.cross_entropy(x, t, ignore_index=1, impl=i))
    want = F.cross_entropy(x.double(), t.double())  # ignore_index is unused with probabilities
    for route, loss in losses.items():
        assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()), (route, losses)


def test_regression_probability_target_zero_at_minus_inf_logit():
    for route in ROUTES:
        with _route(route) as impl:
            x = torch.tensor([[0.0, -math.inf, 1.0]], requires_grad=True)
            loss = fused_xent.cross_entropy(x, torch.tensor([[0.5, 0.0, 0.5]]), impl=impl)
            loss.backward()
        assert abs(loss.item() - 0.8132616875182228) <= 1e-6, (route, loss.item())
        assert torch.isfinite(x.grad).all(), (route, x.grad)
        p = torch.softmax(torch.tensor([0.0, -math.inf, 1.0], dtype=F64), 0)
        want = p - torch.tensor([0.5, 0.0, 0.5], dtype=F64)
        torch.testing.assert_close(x.grad[0].double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fill", [math.nan, -math.inf], ids=["nan", "-inf"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regression_ignored_rows_with_nonfinite_logits(fill, reduction):
    for route in ROUTES:
        with _route(route) as impl:
            leaf = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
            leaf[1] = fill
            leaf.requires_grad_()
            x = leaf * 1
            loss = fused_xent.cross_entropy(x, torch.tensor([0, -100, 2]), reduction=reduction,
                                            impl=impl)  # fmt: skip
            loss.sum().backward()
        assert torch.isfinite(loss).all(), (route, loss)
        assert (leaf.grad[1] == 0).all(), (route, leaf.grad[1])
        assert torch.isfinite(leaf.grad).all(), (route, leaf.grad)


# 5. smoothing over a -inf class of weight 0: 0 * -inf := 0


def test_regression_smoothing_with_zero_weight_minus_inf_class():
    x = torch.tensor([[0.0, -math.inf, 1.0]])
    w = torch.tensor([1.0, 0.0, 1.0])
    losses = _routes_run(
        lambda i: fused_xent.cross_entropy(x, torch.tensor([0]), w, label_smoothing=0.1, impl=i)
    )
    # by hand in float64: log p = z - lse; the class of weight 0 adds 0 (not 0 * -inf)
    logp = torch.log_softmax(torch.tensor([0.0, -math.inf, 1.0], dtype=F64), 0)
    eps, C = 0.1, 3
    row = -(1 - eps) * 1.0 * logp[0] - eps / C * (1.0 * logp[0] + 1.0 * logp[2])
    want = (row / 1.0).item()  # "mean" over the kept weight w[0] = 1
    assert abs(want - 1.2362) < 1e-4
    for route, loss in losses.items():
        assert torch.isfinite(loss), (route, losses)
        assert abs(loss.item() - want) <= 1e-5 * want, (route, losses)


# 6. "mean" whose kept rows' class weights sum to 0, with smoothing


@pytest.mark.parametrize("g", [1.0, 0.0, 3.5])
def test_regression_mean_over_zero_weight_with_smoothing(g):
    w = torch.tensor([0.0, 1.0, 1.0, 0.0])
    target = torch.tensor([0, 3, -100])
    for route in ROUTES:
        with _route(route) as impl:
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
            loss = fused_xent.cross_entropy(x, target, w, label_smoothing=0.2, impl=impl)
            loss.backward(torch.tensor(g))
        assert math.isnan(loss.item()), (route, loss)
        assert (x.grad == 0).all(), (route, x.grad)


# 7. torch.compile(fullgraph=True) with the default impl on CPU tensors


@pytest.mark.parametrize("what", ["cross_entropy", "CrossEntropyLoss", "token_logprobs"])
def test_regression_compile_fullgraph_default_impl(what):
    torch._dynamo.reset()
    target = torch.tensor([0, 3, -100, 2])
    module = fused_xent.CrossEntropyLoss(label_smoothing=0.1)

    def fn(x):
        if what == "cross_entropy":
            return fused_xent.cross_entropy(x, target)
        if what == "CrossEntropyLoss":
            return module(x, target)
        logp, ent = fused_xent.token_logprobs(x, target.clamp_min(0), return_entropy=True)
        return logp.sum() + 0.5 * ent.sum()

    def ref(x):
        if what == "cross_entropy":
            return F.cross_entropy(x, target)
        if what == "CrossEntropyLoss":
            return F.cross_entropy(x, target, label_smoothing=0.1)
        logsm = torch.log_softmax(x, -1)
        ent = -(logsm.exp() * logsm).sum(-1)
        return logsm.gather(1, target.clamp_min(0)[:, None]).sum() + 0.5 * ent.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = compiled(x)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    want = ref(x64)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


# 8. entropy of an all -inf row, lse of a row holding +inf, and a second backward


def test_regression_entropy_of_all_minus_inf_row_is_zero():
    x = torch.tensor([[0.0, 1.0, 2.0], [-math.inf] * 3])
    target = torch.tensor([0, -100])
    for route in ROUTES:
        with _route(route) as impl:
            _, stats = fused_xent.cross_entropy(x, target, return_stats=True, impl=impl)
            _, ent = fused_xent.token_logprobs(x, target, return_entropy=True, impl=impl)
            _, ent_kept = fused_xent.token_logprobs(x, torch.tensor([0, 1]), return_entropy=True,
                                                    impl=impl)  # fmt: skip
        assert stats.entropy[1].item() == 0.0, (route, stats.entropy)
        assert ent[1].item() == 0.0, (route, ent)
        assert ent_kept[1].item() == 0.0, (route, ent_kept)


def test_regression_lse_of_row_holding_plus_inf():
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, math.inf, 1.0]])
    target = torch.tensor([0, -100])
    want = torch.logsumexp(x.double(), 1)
    assert want[1].item() == math.inf
    for route in ROUTES:
        with _route(route) as impl:
            _, lse = fused_xent.cross_entropy(x, target, return_lse=True, impl=impl)
            _, stats = fused_xent.cross_entropy(x, target, return_stats=True, impl=impl)
        assert lse[1].item() == math.inf, (route, lse)
        assert stats.lse[1].item() == math.inf, (route, stats.lse)
        assert abs(lse[0].item() - want[0].item()) <= 1e-6, (route, lse)


@pytest.mark.parametrize("route", ROUTES)
def test_regression_second_backward_is_refused(route):
    with _route(route) as impl:
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
        loss = fused_xent.cross_entropy(x, torch.tensor([0, 1, 2]), impl=impl)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError):
            loss.backward()


# Found by this fuzzer (long profile, 2026-12-07), fixed the same day.


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_regression_full_smoothing_with_target_mass_at_minus_inf(route, kind):
    """label_smoothing 1 leaves the target no share: the loss is the smoothing term's +inf (a
    class at -inf takes mass eps / C), not 0 * inf = NaN (the kernels gave NaN)."""
    x = torch.tensor([[0.0, -math.inf, 1.0]])
    target = torch.tensor([1]) if kind == "index" else torch.tensor([[0.0, 1.0, 0.0]])
    with _route(route) as impl:
        loss = fused_xent.cross_entropy(x, target, label_smoothing=1.0, impl=impl)
    assert loss.item() == math.inf


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fill", [math.nan, -math.inf])
def test_regression_distillation_ignored_rows_with_nonfinite_student(route, fill):
    """An ignored position's gradient is exactly 0 whatever its student row holds (the small
    CPU route gave NaN)."""
    s = torch.tensor([[0.0, 1.0], [fill, fill]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with _route(route) as impl:
        loss = fused_xent.distillation_loss(s, t, torch.tensor([0, -100]), impl=impl)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(s.grad[1], torch.zeros(2))
    assert torch.isfinite(s.grad[0]).all()
