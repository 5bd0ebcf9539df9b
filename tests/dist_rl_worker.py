"""One rank of the world that tests/test_distributed_rl.py spawns; not a test module.

Run as ``python tests/dist_rl_worker.py DEVICE RANK WORLD PORT OUT_DIR``, exactly as
tests/dist_worker.py (whose bookkeeping, targets and spawning it shares): every rank builds the
same full-vocabulary problem from a seed, computes the unsharded float64 oracle with plain torch,
runs ``fused_xent`` on its own slice of the vocabulary with ``process_group=``, compares, and
writes ``OUT_DIR/rank<R>.json``; the parent asserts on that.

What runs here, every case on the reference and a subset holding every option on the Triton path
(interpreted on the CPU at about a second a case, block forced to 8 so that every slice crosses
a block boundary or fills exactly one):

* ``token_logprobs``: (N, V) and (B, T, V), float32 and bfloat16, temperature 0.7 / 1 / 2,
  softcap + logit_scale, ignored positions (and an ignore_index that is a real class), random
  incoming gradients on logp alone (with and without the entropy returned), the entropy alone and
  both, strided rows, the gradient in place, no_grad, a masked vocabulary (-inf logits, a whole
  slice of a row too); an out-of-range target (NaN at its row on the kernel path,
  ``IndexError`` on every rank on the reference, as unsharded); the signs of log p and the
  entropy where the target holds p ~ 1 - 1e-9.
* ``linear_token_logprobs``: chunk sizes that do not divide N, with and without a bias, the
  gradients of the input (summed over the ranks), of this rank's weight rows and bias slice.
* ``cross_entropy`` and ``linear_cross_entropy`` with ``return_stats=True`` (with and without
  ``return_lse``) and ``token_weight`` (negative and zero weights) on every reduction, with class
  weights, label smoothing, z-loss, softcap; the stats' ``predicted`` exact, including
  deliberate exact ties of the maximum within one slice, across slices (the lowest global index
  wins) and, through a zero hidden row, across the whole vocabulary.

The oracle is float64 torch on the whole vocabulary: ``log_softmax`` + ``gather`` for log p, the
entropy ``-sum p log p`` from the probabilities, ``F.cross_entropy(reduction="none") *
token_weight`` reduced with torch's denominator, the lowest index of the row maximum. Outputs are
compared at 1e-5 relative (norm-wise, house style), gradients at the dtype's tolerance, and the
package's outputs start as NaN, so an unwritten element fails.
"""

from __future__ import annotations

import os
import sys

# As in dist_worker.py: Triton picks the interpreter when the kernels are first imported.
if __name__ == "__main__" and sys.argv[1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import dist_worker  # noqa: E402  (the bookkeeping and targets of the cross-entropy's world)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from dist_worker import IGNORE, boundary_targets, on_device  # noqa: E402
from helpers import (  # noqa: E402
    GRAD_RTOL,
    LOSS_RTOL,
    REDUCTIONS,
    random_grad_out,
    rel_err,
    weighted_oracle,
)

from fused_xent import (  # noqa: E402
    TokenStats,
    cross_entropy,
    linear_cross_entropy,
    linear_token_logprobs,
    token_logprobs,
)

IMPLS = ("reference", "triton")
BF16 = torch.bfloat16
# V = 37 in both worlds, sliced unevenly: with the Triton block forced to 8, 13 classes end in a
# partial block, 16 fill two, 8 exactly one; 20 and 17 take three blocks each.
SLICES = {3: [13, 16, 8], 2: [20, 17]}
TRITON_BLOCK = dist_worker.TRITON_BLOCK
N_ROWS = 6  # (N, V); (B, T, V) is (2, 3, V); two rows of six are ignored
HIDDEN = 8
SOFTCAP = dict(softcap=4.0, logit_scale=0.7)


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def layout(group):
    sizes = SLICES[dist.get_world_size(group)]
    rank = dist.get_rank(group)
    offset = sum(sizes[:rank])
    return sizes, slice(offset, offset + sizes[rank])


def tie_positions(sizes, row, gen) -> list[int]:
    """Where row ``row``'s maximum sits (several places: an exact tie), rotating through: two
    places in the last slice (one Triton block in the world of 3); the first and the last class
    of slice 1 (different blocks); the first and the last slices; the last class of slice 0 and
    the first of slice 1 (neighbours across a rank boundary); one place in every slice; two
    places in the first block of slice 0."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    last = len(sizes) - 1

    def at(r, k=1):
        return [starts[r] + int(i) for i in torch.randperm(sizes[r], generator=gen)[:k]]

    pattern = row % 6
    if pattern == 0:
        return at(last, 2)
    if pattern == 1:
        return [starts[1], starts[1] + sizes[1] - 1]
    if pattern == 2:
        return at(0) + at(last)
    if pattern == 3:
        return [starts[1] - 1, starts[1]]
    if pattern == 4:
        return [p for r in range(len(sizes)) for p in at(r)]
    return [starts[0] + 2, starts[0] + 5]


def tie_kinds(z, sizes) -> list[str]:
    """The problem's own sanity: rows whose maximum is tied within one slice and across slices
    exist (else a refactor of the problem has lost what ``predicted`` is checked on)."""
    top = z.max(dim=-1, keepdim=True).values
    at_max = (z == top).reshape(-1, z.shape[-1])
    per_slice = torch.stack([part.sum(1) for part in at_max.split(sizes, dim=1)], dim=1)
    failed = []
    if not bool((per_slice >= 2).any()):
        failed.append("no row has its maximum tied within one slice")
    if not bool(((per_slice >= 1).sum(1) >= 2).any()):
        failed.append("no row has its maximum tied across slices")
    return failed


def make_logits(sizes, n, seed, dtype, peaked_target=None, masked=False):
    """(n, V) logits ~ 3 N(0, 1) whose row maximum is 1.5 above every other value, placed as
    ``tie_positions`` says (exact ties, the same value in every place), in ``dtype``. With
    ``peaked_target`` ((n,) global ids) row 0's target is raised 25 above the rest instead
    (p(target) = 1 - 1e-10: log p just below 0). ``masked``: a masked (padded) vocabulary, -inf
    on the last 3 classes (but the row maximum) and on all of slice 0 in row 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sum(sizes), generator=gen, dtype=torch.float64) * 3
    for row in range(n):
        x[row, tie_positions(sizes, row, gen)] = x[row].max() + 1.5
    if peaked_target is not None and peaked_target[0] >= 0:
        x[0, peaked_target[0]] = x[0].max() + 25.0
    if masked:
        tail = x[:, -3:]
        tail.masked_fill_(tail != x.max(dim=1, keepdim=True).values, -math.inf)
        x[0, : sizes[0]] = -math.inf
    return x.to(dtype)


def unmasked_targets(x, target, ignore_index):
    """``target`` with the ids that fall on a -inf logit moved to the row's first maximum."""
    rows = x.reshape(-1, x.shape[-1])
    flat = target.reshape(-1).clone()
    kept = flat != ignore_index
    on_inf = kept & rows.gather(1, torch.where(kept, flat, 0)[:, None]).squeeze(1).isinf()
    flat[on_inf] = lowest_argmax(rows.double())[on_inf]
    return flat.reshape(target.shape)


def make_targets(sizes, n, seed, ignore_index=IGNORE):
    """Targets on the first and last classes of the slices, two of six rows ignored."""
    return boundary_targets(sizes, n, seed, ignore_index)


def make_token_weight(n, seed):
    """Weights in [-1.5, 1.5): some negative, one exactly 0 (the zero-gradient path)."""
    gen = torch.Generator().manual_seed(seed + 3)
    w = torch.rand(n, generator=gen) * 3 - 1.5
    w[1] = 0.0
    w[2] = -abs(float(w[2])) - 0.25
    return w


def transform(x64, temperature=1.0, logit_scale=1.0, softcap=None):
    """The issue's z = softcap * tanh(logit_scale * x / softcap) / temperature, in float64."""
    z = x64 * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def lowest_argmax(z):
    """The lowest index of each row's maximum (last dimension), without relying on argmax's tie
    rule."""
    top = z.max(dim=-1, keepdim=True).values
    index = torch.arange(z.shape[-1]).expand_as(z)
    return torch.where(z == top, index, z.shape[-1]).min(dim=-1).values


def stats_oracle(z):
    """(lse, entropy, predicted) of float64 logits, vocabulary last."""
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * torch.where(logp.isfinite(), logp, 0.0)).sum(dim=-1)
    return torch.logsumexp(z, dim=-1), entropy, lowest_argmax(z)


def token_oracle(z, target, ignore_index):
    """(log p(target), entropy) of float64 transformed logits: 0 at ignored positions; a -inf
    logit (p = 0) adds 0 to the entropy (and no NaN to its gradient)."""
    logp_all = torch.log_softmax(z, dim=-1)
    kept = target != ignore_index
    safe = torch.where(kept, target, 0).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    finite = torch.where(logp_all.isfinite(), logp_all, 0.0)
    entropy = -(logp_all.exp() * finite).sum(dim=-1)
    return torch.where(kept, logp, 0.0), torch.where(kept, entropy, 0.0)


def near_ties(z, min_gap=1e-3) -> list[str]:
    """The problem's own sanity: in every row the maximum is either exactly tied or ``min_gap``
    above the rest, so float32 rounding cannot move the argmax."""
    top = z.max(dim=-1, keepdim=True).values
    below = torch.where(z == top, -math.inf, z).max(dim=-1, keepdim=True).values
    close = ((top - below) < min_gap).squeeze(-1)
    return [f"the problem has near-ties in rows {close.nonzero().flatten().tolist()}"] * bool(
        close.any()
    )


# --------------------------------------------------------------------------------------------
# Comparisons (nothing raises: a failed check is a message)
# --------------------------------------------------------------------------------------------


def compare(what, actual, expected, tol, dtype=torch.float32) -> list[str]:
    if actual is None:
        return [f"{what}: missing (no gradient?)"]
    if actual.dtype != dtype:
        return [f"{what}: dtype {actual.dtype}, expected {dtype}"]
    try:
        err = rel_err(actual, expected)
    except AssertionError as exc:
        return [f"{what}: {exc}"]
    return [] if err <= tol else [f"{what}: rel err {err:.3g} > {tol}"]


def exact_zero(what, t, where) -> list[str]:
    """``t`` is exactly 0 at the positions ``where`` (leading dimensions)."""
    if t is None:
        return []
    bad = t.detach()[where.to(t.device)]
    if bad.numel() and bool((bad != 0).any()):
        return [f"{what}: not exactly 0 at ignored positions: {bad.flatten()[:6].tolist()}"]
    return []


def compare_stats(stats, want, row_shape, tol=LOSS_RTOL) -> list[str]:
    """TokenStats against the oracle's (lse, entropy, predicted): the first two at ``tol``,
    ``predicted`` exactly; the types, shapes and detachment as specified."""
    if not isinstance(stats, TokenStats):
        return [f"stats: a {type(stats).__name__}, expected TokenStats"]
    lse, entropy, predicted = want
    failed = compare("stats.lse", stats.lse, lse, tol)
    failed += compare("stats.entropy", stats.entropy, entropy, tol)
    if stats.predicted.dtype != torch.int64:
        failed.append(f"stats.predicted: dtype {stats.predicted.dtype}, expected int64")
    elif tuple(stats.predicted.shape) != tuple(row_shape):
        failed.append(f"stats.predicted: shape {tuple(stats.predicted.shape)} != {row_shape}")
    elif not torch.equal(stats.predicted.cpu(), predicted):
        failed.append(
            f"stats.predicted {stats.predicted.flatten().tolist()} != the lowest global argmax "
            f"{predicted.flatten().tolist()}"
        )
    if any(t.requires_grad for t in stats):
        failed.append("stats: requires grad (should not be differentiable)")
    return failed


def expect_error(call, exc_type, match="") -> list[str]:
    try:
        call()
    except exc_type as exc:
        return [] if match in str(exc) else [f"{exc_type.__name__} without {match!r}: {exc}"]
    except Exception as exc:
        return [f"{type(exc).__name__} instead of {exc_type.__name__}: {str(exc)[:200]}"]
    return [f"no {exc_type.__name__}"]


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------

# Per case: shape (lead), dtype, temperature / softcap / logit_scale, which outputs receive a
# random incoming gradient ("logp-only": return_entropy=False; "logp": the entropy returned but
# unused; "entropy"; "both"; "none": under no_grad), strided rows, in place, ignore_index.
TOKEN_CASES = {
    "(N,V) both": dict(),
    "(B,T,V) T=0.7 both": dict(lead=(2, 3), temperature=0.7),
    "T=2 softcap+logit_scale entropy": dict(temperature=2.0, grads="entropy", **SOFTCAP),
    "softcap+logit_scale logp-only": dict(grads="logp-only", **SOFTCAP),
    "(B,T,V) T=0.7 logp (entropy unused)": dict(lead=(2, 3), temperature=0.7, grads="logp"),
    "bf16 (B,T,V) T=2 both": dict(dtype=BF16, lead=(2, 3), temperature=2.0),
    "bf16 T=0.7 softcap+logit_scale entropy": dict(
        dtype=BF16, temperature=0.7, grads="entropy", **SOFTCAP
    ),
    "bf16 logp-only": dict(dtype=BF16, grads="logp-only"),
    "strided rows (B,T,V) T=0.7 both": dict(lead=(2, 3), temperature=0.7, strided=True),
    "inplace_backward T=2 both": dict(temperature=2.0, inplace=True),
    "bf16 inplace_backward softcap logp": dict(dtype=BF16, inplace=True, grads="logp", **SOFTCAP),
    "ignore_index=13 (a real class)": dict(ignore_index=13, temperature=0.7),
    "no_grad (B,T,V) T=0.7 softcap": dict(lead=(2, 3), temperature=0.7, grads="none", **SOFTCAP),
    "no_grad bf16 logp-only": dict(dtype=BF16, grads="none", logp_only=True),
    "masked vocabulary (-inf) T=0.7 both": dict(masked=True, temperature=0.7),
    "masked vocabulary bf16 entropy": dict(masked=True, dtype=BF16, grads="entropy"),
}
# Every case runs on the reference in the world of 3. The interpreted kernels cost about a
# second a case, so on the Triton path a subset that still holds every shape, dtype, temperature,
# transform and mix of incoming gradients; the pair runs a few cases on both paths.
TOKEN_TRITON = (
    "(B,T,V) T=0.7 both",
    "T=2 softcap+logit_scale entropy",
    "bf16 logp-only",
    "bf16 inplace_backward softcap logp",
    "strided rows (B,T,V) T=0.7 both",
    "no_grad (B,T,V) T=0.7 softcap",
)
# A masked (padded) vocabulary on the kernel path, in a group of its own (see the test).
MASKED_TRITON = ("masked vocabulary (-inf) T=0.7 both", "masked vocabulary bf16 entropy")
TOKEN_PAIR = ("(B,T,V) T=0.7 both", "T=2 softcap+logit_scale entropy")


def _local_leaf(x, cols, requires_grad, strided):
    """This rank's slice of ``x`` (vocabulary last) as a fresh leaf; ``strided``: inside a
    NaN-padded buffer, so each row is 3 elements longer than the slice (read past: NaN)."""
    mine = x[..., cols]
    if not strided:
        return on_device(mine, requires_grad)
    pad = torch.full((*mine.shape[:-1], mine.shape[-1] + 3), float("nan"), dtype=mine.dtype)
    pad[..., : mine.shape[-1]] = mine
    leaf = pad.to(dist_worker.DEVICE)[..., : mine.shape[-1]].detach()
    assert not leaf.is_contiguous()
    return leaf.requires_grad_(requires_grad)


def token_case(group, impl, seed, *, lead=(N_ROWS,), dtype=torch.float32, temperature=1.0,
               softcap=None, logit_scale=1.0, grads="both", strided=False, inplace=False,
               ignore_index=IGNORE, logp_only=False, masked=False):  # fmt: skip
    sizes, cols = layout(group)
    n = math.prod(lead)
    target = make_targets(sizes, n, seed + 1, ignore_index)
    x = make_logits(sizes, n, seed, dtype, peaked_target=target, masked=masked)
    target = unmasked_targets(x, target, ignore_index)
    x, target = x.reshape(*lead, -1), target.reshape(lead)
    opts = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    x64 = x.double().requires_grad_()
    want_logp, want_ent = token_oracle(transform(x64, **opts), target, ignore_index)
    g_logp = random_grad_out("none", n, seed, device="cpu").reshape(lead)
    g_ent = random_grad_out("none", n, seed + 7, device="cpu").reshape(lead)
    no_grad = grads == "none"
    return_entropy = grads != "logp-only" and not logp_only
    if not no_grad:
        total = 0.0
        if grads in ("both", "logp", "logp-only"):
            total = total + (want_logp * g_logp.double()).sum()
        if grads in ("both", "entropy"):
            total = total + (want_ent * g_ent.double()).sum()
        total.backward()
    local = _local_leaf(x, cols, True, strided)
    kw = dict(ignore_index=ignore_index, return_entropy=return_entropy, process_group=group,
              impl=impl, **opts)  # fmt: skip
    if no_grad:
        with torch.no_grad():
            out = token_logprobs(local, on_device(target), **kw)
    else:
        inp = local * 1 if inplace else local  # in place: the gradient overwrites a non-leaf
        out = token_logprobs(inp, on_device(target), inplace_backward=inplace, **kw)
    logp, ent = out if return_entropy else (out, None)
    ignored = target == ignore_index
    failed = compare("logp", logp, want_logp.detach(), LOSS_RTOL)
    failed += exact_zero("logp", logp, ignored)
    if return_entropy:
        failed += compare("entropy", ent, want_ent.detach(), LOSS_RTOL)
        failed += exact_zero("entropy", ent, ignored)
    if no_grad:
        if any(t is not None and t.requires_grad for t in (logp, ent)):
            failed.append("an output requires grad under no_grad")
        return failed
    total = 0.0
    if grads in ("both", "logp", "logp-only"):
        total = total + (logp * g_logp.to(logp.device)).sum()
    if grads in ("both", "entropy"):
        total = total + (ent * g_ent.to(ent.device)).sum()
    total.backward()
    failed += compare("logits grad (slice)", local.grad, x64.grad[..., cols], GRAD_RTOL[dtype],
                      dtype)  # fmt: skip
    failed += exact_zero("logits grad (slice)", local.grad, ignored)
    return failed


def token_bad_target_case(group, impl, seed):
    """Targets V (one past the vocabulary) and -1 (not ignore_index) at rows 0 and 3: on the
    kernel path NaN there (log p, entropy and the gradient row) and the other rows exact, as
    unsharded; on the reference an IndexError on every rank, as unsharded."""
    sizes, cols = layout(group)
    target = make_targets(sizes, N_ROWS, seed + 1)
    x = make_logits(sizes, N_ROWS, seed, torch.float32)
    bad = torch.zeros(N_ROWS, dtype=torch.bool)
    bad[[0, 3]] = True
    x64 = x.double().requires_grad_()
    want_logp, want_ent = token_oracle(transform(x64), torch.where(bad, IGNORE, target), IGNORE)
    g = random_grad_out("none", N_ROWS, seed, device="cpu")
    ((want_logp + want_ent) * g.double()).sum().backward()
    target[0], target[3] = sum(sizes), -1
    local = on_device(x[:, cols], requires_grad=True)
    call = dict(return_entropy=True, process_group=group, impl=impl)
    if impl == "reference":
        return expect_error(
            lambda: token_logprobs(local, on_device(target), **call), IndexError, "outside"
        )
    logp, ent = token_logprobs(local, on_device(target), **call)
    ((logp + ent) * g).sum().backward()
    nan = torch.full((), float("nan"), dtype=torch.float64)
    want_grad = torch.where(bad[:, None], nan, x64.grad[:, cols])
    failed = compare("logp", logp, torch.where(bad, nan, want_logp.detach()), LOSS_RTOL)
    failed += compare("entropy", ent, torch.where(bad, nan, want_ent.detach()), LOSS_RTOL)
    failed += compare("logits grad (slice)", local.grad, want_grad, GRAD_RTOL[torch.float32])
    return failed


def sign_case(group, impl, seed):
    """log p is never above 0 and the entropy never below: 24 rows whose target holds all but
    ~1e-9 .. 1e-13 of the probability (its logit 20, 25 or 30 above the rest), the target in each
    slice in turn, none ignored; both within 1e-6 of float64."""
    sizes, cols = layout(group)
    n = 24
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sum(sizes), generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, sum(sizes), (n,), generator=gen)
    for row in range(n):
        x[row, target[row]] = x[row].max() + (20.0, 25.0, 30.0)[row % 3]
    x = x.float()
    want = token_oracle(x.double(), target, IGNORE)
    got = token_logprobs(on_device(x[:, cols]), on_device(target), return_entropy=True,
                         process_group=group, impl=impl)  # fmt: skip
    failed = []
    for what, out, wrong in zip(("log p", "entropy"), got, (got[0] > 0, got[1] < 0), strict=True):
        if bool(wrong.any()):
            rows = wrong.nonzero().flatten().tolist()
            value = out[rows].abs().max().item()
            failed.append(f"{what} of the wrong sign in rows {rows}, up to {value:.3g} "
                          f"(targets {target[rows].tolist()})")  # fmt: skip
    for what, out, expected in zip(("log p", "entropy"), got, want, strict=True):
        err = (out.double().cpu() - expected).abs().max().item()
        if err > 1e-6:
            failed.append(f"{what} off by {err:.3g} > 1e-6")
    return failed


# --------------------------------------------------------------------------------------------
# linear_token_logprobs
# --------------------------------------------------------------------------------------------

LINEAR_TOKEN_CASES = {
    "N=7 chunk 3, bias, both": dict(bias=True),
    "N=7 chunk 4, T=0.7 entropy": dict(chunk=4, temperature=0.7, grads="entropy"),
    "(B,T,D)=(2,4,D) chunk 3, bias, T=2 softcap+logit_scale logp-only": dict(
        lead=(2, 4), bias=True, temperature=2.0, grads="logp-only", **SOFTCAP
    ),
    "N=7 chunk 5, bias, softcap logp (entropy unused)": dict(
        chunk=5, bias=True, grads="logp", **SOFTCAP
    ),  # fmt: skip
    "chunk None, bias, T=0.7 both": dict(chunk=None, bias=True, temperature=0.7),
    "frozen input (head grads only), bias, chunk 3, both": dict(bias=True, frozen=True),
    "no_grad chunk 3, bias, T=2": dict(bias=True, temperature=2.0, grads="none"),
}
LINEAR_TOKEN_TRITON = (
    "N=7 chunk 3, bias, both",
    "(B,T,D)=(2,4,D) chunk 3, bias, T=2 softcap+logit_scale logp-only",
)
LINEAR_TOKEN_PAIR = ("N=7 chunk 4, T=0.7 entropy",)


def linear_problem(sizes, n, seed, bias):
    """hidden (n, D), head (V, D), bias (V,) or None in float32, the same on every rank. Row 1
    of hidden is zero: its logits are the bias exactly, whose maximum is tied in slice 0 and
    twice in the last slice (without a bias, every logit is 0: V-way tie, class 0 wins). The other
    rows are drawn again until their largest logit is 0.05 above the next (no near-ties)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, HIDDEN, generator=gen)
    head = torch.randn(sum(sizes), HIDDEN, generator=gen)
    b = None
    if bias:
        b = torch.randn(sum(sizes), generator=gen)
        b[tie_positions(sizes, 0, gen) + tie_positions(sizes, 2, gen)] = b.max() + 1.0
    for row in range(n):
        while True:
            z = F.linear(hidden[row].double(), head.double(), None if b is None else b.double())
            top2 = z.topk(2).values
            if top2[0] - top2[1] >= 0.05:
                break
            hidden[row] = torch.randn(HIDDEN, generator=gen)
    hidden[1] = 0.0
    return hidden, head, b


def linear_token_case(group, impl, seed, *, lead=(7,), chunk=3, bias=False, temperature=1.0,
                      softcap=None, logit_scale=1.0, grads="both", frozen=False):  # fmt: skip
    sizes, cols = layout(group)
    n = math.prod(lead)
    hidden, head, b = linear_problem(sizes, n, seed, bias)
    target = make_targets(sizes, n, seed + 1)
    opts = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    h64, w64 = hidden.double().requires_grad_(), head.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    z = transform(F.linear(h64, w64, b64), **opts)
    want_logp, want_ent = token_oracle(z, target, IGNORE)
    g_logp = random_grad_out("none", n, seed, device="cpu")
    g_ent = random_grad_out("none", n, seed + 7, device="cpu")
    no_grad = grads == "none"
    return_entropy = grads != "logp-only"
    if not no_grad:
        total = 0.0
        if grads in ("both", "logp", "logp-only"):
            total = total + (want_logp * g_logp.double()).sum()
        if grads in ("both", "entropy"):
            total = total + (want_ent * g_ent.double()).sum()
        total.backward()
    h = on_device(hidden.reshape(*lead, HIDDEN), requires_grad=not frozen)
    w = on_device(head[cols], requires_grad=True)
    bl = None if b is None else on_device(b[cols], requires_grad=True)
    kw = dict(linear_bias=bl, return_entropy=return_entropy, chunk_size=chunk,
              process_group=group, impl=impl, **opts)  # fmt: skip
    t = on_device(target.reshape(lead))
    if no_grad:
        with torch.no_grad():
            out = linear_token_logprobs(h, w, t, **kw)
    else:
        out = linear_token_logprobs(h, w, t, **kw)
    logp, ent = out if return_entropy else (out, None)
    ignored = (target == IGNORE).reshape(lead)
    failed = compare("logp", logp, want_logp.detach().reshape(lead), LOSS_RTOL)
    failed += exact_zero("logp", logp, ignored)
    if return_entropy:
        failed += compare("entropy", ent, want_ent.detach().reshape(lead), LOSS_RTOL)
        failed += exact_zero("entropy", ent, ignored)
    if no_grad:
        return failed
    total = 0.0
    if grads in ("both", "logp", "logp-only"):
        total = total + (logp * g_logp.reshape(lead)).sum()
    if grads in ("both", "entropy"):
        total = total + (ent * g_ent.reshape(lead)).sum()
    total.backward()
    tol = GRAD_RTOL[torch.float32]
    failed += compare("weight grad (slice)", w.grad, w64.grad[cols], tol)
    if bl is not None:
        failed += compare("bias grad (slice)", bl.grad, b64.grad[cols], tol)
    if frozen:
        failed += [] if h.grad is None else ["input got a gradient it did not ask for"]
    else:
        failed += compare("input grad (full)", h.grad, h64.grad.reshape(*lead, HIDDEN), tol)
    return failed


# --------------------------------------------------------------------------------------------
# cross_entropy / linear_cross_entropy: return_stats and token_weight
# --------------------------------------------------------------------------------------------

CE_CASES = {
    "plain": dict(),
    "token_weight": dict(tw=True),
    "token_weight+class weights+smoothing": dict(tw=True, weight=True, label_smoothing=0.1),
    "token_weight+softcap+logit_scale+ignore_index=3": dict(tw=True, ignore_index=3, **SOFTCAP),
    "token_weight+z-loss+class weights": dict(tw=True, weight=True, lse_square_scale=1e-2),
    "k-dim (2,V,3) token_weight+smoothing": dict(tw=True, kdim=True, label_smoothing=0.1),
    "bf16 token_weight": dict(tw=True, dtype=BF16),
    "inplace_backward token_weight": dict(tw=True, inplace=True),
    "no_grad token_weight+smoothing": dict(tw=True, label_smoothing=0.1, no_grad=True),
    "masked vocabulary (-inf) token_weight": dict(tw=True, masked=True),
}
# The reductions each case runs with on the Triton path (world of 3), and in the pair (both paths).
CE_TRITON = {
    "token_weight+class weights+smoothing": REDUCTIONS,
    "token_weight+softcap+logit_scale+ignore_index=3": ("mean",),
    "k-dim (2,V,3) token_weight+smoothing": ("none",),
    "inplace_backward token_weight": ("sum",),
    "no_grad token_weight+smoothing": ("none",),
    "masked vocabulary (-inf) token_weight": ("mean",),
}
CE_PAIR = {
    "token_weight+class weights+smoothing": ("mean",),
    "k-dim (2,V,3) token_weight+smoothing": ("sum",),
}


def _unpack(out, return_lse):
    """(loss, lse or None, stats) from the documented order, or a message."""
    want_len = 3 if return_lse else 2
    if not isinstance(out, tuple) or len(out) != want_len:
        got = len(out) if isinstance(out, tuple) else type(out).__name__
        return None, f"return_lse={return_lse}, return_stats=True: {got} outputs, not {want_len}"
    return (out if return_lse else (out[0], None, out[1])), None


def ce_stats_case(group, impl, spec, reduction, seed, return_lse):
    sizes, cols = layout(group)
    dtype = spec.get("dtype", torch.float32)
    ignore_index = spec.get("ignore_index", IGNORE)
    x_rows = make_logits(sizes, N_ROWS, seed, dtype, masked=spec.get("masked", False))
    target = unmasked_targets(x_rows, make_targets(sizes, N_ROWS, seed + 1, ignore_index),
                              ignore_index)  # fmt: skip
    tw = make_token_weight(N_ROWS, seed) if spec.get("tw") else None
    gen = torch.Generator().manual_seed(seed + 5)
    weight = torch.rand(sum(sizes), generator=gen) + 0.5 if spec.get("weight") else None
    if spec.get("kdim"):  # rows (n, d) -> (2, V, 3): the classes are dimension 1, not last
        row_shape = (2, 3)
        x = x_rows.reshape(2, 3, -1).permute(0, 2, 1)
    else:
        row_shape = (N_ROWS,)
        x = x_rows
    target = target.reshape(row_shape)
    tw = None if tw is None else tw.reshape(row_shape)
    opts = {k: spec[k] for k in ("label_smoothing", "lse_square_scale", "softcap", "logit_scale")
            if k in spec}  # fmt: skip
    x64 = x.double().requires_grad_()
    z = transform(x64, 1.0, spec.get("logit_scale", 1.0), spec.get("softcap"))
    want = weighted_oracle(
        z, target, weight=None if weight is None else weight.double(), ignore_index=ignore_index,
        label_smoothing=spec.get("label_smoothing", 0.0),
        lse_square_scale=spec.get("lse_square_scale", 0.0), token_weight=tw, reduction=reduction,
    )  # fmt: skip
    g = random_grad_out(reduction, N_ROWS, seed, device="cpu")
    g = g.reshape(row_shape) if reduction == "none" else g
    (want * g.double()).sum().backward()
    want_stats = stats_oracle(z.detach().movedim(1, -1))
    failed = near_ties(z.detach().movedim(1, -1)) + tie_kinds(z.detach().movedim(1, -1), sizes)

    no_grad, inplace = spec.get("no_grad", False), spec.get("inplace", False)
    local = on_device(x.narrow(1, cols.start, cols.stop - cols.start), requires_grad=True)
    kw = dict(
        weight=None if weight is None else on_device(weight[cols]),
        ignore_index=ignore_index, reduction=reduction, return_lse=return_lse, return_stats=True,
        token_weight=on_device(tw), process_group=group, impl=impl, **opts,
    )  # fmt: skip
    if no_grad:
        with torch.no_grad():
            out = cross_entropy(local, on_device(target), **kw)
    else:
        inp = local * 1 if inplace else local
        out = cross_entropy(inp, on_device(target), inplace_backward=inplace, **kw)
    out, msg = _unpack(out, return_lse)
    if msg:
        return failed + [msg]
    loss, lse, stats = out
    failed += compare("loss", loss, want.detach(), LOSS_RTOL)
    if return_lse:
        failed += compare("lse", lse, want_stats[0], LOSS_RTOL)
    failed += compare_stats(stats, want_stats, row_shape)
    if no_grad:
        return failed
    (loss * g).sum().backward()
    want_grad = x64.grad.narrow(1, cols.start, cols.stop - cols.start)
    failed += compare("logits grad (slice)", local.grad, want_grad, GRAD_RTOL[dtype], dtype)
    return failed


LINEAR_CE_CASES = {
    "bias, token_weight, chunk 3 of 7": dict(bias=True, tw=True),
    "no bias (V-way tie), token_weight, chunk 4": dict(tw=True, chunk=4),
    "class weights+smoothing+bias, token_weight": dict(
        bias=True, tw=True, weight=True, label_smoothing=0.1
    ),
    "softcap+logit_scale+z-loss, token_weight, chunk 5": dict(
        tw=True, chunk=5, lse_square_scale=1e-2, **SOFTCAP
    ),
    "stats without token_weight, bias": dict(bias=True),
    "no_grad bias, token_weight": dict(bias=True, tw=True, no_grad=True),
}
LINEAR_CE_TRITON = {
    "bias, token_weight, chunk 3 of 7": REDUCTIONS,
    "no bias (V-way tie), token_weight, chunk 4": ("sum",),
}
LINEAR_CE_PAIR = {"bias, token_weight, chunk 3 of 7": ("mean",)}


def linear_ce_stats_case(group, impl, spec, reduction, seed, return_lse):
    sizes, cols = layout(group)
    n = 7
    hidden, head, b = linear_problem(sizes, n, seed, spec.get("bias"))
    target = make_targets(sizes, n, seed + 1)
    tw = make_token_weight(n, seed) if spec.get("tw") else None
    gen = torch.Generator().manual_seed(seed + 5)
    weight = torch.rand(sum(sizes), generator=gen) + 0.5 if spec.get("weight") else None
    opts = {k: spec[k] for k in ("label_smoothing", "lse_square_scale", "softcap", "logit_scale")
            if k in spec}  # fmt: skip
    h64, w64 = hidden.double().requires_grad_(), head.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    z = transform(F.linear(h64, w64, b64), 1.0, spec.get("logit_scale", 1.0), spec.get("softcap"))
    want = weighted_oracle(
        z, target, weight=None if weight is None else weight.double(), ignore_index=IGNORE,
        label_smoothing=spec.get("label_smoothing", 0.0),
        lse_square_scale=spec.get("lse_square_scale", 0.0), token_weight=tw, reduction=reduction,
    )  # fmt: skip
    g = random_grad_out(reduction, n, seed, device="cpu")
    (want * g.double()).sum().backward()
    want_stats = stats_oracle(z.detach())
    failed = near_ties(z.detach()) + tie_kinds(z.detach(), sizes)

    no_grad = spec.get("no_grad", False)
    h = on_device(hidden, requires_grad=True)
    w = on_device(head[cols], requires_grad=True)
    bl = None if b is None else on_device(b[cols], requires_grad=True)
    kw = dict(
        linear_bias=bl, weight=None if weight is None else on_device(weight[cols]),
        reduction=reduction, return_lse=return_lse, return_stats=True,
        token_weight=on_device(tw), chunk_size=spec.get("chunk", 3), process_group=group,
        impl=impl, **opts,
    )  # fmt: skip
    if no_grad:
        with torch.no_grad():
            out = linear_cross_entropy(h, w, on_device(target), **kw)
    else:
        out = linear_cross_entropy(h, w, on_device(target), **kw)
    out, msg = _unpack(out, return_lse)
    if msg:
        return failed + [msg]
    loss, lse, stats = out
    failed += compare("loss", loss, want.detach(), LOSS_RTOL)
    if return_lse:
        failed += compare("lse", lse, want_stats[0], LOSS_RTOL)
    failed += compare_stats(stats, want_stats, (n,))
    if no_grad:
        return failed
    (loss * g).sum().backward()
    tol = GRAD_RTOL[torch.float32]
    failed += compare("input grad (full)", h.grad, h64.grad, tol)
    failed += compare("weight grad (slice)", w.grad, w64.grad[cols], tol)
    if bl is not None:
        failed += compare("bias grad (slice)", bl.grad, b64.grad[cols], tol)
    return failed


# --------------------------------------------------------------------------------------------
# Which cases run where
# --------------------------------------------------------------------------------------------


def run_cases(results, group, name, full):
    """Every case of the tables on the reference and the Triton subsets (``full``: the world of
    3), or the pair's few cases on both paths; each case with a seed of its own."""
    seed = 7000 * dist.get_world_size(group)
    for impl in IMPLS:
        if full:
            if impl == "reference":
                chosen, linear_token = TOKEN_CASES, LINEAR_TOKEN_CASES
                ce = dict.fromkeys(CE_CASES, REDUCTIONS)
                linear_ce = dict.fromkeys(LINEAR_CE_CASES, REDUCTIONS)
            else:
                chosen, linear_token = TOKEN_TRITON, LINEAR_TOKEN_TRITON
                ce, linear_ce = CE_TRITON, LINEAR_CE_TRITON
        else:
            chosen, ce, linear_ce = TOKEN_PAIR, CE_PAIR, LINEAR_CE_PAIR
            linear_token = LINEAR_TOKEN_PAIR
        for case in chosen:
            seed += 1
            results.case(f"token_logprobs/{name}", f"{impl} {case}", token_case, group, impl,
                         seed, **TOKEN_CASES[case])  # fmt: skip
        seed += 1
        results.case(f"token_logprobs/{name}", f"{impl} out-of-range target",
                     token_bad_target_case, group, impl, seed)  # fmt: skip
        for case in linear_token:
            seed += 1
            results.case(f"linear_token_logprobs/{name}", f"{impl} {case}", linear_token_case,
                         group, impl, seed, **LINEAR_TOKEN_CASES[case])  # fmt: skip
        for case, reductions in ce.items():
            for reduction in reductions:
                seed += 1
                return_lse = seed % 2 == 0
                label = f"{impl} {case} {reduction} return_lse={return_lse}"
                results.case(f"cross_entropy_stats/{name}", label, ce_stats_case, group, impl,
                             CE_CASES[case], reduction, seed, return_lse)  # fmt: skip
        for case, reductions in linear_ce.items():
            for reduction in reductions:
                seed += 1
                return_lse = seed % 2 == 0
                label = f"{impl} {case} {reduction} return_lse={return_lse}"
                results.case(f"linear_cross_entropy_stats/{name}", label, linear_ce_stats_case,
                             group, impl, LINEAR_CE_CASES[case], reduction, seed,
                             return_lse)  # fmt: skip


def run_all(results, rank, world) -> None:
    if world != 3:
        run_cases(results, dist.group.WORLD, f"world{world}", True)
        return
    run_cases(results, dist.group.WORLD, "world3", True)
    for impl in IMPLS:
        results.case("signs/world3", impl, sign_case, dist.group.WORLD, impl, 99)
    for case in MASKED_TRITON:
        results.case("masked_vocab/world3", f"triton {case}", token_case, dist.group.WORLD,
                     "triton", 123, **TOKEN_CASES[case])  # fmt: skip
    # A group of global ranks 1 and 2 (group ranks 0 and 1): rank 0 sits it out.
    pair = dist.new_group([1, 2])
    if rank in (1, 2):
        run_cases(results, pair, "world2", False)


def main() -> None:
    dist_worker.main(run_all)  # the same set-up, tear-down and report as the cross-entropy's


if __name__ == "__main__":
    main()
