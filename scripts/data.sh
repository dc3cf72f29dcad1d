#!/usr/bin/env bash
# Makes sure Fashion-MNIST is in /usr/share/datasets/fashion-mnist: installs the Debian package
# dataset-fashion-mnist when it is not (as root, or through sudo). Safe to run again.
set -euo pipefail
DATA=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

have_data() {
  local name
  for name in $FILES; do
    [ -f "$DATA/$name.gz" ] || [ -f "$DATA/$name" ] || return 1
  done
}

have_data && exit 0
echo "Fashion-MNIST is not in $DATA: installing the Debian package dataset-fashion-mnist" >&2
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null; then
  SUDO=(sudo)
else
  echo "error: not root and no sudo: run 'apt-get install dataset-fashion-mnist' as root," \
    "or give the main job --data DIR (a directory holding the four Fashion-MNIST idx files)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "error: no apt-get here: give the main job --data DIR (a directory holding the four Fashion-MNIST" \
    "idx files: $FILES, plain or .gz)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null \
  || { "${SUDO[@]}" apt-get update -q >/dev/null && "${SUDO[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null; }
have_data || { echo "error: dataset-fashion-mnist is installed but $DATA lacks its files" >&2; exit 1; }
