"""The vocabulary-parallel linear forms by vocabulary slabs, their default (issue #20).

``linear_cross_entropy`` / ``linear_token_logprobs`` with ``process_group=`` (and a ``Shard(0)``
DTensor head) sweep each rank's slice of the head in vocabulary slabs, as the unsharded forms do:
the slabs' statistics merged into the slice's and combined across the ranks in the forward, the
backward recomputing each slab from the global statistics and summing the hidden-state gradient
over the ranks. In real gloo process groups spawned as in tests/test_distributed.py (one world of
3 per session running ``python tests/dist_slab_worker.py``; its docstring lists the cases):

* a world of 3 with slices [5, 8, 4], and a world of 2 ([7, 5]) made as a group of global ranks 1
  and 2; a DTensor head of 17 classes cut [6, 6, 5] over the world of 3;
* the slab size forced to 3 classes, so that every slice is several slabs with a partial last
  one, against plain torch on the whole vocabulary: in float64 on the reference at 1e-12, and in
  float32 on the interpreted kernels.
"""

from __future__ import annotations

import pytest
from test_distributed import HERE, check_group, spawn_once

WORKER = HERE / "dist_slab_worker.py"
WORLDS = {"world3": (0, 1, 2), "world2": (1, 2)}  # world of 2: global ranks 1 and 2


@pytest.fixture(scope="session")
def slab_world3(tmp_path_factory) -> dict:
    return spawn_once(tmp_path_factory, "dist_slab_world3", WORKER)


@pytest.mark.parametrize("world", WORLDS)
def test_default_sharded_forms_take_the_slabs(slab_world3, world):
    """linear_cross_entropy (every reduction, return_lse, return_stats, no_grad),
    linear_token_logprobs (and no_grad) and LinearCrossEntropyLoss with a process group sweep the
    rank's slice in slabs (forward, and backward when there is one) and never the row chunks; an
    explicit chunk_size takes the row chunks and no slab."""
    check_group(slab_world3, f"routes/{world}", WORLDS[world])


@pytest.mark.parametrize("world", WORLDS)
def test_linear_cross_entropy_slabs_match_unsharded(slab_world3, world):
    """Class-index and probability targets, class weights, label smoothing, z-loss, softcap,
    ignore_index (a real class too), token weights, return_lse and return_stats (predicted
    exact, ties inside a slab, across slabs and ranks), every reduction with a random incoming
    gradient, frozen input, no_grad: the loss, lse, stats, the full input gradient and this
    rank's weight and bias gradients."""
    check_group(slab_world3, f"linear_cross_entropy/{world}", WORLDS[world])


@pytest.mark.parametrize("world", WORLDS)
def test_linear_token_logprobs_slabs_match_unsharded(slab_world3, world):
    """log p and the entropy with gradients on either or both, temperature, softcap, (B, T, D)
    input, an ignore_index that is a real class, frozen input, no_grad."""
    check_group(slab_world3, f"linear_token_logprobs/{world}", WORLDS[world])


def test_dtensor_head_takes_the_slabs(slab_world3):
    """A Shard(0) DTensor head with replicated hidden states: the slabs (no row chunk), the
    unsharded result with every option, class-index and probability targets."""
    pytest.importorskip("torch.distributed.tensor")
    check_group(slab_world3, "dtensor/world3", WORLDS["world3"])


def test_rank_memory_within_the_slab_bound(slab_world3):
    """Each rank's peak CPU memory over forward + backward within tests/test_memory.py's bound
    for its slice of the head (the row chunks exceed it)."""
    check_group(slab_world3, "memory/world3", WORLDS["world3"])
