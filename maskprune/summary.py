"""Before/after comparison of an original and a pruned model: parameters, FLOPs, latency, channels per layer.

Examples:
    >>> original = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> mask = Mask(original, torch.randn(1, 3, 16, 16), algorithm=L1Norm(), ratio=0.5).make()
    >>> mask.do_mask(); pruned = mask.generate_pruned_model()
    True
    >>> comparison = compare(original, pruned, torch.randn(1, 3, 16, 16))
    >>> comparison.parameters, comparison.flops
    ((516, 260), (167616, 83808))
    >>> layer_channels(original, pruned)
    [('0', 4, 8), ('2', 4, 4)]
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._records import call_model, evaluating, iter_tensors
from .measure import count_flops, count_parameters


@dataclass
class Comparison:
    """Parameters, FLOPs and median latency (seconds, ``repeats`` runs) of two models on the same inputs."""

    parameters: tuple[int, int]
    flops: tuple[int, int]
    latency: tuple[float, float]
    channels: tuple[int, int] | None = None

    def rows(self) -> list[tuple[str, float | int, float | int]]:
        rows: list[tuple[str, float | int, float | int]] = []
        if self.channels is not None:
            rows.append(("prunable channels", *self.channels))
        rows += [
            ("parameters", *self.parameters),
            ("GFLOPs", self.flops[0] / 1e9, self.flops[1] / 1e9),
            ("latency (ms)", self.latency[0] * 1e3, self.latency[1] * 1e3),
        ]
        return rows

    def __str__(self) -> str:
        lines = [
            f"| {'':18} | {'before':>14} | {'after':>14} | {'after/before':>12} |",
            f"|{'-' * 20}|{'-' * 16}|{'-' * 16}|{'-' * 14}|",
        ]
        for label, before, after in self.rows():
            fmt = "{:>14,.3f}" if isinstance(before, float) else "{:>14,}"
            ratio = after / before if before else float("nan")
            lines.append(f"| {label:18} | {fmt.format(before)} | {fmt.format(after)} | {ratio:>12.3f} |")
        return "\n".join(lines)


def compare(
    original: nn.Module,
    pruned: nn.Module,
    inputs: Any,
    *,
    channels: tuple[int, int] | None = None,
    repeats: int = 10,
) -> Comparison:
    """Measure ``original`` and ``pruned`` on ``inputs``; ``channels`` is (total, kept) prunable channels if known.

    Examples:
        >>> compare(nn.Linear(8, 8), nn.Linear(8, 4), torch.randn(1, 8)).parameters
        (72, 36)
    """
    return Comparison(
        parameters=(count_parameters(original), count_parameters(pruned)),
        flops=(count_flops(original, inputs), count_flops(pruned, inputs)),
        latency=(measure_latency(original, inputs, repeats), measure_latency(pruned, inputs, repeats)),
        channels=channels,
    )


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
