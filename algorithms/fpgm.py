"""FPGM: filters nearest the geometric median of their layer are the most replaceable."""

from __future__ import annotations

import math

import torch

from maskprune import Algorithm, Group

from ._combine import check_reduction, reduce_members, scored_members, unit_rows

DISTANCES = ("l2", "l1", "cosine")


class FPGM(Algorithm):
    """Filter pruning via geometric median (He et al., CVPR 2019).

    In each scored member (the producers: conv/linear rows writing the channel; plus the
    consumers with ``include_consumers=True``; every member if the group has neither),
    channel ``i``'s importance is ``sum_j distance(F_i, F_j)`` over the group's kept
    channels ``j``, where ``F_i`` is the *signed* filter flattened (several positions of
    one channel, such as a conv channel flattened into linear features or a whole conv
    group, are concatenated). The channels with the smallest sums sit nearest the
    geometric median and go first. Each member's sums are divided by their mean, then
    reduced across members with ``reduction`` ("sum", "mean" or "max").

    ``distance``: "l2" (Euclidean, the paper's), "l1" (city block) or "cosine"
    (``1 - cos``). For cosine, a zero filter is at distance 1 from every non-zero filter
    (its cosine is taken as 0) and at distance 0 from another zero filter.

    Scores use the *current* weights and only the channels ``group.keep`` marks as kept:
    removed channels are not candidates and score 0, and they take no part in the other
    channels' sums. A zeroed filter is far from everything, so scoring it would rank it
    among the most important and shift every other channel's sum. (In soft-filter mode
    the engine keeps every channel while scoring, so all filters, as trained so far, count.)

    ``rate_norm < 1`` is the official two-stage form: the kept channels are first ranked
    by the L2 norm of their filters (combined across members like :class:`L2Norm`); only
    the top ``ceil(rate_norm * kept)`` survive to the distance stage, and distances are
    taken among the survivors only. The others score ``-1 / (1 + norm score)``, in
    ``[-1, 0)``: below every distance score, ordered by their norm. The official code's
    ``dist_type`` switch is dead code (it always uses L2); here L1 and cosine are real.

    Examples:
        >>> FPGM(distance="cosine", rate_norm=0.7)
        FPGM(rate_norm=0.7, distance='cosine', reduction='sum')
    """

    def __init__(
        self,
        *,
        rate_norm: float = 1.0,
        distance: str = "l2",
        reduction: str = "sum",
        include_consumers: bool = False,
    ) -> None:
        if isinstance(rate_norm, bool) or not isinstance(rate_norm, (int, float)) or not 0 < rate_norm <= 1:
            raise ValueError(f"rate_norm must be a number in (0, 1] (1 = distances only), got {rate_norm!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.rate_norm = float(rate_norm)
        self.distance = distance
        self.reduction = check_reduction(reduction)
        self.include_consumers = bool(include_consumers)

    def score(self, group: Group) -> torch.Tensor | None:
        if group.kind not in self.kinds:
            return None  # a block group: this criterion scores channels
        members = scored_members(group, self.include_consumers)
        kept = torch.as_tensor(group.keep).nonzero().flatten()
        rows = [unit_rows(m, group.size)[kept.to(m.tensor.device)] for m in members]
        scores = torch.zeros(group.size, dtype=torch.float64)
        survivors = torch.ones(len(kept), dtype=torch.bool)
        if self.rate_norm < 1:
            norms = reduce_members([r.norm(dim=1) for r in rows], self.reduction)
            top = torch.argsort(norms, descending=True, stable=True)[: survivor_count(self.rate_norm, len(kept))]
            survivors = torch.zeros(len(kept), dtype=torch.bool)
            survivors[top] = True
            scores[kept[~survivors]] = -1.0 / (1.0 + norms[~survivors])
        sums = [distance_sums(r[survivors.to(r.device)], self.distance) for r in rows]
        scores[kept[survivors]] = reduce_members(sums, self.reduction)
        return scores

    def __repr__(self) -> str:
        extra = ", include_consumers=True" if self.include_consumers else ""
        return f"FPGM(rate_norm={self.rate_norm}, distance={self.distance!r}, reduction={self.reduction!r}{extra})"


def survivor_count(rate_norm: float, kept: int) -> int:
    """``ceil(rate_norm * kept)``, at least 1, without float noise (0.07 * 100 is 7.000000000000001)."""
    return max(1, math.ceil(round(rate_norm * kept, 9))) if kept else 0


def distance_sums(filters: torch.Tensor, distance: str) -> torch.Tensor:
    """For each row of ``filters`` (n, length), the sum of its distances to every row."""
    if distance == "cosine":
        norms = filters.norm(dim=1)
        zero = norms == 0
        unit = filters / torch.where(zero, torch.ones_like(norms), norms)[:, None]
        cos = torch.where(zero[:, None] & zero[None, :], 1.0, unit @ unit.T)
        dist = (1.0 - cos).clamp(0.0, 2.0)
    else:
        dist = torch.cdist(filters[None], filters[None], p=1.0 if distance == "l1" else 2.0)[0]
    return dist.fill_diagonal_(0.0).sum(dim=1)
