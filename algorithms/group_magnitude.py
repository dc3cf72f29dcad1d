"""Group magnitude: every coupled slice of a channel (producers, consumers, norm scales), as DepGraph scores it."""

from __future__ import annotations

import torch

from maskprune import Algorithm, Group, Member

from ._combine import check_reduction, per_unit, reduce_members


class GroupMagnitude(Algorithm):
    """The magnitude of each channel over its whole dependency group (Fang et al., DepGraph, CVPR 2023).

    Every member of the group contributes ``sum |w|^p`` over the channel's slice: producers
    (the conv/linear rows that write the channel), consumers (the input columns that read
    it) and, with ``include_norms``, the scale (gamma) of each norm layer over the channel.
    Norm shifts (beta) and producer biases are left out. For ``p=2`` this is the squared L2
    norm, the group importance of the DepGraph paper.

    Each member's per-channel values are divided by their mean over the candidate channels
    (``group.keep``), so that a wide 3x3 conv, a 1x1 conv and a vector of 20 gammas weigh the
    same; then ``reduction`` (``"mean"``, ``"sum"`` or ``"max"``) combines the members.

    Where it differs from Torch-Pruning 1.6's ``GroupMagnitudeImportance`` (``normalizer="mean"``):
    Torch-Pruning adds the raw ``sum |w|^p`` of the members and divides the *group's* result by
    its mean, so the member with the most weights per channel (the widest consumer) dominates
    and a norm's scale, one number per channel, barely counts; here each member is normalised
    first. Torch-Pruning's default is ``p=2``; its channel positions come from the dependency
    graph, ours from the traced channel flow (the same slices on plain CNNs).

    Example:
        >>> from maskprune import Mask
        >>> from maskprune.testing import TINY_MODELS
        >>> model, x = TINY_MODELS["batch_norm2d"]()
        >>> mask = Mask(model, x, algorithm=GroupMagnitude(p=1), ratio=0.5).make()
        >>> mask.do_mask()
        True
        >>> GroupMagnitude()
        GroupMagnitude(p=2, include_norms=True, reduction='mean')
    """

    def __init__(self, p: int = 2, *, include_norms: bool = True, reduction: str = "mean") -> None:
        if p not in (1, 2) or isinstance(p, bool):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = p
        self.include_norms = bool(include_norms)
        self.reduction = check_reduction(reduction)

    def score(self, group: Group) -> torch.Tensor | None:
        members = group_members(group, self.include_norms)
        if not members:
            return None
        scores = [powered_sums(m, group.size, self.p) for m in members]
        return reduce_members(scores, self.reduction, group.keep)

    def __repr__(self) -> str:
        return f"GroupMagnitude(p={self.p}, include_norms={self.include_norms}, reduction={self.reduction!r})"


def group_members(group: Group, include_norms: bool) -> list[Member]:
    """Producers and consumers of ``group``, plus its norm scales (norm members other than a ``bias``)."""
    members = [m for m in group.members if m.role in ("producer", "consumer")]
    if include_norms:
        members += [m for m in group.members if m.role == "norm" and m.name.rpartition(".")[2] != "bias"]
    return members


def powered_sums(member: Member, size: int, p: int) -> torch.Tensor:
    """``sum |w|^p`` over each channel's slice of ``member``: ``size`` float64 values."""
    w = member.tensor.detach().double()
    other = [d for d in range(w.dim()) if d != member.dim]
    powered = w.abs() if p == 1 else w.square()
    return per_unit(member, powered.sum(dim=other) if other else powered, size)
