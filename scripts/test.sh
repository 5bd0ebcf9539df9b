#!/usr/bin/env bash
# Sets up the environment if needed (scripts/setup.sh), then runs the test suite and a short,
# untimed pass over the benchmarks. Without a GPU the Triton kernels run under TRITON_INTERPRET=1
# (tests/conftest.py sets it). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -n "${FUSED_XENT_TEST_WORKERS:-2}" tests bench --benchmark-disable "$@"
