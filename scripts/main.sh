#!/usr/bin/env bash
# Sets up the environment if needed (scripts/setup.sh), then runs the main job: python -m fused_xent.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m fused_xent "$@"
