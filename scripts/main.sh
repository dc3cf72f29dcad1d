#!/usr/bin/env bash
# The main job: prune a torchvision model one shot, export it, verify soft == hard, print the table.
# Extra arguments go to examples/prune_torchvision.py (e.g. --model mobilenet_v2 --ratio 0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/prune_torchvision.py "$@"
