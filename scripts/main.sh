#!/usr/bin/env bash
# The main job: train (or load from .cache/) a small ResNet on Fashion-MNIST, prune half its FLOPs with FPGM
# while fine-tuning it, export it, verify soft == hard, and print the before/after table.
# Extra arguments go to examples/prune_fashion_mnist.py (e.g. --algorithm taylor --schedule oneshot; --help).
# The torchvision example stays available: .venv/bin/python examples/prune_torchvision.py --model resnet50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

own_data=no
for arg in "$@"; do
  case "$arg" in --data | --data=*) own_data=yes ;; esac
done
[ "$own_data" = yes ] || bash scripts/data.sh

export PYTHONUNBUFFERED=1  # progress lines show up at once, also through a pipe
exec .venv/bin/python examples/prune_fashion_mnist.py "$@"
