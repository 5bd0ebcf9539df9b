"""Shared set-up for the fused_xent tests.

Without CUDA the Triton kernels run on CPU tensors under Triton's interpreter, which is chosen when
``fused_xent.kernels`` is first imported; so the environment variable is set here, at import time,
before any test module can import the kernels.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Test modules import the shared oracle and tolerances from tests/helpers.py; pytest runs with
# --import-mode=importlib, which does not put this folder on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))

from helpers import SMALL_BLOCK  # noqa: E402

import fused_xent._alloc  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output the package allocates starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(fused_xent._alloc, "POISON", True)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small_blocks(monkeypatch) -> int:
    """Force BLOCK = SMALL_BLOCK in every launch, so tiny rows cross block boundaries.

    Also shrinks the gradient-scaling kernel's block and grid, so that kernel loops over several
    column blocks and several rows per program at sizes the interpreter runs quickly.
    """
    from fused_xent.kernels import xent

    monkeypatch.setattr(xent, "_launch_config", lambda n_cols, dtype: (SMALL_BLOCK, 4))
    return SMALL_BLOCK


@pytest.fixture(scope="module")
def transformers_quiet_one_thread():
    """transformers' config warnings off; one intra-op thread (faster when `pytest -n 2` shares
    two cores, and the same numbers every run). For the modules that build transformers models
    (test_hf.py, test_trl.py), which use it autouse."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def pytest_report_header(config):
    """The versions this run tested, first in CI's log (the ranges float: README, "Tested with")."""
    from importlib import metadata

    names = ("torch", "triton", "transformers", "accelerate", "kernels", "trl", "peft",
             "datasets", "hypothesis", "numpy")  # fmt: skip
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return "fused_xent tested with: " + ", ".join(found)
