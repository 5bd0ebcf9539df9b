"""One rank of the process groups that tests/test_distributed.py spawns; not a test module.

Run as ``python tests/dist_worker.py DEVICE RANK WORLD PORT OUT_DIR``. Every rank builds the same
full-vocabulary problem from a seed, computes the unsharded float64 oracle with plain torch, runs
``fused_xent`` on its own slice of the vocabulary with ``process_group=``, and compares. Nothing
is asserted here: each rank writes ``OUT_DIR/rank<R>.json`` with, per group of cases, how many
ran and what failed, and the parent asserts on that. Comparisons happen outside the collectives,
so a failed check on one rank never leaves the ranks out of step.

Which collectives each rank enters has to match exactly; every case below is run by every member
of its group in the same order (the one exception, the rank without classes, is run last on a
group with a short timeout).
"""

from __future__ import annotations

import os
import sys

# Triton picks the interpreter when the kernels are first imported, so this comes before any
# import of fused_xent. The device is the first argument.
if __name__ == "__main__" and sys.argv[1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import GRAD_RTOL, LOSS_RTOL, REDUCTIONS, random_grad_out, rel_err  # noqa: E402

import fused_xent._alloc  # noqa: E402
from fused_xent import cross_entropy, linear_cross_entropy  # noqa: E402

IMPLS = ("reference", "triton")
IGNORE = -100
# The vocabulary slices, in rank order. Uneven on purpose: an offset computed as rank * C_local
# (equal slices assumed) is wrong on every rank but the first. With the Triton block forced to 8
# (below), 3, 4, 5 and 7 classes fit one block (the kernels' one-read path) and 9 ends in a
# partial second block (the looping path).
SLICES = {1: [16], 2: [7, 5], 3: [4, 9, 3]}
TRITON_BLOCK = 8
DEVICE = torch.device("cpu")  # main() sets the device under test
# Few rows: Triton's interpreter costs ~20 ms per row and launch. Six rows hold two ignored rows
# and four targets on the first or last class of a slice (which four rotates with the seed).
N_ROWS = 6
HIDDEN = 8  # linear_cross_entropy: D
LINEAR_ROWS = 6  # with chunk_size=4: chunks of 4 and 2 rows, each combined across the ranks
CHUNK = 4

# Option sets for cross_entropy; "prob" switches to probability targets, "weight" adds class
# weights. Class-index cases always hold ignored rows. ignore_index=3 is a real class (its rows
# are ignored on every rank, not only on the rank that holds class 3).
CE_CASES = {
    "plain": {},
    "weight": dict(weight=True),
    "smoothing-int32-target": dict(label_smoothing=0.1, int32=True),
    "weight+smoothing+ignore_index=3": dict(weight=True, label_smoothing=0.2, ignore_index=3),
    "z-loss+weight": dict(weight=True, lse_square_scale=1e-2),
    "softcap+logit_scale": dict(softcap=4.0, logit_scale=0.7),
    "prob": dict(prob=True),
    "prob+weight+smoothing+z-loss": dict(
        prob=True, weight=True, label_smoothing=0.1, lse_square_scale=1e-2
    ),
    "all-options": dict(
        weight=True, label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0, logit_scale=0.7
    ),
}
LINEAR_CASES = {
    "plain-one-chunk": dict(chunk_size=None),
    "bias": dict(bias=True),
    "bias+smoothing+ignore_index=3": dict(bias=True, label_smoothing=0.2, ignore_index=3),
    "z-loss+softcap+logit_scale": dict(lse_square_scale=1e-2, softcap=4.0, logit_scale=0.7),
    "all-options": dict(
        bias=True, label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0, logit_scale=0.7
    ),
    "weight-grad-only": dict(bias=True, frozen_hidden=True),
    # Class weights and probability targets come as each rank's slice, as for cross_entropy.
    "weight+smoothing+ignore_index=3": dict(weight=True, label_smoothing=0.2, ignore_index=3),
    "prob+weight+bias+z-loss": dict(prob=True, weight=True, bias=True, lse_square_scale=1e-2),
}


# --------------------------------------------------------------------------------------------
# The unsharded oracle: plain torch in float64
# --------------------------------------------------------------------------------------------


def oracle(
    logits,
    target,
    *,
    weight=None,
    ignore_index=IGNORE,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    logit_scale=1.0,
):
    """(loss, lse) of the whole vocabulary, differentiable in the float64 ``logits``.

    z = softcap * tanh(logit_scale * x / softcap); loss = F.cross_entropy(z) + lse_square_scale *
    lse(z)**2 on every non-ignored row, "mean" dividing the z-loss by torch's own denominator.
    """
    class_dim = 0 if logits.dim() == 1 else 1
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    prob = target.is_floating_point()
    t = target.double() if prob else target.long()
    w = None if weight is None else weight.double()
    kw = dict(weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, dim=class_dim)
    kept = torch.ones_like(lse, dtype=torch.bool) if prob else t != ignore_index
    z_loss = torch.where(kept, lse_square_scale * lse * lse, 0.0)
    if reduction == "none":
        return F.cross_entropy(z, t, reduction="none", **kw) + z_loss, lse
    if reduction == "sum":
        return F.cross_entropy(z, t, reduction="sum", **kw) + z_loss.sum(), lse
    if prob:
        denominator = float(lse.numel())
    elif w is not None:
        denominator = (w[torch.where(kept, t, 0)] * kept).sum()
    else:
        denominator = kept.sum()
    return F.cross_entropy(z, t, reduction="mean", **kw) + z_loss.sum() / denominator, lse


# --------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------


class CaseRaised(Exception):
    """A case raised where it should have returned: the ranks may be out of step now."""


class Results:
    """Per group of cases: how many ran and the failures, as text for the parent to print."""

    def __init__(self, rank: int):
        self.rank = rank
        self.groups: dict[str, dict] = {}

    def _group(self, name):
        return self.groups.setdefault(name, {"cases": 0, "failures": [], "seconds": 0.0})

    def case(self, group: str, label: str, check, *args, **kwargs) -> None:
        """Run ``check(*args, **kwargs)``, which returns the failed comparisons, and record it."""
        entry = self._group(group)
        entry["cases"] += 1
        start = time.perf_counter()
        failed = []
        try:
            failed = check(*args, **kwargs)
        except Exception as exc:
            # This rank may have left a collective the others are still in: stop the run
            # (main() exits, and the others then see its connections close and stop too).
            failed = ["raised:\n" + traceback.format_exc(limit=6)]
            raise CaseRaised from exc
        finally:
            entry["seconds"] += time.perf_counter() - start
            entry["failures"] += [f"rank {self.rank}: {label}: {msg}" for msg in failed]

    def to_json(self) -> dict:
        return {"rank": self.rank, "groups": self.groups}


def compare(what, actual, expected, tol) -> list[str]:
    if actual is None:
        return [f"{what}: no gradient"]
    if actual.dtype != torch.float32:
        return [f"{what}: dtype {actual.dtype}, expected float32"]
    try:
        err = rel_err(actual, expected)
    except AssertionError as exc:
        return [f"{what}: {exc}"]
    return [] if err <= tol else [f"{what}: rel err {err:.3g} > {tol}"]


def vocab_layout(group):
    sizes = SLICES[dist.get_world_size(group)]
    rank = dist.get_rank(group)
    offset = sum(sizes[:rank])
    return sizes, slice(offset, offset + sizes[rank])


def boundary_targets(sizes, n, seed, ignore_index):
    """Global targets on the first and last classes of the slices (starting at a place that
    rotates with the seed), two of them ignored when there are enough rows; the same on every
    rank."""
    edges = []
    for r in range(len(sizes)):
        start = sum(sizes[:r])
        edges += [start, start + sizes[r] - 1]
    t = torch.tensor(edges).roll(seed).repeat(n)[:n]
    if n >= 4:
        gen = torch.Generator().manual_seed(seed)
        t[torch.randperm(n, generator=gen)[:2]] = ignore_index
    return t


def make_problem(sizes, seed, spec, shape=None):
    """Full-vocabulary float32 logits of ``shape`` (class dimension 1, or 0 when 1-D), target and
    class weights, on the CPU and the same on every rank."""
    n_classes = sum(sizes)
    shape = shape or (N_ROWS, n_classes)
    class_dim = 0 if len(shape) == 1 else 1
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).float()
    weight = torch.rand(n_classes, generator=gen) * 1.5 + 0.5 if spec.get("weight") else None
    if spec.get("prob"):
        target = torch.softmax(torch.randn(shape, generator=gen) * 2, dim=class_dim)
    else:
        row_shape = shape[:class_dim] + shape[class_dim + 1 :]
        rows = x.numel() // n_classes
        target = boundary_targets(sizes, rows, seed + 1, spec.get("ignore_index", IGNORE))
        target = target.reshape(row_shape)
        if spec.get("int32"):
            target = target.int()
    return x, target, weight


def loss_options(spec):
    keys = ("label_smoothing", "lse_square_scale", "softcap", "logit_scale", "ignore_index")
    return {"ignore_index": IGNORE, **{k: spec[k] for k in keys if k in spec}}


def on_device(t, requires_grad=False):
    """A fresh copy on the device under test (a leaf when it requires grad)."""
    if t is None:
        return None
    return t.to(DEVICE, copy=True).requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def ce_case(group, impl, spec, reduction, seed, *, shape=None, inplace=False, no_grad=False):
    """cross_entropy on this rank's slice against the float64 oracle of the whole vocabulary."""
    sizes, cols = vocab_layout(group)
    x, target, weight = make_problem(sizes, seed, spec, shape)
    class_dim = 0 if x.dim() == 1 else 1
    opts = loss_options(spec)
    g = random_grad_out(reduction, x.numel() // sum(sizes), seed, device="cpu")
    g = g.reshape(x.shape[:class_dim] + x.shape[class_dim + 1 :] if reduction == "none" else ())
    x64 = x.double().requires_grad_()
    want, want_lse = oracle(x64, target, weight=weight, reduction=reduction, **opts)
    (want * g.double()).sum().backward()
    want_grad = x64.grad.narrow(class_dim, cols.start, cols.stop - cols.start)

    def mine(t):  # this rank's slice along the class dimension
        return t.narrow(class_dim, cols.start, cols.stop - cols.start)

    local = on_device(mine(x), requires_grad=not no_grad)
    kw = dict(
        weight=None if weight is None else on_device(weight[cols]),
        reduction=reduction,
        process_group=group,
        impl=impl,
        **opts,
    )
    local_target = on_device(mine(target) if target.is_floating_point() else target)
    if no_grad:
        with torch.no_grad():
            loss = cross_entropy(local, local_target, **kw)
        return compare("loss (no_grad)", loss, want.detach(), LOSS_RTOL)
    inp = local * 1 if inplace else local  # in place: the gradient overwrites a non-leaf
    loss, lse = cross_entropy(inp, local_target, return_lse=True, inplace_backward=inplace, **kw)
    (loss * g.to(DEVICE)).sum().backward()
    return (
        compare("loss", loss, want.detach(), LOSS_RTOL)
        + compare("lse", lse, want_lse.detach(), LOSS_RTOL)
        + compare("logits grad (slice)", local.grad, want_grad, GRAD_RTOL[torch.float32])
    )


def linear_case(group, impl, spec, reduction, seed, *, no_grad=False):
    """linear_cross_entropy with this rank's rows of the LM head against the float64 oracle."""
    sizes, cols = vocab_layout(group)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(LINEAR_ROWS, HIDDEN, generator=gen)
    weight = torch.randn(sum(sizes), HIDDEN, generator=gen)
    bias = torch.randn(sum(sizes), generator=gen) if spec.get("bias") else None
    class_weight = torch.rand(sum(sizes), generator=gen) + 0.5 if spec.get("weight") else None
    opts = loss_options(spec)
    if spec.get("prob"):
        target = torch.softmax(torch.randn(LINEAR_ROWS, sum(sizes), generator=gen) * 2, dim=1)
    else:
        target = boundary_targets(sizes, LINEAR_ROWS, seed + 1, opts["ignore_index"])
    g = random_grad_out(reduction, LINEAR_ROWS, seed, device="cpu")
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    want, want_lse = oracle(
        F.linear(h64, w64, b64), target, reduction=reduction, weight=class_weight, **opts
    )
    (want * g.double()).sum().backward()
    if spec.get("prob"):
        target = target[:, cols]  # this rank's slice of the probabilities
        del opts["ignore_index"]  # torch: no ignore_index with probability targets
    if class_weight is not None:
        opts["weight"] = on_device(class_weight[cols])

    h = on_device(hidden, requires_grad=not (no_grad or spec.get("frozen_hidden")))
    w = on_device(weight[cols], requires_grad=not no_grad)
    b = None if bias is None else on_device(bias[cols], requires_grad=not no_grad)
    kw = dict(
        reduction=reduction,
        chunk_size=spec.get("chunk_size", CHUNK),
        process_group=group,
        impl=impl,
        **opts,
    )
    if no_grad:
        with torch.no_grad():
            loss = linear_cross_entropy(h, w, on_device(target), linear_bias=b, **kw)
        return compare("loss (no_grad)", loss, want.detach(), LOSS_RTOL)
    loss, lse = linear_cross_entropy(h, w, on_device(target), linear_bias=b, return_lse=True, **kw)
    (loss * g.to(DEVICE)).sum().backward()
    tol = GRAD_RTOL[torch.float32]
    failed = compare("loss", loss, want.detach(), LOSS_RTOL)
    failed += compare("lse", lse, want_lse.detach(), LOSS_RTOL)
    failed += compare("weight grad (slice)", w.grad, w64.grad[cols], tol)
    if b is not None:
        failed += compare("bias grad (slice)", b.grad, b64.grad[cols], tol)
    if spec.get("frozen_hidden"):
        failed += [] if h.grad is None else ["hidden got a gradient it did not ask for"]
    else:
        failed += compare("hidden grad (full)", h.grad, h64.grad, tol)
    return failed


# Further cross_entropy cases: (options, keywords of ce_case); in shapes, 0 marks the classes.
CE_EXTRAS = {
    # (N, C, d): the class dimension is not the innermost one.
    "k-dim (2, C, 4)": (dict(weight=True, label_smoothing=0.1), dict(shape=(2, 0, 4))),
    "k-dim prob (2, C, 4)": (dict(prob=True, lse_square_scale=1e-2), dict(shape=(2, 0, 4))),
    "unbatched (C,)": (dict(label_smoothing=0.1), dict(shape=(0,))),
    "inplace_backward": (dict(weight=True, lse_square_scale=1e-2), dict(inplace=True)),
    "no_grad": (dict(weight=True, label_smoothing=0.1), dict(no_grad=True)),
}


# The Triton interpreter costs about a second a case, and what the kernels add to the sharded
# loss is the slice's place in the vocabulary (the rest is the Python both impls share). So on
# the Triton path: every cross_entropy option set with one reduction (in turn), the gradient
# written in place, linear_cross_entropy in one chunk, and every reduction for the cases with
# every option.
TRITON_ONE_REDUCTION = {*CE_CASES, "inplace_backward", "plain-one-chunk"}


def reductions_for(impl, case, index, triton_cases):
    """The reductions a case runs with: all on the reference; on the Triton path as above
    (``triton_cases="all"``), or only the cases with every option (``"some"``)."""
    if impl == "reference" or case == "all-options":
        return REDUCTIONS
    if triton_cases == "all" and case in TRITON_ONE_REDUCTION:
        return (REDUCTIONS[index % 3],)
    return ()


def run_matching_cases(results, group, name, triton_cases):
    """The sharded result is the unsharded one, for each case and reduction (and seed)."""
    n_classes = sum(SLICES[dist.get_world_size(group)])
    seed = 1000 * dist.get_world_size(group)
    ce, linear = f"cross_entropy/{name}", f"linear_cross_entropy/{name}"
    for impl in IMPLS:
        for i, (case, spec) in enumerate(CE_CASES.items()):
            for reduction in reductions_for(impl, case, i, triton_cases):
                seed += 1
                label = f"{impl} {case} {reduction}"
                results.case(ce, label, ce_case, group, impl, spec, reduction, seed)
        for i, (case, (spec, kw)) in enumerate(CE_EXTRAS.items()):
            if "shape" in kw:
                kw = dict(kw, shape=tuple(d or n_classes for d in kw["shape"]))
            for reduction in reductions_for(impl, case, i, triton_cases):
                seed += 1
                label = f"{impl} {case} {reduction}"
                results.case(ce, label, ce_case, group, impl, spec, reduction, seed, **kw)
        for i, (case, spec) in enumerate(LINEAR_CASES.items()):
            for reduction in reductions_for(impl, case, i, triton_cases):
                seed += 1
                label = f"{impl} {case} {reduction}"
                results.case(linear, label, linear_case, group, impl, spec, reduction, seed)
        spec = LINEAR_CASES["bias+smoothing+ignore_index=3"]
        for reduction in reductions_for(impl, "no_grad", 1, triton_cases):
            seed += 1
            label = f"{impl} no_grad {reduction}"
            results.case(
                linear, label, linear_case, group, impl, spec, reduction, seed, no_grad=True
            )


def all_inf_slice_case(group, impl, reduction, lse_square_scale):
    """Row 1 has every logit of group rank 0's slice at -inf (a masked part of the vocabulary)
    and its target in another slice; unsharded, torch gives a finite loss and a zero gradient
    there. fused_xent.distributed.combine says such a slice adds nothing."""
    sizes, cols = vocab_layout(group)
    x, target, _ = make_problem(sizes, 77, {})
    x[1, : sizes[0]] = float("-inf")
    target[1] = sizes[0]  # the first class of group rank 1's slice
    x64 = x.double().requires_grad_()
    want, _ = oracle(x64, target, reduction=reduction, lse_square_scale=lse_square_scale)
    want.sum().backward()
    local = on_device(x[:, cols], requires_grad=True)
    loss = cross_entropy(
        local,
        on_device(target),
        reduction=reduction,
        lse_square_scale=lse_square_scale,
        process_group=group,
        impl=impl,
    )
    loss.sum().backward()
    return compare("loss", loss, want.detach(), LOSS_RTOL) + compare(
        "logits grad (slice)", local.grad, x64.grad[:, cols], GRAD_RTOL[torch.float32]
    )


def expect_value_error(call, match: str = ""):
    """What went wrong, unless ``call()`` raises a ValueError whose message holds ``match``."""
    try:
        call()
    except ValueError as exc:
        return [] if match in str(exc) else [f"ValueError without {match!r}: {exc}"]
    except Exception as exc:
        return [f"{type(exc).__name__} instead of ValueError: {str(exc)[:200]}"]
    return ["no error"]


def run_mismatch_cases(results, group, name):
    """Ranks that disagree get a ValueError on every rank, and the group stays usable."""
    sizes, cols = vocab_layout(group)
    rank, last = dist.get_rank(group), dist.get_world_size(group) - 1
    x, target, weight = make_problem(sizes, 5, {"weight": True})
    local, w_local, target = on_device(x[:, cols]), on_device(weight[cols]), on_device(target)
    hidden = on_device(torch.randn(N_ROWS, HIDDEN))
    head = on_device(torch.randn(sizes[rank], HIDDEN), requires_grad=True)
    short = N_ROWS - (rank == last)  # the last rank passes one row fewer

    def ce(x=local, t=target, **kw):
        return lambda: cross_entropy(x, t, process_group=group, impl="reference", **kw)

    rows, options = "rows", "options"  # the message says what differs
    mismatches = {
        "rows (the last rank one row short)": (ce(x=local[:short], t=target[:short]), rows),
        "rows, linear_cross_entropy": (
            lambda: linear_cross_entropy(
                hidden[:short], head, target[:short], process_group=group, impl="reference"
            ),
            rows,
        ),
        "label_smoothing on the last rank": (ce(label_smoothing=0.1 * (rank == last)), options),
        "reduction": (ce(reduction="sum" if rank == last else "mean"), options),
        "weight on rank 0 only": (ce(weight=w_local if rank == 0 else None), options),
        "softcap on the last rank": (ce(softcap=5.0 if rank == last else None), options),
        "probabilities on the last rank": (
            ce(t=torch.softmax(local, 1) if rank == last else target),
            options,
        ),
    }
    for label, (call, match) in mismatches.items():
        results.case(f"mismatch/{name}", label, expect_value_error, call, match)
    # Every rank raised after the same all_gather, so the group is still in step.
    want = oracle(x.double(), target.cpu(), weight=weight)[0]
    results.case(
        f"mismatch/{name}",
        "a matching call afterwards",
        lambda: compare("loss", ce(weight=w_local)(), want, LOSS_RTOL),
    )


def run_zero_class_cases(results, world):
    """The last rank holds no class. Each call gets its own group with a short timeout: other
    ranks left waiting in a collective fail after 2 s instead of hanging."""
    rank = dist.get_rank()
    c = 0 if rank == world - 1 else 6
    target = on_device(torch.randint(0, 6, (N_ROWS,)))
    calls = {
        "cross_entropy": lambda group: cross_entropy(
            on_device(torch.randn(N_ROWS, c)), target, process_group=group, impl="reference"
        ),
        "linear_cross_entropy": lambda group: linear_cross_entropy(
            on_device(torch.randn(N_ROWS, HIDDEN)),
            on_device(torch.randn(c, HIDDEN)),
            target,
            process_group=group,
            impl="reference",
        ),
    }
    who = "the rank with no class" if c == 0 else "the other ranks"
    for name, call in calls.items():
        dist.barrier()  # the new group connects within its timeout too: start together
        try:
            group = dist.new_group(list(range(world)), timeout=timedelta(seconds=2))
        except RuntimeError as exc:  # a very slow machine; the other ranks then time out
            results.case(f"zero_classes/{who}", name, lambda msg: [msg], f"no group: {exc}")
            continue
        results.case(f"zero_classes/{who}", name, expect_value_error, partial(call, group))


# --------------------------------------------------------------------------------------------


def main(run=None) -> None:
    """One rank: ``run(results, rank, world)`` (default :func:`run_all`) between the group's set-up
    and tear-down, its report written to OUT_DIR (tests/dist_rl_worker.py runs its own cases)."""
    global DEVICE
    device, rank, world, port, out_dir = sys.argv[1:6]
    rank, world = int(rank), int(world)
    DEVICE = torch.device(device)
    torch.set_num_threads(1)  # the ranks share a few cores
    fused_xent._alloc.POISON = True  # every output starts as NaN: an unwritten element fails
    if DEVICE.type == "cpu":
        from fused_xent.kernels import xent

        xent._launch_config = lambda n_cols, dtype: (TRITON_BLOCK, 4)
    dist.init_process_group(
        "gloo" if DEVICE.type == "cpu" else "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        # Generous: rank 0 waits here while ranks 1 and 2 run their pair. The parent's deadline
        # is what turns a hang into a failure.
        timeout=timedelta(seconds=120),
    )
    results = Results(rank)
    try:
        (run or run_all)(results, rank, world)
        dist.barrier()  # all ranks leave together, so none sees a peer's connections close
    except CaseRaised:
        status = 1
    else:
        status = 0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results.to_json(), f)
    if status == 0:
        dist.destroy_process_group()
    sys.exit(status)


def run_all(results, rank, world) -> None:
    if world != 3:
        run_matching_cases(results, dist.group.WORLD, f"world{world}", "all")
        return
    run_matching_cases(results, dist.group.WORLD, "world3", "all")
    # A group of 2 made of global ranks 1 and 2: its group ranks are not the global ranks, and
    # the slice must follow the group rank. Rank 0 sits it out.
    pair = dist.new_group([1, 2])
    if rank in (1, 2):
        run_matching_cases(results, pair, "world2", "some")
        run_mismatch_cases(results, pair, "world2")
        for impl in IMPLS:
            for reduction, z2 in (("none", 0.0), ("sum", 1e-2)):
                label = f"{impl} {reduction} lse_square_scale={z2}"
                results.case("all_inf_slice", label, all_inf_slice_case, pair, impl, reduction, z2)
    run_mismatch_cases(results, dist.group.WORLD, "world3")
    run_zero_class_cases(results, world)


if __name__ == "__main__":
    main()
