"""Magnitude criteria: the norm of the filters that produce each channel."""

from __future__ import annotations

import torch

from maskprune import Algorithm, Group, Member

from ._combine import check_reduction, combine


class L1Norm(Algorithm):
    """L1 norm of each filter (Li et al., ICLR 2017): sum of |W[i]|, not divided by the filter size.

    A group's score combines every producer (conv/linear rows writing the channel),
    each normalised by its mean; ``include_consumers=True`` adds the slices that
    read the channel (input columns of the next layers).

    Example:
        >>> L1Norm(reduction="mean")
        L1Norm(reduction='mean')
    """

    def __init__(self, *, reduction: str = "sum", include_consumers: bool = False) -> None:
        self.reduction = check_reduction(reduction)
        self.include_consumers = include_consumers

    def score(self, group: Group) -> torch.Tensor:
        members = group.producers()
        if self.include_consumers:
            members += [m for m in group.members if m.role == "consumer"]
        members = members or group.members
        return combine(group, members, _l1, self.reduction)

    def __repr__(self) -> str:
        return f"L1Norm(reduction={self.reduction!r})"


def _l1(member: Member) -> torch.Tensor:
    w = member.tensor.detach()
    other = [d for d in range(w.dim()) if d != member.dim]
    return w.abs().sum(dim=other) if other else w.abs()
