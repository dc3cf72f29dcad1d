"""``import maskprune`` stays lean: scipy and the FLOP counter are imported at first use, not at import.

The time is measured in fresh subprocesses, as an installed package runs: bytecode cached (in a temporary
folder, written by a first run that is not timed), ``import torch`` timed first, then ``import maskprune`` in
the same process. The time is the process's CPU time (``time.process_time``), which other processes on a loaded
machine do not inflate as they do the wall clock, and the best of a few runs is kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 0.2  # what `import maskprune` may add to `import torch`
RUNS = 5
LAZY = ("scipy", "torch.utils.flop_counter", "maskprune.algorithms", "tqdm.auto")

PROBE = f"""
import json, sys, time
start = time.process_time()
import torch
middle = time.process_time()
import maskprune
end = time.process_time()
print(json.dumps({{"torch": middle - start, "maskprune": end - middle,
                  "loaded": [name for name in {LAZY!r} if name in sys.modules]}}))
"""


def _import_once(cache: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPYCACHEPREFIX=str(cache), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_adds_little_to_torch(tmp_path: Path) -> None:
    first = _import_once(tmp_path)  # writes the bytecode of torch and maskprune; not timed
    assert first["loaded"] == [], f"`import maskprune` imported {first['loaded']}: they must be imported at first use"
    times = []
    for _ in range(RUNS):
        times.append(_import_once(tmp_path)["maskprune"])
        if min(times) <= LIMIT_S:
            break
    assert min(times) <= LIMIT_S, f"`import maskprune` adds {min(times):.3f} s to `import torch` (best of {times})"
