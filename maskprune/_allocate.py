"""Allocation: how many channels each group keeps, and which ones.

A criterion scores channels; the allocation turns a requested ratio into kept
counts per group (uniform, weighted per group, or a global ranking of normalised
scores), applies ``min_channels`` and ``round_to``, and picks the lowest scores.
Schedules (:func:`ramp_ratio`) say which ratio a step asks for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RAMPS = ("linear", "exp", "cubic")
ALLOCATIONS = ("uniform", "global")


def ramp_ratio(final: float, step: int, steps: int, ramp: str) -> float:
    """The removal ratio reached after ``step`` of ``steps`` steps towards ``final``.

    ``linear`` grows the ratio evenly; ``exp`` shrinks the kept fraction by the same
    factor each step; ``cubic`` is AGP (Zhu & Gupta, 2017): fast first, gentle last.

    Examples:
        >>> round(ramp_ratio(0.5, 1, 2, "linear"), 3), round(ramp_ratio(0.5, 1, 2, "cubic"), 3)
        (0.25, 0.438)
    """
    progress = min(max(step, 0), steps) / steps
    if ramp == "linear":
        return final * progress
    if ramp == "exp":
        return 1.0 - (1.0 - final) ** progress
    if ramp == "cubic":
        return final * (1.0 - (1.0 - progress) ** 3)
    raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")


def spread_ratios(sizes: np.ndarray, weights: np.ndarray, ratio: float, max_ratio: float) -> np.ndarray:
    """Ratios proportional to ``weights`` whose channel-weighted mean is ``ratio``, each at most ``max_ratio``.

    What a capped group cannot take is shared among the others (water filling).

    Examples:
        >>> spread_ratios(np.array([10, 10]), np.array([1.5, 0.5]), 0.5, 0.6).tolist()
        [0.6, 0.4]
    """
    sizes = sizes.astype(float)
    weights = np.clip(np.asarray(weights, dtype=float), 0.0, None)
    ratios = np.zeros(len(sizes))
    free = weights > 0
    budget = ratio * sizes.sum()
    for _ in range(len(sizes) + 1):
        if not free.any() or budget <= 1e-12:
            break
        scale = budget / float((weights[free] * sizes[free]).sum())
        trial = weights * scale
        capped = free & (trial >= max_ratio)
        if not capped.any():
            ratios[free] = trial[free]
            break
        ratios[capped] = max_ratio
        budget -= max_ratio * sizes[capped].sum()
        free &= ~capped
    return ratios


def kept_counts(
    sizes: np.ndarray, ratios: np.ndarray, min_channels: int, round_to: int, *, dither: bool = False
) -> np.ndarray:
    """Channels each group keeps when it loses ``ratios`` of them (floored), at least ``min_channels`` (and 1).

    With ``round_to`` the kept count rounds up to a multiple of it (never above the group size).
    ``dither`` carries each group's rounding remainder to the next (as error diffusion does), so
    the total removed follows the ratio channel by channel even when every group has the same size:
    what a FLOPs target needs on models such as DenseNet, whose groups all jump at the same ratios.

    Examples:
        >>> kept_counts(np.array([64, 10]), np.array([0.5, 0.5]), 1, 8).tolist()
        [32, 8]
        >>> kept_counts(np.array([5, 5, 5]), np.array([0.5, 0.5, 0.5]), 1, 1, dither=True).tolist()
        [3, 2, 3]
    """
    if dither:
        cumulative = np.floor(np.cumsum(ratios * sizes) + 1e-9).astype(np.int64)
        removed = np.minimum(np.diff(cumulative, prepend=0), np.floor(ratios * sizes + 1 - 1e-9).astype(np.int64))
    else:
        removed = np.floor(ratios * sizes + 1e-9).astype(np.int64)
    kept = np.maximum(sizes - removed, np.minimum(max(min_channels, 1), sizes))
    if round_to > 1:
        kept = np.minimum(np.ceil(kept / round_to).astype(np.int64) * round_to, sizes)
    return kept


def global_kept(scores: Sequence[np.ndarray], total_remove: int, floors: np.ndarray, round_to: int) -> np.ndarray:
    """Kept counts when the ``total_remove`` lowest scores across all groups go, each group keeping ``floors``.

    ``scores`` are already comparable across groups (``-inf`` marks channels that must go first).

    Examples:
        >>> global_kept([np.array([1.0, 5.0]), np.array([2.0, 3.0, 4.0])], 2, np.array([1, 1]), 1).tolist()
        [1, 2]
    """
    sizes = np.asarray([len(s) for s in scores])
    eligible = []
    for g, s in enumerate(scores):
        order = np.sort(s)[: max(0, sizes[g] - floors[g])]
        eligible.append(np.stack([order, np.full(len(order), g)], axis=1) if len(order) else np.zeros((0, 2)))
    pool = np.concatenate(eligible) if eligible else np.zeros((0, 2))
    take = pool[np.argsort(pool[:, 0], kind="stable")[: max(0, total_remove)]]
    removed = np.bincount(take[:, 1].astype(np.int64), minlength=len(scores))
    kept = sizes - removed
    if round_to > 1:
        kept = np.minimum(np.ceil(kept / round_to).astype(np.int64) * round_to, sizes)
    return kept


def normalised(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Scores divided by the mean of the candidates' scores, so groups rank against each other fairly."""
    values = scores[candidates]
    mean = float(np.abs(values).mean()) if len(values) else 0.0
    return scores / mean if mean > 0 and math.isfinite(mean) else scores


def choose(scores: np.ndarray, keep: np.ndarray, kept: int) -> np.ndarray:
    """Keep flags with the ``kept`` highest-scoring candidates (``keep`` marks the candidates)."""
    ranked = np.where(keep, scores, -np.inf)
    order = np.argsort(ranked, kind="stable")
    new = np.zeros_like(keep)
    new[order[len(keep) - kept :]] = True
    return new & keep if keep.sum() >= kept else keep.copy()
