#!/usr/bin/env bash
# The peers' wheels for the GPU check, fetched here (the device machine has no network) into
# DIR (default bench/wheels, ignored by git): carry DIR to the device and scripts/gpu_check.sh
# installs them with --no-index --no-deps. Pure-Python wheels only: Liger-Kernel,
# cut-cross-entropy and TRL (without transformers on the device, the bench runs TRL's fused head
# from the wheel's own kernel file: bench/benchlib.py's _trl_head_files). QuACK needs nvidia-cutlass-dsl (a large binary wheel) and
# flash-attention's cross-entropy comes inside its CUDA build: neither is fetched.
#
#   bash scripts/peer_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR="${1:-bench/wheels}"
mkdir -p "$DIR"
PY="${PYTHON:-python3}"
"$PY" -m pip download --no-deps --only-binary=:all: -d "$DIR" \
    liger-kernel cut-cross-entropy "trl>=1.16,<1.17"
ls -la "$DIR"
