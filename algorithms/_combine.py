"""Combining per-member scores into one score per channel of a group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from maskprune import Group, Member

REDUCTIONS = ("sum", "mean", "max")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def scored_members(group: Group, include_consumers: bool) -> list[Member]:
    """The slices a weight criterion looks at: producers (plus consumers if asked), or every member if none."""
    members = group.producers()
    if include_consumers:
        members += [m for m in group.members if m.role == "consumer"]
    return members or list(group.members)


def per_unit(member: Member, per_position: torch.Tensor, size: int) -> torch.Tensor:
    """Sum a member's per-position values into the group's channels."""
    positions = torch.as_tensor(member.positions, device=per_position.device)
    units = torch.as_tensor(member.units, device=per_position.device)
    out = torch.zeros(size, dtype=torch.float64, device=per_position.device)
    return out.index_add_(0, units, per_position.index_select(0, positions).double())


def unit_rows(member: Member, size: int) -> torch.Tensor:
    """The member's slice of each channel as one row: ``(size, length)`` float64 on the tensor's device.

    Row ``u`` concatenates, in position order, the flattened slices at every position of
    channel ``u`` (a conv channel flattened into several linear features, a whole conv
    group). Channels with fewer positions than others are padded with zeros.

    Examples:
        >>> group = Mask(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)).make().groups[1]
        >>> unit_rows(group.producers()[0], group.size).shape
        torch.Size([64, 576])
    """
    w = member.tensor.detach().movedim(member.dim, 0).reshape(member.tensor.shape[member.dim], -1)
    order = np.lexsort((member.positions, member.units))  # by channel, then by position
    units = member.units[order]
    counts = np.bincount(units, minlength=size)
    width = int(counts.max()) if len(counts) else 0
    slot = np.arange(len(units)) - np.concatenate(([0], np.cumsum(counts)[:-1]))[units]  # index within channel
    rows = torch.zeros(size, width, w.shape[1], dtype=torch.float64, device=w.device)
    index = torch.as_tensor(member.positions[order], device=w.device)
    rows[torch.as_tensor(units, device=w.device), torch.as_tensor(slot, device=w.device)] = w[index].double()
    return rows.reshape(size, -1)


def reduce_members(
    scores: Sequence[torch.Tensor], reduction: str, candidates: torch.Tensor | np.ndarray | None = None
) -> torch.Tensor:
    """Normalise each member's per-channel scores by their mean, then reduce across members.

    ``candidates`` (bool per channel) restricts the mean to the channels that were scored;
    the others keep whatever value they have (a global factor, it does not change a ranking).
    """
    candidates = None if candidates is None else torch.as_tensor(candidates, dtype=torch.bool)
    normalised = []
    for s in scores:
        s = s.cpu()
        mean = s.mean() if candidates is None else s[candidates].mean()
        normalised.append(s / mean if mean > 0 else s)
    stacked = torch.stack(normalised)
    if reduction == "sum":
        return stacked.sum(0)
    if reduction == "mean":
        return stacked.mean(0)
    return stacked.max(0).values
