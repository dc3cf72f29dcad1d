"""maskprune's criteria against Torch-Pruning's on the same structure: right after pruning, BN re-estimated, fine-tuned.

``examples/fashion_mnist.py``'s SmallResNet, trained separately for each base seed (and cached in
``.cache/``), is pruned by every criterion of ``maskprune.algorithms`` and by Torch-Pruning's standard
importances, with two allocations:

* ``uniform``: 30% of every group's channels (maskprune ``ratio=0.3``; Torch-Pruning ``pruning_ratio=0.3``,
  local): the same structure for every method;
* ``global``: half of the FLOPs removed, channels ranked across groups (maskprune ``target_flops=0.5,
  allocation="global"``; Torch-Pruning ``global_pruning=True`` with its ratio bisected until the exported
  model has half the FLOPs, within 1%), ``max_ratio`` 0.9 for both.

Each pruned (exported) model is measured three ways: test accuracy as pruned; after
``maskprune.recalibrate_bn`` on ``--recalibration-batches`` training batches of 128; after
``--finetune-steps`` SGD steps (batches of 128, lr 0.02 cosine, momentum 0.9, Nesterov, weight decay
5e-4, random flips) from the re-estimated model. Criteria that need data see the same batches:
8 seeded training batches of 64 (APoZ and ThiNet calibration, Taylor's backward passes in eval mode,
Torch-Pruning's Taylor gradient and its Hessian's per-sample gradients on the first 64 images).
BNScale ranks the BatchNorm scales of plain training (no sparsity training), for both libraries.
Every run is appended to the JSON file as soon as it ends, so an interrupted run keeps what it measured.

Usage:
    .venv/bin/python -m pip install -e '.[bench]'                   # torch-pruning, a benchmark-only dependency
    .venv/bin/python benchmarks/vs_torch_pruning.py                 # the full grid: 3 base seeds
    .venv/bin/python benchmarks/vs_torch_pruning.py --quick         # smoke test: tiny data, 1 seed, few steps
    .venv/bin/python benchmarks/vs_torch_pruning.py --seeds 0 --criteria mp:l1 tp:magnitude-p1 --finetune none
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples are plain scripts, not a package

import fashion_mnist as fm  # noqa: E402

import maskprune  # noqa: E402
from maskprune import Mask  # noqa: E402
from maskprune import algorithms as mp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALLOCATIONS = ("uniform", "global")
RATIO, TARGET_FLOPS, MAX_RATIO = 0.3, 0.5, 0.9
INPUT = (1, 1, 28, 28)
CALIBRATION = (8, 64)  # batches, images per batch

#: maskprune criteria: name -> constructor from (calibration loader, seed)
MASKPRUNE: dict[str, Callable[[list, int], maskprune.Algorithm]] = {
    "l1": lambda data, seed: mp.L1Norm(),
    "l1-consumers": lambda data, seed: mp.L1Norm(include_consumers=True),
    "l2": lambda data, seed: mp.L2Norm(),
    "l2-consumers": lambda data, seed: mp.L2Norm(include_consumers=True),
    "fpgm": lambda data, seed: mp.FPGM(),
    "group-magnitude-p1": lambda data, seed: mp.GroupMagnitude(p=1),
    "group-magnitude-p2": lambda data, seed: mp.GroupMagnitude(p=2),
    "lamp": lambda data, seed: mp.LAMP(),
    "bnscale": lambda data, seed: mp.BNScale(),
    "taylor": lambda data, seed: mp.Taylor(),
    "apoz": lambda data, seed: mp.APoZ(data),
    "thinet": lambda data, seed: mp.ThiNet(data, seed=seed),
    "random": lambda data, seed: mp.Random(seed=seed),
    "uniform": lambda data, seed: mp.Uniform(seed=seed),
}
#: Torch-Pruning importances, built on use (torch_pruning is imported only when one runs)
TORCH_PRUNING = ("magnitude-p1", "magnitude-p2", "bnscale", "lamp", "taylor", "hessian")
NAMES = [f"mp:{n}" for n in MASKPRUNE] + [f"tp:{n}" for n in TORCH_PRUNING]


@dataclass
class Run:
    """One criterion, allocation and base seed: accuracies (fractions), structure, seconds, or the error."""

    criterion: str
    allocation: str
    seed: int
    as_pruned: float | None = None
    recalibrated: float | None = None
    finetuned: float | None = None
    parameters: int | None = None
    flops_kept: float | None = None
    seconds: float = 0.0
    error: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criteria", nargs="+", choices=NAMES, default=NAMES, metavar="NAME", help=" ".join(NAMES))
    parser.add_argument(
        "--finetune", nargs="+", default=["all"], metavar="NAME", help="criteria to fine-tune: all, none, or names"
    )
    parser.add_argument(
        "--finetune-seeds", nargs="+", type=int, metavar="SEED", help="seeds to fine-tune (default all)"
    )
    parser.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=list(ALLOCATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="base-model seeds (each trained)")
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--recalibration-batches", type=int, default=20)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--data", type=Path, help="directory of the Fashion-MNIST idx files")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, help="markdown file (default: benchmarks/results/vs_torch_pruning.md)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2,048 training images, 1 seed, 8 steps")
    parser.add_argument("--cache", type=Path, default=fm.CACHE_DIR, help="where the base models are cached")
    parser.add_argument(
        "--from-json",
        nargs="+",
        type=Path,
        help="merge these results files (a later run replaces the same earlier one) into --output and its .json",
    )
    args = parser.parse_args(argv)
    unknown = set(args.finetune) - {"all", "none", *NAMES}
    if unknown:
        parser.error(f"--finetune: unknown {sorted(unknown)}; use all, none or names among {NAMES}")
    args.finetune = set(NAMES if "all" in args.finetune else [] if "none" in args.finetune else args.finetune)
    args.command = "python benchmarks/vs_torch_pruning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.seeds, args.finetune_steps, args.recalibration_batches, args.base_epochs = args.seeds[:1], 8, 2, 1
    name = "vs_torch_pruning" + ("_quick" if args.quick else "")
    args.output = args.output or RESULTS / f"{name}.md"
    return args


# ---- the two libraries -----------------------------------------------------------------------------
def calibration(data: fm.FashionMNIST, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed, seeded training batches every data-driven criterion sees."""
    return list(data.calibration_loader(*CALIBRATION, seed=seed))


def gradients(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Backward passes in eval mode (the BatchNorm statistics stay those of the base model)."""
    model.eval()
    for images, labels in batches:
        F.cross_entropy(model(images), labels).backward()


def prune_maskprune(base: nn.Module, name: str, allocation: str, batches: list, seed: int) -> nn.Module:
    """The exported model of one maskprune criterion."""
    model = copy.deepcopy(base)
    target = {"ratio": RATIO} if allocation == "uniform" else {"target_flops": TARGET_FLOPS, "allocation": "global"}
    algorithm = MASKPRUNE[name](batches, seed)
    mask = Mask(model, torch.zeros(INPUT), algorithm=algorithm, max_ratio=MAX_RATIO, **target).make()
    if name == "taylor":
        gradients(model, batches)
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    mask.remove()
    return pruned


def tp_importance(name: str):  # noqa: ANN201 - a torch_pruning.importance.Importance
    import torch_pruning as tp

    return {
        "magnitude-p1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "magnitude-p2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bnscale": tp.importance.BNScaleImportance,
        "lamp": tp.importance.LAMPImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "hessian": tp.importance.GroupHessianImportance,
    }[name]()


def prune_tp_once(base: nn.Module, name: str, ratio: float, global_pruning: bool, batches: list) -> nn.Module:
    """Torch-Pruning's MetaPruner on a copy of ``base``, with the data its importance asks for."""
    import torch_pruning as tp

    model = copy.deepcopy(base)
    importance = tp_importance(name)
    if name == "taylor":
        gradients(model, batches)
    elif name == "hessian":  # per-sample gradients, as Torch-Pruning's docstring shows
        model.eval()
        images = torch.cat([b[0] for b in batches])[:64]
        labels = torch.cat([b[1] for b in batches])[:64]
        importance.zero_grad()
        for loss in F.cross_entropy(model(images), labels, reduction="none"):
            model.zero_grad()
            loss.backward(retain_graph=True)
            importance.accumulate_grad(model)
    pruner = tp.pruner.MetaPruner(
        model,
        torch.zeros(INPUT),
        importance=importance,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        max_pruning_ratio=MAX_RATIO,
        ignored_layers=[model.fc],
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_torch_pruning(base: nn.Module, name: str, allocation: str, batches: list) -> nn.Module:
    """Uniform: ratio 0.3 per group. Global: the ratio bisected until the FLOPs are halved (within 1%)."""
    if allocation == "uniform":
        return prune_tp_once(base, name, RATIO, False, batches)
    x = torch.zeros(INPUT)
    full = maskprune.count_flops(base, x)
    lo, hi, best = 0.0, MAX_RATIO, None
    for _ in range(16):
        ratio = (lo + hi) / 2
        model = prune_tp_once(base, name, ratio, True, batches)
        kept = maskprune.count_flops(model, x) / full
        if best is None or abs(kept - (1 - TARGET_FLOPS)) < abs(best[0] - (1 - TARGET_FLOPS)):
            best = (kept, model)
        if abs(kept - (1 - TARGET_FLOPS)) <= 0.01:
            break
        lo, hi = (ratio, hi) if kept > 1 - TARGET_FLOPS else (lo, ratio)
    return best[1]


# ---- measuring -------------------------------------------------------------------------------------
def finetune(model: nn.Module, data: fm.FashionMNIST, steps: int, seed: int) -> None:
    """``steps`` SGD steps on shuffled training batches of 128 (lr 0.02 cosine, momentum 0.9, Nesterov)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    done = 0
    for epoch in itertools.count():
        for images, labels in data.train_loader(128, seed=seed * 100_003 + epoch):
            loss = F.cross_entropy(model(fm.random_flip(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == steps:
                model.eval()
                return


def measure(run: Run, pruned: nn.Module, base: nn.Module, data: fm.FashionMNIST, args: argparse.Namespace) -> None:
    x = torch.zeros(INPUT)
    run.parameters = maskprune.count_parameters(pruned)
    run.flops_kept = maskprune.count_flops(pruned, x) / maskprune.count_flops(base, x)
    test = data.test_loader()
    run.as_pruned = fm.evaluate(pruned, test)
    maskprune.recalibrate_bn(pruned, data.train_loader(128, seed=run.seed), batches=args.recalibration_batches)
    run.recalibrated = fm.evaluate(pruned, test)
    if run.criterion in args.finetune and (args.finetune_seeds is None or run.seed in args.finetune_seeds):
        finetune(pruned, data, args.finetune_steps, run.seed)
        run.finetuned = fm.evaluate(pruned, test)


def run_one(base: nn.Module, data: fm.FashionMNIST, run: Run, args: argparse.Namespace) -> Run:
    start = time.perf_counter()
    try:
        torch.manual_seed(run.seed)
        batches = calibration(data, run.seed)
        library, name = run.criterion.split(":")
        if library == "mp":
            pruned = prune_maskprune(base, name, run.allocation, batches, run.seed)
        else:
            pruned = prune_torch_pruning(base, name, run.allocation, batches)
        measure(run, pruned, base, data, args)
    except Exception as error:  # report it and go on with the other runs
        frame = traceback.extract_tb(error.__traceback__)[-1]
        run.error = f"{type(error).__name__}: {error} (at {os.path.relpath(frame.filename)}:{frame.lineno})"
    run.seconds = time.perf_counter() - start
    return run


# ---- the report ------------------------------------------------------------------------------------
def mean_std(values: Sequence[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 100:.2f} ± {std * 100:.2f}"


def finetuned(done: list[Run]) -> str:
    """The fine-tuned cell; the seeds it covers when they are not all of the row's."""
    tuned = [r for r in done if r.finetuned is not None]
    cell = mean_std([r.finetuned for r in tuned])
    if tuned and len(tuned) < len(done):
        cell += f" (seed{'s' if len(tuned) > 1 else ''} {','.join(str(r.seed) for r in tuned)})"
    return cell


def table(runs: list[Run], allocation: str) -> list[str]:
    """One line per criterion: the three columns as mean ± std over base seeds, the structure."""
    lines = [
        "| criterion | as pruned | BN re-estimated | fine-tuned | FLOPs kept | parameters | seeds |",
        "| --- | --: | --: | --: | --: | --: | --: |",
    ]
    for criterion in dict.fromkeys(r.criterion for r in runs):
        done = [r for r in runs if r.criterion == criterion and r.allocation == allocation and not r.error]
        if not done:
            continue
        flops = [r.flops_kept for r in done]
        params = [r.parameters for r in done]
        cells = [
            label(criterion),
            mean_std([r.as_pruned for r in done]),
            mean_std([r.recalibrated for r in done]),
            finetuned(done),
            f"{min(flops):.3f}" + (f" - {max(flops):.3f}" if max(flops) - min(flops) >= 0.0005 else ""),
            f"{min(params):,}" + (f" - {max(params):,}" if max(params) != min(params) else ""),
            ",".join(str(r.seed) for r in done),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def best(runs: list[Run], allocations: Sequence[str]) -> list[str]:
    """Each library's best criterion per allocation and column, by the mean over the seeds it ran on."""
    lines = ["| allocation | column | maskprune's best | Torch-Pruning's best |", "| --- | --- | --- | --- |"]
    for allocation in allocations:
        for field, column in (
            ("as_pruned", "as pruned"),
            ("recalibrated", "BN re-estimated"),
            ("finetuned", "fine-tuned"),
        ):
            cells = []
            for library in ("mp", "tp"):
                means = {}
                for criterion in dict.fromkeys(r.criterion for r in runs if r.criterion.startswith(library + ":")):
                    values = [
                        (getattr(r, field), r.seed)
                        for r in runs
                        if r.criterion == criterion and r.allocation == allocation and getattr(r, field) is not None
                    ]
                    if values:
                        means[criterion] = (statistics.mean(v for v, _ in values), [s for _, s in values])
                if not means:
                    cells.append("")
                    continue
                top = max(means, key=lambda c: means[c][0])
                mean, seeds = means[top]
                cells.append(f"`{top.split(':')[1]}` {mean * 100:.2f} (seeds {','.join(map(str, seeds))})")
            lines.append(f"| {allocation} | {column} | {cells[0]} | {cells[1]} |")
    return lines


def label(criterion: str) -> str:
    library, name = criterion.split(":")
    return f"maskprune `{name}`" if library == "mp" else f"Torch-Pruning `{name}`"


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    except (OSError, subprocess.SubprocessError):
        model = "?"
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def report(runs: list[Run], bases: dict[int, float], args: argparse.Namespace, seconds: float) -> str:
    try:
        tp_version = metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        tp_version = "not installed"
    lines = [
        "# maskprune vs Torch-Pruning: Fashion-MNIST SmallResNet" + (" (QUICK smoke test)" if args.quick else ""),
        "",
        f"Command: `{args.command}`; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds / 60:.0f} minutes.",
        f"torch {torch.__version__}, torch-pruning {tp_version}, maskprune {metadata.version('maskprune')}, "
        f"python {platform.python_version()}; {machine()}.",
        f"Base models: SmallResNet {fm.SmallResNet().arch}, {args.base_epochs} epochs, one per seed: "
        + ", ".join(f"seed {s} {a:.2%}" for s, a in bases.items())
        + f"; {len(args.seeds)} base seed(s), mean ± sample std over them.",
        f"Columns: test accuracy (%) of the exported model as pruned; after `maskprune.recalibrate_bn` on "
        f"{args.recalibration_batches} training batches of 128; after {args.finetune_steps} SGD steps from there.",
    ]
    if any(r.finetuned is None for r in runs if not r.error):
        lines.append(
            "A smaller grid: not every run was fine-tuned; a fine-tuned cell names its seeds when they are not "
            "all of its row's."
        )
    lines.append("")
    for allocation in args.allocations:
        what = (
            f"uniform: {RATIO:.0%} of every group's channels"
            if allocation == "uniform"
            else f"global ranking, {TARGET_FLOPS:.0%} of the FLOPs removed"
        )
        lines += [f"## {what}", "", *table(runs, allocation), ""]
    lines += ["## Best of each library, per column", "", *best(runs, args.allocations), ""]
    errors = [f"- {r.criterion} {r.allocation} seed {r.seed}: {r.error}" for r in runs if r.error]
    if errors:
        lines += ["Errors:", "", *errors, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    if args.from_json:  # the report of finished or interrupted runs, as they were measured
        saved = [json.loads(path.read_text()) for path in args.from_json]
        # a later file's run of the same criterion, allocation and seed replaces an earlier one
        merged = {(r["criterion"], r["allocation"], r["seed"]): r for part in saved for r in part["runs"]}
        runs = [Run(**r) for r in merged.values()]
        commands = [c for part in saved for c in part.get("commands", [part["command"]])]
        output, args = args.output, parse_args(shlex.split(commands[0])[2:])  # the first run's own options
        args.output, args.seeds, args.command = output, sorted({r.seed for r in runs}), "`; `".join(commands)
        bases = {int(seed): accuracy for part in saved for seed, accuracy in part["bases"].items()}
        fm.set_threads(args.threads)
        seconds = sum(part.get("seconds", 0.0) for part in saved)
        args.output.write_text(report(runs, bases, args, seconds))
        record = {"command": commands[0], "commands": commands, "bases": bases, "seconds": seconds}
        record["runs"] = [asdict(r) for r in runs]
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        return runs
    start = time.perf_counter()
    fm.set_threads(args.threads)
    data = fm.load_fashion_mnist(args.data)
    if args.quick:
        data = data.subset(2048, 1000)
    runs: list[Run] = []
    bases: dict[int, float] = {}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    json_path = args.output.with_suffix(".json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        base, info = fm.base_model(data, epochs=args.base_epochs, seed=seed, cache_dir=args.cache, log=log)
        bases[seed] = info["test_accuracy"]
        for run in grid(args, seed):
            runs.append(run_one(base, data, run, args))
            r = runs[-1]
            log(
                f"seed {seed} {r.allocation} {r.criterion}: {r.as_pruned} {r.recalibrated} {r.finetuned} "
                f"{r.error or ''} ({r.seconds:.0f} s)"
            )
            record = {"command": args.command, "bases": bases, "seconds": time.perf_counter() - start}
            json_path.write_text(json.dumps({**record, "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    text = report(runs, bases, args, time.perf_counter() - start)
    print(text)
    args.output.write_text(text)
    return runs


def grid(args: argparse.Namespace, seed: int) -> Iterator[Run]:
    for allocation in args.allocations:
        for criterion in args.criteria:
            yield Run(criterion, allocation, seed)


if __name__ == "__main__":
    main()
