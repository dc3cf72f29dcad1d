"""What ``make()`` found and what is kept now: the trace, the group layout, the units and the keep flags.

A :class:`Selection` is the one object the lifecycle's parts share. ``Group``\\ s read and change its
flags, the pruner scores :meth:`Selection.candidates` views of it, the export asks it for the
:meth:`~Selection.plan` and :meth:`~Selection.attributes` of a set of flags, and the report, the
checkpoint and the spec replay read it. None of them needs the :class:`~maskprune.Mask`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from ._attributes import Attributes, attribute_updates
from ._experts import expert_counts, expert_plan
from ._export import Plan, TensorDims
from ._graph import Resolution
from ._groups import BlockGroup, ExpertGroup, Group, GroupLayout, prunable_spaces, unit_index, unit_views
from ._records import Trace


class _Shared:
    """What every view of one selection shares: made once per layout, on first use."""

    def __init__(self) -> None:
        self.tensor_dims: TensorDims | None = None
        self.prunable: np.ndarray | None = None


class Selection:
    """The trace and group layout of a model, with one keep flag per unit (plus the always-kept frozen slot).

    ``keep`` is the flag array; write it through :meth:`set` (or ``Group.prune``), which tells the
    listener given as ``on_change`` (the Mask's runtime masks). :meth:`candidates` gives a read-only
    view with other flags: what a criterion sees while it scores candidates.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> selection = Mask(model, torch.randn(1, 4)).make().selection
        >>> selection.groups[0].prune([0, 1])
        >>> [(dim, kept.tolist()) for dim, kept in selection.plan()["2", "weight"]]
        [(1, [2, 3, 4, 5])]
        >>> view = selection.candidates(selection.keep | True)
        >>> view.groups[0].kept, selection.groups[0].kept
        (6, 4)
    """

    def __init__(
        self,
        trace: Trace,
        resolution: Resolution,
        layout: GroupLayout,
        keep: np.ndarray | None = None,
        *,
        on_change: Callable[[np.ndarray], None] | None = None,
        device_keep: Callable[[], torch.Tensor] | None = None,
        leaves: Callable[[], set[str]] | None = None,
        _shared: _Shared | None = None,
    ) -> None:
        self.trace = trace
        self.resolution = resolution
        self.layout = layout
        self.keep = np.ones(layout.n_flags, dtype=bool) if keep is None else keep
        self.on_change = on_change
        self.device_keep = device_keep
        self.leaves = leaves
        self._shared = _Shared() if _shared is None else _shared
        self._groups: list[Group] | None = None

    @property
    def n_units(self) -> int:
        return self.layout.n_units

    @property
    def groups(self) -> list[Group]:
        """One :class:`Group` per entry of the layout, one :class:`BlockGroup` per block container, then one
        :class:`ExpertGroup` per mixture-of-experts layer."""
        if self._groups is None:
            layout = self.layout
            self._groups = [
                Group(self, i, start, size, members) for i, (start, size, members) in enumerate(layout.groups)
            ]
            self._groups += [BlockGroup(self, len(layout.groups) + i, c) for i, c in enumerate(layout.blocks)]
            first = len(self._groups)
            self._groups += [ExpertGroup(self, first + i, e) for i, e in enumerate(layout.experts)]
        return self._groups

    def candidates(self, keep: np.ndarray) -> Selection:
        """A read-only view of the same layout with the flags ``keep`` (the plan tables are shared)."""
        return Selection(self.trace, self.resolution, self.layout, keep, leaves=self.leaves, _shared=self._shared)

    def set(self, start: int, flags: np.ndarray) -> None:
        """Set the flags of units ``start .. start + len(flags)`` and tell the listener."""
        self.replace(_spliced(self.keep, start, flags))

    def replace(self, keep: np.ndarray) -> None:
        """Take ``keep`` as the whole flag array and tell the listener."""
        if self.on_change is None:
            raise RuntimeError("this selection is a read-only view of candidate flags; prune the Mask's groups")
        if keep.shape != self.keep.shape:
            raise ValueError(f"keep flags of shape {keep.shape}; this selection has {self.keep.shape}")
        self.keep = keep
        self.on_change(keep)

    # ---- what the flags mean ---------------------------------------------------------------
    def units(self, space: int) -> np.ndarray:
        """Flat unit of each channel of ``space`` (a view: read it, do not write to it)."""
        return unit_index(self.layout, space)

    def prunable_spaces(self) -> np.ndarray:
        """Per traced space: whether it holds a channel of some group."""
        if self._shared.prunable is None:
            self._shared.prunable = prunable_spaces(self.layout, self.resolution)
        return self._shared.prunable

    def plan(self, keep: np.ndarray | None = None) -> Plan:
        """Kept positions per pruned dimension of every parameter and buffer, by first name (removed experts:
        dim 0 of their fused tensors and router rows)."""
        if self._shared.tensor_dims is None:
            self._shared.tensor_dims = self._dims_table()
        flags = self.keep if keep is None else keep
        plan = self._shared.tensor_dims.plan(flags)
        for name, kept in expert_plan(self.layout.experts, flags).items():
            plan[name] = [(0, kept), *plan.get(name, [])]  # make() saw dim 0 frozen to channel groups
        return plan

    def attributes(self, modules: Mapping[str, nn.Module], keep: np.ndarray | None = None) -> Attributes:
        """The counts held in module attributes (``num_heads`` …) that the export changes.

        ``modules``: the model's modules by qualified name.
        """
        sites = self.trace.size_sites
        flags = self.keep if keep is None else keep
        updates: Attributes = {}
        if sites:  # a size written in the model's code: its count may change
            updates = attribute_updates(modules, sites, lambda space: int(flags[self.units(space)].sum()))
        for path, values in expert_counts(self.layout.experts, modules, flags).items():
            updates.setdefault(path, {}).update(values)
        return updates

    def without_last_unit(self, groups: list[int]) -> np.ndarray:
        """Flags that remove the last channel of each of ``groups`` (of more than one channel), for a trial export."""
        keep = np.ones(self.layout.n_flags, dtype=bool)
        for index in groups:
            start, size, _ = self.layout.groups[index]
            if size > 1:
                keep[start + size - 1] = False
        return keep

    def removed_entries(self, keep: np.ndarray | None = None) -> dict[str, list[int]]:
        """The container entries the flags remove: ``{container path: [positions]}`` (depth)."""
        flags = self.keep if keep is None else keep
        removed = {}
        for c in self.layout.blocks:
            gone = [i for i, k in zip(c.entries, flags[c.start : c.start + len(c.entries)], strict=True) if not k]
            if gone:
                removed[c.path] = gone
        return removed

    def block_units(self) -> list[tuple[str, int]]:
        """Each removable entry's qualified name and flat unit."""
        return [(c.entry_path(i), c.start + k) for c in self.layout.blocks for k, i in enumerate(c.entries)]

    def output_keeps(self, path: str, ndim: int) -> list[torch.Tensor | None] | None:
        """For the module ``path``'s first output: the kept positions of each dim (None: all kept).

        None when the trace saw no output of ``ndim`` dims there. ``verify(..., mask=)`` uses it to
        compare a masked module's output with the exported one on the kept channels.
        """
        nodes = self.trace.module_outputs.get(path)
        if not nodes or len(nodes[0].spaces) != ndim:
            return None
        keeps: list[torch.Tensor | None] = []
        for space in nodes[0].spaces:
            keep = self.keep[self.units(space)]
            keeps.append(None if keep.all() else torch.as_tensor(np.flatnonzero(keep)))
        return keeps

    def activation_members(self, group: Group) -> list[tuple[str, int, str]]:
        """Leaf-module outputs whose channels belong to ``group``: (module path, dim, mapping)."""
        rows: list[tuple[str, int, str]] = []
        if self.leaves is None:
            return rows
        leaves = self.leaves()
        lo, hi = group.start, group.start + group.size
        for path, nodes in self.trace.module_outputs.items():
            if path not in leaves or not nodes:
                continue
            for dim, space in enumerate(nodes[0].spaces):
                units = self.units(space)
                inside = (units >= lo) & (units < hi)
                if inside.any():
                    positions = np.flatnonzero(inside)
                    span = f"[{positions.min()}:{positions.max() + 1}]"
                    if positions.max() + 1 - positions.min() != len(positions):
                        span = f"{len(positions)} of {len(units)}"
                    rows.append((path, dim, span))
        return rows

    def parameter_counts(self, keep: np.ndarray | None = None) -> tuple[int, int]:
        """Parameter elements now and after the export of the flags ``keep`` (the current ones by default; each
        tied parameter once)."""
        flags = self.keep if keep is None else keep
        plan = self.plan(flags)
        gone = tuple(f"{path}." for path, unit in self.block_units() if not flags[unit])
        before = after = 0
        for owned in self.trace.owned.values():
            if not owned.is_param:
                continue
            if gone and all(f"{m}.".startswith(gone) for m, _ in owned.names):  # in a removed block
                before += owned.tensor.numel()
                continue
            shape = list(owned.tensor.shape)
            before += int(np.prod(shape))
            for dim, kept in plan.get(owned.names[0], []):
                shape[dim] = len(kept)
            after += int(np.prod(shape))
        return before, after

    def _dims_table(self) -> TensorDims:
        """Every dimension of the traced parameters and buffers with its units (made at the layout's first plan)."""
        tr = self.trace
        names, spaces = [], []
        for key, node in tr.param_nodes.items():
            name = tr.owned[key].names[0]
            names += [(name, dim) for dim in range(len(node.spaces))]
            spaces += node.spaces
        units = unit_views(self.layout, spaces)  # spaces over one stretch of units share an array: compared once
        return TensorDims.of((name, dim, view) for (name, dim), view in zip(names, units, strict=True))


def _spliced(keep: np.ndarray, start: int, flags: np.ndarray) -> np.ndarray:
    spliced = keep.copy()
    spliced[start : start + len(flags)] = flags
    return spliced
