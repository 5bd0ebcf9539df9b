"""Triton kernels of fused_xent (installed as ``fused_xent.kernels``). Imports Triton.

This folder sits at the top of the repository (the project's layout), so whenever the
repository root is on ``sys.path`` (pytest, ``python -m ...`` run from the root) it could be
imported as a top-level package named plain ``kernels`` and shadow an installed distribution of
that name (PyPI's ``kernels``, which transformers >= 5.25 imports). It must never answer to that
name: imported as ``kernels`` it hands the name over to the installed package found elsewhere on
``sys.path``, or fails as if absent (``ModuleNotFoundError``).
"""

if __name__ != "fused_xent.kernels":

    def _hand_over(name: str) -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(name, paths)
        if spec is None or spec.loader is None:
            del sys.modules[name]
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        module = importlib.util.module_from_spec(spec)
        # The import system returns sys.modules[name] after this file runs: the installed one.
        sys.modules[name] = module
        spec.loader.exec_module(module)

    _hand_over(__name__)
