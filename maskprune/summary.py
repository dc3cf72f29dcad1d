"""Before/after comparison of an original and a pruned model: parameters, FLOPs, latency, channels per layer.

Examples:
    >>> original = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> mask = Mask(original, torch.randn(1, 3, 16, 16), algorithm=L1Norm(), ratio=0.5).make()
    >>> mask.do_mask(); pruned = mask.generate_pruned_model()
    True
    >>> comparison = compare(original, pruned, torch.randn(1, 3, 16, 16), min_run_time=0.01)
    >>> comparison.parameters, comparison.flops
    ((516, 260), (167616, 83808))
    >>> layer_channels(original, pruned)
    [('0', 4, 8), ('2', 4, 4)]
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._records import call_model, evaluating, iter_tensors
from .measure import count_flops, count_parameters

BLOCK_SECONDS = 0.01  # runs timed together: a block long enough for the clock, short enough to show the spread
MIN_BLOCKS = 5  # an interquartile range needs a few
NOISY = 0.1  # an interquartile range above this fraction of the median: the latency ratio is not to be trusted


@dataclass(frozen=True)
class Latency:
    """Seconds per forward pass: the median and interquartile range over ``blocks`` timed blocks of runs."""

    median: float
    iqr: float
    blocks: int
    threads: int

    @property
    def noisy(self) -> bool:
        return self.iqr > NOISY * self.median


@dataclass
class Comparison:
    """Parameters, FLOPs and latency (see :func:`time_forward`) of two models on the same inputs."""

    parameters: tuple[int, int]
    flops: tuple[int, int]
    latency: tuple[Latency, Latency]
    channels: tuple[int, int] | None = None

    def rows(self) -> list[tuple[str, float | int, float | int]]:
        rows: list[tuple[str, float | int, float | int]] = []
        if self.channels is not None:
            rows.append(("prunable channels", *self.channels))
        before, after = self.latency
        rows += [
            ("parameters", *self.parameters),
            ("GFLOPs", self.flops[0] / 1e9, self.flops[1] / 1e9),
            ("latency (ms)", before.median * 1e3, after.median * 1e3),
            ("latency IQR (ms)", before.iqr * 1e3, after.iqr * 1e3),
        ]
        return rows

    def __str__(self) -> str:
        lines = [
            f"| {'':18} | {'before':>14} | {'after':>14} | {'after/before':>12} |",
            f"|{'-' * 20}|{'-' * 16}|{'-' * 16}|{'-' * 14}|",
        ]
        for label, before, after in self.rows():
            fmt = "{:>14,.3f}" if isinstance(before, float) else "{:>14,}"
            ratio = "" if "IQR" in label else f"{after / before if before else float('nan'):.3f}"
            lines.append(f"| {label:18} | {fmt.format(before)} | {fmt.format(after)} | {ratio:>12} |")
        before, after = self.latency
        threads = f"{before.threads} thread{'s' if before.threads > 1 else ''}"
        lines.append(
            f"latency: median and interquartile range of {before.blocks} and {after.blocks} timed blocks "
            f"(torch.utils.benchmark, {threads})"
        )
        if before.noisy or after.noisy:
            lines.append(
                f"latency is noisy here (an interquartile range over {NOISY:.0%} of the median): compare it only "
                "on a quiet machine or with a longer timing"
            )
        return "\n".join(lines)


def compare(
    original: nn.Module,
    pruned: nn.Module,
    inputs: Any,
    *,
    channels: tuple[int, int] | None = None,
    threads: int = 1,
    min_run_time: float = 1.0,
) -> Comparison:
    """Measure ``original`` and ``pruned`` on ``inputs``; ``channels`` is (total, kept) prunable channels if known.
    ``threads`` and ``min_run_time``: see :func:`time_forward`.

    Examples:
        >>> compare(nn.Linear(8, 8), nn.Linear(8, 4), torch.randn(1, 8), min_run_time=0.01).parameters
        (72, 36)
    """
    return Comparison(
        parameters=(count_parameters(original), count_parameters(pruned)),
        flops=(count_flops(original, inputs), count_flops(pruned, inputs)),
        latency=tuple(time_forward([original, pruned], inputs, threads=threads, min_run_time=min_run_time)),
        channels=channels,
    )


def time_forward(
    models: nn.Module | Sequence[nn.Module], inputs: Any, *, threads: int = 1, min_run_time: float = 1.0
) -> list[Latency]:
    """Time one forward pass of each of ``models`` on ``inputs`` in eval mode without gradients, by
    ``torch.utils.benchmark``'s ``Timer`` on ``threads`` threads, accelerators synchronized.

    After two warm-up runs each model runs in blocks of about 10 ms (one run where a run takes longer), at least
    5 blocks and ``min_run_time`` seconds; the models take turns block by block, so that a machine that slows
    down or speeds up meanwhile shifts them alike. The median and interquartile range are of the blocks' times
    per run.

    Examples:
        >>> (latency,) = time_forward(nn.Linear(3, 2), torch.randn(1, 3), min_run_time=0.01)
        >>> latency.median < 1.0, latency.blocks >= 5, latency.threads
        (True, True, 1)
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be a positive number of seconds, got {min_run_time!r}")
    models = [models] if isinstance(models, nn.Module) else list(models)
    benchmark = _benchmark()
    run = "call_model(model, inputs)"
    scope = {"call_model": call_model, "inputs": inputs}
    timers = [benchmark.Timer(run, globals={**scope, "model": m}, num_threads=threads) for m in models]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for model in models:
            stack.enter_context(evaluating(model))
        runs, blocks = [], []
        for timer in timers:
            timer.timeit(2)  # warm-up: lazy initialisation, caches
            once = timer.timeit(1).median
            runs.append(max(1, math.ceil(BLOCK_SECONDS / once)))
            blocks.append(max(MIN_BLOCKS, math.ceil(min_run_time / (runs[-1] * once))))
        measured: list[list[Any]] = [[] for _ in models]
        for turn in range(max(blocks)):
            for i, timer in enumerate(timers):
                if turn < blocks[i]:
                    measured[i].append(timer.timeit(runs[i]))
    merged = [benchmark.Measurement.merge(m)[0] for m in measured]
    return [Latency(m.median, m.iqr, len(m.times), threads) for m in merged]


def measure_latency(model: nn.Module, inputs: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in seconds of one forward pass in eval mode without gradients (after ``warmup`` runs).

    Examples:
        >>> measure_latency(torch.nn.Linear(3, 2), torch.randn(1, 3)) < 1.0
        True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times = []
    with evaluating(model), torch.no_grad():
        for run in range(warmup + repeats):
            _synchronize(inputs)
            start = time.perf_counter()
            call_model(model, inputs)
            _synchronize(inputs)
            if run >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _benchmark() -> Any:
    """``torch.utils.benchmark``, imported without the warning its import of ``torch.utils.cpp_extension`` logs on a
    CUDA build of torch without a CUDA runtime (it compiles nothing for this timing)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark


def layer_channels(original: nn.Module, pruned: nn.Module) -> list[tuple[str, int, int]]:
    """(layer name, kept, total) output channels of every layer with a weight of 2 or more dimensions.

    Examples:
        >>> layer_channels(torch.nn.Linear(3, 4), torch.nn.Linear(3, 2))
        [('<root>', 2, 4)]
    """
    after = dict(pruned.named_modules())
    rows = []
    for name, module in original.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and name in after:
            rows.append((name or "<root>", _outputs(after[name]), _outputs(module)))
    return rows


def _outputs(module: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "embedding_dim"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return int(module.weight.shape[0])


def plot_channels(rows: list[tuple[str, int, int]], path: str | os.PathLike, title: str = "") -> None:
    """Bar chart of kept versus total output channels per layer, written to ``path`` (PNG; needs matplotlib).

    Examples:
        >>> plot_channels([("conv1", 32, 64), ("conv2", 48, 64)], "channels.png", "L1, ratio 0.5")
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or maskprune[plot])") from error
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if not rows:
        raise ValueError("no layer to plot (the model has no weight of 2 or more dimensions)")
    names, kept, total = zip(*rows, strict=True)
    positions = range(len(rows))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.18 * len(rows) + 2), 4.0), dpi=100)
    try:
        axes.bar(positions, total, color="#d0d7e1", label="total")
        axes.bar(positions, kept, color="#2f6db5", label="kept")
        axes.set_xticks(list(positions), names, rotation=90, fontsize=6)
        axes.set_ylabel("output channels")
        axes.set_title(title or "kept vs total channels per layer")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)


def _synchronize(inputs: Any) -> None:
    if any(t.is_cuda for t in iter_tensors(inputs)):
        torch.cuda.synchronize()
