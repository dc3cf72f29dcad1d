"""Time maskprune's trace and export against Torch-Pruning's dependency graph and pruner step.

For each torchvision model (``weights=None``, eval mode, one 3x224x224 image) it times, in one process:

* maskprune: ``Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()`` (trace + groups), then, after
  ``do_mask()``, ``generate_pruned_model()`` with its default verification and with ``verify=False``;
* the floor of any verification: one forward of the masked model at full width (its zeroed weights,
  after ``mask.remove()`` took its hooks off) and one of the exported model, without gradients: the
  verified export cannot go below it;
* Torch-Pruning 1.6.1 (optional, imported lazily): ``tp.DependencyGraph().build_dependency(model, x)``,
  then the construction of a ``MagnitudePruner`` (L1 magnitude, same ratio, final classifier ignored)
  and its ``step()``, which is what produces Torch-Pruning's smaller model.

Every timing is the median of ``--repeats`` runs after one warm-up run, each run on a fresh
``copy.deepcopy`` of the built model (the copy is not timed). Absolute seconds depend on the machine's
load; the ratios are what the benchmark reports.

Usage:
    .venv/bin/python benchmarks/trace_export.py --quick
    .venv/bin/python benchmarks/trace_export.py --models resnet18 vgg16 --repeats 5
    .venv/bin/python benchmarks/trace_export.py --cpu-time   # on a machine that other processes load
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import torch
import torchvision
from maskprune.algorithms import L1Norm
from torch import nn

from maskprune import Mask, count_parameters

MODELS = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "vgg16",
    "convnext_tiny",
    "resnext50_32x4d",
    "googlenet",
)
QUICK_MODELS = ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0")
RATIO = 0.5
INPUT_SHAPE = (1, 3, 224, 224)
TP_VERSION = "1.6.1"

Fresh = Callable[[], nn.Module]


@dataclass
class Sample:
    """The seconds of each timed stage of one run, and the parameter count of the model it pruned (if any)."""

    seconds: dict[str, float]
    params_after: int | None = None


@dataclass
class Result:
    """Medians over the repeats of one kind of run on one model, or the error that stopped it."""

    seconds: dict[str, float] = field(default_factory=dict)
    params_after: int | None = None
    error: str | None = None


@dataclass
class Row:
    """Everything measured on one model: a Result per kind of run (see :func:`runs`)."""

    model: str
    params_before: int
    results: dict[str, Result]

    def seconds(self, run: str, stage: str) -> float | None:
        """One stage's median seconds, or None when that run was skipped or failed."""
        result = self.results.get(run)
        return None if result is None or result.error else result.seconds[stage]

    def params_after(self, run: str) -> int | None:
        """Parameters of the model that run pruned, or None when it was skipped or failed."""
        result = self.results.get(run)
        return None if result is None or result.error else result.params_after


clock: Callable[[], float] = time.perf_counter  # time.process_time with --cpu-time


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and the seconds it took (wall clock, or CPU time with ``--cpu-time``).

    The garbage of earlier runs (model copies, dependency graphs) is collected first, so that a full
    collection of it does not land inside whichever run comes next.
    """
    gc.collect()
    start = clock()
    out = fn()
    return out, clock() - start


def build_model(name: str) -> nn.Module:
    """A randomly initialised torchvision model in eval mode."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's init_weights FutureWarning
        model = torchvision.models.get_model(name, weights=None)
    return model.eval()


def final_classifier(model: nn.Module) -> nn.Module:
    """The model's last ``nn.Linear`` (its classification head, for every model benchmarked here)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]


def make_mask(model: nn.Module, x: torch.Tensor) -> Mask:
    """maskprune's trace and dependency groups, with the L1 criterion at ``RATIO``."""
    return Mask(model, x, algorithm=L1Norm(), ratio=RATIO).make()


def mp_make_run(fresh: Fresh, x: torch.Tensor) -> Sample:
    """One maskprune make() on a fresh copy."""
    model = fresh()
    mask, make_s = timed(lambda: make_mask(model, x))
    mask.remove()
    return Sample({"make": make_s})


def mp_export_run(fresh: Fresh, x: torch.Tensor) -> Sample:
    """make() and do_mask() (not timed), then the export with and without verification, on a fresh copy."""
    mask = make_mask(fresh(), x)
    mask.do_mask()
    pruned, export_s = timed(mask.generate_pruned_model)
    _, export_noverify_s = timed(lambda: mask.generate_pruned_model(verify=False))
    mask.remove()
    _, forwards_s = timed(lambda: two_forwards(mask.model, pruned, x))
    seconds = {"export": export_s, "export_noverify": export_noverify_s, "forwards": forwards_s}
    return Sample(seconds, count_parameters(pruned))


def two_forwards(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    """What any verification must at least compute: the full-width model's outputs and the exported model's."""
    with torch.no_grad():
        model(x)
        pruned(x)


def tp_graph_run(tp: ModuleType, fresh: Fresh, x: torch.Tensor) -> Sample:
    """One Torch-Pruning build_dependency on a fresh copy."""
    model = fresh()
    _, build_s = timed(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x))
    return Sample({"build": build_s})


def tp_pruner_run(tp: ModuleType, fresh: Fresh, x: torch.Tensor) -> Sample:
    """One Torch-Pruning MagnitudePruner (L1, ``RATIO``, head ignored): construction and step, on a fresh copy."""
    model = fresh()
    pruner, init_s = timed(
        lambda: tp.pruner.MagnitudePruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=RATIO,
            ignored_layers=[final_classifier(model)],
        )
    )
    _, step_s = timed(pruner.step)
    return Sample({"init": init_s, "step": step_s}, count_parameters(model))


Run = Callable[[Fresh, torch.Tensor], Sample]


def runs(tp: ModuleType | None) -> dict[str, Run]:
    """The kinds of run to measure on each model; Torch-Pruning's only when it is installed."""
    selected: dict[str, Run] = {"mp_make": mp_make_run, "mp_export": mp_export_run}
    if tp is not None:
        selected["tp_graph"] = functools.partial(tp_graph_run, tp)
        selected["tp_pruner"] = functools.partial(tp_pruner_run, tp)
    return selected


def attempt(run: Run, fresh: Fresh, x: torch.Tensor) -> Sample | str:
    """One run's Sample, or the description of the exception that stopped it."""
    try:
        return run(fresh, x)
    except Exception as exc:  # report it and go on
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{os.path.relpath(frame.filename)}:{frame.lineno} in {frame.name}"
        return f"{type(exc).__name__}: {exc} (raised at {where})"


def median_result(samples: Sequence[Sample]) -> Result:
    """The median seconds of each stage over ``samples``."""
    seconds = {key: statistics.median(s.seconds[key] for s in samples) for key in samples[0].seconds}
    return Result(seconds, samples[-1].params_after)


def benchmark_model(name: str, repeats: int, selected: dict[str, Run]) -> Row:
    """Every selected kind of run on one model: one warm-up round, then ``repeats`` timed rounds.

    The kinds take turns within each round, so that a change in the machine's load weighs on
    maskprune's and Torch-Pruning's timings alike. Each run works on fresh deep copies of the model.
    """
    base = build_model(name)
    torch.manual_seed(0)
    x = torch.randn(INPUT_SHAPE)

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    samples: dict[str, list[Sample]] = {key: [] for key in selected}
    errors: dict[str, str] = {}
    for round_index in range(repeats + 1):  # round 0 is the warm-up
        for key, run in selected.items():
            if key in errors:
                continue
            outcome = attempt(run, fresh, x)
            if isinstance(outcome, str):
                errors[key] = outcome
            elif round_index:
                samples[key].append(outcome)
    results = {key: Result(error=errors[key]) if key in errors else median_result(samples[key]) for key in selected}
    return Row(name, count_parameters(base), results)


def load_torch_pruning() -> ModuleType | None:
    """``torch_pruning`` if it is installed (it is not a dependency of maskprune), else None with a message."""
    try:
        import torch_pruning
    except ImportError:
        print(
            f"torch_pruning is not installed: timing maskprune only. To compare, install it without touching torch:\n"
            f"    .venv/bin/pip install --no-deps torch-pruning=={TP_VERSION}\n",
            file=sys.stderr,
        )
        return None
    version = metadata.version("torch-pruning")
    if version != TP_VERSION:
        print(f"note: torch-pruning {version} is installed; this benchmark targets {TP_VERSION}", file=sys.stderr)
    # convnext's layer_scale parameters raise this on every graph build; TP prunes their channel dim, as it should
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
    return torch_pruning


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for the table, or a dash when it is missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_params(count: int | None) -> str:
    """A parameter count in millions."""
    return "-" if count is None else f"{count / 1e6:.2f}M"


def row_ratios(row: Row) -> dict[str, float | None]:
    """maskprune time over Torch-Pruning time for the trace and the export; and the verified export over its floor,
    its own two forwards (maskprune alone: what the verification adds to them)."""
    step, forwards = row.seconds("tp_pruner", "step"), row.seconds("mp_export", "forwards")
    return {
        "make": ratio(row.seconds("mp_make", "make"), row.seconds("tp_graph", "build")),
        "export": ratio(row.seconds("mp_export", "export"), step),
        "export_noverify": ratio(row.seconds("mp_export", "export_noverify"), step),
        "forwards": ratio(forwards, step),
        "export_over_forwards": ratio(row.seconds("mp_export", "export"), forwards),
    }


HEADER = (
    "model",
    "maskprune make (s)",
    "TP build_dependency (s)",
    "ratio make/TP",
    "maskprune export (s)",
    "export verify=False (s)",
    "two forwards (s)",
    "TP pruner init (s)",
    "TP pruner step (s)",
    "ratio export/TP",
    "params before -> after (maskprune)",
    "params after (TP)",
)


def table_line(cells: Sequence[str]) -> str:
    """One markdown table line."""
    return "| " + " | ".join(cells) + " |"


def table_row(row: Row) -> str:
    """A model's line of the results table."""
    ratios = row_ratios(row)
    return table_line(
        (
            row.model,
            fmt(row.seconds("mp_make", "make")),
            fmt(row.seconds("tp_graph", "build")),
            fmt(ratios["make"], 2),
            fmt(row.seconds("mp_export", "export")),
            fmt(row.seconds("mp_export", "export_noverify")),
            fmt(row.seconds("mp_export", "forwards")),
            fmt(row.seconds("tp_pruner", "init")),
            fmt(row.seconds("tp_pruner", "step")),
            fmt(ratios["export"], 2),
            f"{fmt_params(row.params_before)} -> {fmt_params(row.params_after('mp_export'))}",
            fmt_params(row.params_after("tp_pruner")),
        )
    )


def summary(rows: Sequence[Row]) -> str:
    """The median over models of each ratio of :func:`row_ratios`."""
    parts = []
    labels = {
        "make": "make/TP",
        "export": "export/TP",
        "export_noverify": "export verify=False/TP",
        "forwards": "two forwards/TP (the verified export's floor)",
        "export_over_forwards": "export/its own two forwards",
    }
    for key, label in labels.items():
        values = [r for r in (row_ratios(row)[key] for row in rows) if r is not None]
        median = fmt(statistics.median(values), 2) if values else "-"
        parts.append(f"{label} = {median} (over {len(values)} model(s))")
    return "Median ratios: " + "; ".join(parts)


def environment(tp: ModuleType | None, repeats: int) -> str:
    """The versions and CPU resources the numbers were taken with."""
    tp_version = metadata.version("torch-pruning") if tp else "not installed"
    return (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, maskprune {metadata.version('maskprune')}, "
        f"torch-pruning {tp_version}, python {platform.python_version()}\n"
        f"CPUs: os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={torch.get_num_threads()}, "
        f"timed by {'CPU time' if clock is time.process_time else 'wall clock'}; "
        f"ratio={RATIO}, input {INPUT_SHAPE}, median of {repeats} repeat(s) after 1 warm-up"
    )


def report(rows: Sequence[Row]) -> str:
    """The markdown table, the summary line and any errors."""
    lines = [table_line(HEADER), table_line(["---"] * len(HEADER)), *(table_row(row) for row in rows), ""]
    lines.append(summary(rows))
    for row in rows:
        for run, result in row.results.items():
            if result.error:
                lines.append(f"ERROR {row.model} [{run}]: {result.error}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, metavar="MODEL", help=f"subset of: {' '.join(MODELS)}")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed rounds per model; medians are reported (default 3)"
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {', '.join(QUICK_MODELS)}, 1 repeat")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one torch thread, timed by the process's CPU time: comparable on a machine other processes load",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.quick:
        args.models, args.repeats = args.models or list(QUICK_MODELS), 1
    args.models = args.models or list(MODELS)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the environment, the table and the summary."""
    global clock
    args = parse_args(argv)
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.process_time
    tp = load_torch_pruning()
    selected = runs(tp)
    print(environment(tp, args.repeats), end="\n\n", flush=True)
    rows = []
    for name in args.models:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(benchmark_model(name, args.repeats, selected))
    print(report(rows))


if __name__ == "__main__":
    main()
