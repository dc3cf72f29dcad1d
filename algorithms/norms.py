"""Magnitude criteria: the norm of the filters that produce each channel."""

from __future__ import annotations

from typing import ClassVar

import torch

from maskprune import Algorithm, Group, Member

from ._combine import check_reduction, per_unit, reduce_members, scored_members


class _FilterNorm(Algorithm):
    """The ``p``-norm of each channel's slice in every scored member, normalised per member and reduced.

    A channel that owns several positions of a member (a conv channel flattened into
    linear features, a whole conv group) is one vector: the norm of their concatenation.
    """

    p: ClassVar[int]

    def __init__(self, *, reduction: str = "sum", include_consumers: bool = False) -> None:
        self.reduction = check_reduction(reduction)
        self.include_consumers = bool(include_consumers)

    def score(self, group: Group) -> torch.Tensor | None:
        if group.kind not in self.kinds:
            return None  # a block group: this criterion scores channels
        members = scored_members(group, self.include_consumers)
        return reduce_members([filter_norms(m, group.size, self.p) for m in members], self.reduction)

    def __repr__(self) -> str:
        extra = ", include_consumers=True" if self.include_consumers else ""
        return f"{type(self).__name__}(reduction={self.reduction!r}{extra})"


class L1Norm(_FilterNorm):
    """L1 norm of each filter (Li et al., ICLR 2017): sum of |W[i]|, not divided by the filter size.

    A group's score combines every producer (conv/linear rows writing the channel),
    each normalised by its mean; ``include_consumers=True`` adds the slices that
    read the channel (input columns of the next layers).

    Examples:
        >>> L1Norm(reduction="mean")
        L1Norm(reduction='mean')
    """

    p = 1


class L2Norm(_FilterNorm):
    """L2 norm of each filter, as in soft filter pruning (He et al., IJCAI 2018): sqrt of sum of W[i]^2.

    Members are combined as in :class:`L1Norm` (per-member mean normalisation, then
    ``reduction`` across the producers, plus the consumers with ``include_consumers=True``).

    Examples:
        >>> L2Norm(include_consumers=True)
        L2Norm(reduction='sum', include_consumers=True)
    """

    p = 2


def filter_norms(member: Member, size: int, p: int) -> torch.Tensor:
    """The ``p``-norm (1 or 2) of each channel's slice of ``member``: ``size`` float64 values."""
    w = member.tensor.detach()
    other = [d for d in range(w.dim()) if d != member.dim]
    powered = w.abs() if p == 1 else w.double().square()
    per_position = powered.sum(dim=other) if other else powered
    total = per_unit(member, per_position, size)
    return total if p == 1 else total.sqrt()
