#!/usr/bin/env bash
# Creates .venv (Python 3.11) with torch 2.14.1 / torchvision 0.29.1 and maskprune installed editable,
# with the test and docs extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, pytest, xdist, scipy, tqdm" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import maskprune.algorithms, pytest, xdist, safetensors, matplotlib, onnx, onnxruntime, onnxscript, timm, transformers, diffusers, ultralytics, material, mkdocstrings_handlers.python" 2>/dev/null \
  || [ ! -x .venv/bin/maskprune ] || [ ! -x .venv/bin/mkdocs ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,docs]"
fi
