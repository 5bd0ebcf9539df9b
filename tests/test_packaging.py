"""The repository's top-level ``kernels/`` folder (installed as ``fused_xent.kernels``) must never
answer to the plain name ``kernels`` when the repository root is on ``sys.path`` (pytest and
``python -m`` run from the root put it there): transformers >= 5.25 imports PyPI's ``kernels``,
and a shadowed one broke ``fused_xent.hf`` on a fresh clone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(ROOT, "kernels", "__init__.py")


def _run_from_root(code: str) -> str:
    """``python -c code`` with the repository root first on sys.path, as pytest has it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_plain_kernels_is_never_the_repository_folder():
    got = _run_from_root(
        """
        import importlib.util, sys
        assert sys.path[0] == "", sys.path[:2]  # the root (cwd) comes first
        installed = None
        for p in sys.path[1:]:
            spec = importlib.machinery.PathFinder.find_spec("kernels", [p]) if p else None
            if spec is not None:
                installed = spec.origin
                break
        try:
            import kernels
        except ModuleNotFoundError:
            print("absent", installed)
        else:
            print("imported", kernels.__file__, installed)
        """
    )
    kind, *files = got.split()
    if kind == "absent":
        assert files == ["None"], f"an installed kernels exists ({files}) but did not import"
    else:
        imported, installed = files
        assert os.path.realpath(imported) != os.path.realpath(OURS)
        assert os.path.realpath(imported) == os.path.realpath(installed)


def test_package_kernels_still_import_from_the_root():
    got = _run_from_root(
        """
        import fused_xent.kernels as k, sys
        print(k.__name__, k.__file__, "kernels" in sys.modules)
        """
    )
    name, path, _ = got.split()
    assert name == "fused_xent.kernels"
    assert os.path.realpath(path) == os.path.realpath(OURS)


def test_transformers_imports_with_the_root_on_the_path():
    pytest.importorskip("transformers")
    got = _run_from_root(
        """
        import fused_xent.hf, transformers
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg)
        fused_xent.hf.patch(model)
        print("ok", transformers.__version__)
        """
    )
    assert got.startswith("ok")
