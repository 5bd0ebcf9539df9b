"""DTensor arguments (tensor parallelism, FSDP2) against the unsharded float64 result.

Gloo worlds of 2 and 3 CPU processes run ``tests/dtensor_worker.py`` (its docstring lists the
cases): logits ``Shard(1)`` with every reduction and option (class weights given whole, replicated
or sharded; probability targets sharded like the logits; z-loss, softcap, logit_scale,
return_lse, return_stats, token_weight), token log-probs ``Shard(-1)`` of (B, T, V), a
``ColwiseParallel`` LM head end to end, a ``Shard(0)`` head with replicated hidden states (no
gather), an FSDP2 ``fully_shard`` head, a 2-D (data x tensor) mesh, and the refused placements.
V = 37 is uneven over both worlds (DTensor's own cut: 19 + 18, 13 + 13 + 11).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import DEADLINE_S, check_group, free_port, spawn_world

WORKER = Path(__file__).parent / "dtensor_worker.py"


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_world(world, tmp_path):
    pytest.importorskip("torch.distributed.tensor")
    report = spawn_world("cpu", world, tmp_path, WORKER)
    check_group(report, "dtensor", range(world))
    assert min(report["dtensor"]["cases"].values()) >= 20


def test_tensor_parallel_example_dtensor():
    """examples/tensor_parallel.py --dtensor under torchrun, 2 ranks: an nn.Linear head under
    ColwiseParallel, the loss on its DTensor logits, matching the unsharded training."""
    example = WORKER.parent.parent / "examples" / "tensor_parallel.py"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(example),
        "--dtensor",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DTensor (ColwiseParallel)" in proc.stdout
    assert "sharded and unsharded match" in proc.stdout, proc.stdout[-3000:]
