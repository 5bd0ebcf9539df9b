"""pytest-benchmark setup for ``pytest bench/``: makes ``benchlib`` importable, measures the copy
bandwidth and the matrix product rate the floors are made of.

The suite is kept out of the default ``pytest`` run (pyproject's testpaths is ``tests``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pyproject runs pytest with --import-mode=importlib, which puts no test directory on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402


@pytest.fixture(scope="session")
def device():
    dev = benchlib.default_device()
    benchlib.cpu_threads(dev)
    return dev


@pytest.fixture(scope="session")
def copy_bw(device):
    """Bytes/s of a device-to-device copy (read + write), measured once, only when asked for."""
    cache = {}

    def get() -> float:
        if "bw" not in cache:
            cache["bw"], _ = benchlib.copy_bandwidth(device)
        return cache["bw"]

    return get


@pytest.fixture(scope="session")
def matmul_rate(device):
    """Flop/s of a bf16 n^3 matrix product (8192 on CUDA), measured once, only when asked for."""
    cache = {}

    def get() -> float:
        if "rate" not in cache:
            cache["rate"], _ = benchlib.matmul_rate(device)
        return cache["rate"]

    return get
