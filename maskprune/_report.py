"""``mask.sparsity()``: requested versus achieved, per group and for the model, in channels, parameters and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._pruning import group_path

if TYPE_CHECKING:
    from ._flops import FlopsProbe
    from ._selection import Selection
    from ._settings import Settings


@dataclass
class GroupSparsity:
    """One group: ``requested`` is the ratio the schedule asked of it so far (None: not pruned yet)."""

    index: int
    name: str
    channels: int
    kept: int
    requested: float | None
    flops_before: int
    flops_after: int

    @property
    def achieved(self) -> float:
        return 1.0 - self.kept / self.channels


@dataclass
class Sparsity:
    """The model's numbers before and after the export the mask describes now.

    ``groups[i].flops_*`` count the layers holding the group's parameters (a layer
    between two groups appears in both). ``requested`` is the ratio or FLOPs fraction asked for.
    """

    groups: list[GroupSparsity]
    requested: str
    parameters_before: int
    parameters_after: int
    flops_before: int
    flops_after: int

    @property
    def channels(self) -> tuple[int, int]:
        """(kept, total) over every group."""
        return sum(g.kept for g in self.groups), sum(g.channels for g in self.groups)

    @property
    def flops_removed(self) -> float:
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def parameters_removed(self) -> float:
        return 1.0 - self.parameters_after / self.parameters_before if self.parameters_before else 0.0

    def __str__(self) -> str:
        kept, total = self.channels
        lines = [
            f"Requested: {self.requested}",
            f"Channels:   {kept}/{total} kept ({1 - kept / max(total, 1):.1%} removed)",
            f"Parameters: {self.parameters_before:,} -> {self.parameters_after:,} "
            f"({self.parameters_removed:.1%} removed)",
            f"FLOPs:      {self.flops_before:,} -> {self.flops_after:,} ({self.flops_removed:.1%} removed)",
            f"  {'group':>5}  {'kept/total':>11}  {'requested':>9}  {'achieved':>8}  "
            f"{'MFLOPs before->after':>21}  first layer",
        ]
        for g in self.groups:
            requested = "-" if g.requested is None else f"{g.requested:.3f}"
            flops = f"{g.flops_before / 1e6:.2f}->{g.flops_after / 1e6:.2f}"
            kept = f"{g.kept}/{g.channels}"
            lines.append(f"  {g.index:>5}  {kept:>11}  {requested:>9}  {g.achieved:>8.3f}  {flops:>21}  {g.name}")
        return "\n".join(lines)


def sparsity_report(
    selection: Selection, probe: FlopsProbe, settings: Settings, requested: dict[int, float]
) -> Sparsity:
    """The report of ``selection``'s flags; ``requested``: the ratio the schedule asked of each group so far."""
    dense = probe.count({})
    now = probe.count(selection.plan(), selection.attributes(probe.index.modules))
    rows = []
    for g in selection.groups:
        modules = {m.module for m in g.members}
        rows.append(
            GroupSparsity(
                index=g.index,
                name=group_path(g) or "<root>",
                channels=g.size,
                kept=g.kept,
                requested=requested.get(g.index),
                flops_before=sum(dense.per_module.get(m, 0) for m in modules),
                flops_after=sum(now.per_module.get(m, 0) for m in modules),
            )
        )
    s = settings
    target = s.target
    before, after = selection.parameter_counts()
    return Sparsity(rows, f"{target} ({s.allocation})", before, after, dense.total, now.total)
