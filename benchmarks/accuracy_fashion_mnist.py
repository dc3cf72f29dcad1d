"""Accuracy of every pruning criterion on Fashion-MNIST at half the FLOPs: one shot and iterative, several seeds.

One base model (``examples/fashion_mnist.py``'s SmallResNet, trained once and cached in ``.cache/``) is
pruned by every criterion of ``maskprune.algorithms`` to ``target_flops=0.5`` (FLOPs counted on the
exported model), with the same fine-tuning budget for all, by ``examples/prune_fashion_mnist.py``'s
``prune()``:

* one shot: one ``do_mask()``, the test accuracy right after it (no fine-tuning), then ``--finetune-steps``
  SGD steps on the masked model and the test accuracy of the exported model;
* iterative: ``steps=8`` with the cubic ramp, ``do_mask()`` every few steps during the first half of the
  same ``--finetune-steps``, then the exported model's test accuracy.

Seeds change the fine-tuning batches, the random criteria, the calibration batches (APoZ, ThiNet) and
ThiNet's sampled positions; the base model is the same for every seed, so a deterministic criterion's
one-shot accuracy right after pruning is the same for every seed. BNScale gets ``--sparsity-steps``
extra SGD steps with an L1 penalty on the BatchNorm scales before it ranks them (network slimming
needs sparse scales), which the table says.

Usage:
    .venv/bin/python benchmarks/accuracy_fashion_mnist.py --quick      # smoke test: tiny data, 1 seed, few steps
    .venv/bin/python benchmarks/accuracy_fashion_mnist.py              # the full run (about 30 minutes on 2 cores)
    .venv/bin/python benchmarks/accuracy_fashion_mnist.py --algorithms fpgm random --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples are plain scripts, not a package

import fashion_mnist as fm  # noqa: E402
import prune_fashion_mnist as job  # noqa: E402

import maskprune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ("oneshot", "iterative")
TARGET_FLOPS = 0.5


@dataclass
class Run:
    """One criterion, schedule and seed: accuracies (fractions), FLOPs removed, seconds, or the error."""

    algorithm: str
    schedule: str
    seed: int
    after_pruning: float | None = None
    after_recalibration: float | None = None
    after_finetuning: float | None = None
    flops_removed: float | None = None
    seconds: float = 0.0
    error: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = sorted(job.ALGORITHMS)
    parser.add_argument("--algorithms", nargs="+", type=str.lower, choices=names, default=names, metavar="NAME")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--finetune-steps", type=int, default=200, help="SGD steps of 128 images, for every run")
    parser.add_argument("--sparsity-steps", type=int, default=200, help="BNScale's extra L1 sparsity training")
    parser.add_argument("--sparsity-strength", type=float, default=1e-3)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--data", type=Path, help="directory of the Fashion-MNIST idx files")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where to train and prune (cpu, cuda, ...)")
    parser.add_argument("--output", type=Path, help="markdown file to write (default: benchmarks/results/...)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2,048 training images, 1 seed, 8 steps")
    args = parser.parse_args(argv)
    if args.finetune_steps < 16 or args.sparsity_steps < 0 or args.base_epochs < 1:
        parser.error("--finetune-steps must be at least 16, --sparsity-steps at least 0, --base-epochs at least 1")
    args.subset = []
    if args.quick:
        args.seeds, args.finetune_steps, args.sparsity_steps, args.base_epochs = args.seeds[:1], 16, 8, 1
        args.subset = ["--train-subset", "2048", "--test-subset", "1000", "--calibration-batches", "2"]
    name = "accuracy_fashion_mnist" + ("_quick" if args.quick else "")
    args.output = args.output or RESULTS / f"{name}.md"
    return args


def options(args: argparse.Namespace, algorithm: str, schedule: str, seed: int) -> argparse.Namespace:
    """The example's options for one run (checked by its own parser)."""
    argv = ["--algorithm", algorithm, "--schedule", schedule, "--seed", str(seed)]
    argv += ["--target-flops", str(TARGET_FLOPS), "--finetune-steps", str(args.finetune_steps)]
    argv += ["--base-epochs", str(args.base_epochs), "--device", str(args.device), *args.subset]
    if schedule == "iterative":
        argv += ["--steps", "2" if args.quick else "8", "--ramp", "cubic"]
    if algorithm == "bnscale" and args.sparsity_steps:
        argv += ["--sparsity-steps", str(args.sparsity_steps), "--sparsity-strength", str(args.sparsity_strength)]
    return job.parse_args(argv)


def run_one(base: torch.nn.Module, data: fm.FashionMNIST, run: Run, args: argparse.Namespace) -> Run:
    """Prune a copy of ``base`` as ``run`` says; fills in its accuracies (or its error)."""
    start = time.perf_counter()
    first_parameter = next(base.parameters())
    try:
        result = job.prune(copy.deepcopy(base), data, options(args, run.algorithm, run.schedule, run.seed), log=None)
        x = torch.zeros(job.INPUT, device=first_parameter.device)
        run.flops_removed = 1 - maskprune.count_flops(result.model, x) / maskprune.count_flops(base, x)
        run.after_pruning, run.after_finetuning = result.accuracy_after_pruning, result.accuracy
        run.after_recalibration = result.accuracy_after_recalibration
        result.mask.remove()
    except Exception as error:  # report it and go on with the other runs
        frame = traceback.extract_tb(error.__traceback__)[-1]
        run.error = f"{type(error).__name__}: {error} (at {os.path.relpath(frame.filename)}:{frame.lineno})"
    run.seconds = time.perf_counter() - start
    return run


def mean_std(values: Sequence[float | None]) -> str:
    """``"91.23 ± 0.45"`` in percent (sample std over seeds), or a dash."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 100:.2f} ± {std * 100:.2f}"


def table(runs: list[Run], args: argparse.Namespace, base_accuracy: float) -> list[str]:
    """The markdown table: one line per criterion, mean ± std over seeds."""
    head = [
        "criterion",
        "one shot: right after pruning",
        "... BN statistics re-estimated",
        "one shot: after fine-tuning",
        "iterative (8 steps, cubic): after fine-tuning",
        "FLOPs removed",
    ]
    lines = ["| " + " | ".join(head) + " |", "| --- | --: | --: | --: | --: | --: |"]

    def pick(algorithm: str, schedule: str, field: str) -> list[float | None]:
        return [getattr(r, field) for r in runs if r.algorithm == algorithm and r.schedule == schedule and not r.error]

    for algorithm in args.algorithms:
        label = algorithm
        if algorithm == "bnscale":
            label += f" (+{args.sparsity_steps} sparsity steps)" if args.sparsity_steps else " (no sparsity training)"
        flops = [r.flops_removed for r in runs if r.algorithm == algorithm and r.flops_removed is not None]
        cells = [
            label,
            mean_std(pick(algorithm, "oneshot", "after_pruning")),
            mean_std(pick(algorithm, "oneshot", "after_recalibration")),
            mean_std(pick(algorithm, "oneshot", "after_finetuning")),
            mean_std(pick(algorithm, "iterative", "after_finetuning")),
            f"{min(flops):.1%} - {max(flops):.1%}" if flops else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| base model (not pruned) | {base_accuracy * 100:.2f} | | | | 0% |")
    return lines


def against_random(runs: list[Run], args: argparse.Namespace) -> list[str]:
    """For each criterion: does it beat Random right after one-shot pruning (as is, and recalibrated), seed by seed?"""
    lines = []
    for field, what in (("after_pruning", "as pruned"), ("after_recalibration", "BN statistics re-estimated")):
        reference = {r.seed: getattr(r, field) for r in runs if r.algorithm == "random" and r.schedule == "oneshot"}
        if not any(v is not None for v in reference.values()):
            continue
        lines += ["", f"Right after one-shot pruning ({what}), against Random with the same seed:"]
        for algorithm in args.algorithms:
            pairs = [
                (getattr(r, field), reference[r.seed])
                for r in runs
                if r.algorithm == algorithm != "random" and r.schedule == "oneshot" and getattr(r, field) is not None
                if reference.get(r.seed) is not None
            ]
            if pairs:
                wins = sum(a > b for a, b in pairs)
                gap = statistics.mean(a - b for a, b in pairs) * 100
                lines.append(f"- {algorithm}: better in {wins}/{len(pairs)} seeds, by {gap:+.2f} points on average")
    return lines


def header(args: argparse.Namespace, data: fm.FashionMNIST, info: dict, seconds: float) -> list[str]:
    steps = "2" if args.quick else "8"
    quick = " (QUICK smoke test)" if args.quick else ""
    return [
        f"# Fashion-MNIST: pruning criteria at target_flops={TARGET_FLOPS}{quick}",
        "",
        f"Base model: SmallResNet {fm.SmallResNet().arch} ({fm.describe(fm.SmallResNet())}), {args.base_epochs} "
        f"epoch(s), seed 0, test accuracy {info['test_accuracy']:.2%}; {len(data.train_labels):,} training and "
        f"{len(data.test_labels):,} test images.",
        f"Fine-tuning budget, the same for every run: **{args.finetune_steps} SGD steps of 128 images** "
        f"(lr 0.02, cosine, momentum 0.9); iterative runs call do_mask() {steps} times during the first half.",
        f"BNScale: {args.sparsity_steps} extra SGD steps with L1 on the BN scales (strength "
        f"{args.sparsity_strength:g}) before ranking them"
        if args.sparsity_steps
        else "BNScale: no sparsity training (its BN scales are those of plain training)",
        f"Accuracies in percent, mean ± std over seeds {', '.join(map(str, args.seeds))} (seeds change the "
        "fine-tuning batches, random criteria and calibration samples; the base model is the same).",
        f"torch {torch.__version__}, maskprune {metadata.version('maskprune')}, python "
        f"{platform.python_version()}, device {device_name(args.device)}, {torch.get_num_threads()} threads, "
        f"os.cpu_count()={os.cpu_count()}; "
        f"{seconds / 60:.1f} minutes in all.",
        "",
    ]


def device_name(device: str) -> str:
    """``"cpu"`` or ``"cuda (NVIDIA H200)"``."""
    device = torch.device(device)
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    start = time.perf_counter()
    fm.set_threads(args.threads)
    first = options(args, args.algorithms[0], args.schedules[0], args.seeds[0])
    data = fm.load_fashion_mnist(args.data).subset(first.train_subset, first.test_subset)
    base, info = fm.base_model(
        data, epochs=args.base_epochs, seed=0, device=first.device, log=lambda s: print(s, file=sys.stderr)
    )
    runs = []
    for seed in args.seeds:
        for algorithm in args.algorithms:
            for schedule in args.schedules:
                run = run_one(base, data, Run(algorithm, schedule, seed), args)
                runs.append(run)
                accuracy = f"{run.after_finetuning:.2%}" if run.after_finetuning is not None else run.error
                print(f"... seed {seed} {algorithm} {schedule}: {accuracy} ({run.seconds:.0f} s)", file=sys.stderr)
    seconds = time.perf_counter() - start
    lines = header(args, data, info, seconds) + table(runs, args, info["test_accuracy"]) + against_random(runs, args)
    errors = [f"ERROR {r.algorithm} {r.schedule} seed {r.seed}: {r.error}" for r in runs if r.error]
    lines += [""] + errors if errors else []
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    print(f"written to {args.output} (and every run in {args.output.with_suffix('.json').name})", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
