"""Dependency groups: the channels that must be removed together, and every slice they touch.

A *component* of the channel graph is one channel of a group (a "unit"): every
parameter position and activation position that goes with it. Components that
touch the same set of tensors form one :class:`Group`, so a group reads like a
layer: "these 64 channels of ``layer1.0.conv1.weight`` dim 0, ``bn1`` …".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._activations import ActivationSite, activation_sites
from ._graph import Resolution
from ._trace import MODEL_INPUT, MODEL_OUTPUT, OwnedTensor, Trace

if TYPE_CHECKING:
    from .mask import Mask

_ROLE_ORDER = {"producer": 0, "norm": 1, "bias": 2, "consumer": 3, "other": 4}


@dataclass
class Member:
    """One tensor dimension of a group: which of its positions belong to which channel of the group."""

    name: str
    dim: int
    role: str
    tensor: torch.Tensor
    positions: np.ndarray
    units: np.ndarray

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    def mapping(self) -> str:
        """Where the group's channels sit in this dimension, in words."""
        lo, hi = int(self.positions.min()), int(self.positions.max()) + 1
        span = (
            f"[{lo}:{hi}]"
            if hi - lo == len(self.positions)
            else f"{len(self.positions)} of {self.tensor.shape[self.dim]}"
        )
        per_unit = len(self.positions) / max(1, len(np.unique(self.units)))
        return span if per_unit == 1 else f"{span}, {per_unit:g} per channel"


class Group:
    """Channels that are removed together, with every parameter slice they touch.

    Channel ``i`` of the group is its ``i``-th unit; :meth:`prune` removes units.

    Example:
        >>> group = mask.groups[0]                     # doctest: +SKIP
        >>> group.prune([0, 5]); group.kept            # doctest: +SKIP
        62
    """

    def __init__(self, mask: Mask, index: int, start: int, size: int, members: list[Member]):
        self._mask = mask
        self.index = index
        self.start = start
        self.size = size
        self.members = members

    @property
    def keep(self) -> np.ndarray:
        """Boolean keep flag per channel (a copy)."""
        return self._mask._keep[self.start : self.start + self.size].copy()

    @property
    def mask(self) -> torch.Tensor:
        """The group's 0/1 mask on the model's device (a view of the Mask's buffer; change it with prune)."""
        return self._mask._runtime.keep[self.start : self.start + self.size]

    @property
    def kept(self) -> int:
        return int(self._mask._keep[self.start : self.start + self.size].sum())

    @property
    def pruned(self) -> list[int]:
        return np.flatnonzero(~self._mask._keep[self.start : self.start + self.size]).tolist()

    def producers(self) -> list[Member]:
        """Members that compute the channels (conv/linear output rows), the slices criteria look at."""
        return [m for m in self.members if m.role == "producer"]

    def activations(self, kind: str = "output") -> list[ActivationSite]:
        """Where this group's channels appear in leaf modules' outputs (or ``kind="input"``: inputs).

        Example:
            >>> [(s.path, s.dim) for s in group.activations()]             # doctest: +SKIP
            [('bn1', 1), ('relu', 1)]
        """
        mask = self._mask
        return activation_sites(mask._trace.leaf_calls, mask._units, self.start, self.size, kind)

    def prune(self, channels: Iterable[int]) -> None:
        """Zero these channels of the group (0 <= c < size). A group always keeps at least one channel."""
        idx = self._check(channels)
        keep = self.keep
        keep[idx] = False
        if not keep.any():
            raise ValueError(f"group {self.index} would lose all {self.size} channels; keep at least one")
        self._mask._set_keep(self.start, keep)

    def restore(self, channels: Iterable[int] | None = None) -> None:
        """Bring channels back (all when ``channels`` is None); weights zeroed meanwhile stay zero."""
        keep = self.keep
        keep[self._check(range(self.size) if channels is None else channels)] = True
        self._mask._set_keep(self.start, keep)

    def _check(self, channels: Iterable[int]) -> np.ndarray:
        channels = list(channels)
        wrong = [c for c in channels if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
        if wrong:
            raise TypeError(f"channels must be integers 0..{self.size - 1}; got {wrong!r}")
        idx = np.asarray(channels, dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= self.size)]
        if len(bad):
            raise IndexError(f"group {self.index} has channels 0..{self.size - 1}; got {bad.tolist()}")
        return idx

    def __repr__(self) -> str:
        return f"Group({self.index}, channels={self.size}, kept={self.kept}, members={len(self.members)})"

    def __str__(self) -> str:
        rows = [
            (m.module or "<root>", m.name.rpartition(".")[2], str(m.dim), m.role, m.mapping()) for m in self.members
        ]
        rows += [
            (path, "output", str(dim), "activation", mapping)
            for path, dim, mapping in self._mask._activation_members(self)
        ]
        header = ("module", "tensor", "dim", "role", "index mapping")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
        lines = [f"Group {self.index}: {self.kept}/{self.size} channels kept"]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)


@dataclass
class GroupLayout:
    """Groups as index arrays: what the Mask needs to build runtime masks and export plans."""

    groups: list[tuple[int, int, list[Member]]]  # (start, size, members)
    n_units: int
    component_unit: np.ndarray  # component -> flat unit, -1 if frozen
    frozen: dict[str, list[str]]  # reason -> producer tensors it froze


def build_layout(trace: Trace, res: Resolution) -> GroupLayout:
    """Group live components by the tensors they touch; order units by the first producer's channel order."""
    raw: list[tuple[int, OwnedTensor, int, str, np.ndarray]] = []
    frozen: dict[str, list[str]] = {}
    for key, node in trace.param_nodes.items():
        owned = trace.owned[key]
        if not owned.is_param:
            continue  # buffers are sliced at export but are not members
        for dim, space in enumerate(node.spaces):
            role = trace.roles.get((key, dim), "other")
            comps = res.components(space)
            if comps is None:
                if role == "producer":
                    _note(frozen, res.frozen_reason(space), owned.qualname, dim)
                continue
            live = res.comp_reason[comps] < 0
            if role == "producer" and not live.all():
                reason = res.component_reason(int(comps[~live][0]))
                _note(frozen, reason, owned.qualname, dim)
            if live.any():
                raw.append((key, owned, dim, role, comps))
    raw.sort(key=lambda r: _ROLE_ORDER.get(r[3], 9))

    if not raw:
        return GroupLayout([], 0, np.full(res.n_components, -1, dtype=np.int64), frozen)
    all_comp = np.concatenate([comps for *_, comps in raw])
    all_member = np.repeat(np.arange(len(raw)), [len(comps) for *_, comps in raw])
    live = res.comp_reason[all_comp] < 0
    all_comp, all_member = all_comp[live], all_member[live]
    order = np.lexsort((all_member, all_comp))
    all_comp, all_member = all_comp[order], all_member[order]
    distinct = np.ones(len(all_comp), dtype=bool)  # a member touching a component several times counts once
    distinct[1:] = (all_comp[1:] != all_comp[:-1]) | (all_member[1:] != all_member[:-1])
    all_comp, all_member = all_comp[distinct], all_member[distinct]
    starts = np.flatnonzero(np.diff(all_comp, prepend=-1))
    comps_sorted = all_comp[starts]
    # each component's members (sorted); components with the same members (same tensors) form one group
    members_bytes = all_member.astype(np.int32).tobytes()  # byte slices: cheap keys for many components
    bounds = (np.append(starts, len(all_comp)) * 4).tolist()
    by_bytes: dict[bytes, list[int]] = {}
    for i in range(len(starts)):
        by_bytes.setdefault(members_bytes[bounds[i] : bounds[i + 1]], []).append(i)
    by_members = {tuple(np.frombuffer(key, dtype=np.int32).tolist()): comps for key, comps in by_bytes.items()}

    # groups ordered by their members, units by their first position in the first member
    component_unit = np.full(res.n_components, -1, dtype=np.int64)
    spans: list[tuple[int, int, tuple[int, ...]]] = []  # (start, size, signature)
    start = 0
    for signature in sorted(by_members):
        comps = comps_sorted[by_members[signature]]
        if len(comps) < 2:
            continue  # a group keeps at least one channel: a single channel can never go
        anchor = raw[signature[0]][4]
        uniq, first = np.unique(anchor, return_index=True)
        ordered = comps[np.argsort(first[np.searchsorted(uniq, comps)], kind="stable")]
        component_unit[ordered] = np.arange(start, start + len(ordered))
        spans.append((start, len(ordered), signature))
        start += len(ordered)

    # each member's positions, split by the group their unit falls in (one pass per member)
    group_starts = np.asarray([span[0] for span in spans], dtype=np.int64)
    positions_of: dict[tuple[int, int], np.ndarray] = {}  # (member, group) -> positions
    for i, (_, _, _, _, c) in enumerate(raw):
        units = component_unit[c]
        positions = np.flatnonzero(units >= 0)
        if not len(positions):
            continue
        group = np.searchsorted(group_starts, units[positions], side="right") - 1
        order = np.argsort(group, kind="stable")
        group, positions = group[order], positions[order]
        cuts = np.flatnonzero(np.diff(group, prepend=-1))
        for g, chunk in zip(group[cuts].tolist(), np.split(positions, cuts[1:]), strict=True):
            positions_of[i, g] = chunk
    groups: list[tuple[int, int, list[Member]]] = []
    for g, (start_g, size, signature) in enumerate(spans):
        members = []
        for i in signature:
            _, owned, dim, role, c = raw[i]
            positions = positions_of[i, g]
            members.append(
                Member(owned.qualname, dim, role, owned.tensor, positions, component_unit[c[positions]] - start_g)
            )
        groups.append((start_g, size, members))
    return GroupLayout(groups, start, component_unit, frozen)


def _note(frozen: dict[str, list[str]], reason: str | None, name: str, dim: int) -> None:
    if reason is None:
        return
    label = {MODEL_OUTPUT: "reaches a model output", MODEL_INPUT: "reaches a model input"}.get(reason, reason)
    frozen.setdefault(label, []).append(f"{name}[{dim}]")


def unit_index(layout: GroupLayout, res: Resolution, space: int) -> np.ndarray:
    """Flat unit of each channel of ``space``; ``layout.n_units`` (the always-kept slot) where frozen."""
    comps = res.components(space)
    size = int(res.sizes[res.roots[space]])
    if comps is None:
        return np.full(size, layout.n_units, dtype=np.int64)
    units = layout.component_unit[comps]
    return np.where(units < 0, layout.n_units, units)


def groups_of_spaces(layout: GroupLayout, res: Resolution, spaces: Iterable[int]) -> set[int]:
    """Indices of the groups that own a channel of any of ``spaces``."""
    if not layout.groups:
        return set()
    starts = np.asarray([start for start, _, _ in layout.groups])
    units = [unit_index(layout, res, space) for space in spaces]
    live = np.unique(np.concatenate(units)) if units else np.zeros(0, dtype=np.int64)
    live = live[live < layout.n_units]
    return set((np.searchsorted(starts, live, side="right") - 1).tolist())


def groups_by_module(layout: GroupLayout) -> Callable[[str], set[int]]:
    """``near(path)``: the groups with a tensor in module ``path`` or below it."""
    owners: dict[str, set[int]] = {}
    for index, (_, _, members) in enumerate(layout.groups):
        for member in members:
            owners.setdefault(member.module, set()).add(index)

    def near(path: str) -> set[int]:
        prefix = f"{path}." if path else ""
        found: set[int] = set()
        for module, groups in owners.items():
            if module == path or module.startswith(prefix):
                found |= groups
        return found

    return near


def format_names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
