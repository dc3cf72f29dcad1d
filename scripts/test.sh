#!/usr/bin/env bash
# The whole test suite (the torchvision zoo included), sharded over the CPU cores; the heavy zoo
# models share one worker (xdist group) so that two of them never fill the memory at once.
# Lint and the docs site's strict build run first. Extra arguments go to pytest (e.g. -m "not zoo" for the quick part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/data.sh  # the Fashion-MNIST example's end-to-end tests read the real data
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/ruff check maskprune algorithms tests examples benchmarks
# the docs site: --strict fails on any warning (a broken link, a docstring mkdocstrings cannot read)
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d "$site" >"$site.log" 2>&1 || { cat "$site.log"; exit 1; }
rm -rf "$site" "$site.log"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${WORKERS:-$(nproc)}" --dist loadgroup "$@"
