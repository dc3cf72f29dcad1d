"""What one ``do_mask()`` decides: the step of the schedule, the kept count per group, the kept channels.

The schedule gives the ratio (or FLOPs fraction) this step asks for; the
allocation turns it into kept counts per group; the criterion's scores pick the
channels. A FLOPs target is met by bisection over the ratio (or, for a global
ranking, over the number of channels removed), counting each candidate's FLOPs on
the would-be exported shapes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _allocate as alloc

if TYPE_CHECKING:
    from ._algorithm import Algorithm
    from ._groups import Group
    from ._selection import Selection
    from ._settings import Settings

FLOPS_TOLERANCE = 0.002  # stop searching closer than this to the FLOPs target (the promise is 0.01)
MAX_SEARCH = 24


@dataclass
class Decision:
    """New keep flags of the groups a step touched, and the ratio each group was asked for."""

    keep: np.ndarray
    requested: dict[int, float] = field(default_factory=dict)


class Pruner:
    """The schedule's state (step, layer cursor) and the allocation over one :class:`Selection`.

    ``flops(plan, keep)`` counts the FLOPs of the export ``plan`` describes (made from the keep flags ``keep``; the
    empty plan: the dense model).
    """

    def __init__(self, selection: Selection, settings: Settings, flops: Callable[..., int]) -> None:
        self.selection = selection
        self.settings = settings
        self.flops = flops
        self.algorithm: Algorithm | None = None  # the criterion and its prepare hook, as of the last decide()
        self.prepare: Callable[[Sequence[Group]], None] = _no_preparation
        self.step = 0
        self.cursor = 0
        self.weights: np.ndarray | None = None
        self.layer_counts: tuple[np.ndarray, np.ndarray] | None = None
        self.overrides = self._overrides()
        self.alignment = _alignment(selection)

    # ---- the step ----------------------------------------------------------------------
    def finished(self) -> bool:
        s = self.settings
        if s.pre_layer:
            return self.cursor >= len(self.selection.groups)
        return self.step >= s.steps and s.semantics == "frozen"

    def decide(self, algorithm: Algorithm, prepare: Callable[[Sequence[Group]], None]) -> Decision:
        """The keep flags after the next step (the selection's flags are not changed).

        ``prepare(groups)`` runs before ``algorithm`` scores ``groups`` (the criterion's own hook).
        """
        self.algorithm, self.prepare = algorithm, prepare
        s, every = self.settings, self.selection.groups
        groups = [every[self.cursor]] if s.pre_layer else every
        step = min(self.step + 1, s.steps)
        candidates = self.selection.keep.copy()
        if s.semantics == "soft":
            for g in groups:
                candidates[g.start : g.start + g.size] = True
        if s.pre_layer:
            if self.layer_counts is None:
                self.layer_counts = self._counts(every, self._scores(every, candidates), candidates, 1, 1)
            scores = self._scores(groups, candidates)
            counts, ratios = (part[[g.index for g in groups]] for part in self.layer_counts)
        else:
            scores = self._scores(groups, candidates)
            counts, ratios = self._counts(groups, scores, candidates, step, s.steps)
        keep = candidates.copy()
        requested = {}
        for g, kept, ratio in zip(groups, counts, ratios, strict=True):
            if scores[g.index] is None:
                continue  # declined by the criterion: left as it is
            part = slice(g.start, g.start + g.size)
            keep[part] = alloc.choose(scores[g.index], candidates[part], int(kept))
            # frozen: channels removed at earlier steps stay removed, whatever smaller ratio this step asks
            already = 1.0 - candidates[part].sum() / g.size
            requested[g.index] = max(float(ratio), float(already))
        return Decision(keep, requested)

    def advance(self) -> None:
        if self.settings.pre_layer:
            self.cursor += 1
        else:
            self.step = min(self.step + 1, self.settings.steps)

    # ---- scores ------------------------------------------------------------------------
    def _scores(self, groups: list[Group], candidates: np.ndarray) -> dict[int, np.ndarray]:
        """The criterion's scores of ``groups`` as seen in a view whose flags are ``candidates``."""
        algorithm = self.algorithm
        view = self.selection.candidates(candidates).groups
        kinds = getattr(algorithm, "kinds", ("channels",))
        seen = [view[g.index] for g in groups if g.kind in kinds]  # a channel criterion is not asked about blocks
        self.prepare(seen)
        scores = {g.index: None for g in groups}
        for g in seen:
            raw = algorithm.score(g)
            scores[g.index] = None if raw is None else _as_scores(raw, g, algorithm)
        return scores

    # ---- allocation --------------------------------------------------------------------
    def _counts(
        self, groups: list[Group], scores: dict, candidates: np.ndarray, step: int, steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Kept channels per group at this step of the schedule, and the ratio each group was asked for."""
        s = self.settings
        fixed = {
            g.index: alloc.ramp_ratio(self.overrides[g.index], step, steps, s.ramp)
            for g in groups
            if g.index in self.overrides
        }
        if s.target_params is not None:
            target = alloc.ramp_ratio(1.0 - s.target_params, step, steps, s.ramp)
            return self._counts_for_budget(groups, scores, candidates, target, fixed, "params")
        if s.target_flops is None:
            ratio = alloc.ramp_ratio(s.ratio, step, steps, s.ramp)
            return self._counts_at(groups, scores, candidates, ratio, fixed)
        target = alloc.ramp_ratio(s.target_flops, step, steps, s.ramp)
        return self._counts_for_budget(groups, scores, candidates, target, fixed, "flops")

    def _counts_at(
        self,
        groups: list[Group],
        scores: dict,
        candidates: np.ndarray,
        ratio: float,
        fixed: dict[int, float],
        dither: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Kept counts and ratios asked when the model loses ``ratio`` of its channels (per group or globally).

        ``fixed`` gives the ratio of groups with a per-module override; declined groups keep everything.
        """
        s = self.settings
        sizes = np.asarray([g.size for g in groups])
        ratios = np.asarray([fixed.get(g.index, 0.0) for g in groups])
        declined = np.asarray([scores.get(g.index, 0) is None for g in groups], dtype=bool)
        free = np.asarray([g.index not in fixed for g in groups], dtype=bool) & ~declined
        if s.allocation == "global" and free.any():
            kept = alloc.kept_counts(sizes, np.where(free, 0.0, ratios), s.min_channels, s.round_to)
            pool = [g for g, f in zip(groups, free, strict=True) if f]
            ranked = [self._ranked(g, scores[g.index], candidates) for g in pool]
            floors = np.asarray([max(s.min_channels, math.ceil((1 - s.max_ratio) * g.size)) for g in pool])
            total = int(round(ratio * sizes[free].sum()))
            kept[free] = alloc.global_kept(ranked, total, np.minimum(floors, sizes[free]), s.round_to)
            kept = self._fitted(groups, kept, sizes)
            ratios[free] = 1.0 - kept[free] / sizes[free]
            return kept, ratios
        weights = self._group_weights(groups)
        if weights is not None and free.any():
            ratios[free] = alloc.spread_ratios(sizes[free], weights[free], ratio, s.max_ratio)
        else:
            ratios[free] = ratio
        kept = alloc.kept_counts(sizes, ratios, s.min_channels, s.round_to, dither=dither)
        return self._fitted(groups, kept, sizes), ratios

    def _fitted(self, groups: list[Group], kept: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """``kept`` where an MoE layer keeps at least ``top_k`` experts and a width through fused experts keeps a
        multiple of 16 bytes (torch's grouped products ask that of every row they read)."""
        steps = np.asarray([self.alignment.get(g.index, 1) for g in groups], dtype=np.int64)
        kept = np.minimum(np.ceil(kept / steps).astype(np.int64) * steps, sizes)
        return np.maximum(kept, [getattr(g, "top_k", 0) for g in groups])

    def _ranked(self, group: Group, scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        live = candidates[group.start : group.start + group.size]
        if not self.algorithm.comparable_across_groups:
            scores = alloc.normalised(scores, live)
        return np.where(live, scores, -np.inf)

    def _counts_for_budget(
        self,
        groups: list[Group],
        scores: dict,
        candidates: np.ndarray,
        target: float,
        fixed: dict[int, float],
        measure: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Kept counts and ratios asked whose export removes ``target`` of the FLOPs (``measure="flops"``) or of
        the parameters (``"params"``): bisection over the ratio."""
        s = self.settings
        count = self._flops_with if measure == "flops" else self._params_with
        dense = self.flops({}) if measure == "flops" else self.selection.parameter_counts()[0]

        def removed_at(ratio: float, fixed: dict[int, float] = fixed) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
            allocated = self._counts_at(groups, scores, candidates, ratio, fixed, dither=True)
            return 1.0 - count(groups, allocated[0], candidates, scores) / dense, allocated

        most, counts = removed_at(s.max_ratio)
        if most < target - 0.01:
            asked = f"target_flops={target:.3f}" if measure == "flops" else f"target_params={1 - target:.3f}"
            warnings.warn(
                f"{asked} is out of reach: removing max_ratio={s.max_ratio} of every prunable "
                f"group removes {most:.3f} of the {measure} (frozen or ignored layers keep the rest)",
                stacklevel=4,
            )
            return counts
        units = sum(g.size for g in groups)
        best = _bisect(removed_at, target, (most, counts), s.max_ratio, units)
        blocks = {  # the block groups the criterion scored (one it declined keeps its blocks)
            g.index: g.size
            for g in groups
            if g.kind == "block" and g.index not in fixed and scores.get(g.index) is not None
        }
        if abs(best[0] - target) > FLOPS_TOLERANCE and blocks:
            # a block is a coarse step: hold the block groups at each ratio they can take, the channels meet the rest
            steps = sorted({j / size for size in blocks.values() for j in range(size)})
            for step in (r for r in steps if r <= s.max_ratio):
                held = fixed | {index: step for index in blocks}
                first = removed_at(s.max_ratio, held)
                again = _bisect(lambda r, h=held: removed_at(r, h), target, first, s.max_ratio, units)
                if abs(again[0] - target) < abs(best[0] - target):
                    best = again
                if abs(best[0] - target) <= FLOPS_TOLERANCE:
                    break
        return best[1]

    def _flops_with(self, groups: list[Group], counts: np.ndarray, candidates: np.ndarray, scores: dict) -> int:
        """FLOPs of the export where each group keeps ``counts`` units (those :meth:`_keep_with` picks)."""
        keep = self._keep_with(groups, counts, candidates, scores)
        return self.flops(self.selection.plan(keep), keep)

    def _params_with(self, groups: list[Group], counts: np.ndarray, candidates: np.ndarray, scores: dict) -> int:
        """Parameters of the export where each group keeps ``counts`` units (those :meth:`_keep_with` picks)."""
        return self.selection.parameter_counts(self._keep_with(groups, counts, candidates, scores))[1]

    def _keep_with(self, groups: list[Group], counts: np.ndarray, candidates: np.ndarray, scores: dict) -> np.ndarray:
        """The keep flags where each group keeps ``counts`` units: in a channel group the first live ones (which
        ones does not change a count), in a block or expert group the ones the criterion keeps. A removed block
        takes its channels with it, so counting the wrong blocks would count channels removed twice."""
        keep = self.selection.keep.copy()
        for g, kept in zip(groups, counts, strict=True):
            part = slice(g.start, g.start + g.size)
            if g.kind != "channels" and scores.get(g.index) is not None:
                keep[part] = alloc.choose(scores[g.index], candidates[part], int(kept))
                continue
            live = np.flatnonzero(candidates[part])
            flags = np.zeros(g.size, dtype=bool)
            flags[live[: int(kept)]] = True
            keep[part] = flags if len(live) >= kept else candidates[part]
        return keep

    # ---- per-group options -------------------------------------------------------------
    def _group_weights(self, groups: list[Group]) -> np.ndarray | None:
        if self.weights is None:
            sizes = np.asarray([g.size for g in self.selection.groups])
            weights = self.algorithm.group_weights(sizes)
            if weights is None:
                return None
            self.weights = np.asarray(weights, dtype=float)
            if self.weights.shape != sizes.shape:
                raise ValueError(
                    f"{type(self.algorithm).__name__}.group_weights() returned shape {self.weights.shape}; "
                    f"expected ({len(sizes)},), one weight per group"
                )
        return self.weights[[g.index for g in groups]]

    def _overrides(self) -> dict[int, float]:
        """Per-group ratio from ``ratios``: the most specific module prefix of the group's first producer."""
        ratios = self.settings.ratios
        if not ratios:
            return {}
        found = {}
        for g in self.selection.groups:
            path = group_path(g)
            matching = [k for k in ratios if k == "<root>" or path == k or path.startswith(k + ".")]
            best = max(matching, key=lambda k: -1 if k == "<root>" else len(k), default=None)
            if best is not None:
                found[g.index] = ratios[best]
        return found


def _bisect(
    removed_at: Callable[[float], tuple[float, Any]], target: float, best: tuple[float, Any], high: float, units: int
) -> tuple[float, Any]:
    """The ratio in [0, high] whose removed fraction is nearest ``target`` (removed_at grows with the ratio)."""
    low, finest = 0.0, 0.5 / max(1, units)
    for _ in range(MAX_SEARCH):
        middle = (low + high) / 2
        removed, counts = removed_at(middle)
        if abs(removed - target) < abs(best[0] - target):
            best = (removed, counts)
        if abs(removed - target) <= FLOPS_TOLERANCE or high - low <= finest:
            break
        low, high = (middle, high) if removed < target else (low, middle)
    return best


def group_path(group: Group) -> str:
    """Where a group sits: its container (block groups), else the module of its first producer (or member)."""
    if group.kind == "block":
        return group.container
    if group.kind == "experts":
        return group.experts
    return (group.producers() or group.members)[0].module


def _alignment(selection: Selection) -> dict[int, int]:
    """Channels per 16 bytes of the groups holding a dim of fused expert tensors other than the experts' own."""
    fused = {f"{m}.{a}" if m else a for layer in selection.layout.experts for m, a in layer.tensors}
    if not fused:
        return {}
    found = {}
    for g in selection.groups:
        sizes = [16 // m.tensor.element_size() for m in g.members if m.name in fused and m.dim]
        if sizes:
            found[g.index] = max(1, *sizes)
    return found


def _no_preparation(groups: Sequence[Group]) -> None:
    return None


def _as_scores(raw: object, group: Group, algorithm: object) -> np.ndarray:
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().double().numpy()
    scores = np.asarray(raw, dtype=float)
    if scores.shape != (group.size,):
        raise ValueError(
            f"{type(algorithm).__name__}.score() returned shape {scores.shape} for group "
            f"{group.index}; expected ({group.size},), one score per channel"
        )
    if np.isnan(scores).any():
        raise ValueError(f"{type(algorithm).__name__}.score() returned NaN for group {group.index}")
    return scores
