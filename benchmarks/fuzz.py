"""Random architectures through make(), random pruning and the verified export: how many are exact.

Each seed builds :func:`maskprune.testing.random_model` (convolutions, groups, depthwise, norms; add, concat,
chunk and slice, pooling, upsampling, gates; linear layers, heads split and merged by reshape, LayerNorm,
attention, products of activations; gates computed from the data) and runs
:func:`maskprune.testing.check_random_model`: ``make()``, a random subset of every group's channels removed (each
keeps one at least), ``generate_pruned_model()`` (verified on the example inputs), then the masked and the
exported model compared on two fresh inputs, the second with a larger batch. Every fifth seed runs in float64,
the others in float32; the tolerance is the dtype's default (1e-5 relative).

Verdicts: ``exact``; ``refused`` (a maskprune error said why: what froze the channels is counted, module names
left out); ``mismatch`` (the exported model computes something else: an engine bug); ``crash`` (an error that is
not maskprune's: an engine bug). The goal is no mismatch and no crash.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py --models 5000
    .venv/bin/python benchmarks/fuzz.py --seeds 17 4242        # rerun chosen seeds, print each verdict
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

import maskprune
from maskprune.testing import FuzzResult, check_random_model

RESULTS = Path(__file__).resolve().parent / "results"
FLOAT64_EVERY = 5


def dtype_of(seed: int) -> torch.dtype:
    """float64 for every fifth seed, float32 for the others."""
    return torch.float64 if seed % FLOAT64_EVERY == FLOAT64_EVERY - 1 else torch.float32


def causes(detail: str) -> set[str]:
    """What froze the channels of a refused model, without module paths and tensor names: ``NothingToPruneError``'s
    reasons (```narrow`` unsupported`, ```softmax`` freezes`, `reaches a model output` …), or the message."""
    if not detail.startswith("NothingToPruneError"):
        return {re.sub(r"\d+", "N", detail)}
    found = set()
    for part in detail.partition("(")[2].split("; "):
        if op := re.match(r"(unsupported op )?`([^`]+)` in ", part):
            found.add(f"`{op[2]}` " + ("unsupported" if op[1] else "freezes"))
        elif text := re.match(r"(reaches a model (?:input|output)|the model's code fixes this size)", part):
            found.add(text[1])
    return found


def op_kind(op: str) -> str:
    """``conv3x3/g2`` -> ``conv3x3``, ``slice[0:2]`` -> ``slice``: the op without its sizes."""
    return re.split(r"[/\[]", op)[0]


def run(seeds: list[int]) -> tuple[list[FuzzResult], float]:
    results, start = [], time.perf_counter()
    for i, seed in enumerate(seeds):
        results.append(check_random_model(seed, dtype=dtype_of(seed)))
        if (i + 1) % 500 == 0:
            counts = collections.Counter(r.verdict for r in results)
            print(f"{i + 1} models, {time.perf_counter() - start:.0f} s: {dict(counts)}", file=sys.stderr)
    return results, time.perf_counter() - start


def summary(results: list[FuzzResult], seconds: float, command: str) -> dict:
    verdicts = collections.Counter(r.verdict for r in results)
    refusals = collections.Counter(cause for r in results if r.verdict == "refused" for cause in causes(r.detail))
    covered = collections.Counter(kind for r in results if r.verdict == "exact" for kind in {op_kind(o) for o in r.ops})
    covered.pop("]", None)
    covered.pop("|", None)
    return {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "maskprune": maskprune.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
        "models": len(results),
        "seconds": round(seconds, 1),
        "verdicts": {v: verdicts.get(v, 0) for v in ("exact", "refused", "mismatch", "crash")},
        "channels_removed": sum(r.removed for r in results),
        "refusals": dict(refusals.most_common()),
        "exact_models_with_op": dict(sorted(covered.items())),
        "failures": [asdict(r) for r in results if not r.ok],
    }


def markdown(data: dict) -> str:
    v = data["verdicts"]
    lines = [
        "# Random architectures: masked == exported",
        "",
        f"`{data['command']}` on {data['date']}: torch {data['torch']}, maskprune {data['maskprune']}, Python "
        f"{data['python']}, {data['machine']}; {data['models']} models in {data['seconds']:.0f} s.",
        "",
        "| verdict | models |",
        "| --- | ---: |",
        *[f"| {name} | {count} |" for name, count in v.items()],
        "",
        f"{data['channels_removed']} channels removed in all. Failures (mismatch or crash): "
        + (", ".join(str(f["seed"]) for f in data["failures"]) or "none")
        + ".",
    ]
    if data["failures"]:
        lines.append("")
    for failure in data["failures"]:
        lines += [
            f"- seed {failure['seed']} ({failure['verdict']}): {failure['detail']}",
            f"  `{' '.join(failure['ops'])}`",
        ]
    lines += ["", "## What froze the refused models' channels", "", "A model counts once under each cause it shows."]
    lines += ["", "| cause | refused models |", "| --- | ---: |"]
    lines += [f"| {text.replace('|', '/')} | {count} |" for text, count in data["refusals"].items()]
    lines += ["", "## Exact models holding each block", "", "| block | exact models |", "| --- | ---: |"]
    lines += [f"| `{kind}` | {count} |" for kind, count in data["exact_models_with_op"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5000, help="seeds 0 .. models - 1 (after --start)")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="run these seeds only and print each verdict")
    parser.add_argument("--output", type=Path, default=RESULTS / "fuzz.md", help="the .md; the .json beside it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.seeds:
        for result in run(args.seeds)[0]:
            print(result.seed, result.verdict, result.detail, " ".join(result.ops))
        return
    results, seconds = run(list(range(args.start, args.start + args.models)))
    command = f"benchmarks/fuzz.py --models {args.models} --start {args.start}"
    if args.output != RESULTS / "fuzz.md":
        command += f" --output {args.output}"
    data = summary(results, seconds, command)
    args.output.write_text(markdown(data))
    args.output.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(markdown(data))
    sys.exit(1 if data["failures"] else 0)


if __name__ == "__main__":
    main()
