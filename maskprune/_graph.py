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

    def concat(self, merged: int, parts: list[int], sizes: list[int]) -> None:
        """Channel ``offset + i`` of ``merged`` goes with channel ``i`` of ``parts[k]``, the parts of ``sizes``
        channels lying end to end in it (a concatenation): one :meth:`link` per part, in order.

        Examples:
            >>> g = ChannelGraph(); a, b, ab = g.new_space(2), g.new_space(3), g.new_space(5)
            >>> g.concat(ab, [a, b], [2, 3]); [(ia.tolist(), ib.tolist()) for _, ia, _, ib in g._links]
            [([0, 1], [0, 1]), ([2, 3, 4], [0, 1, 2])]
        """
        positions = np.arange(sum(sizes), dtype=np.int64)  # every part's indices are views of it
        offset = 0
        for part, n in zip(parts, sizes, strict=True):
            self._links.append((merged, positions[offset : offset + n], part, positions[:n]))
            offset += n

    def joined(self, a: int, others: list[int]) -> bool:
        """Whether ``a`` is related so far to any of ``others``: united, or joined by a chain of links.

        Examples:
            >>> g = ChannelGraph(); a, b, c = g.new_space(4), g.new_space(4), g.new_space(2)
            >>> g.link(c, np.arange(2), b, np.arange(2)); g.joined(a, [b]), g.joined(b, [a, c])
            (False, True)
        """
        start, goals = self.find(a), {self.find(b) for b in others}
        if start in goals:
            return True
        neighbours: dict[int, list[int]] = {}
        for x, _, y, _ in self._links:
            rx, ry = self.find(x), self.find(y)
            neighbours.setdefault(rx, []).append(ry)
            neighbours.setdefault(ry, []).append(rx)
        seen, todo = {start}, [start]
        while todo:
            for space in neighbours.get(todo.pop(), ()):
                if space in goals:
                    return True
                if space not in seen:
                    seen.add(space)
                    todo.append(space)
        return False

    def is_frozen(self, space: int) -> bool:
        """Whether the whole space is frozen so far (links solved later may freeze more)."""
        return self.find(space) in self._reason

    def freeze(self, space: int, reason: str) -> None:
        root = self.find(space)
        self._reason.setdefault(root, reason)
        self._reason.setdefault(space, reason)

    def resolve(self) -> Resolution:
        """Connected components of channels, with the reason each frozen one is frozen."""
        roots = self._roots()
        root_reason = dict(zip(roots[list(self._reason)].tolist(), self._reason.values(), strict=True))
        sizes = np.asarray(self._size, dtype=np.int64)
        live = np.zeros(len(sizes), dtype=bool)
        live[roots] = True
        live[list(root_reason)] = False
        live_roots = np.flatnonzero(live)
        offset = np.full(len(sizes), -1, dtype=np.int64)
        ends = np.cumsum(sizes[live_roots])
        offset[live_roots] = ends - sizes[live_roots]
        total = int(ends[-1]) if len(ends) else 0
        edges, frozen_elems, frozen_codes, reasons = self._link_edges(roots, live, offset, root_reason)
        if len(edges[0]):
            from scipy.sparse import coo_matrix  # scipy is imported at first use, not by ``import maskprune``
            from scipy.sparse.csgraph import connected_components

            adjacency = coo_matrix((np.ones(len(edges[0]), dtype=np.int8), edges), shape=(total, total))
            n_comp, labels = connected_components(adjacency, directed=False)
        else:  # no links: every channel is its own component
            n_comp, labels = total, np.arange(total)
        comp_reason = np.full(n_comp, -1, dtype=np.int64)
        comp_reason[labels[frozen_elems[::-1]]] = frozen_codes[::-1]  # the first link to freeze a component names it
        return Resolution(
            roots=roots,
            offset=offset,
            sizes=sizes,
            labels=labels.astype(np.int64),
            comp_reason=comp_reason,
            reasons=reasons,
            root_reason=root_reason,
        )

    def _roots(self) -> np.ndarray:
        """The root of every space, by pointer jumping (a parent never has a larger index than its child)."""
        parent = np.asarray(self._parent, dtype=np.int64)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand

    def _link_edges(
        self, roots: np.ndarray, live: np.ndarray, offset: np.ndarray, root_reason: dict[int, str]
    ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray, list[str]]:
        """The links as edges between live channel positions, and the positions frozen by a link to a frozen space.

        Returns ((rows, cols), frozen positions, their reason codes, the reasons), in link order.
        """
        a, ia, b, ib = zip(*self._links, strict=True) if self._links else ((), (), (), ())
        ra, rb = roots[list(a)], roots[list(b)]
        both = np.flatnonzero(live[ra] & live[rb])
        rows = _positions(offset[ra[both]], [ia[k] for k in both])
        cols = _positions(offset[rb[both]], [ib[k] for k in both])
        one = np.flatnonzero(live[ra] != live[rb]).tolist()
        codes: dict[str, int] = {}  # reason -> code, in the order links first name them
        starts, kept, link_codes = [], [], []
        for k in one:
            from_a = bool(live[ra[k]])
            starts.append(offset[ra[k] if from_a else rb[k]])
            kept.append(ia[k] if from_a else ib[k])
            link_codes.append(codes.setdefault(root_reason[int(rb[k] if from_a else ra[k])], len(codes)))
        frozen = _positions(np.asarray(starts, dtype=np.int64), kept)
        frozen_codes = np.repeat(np.asarray(link_codes, dtype=np.int64), [len(idx) for idx in kept])
        return (rows, cols), frozen, frozen_codes, list(codes)


def _positions(starts: np.ndarray, indices: list[np.ndarray]) -> np.ndarray:
    """``starts[k] + indices[k]`` for every k, concatenated."""
    if not indices:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(indices) + np.repeat(starts, [len(idx) for idx in indices])


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

    def position_roots(self) -> np.ndarray:
        """The root space of each live channel position (of ``labels``)."""
        live_roots = np.flatnonzero(self.offset >= 0)  # in increasing order, as their positions are laid out
        return np.repeat(live_roots, self.sizes[live_roots])

    def freeze_components(self, components: np.ndarray, reason: str) -> None:
        """Freeze these components (found to be unprunable after grouping)."""
        self.reasons.append(reason)
        self.comp_reason[components] = len(self.reasons) - 1

    def component_reason(self, component: int) -> str | None:
        code = self.comp_reason[component]
        return None if code < 0 else self.reasons[code]
