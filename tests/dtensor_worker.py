"""One rank of the DTensor worlds that tests/test_dtensor.py spawns; not a test module.

Run as ``python tests/dtensor_worker.py DEVICE RANK WORLD PORT OUT_DIR`` (the ``spawn_world`` of
tests/test_distributed.py). Every rank builds the same problem from a seed, computes the
unsharded float64 result with plain torch, runs fused_xent on DTensors (logits ``Shard``ed on the
classes, a ``ColwiseParallel`` head, a ``Shard(0)`` head with replicated hidden states, an FSDP2
head, a 2-D mesh) and compares. Checks never raise between collectives: each failure is recorded,
and ``OUT_DIR/rank<R>.json`` reports, in dist_worker.py's format (one group, "dtensor"), how many
cases ran and what failed, for the parent to assert on.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.argv[1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before fused_xent.kernels is imported

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import rel_err  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import (  # noqa: E402
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)

import fused_xent  # noqa: E402

V = 37  # uneven over 2 (19, 18) and 3 (13, 13, 11) ranks, as DTensor's Shard cuts it
N, D = 6, 8
TOL = 2e-5  # float32 against float64, relative


class Report:
    def __init__(self) -> None:
        self.cases: list[str] = []
        self.failures: list[str] = []

    def check(self, case: str, what: str, got, want, tol=TOL) -> None:
        try:
            if isinstance(got, DTensor):
                got = got.full_tensor()
            if got.dtype == torch.int64:
                ok = torch.equal(got, want)
                err = "differs"
            else:
                err = rel_err(got, want)
                ok = err <= tol
            if not ok:
                self.failures.append(f"{case}: {what}: {err}")
        except Exception as exc:  # noqa: BLE001 - recorded, not raised: the ranks stay in step
            self.failures.append(f"{case}: {what}: {type(exc).__name__}: {exc}")

    def run(self, case: str, fn) -> None:
        self.cases.append(case)
        try:
            fn(case)
        except Exception:  # noqa: BLE001
            self.failures.append(f"{case}: raised\n{traceback.format_exc()}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(seed, shape=(N, V)):
    x = (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * 3).float()
    t = torch.randint(0, V, shape[:-1], generator=_gen(seed + 1))
    t.view(-1)[1] = -100
    return x, t


def _oracle_ce(x, t, reduction, weight=None, token_weight=None, **kw):
    """(loss, d loss / d x) in float64 for a random incoming gradient of seed 99."""
    x64 = x.double().requires_grad_()
    z = x64 * kw.pop("logit_scale", 1.0)
    if kw.get("softcap") is not None:
        cap = kw.pop("softcap")
        z = cap * torch.tanh(z / cap)
    kw.pop("softcap", None)
    z2 = kw.pop("lse_square_scale", 0.0)
    w64 = None if weight is None else weight.double()
    t64 = t.double() if t.is_floating_point() else t
    rows = F.cross_entropy(z, t64, w64, reduction="none", **kw)
    kept = torch.ones_like(rows, dtype=torch.bool) if t.is_floating_point() else t != -100
    if z2:
        rows = rows + z2 * torch.where(kept, torch.logsumexp(z, 1) ** 2, 0.0)
    if token_weight is not None:
        rows = rows * token_weight.double()
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    elif t.is_floating_point():
        loss = rows.sum() / len(rows)
    else:
        den = kept.sum() if w64 is None else w64[t[kept]].sum()
        loss = rows.sum() / den
    g = torch.randn(loss.shape, generator=_gen(99), dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, x64, g)
    return loss.detach(), grad, g


CE_CASES = {
    "plain": {},
    "smooth+weight": {"label_smoothing": 0.1, "weight": "plain"},
    "weight-replicated": {"weight": "replicate"},
    "weight-sharded": {"weight": "shard"},
    "prob-sharded": {"prob": True},
    "zloss+softcap+scale": {"lse_square_scale": 1e-3, "softcap": 5.0, "logit_scale": 1.3},
    "token_weight": {"token_weight": True},
}


def run_cross_entropy(rep: Report, mesh, impls) -> None:
    for impl in impls:
        for name in CE_CASES:
            for reduction in ("mean", "sum", "none"):

                def case(label, name=name, reduction=reduction, impl=impl):
                    spec = CE_CASES[name]
                    x, t = _problem(len(label))
                    kw = {k: v for k, v in spec.items() if k not in ("weight", "prob")}
                    weight = tw = None
                    if spec.get("weight"):
                        weight = torch.rand(V, generator=_gen(5)) + 0.5
                    if spec.get("prob"):
                        t = torch.softmax(torch.randn(N, V, generator=_gen(6)), 1)
                    if kw.pop("token_weight", False):
                        tw = torch.randn(N, generator=_gen(7))
                    want, want_grad, g = _oracle_ce(x, t, reduction, weight, tw, **dict(kw))
                    xd = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_()
                    td = distribute_tensor(t, mesh, [Shard(1)]) if spec.get("prob") else t
                    wd = weight
                    if spec.get("weight") == "replicate":
                        wd = distribute_tensor(weight, mesh, [Replicate()])
                    elif spec.get("weight") == "shard":
                        wd = distribute_tensor(weight, mesh, [Shard(0)])
                    loss, lse, stats = fused_xent.cross_entropy(
                        xd, td, wd, reduction=reduction, token_weight=tw, return_lse=True,
                        return_stats=True, impl=impl, **kw,
                    )  # fmt: skip
                    ok_type = isinstance(loss, DTensor) and loss.placements == (Replicate(),)
                    if not ok_type:
                        rep.failures.append(f"{label}: loss is not a replicated DTensor")
                    rep.check(label, "loss", loss, want)
                    gd = DTensor.from_local(g.float(), mesh, [Replicate()], run_check=False)
                    loss.backward(gd)
                    if xd.grad.placements != (Shard(1),):
                        rep.failures.append(f"{label}: gradient placements {xd.grad.placements}")
                    rep.check(label, "grad", xd.grad, want_grad)
                    z = x.double() * kw.get("logit_scale", 1.0)
                    if kw.get("softcap"):
                        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
                    rep.check(label, "lse", lse, torch.logsumexp(z, 1))
                    rep.check(label, "stats.lse", stats.lse, torch.logsumexp(z, 1))
                    ent = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
                    rep.check(label, "entropy", stats.entropy, ent)
                    rep.check(label, "predicted", stats.predicted, z.argmax(1))

                rep.run(f"ce/{impl}/{name}/{reduction}", case)


def _oracle_logprobs(z64, t):
    logsm = torch.log_softmax(z64, -1)
    kept = t != -100
    logp = logsm.gather(-1, torch.where(kept, t, 0)[..., None])[..., 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    return torch.where(kept, logp, 0.0), torch.where(kept, ent, 0.0)


def run_token_logprobs(rep: Report, mesh, impls) -> None:
    for impl in impls:

        def case(label, impl=impl):
            x, t = _problem(11, (2, 3, V))
            x64 = x.double().requires_grad_()
            want_lp, want_ent = _oracle_logprobs(x64 / 0.7, t)
            g1, g2 = (torch.randn(2, 3, generator=_gen(s), dtype=torch.float64) for s in (1, 2))
            (want_grad,) = torch.autograd.grad((want_lp * g1 + want_ent * g2).sum(), x64)
            xd = distribute_tensor(x.clone(), mesh, [Shard(2)]).requires_grad_()
            lp, ent = fused_xent.token_logprobs(
                xd, t, temperature=0.7, return_entropy=True, impl=impl
            )
            rep.check(label, "logp", lp, want_lp)
            rep.check(label, "entropy", ent, want_ent)
            # The outputs are replicated DTensors; a caller mixing them with plain tensors
            # takes their local copies (differentiable).
            loss = (lp.to_local() * g1.float()).sum() + (ent.to_local() * g2.float()).sum()
            loss.backward()
            rep.check(label, "grad", xd.grad, want_grad)

        rep.run(f"logprobs/{impl}", case)


def _head(seed, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, V, bias=bias)


def run_linear(rep: Report, mesh, impls) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    for impl in impls:

        def colwise(label, impl=impl):
            """parallelize_module on an LM head, the loss on its Shard(-1) logits."""
            head, ref = _head(3), _head(3)
            tp = parallelize_module(
                head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
            )
            h, t = torch.randn(2, 3, D, generator=_gen(4)), _problem(12, (2, 3, V))[1]
            logits = tp(h)
            loss = fused_xent.cross_entropy(logits.flatten(0, 1), t.flatten(), impl=impl)
            loss.backward()
            want = F.cross_entropy(ref(h).flatten(0, 1), t.flatten())
            want.backward()
            rep.check(label, "loss", loss, want.detach().double())
            rep.check(label, "weight grad", tp.weight.grad, ref.weight.grad.double(), 1e-5)
            rep.check(label, "bias grad", tp.bias.grad, ref.bias.grad.double(), 1e-5)

        def shard0(label, impl=impl):
            """A Shard(0) head with replicated hidden states: vocabulary-parallel, no gather."""
            ref = _head(5)
            h, t = torch.randn(N, D, generator=_gen(8)), _problem(13)[1]
            w = distribute_tensor(ref.weight.detach().clone(), mesh, [Shard(0)]).requires_grad_()
            b = distribute_tensor(ref.bias.detach().clone(), mesh, [Shard(0)]).requires_grad_()
            hd = distribute_tensor(h.clone(), mesh, [Replicate()]).requires_grad_()
            loss, stats = fused_xent.linear_cross_entropy(
                hd, w, t, linear_bias=b, reduction="sum", return_stats=True, chunk_size=4,
                impl=impl,
            )  # fmt: skip
            loss.backward()
            h64 = h.double().requires_grad_()
            w64, b64 = ref.weight.detach().double().requires_grad_(), ref.bias.detach().double()
            b64.requires_grad_()
            z = F.linear(h64, w64, b64)
            want = F.cross_entropy(z, t, reduction="sum")
            want.backward()
            rep.check(label, "loss", loss, want.detach())
            rep.check(label, "stats.predicted", stats.predicted, z.argmax(1))
            rep.check(label, "input grad", hd.grad, h64.grad)
            rep.check(label, "weight grad", w.grad, w64.grad)
            rep.check(label, "bias grad", b.grad, b64.grad)
            if w.grad.placements != (Shard(0),) or hd.grad.placements != (Replicate(),):
                rep.failures.append(f"{label}: placements {w.grad.placements} {hd.grad.placements}")
            # the log-probs from the same head
            hd.grad = None
            lp, ent = fused_xent.linear_token_logprobs(
                hd, w.detach(), t, linear_bias=b.detach(), return_entropy=True, chunk_size=4,
                impl=impl,
            )  # fmt: skip
            h64.grad = None
            want_lp, want_ent = _oracle_logprobs(F.linear(h64, w64.detach(), b64.detach()), t)
            (want_grad,) = torch.autograd.grad((want_lp + want_ent).sum(), h64)
            (lp.sum() + ent.sum()).backward()
            rep.check(label, "logp", lp, want_lp.detach())
            rep.check(label, "entropy", ent, want_ent.detach())
            rep.check(label, "logprob input grad", hd.grad, want_grad)

        rep.run(f"colwise/{impl}", colwise)
        rep.run(f"shard0/{impl}", shard0)


def run_fsdp(rep: Report, mesh, rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    def case(label):
        """A fully_shard head outside its forward, with each rank's own batch: gathered, the
        gradient averaged over the ranks (FSDP2's default)."""
        head, ref = _head(6, bias=False), _head(6, bias=False)
        fully_shard(head, mesh=mesh)
        t = _problem(14)[1]
        h = torch.randn(N, D, generator=_gen(20 + rank))
        loss = fused_xent.linear_cross_entropy(h, head.weight, t)
        loss.backward()
        if isinstance(loss, DTensor):
            rep.failures.append(f"{label}: a data-parallel loss came back as a DTensor")
        grads = []
        for r in range(world):
            ref.zero_grad()
            hr = torch.randn(N, D, generator=_gen(20 + r))
            F.cross_entropy(ref(hr), t).backward()
            grads.append(ref.weight.grad.double())
        want = F.cross_entropy(ref(h), t)
        rep.check(label, "loss", loss, want.detach().double())
        rep.check(label, "weight grad (mean over ranks)", head.weight.grad, sum(grads) / world)

    rep.run("fsdp2", case)


def run_mesh2d(rep: Report, world: int) -> None:
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data", "tensor"))

    def case(label):
        x, t = _problem(15)
        want, want_grad, g = _oracle_ce(x, t, "none")
        xd = distribute_tensor(x.clone(), mesh, [Replicate(), Shard(1)]).requires_grad_()
        loss = fused_xent.cross_entropy(xd, t, reduction="none")
        loss.backward(DTensor.from_local(g.float(), mesh, [Replicate(), Replicate()]))
        rep.check(label, "loss", loss, want)
        rep.check(label, "grad", xd.grad, want_grad)

    rep.run("mesh2d", case)


def run_refusals(rep: Report, mesh) -> None:
    x, t = _problem(16)

    def expect(label, fn, match):
        try:
            fn()
        except ValueError as exc:
            if match not in str(exc):
                rep.failures.append(f"{label}: message {exc!r} lacks {match!r}")
        else:
            rep.failures.append(f"{label}: no ValueError")

    def case(label):
        batch = distribute_tensor(x.clone(), mesh, [Shard(0)])
        expect(label + "/batch", lambda: fused_xent.cross_entropy(batch, t), "S(0)")
        partial = DTensor.from_local(x.clone(), mesh, [Partial()], run_check=False)
        expect(label + "/partial", lambda: fused_xent.cross_entropy(partial, t), "partial")
        vocab = distribute_tensor(x.clone(), mesh, [Shard(1)])
        group = dist.group.WORLD
        expect(
            label + "/group",
            lambda: fused_xent.cross_entropy(vocab, t, process_group=group),
            "process_group",
        )
        # replicated DTensors run as plain tensors
        rep_x = distribute_tensor(x.clone(), mesh, [Replicate()])
        loss = fused_xent.cross_entropy(rep_x, t)
        rep.check(label, "replicated", loss, F.cross_entropy(x.double(), t))

    rep.run("refusals", case)


def main() -> None:
    start = time.monotonic()
    rank, world, port, out_dir = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    rep = Report()
    # The reference everywhere; the interpreted kernels (slow) on a subset.
    run_cross_entropy(rep, mesh, ("reference",))
    run_token_logprobs(rep, mesh, ("reference", "triton"))
    run_linear(rep, mesh, ("reference", "triton") if world == 2 else ("reference",))
    run_fsdp(rep, mesh, rank, world)
    run_mesh2d(rep, world)
    run_refusals(rep, mesh)
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        group = {"cases": len(rep.cases), "failures": rep.failures}
        group["seconds"] = time.monotonic() - start
        json.dump({"rank": rank, "groups": {"dtensor": group}}, f)


if __name__ == "__main__":
    main()
