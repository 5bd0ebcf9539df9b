"""The vocabulary-parallel RL outputs and training metrics against the unsharded float64 oracle.

``token_logprobs`` and ``linear_token_logprobs`` with ``process_group=``, and ``cross_entropy`` /
``linear_cross_entropy`` with ``return_stats=True`` and ``token_weight``, in real gloo process
groups spawned as in tests/test_distributed.py (one world of 3 per session, running
``python tests/dist_rl_worker.py``; see its docstring for the cases):

* a world of 3 with V = 37 in slices [13, 16, 8];
* a world of 2, slices [20, 17], made as a group of global ranks 1 and 2 (the group rank is not
  the global rank).

Every rank checks its own outputs (log p, entropy, loss, lse, stats) and its gradient slices
(logits; or the full input gradient and its rows of the head's weight and bias) against plain
torch in float64 on the whole vocabulary, and ``predicted`` exactly, with deliberate exact ties of
the maximum inside one slice and across slices (the lowest global index wins).
"""

from __future__ import annotations

import pytest
from test_distributed import HERE, check_group, spawn_once

WORKER = HERE / "dist_rl_worker.py"
WORLDS = {"world3": (0, 1, 2), "world2": (1, 2)}  # world of 2: global ranks 1 and 2


@pytest.fixture(scope="session")
def rl_world3(tmp_path_factory) -> dict:
    return spawn_once(tmp_path_factory, "dist_rl_world3", WORKER)


@pytest.mark.parametrize("world", WORLDS)
def test_token_logprobs_matches_unsharded(rl_world3, world):
    """(N, V) and (B, T, V); float32 and bfloat16; temperature 0.7 / 1 / 2; softcap and
    logit_scale; ignored positions; gradients on log p, the entropy, both; strided rows; in place;
    no_grad; an out-of-range target (NaN on the kernel path, IndexError on the reference)."""
    check_group(rl_world3, f"token_logprobs/{world}", WORLDS[world])


@pytest.mark.parametrize("world", WORLDS)
def test_linear_token_logprobs_matches_unsharded(rl_world3, world):
    """Chunk sizes that do not divide N, with and without a bias: the input gradient summed over
    the ranks, each rank's weight and bias slices."""
    check_group(rl_world3, f"linear_token_logprobs/{world}", WORLDS[world])


@pytest.mark.parametrize("world", WORLDS)
def test_cross_entropy_stats_and_token_weight_match_unsharded(rl_world3, world):
    """return_stats (with and without return_lse) and token_weight (negative and zero weights)
    on every reduction, with class weights, label smoothing, z-loss, softcap, K-dim input."""
    check_group(rl_world3, f"cross_entropy_stats/{world}", WORLDS[world])


@pytest.mark.parametrize("world", WORLDS)
def test_linear_cross_entropy_stats_and_token_weight_match_unsharded(rl_world3, world):
    check_group(rl_world3, f"linear_cross_entropy_stats/{world}", WORLDS[world])


def test_token_logprobs_signs(rl_world3):
    """log p <= 0 and entropy >= 0 on rows whose target holds p ~ 1 - 1e-9 (the target's logit
    20-30 above the rest), float32, on both paths."""
    check_group(rl_world3, "signs/world3", (0, 1, 2))


def test_token_logprobs_masked_vocabulary_on_kernels(rl_world3):
    """-inf logits (the last 3 classes, and all of slice 0 in one row) with incoming gradients
    on the entropy, on the kernel path: the gradient is 0 there, as in float64 torch. (The
    reference runs the same cases in test_token_logprobs_matches_unsharded.)"""
    check_group(rl_world3, "masked_vocab/world3", (0, 1, 2))
