"""Dependency groups of a Llama-2-7B-sized model built on the meta device: time and peak memory.

For each configuration (Llama-2-7B sizes: hidden 4096, 32 heads, MLP 11008, vocabulary 32000; ``--layers``
and ``--kv-heads`` vary the depth and the key/value heads) the model is built under ``torch.device("meta")``
(no weight is allocated) with example input ids of shape (1, 16), also on meta, and each of these runs in
its own fresh subprocess, so that their peak memories do not mix:

* maskprune: ``Mask(model, ids, algorithm=Random(seed=0), ratio=0.5).make()``, then ``do_mask()``.
  Random, because L1Norm cannot score meta weights (they hold no data: ``NotImplementedError: Cannot copy
  out of meta tensor``);
* Torch-Pruning 1.6.1 (optional): ``DependencyGraph().build_dependency(model, example_inputs=ids,
  output_transform=lambda out: out.logits)``, then ``list(DG.get_all_groups())``, which is where
  Torch-Pruning forms its groups. Without ``output_transform`` the build fails on the model's output, a
  ``CausalLMOutputWithPast`` holding the key/value cache (``AttributeError: 'tuple' object has no attribute
  'grad_fn'``).

Time is wall-clock; memory is the process's resident set: the peak (``ru_maxrss``) after each stage, and
its increase over the resident set right before the stage. Every run also checks that no parameter or
buffer left the meta device.

Usage:
    .venv/bin/python benchmarks/trace_scale.py --output benchmarks/results/trace_scale.md   # 7B, 32 and 8 kv heads
    .venv/bin/python benchmarks/trace_scale.py --layers 2 --kv-heads 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from maskprune import Mask
from maskprune.errors import first_line

RATIO = 0.5
SEQUENCE = 16
LIBRARIES = ("maskprune", "torch-pruning")
LABELS = {
    "make": "maskprune `make()`",
    "do_mask": "maskprune `do_mask()` (Random)",
    "build": "TP `build_dependency`",
    "groups": "TP `get_all_groups()`",
}
STAGES = {"maskprune": ("make", "do_mask"), "torch-pruning": ("build", "groups")}
MIB = 1024 * 1024


def llama(layers: int, kv_heads: int) -> nn.Module:
    """An untrained LlamaForCausalLM of Llama-2-7B's sizes on the meta device, in eval mode."""
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=kv_heads,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def rss_bytes() -> int:
    """The process's resident set now (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measured(stage: str, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """``fn()``'s result and a record of its seconds, the peak resident set after it and the set before it.

    When the peak did not grow during the call (``peak_before == peak``) the call's own peak is at most
    ``peak``, so its increase is an upper bound.
    """
    gc.collect()
    before, peak_before = rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, {"stage": stage, "seconds": seconds, "rss_before": before, "peak_before": peak_before,
                 "peak": peak_rss_bytes(), "ended_at": time.time()}  # fmt: skip


def off_meta(model: nn.Module) -> int:
    """How many parameters and buffers are not on the meta device (materialised)."""
    return sum(not t.is_meta for t in (*model.parameters(), *model.buffers()))


def emit(record: dict[str, Any]) -> None:
    """One result line for the parent process."""
    print(json.dumps(record), flush=True)


def maskprune_child(model: nn.Module, ids: torch.Tensor) -> Iterator[dict[str, Any]]:
    """maskprune's make() and do_mask() on the meta model, one record each."""
    from maskprune.algorithms import Random

    mask, record = measured("make", lambda: Mask(model, ids, algorithm=Random(seed=0), ratio=RATIO).make())
    channels = sum(group.size for group in mask.groups)
    record["groups"] = f"{len(mask.groups)} groups, {channels:,} channels"
    yield record | {"off_meta": off_meta(model)}
    _, record = measured("do_mask", mask.do_mask)
    kept = sum(group.kept for group in mask.groups)
    record["groups"] = f"kept {kept:,} of {channels:,}"
    yield record | {"off_meta": off_meta(model)}


def torch_pruning_child(model: nn.Module, ids: torch.Tensor) -> Iterator[dict[str, Any]]:
    """Torch-Pruning's dependency graph on the meta model, then its groups, one record each."""
    import warnings

    import torch_pruning as tp

    warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
    graph, record = measured(
        "build",
        lambda: tp.DependencyGraph().build_dependency(model, example_inputs=ids, output_transform=lambda o: o.logits),
    )
    yield record | {"groups": f"{len(graph.module2node)} nodes", "off_meta": off_meta(model)}
    groups, record = measured("groups", lambda: list(graph.get_all_groups()))
    yield record | {"groups": f"{len(groups)} groups", "off_meta": off_meta(model)}


def child(library: str, layers: int, kv_heads: int) -> None:
    """Build the meta model and run one library's stages, printing a JSON line per stage (or per error)."""
    model = llama(layers, kv_heads)
    ids = torch.zeros(1, SEQUENCE, dtype=torch.long, device="meta")
    stages = maskprune_child if library == "maskprune" else torch_pruning_child
    try:
        for record in stages(model, ids):
            emit(record)
    except Exception as exc:  # reported in the table
        emit({"error": f"could not build: {first_line(exc)}"})


@dataclass
class Outcome:
    """What the subprocesses of one library on one configuration reported."""

    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None
    unfinished_s: float | None = None  # how long the stage a killed subprocess was in had run

    def seconds(self, stage: str) -> float | None:
        """The median seconds of a stage over the runs that reached it."""
        runs = self.records.get(stage)
        return statistics.median(r["seconds"] for r in runs) if runs else None


@dataclass
class ChildResult:
    """What one subprocess reported: its stage records, the error that stopped it, how long an unfinished stage ran."""

    records: list[dict[str, Any]]
    error: str | None = None
    unfinished_s: float | None = None  # at least this long, when the subprocess was killed in the middle of a stage


def run_child(library: str, layers: int, kv_heads: int, timeout: float) -> ChildResult:
    """One fresh subprocess; killed when it runs past ``timeout`` seconds.

    The stage a killed subprocess was in had run since the last record (or since the subprocess started,
    imports and model building included, when there is none).
    """
    started = time.time()
    command = [sys.executable, __file__, "--child", library, "--layers", str(layers), "--kv-heads", str(kv_heads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        unfinished = time.time() - max((r["ended_at"] for r in records if "ended_at" in r), default=started)
        return ChildResult(records, f"unfinished after {unfinished:.0f} s (killed)", unfinished)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    error = next((r["error"] for r in records if "error" in r), None)
    if error is None and done.returncode:
        error = f"exit code {done.returncode}: " + (done.stderr.strip().splitlines() or [""])[-1]
    return ChildResult([r for r in records if "stage" in r], error)


def measure(library: str, layers: int, kv_heads: int, repeats: int, timeout: float) -> Outcome:
    """``repeats`` fresh subprocesses of one library (fewer if one fails or is killed)."""
    outcome = Outcome()
    for _ in range(repeats):
        result = run_child(library, layers, kv_heads, timeout)
        for record in result.records:
            outcome.records.setdefault(record["stage"], []).append(record)
        outcome.error, outcome.unfinished_s = result.error, result.unfinished_s
        if result.error:
            break
    return outcome


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for the table, or a dash when it is missing."""
    return "-" if value is None else f"{value:,.{digits}f}"


def memory_cells(runs: list[dict[str, Any]]) -> tuple[str, str]:
    """The highest peak resident set over the runs, and the largest increase over the set before the stage.

    An increase is prefixed with ``<=`` when the stage did not raise the process's peak (an upper bound).
    """
    worst = max(runs, key=lambda r: r["peak"] - r["rss_before"])
    increase = (worst["peak"] - worst["rss_before"]) / MIB
    bound = "<= " if worst["peak"] == worst["peak_before"] else ""
    return fmt(max(r["peak"] for r in runs) / MIB, 0), bound + fmt(increase, 0)


def table_rows(config: str, outcomes: dict[str, Outcome]) -> Iterator[list[str]]:
    """The table's lines for one configuration: one per stage reached, one for the error that stopped a library.

    The ratio of a Torch-Pruning line is maskprune's make() over Torch-Pruning's time up to that stage (a bound
    when a subprocess was killed in that stage: the time the stage had run counts as its time).
    """
    make = outcomes["maskprune"].seconds("make") if "maskprune" in outcomes else None
    for library, outcome in outcomes.items():
        elapsed = 0.0
        for stage in STAGES[library]:
            runs = outcome.records.get(stage)
            if not runs:
                continue
            seconds = outcome.seconds(stage)
            elapsed += seconds
            ratio = fmt(make / elapsed) if library != "maskprune" and make else ""
            peak, increase = memory_cells(runs)
            materialised = max(r["off_meta"] for r in runs)
            note = runs[-1]["groups"] + ("" if not materialised else f"; {materialised} tensors left meta!")
            yield [config, LABELS[stage], fmt(seconds, 3), peak, increase, note, ratio]
        if outcome.error:
            stage = STAGES[library][min(len(outcome.records), len(STAGES[library]) - 1)]
            unfinished = outcome.unfinished_s
            bound = (
                f"< {fmt(make / (elapsed + unfinished), 4)}" if make and unfinished and library != "maskprune" else ""
            )
            yield [config, LABELS[stage], "-", "-", "-", outcome.error, bound]


HEADER = ("config", "library: stage", "time (s)", "peak RSS (MiB)", "RSS increase (MiB)", "groups found",
          "maskprune make / TP so far")  # fmt: skip


def table_line(cells: Sequence[str]) -> str:
    """One markdown table line."""
    return "| " + " | ".join(cells) + " |"


def has_torch_pruning() -> bool:
    """Whether Torch-Pruning is installed (it is not a dependency of maskprune); says so on stderr if not."""
    try:
        version = metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        print("torch-pruning is not installed: maskprune only (pip install --no-deps torch-pruning==1.6.1)",
              file=sys.stderr)  # fmt: skip
        return False
    if version != "1.6.1":
        print(f"note: torch-pruning {version} is installed; this benchmark targets 1.6.1", file=sys.stderr)
    return True


def environment(args: argparse.Namespace, libraries: Sequence[str]) -> str:
    """Versions, CPUs and the measurement's settings."""
    tp = metadata.version("torch-pruning") if "torch-pruning" in libraries else "not installed"
    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"maskprune {metadata.version('maskprune')}, torch-pruning {tp}, python {platform.python_version()}; "
        f"CPUs: os.cpu_count()={os.cpu_count()}\n"
        f"LlamaForCausalLM on meta: hidden 4096, 32 heads, MLP 11008, vocabulary 32000, input ids (1, {SEQUENCE}) "
        f"on meta; each library in its own subprocess, median time of {args.repeats} subprocess(es), "
        f"worst memory; Torch-Pruning subprocesses limited to {args.tp_timeout:.0f} s"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32], help="decoder layers (default 32)")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8],
                        help="key/value heads, one configuration each (default 32 8: MHA and GQA-8)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per library (default 3)")
    parser.add_argument("--tp-timeout", type=float, default=120.0,
                        help="seconds a Torch-Pruning subprocess may run (default 120)")  # fmt: skip
    parser.add_argument("--no-tp", action="store_true", help="maskprune only")
    parser.add_argument("--output", type=Path, help="also write what is printed to this markdown file")
    parser.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run every configuration and library in subprocesses; print the environment and the table."""
    args = parse_args(argv)
    if args.child:
        child(args.child, args.layers[0], args.kv_heads[0])
        return
    libraries = ["maskprune"] + ([] if args.no_tp or not has_torch_pruning() else ["torch-pruning"])
    env = environment(args, libraries)
    print(env, end="\n\n", flush=True)
    lines = [table_line(HEADER), table_line(["---"] * len(HEADER))]
    for layers in args.layers:
        for kv_heads in args.kv_heads:
            config = f"{layers} layers, {kv_heads} kv heads"
            outcomes = {}
            for library in libraries:
                print(f"... {config}: {library}", file=sys.stderr, flush=True)
                timeout = args.tp_timeout if library == "torch-pruning" else 3600.0
                outcomes[library] = measure(library, layers, kv_heads, args.repeats, timeout)
            lines.extend(table_line(row) for row in table_rows(config, outcomes))
    print("\n".join(lines))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"{env}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
