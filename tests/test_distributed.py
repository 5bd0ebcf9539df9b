"""The vocabulary-parallel loss (``process_group=``) against the unsharded float64 oracle.

Real process groups: gloo on the CPU, one process per rank, spawned from here as
``python tests/dist_worker.py`` (which holds the cases, the oracle and the comparisons; see its
docstring). Starting a process costs seconds (importing torch), so one world of three processes
runs every case once per test session, and the tests below assert on its report:

* a world of 3 with slices [4, 9, 3]: the middle rank largest and the last smallest, so no
  offset is rank * C_local, and 9 classes cross a block boundary of the (forced, 8) Triton block;
* a world of 2, slices [7, 5], made as a group of global ranks 1 and 2: the group rank is not the
  global rank, so a slice placed by the global rank would be wrong.

Every option (class weights, label smoothing, probability targets, ignored rows and an
ignore_index that is a real class, z-loss, softcap, logit_scale, return_lse, inplace_backward,
K-dim and unbatched input, no_grad) runs with every reduction and a random incoming gradient on
the reference; on the Triton path (interpreted: about a second a case) the world of 3 runs every
option set with one reduction, in turn, and both worlds the cases with every option at once with
all three. Checked against plain torch in float64, at 1e-5 (fp32): the loss and the lse on every
rank, each rank's slice of the logits gradient, and for linear_cross_entropy the full hidden
gradient and the slices of the weight and bias gradients. Ranks that disagree get a ValueError
on every rank. A hang fails: the workers' process groups time out, and the spawn has a deadline.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"
EXAMPLE = HERE.parent / "examples" / "tensor_parallel.py"
DEADLINE_S = 300  # a bound, not an estimate: the world of 3 takes under a minute on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    return f"--- {path.name} ---\n{text[-n:]}"


def spawn_world(device: str, world: int, out_dir: Path, worker: Path = WORKER) -> dict:
    """Run ``worker`` on ``world`` ranks; returns, per group of cases, {"cases": {rank: n},
    "failures": [...]}. Fails the test on a crash or past the deadline."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if device != "cpu":  # the workers set it for the CPU; on CUDA the kernels are compiled
        env.pop("TRITON_INTERPRET", None)
    logs = [out_dir / f"log{rank}.txt" for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        args = [worker, device, rank, world, port, out_dir]
        with open(log, "w") as out:
            cmd = [sys.executable, *map(str, args)]
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=out, env=env))
    deadline = time.monotonic() + DEADLINE_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the world of {world} did not finish within {DEADLINE_S} s (a hang?)\n"
            + "\n".join(map(_tail, logs))
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = [out_dir / f"rank{rank}.json" for rank in range(world)]
    reports = [json.loads(path.read_text()) for path in reports if path.exists()]
    if any(proc.returncode != 0 for proc in procs):
        # A case raised on some rank (its report says which), and the ranks stopped.
        failures = [
            failure
            for report in reports
            for group in report["groups"].values()
            for failure in group["failures"]
        ]
        pytest.fail(
            f"a rank stopped, exit codes {[proc.returncode for proc in procs]}\n"
            + "\n".join(failures[-10:] + [_tail(log) for log in logs])
        )
    merged: dict[str, dict] = {}
    for report in reports:
        rank = str(report["rank"])  # str: the keys go through JSON
        for name, entry in report["groups"].items():
            group = merged.setdefault(name, {"cases": {}, "failures": [], "seconds": {}})
            group["cases"][rank] = entry["cases"]
            group["seconds"][rank] = round(entry["seconds"], 2)
            group["failures"] += entry["failures"]
    return merged


def spawn_once(tmp_path_factory, name: str, worker: Path = WORKER, world: int = 3) -> dict:
    """The report of a world of ``world`` ranks running ``worker``, made once per session: under
    pytest-xdist the first worker to ask spawns it while the others wait on a lock and read its
    report."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    report = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not report.exists():
            out_dir = tmp_path_factory.mktemp(name)
            try:
                result = {"groups": spawn_world("cpu", world, out_dir, worker)}
            except BaseException as exc:  # pytest.fail: the other workers fail the same way
                result = {"error": str(exc)}
                report.write_text(json.dumps(result))
                raise
            report.write_text(json.dumps(result))
    result = json.loads(report.read_text())
    if "error" in result:
        pytest.fail(result["error"])
    return result["groups"]


@pytest.fixture(scope="session")
def world3(tmp_path_factory) -> dict:
    """The report of the world of 3 (tests/dist_worker.py), made once per session."""
    return spawn_once(tmp_path_factory, "dist_world3")


def check_group(report: dict, name: str, ranks) -> None:
    """Every rank of the group ran the same cases (at least one), and none failed."""
    assert name in report, f"no case of {name!r} ran; the report has {sorted(report)}"
    cases = report[name]["cases"]
    assert sorted(cases) == sorted(map(str, ranks)), f"ranks that ran {name}: {sorted(cases)}"
    counts = set(cases.values())
    assert len(counts) == 1 and counts.pop() > 0, f"ranks ran different numbers of cases: {cases}"
    failures = report[name]["failures"]
    assert not failures, f"{len(failures)} failed checks:\n" + "\n".join(failures)


WORLDS = {"world3": (0, 1, 2), "world2": (1, 2)}  # world of 2: global ranks 1 and 2


@pytest.mark.parametrize("world", WORLDS)
def test_cross_entropy_matches_unsharded(world3, world):
    check_group(world3, f"cross_entropy/{world}", WORLDS[world])


@pytest.mark.parametrize("world", WORLDS)
def test_linear_cross_entropy_matches_unsharded(world3, world):
    check_group(world3, f"linear_cross_entropy/{world}", WORLDS[world])


@pytest.mark.parametrize("world", WORLDS)
def test_disagreeing_ranks_raise_on_every_rank(world3, world):
    """N, reduction, options, weight or target kind differing on one rank: ValueError on every
    rank (not a hang), and the group still works afterwards."""
    check_group(world3, f"mismatch/{world}", WORLDS[world])


def test_rank_without_classes_raises(world3):
    check_group(world3, "zero_classes/the rank with no class", (2,))


def test_rank_without_classes_raises_on_every_rank(world3):
    check_group(world3, "zero_classes/the other ranks", (0, 1))


def test_slice_of_all_inf_logits_adds_nothing(world3):
    check_group(world3, "all_inf_slice", (1, 2))


@pytest.mark.requires_cuda
def test_world_of_one_on_cuda(tmp_path):
    """nccl, a single rank holding the whole vocabulary, the real launch table."""
    report = spawn_world("cuda", 1, tmp_path)
    check_group(report, "cross_entropy/world1", (0,))
    check_group(report, "linear_cross_entropy/world1", (0,))


def test_tensor_parallel_example():
    """examples/tensor_parallel.py under torchrun, 2 ranks: it exits 0 when the sharded and the
    unsharded training agree."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(EXAMPLE),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=DEADLINE_S
        )
    except subprocess.TimeoutExpired as exc:
        output = [o.decode() if isinstance(o, bytes) else o or "" for o in (exc.stdout, exc.stderr)]
        pytest.fail(f"the example did not finish within {DEADLINE_S} s:\n" + "".join(output))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded and unsharded match" in proc.stdout, proc.stdout[-3000:]
