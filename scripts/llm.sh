#!/usr/bin/env bash
# The language-model example: installs Debian's python3-doc (the corpus: the reST sources of Python's
# documentation) when it is missing, then trains (or reads from .cache/llm/) a small Llama and removes a
# quarter of its parameters by width, by depth and by both, with each criterion; the table goes to
# benchmarks/results/prune_llm.md. Extra arguments go to examples/prune_llm.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

CORPUS=/usr/share/doc/python3/html/_sources
if ! compgen -G "$CORPUS/*.txt" >/dev/null; then
  echo "the corpus is not in $CORPUS: installing the Debian package python3-doc" >&2
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null; then
    SUDO=(sudo)
  else
    echo "error: not root and no sudo: run 'apt-get install python3-doc' as root, or give --corpus DIR" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get install -y -q python3-doc >/dev/null \
    || { "${SUDO[@]}" apt-get update -q >/dev/null && "${SUDO[@]}" apt-get install -y -q python3-doc >/dev/null; }
fi

export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python examples/prune_llm.py "$@"
