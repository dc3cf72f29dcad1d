"""Channel spaces and their coupling: the union-find behind dependency groups.

Every dimension of every traced tensor is a *space* of ``size`` channels. Rules
say how spaces relate:

* ``unite(a, b)``: channel ``i`` of ``a`` is channel ``i`` of ``b`` (the common
  case: elementwise ops, a conv's output and its weight rows). Solved cheaply
  at the level of whole spaces.
* ``link(a, ia, b, ib)``: channel ``ia[k]`` of ``a`` goes with channel ``ib[k]``
  of ``b`` (concat offsets, flatten expansion, grouped-conv blocks). Solved per
  channel with a sparse connected-components pass.
* ``freeze(a, reason)``: the channels of ``a`` must never be removed (model
  inputs and outputs, ops that are not understood, ignored modules).

:meth:`ChannelGraph.resolve` turns this into *components*: sets of channels
that must be removed together. A component touching a frozen space is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


class ChannelGraph:
    """Spaces, identity unions, channel links and freeze reasons."""

    def __init__(self) -> None:
        self._size: list[int] = []
        self._parent: list[int] = []
        self._reason: dict[int, str] = {}
        self._links: list[tuple[int, np.ndarray, int, np.ndarray]] = []

    def new_space(self, size: int, frozen: str | None = None) -> int:
        """A fresh space of ``size`` channels, frozen when ``frozen`` gives a reason."""
        space = len(self._size)
        self._size.append(int(size))
        self._parent.append(space)
        if frozen is not None:
            self._reason[space] = frozen
        return space

    def size(self, space: int) -> int:
        return self._size[space]

    def find(self, space: int) -> int:
        parent = self._parent
        while parent[space] != space:
            parent[space] = parent[parent[space]]
            space = parent[space]
        return space

    def unite(self, a: int, b: int) -> None:
        """Channel ``i`` of ``a`` and of ``b`` are the same channel."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            reason = f"size mismatch ({self._size[ra]} vs {self._size[rb]})"
            self.freeze(ra, reason)
            self.freeze(rb, reason)
            return
        if ra < rb:
            ra, rb = rb, ra
        self._parent[ra] = rb
        if ra in self._reason and rb not in self._reason:
            self._reason[rb] = self._reason[ra]

    def link(self, a: int, ia: np.ndarray, b: int, ib: np.ndarray) -> None:
        """Channel ``ia[k]`` of ``a`` goes with channel ``ib[k]`` of ``b``."""
        self._links.append((a, np.asarray(ia, dtype=np.int64), b, np.asarray(ib, dtype=np.int64)))

    def is_frozen(self, space: int) -> bool:
        """Whether the whole space is frozen so far (links solved later may freeze more)."""
        return self.find(space) in self._reason

    def freeze(self, space: int, reason: str) -> None:
        root = self.find(space)
        self._reason.setdefault(root, reason)
        self._reason.setdefault(space, reason)

    def resolve(self) -> Resolution:
        """Connected components of channels, with the reason each frozen one is frozen."""
        n = len(self._size)
        roots = np.fromiter((self.find(s) for s in range(n)), dtype=np.int64, count=n)
        root_reason = {self.find(s): r for s, r in self._reason.items()}
        sizes = np.asarray(self._size, dtype=np.int64)
        live = np.zeros(n, dtype=bool)
        unique_roots = np.unique(roots)
        live_roots = np.asarray([r for r in unique_roots if r not in root_reason], dtype=np.int64)
        live[live_roots] = True
        offset = np.full(n, -1, dtype=np.int64)
        counts = sizes[live_roots]
        offset[live_roots] = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(counts) else []
        total = int(counts.sum()) if len(counts) else 0

        reasons: list[str] = []
        reason_index: dict[str, int] = {}
        src, dst, frozen_elems, frozen_codes = [], [], [], []
        for a, ia, b, ib in self._links:
            ra, rb = roots[a], roots[b]
            if live[ra] and live[rb]:
                src.append(offset[ra] + ia)
                dst.append(offset[rb] + ib)
            elif live[ra] or live[rb]:
                keep_root, keep_idx, dead_root = (ra, ia, rb) if live[ra] else (rb, ib, ra)
                reason = root_reason[dead_root]
                code = reason_index.setdefault(reason, len(reasons))
                if code == len(reasons):
                    reasons.append(reason)
                frozen_elems.append(offset[keep_root] + keep_idx)
                frozen_codes.append(np.full(len(keep_idx), code, dtype=np.int64))
        if src:
            rows, cols = np.concatenate(src), np.concatenate(dst)
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
        adjacency = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(total, total))
        n_comp, labels = connected_components(adjacency, directed=False)
        comp_reason = np.full(n_comp, -1, dtype=np.int64)
        if frozen_elems:
            elems, codes = np.concatenate(frozen_elems), np.concatenate(frozen_codes)
            comp_reason[labels[elems[::-1]]] = codes[::-1]
        return Resolution(
            roots=roots,
            offset=offset,
            sizes=sizes,
            labels=labels.astype(np.int64),
            comp_reason=comp_reason,
            reasons=reasons,
            root_reason=root_reason,
        )


@dataclass
class Resolution:
    """The solved graph: which component each channel of each space belongs to."""

    roots: np.ndarray
    offset: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    comp_reason: np.ndarray
    reasons: list[str]
    root_reason: dict[int, str]

    @property
    def n_components(self) -> int:
        return len(self.comp_reason)

    def components(self, space: int) -> np.ndarray | None:
        """Component id of each channel of ``space``, or None if the whole space is frozen."""
        root = self.roots[space]
        start = self.offset[root]
        if start < 0:
            return None
        return self.labels[start : start + self.sizes[root]]

    def frozen_reason(self, space: int) -> str | None:
        """Why the whole of ``space`` is frozen, if it is."""
        return self.root_reason.get(int(self.roots[space]))

    def freeze_components(self, components: np.ndarray, reason: str) -> None:
        """Freeze these components (found to be unprunable after grouping)."""
        self.reasons.append(reason)
        self.comp_reason[components] = len(self.reasons) - 1

    def component_reason(self, component: int) -> str | None:
        code = self.comp_reason[component]
        return None if code < 0 else self.reasons[code]
