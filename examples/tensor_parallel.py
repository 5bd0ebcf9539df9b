"""A tensor-parallel LM head: the vocabulary split across ranks, the loss from fused_xent.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py            # process_group=
    torchrun --nproc_per_node 2 examples/tensor_parallel.py --dtensor  # torch's DTensor TP

Each rank holds a contiguous slice of the vocabulary, in rank order: its rows of the LM head's
weight and bias (503 and 497 of the 1000 tokens here; slices need not be equal). The layers below
the head and the hidden states are replicated. ``fused_xent.linear_cross_entropy(hidden,
linear_weight, target, linear_bias=..., process_group=group)`` (torch's signature, with this
rank's slice of the head as ``linear_weight``) returns on every rank the loss over the whole
vocabulary, the gradient of that rank's rows of the head, and the full gradient of the hidden
states (summed over the ranks), so the replicated layers get the same update on every rank and
stay in step without any further communication. No rank ever holds logits over the whole
vocabulary: only over its own slice, ``chunk_size`` rows at a time.

The task is synthetic: the next token is ``(7 * token + 3) % VOCAB`` nine times in ten, a random
token otherwise. Rank 0 also trains the same model unsharded in plain PyTorch (``F.linear`` and
``F.cross_entropy``) from the same initial weights on the same batches, prints both losses at
every step, and exits with status 1 if they differ by more than 1e-5 (relative), or the trained
weights by more than 1e-4 (float32 rounding differences compound over the steps).

With ``--dtensor`` the head is an ``nn.Linear`` under torch's own tensor parallelism,
``parallelize_module(head, mesh, ColwiseParallel(output_layouts=Shard(-1),
use_local_output=False))``: its weight and bias are DTensors sharded by DTensor's rule (500 and
500 rows), its output is the logits as a DTensor sharded on the vocabulary, and the loss is just
``fused_xent.cross_entropy(logits, follows, label_smoothing=...)``, which runs the same
vocabulary-parallel path on the local shards and returns a replicated DTensor.

Runs on the CPU with the gloo backend (the loss then takes fused_xent's PyTorch path), or on
CUDA with nccl (the Triton kernels), one GPU per rank.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fused_xent

VOCAB = 1000
DIM = 32
STEPS = 12
BATCH = 512  # tokens per step
LR = 2.0
LABEL_SMOOTHING = 0.1  # over the whole vocabulary, sharded or not
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4


def vocab_slices(vocab: int, world: int, skew: int = 3) -> list[int]:
    """Slice sizes in rank order: as even as possible, then ``skew`` tokens moved from the last
    rank to the first, to show that the slices need not be equal (1000 over 2: 503 and 497)."""
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    if world > 1:
        sizes[0] += skew
        sizes[-1] -= skew
    return sizes


def init_params(device: torch.device) -> dict[str, torch.Tensor]:
    """The whole model, the same on every rank (seeded). A real tensor-parallel model would
    create only its own rows of the head; here the whole head exists so that rank 0 can train
    the unsharded replica from the same start."""
    gen = torch.Generator().manual_seed(0)
    params = {
        "embed": torch.randn(VOCAB, DIM, generator=gen),
        "proj": torch.randn(DIM, DIM, generator=gen) * DIM**-0.5,
        "head": torch.randn(VOCAB, DIM, generator=gen) * DIM**-0.5,
        "head_bias": torch.zeros(VOCAB),
    }
    return {name: p.to(device) for name, p in params.items()}


def batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, next tokens), the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH,), generator=gen)
    noise = torch.randint(0, VOCAB, (BATCH,), generator=gen)
    follows = torch.where(torch.rand(BATCH, generator=gen) < 0.9, (7 * tokens + 3) % VOCAB, noise)
    return tokens.to(device), follows.to(device)


def hidden_states(params, tokens):
    """The replicated part of the model: embedding, then one layer."""
    return torch.tanh(params["embed"][tokens] @ params["proj"])


def sgd_step(params) -> None:
    with torch.no_grad():
        for p in params.values():
            p -= LR * p.grad
            p.grad = None


def dtensor_head(full, device):
    """The head as an nn.Linear (the whole weights, from ``full``) under ColwiseParallel: its
    parameters become DTensors sharded on the vocabulary, its output Shard(-1) logits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    head = torch.nn.Linear(DIM, VOCAB).to(device)
    with torch.no_grad():
        head.weight.copy_(full["head"])
        head.bias.copy_(full["head_bias"])
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    plan = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return parallelize_module(head, mesh, plan)


def main() -> int:
    use_dtensor = "--dtensor" in sys.argv[1:]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun gives rank, world, address
    group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    sizes = vocab_slices(VOCAB, world)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    full = init_params(device)
    # The sharded model: replicated embedding and projection, this rank's rows of the head.
    sharded = {name: p.clone() for name, p in full.items() if name in ("embed", "proj")}
    head = None
    if use_dtensor:
        head = dtensor_head(full, device)
        sharded["head"], sharded["head_bias"] = head.weight, head.bias
        sizes = [VOCAB // world + (r < VOCAB % world) for r in range(world)]  # DTensor's cut
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    else:
        sharded["head"] = full["head"][mine].clone()
        sharded["head_bias"] = full["head_bias"][mine].clone()
    replica = {name: p.clone() for name, p in full.items()} if rank == 0 else None
    for p in [*sharded.values(), *(replica or {}).values()]:
        p.requires_grad_()
    if rank == 0:
        how = "DTensor (ColwiseParallel)" if use_dtensor else "process_group="
        print(
            f"vocabulary {VOCAB} over {world} ranks: slices {sizes} ({how}); hidden {DIM}; {device}"
        )

    worst_loss = 0.0
    for step in range(STEPS):
        tokens, follows = batch(step, device)
        if use_dtensor:
            logits = head(hidden_states(sharded, tokens))  # a DTensor, Shard(-1)
            loss = fused_xent.cross_entropy(logits, follows, label_smoothing=LABEL_SMOOTHING)
            loss.backward()
            loss = loss.to_local()  # replicated: every rank's copy is the whole loss
        else:
            loss = fused_xent.linear_cross_entropy(
                hidden_states(sharded, tokens),
                sharded["head"],
                follows,
                linear_bias=sharded["head_bias"],
                label_smoothing=LABEL_SMOOTHING,
                process_group=group,
            )
            loss.backward()
        sgd_step(sharded)
        # Every rank holds the same loss; check that too.
        losses = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        spread = float(torch.stack(losses).max() - torch.stack(losses).min())
        if rank == 0:
            logits = F.linear(hidden_states(replica, tokens), replica["head"], replica["head_bias"])
            want = F.cross_entropy(logits, follows, label_smoothing=LABEL_SMOOTHING)
            want.backward()
            sgd_step(replica)
            diff = abs(loss.item() - want.item()) / abs(want.item())
            worst_loss = max(worst_loss, diff, spread / abs(want.item()))
            print(
                f"step {step:2d}  sharded {loss.item():.7f}  unsharded {want.item():.7f}  "
                f"rel diff {diff:.1e}  spread over ranks {spread:.1e}"
            )

    ok = True
    if rank == 0:
        # After training, rank 0's rows of the head and the replicated layers match the replica.
        worst_weight = 0.0
        for name, p in sharded.items():
            if use_dtensor and name.startswith("head"):
                p = p.to_local()  # this rank's rows, as DTensor cut them
            want = replica[name].detach()
            want = want[mine] if name.startswith("head") else want
            err = float((p.detach() - want).norm() / want.norm().clamp_min(1e-30))
            worst_weight = max(worst_weight, err)
            print(f"after {STEPS} steps, {name} rel diff {err:.1e}")
        ok = worst_loss <= LOSS_RTOL and worst_weight <= WEIGHT_RTOL
        print(
            f"sharded and unsharded {'match' if ok else 'DIFFER'}: worst rel diff of the loss "
            f"{worst_loss:.1e} (tolerance {LOSS_RTOL}), of the weights {worst_weight:.1e} "
            f"(tolerance {WEIGHT_RTOL})"
        )
    # Every rank's collectives done before the group goes: a rank that tears down gloo while
    # another's last all-reduce is in flight can abort at exit.
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
