"""Rules of ops that move dims around: reshapes (heads), permutes, expand, cat and stack, splits, indexing, pad.

Dims that keep their size pass through; merged dims follow one factor, and split dims give heads. Sizes
written in the code or read from another tensor are recorded (:class:`~maskprune._records.SizeSite`,
``unproven``) so that the export updates or the trial export checks them. ``cat``'s meta kernel is
``_meta._cat``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from maskprune._records import HEADS, TensorNode, TracedSize

from ._core import OpCall, dims_of, rule, shortcut

if TYPE_CHECKING:
    from maskprune._trace import Tracer


@rule("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "ravel")
def reshape(call: OpCall) -> None:
    """Dims that keep their size pass through; merged dims follow their major factor; a split gives heads.

    Sizes written in the call (``view(B, N, self.num_heads, self.head_dim)``) are recorded as
    :class:`SizeSite` where they count channels, so that an export can update the attributes that
    hold them; the trial export freezes whatever the code still fixes.
    """
    x, out = call.args[0], call.outputs[0]
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.numel() != out.numel():
        return
    literals = _literal_sizes(call.args[1:])
    spaces: list[int | None] = [None] * out.dim()
    for d, n in enumerate(x.shape):
        if n == 1:
            call.claimed.add((id(x), d))
    a = [(d, n) for d, n in enumerate(x.shape) if n != 1]
    b = [(d, n) for d, n in enumerate(out.shape) if n != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        block_in, block_out = [a[i]], [b[j]]
        pa, pb = a[i][1], b[j][1]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                block_in.append(a[i])
                pa *= a[i][1]
                i += 1
            else:
                block_out.append(b[j])
                pb *= b[j][1]
                j += 1
        if len(block_out) != 1:
            if len(block_in) == 1:
                heads_dim, spaces[heads_dim] = _split_into_heads(call, x, block_in[0][0], block_out)
            continue
        out_dim = block_out[0][0]
        if len(block_in) == 1:
            spaces[out_dim] = call.space(x, block_in[0][0])
            written = _written_size(call, out_dim)
            if pb in literals:
                call.tracer.size_site(pb, spaces[out_dim])
            elif _fixes_count(written, spaces[out_dim]):
                _keep_count_of(call, written, spaces[out_dim], [spaces[out_dim]])
                call.unproven("a size read from another tensor")
            continue
        carrier, size, stride = _merge_carrier(call, x, block_in)
        merged = call.graph.new_space(pb)
        idx = np.arange(pb)
        call.link(merged, idx, call.space(x, carrier), (idx // stride) % size)
        spaces[out_dim] = merged
        given = _written_size(call, out_dim)
        written = pb in literals or _fixes_count(given, merged)
        if written:
            _keep_count_of(call, given, merged, [call.space(x, d) for d, _ in block_in])
        call.tracer.size_site(pb, merged, written=written)
    call.set_out(out, spaces)


@rule("type_as", "view_as", "reshape_as", "expand_as")
def shape_from_other(call: OpCall) -> None:
    x = call.args[0]
    for other in call.inputs[1:]:
        call.claim_all(other)
    if call.name != "type_as":
        call.unproven("a shape taken from another tensor")
    if call.name == "type_as":
        call.set_out(call.outputs[0], call.spaces(x))
    elif call.name == "expand_as":
        expand(call)
    else:
        reshape(call)


def _merge_carrier(call: OpCall, x: torch.Tensor, block_in: list[tuple[int, int]]) -> tuple[int, int, int]:
    """The factor of a merge that carries channels: the first one not frozen (``C`` of a conv's
    ``(C, H, W)``, ``heads`` of ``(heads, head_dim)``, ``C`` of Swin's ``(2, 2, C)``), else the first. The
    parts of a split by a written count (:func:`_split_into_heads`) come last: Swin's ``2`` of a spatial
    ``(H / 2, 2)`` is one, and its ``C`` carries the channels.

    Returns (its dim in ``x``, its size, the product of the factors after it).
    """
    graph, parts = call.graph, call.tracer.part_spaces
    nodes = call.node(x).spaces
    free = [k for k, (d, _) in enumerate(block_in) if not graph.is_frozen(nodes[d])]
    chosen = next((k for k in free if nodes[block_in[k][0]] not in parts), free[0] if free else 0)
    stride = int(np.prod([n for _, n in block_in[chosen + 1 :]], dtype=np.int64))
    return block_in[chosen][0], block_in[chosen][1], stride


def _keep_count_of(call: OpCall, written: Any, space: int, sources: list[int]) -> None:
    """A size read from another tensor's dim fixes ``space``'s count to that dim's (PVT's ``reshape(B, N, C)`` of
    its heads, ``C`` read from its input; an ``expand`` to it): the two lose the same channels, where nothing
    relates them yet. A dim the reshaped channels come from (``sources``) may already decide that count: a
    channel shuffle's ``view(B, C, H, W)`` with the ``C`` it split. The trial export still checks the size, and
    freezes (naming the model's error) where either is frozen already (a count read from a model input)."""
    if not isinstance(written, TracedSize):
        return
    graph = call.graph
    if not graph.is_frozen(written.space) and not graph.is_frozen(space) and not graph.joined(written.space, sources):
        graph.unite(written.space, space)


def _fixes_count(written: Any, space: int) -> bool:
    """Whether a size given for a dim of ``space`` stays as it is when ``space`` loses channels: an
    integer written in the code, or a size read from another space (``-1`` and absent sizes follow)."""
    if isinstance(written, TracedSize):
        return written.space != space
    return type(written) is int and written > 1


def _literal_sizes(args: tuple) -> set[int]:
    """The sizes written in a reshape's arguments (not read from a tensor, not -1)."""
    found: set[int] = set()
    for arg in args:
        items = arg if isinstance(arg, (tuple, list)) else (arg,)
        found.update(n for n in items if type(n) is int and n > 1)
    return found


def _split_into_heads(call: OpCall, x: torch.Tensor, in_dim: int, block_out: list[tuple[int, int]]) -> tuple[int, int]:
    """Split ``x``'s dim ``in_dim`` into ``block_out``; the second-to-last factor carries the channels.

    ``C -> (heads, head_dim)`` and ``3C -> (3, heads, head_dim)`` keep their channels prunable a whole
    head at a time (the other factors keep their size). A head count written in the code and not held
    in an attribute the export can set (``self.num_heads``) stays as it is: the last factor carries the
    channels then, every part losing the same positions, as ``chunk`` would make them (a channel shuffle's
    ``view(B, groups, -1, H, W)``). Unless the split is ``(heads, head_dim)`` with the head size held
    (``self.head_dim``): the count then counts heads, even written as an expression of an attribute (Falcon's
    ``num_heads + 2``), and the trial export checks that the code follows the new count. Returns (output dim,
    its space).
    """
    heads_dim, heads = block_out[-2]
    per_head_dim, per_head = block_out[-1]
    idx = np.arange(x.shape[in_dim])
    written, per_head_written = _written_size(call, heads_dim), _written_size(call, per_head_dim)
    head_size_held = len(block_out) == 2 and per_head > 1 and type(per_head_written) is int and call.held(per_head)
    if type(written) is int and written > 0 and not call.held(written) and head_size_held:
        call.unproven("a head count written in the code")
    elif type(written) is int and written > 0 and not call.held(written):
        space = call.graph.new_space(per_head)
        call.tracer.part_spaces.add(space)
        call.link(space, idx % per_head, call.space(x, in_dim), idx)
        if _fixes_count(_written_size(call, per_head_dim), space):  # ``view(B, 2, 4, H, W)``: the trial export checks
            call.tracer.size_site(per_head, space)
        return per_head_dim, space
    space = call.graph.new_space(heads)
    call.link(space, (idx // per_head) % heads, call.space(x, in_dim), idx)
    call.tracer.size_site(heads, space, HEADS)
    return heads_dim, space


def _written_size(call: OpCall, out_dim: int) -> Any:
    """What the call wrote for output dim ``out_dim``: an int, -1, a traced size, or None when not written."""
    out = call.outputs[0]
    if call.name in ("view", "reshape", "expand", "broadcast_to"):
        shape = call.args[1:] or (call.kwargs.get("size" if call.name in ("expand", "broadcast_to") else "shape"),)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        return shape[out_dim] if len(shape) == out.dim() else None
    if call.name == "unflatten":
        start, sizes = int(call.arg(1, "dim")) % call.args[0].dim(), call.arg(2, "sizes")
        return sizes[out_dim - start] if start <= out_dim < start + len(sizes) else None
    return None


def _permutation(call: OpCall, ndim: int) -> list[int] | None:
    name = call.name
    if name == "permute":
        rest = call.args[1:]
        dims = rest[0] if len(rest) == 1 and not isinstance(rest[0], int) else rest
        return [int(d) % ndim for d in (dims or call.kwargs["dims"])]
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = int(call.arg(1, "dim0")) % ndim, int(call.arg(2, "dim1")) % ndim
        perm = list(range(ndim))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if name == "t" or name == "T":
        return list(reversed(range(ndim)))
    if name in ("mT", "mH", "adjoint"):
        return list(range(ndim - 2)) + [ndim - 1, ndim - 2]
    if name in ("movedim", "moveaxis"):
        src = dims_of(call.arg(1, "source"), ndim)
        dst = dims_of(call.arg(2, "destination"), ndim)
        perm = [None] * ndim
        for s, d in zip(src, dst, strict=True):
            perm[d] = s
        rest = iter(d for d in range(ndim) if d not in src)
        return [p if p is not None else next(rest) for p in perm]
    return None


@rule("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(call: OpCall) -> None:
    """Channel ``a * n + b`` (group ``a`` of ``groups``, ``n`` channels each) moves to ``b * groups + a``. The
    exported model shuffles in as many groups, so every group must lose the same positions: a unit is one
    position ``b`` in every group."""
    x, out = call.args[0], call.outputs[0]
    groups = int(call.arg(1, "groups"))
    channels = x.shape[1]
    per_group = channels // groups
    idx = np.arange(channels)
    units = call.graph.new_space(per_group)
    call.link(units, idx % per_group, call.space(x, 1), idx)
    shuffled = call.graph.new_space(channels)
    call.link(units, idx // groups, shuffled, idx)
    call.set_out(out, [shuffled if d == 1 else call.space(x, d) for d in range(x.dim())])


@rule("permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT", "mH", "adjoint", "movedim", "moveaxis")
def permute(call: OpCall) -> None:
    x, out = call.args[0], call.outputs[0]
    perm = _permutation(call, x.dim())
    if perm is not None and len(perm) == out.dim():
        call.set_out(out, [call.space(x, p) for p in perm])


@rule("expand", "broadcast_to", "repeat", "tile")
def expand(call: OpCall) -> None:
    """Dims that keep their size pass through; broadcast or repeated dims become new (frozen) spaces."""
    x, out = call.args[0], call.outputs[0]
    lead = out.dim() - x.dim()
    spaces: list[int | None] = [None] * out.dim()
    for k in range(x.dim()):
        if x.shape[k] == out.shape[k + lead]:
            spaces[k + lead] = call.space(x, k)
            written = _written_size(call, k + lead)
            if _fixes_count(written, spaces[k + lead]):
                _keep_count_of(call, written, spaces[k + lead], [spaces[k + lead]])
                call.unproven("a size written in the code")
        elif x.shape[k] == 1:
            call.claimed.add((id(x), k))
    call.set_out(out, spaces)


@rule("repeat_interleave")
def repeat_interleave(call: OpCall) -> None:
    """Each slice along ``dim`` repeated ``repeats`` times in place (grouped-query attention's
    ``k.repeat_interleave(rep, dim=1)``): output channel ``j`` is input channel ``j // repeats``; the other dims
    pass through. One slice repeated by a count an attribute holds (``k.repeat_interleave(self.num_heads, dim=1)``
    of one key head) gives copies that go one at a time. Per-slice repeat counts (a tensor) and the flattening form
    (no ``dim``) freeze what they touch.
    """
    x, out = call.args[0], call.outputs[0]
    repeats, dim = call.arg(1, "repeats"), call.arg(2, "dim")
    if isinstance(repeats, torch.Tensor) or dim is None or x.dim() != out.dim() or not isinstance(x, torch.Tensor):
        return
    d = int(dim) % x.dim()
    if out.shape[d] != x.shape[d] * int(repeats):
        return
    spaces: list[int | None] = [call.space(x, k) for k in range(x.dim())]
    source = spaces[d]
    spaces[d] = merged = call.graph.new_space(out.shape[d])
    if x.shape[d] == 1 and type(repeats) is int and call.held(repeats):
        # one slice copied ``self.num_heads`` times (multi-query attention's one key head): the copies go one by
        # one, and the export sets the count
        call.tracer.size_site(repeats, merged, HEADS)
    else:
        idx = np.arange(out.shape[d])
        call.link(merged, idx, source, idx // int(repeats))
    call.set_out(out, spaces)


@rule("cat", "concat", "concatenate")
def cat(call: OpCall) -> None:
    tensors = list(call.arg(0, "tensors"))
    out = call.outputs[0]
    d = int(call.arg(1, "dim", 0)) % out.dim()
    parts = []
    for t in tensors:
        if t.dim() == 1 and t.shape[0] == 0 and out.dim() > 1:
            call.claim_all(t)  # legacy empty tensor, ignored by cat
        else:
            parts.append(t)
    graph = call.graph
    # the concatenated dim's space is made before the parts' spaces are looked up (a parameter's are made then)
    merged = graph.new_space(out.shape[d]) if d == 0 and len(parts) > 1 else None
    part_spaces = [call.spaces(t) for t in parts]  # every dim of every part is claimed
    spaces: list[int | None] = []
    for j in range(out.dim()):
        if j != d:
            first = part_spaces[0][j]
            for other in part_spaces[1:]:
                graph.unite(first, other[j])
            spaces.append(first)
        elif len(parts) == 1:
            spaces.append(part_spaces[0][d])
        else:
            merged = graph.new_space(out.shape[d]) if merged is None else merged
            graph.concat(merged, [t_spaces[d] for t_spaces in part_spaces], [t.shape[d] for t in parts])
            spaces.append(merged)
    call.set_out(out, spaces)


@shortcut(cat)
def _concatenation(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """:func:`cat` of two or more tensors of the output's rank (no legacy empty tensor), its ``dim`` an int given by
    position or keyword: the other dims are united across the parts, the parts' channels are linked into a new
    space along ``dim``; every dim of every part is claimed, so nothing is frozen."""
    tensors = args[0] if args else None
    if not isinstance(out, torch.Tensor) or type(tensors) not in (list, tuple) or len(tensors) < 2:
        return False
    if len(args) > 2 or (kwargs and (len(args) == 2 or kwargs.keys() != {"dim"})):
        return False
    dim = args[1] if len(args) == 2 else kwargs.get("dim", 0)
    ndim = out.dim()
    if type(dim) is not int or not ndim or not all(isinstance(t, torch.Tensor) and t.dim() == ndim for t in tensors):
        return False
    d = dim % ndim
    graph = tracer.graph
    merged = graph.new_space(out.shape[d]) if d == 0 else None  # made first, as the rule does
    nodes = [tracer.node(t) for t in tensors]
    spaces = list(nodes[0].spaces)
    for j, first in enumerate(spaces):
        if j != d:
            for node in nodes[1:]:
                graph.unite(first, node.spaces[j])
    spaces[d] = merged = graph.new_space(out.shape[d]) if merged is None else merged
    graph.concat(merged, [node.spaces[d] for node in nodes], [t.shape[d] for t in tensors])
    tainted, constant = any(node.tainted for node in nodes), all(node.constant for node in nodes)
    tracer.bind(out, TensorNode(tuple(spaces), tuple(out.shape), tainted, constant))
    return True


@rule("stack")
def stack(call: OpCall) -> None:
    tensors = list(call.arg(0, "tensors"))
    out = call.outputs[0]
    d = int(call.arg(1, "dim", 0)) % out.dim()
    spaces: list[int | None] = []
    for j in range(tensors[0].dim()):
        first = call.space(tensors[0], j)
        for t in tensors[1:]:
            call.graph.unite(first, call.space(t, j))
        spaces.append(first)
    spaces.insert(d, None)
    call.set_out(out, spaces)


@rule("chunk", "split", "split_with_sizes", "tensor_split", "unbind", "hsplit", "vsplit", "dsplit")
def split(call: OpCall) -> None:
    """Equal chunks stay prunable (every chunk loses the same channels); unequal sizes freeze."""
    x = call.args[0]
    default = {"hsplit": 1 if x.dim() > 1 else 0, "vsplit": 0, "dsplit": 2}.get(call.name, 0)
    dim_pos = 1 if call.name == "unbind" else 2
    d = int(call.arg(dim_pos, "dim", default)) % x.dim()
    outs = call.outputs
    if call.name == "unbind":
        for out in outs:
            call.set_out(out, [call.space(x, k) for k in range(x.dim()) if k != d])
        return
    size = x.shape[d]
    equal = len({o.shape[d] for o in outs}) == 1 and outs[0].shape[d] * len(outs) == size
    by_size = call.name in ("split", "split_with_sizes")
    shared = None
    held = by_size and call.held(outs[0].shape[d])
    if equal and (call.name == "chunk" or held):
        n = outs[0].shape[d]
        shared = call.graph.new_space(n)
        for k in range(len(outs)):
            call.link(shared, np.arange(n), call.space(x, d), np.arange(k * n, (k + 1) * n))
        if by_size:  # ``split(self.split_size)``: the size is written in the code
            call.tracer.size_site(n, shared)
    for out in outs:
        spaces: list[int | None] = [call.space(x, k) if k != d else shared for k in range(x.dim())]
        call.set_out(out, spaces)


@rule("glu")
def glu(call: OpCall) -> None:
    """``glu`` halves a dim: output channel ``i`` is input channel ``i`` gated by channel ``i + n``, one unit (as
    ``a, b = x.chunk(2); a * sigmoid(b)`` makes them)."""
    x, out = call.args[0], call.outputs[0]
    d = int(call.arg(1, "dim", -1)) % x.dim()
    n = out.shape[d]
    halves = call.graph.new_space(n)
    idx = np.arange(n)
    for k in range(2):
        call.link(halves, idx, call.space(x, d), idx + k * n)
    call.set_out(out, [call.space(x, k) if k != d else halves for k in range(x.dim())])


# ---- indexing ------------------------------------------------------------------------------------
def _index_plan(shape: tuple[int, ...], index: Any, picks: bool = False) -> list[tuple[int | None, str, Any]] | None:
    """For basic indexing: (input dim, kind, index item) per output dim, kinds 'full', 'part', 'int', 'new'; None
    if advanced. With ``picks``, a slice whose kept range is anchored to the ends (``1:``, ``:-2``) is 'ends' and
    one list of ints (``x[..., [-2], :]``, the only advanced index) is 'pick'."""
    items = index if isinstance(index, tuple) else (index,)
    consuming = lists = 0
    for item in items:
        if item is None or item is Ellipsis:
            continue
        if (
            isinstance(item, torch.Tensor)
            and item.dim() == 0
            and not item.dtype.is_floating_point
            and item.dtype != torch.bool
        ):
            consuming += 1
        elif isinstance(item, (int, slice)) and not isinstance(item, bool):
            consuming += 1
        elif picks and isinstance(item, list) and item and all(type(k) is int for k in item):
            consuming, lists = consuming + 1, lists + 1
        else:
            return None
    if lists and (lists > 1 or any(isinstance(item, (int, torch.Tensor)) for item in items)):
        return None  # several advanced indices: their dims move
    plan: list[tuple[int | None, str, Any]] = []
    dim = 0
    for item in items:
        if item is None:
            plan.append((None, "new", item))
        elif item is Ellipsis:
            for _ in range(len(shape) - consuming):
                plan.append((dim, "full", item))
                dim += 1
        elif isinstance(item, slice):
            start, stop, step = item.start, item.stop, item.step
            n = shape[dim]
            full = start in (None, 0) and (stop is None or (isinstance(stop, int) and stop >= n)) and step in (None, 1)
            kind = "full" if full else "ends" if picks and _anchored_range(item, n) else "part"
            plan.append((dim, kind, item))
            dim += 1
        else:
            plan.append((dim, "pick" if isinstance(item, list) else "int", item))
            dim += 1
    while dim < len(shape):
        plan.append((dim, "full", slice(None)))
        dim += 1
    return plan


def _anchored_range(item: slice, n: int) -> tuple[int, int] | None:
    """The positions ``[lo, hi)`` a slice keeps when the ends of the dim fix them: a start counted from the front
    and a stop counted from the back (``1:``, ``:-2``, ``2:-1``), so that channels removed inside leave the slice
    exact while those outside it stay. None for any other slice (``:4`` would take other channels).

    Examples:
        >>> _anchored_range(slice(None, -2), 6), _anchored_range(slice(1, None), 6), _anchored_range(slice(None, 4), 6)
        ((0, 4), (1, 6), None)
    """
    start, stop = item.start, item.stop
    if item.step not in (None, 1) or not (start is None or (type(start) is int and start >= 0)):
        return None
    if not (stop is None or (type(stop) is int and stop < 0)):
        return None
    lo, hi = start or 0, n + (stop or 0)
    return (lo, hi) if 0 <= lo < hi <= n else None


def _picked_positions(item: list[int], n: int) -> np.ndarray | None:
    """The positions a list index needs kept where they are: from its first pick to the end of the dim when it
    counts from the back (``[-2]``), from the front to its last pick when it counts from the front; None when
    mixed or out of range."""
    if all(-n <= k < 0 for k in item):
        return np.arange(n + min(item), n)
    if all(0 <= k < n for k in item):
        return np.arange(0, max(item) + 1)
    return None


@rule("getitem")
def getitem(call: OpCall) -> None:
    """Basic indexing: whole dims pass through, new and integer-indexed dims come and go. A slice anchored to the
    ends (``x[..., :-2, :]``) passes the channels it keeps and freezes the others; a list of ints
    (``x[..., [-2], :]``) freezes the channels it picks (and those between them and the end it counts from)."""
    x, out = call.args[0], call.outputs[0]
    index = call.args[1]
    if _gather_rows(call, x, out, index):
        return
    plan = _index_plan(tuple(x.shape), index, picks=True)
    if plan is None:
        return
    spaces: list[int | None] = []
    for dim, kind, item in plan:
        if kind == "full":
            spaces.append(call.space(x, dim))
        elif kind == "ends":
            spaces.append(_anchored_slice(call, x, dim, item))
        elif kind == "pick":
            positions = _picked_positions(item, x.shape[dim])
            if positions is not None:
                _keep_positions(call, call.space(x, dim), positions)
            spaces.append(None)
        elif kind in ("part", "new"):
            spaces.append(None)
        elif x.shape[dim] == 1:
            call.claimed.add((id(x), dim))
    if len(spaces) == out.dim():
        call.set_out(out, spaces)


def _anchored_slice(call: OpCall, x: torch.Tensor, dim: int, item: slice) -> int:
    """``x[..., lo:-s]``: output channel ``j`` is channel ``lo + j`` of ``x``; the channels outside it stay."""
    n = x.shape[dim]
    lo, hi = _anchored_range(item, n)
    call.unproven("a slice's bounds")  # a bound computed from a size read (``x[:, c // 2:]``) would move
    source, kept = call.space(x, dim), call.graph.new_space(hi - lo)
    call.link(kept, np.arange(hi - lo), source, np.arange(lo, hi))
    _keep_positions(call, source, np.concatenate([np.arange(lo), np.arange(hi, n)]))
    return kept


def _keep_positions(call: OpCall, space: int, positions: np.ndarray) -> None:
    """Freeze these channels of ``space`` (an index written in the code counts on them), not the others."""
    if len(positions):
        frozen = call.graph.new_space(len(positions), call.reason())
        call.link(frozen, np.arange(len(positions)), space, positions)


@rule("narrow")
def narrow(call: OpCall) -> None:
    """``x.narrow(dim, start, length)``: the narrowed dim freezes, even whole (``length``, written in the code, must
    stay within it: ``narrow`` does not clamp as a slice does); the other dims pass through."""
    x, out = call.args[0], call.outputs[0]
    d = int(call.arg(1, "dim")) % x.dim()
    call.set_out(out, [call.space(x, k) if k != d else None for k in range(x.dim())])


def _gather_rows(call: OpCall, x: torch.Tensor, out: torch.Tensor, index: Any) -> bool:
    """``table[idx]`` or ``table[:, idx]`` with one integer tensor (relative position biases): the
    indexed dim is replaced by the index's dims (frozen), the others pass through."""
    items = index if isinstance(index, tuple) else (index,)
    tensors = [k for k, item in enumerate(items) if isinstance(item, torch.Tensor)]
    if len(tensors) != 1 or any(item != slice(None) for k, item in enumerate(items) if k != tensors[0]):
        return False
    at, idx = tensors[0], items[tensors[0]]
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or out.dim() != idx.dim() + x.dim() - 1:
        return False
    call.claim_all(idx)
    before = [call.space(x, d) for d in range(at)]
    call.set_out(out, before + [None] * idx.dim() + [call.space(x, d) for d in range(at + 1, x.dim())])
    return True


@rule("gather", "take_along_dim")
def gather(call: OpCall) -> None:
    """Values picked along ``dim`` by an index of the output's shape: the other dims pass through."""
    x, out = call.args[0], call.outputs[0]
    index = call.arg(2, "index") if call.name == "gather" else call.arg(1, "indices")
    dim = call.arg(1, "dim") if call.name == "gather" else call.arg(2, "dim")
    if not isinstance(index, torch.Tensor) or dim is None or index.dim() != x.dim() or out.shape != index.shape:
        return
    dim = int(dim) % x.dim()
    call.claim_all(index)
    call.unproven("an index of the output's shape")
    spaces: list[int | None] = []
    for d in range(x.dim()):
        same = d != dim and x.shape[d] == out.shape[d]
        spaces.append(call.space(x, d) if same else None)
    call.set_out(out, spaces)


@rule("index_add")
def index_add(call: OpCall) -> None:
    """``x.index_add(dim, index, source)``: the rows of ``source`` added into the rows ``index`` of ``x`` along ``dim``
    (the tokens of each expert of an eager MoE layer): the other dims of ``x`` and ``source`` are the same
    channels; ``dim`` mixes (its count is ``x``'s)."""
    x, out = call.args[0], call.outputs[0]
    index, source = call.arg(2, "index"), call.arg(3, "source")
    dim = call.arg(1, "dim")
    if not isinstance(source, torch.Tensor) or not isinstance(index, torch.Tensor) or source.dim() != x.dim():
        return
    if not isinstance(dim, int) or x.dim() == 0:
        return
    dim %= x.dim()
    call.claim_all(index)
    for d in range(x.dim()):
        if d != dim:
            call.unite(x, d, source, d)
    call.set_out(out, [call.space(x, d) if d != dim else None for d in range(x.dim())])


@rule("setitem")
def setitem(call: OpCall) -> None:
    x, value = call.args[0], call.args[2]
    if isinstance(value, torch.Tensor) and call.node(x).constant and not call.node(value).constant:
        call.node(x).constant = False  # it holds the value's values now
    plan = _index_plan(tuple(x.shape), call.args[1])
    if plan is None:
        return
    view = [(dim, kind) for dim, kind, _ in plan if kind != "int"]
    for dim, kind, _ in plan:
        if kind == "int" and x.shape[dim] == 1:
            call.claimed.add((id(x), dim))
    if not isinstance(value, torch.Tensor):
        for dim, kind in view:
            if kind == "full":
                call.claimed.add((id(x), dim))
        return
    lead = len(view) - value.dim()
    for j, (dim, kind) in enumerate(view):
        k = j - lead
        if kind != "full":
            continue
        if k >= 0 and value.shape[k] == x.shape[dim]:
            call.unite(x, dim, value, k)
        elif k < 0 or value.shape[k] == 1:
            call.claimed.add((id(x), dim))
            if k >= 0:
                call.claimed.add((id(value), k))


@rule("pad")
def pad(call: OpCall) -> None:
    x, out = call.args[0], call.outputs[0]
    widths = list(call.arg(1, "pad"))
    padded = {x.dim() - 1 - i // 2 for i, w in enumerate(widths) if w != 0}
    call.set_out(out, [None if d in padded else call.space(x, d) for d in range(x.dim())])
