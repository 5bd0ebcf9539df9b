# Sourced by scripts/main.sh and scripts/test.sh: makes a Python environment that has fused_xent,
# torch, triton and the test tools. Inside an active virtualenv or conda env it installs there;
# otherwise it creates ./.venv on first use and reuses it afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
    [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        # A GPU machine: PyPI's default torch is a CUDA build and brings its matching Triton.
        python -m pip install torch
    else
        # CPU only: pin the release whose CPU build this project is tested with (see README).
        python -m pip install torch==2.13.0
    fi
fi
# hf: transformers and accelerate, so tests/test_hf.py runs (it skips itself without them).
python -m pip install -e ".[test,dev,bench,hf,trl,peft]"
