"""Dependency groups: the channels that must be removed together, and every slice they touch.

A *component* of the channel graph is one channel of a group (a "unit"): every
parameter position and activation position that goes with it. Components that
touch the same set of tensors form one :class:`Group`, so a group reads like a
layer: "these 64 channels of ``layer1.0.conv1.weight`` dim 0, ``bn1`` …".
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._activations import ActivationSite, activation_sites
from ._depth import BlockContainer
from ._experts import ExpertLayer
from ._graph import Resolution
from ._records import MODEL_INPUT, MODEL_OUTPUT, Trace
from ._walk import OwnedTensor

if TYPE_CHECKING:
    from ._selection import Selection

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

    Examples:
        >>> mask = Mask(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)).make()
        >>> group = mask.groups[0]
        >>> group, group.members[0].name
        (Group(0, channels=64, kept=64, members=13), 'conv1.weight')
        >>> group.prune([0, 5]); group.kept
        62
    """

    #: what a unit is: ``"channels"`` (a channel or a head); ``"block"`` for a :class:`BlockGroup`, ``"experts"``
    #: for an :class:`ExpertGroup`
    kind = "channels"

    def __init__(self, selection: Selection, index: int, start: int, size: int, members: list[Member]):
        self._selection = selection
        self.index = index
        self.start = start
        self.size = size
        self.members = members

    @property
    def keep(self) -> np.ndarray:
        """Boolean keep flag per channel (a copy)."""
        return self._selection.keep[self.start : self.start + self.size].copy()

    @property
    def mask(self) -> torch.Tensor:
        """The group's 0/1 mask on the model's device (a view of the Mask's buffer; change it with prune)."""
        device_keep = self._selection.device_keep
        if device_keep is None:
            raise RuntimeError(f"group {self.index} belongs to a view of candidate flags: it has no device mask")
        return device_keep()[self.start : self.start + self.size]

    @property
    def kept(self) -> int:
        return int(self._selection.keep[self.start : self.start + self.size].sum())

    @property
    def pruned(self) -> list[int]:
        return np.flatnonzero(~self._selection.keep[self.start : self.start + self.size]).tolist()

    def producers(self) -> list[Member]:
        """Members that compute the channels (conv/linear output rows), the slices criteria look at."""
        return [m for m in self.members if m.role == "producer"]

    def activations(self, kind: str = "output") -> list[ActivationSite]:
        """Where this group's channels appear in leaf modules' outputs (or ``kind="input"``: inputs).

        Examples:
            >>> mask = Mask(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)).make()
            >>> [(s.path, s.dim) for s in mask.groups[0].activations()][:3]
            [('conv1', 1), ('bn1', 1), ('relu', 1)]
        """
        selection = self._selection
        return activation_sites(selection.trace.leaf_calls, selection.units, self.start, self.size, kind)

    def prune(self, channels: Iterable[int]) -> None:
        """Remove these units of the group (``0 <= c < size``). A channel group keeps at least one channel, a block
        group one entry of its container, an expert group the ``top_k`` experts each token is routed to."""
        keep = self.keep
        keep[self._check(channels)] = False
        self._refuse(keep)
        self._selection.set(self.start, keep)

    def _refuse(self, keep: np.ndarray) -> None:
        """Raise ``ValueError`` where the group may not keep only ``keep``."""
        if not keep.any():
            raise ValueError(f"group {self.index} would lose all {self.size} channels; keep at least one")

    def restore(self, channels: Iterable[int] | None = None) -> None:
        """Bring channels back (all when ``channels`` is None); weights zeroed meanwhile stay zero."""
        keep = self.keep
        keep[self._check(range(self.size) if channels is None else channels)] = True
        self._selection.set(self.start, keep)

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

    def __eq__(self, other: object) -> bool:
        """The same group of the same layout: a criterion's view of candidate flags equals the Mask's group."""
        if not isinstance(other, Group):
            return NotImplemented
        return other.index == self.index and other._selection.layout is self._selection.layout

    def __hash__(self) -> int:
        return hash((id(self._selection.layout), self.index))

    def __repr__(self) -> str:
        return f"Group({self.index}, channels={self.size}, kept={self.kept}, members={len(self.members)})"

    def __str__(self) -> str:
        rows = [
            (m.module or "<root>", m.name.rpartition(".")[2], str(m.dim), m.role, m.mapping()) for m in self.members
        ]
        rows += [
            (path, "output", str(dim), "activation", mapping)
            for path, dim, mapping in self._selection.activation_members(self)
        ]
        header = ("module", "tensor", "dim", "role", "index mapping")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
        lines = [f"Group {self.index}: {self.kept}/{self.size} channels kept"]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)


class BlockGroup(Group):
    """The removable residual blocks of one container (``Mask(..., depth=True)``): unit ``i`` is entry
    ``entries[i]`` of the container ``container``. Its members are empty: the export deletes whole entries.

    Examples:
        >>> model = torchvision.models.resnet18()
        >>> mask = Mask(model, torch.randn(1, 3, 64, 64), depth=True).make()
        >>> blocks = [g for g in mask.groups if g.kind == "block"]
        >>> [(g.container, g.entries) for g in blocks]
        [('layer1', (0, 1)), ('layer2', (1,)), ('layer3', (1,)), ('layer4', (1,))]
        >>> blocks[1].prune([0])  # layer2[1]: layer2[0] (its downsampling block) stays
        >>> len(mask.generate_pruned_model().layer2)
        1
    """

    kind = "block"

    def __init__(self, selection: Selection, index: int, container: BlockContainer) -> None:
        super().__init__(selection, index, container.start, len(container.entries), [])
        self.container = container.path
        self.entries = container.entries
        self.length = container.length  # entries of the container, removable or not

    @property
    def paths(self) -> list[str]:
        """The qualified name of each unit's entry."""
        prefix = f"{self.container}." if self.container else ""
        return [f"{prefix}{i}" for i in self.entries]

    def activations(self, kind: str = "output") -> list[ActivationSite]:
        return []

    def _refuse(self, keep: np.ndarray) -> None:
        if not keep.any() and self.length == self.size:
            raise ValueError(
                f"group {self.index} would remove all {self.length} entries of {self.container or '<root>'}; "
                "keep at least one"
            )

    def __repr__(self) -> str:
        return f"Group({self.index}, blocks={self.size}, kept={self.kept}, container={self.container!r})"

    def __str__(self) -> str:
        kept = self.keep
        lines = [f"Group {self.index}: {self.kept}/{self.size} blocks of {self.container or '<root>'} kept"]
        lines += [f"  {path}{'' if k else '  (removed)'}" for path, k in zip(self.paths, kept, strict=True)]
        return "\n".join(lines)


class ExpertGroup(Group):
    """The experts of one mixture-of-experts layer: unit ``i`` is expert ``i`` (its router row and its slices of the
    fused expert tensors). A removed expert is never routed; the export slices it out. The layer keeps at least
    ``top_k`` experts (the experts each token is routed to). Its members are empty.
    """

    kind = "experts"

    def __init__(self, selection: Selection, index: int, layer: ExpertLayer) -> None:
        super().__init__(selection, index, layer.start, layer.count, [])
        self.router = layer.router
        self.experts = layer.experts
        self.top_k = layer.top_k

    def activations(self, kind: str = "output") -> list[ActivationSite]:
        return []

    def _refuse(self, keep: np.ndarray) -> None:
        if keep.sum() < self.top_k:
            raise ValueError(
                f"group {self.index} ({self.experts}) would keep {int(keep.sum())} of its {self.size} experts, fewer "
                f"than the {self.top_k} each token is routed to (num_experts_per_tok)"
            )

    def __repr__(self) -> str:
        return f"Group({self.index}, experts={self.size}, kept={self.kept}, layer={self.experts!r})"

    def __str__(self) -> str:
        removed = ", ".join(map(str, self.pruned)) or "none"
        return (
            f"Group {self.index}: {self.kept}/{self.size} experts of {self.experts} kept (router {self.router}, "
            f"top {self.top_k}; removed: {removed})"
        )


@dataclass
class GroupLayout:
    """Groups as index arrays: what the Mask needs to build runtime masks and export plans."""

    groups: list[tuple[int, int, list[Member]]]  # (start, size, members)
    n_units: int
    component_unit: np.ndarray  # component -> flat unit, -1 if frozen
    frozen: dict[str, list[str]]  # reason -> producer tensors it froze
    position_units: np.ndarray  # flat unit of each live channel position of the resolution, n_units if frozen
    unit_table: np.ndarray  # position_units, then n_units for the widest frozen space
    space_start: list[int]  # where each space's units start in unit_table
    space_size: list[int]
    blocks: list[BlockContainer] = field(default_factory=list)  # depth: units after the frozen slot
    experts: list[ExpertLayer] = field(default_factory=list)  # MoE layers: units after the blocks

    @property
    def n_flags(self) -> int:
        """Keep flags: one per channel unit, the always-kept frozen slot, one per removable block, one per expert."""
        return self.n_units + 1 + sum(len(c.entries) for c in self.blocks) + sum(e.count for e in self.experts)


@dataclass
class _RawMembers:
    """Every parameter dimension with a live component, producers first: what may become a group member."""

    fields: list[tuple[str, int, str, torch.Tensor]]  # (name, dim, role, tensor): a Member's first fields
    roots: np.ndarray  # the root space of each: members with one root touch the same components

    def __len__(self) -> int:
        return len(self.fields)


@dataclass
class _Positions:
    """The live channel positions of the members' distinct roots, root by root in increasing order.

    ``rank[p]`` numbers the root (0 .. number of distinct roots - 1), ``within[p]`` is the position in
    that root's space, ``comp[p]`` its component.
    """

    rank: np.ndarray
    within: np.ndarray
    comp: np.ndarray
    member_rank: list[int]  # the rank of each raw member's root
    rank_members: list[list[int]]  # the raw members of each rank, ascending


def build_layout(trace: Trace, res: Resolution) -> GroupLayout:
    """Group live components by the tensors they touch; order units by the first producer's channel order.

    Members sharing a root space touch the same components, so the work is done once per root.
    A group's members are its component's raw members in raw order, groups are ordered by their
    member lists and a group's units by their first position in the group's first member.
    """
    raw, frozen = _raw_members(trace, res)
    component_unit = np.full(res.n_components, -1, dtype=np.int64)
    if not len(raw):
        return _layout([], 0, component_unit, frozen, res)
    pos = _root_positions(res, raw)
    comps, ranks, comp_starts = _component_roots(pos)
    signatures, comp_group = _signature_groups(pos, comps, ranks, comp_starts, res.n_components)
    anchor = _anchor_positions(pos, comps, ranks, comp_starts, res.n_components)
    grouped = np.flatnonzero(comp_group >= 0)
    order = np.argsort(comp_group[grouped] * (int(pos.within.max()) + 1) + anchor[grouped])  # keys are distinct
    component_unit[grouped[order]] = np.arange(len(grouped))
    sizes = np.bincount(comp_group[grouped], minlength=len(signatures))
    starts = np.cumsum(sizes) - sizes
    slices = _member_slices(pos, component_unit, comp_group, starts, len(signatures))
    rank = pos.member_rank
    groups = []
    for g, signature in enumerate(signatures):
        members = [Member(*raw.fields[i], *slices[rank[i], g]) for i in signature]
        groups.append((int(starts[g]), int(sizes[g]), members))
    return _layout(groups, len(grouped), component_unit, frozen, res)


def _layout(
    groups: list[tuple[int, int, list[Member]]],
    n_units: int,
    component_unit: np.ndarray,
    frozen: dict[str, list[str]],
    res: Resolution,
) -> GroupLayout:
    units = component_unit[res.labels]
    position_units = np.where(units < 0, n_units, units)
    start, size = res.offset[res.roots], res.sizes[res.roots]
    frozen_space = start < 0
    tail = np.full(int(size[frozen_space].max(initial=0)), n_units, dtype=np.int64)
    table = np.concatenate((position_units, tail))
    start[frozen_space] = len(position_units)
    return GroupLayout(
        groups, n_units, component_unit, frozen, table[: len(position_units)], table, start.tolist(), size.tolist()
    )


def _raw_members(trace: Trace, res: Resolution) -> tuple[_RawMembers, dict[str, list[str]]]:
    """Every parameter dimension with a live component, producers first; and what froze each producer."""
    has_live, first_dead = (a.tolist() for a in _root_liveness(res))
    roots, offset = res.roots.tolist(), res.offset.tolist()
    found: list[tuple[OwnedTensor, int, str, int]] = []
    frozen: dict[str, list[str]] = {}
    for key, node in trace.param_nodes.items():
        owned = trace.owned[key]
        if not owned.is_param:
            continue  # buffers are sliced at export but are not members
        for dim, space in enumerate(node.spaces):
            role = trace.roles.get((key, dim), "other")
            root = roots[space]
            if role == "producer":
                if offset[root] < 0:
                    _note(frozen, res.root_reason.get(root), owned.qualname, dim)
                elif first_dead[root] >= 0:
                    _note(frozen, res.component_reason(first_dead[root]), owned.qualname, dim)
            if has_live[root]:
                found.append((owned, dim, role, root))
    found.sort(key=lambda r: _ROLE_ORDER.get(r[2], 9))
    fields = [(owned.qualname, dim, role, owned.tensor) for owned, dim, role, _ in found]
    return _RawMembers(fields, np.asarray([root for *_, root in found], dtype=np.int64)), frozen


def _root_liveness(res: Resolution) -> tuple[np.ndarray, np.ndarray]:
    """Per space: whether it is a root with a live component, and its first frozen component (-1: none)."""
    position_root = res.position_roots()
    dead = res.comp_reason[res.labels] >= 0
    has_live = np.zeros(len(res.roots), dtype=bool)
    has_live[position_root[~dead]] = True
    first_dead = np.full(len(res.roots), -1, dtype=np.int64)
    dead_at = np.flatnonzero(dead)
    first = dead_at[np.diff(position_root[dead_at], prepend=-1) != 0]
    first_dead[position_root[first]] = res.labels[first]
    return has_live, first_dead


def _root_positions(res: Resolution, raw: _RawMembers) -> _Positions:
    """The live positions of the raw members' distinct roots."""
    roots, member_rank = np.unique(raw.roots, return_inverse=True)
    lengths = res.sizes[roots]
    rank = np.repeat(np.arange(len(roots)), lengths)
    within = np.arange(len(rank)) - (np.cumsum(lengths) - lengths)[rank]
    comp = res.labels[res.offset[roots][rank] + within]
    live = res.comp_reason[comp] < 0
    rank_members: list[list[int]] = [[] for _ in roots]
    for i, r in enumerate(member_rank.tolist()):
        rank_members[r].append(i)
    return _Positions(rank[live], within[live], comp[live], member_rank.tolist(), rank_members)


def _component_roots(pos: _Positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The roots each touched component lies in: (components ascending, their root ranks, where each starts)."""
    n_ranks = len(pos.rank_members)
    pairs = np.sort(pos.comp * n_ranks + pos.rank)
    pairs = pairs[np.diff(pairs, prepend=-1) != 0]  # a component in a root at several positions counts once
    comp, rank = np.divmod(pairs, n_ranks)
    starts = np.flatnonzero(np.diff(comp, prepend=-1))
    return comp[starts], rank, starts


def _signature_groups(
    pos: _Positions, comps: np.ndarray, ranks: np.ndarray, starts: np.ndarray, n_components: int
) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The member list of each group, in order, and the group of each component (-1: none).

    A component's members are those of the roots it lies in; components with the same members form
    a group when there are at least two of them (a single channel can never go).
    """
    labels = _root_set_labels(ranks, starts, len(pos.rank_members))
    first, count = _first_and_count(labels)
    ends = np.append(starts[1:], len(ranks))
    signatures = []
    for a, b in zip(starts[first].tolist(), ends[first].tolist(), strict=True):
        members = (i for r in ranks[a:b].tolist() for i in pos.rank_members[r])
        signatures.append(tuple(sorted(members)))
    kept = sorted((s, label) for label, s in enumerate(signatures) if count[label] > 1)
    label_group = np.full(len(signatures), -1, dtype=np.int64)
    label_group[[label for _, label in kept]] = np.arange(len(kept))
    comp_group = np.full(n_components, -1, dtype=np.int64)
    comp_group[comps] = label_group[labels]
    return [s for s, _ in kept], comp_group


def _root_set_labels(ranks: np.ndarray, starts: np.ndarray, n_ranks: int) -> np.ndarray:
    """Labels 0..k-1 of the root sets ``ranks[starts[i]:starts[i + 1]]``, equal for equal sets.

    Most components lie in one root, which labels them; only the others need :func:`sequence_labels`.
    """
    lengths = np.diff(np.append(starts, len(ranks)))
    labels = ranks[starts]
    several = lengths > 1
    if several.any():
        inside = np.repeat(several, lengths)
        sub_lengths = lengths[several]
        labels[several] = n_ranks + sequence_labels(ranks[inside], np.cumsum(sub_lengths) - sub_lengths)
    present = np.zeros(int(labels.max()) + 1, dtype=bool)
    present[labels] = True
    return (np.cumsum(present) - 1)[labels]


def _first_and_count(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For labels 0..k-1: the first index holding each, and how many hold it."""
    count = np.bincount(labels)
    first = np.full(len(count), len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first, count


def _anchor_positions(
    pos: _Positions, comps: np.ndarray, ranks: np.ndarray, starts: np.ndarray, n_components: int
) -> np.ndarray:
    """Per component: its first position in the root of its first member (the order of a group's units)."""
    rank_first = np.asarray([members[0] for members in pos.rank_members], dtype=np.int64)
    anchor_rank = np.full(n_components, -1, dtype=np.int64)
    anchor_rank[comps] = np.asarray(pos.member_rank)[np.minimum.reduceat(rank_first[ranks], starts)]
    at_anchor = pos.rank == anchor_rank[pos.comp]
    anchor = np.full(n_components, -1, dtype=np.int64)
    anchor[comps] = len(pos.within)
    np.minimum.at(anchor, pos.comp[at_anchor], pos.within[at_anchor])
    return anchor


def _member_slices(
    pos: _Positions, component_unit: np.ndarray, comp_group: np.ndarray, group_starts: np.ndarray, n_groups: int
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(root rank, group) -> the positions of the root's channels in the group and their units, ascending."""
    grouped = comp_group[pos.comp] >= 0
    rank, within, comp = pos.rank[grouped], pos.within[grouped], pos.comp[grouped]
    group = comp_group[comp]
    units = component_unit[comp] - group_starts[group]
    pair = rank * n_groups + group
    order = np.argsort(pair, kind="stable")  # positions stay ascending within a (root, group)
    within, units, pair = within[order], units[order], pair[order]
    cuts = np.flatnonzero(np.diff(pair, prepend=-1))
    ranks, groups = (k.tolist() for k in np.divmod(pair[cuts], n_groups))
    bounds = np.append(cuts, len(pair)).tolist()
    return {(r, g): (within[a:b], units[a:b]) for r, g, a, b in zip(ranks, groups, bounds, bounds[1:], strict=False)}


def sequence_labels(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """A label per sequence ``values[starts[i]:starts[i + 1]]`` (the last runs to the end), equal for equal ones.

    Sequences are told apart by a random 64-bit hash of their values and positions, and the result is
    checked element by element: should two different sequences share a hash, they are compared exactly.

    Examples:
        >>> labels = sequence_labels(np.array([1, 2, 3, 1, 2]), np.array([0, 2, 3]))
        >>> bool(labels[0] == labels[2] != labels[1])
        True
    """
    lengths = np.diff(np.append(starts, len(values)))
    sequence = np.repeat(np.arange(len(starts)), lengths)
    offset = np.arange(len(values)) - starts[sequence]
    keys = _hash_keys(int(values.max(initial=0)) + 1, int(lengths.max(initial=0)))
    hashes = np.add.reduceat(keys[0][values] ^ keys[1][offset], starts) if len(values) else np.zeros(0, np.uint64)
    first, labels = _distinct(hashes)
    same_length = np.array_equal(lengths[first[labels]], lengths)
    if same_length and np.array_equal(values[starts[first[labels]][sequence] + offset], values):
        return labels
    by_bytes: dict[bytes, int] = {}  # a hash collision: label them by their bytes
    data = values.astype(np.int64).tobytes()
    bounds = (np.append(starts, len(values)) * 8).tolist()
    return np.asarray([by_bytes.setdefault(data[a:b], len(by_bytes)) for a, b in itertools.pairwise(bounds)], np.int64)


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct value (in increasing order) an index holding it, and for each value its distinct one's number.

    What ``np.unique(values, return_index=True, return_inverse=True)[1:]`` gives (any index, not the first),
    by one argsort: numpy 2's ``unique`` was several times slower on these hashes.
    """
    order = np.argsort(values)
    new = np.ones(len(values), dtype=bool)
    new[1:] = values[order[1:]] != values[order[:-1]]
    labels = np.empty(len(values), dtype=np.int64)
    labels[order] = np.cumsum(new) - 1
    return order[new], labels


def _hash_keys(n_values: int, n_offsets: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, 2**64, size=n_values, dtype=np.uint64, endpoint=False),
        rng.integers(0, 2**64, size=max(n_offsets, 1), dtype=np.uint64, endpoint=False),
    )


def _note(frozen: dict[str, list[str]], reason: str | None, name: str, dim: int) -> None:
    if reason is None:
        return
    label = {MODEL_OUTPUT: "reaches a model output", MODEL_INPUT: "reaches a model input"}.get(reason, reason)
    frozen.setdefault(label, []).append(f"{name}[{dim}]")


def unit_index(layout: GroupLayout, space: int) -> np.ndarray:
    """Flat unit of each channel of ``space``; ``layout.n_units`` (the always-kept slot) where frozen.

    A view of the layout's table: read it, do not write to it.
    """
    start = layout.space_start[space]
    return layout.unit_table[start : start + layout.space_size[space]]


def unit_views(layout: GroupLayout, spaces: Iterable[int]) -> list[np.ndarray]:
    """:func:`unit_index` of each of ``spaces``; spaces over one stretch of the layout's table share one view.

    Examples:
        >>> layout = GroupLayout([], 2, np.zeros(0), {}, np.zeros(0), np.array([0, 1, 2, 2]), [0, 0, 2], [2, 2, 2])
        >>> a, b, c = unit_views(layout, [0, 1, 2])
        >>> a is b, c.tolist()
        (True, [2, 2])
    """
    views: dict[tuple[int, int], np.ndarray] = {}
    starts, sizes, table = layout.space_start, layout.space_size, layout.unit_table
    found = []
    for space in spaces:
        start, size = starts[space], sizes[space]
        view = views.get((start, size))
        if view is None:
            view = views[start, size] = table[start : start + size]
        found.append(view)
    return found


def prunable_spaces(layout: GroupLayout, res: Resolution) -> np.ndarray:
    """Per space: whether it holds a channel of some group."""
    prunable = np.zeros(len(res.roots), dtype=bool)
    prunable[res.position_roots()[layout.position_units < layout.n_units]] = True
    return prunable[res.roots]


def groups_of_spaces(layout: GroupLayout, spaces: Iterable[int]) -> set[int]:
    """Indices of the groups that own a channel of any of ``spaces``."""
    if not layout.groups:
        return set()
    starts = np.asarray([start for start, _, _ in layout.groups])
    units = [unit_index(layout, space) for space in spaces]
    live = np.unique(np.concatenate(units)) if units else np.zeros(0, dtype=np.int64)
    live = live[live < layout.n_units]
    return set((np.searchsorted(starts, live, side="right") - 1).tolist())


def groups_by_module(layout: GroupLayout) -> Callable[[str], set[int]]:
    """``near(path)``: the groups with a tensor in module ``path`` or below it.

    The table is built at the first call: a trial export that succeeds never asks.
    """

    @functools.cache
    def owners() -> dict[str, set[int]]:
        found = collections.defaultdict(set)
        for index, (_, _, members) in enumerate(layout.groups):
            for member in members:
                found[member.module].add(index)
        return found

    def near(path: str) -> set[int]:
        prefix = f"{path}." if path else ""
        found: set[int] = set()
        for module, groups in owners().items():
            if module == path or module.startswith(prefix):
                found |= groups
        return found

    return near


def format_names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
