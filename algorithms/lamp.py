"""LAMP: layer-adaptive magnitude scores that compare across layers."""

from __future__ import annotations

import torch

from maskprune import Algorithm, Group

from ._combine import check_reduction, scored_members
from .group_magnitude import powered_sums


class LAMP(Algorithm):
    """Layer-adaptive magnitude-based pruning score (Lee et al., ICLR 2021), for channels.

    In each scored layer (a producer, plus the consumers with ``include_consumers``), channel
    ``i`` has the squared L2 norm ``s_i`` of its slice, and its LAMP score is
    ``s_i / sum of s_j over every channel j of that layer with s_j >= s_i`` (ties included).
    The largest channel of a layer scores 1 and every score lies in (0, 1], so scores compare
    across layers: with ``allocation="global"`` LAMP decides how much each layer loses
    (``comparable_across_groups``). A group with several scored layers combines their LAMP
    scores by ``reduction`` without further normalisation. Candidates are the channels
    ``group.keep`` marks; removed channels score 0 and take no part in the sums.

    The paper scores single weights for unstructured pruning; a channel's slice is the unit
    here, as Torch-Pruning's ``LAMPImportance`` does. Torch-Pruning instead applies LAMP's
    normalisation once to the group's mean of raw squared norms of every member (conv, linear
    and norm layers), and breaks ties by sort order.

    Example:
        >>> LAMP()
        LAMP(reduction='mean')
        >>> # Mask(model, x, algorithm=LAMP(), target_flops=0.5, allocation="global")
    """

    comparable_across_groups = True

    def __init__(self, *, reduction: str = "mean", include_consumers: bool = False) -> None:
        self.reduction = check_reduction(reduction)
        self.include_consumers = bool(include_consumers)

    def score(self, group: Group) -> torch.Tensor:
        candidates = torch.as_tensor(group.keep)
        scores = []
        for member in scored_members(group, self.include_consumers):
            squared = powered_sums(member, group.size, 2).cpu()
            scores.append(lamp_scores(torch.where(candidates, squared, torch.zeros_like(squared))))
        stacked = torch.stack(scores)
        if self.reduction == "sum":
            return stacked.sum(0)
        if self.reduction == "mean":
            return stacked.mean(0)
        return stacked.max(0).values

    def __repr__(self) -> str:
        extra = ", include_consumers=True" if self.include_consumers else ""
        return f"LAMP(reduction={self.reduction!r}{extra})"


def lamp_scores(squared: torch.Tensor) -> torch.Tensor:
    """``s_i / sum(s_j for s_j >= s_i)`` for a vector of squared norms (0 where that sum is 0)."""
    ordered, order = squared.sort(descending=True)
    tail = ordered.cumsum(0)  # sum of every value >= ordered[k], up to ties
    # ties: every equal value takes the sum up to the last of them
    last = torch.searchsorted(-ordered, -ordered, right=True) - 1
    denominator = tail[last]
    out = torch.zeros_like(squared)
    out[order] = torch.where(denominator > 0, ordered / denominator.clamp(min=1e-300), torch.zeros_like(ordered))
    return out
