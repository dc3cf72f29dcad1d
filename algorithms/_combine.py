"""Combining per-member scores into one score per channel of a group."""

from __future__ import annotations

from collections.abc import Callable

import torch

from maskprune import Group, Member

REDUCTIONS = ("sum", "mean", "max")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def per_unit(member: Member, per_position: torch.Tensor, size: int) -> torch.Tensor:
    """Sum a member's per-position values into the group's channels."""
    positions = torch.as_tensor(member.positions, device=per_position.device)
    units = torch.as_tensor(member.units, device=per_position.device)
    out = torch.zeros(size, dtype=torch.float64, device=per_position.device)
    return out.index_add_(0, units, per_position.index_select(0, positions).double())


def combine(
    group: Group, members: list[Member], member_score: Callable[[Member], torch.Tensor], reduction: str
) -> torch.Tensor:
    """Score each member, normalise by its mean (so wide layers do not dominate), reduce across members."""
    scores = []
    for member in members:
        s = per_unit(member, member_score(member), group.size).cpu()
        mean = s.mean()
        scores.append(s / mean if mean > 0 else s)
    stacked = torch.stack(scores)
    if reduction == "sum":
        return stacked.sum(0)
    if reduction == "mean":
        return stacked.mean(0)
    return stacked.max(0).values
