"""One rank of the world that tests/test_distributed_slabs.py spawns; not a test module.

Run as ``python tests/dist_slab_worker.py DEVICE RANK WORLD PORT OUT_DIR``, exactly as
tests/dist_worker.py (whose set-up, bookkeeping and report it shares; the problems and oracles are
tests/dist_rl_worker.py's): the vocabulary-parallel linear forms (``process_group=``, a DTensor
head) by vocabulary slabs, their default.

* ``routes``: the default sharded forms (``linear_cross_entropy`` with and without a gradient,
  every reduction, ``return_stats``; ``linear_token_logprobs``; the ``LinearCrossEntropyLoss``
  module; a ``Shard(0)`` DTensor head) sweep the slabs (``slab_sweep`` in the forward,
  ``slab_grads`` in the backward) and never the row chunks; an explicit ``chunk_size`` takes the
  row chunks and no slab.
* ``slabs``: with ``fused_xent.autograd.pick_vocab_slab`` forced to 3 classes every rank's slice
  is several slabs with a partial last one (slices [5, 8, 4]: 3+2, 3+3+2, 3+1; the pair's
  [7, 5]: 3+3+1, 3+2), and the result is the unsharded one of plain torch: in float64 on the
  reference (at 1e-12, relative, norm-wise) and in float32 on the interpreted kernels (1e-5), for
  class-index and probability targets, class weights, label smoothing, z-loss, softcap +
  logit_scale, ``ignore_index`` (a real class too), token weights, ``return_lse`` and
  ``return_stats`` (``predicted`` exactly: a zero hidden row ties the maximum inside a slice and
  across slices), every reduction with a random incoming gradient, frozen inputs, ``no_grad``;
  ``linear_token_logprobs`` with the entropy (gradients on log p, the entropy, both), temperature,
  softcap; a ``Shard(0)`` DTensor head.
* ``memory``: a rank's peak CPU memory over forward + backward (torch's profiler, as
  tests/test_memory.py) stays within the slab plan's bound for its slice of the head, where the
  row chunks exceed it.
"""

from __future__ import annotations

import os
import sys

# As in dist_worker.py: Triton picks the interpreter when the kernels are first imported.
if __name__ == "__main__" and sys.argv[1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import collections  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402

import dist_worker  # noqa: E402  (set-up, bookkeeping, report)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from dist_rl_worker import (  # noqa: E402
    linear_problem,
    make_targets,
    make_token_weight,
    stats_oracle,
    token_oracle,
    transform,
)
from dist_worker import IGNORE  # noqa: E402
from helpers import (  # noqa: E402
    GRAD_RTOL,
    LOSS_RTOL,
    REDUCTIONS,
    random_grad_out,
    rel_err,
    weighted_oracle,
)

import fused_xent  # noqa: E402
from fused_xent import autograd, distributed  # noqa: E402

SLICES = {3: [5, 8, 4], 2: [7, 5]}
SLAB = 3  # forced classes per slab: several slabs a slice, the last one partial
N_ROWS = 7  # two of them ignored (class-index targets); row 1 of the hidden states is zero
HIDDEN = 8  # dist_rl_worker.linear_problem's D
TOL = {torch.float64: GRAD_RTOL[torch.float64], torch.float32: LOSS_RTOL}
SOFTCAP = dict(softcap=4.0, logit_scale=0.7)


def layout(group):
    sizes = SLICES[dist.get_world_size(group)]
    rank = dist.get_rank(group)
    offset = sum(sizes[:rank])
    return sizes, slice(offset, offset + sizes[rank])


# --------------------------------------------------------------------------------------------
# What ran: counters around the slab sweeps and the row chunks
# --------------------------------------------------------------------------------------------

CALLS: collections.Counter = collections.Counter()
SLABS: list = []  # the (vocabulary, slab) of every sweep


def _count(module, name: str, key: str) -> None:
    fn = getattr(module, name)

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        CALLS[key] += 1
        return fn(*args, **kwargs)

    setattr(module, name, counted)


def install_counters() -> None:
    """Count the slab sweeps (forward, backward) and the row chunks (both modules' loops)."""
    _count(distributed, "slab_sweep", "slab forward")
    _count(autograd, "slab_grads", "slab backward")
    _count(distributed, "_chunks", "row chunks")
    _count(autograd, "_chunks", "row chunks")
    slabs = autograd._slabs

    def recorded(vocab, slab):
        SLABS.append((vocab, slab))
        return slabs(vocab, slab)

    autograd._slabs = recorded


def force_slabs(classes: int) -> None:
    """Every sweep takes slabs of ``classes`` classes, whatever the shapes."""
    autograd.pick_vocab_slab = lambda n_rows, vocab, dtype, kernels: classes


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


def compare(what, actual, expected, tol, dtype) -> list[str]:
    if actual is None:
        return [f"{what}: missing (no gradient?)"]
    if actual.dtype != dtype:
        return [f"{what}: dtype {actual.dtype}, expected {dtype}"]
    try:
        err = rel_err(actual, expected)
    except AssertionError as exc:
        return [f"{what}: {exc}"]
    return [] if err <= tol else [f"{what}: rel err {err:.3g} > {tol}"]


def loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def compare_stats(stats, want, tol, dtype) -> list[str]:
    lse, entropy, predicted = want
    if not isinstance(stats, fused_xent.TokenStats):
        return [f"stats: a {type(stats).__name__}, expected TokenStats"]
    failed = compare("stats.lse", stats.lse, lse, tol, loss_dtype(dtype))
    failed += compare("stats.entropy", stats.entropy, entropy, tol, loss_dtype(dtype))
    if not torch.equal(stats.predicted.cpu(), predicted):
        failed.append(
            f"stats.predicted {stats.predicted.tolist()} != the lowest global argmax "
            f"{predicted.tolist()}"
        )
    return failed


def exact_zero(what, t, where) -> list[str]:
    bad = t.detach()[where]
    if bad.numel() and bool((bad != 0).any()):
        return [f"{what}: not exactly 0 at ignored positions: {bad.tolist()}"]
    return []


# --------------------------------------------------------------------------------------------
# The oracle: plain torch in float64 on the whole vocabulary
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

LINEAR_CE_CASES = {
    "plain": dict(),
    "bias, class weights, smoothing, ignore_index=3 (a real class)": dict(
        bias=True, weight=True, label_smoothing=0.2, ignore_index=3
    ),
    "z-loss, softcap+logit_scale, bias": dict(bias=True, lse_square_scale=1e-2, **SOFTCAP),
    "all options, token_weight, stats": dict(
        bias=True,
        weight=True,
        label_smoothing=0.1,
        lse_square_scale=1e-2,
        tw=True,
        stats=True,
        **SOFTCAP,
    ),  # fmt: skip
    "stats without bias (V-way tie), token_weight": dict(tw=True, stats=True),
    "prob, class weights, smoothing, z-loss, bias": dict(
        prob=True, bias=True, weight=True, label_smoothing=0.1, lse_square_scale=1e-2
    ),
    "prob, token_weight, stats, softcap": dict(prob=True, tw=True, stats=True, **SOFTCAP),
    "head grads only (frozen input), bias, smoothing": dict(
        bias=True, label_smoothing=0.1, frozen=True
    ),
    "no_grad, bias, class weights, stats": dict(bias=True, weight=True, stats=True, no_grad=True),
}
# The interpreted kernels (about a second a call): every option at once, every reduction.
LINEAR_CE_TRITON = (
    "all options, token_weight, stats",
    "prob, class weights, smoothing, z-loss, bias",
)


def linear_ce_case(group, impl, spec, reduction, seed, dtype, dtensor=False):
    """linear_cross_entropy with this rank's rows of the head (``dtensor``: the whole head as a
    ``Shard(0)`` DTensor and replicated hidden states, DTensor's own cut of the vocabulary)
    against float64 torch on the whole vocabulary."""
    if dtensor:
        sizes, cols = dtensor_layout(group)
    else:
        sizes, cols = layout(group)
    n, tol = N_ROWS, TOL[dtype]
    hidden, head, b = linear_problem(sizes, n, seed, spec.get("bias"))
    gen = torch.Generator().manual_seed(seed + 5)
    weight = torch.rand(sum(sizes), generator=gen, dtype=torch.float64) + 0.5
    weight = weight if spec.get("weight") else None
    ignore_index = spec.get("ignore_index", IGNORE)
    if spec.get("prob"):
        target = torch.softmax(torch.randn(n, sum(sizes), generator=gen) * 2, dim=1).double()
    else:
        target = make_targets(sizes, n, seed + 1, ignore_index)
    tw = make_token_weight(n, seed) if spec.get("tw") else None
    opts = {k: spec[k] for k in ("label_smoothing", "lse_square_scale", "softcap", "logit_scale")
            if k in spec}  # fmt: skip
    h64, w64 = hidden.double().requires_grad_(), head.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    z = transform(F.linear(h64, w64, b64), 1.0, spec.get("logit_scale", 1.0), spec.get("softcap"))
    want = weighted_oracle(
        z, target, weight=weight, ignore_index=ignore_index,
        label_smoothing=spec.get("label_smoothing", 0.0),
        lse_square_scale=spec.get("lse_square_scale", 0.0), token_weight=tw, reduction=reduction,
    )  # fmt: skip
    g = random_grad_out(reduction, n, seed, device="cpu").double()
    (want * g).sum().backward()

    no_grad, frozen, stats = spec.get("no_grad", False), spec.get("frozen", False), "stats" in spec
    h = hidden.to(dtype).requires_grad_(not (no_grad or frozen))
    w = head[cols].to(dtype).requires_grad_(not no_grad)
    bl = None if b is None else b[cols].to(dtype).requires_grad_(not no_grad)
    local_target = target[:, cols].to(dtype) if spec.get("prob") else target
    kw = dict(
        weight=None if weight is None else weight[cols].to(dtype), reduction=reduction,
        return_lse=True, return_stats=stats, token_weight=tw, impl=impl, **opts,
    )  # fmt: skip
    if not spec.get("prob"):
        kw["ignore_index"] = ignore_index
    args = (h, w, local_target)
    if dtensor:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = DTENSOR_MESH
        h = distribute_tensor(hidden.to(dtype), mesh, [Replicate()])
        h.requires_grad_(not (no_grad or frozen))
        w = distribute_tensor(head.to(dtype), mesh, [Shard(0)]).requires_grad_(not no_grad)
        if b is not None:
            bl = distribute_tensor(b.to(dtype), mesh, [Shard(0)]).requires_grad_(not no_grad)
        kw["weight"] = None if weight is None else weight.to(dtype)  # given whole
        if spec.get("prob"):  # probabilities sharded like the head's rows
            target = distribute_tensor(target.to(dtype), mesh, [Shard(1)])
        args = (h, w, target)
    else:
        kw["process_group"] = group
    with torch.set_grad_enabled(not no_grad):
        out = fused_xent.linear_cross_entropy(*args, linear_bias=bl, **kw)
    if dtensor:
        out = tuple(o.to_local() for o in out[:2]) + tuple(
            type(o)(*(t.to_local() for t in o)) for o in out[2:]
        )  # fmt: skip
    loss, lse = out[:2]
    failed = compare("loss", loss, want.detach(), tol, loss_dtype(dtype))
    failed += compare("lse", lse, torch.logsumexp(z.detach(), dim=1), tol, loss_dtype(dtype))
    if stats:
        failed += compare_stats(out[2], stats_oracle(z.detach()), tol, dtype)
    if no_grad:
        return failed
    (loss * g.to(loss.dtype)).sum().backward()
    grad_tol = GRAD_RTOL[dtype]

    def local(t):
        return t.to_local() if dtensor and t is not None else t

    failed += compare("weight grad (slice)", local(w.grad), w64.grad[cols], grad_tol, dtype)
    if bl is not None:
        failed += compare("bias grad (slice)", local(bl.grad), b64.grad[cols], grad_tol, dtype)
    if frozen:
        failed += [] if h.grad is None else ["the input got a gradient it did not ask for"]
    else:
        failed += compare("input grad (full)", local(h.grad), h64.grad, grad_tol, dtype)
    return failed


LINEAR_TOKEN_CASES = {
    "bias, both gradients": dict(bias=True),
    "T=0.7, entropy gradient only": dict(temperature=0.7, grads="entropy"),
    "(B,T,D)=(2,4,D), bias, T=2, softcap+logit_scale, logp only": dict(
        lead=(2, 4), bias=True, temperature=2.0, grads="logp-only", **SOFTCAP
    ),
    "bias, ignore_index=3 (a real class), logp (entropy unused)": dict(
        bias=True, ignore_index=3, grads="logp"
    ),
    "head grads only (frozen input), bias, both": dict(bias=True, frozen=True),
    "no_grad, bias, T=2": dict(bias=True, temperature=2.0, grads="none"),
}
LINEAR_TOKEN_TRITON = (
    "bias, both gradients",
    "(B,T,D)=(2,4,D), bias, T=2, softcap+logit_scale, logp only",
)


def linear_token_case(group, impl, seed, dtype, *, lead=(N_ROWS,), bias=False, temperature=1.0,
                      softcap=None, logit_scale=1.0, grads="both", frozen=False,
                      ignore_index=IGNORE):  # fmt: skip
    sizes, cols = layout(group)
    n, tol = math.prod(lead), TOL[dtype]
    hidden, head, b = linear_problem(sizes, n, seed, bias)
    target = make_targets(sizes, n, seed + 1, ignore_index)
    opts = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    h64, w64 = hidden.double().requires_grad_(), head.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    z = transform(F.linear(h64, w64, b64), **opts)
    want_logp, want_ent = token_oracle(z, target, ignore_index)
    g_logp = random_grad_out("none", n, seed, device="cpu").double()
    g_ent = random_grad_out("none", n, seed + 7, device="cpu").double()
    no_grad, return_entropy = grads == "none", grads != "logp-only"
    if not no_grad:
        total = 0.0
        if grads in ("both", "logp", "logp-only"):
            total = total + (want_logp * g_logp).sum()
        if grads in ("both", "entropy"):
            total = total + (want_ent * g_ent).sum()
        total.backward()
    h = hidden.reshape(*lead, HIDDEN).to(dtype).requires_grad_(not (frozen or no_grad))
    w = head[cols].to(dtype).requires_grad_(not no_grad)
    bl = None if b is None else b[cols].to(dtype).requires_grad_(not no_grad)
    with torch.set_grad_enabled(not no_grad):
        out = fused_xent.linear_token_logprobs(
            h, w, target.reshape(lead), linear_bias=bl, return_entropy=return_entropy,
            ignore_index=ignore_index, process_group=group, impl=impl, **opts,
        )  # fmt: skip
    logp, ent = out if return_entropy else (out, None)
    ignored = (target == ignore_index).reshape(lead)
    failed = compare("logp", logp, want_logp.detach().reshape(lead), tol, loss_dtype(dtype))
    failed += exact_zero("logp", logp, ignored)
    if return_entropy:
        failed += compare("entropy", ent, want_ent.detach().reshape(lead), tol, loss_dtype(dtype))
        failed += exact_zero("entropy", ent, ignored)
    if no_grad:
        return failed
    total = 0.0
    if grads in ("both", "logp", "logp-only"):
        total = total + (logp * g_logp.reshape(lead).to(logp.dtype)).sum()
    if grads in ("both", "entropy"):
        total = total + (ent * g_ent.reshape(lead).to(ent.dtype)).sum()
    total.backward()
    grad_tol = GRAD_RTOL[dtype]
    failed += compare("weight grad (slice)", w.grad, w64.grad[cols], grad_tol, dtype)
    if bl is not None:
        failed += compare("bias grad (slice)", bl.grad, b64.grad[cols], grad_tol, dtype)
    if frozen:
        failed += [] if h.grad is None else ["the input got a gradient it did not ask for"]
    else:
        want_h = h64.grad.reshape(*lead, HIDDEN)
        failed += compare("input grad (full)", h.grad, want_h, grad_tol, dtype)
    return failed


# --------------------------------------------------------------------------------------------
# Routes: the slabs by default, the row chunks with chunk_size=
# --------------------------------------------------------------------------------------------


def _route_calls(group, impl):
    """(label, call, wants a backward) of each default sharded form on a small problem."""
    sizes, cols = layout(group)
    hidden, head, b = linear_problem(sizes, N_ROWS, 11, True)
    target = make_targets(sizes, N_ROWS, 12)

    def leaves():
        return (hidden.clone().requires_grad_(), head[cols].clone().requires_grad_(),
                b[cols].clone().requires_grad_())  # fmt: skip

    def xent(reduction, chunk_size=None, no_grad=False, **kw):
        def call():
            h, w, bl = leaves()
            with torch.set_grad_enabled(not no_grad):
                loss = fused_xent.linear_cross_entropy(
                    h, w, target, linear_bias=bl, reduction=reduction, chunk_size=chunk_size,
                    process_group=group, impl=impl, **kw,
                )  # fmt: skip
            loss = loss[0] if isinstance(loss, tuple) else loss
            if not no_grad:
                loss.sum().backward()

        return call

    def logprobs(chunk_size=None, no_grad=False):
        def call():
            h, w, bl = leaves()
            with torch.set_grad_enabled(not no_grad):
                logp, ent = fused_xent.linear_token_logprobs(
                    h, w, target, linear_bias=bl, return_entropy=True, chunk_size=chunk_size,
                    process_group=group, impl=impl,
                )  # fmt: skip
            if not no_grad:
                (logp.sum() + ent.sum()).backward()

        return call

    def module():
        loss_fn = fused_xent.LinearCrossEntropyLoss(
            HIDDEN, cols.stop - cols.start, process_group=group, impl=impl
        )
        loss_fn(hidden, target).backward()

    return [
        ("linear_cross_entropy mean", xent("mean"), True),
        ("linear_cross_entropy sum, return_lse", xent("sum", return_lse=True), True),
        ("linear_cross_entropy none, return_stats", xent("none", return_stats=True), True),
        ("linear_cross_entropy no_grad", xent("mean", no_grad=True), False),
        ("linear_token_logprobs", logprobs(), True),
        ("linear_token_logprobs no_grad", logprobs(no_grad=True), False),
        ("LinearCrossEntropyLoss(process_group=)", module, True),
    ], [
        ("linear_cross_entropy mean, chunk_size=3", xent("mean", chunk_size=3)),
        ("linear_cross_entropy none, chunk_size=3", xent("none", chunk_size=3)),
        ("linear_token_logprobs chunk_size=3", logprobs(chunk_size=3)),
    ]


def routes_case(group, impl) -> list[str]:
    """Each default sharded form sweeps the slabs (forward; backward when it has one), each a
    rank's whole slice in slabs of SLAB classes, and never the row chunks; chunk_size= the other
    way round."""
    _, cols = layout(group)
    n_local = cols.stop - cols.start
    defaults, chunked = _route_calls(group, impl)
    failed = []
    for label, call, backward in defaults:
        CALLS.clear()
        SLABS.clear()
        call()
        want = {"slab forward": 1, "slab backward": int(backward)}
        got = {k: CALLS[k] for k in ("slab forward", "slab backward", "row chunks")}
        if got != {**want, "row chunks": 0}:
            failed.append(f"{label}: calls {got}, expected {want} and no row chunks")
        if set(SLABS) != {(n_local, SLAB)}:
            failed.append(f"{label}: slabs {SLABS}, expected ({n_local}, {SLAB}) each")
    for label, call in chunked:
        CALLS.clear()
        call()
        if CALLS["row chunks"] == 0 or CALLS["slab forward"] or CALLS["slab backward"]:
            failed.append(f"{label}: calls {dict(CALLS)}, expected the row chunks alone")
    return failed


def dtensor_routes_case(group, impl) -> list[str]:
    """A Shard(0) DTensor head with replicated hidden states: the slabs, no row chunk."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    sizes, _ = dtensor_layout(group)
    hidden, head, b = linear_problem(sizes, N_ROWS, 13, True)
    target = make_targets(sizes, N_ROWS, 14)
    h = distribute_tensor(hidden, DTENSOR_MESH, [Replicate()]).requires_grad_()
    w = distribute_tensor(head, DTENSOR_MESH, [Shard(0)]).requires_grad_()
    bl = distribute_tensor(b, DTENSOR_MESH, [Shard(0)]).requires_grad_()
    CALLS.clear()
    loss = fused_xent.linear_cross_entropy(h, w, target, linear_bias=bl, impl=impl)
    loss.backward()
    logp = fused_xent.linear_token_logprobs(h, w, target, linear_bias=bl, impl=impl)
    logp.sum().backward()
    got = {k: CALLS[k] for k in ("slab forward", "slab backward", "row chunks")}
    want = {"slab forward": 2, "slab backward": 2, "row chunks": 0}
    return [] if got == want else [f"calls {got}, expected {want}"]


# --------------------------------------------------------------------------------------------
# DTensor: the mesh over the world, DTensor's own cut of the vocabulary
# --------------------------------------------------------------------------------------------

DTENSOR_MESH = None
DTENSOR_V = 17  # ceil(17 / 3) = 6: slices [6, 6, 5], slabs 3+3, 3+3, 3+2


def dtensor_layout(group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per = -(-DTENSOR_V // world)
    sizes = [max(min(per, DTENSOR_V - r * per), 0) for r in range(world)]
    offset = sum(sizes[:rank])
    return sizes, slice(offset, offset + sizes[rank])


# --------------------------------------------------------------------------------------------
# Memory: a rank's peak within the slab plan's bound for its slice
# --------------------------------------------------------------------------------------------

MEM_N, MEM_D, MEM_V_LOCAL = 128, 16, 8192  # a rank's logits 2 MiB in bf16; the bound ~0.95 MiB


def memory_case(group, impl) -> list[str]:
    """tests/test_memory.py's measurement and bound on each rank (its slice V_local of the head:
    the weight gradient V_local*D*b, a float32 d_hidden, the input gradient, row statistics, a
    slab of logits, 1 MiB of slack), forward + backward of linear_cross_entropy and of
    linear_token_logprobs with the entropy; the row chunks (chunk_size=) exceed it."""
    from test_memory import bound, peak_bytes

    gen = torch.Generator().manual_seed(dist.get_rank(group))
    dtype = torch.bfloat16
    h = torch.randn(MEM_N, MEM_D, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = (torch.randn(MEM_V_LOCAL, MEM_D, generator=gen) * 0.3).to(dtype)
    t = torch.randint(0, MEM_V_LOCAL * dist.get_world_size(group), (MEM_N,),
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
    t[3] = IGNORE
    limit = bound(MEM_N, MEM_D, MEM_V_LOCAL, dtype)

    def step(kind, chunk_size=None):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()

        def run():
            if kind == "xent":
                out = fused_xent.linear_cross_entropy(
                    hl, wl, t, label_smoothing=0.1, lse_square_scale=1e-4, chunk_size=chunk_size,
                    process_group=group, impl=impl,
                )  # fmt: skip
                out.backward()
            else:
                logp, ent = fused_xent.linear_token_logprobs(
                    hl, wl, t, return_entropy=True, chunk_size=chunk_size, process_group=group,
                    impl=impl,
                )  # fmt: skip
                (logp.sum() + ent.sum()).backward()
            return hl.grad, wl.grad

        return run

    failed = []
    for kind in ("xent", "logprobs"):
        peak = peak_bytes(step(kind))
        if peak > limit:
            failed.append(f"{kind}: peak {peak / 2**20:.2f} MiB > bound {limit / 2**20:.2f} MiB")
    chunked = peak_bytes(step("xent", chunk_size=MEM_N))
    if chunked <= limit:
        failed.append(f"row chunks: peak {chunked / 2**20:.2f} MiB within the bound: measured?")
    return failed


# --------------------------------------------------------------------------------------------


def run_cases(results, group, name, full) -> None:
    """Routes, then the forced-slab comparisons: every case on the float64 reference, the kernel
    subsets in float32 (``full``: the world of 3; the pair runs a few)."""
    seed = 9000 * dist.get_world_size(group)
    for impl in ("reference", "triton"):
        if full or impl == "reference":
            results.case(f"routes/{name}", impl, routes_case, group, impl)
    for impl, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        ce_cases = LINEAR_CE_CASES if impl == "reference" else LINEAR_CE_TRITON
        token_cases = LINEAR_TOKEN_CASES if impl == "reference" else LINEAR_TOKEN_TRITON
        if not full and impl == "triton":
            ce_cases, token_cases = ce_cases[:1], token_cases[:1]
        for case in ce_cases:
            spec = LINEAR_CE_CASES[case]
            reductions = REDUCTIONS if impl == "reference" or full else ("mean",)
            for reduction in reductions:
                seed += 1
                label = f"{impl} {case} {reduction}"
                results.case(f"linear_cross_entropy/{name}", label, linear_ce_case, group, impl,
                             spec, reduction, seed, dtype)  # fmt: skip
        for case in token_cases:
            seed += 1
            results.case(f"linear_token_logprobs/{name}", f"{impl} {case}", linear_token_case,
                         group, impl, seed, dtype, **LINEAR_TOKEN_CASES[case])  # fmt: skip


def run_all(results, rank, world) -> None:
    global DTENSOR_MESH
    install_counters()
    force_slabs(SLAB)
    run_cases(results, dist.group.WORLD, "world3", True)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        DTENSOR_MESH = init_device_mesh("cpu", (world,))
    except ImportError:
        DTENSOR_MESH = None
    if DTENSOR_MESH is not None:
        group = dist.group.WORLD
        results.case("dtensor/world3", "routes", dtensor_routes_case, group, "reference")
        seed = 9500
        for case in ("all options, token_weight, stats", "prob, token_weight, stats, softcap"):
            for reduction in REDUCTIONS:
                seed += 1
                results.case("dtensor/world3", f"reference {case} {reduction}", linear_ce_case,
                             group, "reference", LINEAR_CE_CASES[case], reduction, seed,
                             torch.float64, dtensor=True)  # fmt: skip
    # A group of global ranks 1 and 2 (group ranks 0 and 1): rank 0 sits it out.
    pair = dist.new_group([1, 2])
    if rank in (1, 2):
        run_cases(results, pair, "world2", False)
    # The memory bound with the shapes' own slabs.
    autograd.pick_vocab_slab = PICK_VOCAB_SLAB
    for impl in ("auto", "reference"):
        results.case("memory/world3", impl, memory_case, dist.group.WORLD, impl)


PICK_VOCAB_SLAB = autograd.pick_vocab_slab


def main() -> None:
    dist_worker.main(run_all)  # the same set-up, tear-down and report as the cross-entropy's


if __name__ == "__main__":
    main()
