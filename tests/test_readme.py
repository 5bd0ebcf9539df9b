"""README.md's python blocks run as written, and the paths and names it cites exist.

Every fenced ``python`` block runs on its own (a fresh namespace), top to bottom, as a reader
would paste it; on a CPU-only machine that is ``impl="auto"``'s CPU fallback. A block may be
marked by an HTML comment on the line just before its fence:

* ``<!-- readme-test: skip (REASON) -->``: not run (it needs several processes, say);
* ``<!-- readme-test: needs MODULE -->``: run only when MODULE imports.

Any other marker fails, so a typo cannot skip a block silently.
"""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^```([\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip \((.+)\)$")
_NEEDS = re.compile(r"^needs ([\w.]+)$")

# Repository paths: a top-level folder of this repository, then a path in it.
_TOP = r"(?:\.ci|bench|examples|fused_xent|kernels|scripts|tests)"
_PATH = re.compile(rf"(?<![\w./-])({_TOP}/[\w./-]*)")
# A bare file name (`tensor_parallel.py`, in a sentence naming its folder).
_FILE = re.compile(r"(?<![\w./-])([\w-]+\.(?:py|sh))(?![\w/])")
# Dotted names in the package: `fused_xent.autograd.CHUNK_BUDGET_BYTES`, `fused_xent.hf.patch`.
_NAME = re.compile(r"(?<![\w./-])(fused_xent(?:\.\w+)+)")
# What the tools write, not what the repository holds.
_GENERATED = ("bench/out",)


def _parse():
    """(code blocks, prose): blocks as (line of the opening fence, language, marker, code)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, prose, i = [], [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            prose.append(lines[i])
            i += 1
            continue
        start, body = i + 1, []  # 1-based line of the fence
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start}: the fenced block is never closed")
        i += 1
        marker = _MARKER.match(lines[start - 2]) if start >= 2 else None
        blocks.append((start, fence.group(1), marker.group(1) if marker else None, "\n".join(body)))
    return blocks, "\n".join(prose)


BLOCKS, PROSE = _parse()
PYTHON = [block for block in BLOCKS if block[1] == "python"]


def test_blocks_found():
    assert len(PYTHON) >= 5, f"only {len(PYTHON)} python blocks found in README.md"
    fenced = {start - 1 for start, *_ in BLOCKS}  # 1-based lines just before a fence
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if "readme-test" in line:
            assert _MARKER.match(line) and number in fenced, (
                f"README.md:{number}: a readme-test marker must be the line just before a fence"
            )


@pytest.mark.parametrize(
    "line, marker, code",
    [(line, marker, code) for line, _, marker, code in PYTHON],
    ids=[f"README.md:{line}" for line, *_ in PYTHON],
)
def test_python_block_runs(line, marker, code):
    if marker is not None:
        skip, needs = _SKIP.match(marker), _NEEDS.match(marker)
        if skip:
            pytest.skip(skip.group(1))
        elif needs:
            pytest.importorskip(needs.group(1))
        else:
            pytest.fail(f"README.md:{line}: unknown readme-test marker {marker!r}")
    torch.manual_seed(0)
    # Padded so that a traceback's line numbers are the README's; the name in angle brackets
    # keeps pytest from printing the whole README above the failing line.
    source = compile("\n" * line + code, "<README.md>", "exec")
    exec(source, {"__name__": "__readme__"})


def _spans() -> list[str]:
    """The text of every inline code span in the prose, and every fenced block but python's."""
    spans = re.findall(r"`([^`]+)`", PROSE)
    return spans + [code for _, language, _, code in BLOCKS if language != "python"]


def test_paths_exist():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()  # the repository's files, committed or not (outside a checkout: none)
    names = {Path(p).name for p in listed} or {p.name for p in ROOT.rglob("*") if p.is_file()}
    missing = []
    for span in _spans():
        for path in _PATH.findall(span):
            if not path.startswith(_GENERATED) and not (ROOT / path).exists():
                missing.append(path)
        for name in _FILE.findall(span):
            if name not in names:
                missing.append(name)
    assert not missing, f"README.md names files the repository lacks: {sorted(set(missing))}"


def test_package_names_exist():
    missing = []
    for span in _spans():
        for dotted in _NAME.findall(span):
            parts = dotted.split(".")
            # The longest importable module, then attributes.
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(dotted)
                break
            else:
                missing.append(dotted)
    assert not missing, f"README.md names what fused_xent does not have: {sorted(set(missing))}"
