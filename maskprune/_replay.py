"""``mask.apply_spec(spec)``: the keep flags that make a mask's export remove exactly what a spec removed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._spec import PruneSpec, check_fits
from .errors import SpecError

if TYPE_CHECKING:
    from torch import nn

    from ._selection import Selection


def keep_flags_of(selection: Selection, model: nn.Module, spec: PruneSpec) -> np.ndarray:
    """One flag per unit of ``selection`` (plus the always-kept frozen slot) reproducing ``spec``'s kept positions
    on ``model``."""
    check_fits(spec, model)
    tr, n_units = selection.trace, selection.n_units
    cuts = {(t.module, t.attr): dict(t.kept) for t in spec.tensors}
    want = np.full(n_units + 1, -1, dtype=np.int8)  # -1: no tensor said yet
    said_by = np.zeros(n_units + 1, dtype=np.int64)
    sources: list[str] = []
    found: set[tuple[str, str]] = set()
    layers = selection.layout.experts
    expert_dims = {name for layer in layers for name in layer.tensors}  # dim 0: the experts, read below
    for key, node in tr.param_nodes.items():
        owned = tr.owned[key]
        cut = next(((n, cuts[n]) for n in owned.names if n in cuts), None)
        if cut is not None:
            found.add(cut[0])
        for dim, space in enumerate(node.spaces):
            if dim == 0 and owned.names[0] in expert_dims:
                continue
            units = selection.units(space)
            wanted = np.ones(len(units), dtype=bool)
            if cut is not None and dim in cut[1]:
                wanted[:] = False
                wanted[list(cut[1][dim])] = True
            where = f"{owned.qualname}[dim {dim}]"
            frozen = (units == n_units) & ~wanted
            if frozen.any():
                raise SpecError(
                    f"the spec removes {int(frozen.sum())} positions of {where}, which this mask never prunes "
                    "(frozen or ignored: see print(mask))"
                )
            _merge(want, said_by, sources, units[units < n_units], wanted[units < n_units], where, selection)
    missing = [f"{m}.{a}" if m else a for m, a in cuts if (m, a) not in found]
    if missing:
        raise SpecError(f"the spec prunes {missing[0]!r}, which the mask's trace never reached")
    keep = np.concatenate((want != 0, _block_flags(selection, spec)))
    for layer in layers:
        kept = cuts.get(layer.tensors[0], {}).get(0)
        if kept is not None and len(kept) < layer.top_k:
            raise SpecError(f"the spec keeps {len(kept)} experts of {layer.experts}, fewer than top_k={layer.top_k}")
        if kept is not None:
            keep[layer.start : layer.start + layer.count] = np.isin(np.arange(layer.count), list(kept))
    for group in selection.groups:
        if group.kind == "channels" and not keep[group.start : group.start + group.size].any():
            raise SpecError(f"the spec removes every channel of group {group.index} ({group.members[0].name})")
    plan = selection.plan(keep)
    for cut in spec.tensors:
        got = [(d, list(k)) for d, k in plan.get((cut.module, cut.attr), [])]
        if got != [(d, list(k)) for d, k in cut.kept]:
            raise SpecError(f"the mask's groups cannot express the spec's kept positions of {cut.name}")
    return keep


def _block_flags(selection: Selection, spec: PruneSpec) -> np.ndarray:
    """The flags after the frozen slot: the removable entries (those the spec removed are off), then the experts
    (all on)."""
    flags = np.ones(selection.layout.n_flags - selection.n_units - 1, dtype=bool)
    removable = {}
    for path, unit in selection.block_units():
        removable[path] = unit - selection.n_units - 1
    for container, gone in spec.removed.items():
        for position in gone:
            path = f"{container}.{position}" if container else str(position)
            if path not in removable:
                raise SpecError(
                    f"the spec removes {path}, which this mask cannot remove (make the Mask with depth=True; "
                    "only residual blocks are removable)"
                )
            flags[removable[path]] = False
    return flags


def _merge(
    want: np.ndarray,
    said_by: np.ndarray,
    sources: list[str],
    units: np.ndarray,
    wanted: np.ndarray,
    where: str,
    selection: Selection,
) -> None:
    """Record what ``where`` wants of its units; two tensors (or positions) disagreeing on one channel is an error."""
    before, prior = want[units], said_by[units]
    clash = (before >= 0) & (before != wanted)
    want[units] = wanted
    clash |= want[units] != wanted  # two positions of this very dimension share a channel
    if clash.any():
        first = np.flatnonzero(clash)[0]
        group = next(g for g in selection.groups if g.start <= units[first] < g.start + g.size)
        other = sources[prior[first]] if before[first] >= 0 else where
        raise SpecError(
            f"the spec keeps a channel of group {group.index} in {where} and removes it in {other} (or the reverse): "
            "the mask's groups tie these channels together, so they are kept or removed as one"
        )
    sources.append(where)
    said_by[units] = len(sources) - 1
