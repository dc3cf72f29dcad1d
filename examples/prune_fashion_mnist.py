"""Prune a small ResNet trained on Fashion-MNIST while fine-tuning it, export it, and show what changed.

The main job of maskprune, end to end on real data (two CPU cores are enough):

1. train a small ResNet (or read it from ``.cache/``): about 91% test accuracy;
2. ``Mask(model, ..., algorithm=FPGM(), target_flops=0.5, steps=8, ramp="cubic")``, then a short
   fine-tuning loop that calls ``mask.do_mask()`` every few SGD steps until the schedule reaches
   its target, and keeps training the masked model (same shapes: same optimizer, same loop);
3. ``mask.generate_pruned_model()``: a plain, smaller model, verified against the masked one;
4. a before/after table of test accuracy, parameters, FLOPs and CPU latency.

Example:
    python examples/prune_fashion_mnist.py                                   # FPGM, half the FLOPs, iterative
    python examples/prune_fashion_mnist.py --algorithm taylor --schedule oneshot
    python examples/prune_fashion_mnist.py --algorithm l1norm --ratio 0.3 --schedule layer
    python examples/prune_fashion_mnist.py --algorithm bnscale --sparsity-steps 200
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import maskprune.algorithms
import torch
import torch.nn.functional as F
from fashion_mnist import (
    CACHE_DIR,
    DataNotFoundError,
    FashionMNIST,
    IdxError,
    base_model,
    evaluate,
    load_fashion_mnist,
    measure_latency,
    model_device,
    random_flip,
    recalibrated_accuracy,
    set_threads,
)
from torch import nn

import maskprune
from maskprune import Algorithm, Mask

#: Every criterion of maskprune.algorithms, by lower-case class name (fpgm, l1norm, taylor, ...).
ALGORITHMS: dict[str, type[Algorithm]] = {
    name.lower(): cls
    for name in maskprune.algorithms.__all__
    if isinstance(cls := getattr(maskprune.algorithms, name), type) and issubclass(cls, Algorithm)
}
#: Criteria that score channels from gradients: they need a backward pass before a one-shot do_mask().
NEEDS_GRADIENTS = {"taylor"}
SCHEDULES = ("oneshot", "iterative", "layer")
PRUNE_PHASE = 0.5  # iterative and layer schedules prune during the first half of the fine-tuning steps
INPUT = (1, 1, 28, 28)


# ---- options ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options, checked (a bad value exits with a message saying what is allowed)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    what = parser.add_argument_group("what to prune")
    what.add_argument("--algorithm", default="fpgm", type=str.lower, choices=sorted(ALGORITHMS))
    target = what.add_mutually_exclusive_group()
    target.add_argument("--target-flops", type=float, help="fraction of the FLOPs to remove (default 0.5)")
    target.add_argument("--ratio", type=float, help="fraction of every group's channels to remove, instead")
    what.add_argument(
        "--allocation",
        default="uniform",
        choices=("uniform", "global"),
        help="uniform: every group loses the same share; global: channels ranked across groups",
    )
    how = parser.add_argument_group("how")
    how.add_argument(
        "--schedule",
        default="iterative",
        choices=SCHEDULES,
        help="oneshot: one do_mask() then fine-tune; iterative: --steps do_mask() calls while fine-tuning; "
        "layer: pre_layer=True, one group per do_mask() call until mask.finished",
    )
    how.add_argument("--steps", type=int, help="do_mask() calls of the iterative schedule (default 8)")
    how.add_argument("--ramp", default="cubic", choices=("linear", "exp", "cubic"))
    how.add_argument(
        "--semantics",
        default="frozen",
        choices=("frozen", "soft"),
        help="soft: removed filters keep training and every do_mask() re-selects (SFP); frozen once pruning ends",
    )
    how.add_argument("--finetune-steps", type=int, default=400, help="SGD steps on the masked model, pruning included")
    how.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate (cosine decay to 0)")
    how.add_argument("--sparsity-steps", type=int, default=0, help="bnscale: SGD steps with L1 on BN scales first")
    how.add_argument("--sparsity-strength", type=float, default=1e-3, help="bnscale: strength of that L1 penalty")
    how.add_argument("--calibration-batches", type=int, default=8, help="apoz, thinet: batches of 64 images")
    data = parser.add_argument_group("data and base model")
    data.add_argument("--data", type=Path, help="directory of the four idx files (default: /usr/share/datasets)")
    data.add_argument("--base-epochs", type=int, default=3, help="epochs of the base model (cached in .cache/)")
    data.add_argument("--base-seed", type=int, default=0, help="seed of the base model's training")
    data.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning, random criteria, calibration")
    data.add_argument("--batch-size", type=int, default=128)
    data.add_argument("--train-subset", type=int, help="use only the first N training images")
    data.add_argument("--test-subset", type=int, help="use only the first N test images")
    data.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where base models are cached")
    data.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    data.add_argument("--device", default="cpu", help="where to train and prune: cpu, cuda, cuda:1, ... (latency: CPU)")
    data.add_argument("--latency-repeats", type=int, default=50, help="timed forwards per latency (median)")
    args = parser.parse_args(argv)

    if args.target_flops is None and args.ratio is None:
        args.target_flops = 0.5
    if args.target_flops is not None and not 0 < args.target_flops < 1:
        parser.error(f"--target-flops must be in (0, 1), got {args.target_flops}")
    if args.ratio is not None and not 0 <= args.ratio < 1:
        parser.error(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.steps is None:
        args.steps = 8 if args.schedule == "iterative" else 1
    elif args.schedule != "iterative" and args.steps != 1:
        parser.error(f"--steps {args.steps} needs --schedule iterative ({args.schedule} calls do_mask() its own way)")
    for name in ("steps", "base_epochs", "batch_size", "latency_repeats", "calibration_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("finetune_steps", "sparsity_steps", "seed", "base_seed"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    for name in ("train_subset", "test_subset", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.train_subset is not None and args.train_subset < args.batch_size:
        parser.error(f"--train-subset ({args.train_subset}) must hold at least one batch ({args.batch_size})")
    if not (math.isfinite(args.lr) and args.lr > 0) or not args.sparsity_strength >= 0:
        parser.error("--lr must be positive and --sparsity-strength at least 0")
    if args.schedule == "iterative" and int(args.finetune_steps * PRUNE_PHASE) < args.steps:
        parser.error(
            f"--schedule iterative calls do_mask() {args.steps} times during the first half of the fine-tuning: "
            f"--finetune-steps must be at least {math.ceil(args.steps / PRUNE_PHASE)}"
        )
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:0)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    if args.sparsity_steps and not hasattr(ALGORITHMS[args.algorithm], "regularize"):
        regularized = sorted(n for n, c in ALGORITHMS.items() if hasattr(c, "regularize"))
        parser.error(f"--sparsity-steps trains for a criterion with regularize() ({', '.join(regularized)})")
    return args


def build_algorithm(args: argparse.Namespace, data: FashionMNIST) -> Algorithm:
    """The criterion named by ``--algorithm``, given what its constructor asks for.

    ``data`` (APoZ, ThiNet): a fixed, seeded calibration DataLoader of training images; ``seed``
    (Random, Uniform, ThiNet): ``--seed``; ``strength`` (BNScale): ``--sparsity-strength``.
    Taylor needs nothing: the fine-tuning loop's backward passes feed it.
    """
    cls = ALGORITHMS[args.algorithm]
    wanted = inspect.signature(cls).parameters
    kwargs = {}
    if "seed" in wanted:
        kwargs["seed"] = args.seed
    if "strength" in wanted:
        kwargs["strength"] = args.sparsity_strength
    if "data" in wanted:
        return cls(data.calibration_loader(args.calibration_batches, seed=args.seed), **kwargs)
    return cls(**kwargs)


# ---- pruning while fine-tuning ---------------------------------------------------------------------
@dataclass
class Pruned:
    """What :func:`prune` gives back: the (still masked) model's Mask, the exported model, accuracies."""

    mask: Mask
    model: nn.Module
    accuracy: float
    accuracy_after_pruning: float | None  # one shot: right after do_mask(), before any fine-tuning
    accuracy_after_recalibration: float | None  # the same, BatchNorm statistics re-estimated (no training)
    do_mask_calls: int
    seconds: float


def batches(data: FashionMNIST, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches forever, reshuffled (seeded) every epoch."""
    for epoch in itertools.count():
        yield from data.train_loader(batch_size, seed=seed * 100_003 + epoch)


def sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    regularize: Callable[[nn.Module], None] | None = None,
) -> None:
    """One training step: forward, backward, optional ``regularize(model)`` on the gradients, optimizer step."""
    device = model_device(model)
    images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    loss = F.cross_entropy(model(random_flip(images)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if regularize is not None:
        regularize(model)
    optimizer.step()


def prune(
    model: nn.Module, data: FashionMNIST, args: argparse.Namespace, log: Callable[[str], None] | None = print
) -> Pruned:
    """Mask ``model`` (in place), prune it on ``args.schedule`` while fine-tuning, and export it.

    Example:
        >>> result = prune(model, data, parse_args(["--algorithm", "l1norm"]))    # doctest: +SKIP
        >>> result.model                                   # the exported, smaller nn.Module
    """
    log = log or (lambda _: None)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    algorithm = build_algorithm(args, data)
    mask = Mask(
        model,
        data.test_images[:8].to(args.device),  # example inputs: traced once, and the export is checked on them
        algorithm=algorithm,
        **({"ratio": args.ratio} if args.ratio is not None else {"target_flops": args.target_flops}),
        allocation=args.allocation,
        steps=args.steps,
        ramp=args.ramp,
        pre_layer=args.schedule == "layer",
        semantics=args.semantics,
    ).make()
    train = batches(data, args.batch_size, args.seed)
    regularize = getattr(algorithm, "regularize", None)  # BNScale: L1 on BatchNorm scales

    if args.sparsity_steps:  # network slimming: make the BN scales sparse before they are ranked
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        model.train()
        for _ in range(args.sparsity_steps):
            sgd_step(model, optimizer, next(train), regularize)
        log(f"{args.sparsity_steps} sparsity-training steps (L1 on BN scales, strength {args.sparsity_strength:g})")

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mask.track_optimizer(optimizer)  # removed channels get no gradient and no momentum (frozen semantics)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.finetune_steps))

    calls, after_pruning, recalibrated = 0, None, None
    if args.schedule == "oneshot":
        if args.algorithm in NEEDS_GRADIENTS:  # Taylor scores a * dL/da: show it a few batches first
            model.eval()  # (eval mode: the BatchNorm statistics stay those of the base model)
            for _ in range(args.calibration_batches):
                images, labels = (t.to(args.device) for t in next(train))
                F.cross_entropy(model(images), labels).backward()
            optimizer.zero_grad(set_to_none=True)
        mask.do_mask()
        calls = 1
        mask.semantics = "frozen"  # (a no-op when frozen) soft filters end with the selection made
        after_pruning = evaluate(model, data.test_loader())
        recalibrated = recalibrated_accuracy(model, data, seed=args.seed)
        log(
            f"one shot: test accuracy {after_pruning:.2%} right after do_mask(), before fine-tuning "
            f"({recalibrated:.2%} with re-estimated BatchNorm statistics)"
        )
        every, pruning = 0, False
    else:
        # do_mask() every `every` steps during the first half; the second half only fine-tunes
        calls_planned = args.steps if args.schedule == "iterative" else len(mask.groups)
        every, pruning = max(1, int(args.finetune_steps * PRUNE_PHASE) // calls_planned), True

    # The fine-tuning loop. The masked model keeps its shapes, so this is an ordinary training loop:
    # the pruning schedule only adds the `if pruning and ...` block.
    model.train()
    for step in range(1, args.finetune_steps + 1):
        sgd_step(model, optimizer, next(train), regularize if pruning else None)  # Taylor watches this backward
        schedule.step()
        if pruning and step % every == 0:
            mask.do_mask()  # zero the next share of channels (the schedule's next step)
            calls += 1
            # iterative: a fixed number of steps; layer: until every group had its turn
            pruning = calls < args.steps if args.schedule == "iterative" else not mask.finished
            if not pruning:
                log(f"step {step}: pruning done after {calls} do_mask() calls; fine-tuning what is left")
                mask.semantics = "frozen"  # keep the last selection; removed filters stop training
    if pruning:  # a budget too short for the layer schedule: finish it without training
        while not mask.finished:
            mask.do_mask()
            calls += 1
        mask.semantics = "frozen"

    model.eval()
    pruned = mask.generate_pruned_model()  # raises ExportError if it does not compute what the masked model does
    accuracy = evaluate(pruned, data.test_loader())
    return Pruned(mask, pruned, accuracy, after_pruning, recalibrated, calls, time.perf_counter() - start)


# ---- measuring and reporting -----------------------------------------------------------------------
@dataclass
class Metrics:
    """One model's test accuracy, size, FLOPs (batch 1) and median CPU latency (seconds, batch 1 and 64)."""

    accuracy: float
    parameters: int
    flops: int
    latency_1: float
    latency_64: float


def measure(model: nn.Module, data: FashionMNIST, repeats: int, accuracy: float | None = None) -> Metrics:
    """Every column of the before/after table for ``model``."""
    return Metrics(
        evaluate(model, data.test_loader()) if accuracy is None else accuracy,
        maskprune.count_parameters(model),
        maskprune.count_flops(model, torch.zeros(INPUT, device=model_device(model))),
        measure_latency(model, 1, repeats=repeats),
        measure_latency(model, 64, repeats=max(1, repeats // 3)),
    )


@dataclass
class Report:
    """What :func:`main` measured, for tests and benchmarks."""

    base: Metrics
    pruned: Metrics
    accuracy_after_pruning: float | None
    check: maskprune.VerifyResult
    flops_removed: float
    result: Pruned
    sparsity: maskprune.Sparsity  # mask.sparsity() before the mask was removed: kept channels per group
    seconds: float

    def table(self, args: argparse.Namespace) -> str:
        b, p = self.base, self.pruned
        rows = [
            ("test accuracy", f"{b.accuracy:.2%}", f"{p.accuracy:.2%}", f"{(p.accuracy - b.accuracy) * 100:+.2f} pt"),
        ]
        if self.accuracy_after_pruning is not None:
            rows.append(("... right after pruning, no fine-tuning", "", f"{self.accuracy_after_pruning:.2%}", ""))
            recalibrated = self.result.accuracy_after_recalibration
            rows.append(("... the same, BatchNorm statistics re-estimated", "", f"{recalibrated:.2%}", ""))
        rows += [
            ("parameters", f"{b.parameters:,}", f"{p.parameters:,}", f"{p.parameters / b.parameters:.3f}"),
            ("MFLOPs (batch 1)", f"{b.flops / 1e6:.2f}", f"{p.flops / 1e6:.2f}", f"{p.flops / b.flops:.3f}"),
            (
                f"CPU latency, batch 1 (ms, torch threads: {torch.get_num_threads()})",
                f"{b.latency_1 * 1e3:.2f}",
                f"{p.latency_1 * 1e3:.2f}",
                f"{p.latency_1 / b.latency_1:.3f}",
            ),
            (
                "CPU latency, batch 64 (ms)",
                f"{b.latency_64 * 1e3:.2f}",
                f"{p.latency_64 * 1e3:.2f}",
                f"{p.latency_64 / b.latency_64:.3f}",
            ),
        ]
        target = f"ratio={args.ratio}" if args.ratio is not None else f"target_flops={args.target_flops}"
        target += f", {args.allocation} allocation"
        lines = [
            f"{args.algorithm}, {target}, {args.schedule} ({self.result.do_mask_calls} do_mask() calls, "
            f"{args.semantics}), {args.finetune_steps} fine-tuning steps of {args.batch_size}",
            "",
            "| | base | pruned | pruned/base |",
            "| --- | --: | --: | --: |",
            *(f"| {' | '.join(row)} |" for row in rows),
        ]
        return "\n".join(lines)


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] | None = print) -> Report:
    """Train or load the base model, prune it while fine-tuning, export, verify, print the table.

    Example:
        >>> report = main(["--algorithm", "l1norm", "--finetune-steps", "200"])   # doctest: +SKIP
        >>> report.flops_removed                                                  # doctest: +SKIP
        0.499
    """
    start = time.perf_counter()
    args = parse_args(argv)
    say = log or (lambda _: None)
    set_threads(args.threads)
    data = load_fashion_mnist(args.data).subset(args.train_subset, args.test_subset)
    say(f"{data}; device {args.device}; torch threads: {torch.get_num_threads()}")
    base, info = base_model(
        data,
        epochs=args.base_epochs,
        seed=args.base_seed,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        device=args.device,
        log=log,
    )
    before = measure(base, data, args.latency_repeats)

    result = prune(copy.deepcopy(base), data, args, log=log)
    mask, pruned = result.mask, result.model
    # generate_pruned_model() verified the export on the example inputs; check it again on fresh test images
    fresh = data.test_images[-64:].to(args.device)
    check = maskprune.verify(mask.model, pruned, fresh)
    after = measure(pruned, data, args.latency_repeats, accuracy=result.accuracy)
    sparsity = mask.sparsity()
    mask.remove()

    removed = 1 - after.flops / before.flops
    report = Report(before, after, result.accuracy_after_pruning, check, removed, result, sparsity, 0.0)
    report.seconds = time.perf_counter() - start
    say("")
    say(str(sparsity))
    say("")
    say(report.table(args))
    say("")
    say(
        f"soft vs hard on {len(fresh)} fresh test images: max |soft - hard| = {check.max_abs:.3g}, "
        f"relative {check.max_rel:.3g} ({'equal' if check else 'DIFFERENT'}, tolerance {check.rtol:g})"
    )
    say(
        f"FLOPs removed: {report.flops_removed:.1%}; pruning and fine-tuning took {result.seconds:.0f} s, "
        f"everything {report.seconds:.0f} s"
    )
    return report


if __name__ == "__main__":
    try:
        main()
    except (DataNotFoundError, IdxError) as error:
        sys.exit(f"error: {error}")
