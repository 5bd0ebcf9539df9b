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

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "dtensor_worker.py"
DEADLINE_S = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_world(world, tmp_path):
    pytest.importorskip("torch.distributed.tensor")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent))
    logs = [tmp_path / f"log{rank}.txt" for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        cmd = [sys.executable, str(WORKER), str(rank), str(world), str(port), str(tmp_path)]
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=out, env=env))
    deadline = time.monotonic() + DEADLINE_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the world of {world} did not finish in {DEADLINE_S} s (a hang?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tails = "\n".join(log.read_text(errors="replace")[-2000:] for log in logs)
    assert all(p.returncode == 0 for p in procs), f"a rank failed:\n{tails}"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    cases = {tuple(r["cases"]) for r in reports}
    assert len(cases) == 1, "the ranks ran different cases"
    assert len(cases.pop()) >= 20
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures[:20])


def test_tensor_parallel_example_dtensor():
    """examples/tensor_parallel.py --dtensor under torchrun, 2 ranks: an nn.Linear head under
    ColwiseParallel, the loss on its DTensor logits, matching the unsharded training."""
    example = WORKER.parent.parent / "examples" / "tensor_parallel.py"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(example),
        "--dtensor",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DTensor (ColwiseParallel)" in proc.stdout
    assert "sharded and unsharded match" in proc.stdout, proc.stdout[-3000:]
