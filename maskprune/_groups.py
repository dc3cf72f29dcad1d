"""Dependency groups: the channels that must be removed together, and every slice they touch.

A *component* of the channel graph is one channel of a group (a "unit"): every
parameter position and activation position that goes with it. Components that
touch the same set of tensors form one :class:`Group`, so a group reads like a
layer: "these 64 channels of ``layer1.0.conv1.weight`` dim 0, ``bn1`` …".
"""

from __future__ import annotations

import itertools
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
    position_units: np.ndarray  # flat unit of each live channel position of the resolution, n_units if frozen


def build_layout(trace: Trace, res: Resolution) -> GroupLayout:
    """Group live components by the tensors they touch; order units by the first producer's channel order."""
    raw, frozen = _raw_members(trace, res)
    if not raw:
        return _layout([], 0, np.full(res.n_components, -1, dtype=np.int64), frozen, res)
    raw_comp = np.concatenate([comps for *_, comps in raw])
    raw_member = np.repeat(np.arange(len(raw)), [len(comps) for *_, comps in raw])
    by_members = _components_by_members(res, raw_comp, raw_member)

    # groups ordered by their members, units by their first position in the first member
    component_unit = np.full(res.n_components, -1, dtype=np.int64)
    spans: list[tuple[int, int, tuple[int, ...]]] = []  # (start, size, signature)
    start = 0
    for signature in sorted(by_members):
        comps = by_members[signature]
        if len(comps) < 2:
            continue  # a group keeps at least one channel: a single channel can never go
        anchor = raw[signature[0]][4]
        uniq, first = np.unique(anchor, return_index=True)
        ordered = comps[np.argsort(first[np.searchsorted(uniq, comps)], kind="stable")]
        component_unit[ordered] = np.arange(start, start + len(ordered))
        spans.append((start, len(ordered), signature))
        start += len(ordered)

    group_starts = np.asarray([span[0] for span in spans], dtype=np.int64)
    slices = _member_slices(raw, raw_comp, raw_member, component_unit, group_starts)
    groups: list[tuple[int, int, list[Member]]] = []
    for g, (start_g, size, signature) in enumerate(spans):
        members = []
        for i in signature:
            _, owned, dim, role, _ = raw[i]
            positions, units = slices[i, g]
            members.append(Member(owned.qualname, dim, role, owned.tensor, positions, units - start_g))
        groups.append((start_g, size, members))
    return _layout(groups, start, component_unit, frozen, res)


def _layout(
    groups: list[tuple[int, int, list[Member]]],
    n_units: int,
    component_unit: np.ndarray,
    frozen: dict[str, list[str]],
    res: Resolution,
) -> GroupLayout:
    units = component_unit[res.labels]
    return GroupLayout(groups, n_units, component_unit, frozen, np.where(units < 0, n_units, units))


_Raw = tuple[int, OwnedTensor, int, str, np.ndarray]  # (key, owned, dim, role, component of each position)


def _raw_members(trace: Trace, res: Resolution) -> tuple[list[_Raw], dict[str, list[str]]]:
    """Every parameter dimension with a live component, producers first; and what froze each producer."""
    raw: list[_Raw] = []
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
    return raw, frozen


def _components_by_members(res: Resolution, raw_comp: np.ndarray, raw_member: np.ndarray) -> dict[tuple, np.ndarray]:
    """Live components keyed by the sorted members they touch (each member once), in ascending order."""
    n_members = int(raw_member[-1]) + 1
    live = res.comp_reason[raw_comp] < 0
    pairs = np.sort(raw_comp[live] * n_members + raw_member[live])
    pairs = pairs[np.diff(pairs, prepend=-1) != 0]  # a member touching a component several times counts once
    comp, member = np.divmod(pairs, n_members)
    starts = np.flatnonzero(np.diff(comp, prepend=-1))
    labels = sequence_labels(member, starts)
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order], prepend=-1))
    bounds = np.append(starts, len(member)).tolist()
    by_members = {}
    for chunk in np.split(order, cuts[1:]):
        first = int(chunk[0])
        by_members[tuple(member[bounds[first] : bounds[first + 1]].tolist())] = comp[starts[chunk]]
    return by_members


def sequence_labels(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """A label per sequence ``values[starts[i]:starts[i + 1]]`` (the last runs to the end), equal for equal ones.

    Sequences are told apart by a random 64-bit hash of their values and positions, and the result is
    checked element by element: should two different sequences share a hash, they are compared exactly.

    Example:
        >>> labels = sequence_labels(np.array([1, 2, 3, 1, 2]), np.array([0, 2, 3]))
        >>> bool(labels[0] == labels[2] != labels[1])
        True
    """
    lengths = np.diff(np.append(starts, len(values)))
    sequence = np.repeat(np.arange(len(starts)), lengths)
    offset = np.arange(len(values)) - starts[sequence]
    keys = _hash_keys(int(values.max(initial=0)) + 1, int(lengths.max(initial=0)))
    hashes = np.add.reduceat(keys[0][values] ^ keys[1][offset], starts) if len(values) else np.zeros(0, np.uint64)
    _, first, labels = np.unique(hashes, return_index=True, return_inverse=True)
    same_length = np.array_equal(lengths[first[labels]], lengths)
    if same_length and np.array_equal(values[starts[first[labels]][sequence] + offset], values):
        return labels
    by_bytes: dict[bytes, int] = {}  # a hash collision: label them by their bytes
    data = values.astype(np.int64).tobytes()
    bounds = (np.append(starts, len(values)) * 8).tolist()
    return np.asarray([by_bytes.setdefault(data[a:b], len(by_bytes)) for a, b in itertools.pairwise(bounds)], np.int64)


def _hash_keys(n_values: int, n_offsets: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, 2**64, size=n_values, dtype=np.uint64, endpoint=False),
        rng.integers(0, 2**64, size=max(n_offsets, 1), dtype=np.uint64, endpoint=False),
    )


def _member_slices(
    raw: list[_Raw], raw_comp: np.ndarray, raw_member: np.ndarray, component_unit: np.ndarray, group_starts: np.ndarray
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(member, group) -> the member's positions in the group and their flat units, in one pass over all members."""
    units = component_unit[raw_comp]
    member_start = np.concatenate(([0], np.cumsum([len(comps) for *_, comps in raw])[:-1]))
    positions = np.arange(len(raw_comp)) - member_start[raw_member]
    live = np.flatnonzero(units >= 0)
    units, positions, member = units[live], positions[live], raw_member[live]
    group = np.searchsorted(group_starts, units, side="right") - 1
    pair = member * len(group_starts) + group
    order = np.argsort(pair, kind="stable")  # positions stay ascending within a (member, group)
    units, positions, pair = units[order], positions[order], pair[order]
    cuts = np.flatnonzero(np.diff(pair, prepend=-1))
    members, groups = (k.tolist() for k in np.divmod(pair[cuts], len(group_starts)))
    bounds = np.append(cuts, len(pair)).tolist()
    return {
        (i, g): (positions[a:b], units[a:b]) for i, g, a, b in zip(members, groups, bounds, bounds[1:], strict=False)
    }


def _note(frozen: dict[str, list[str]], reason: str | None, name: str, dim: int) -> None:
    if reason is None:
        return
    label = {MODEL_OUTPUT: "reaches a model output", MODEL_INPUT: "reaches a model input"}.get(reason, reason)
    frozen.setdefault(label, []).append(f"{name}[{dim}]")


def unit_index(layout: GroupLayout, res: Resolution, space: int) -> np.ndarray:
    """Flat unit of each channel of ``space``; ``layout.n_units`` (the always-kept slot) where frozen."""
    root = res.roots[space]
    start, size = res.offset[root], res.sizes[root]
    if start < 0:
        return np.full(size, layout.n_units, dtype=np.int64)
    return layout.position_units[start : start + size].copy()


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
