"""Export: slice removed channels out of every parameter and buffer, fix module attributes.

The plan is computed once from the masks: for each tensor (by its first name),
the kept positions of each pruned dimension. Applying it to a model (the masked
one, or a deep copy) is undoable, so a failed in-place export leaves the masked
model exactly as it was.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import has_torch_function_unary

from ._attributes import Attributes, set_attributes, undo_attributes
from ._depth import remove_entries
from ._meta import copy_modules
from ._rules import update_module  # with every op family's updaters registered
from ._walk import ModelIndex, OwnedTensor, module_table

Plan = dict[tuple[str, str], list[tuple[int, np.ndarray]]]


@dataclass
class TensorDims:
    """Every dimension of a model's parameters and buffers with its units: what a plan is computed from.

    ``units`` holds each distinct array of units once (a convolution's output channels, its batch norm's
    weight, bias and statistics share one), so a plan gathers their keep flags once and the tensors of one
    channel set share one array of kept positions.

    Examples:
        >>> channels = np.array([0, 1, 2])
        >>> dims = TensorDims.of([(("conv", "weight"), 0, channels), (("bn", "bias"), 0, channels)])
        >>> plan = dims.plan(np.array([True, False, True]))
        >>> plan[("bn", "bias")], plan[("bn", "bias")][0][1] is plan[("conv", "weight")][0][1]
        ([(0, array([0, 2]))], True)
    """

    units: list[np.ndarray] = field(default_factory=list)
    dims: list[tuple[tuple[str, str], int, int]] = field(default_factory=list)  # (first name, dim, index in units)

    @classmethod
    def of(cls, dims: Iterable[tuple[tuple[str, str], int, np.ndarray]]) -> TensorDims:
        """The table of ``(first name, dim, units)`` triples (one array given for many dims is compared once)."""
        table = cls()
        seen: dict[int, tuple[np.ndarray, int]] = {}  # id of an array given -> (the array, kept alive; its index)
        distinct: dict[tuple[np.dtype, bytes], int] = {}
        for name, dim, units in dims:
            known = seen.get(id(units))
            if known is None:
                index = distinct.setdefault((units.dtype, units.tobytes()), len(table.units))
                if index == len(table.units):
                    table.units.append(units)
                known = seen[id(units)] = units, index
            table.dims.append((name, dim, known[1]))
        return table

    def plan(self, keep_flags: np.ndarray) -> Plan:
        """Kept positions per pruned dimension of every tensor, by first name (``keep_flags``: one per unit)."""
        kept = [None if keep.all() else np.flatnonzero(keep) for keep in (keep_flags[units] for units in self.units)]
        plan: Plan = {}
        for name, dim, index in self.dims:
            if kept[index] is not None:
                plan.setdefault(name, []).append((dim, kept[index]))
        return plan


@dataclass
class Released:
    """A tensor sliced in place whose memory was given back: its removed parts, to rebuild it on undo.

    ``tensor`` is the original object, its ``.data`` emptied; ``sliced`` the tensor that replaced it;
    ``parts[i]`` the positions removed along ``dims[i]``, of the rows kept along the dims before it.

    Examples:
        >>> t, dims = torch.arange(12.0).view(3, 4), [(0, np.array([0, 2])), (1, np.array([1, 3]))]
        >>> released = Released.of(t, dims, t[[0, 2]][:, [1, 3]])
        >>> t.numel(), released.sliced.tolist()
        (0, [[1.0, 3.0], [9.0, 11.0]])
        >>> released.restore(); t.view(-1).tolist() == list(range(12))
        True
    """

    tensor: torch.Tensor
    sliced: torch.Tensor
    dims: list[tuple[int, np.ndarray]]
    parts: list[torch.Tensor]
    shape: torch.Size

    @classmethod
    def of(cls, tensor: torch.Tensor, dims: list[tuple[int, np.ndarray]], sliced: torch.Tensor) -> Released:
        """Keep what ``dims`` (kept positions per dim) remove from ``tensor``, sliced to ``sliced``; empty it."""
        data, parts = tensor.detach(), []
        for step, (dim, keep) in enumerate(dims):
            parts.append(data.index_select(dim, torch.as_tensor(_removed(keep, data.shape[dim]), device=data.device)))
            if step < len(dims) - 1:
                data = data.index_select(dim, torch.as_tensor(keep, device=data.device))
        released = cls(tensor, sliced, dims, parts, tensor.shape)
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)  # its storage is given back
        return released

    def restore(self) -> None:
        """Put the whole tensor back into the original object, kept and removed positions where they were."""
        data = self.sliced.detach()
        for (dim, keep), part in reversed(list(zip(self.dims, self.parts, strict=True))):
            shape = list(data.shape)
            shape[dim] = self.shape[dim]
            whole = torch.empty(shape, dtype=data.dtype, device=data.device)
            whole.index_copy_(dim, torch.as_tensor(keep, device=data.device), data)
            removed = torch.as_tensor(_removed(keep, self.shape[dim]), device=data.device)
            data = whole.index_copy_(dim, removed, part)
        self.tensor.data = data


def _removed(keep: np.ndarray, size: int) -> np.ndarray:
    """The positions of ``range(size)`` not in ``keep``, in order."""
    flags = np.ones(size, dtype=bool)
    flags[keep] = False
    return np.flatnonzero(flags)


@dataclass
class UndoLog:
    """What applying a plan changed, to put back on failure."""

    tensors: list[tuple[nn.Module, str, bool, Any]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)
    counts: list[tuple[Any, str, Any]] = field(default_factory=list)
    released: list[Released] = field(default_factory=list)

    def undo(self) -> None:
        undo_attributes(self.counts)
        for module, saved in reversed(self.attributes):
            module.__dict__.update(saved)
        for released in reversed(self.released):
            released.restore()
        for module, attr, is_param, tensor in reversed(self.tensors):
            (module._parameters if is_param else module._buffers)[attr] = tensor


def apply_plan(
    index: ModelIndex,
    plan: Plan,
    attributes: Attributes | None = None,
    removed: dict[str, list[int]] | None = None,
    release: bool = False,
) -> UndoLog:
    """Slice the tensors of ``index``'s model by ``plan`` (ties stay tied), update the modules that changed and
    ``attributes``, then delete the ``removed`` container entries (``{container path: [positions]}``).

    An index kept by the caller serves every plan applied and undone on one model (the undo puts the same
    tensors back). ``release=True`` gives each sliced tensor's memory back as it goes, keeping only its removed
    positions for the undo (:class:`Released`): the model's memory never grows, where keeping the originals
    would add the sliced copies to it. A tensor whose storage it shares with another is kept whole instead.
    """
    log = UndoLog()
    modules, owned_by_id = index.modules, index.owned
    changed: dict[int, nn.Module] = {}
    slicer = Slicer(plan)
    alone = _alone_in_storage(owned_by_id.values()) if release else set()
    try:
        for owned in owned_by_id.values():
            new = slicer.slice(owned)
            if new is None:
                continue
            if id(owned.tensor) in alone:
                log.released.append(Released.of(owned.tensor, slicer.dims(owned), new))
            for path, attr in owned.names:
                module = modules[path]
                log.tensors.append((module, attr, owned.is_param, owned.tensor))
                (module._parameters if owned.is_param else module._buffers)[attr] = new
                changed[id(module)] = module
        for module in changed.values():
            log.attributes.append((module, dict(module.__dict__)))
            update_module(module)
        set_attributes(modules, attributes or {}, log.counts)
        if removed:
            remove_entries(index.model, removed, log.counts)
    except Exception:
        log.undo()
        raise
    return log


def sliced_copy(
    index: ModelIndex,
    plan: Plan,
    attributes: Attributes | None = None,
    removed: dict[str, list[int]] | None = None,
) -> nn.Module:
    """A deep copy of ``index``'s model with ``plan`` applied: pruned tensors are sliced from the original, not
    copied whole; then the ``removed`` container entries deleted.

    Examples:
        >>> keep = [(0, np.array([0, 2]))]
        >>> small = sliced_copy(ModelIndex(torch.nn.Linear(4, 3)), {("", "weight"): keep, ("", "bias"): keep})
        >>> tuple(small.weight.shape), tuple(small.bias.shape), small.out_features
        ((2, 4), (2,), 2)
    """
    memo: dict[int, Any] = {}
    sliced: list[tuple[str, str]] = []
    slicer = Slicer(plan)
    for owned in index.owned.values():
        new = slicer.slice(owned)
        if new is not None:
            memo[id(owned.tensor)] = new
            sliced += owned.names
        else:
            memo[id(owned.tensor)] = _copy_tensor(owned.tensor, memo)
    pruned = copy_modules(index.model, memo)
    modules = dict(module_table(pruned))
    changed = {id(m): m for m in (modules[path] for path, _ in sliced)}
    for module in changed.values():
        update_module(module)
    set_attributes(modules, attributes or {}, [])
    if removed:
        remove_entries(pruned, removed, [])
    return pruned


SCRATCH_BYTES = 1 << 20  # smaller intermediates come from memory the allocator reuses: a scratch view costs more


class Slicer:
    """Slices tensors by a plan, sharing what the tensors of one model can share.

    Kept positions become index tensors on each tensor's device once per array of the plan and device
    (by ``id``: the plan keeps its arrays alive), shared by the tensors of one channel set. A tensor
    pruned along several dimensions selects along all but the last into scratch memory that the
    next such tensor reuses, where the intermediate is large: fresh memory for each would cost a
    page fault per page written on a CPU. The last selection is the result, in memory of its own.

    Examples:
        >>> slicer = Slicer({("", "weight"): [(0, np.array([0, 2])), (1, np.array([1]))]})
        >>> owned = OwnedTensor(torch.arange(12.0).view(3, 4), False, [("", "weight")])
        >>> slicer.slice(owned)
        tensor([[1.],
                [9.]])
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.indices: dict[tuple[int, torch.device], torch.Tensor] = {}  # (id of a kept array, device) -> index
        self.scratch: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}  # flat, by device, dtype, slot

    def dims(self, owned: OwnedTensor) -> list[tuple[int, np.ndarray]] | None:
        """The kept positions of each pruned dim of ``owned``'s tensor, or None where the plan keeps all of it."""
        for name in owned.names:  # the plan names a tensor by one of its names
            dims = self.plan.get(name)
            if dims is not None:
                return dims
        return None

    def slice(self, owned: OwnedTensor) -> torch.Tensor | None:
        """The kept positions of ``owned``'s tensor as a new tensor, or None where the plan keeps all of it."""
        dims = self.dims(owned)
        if dims is None:
            return None
        tensor = owned.tensor
        if tensor.is_meta:  # no values to select: only the shape changes (meta index_select is slow)
            shape = list(tensor.shape)
            for dim, keep in dims:
                shape[dim] = len(keep)
            data = torch.empty(shape, dtype=tensor.dtype, device="meta")
        else:
            data, device = tensor.detach(), tensor.device  # detached: the selection records no autograd graph
            *steps, (dim, keep) = dims
            for step, (between, kept) in enumerate(steps):
                data = self._intermediate(data, between, self._index(kept, device), step % 2)
            data = data.index_select(dim, self._index(keep, device))
        if type(tensor) is nn.Parameter or isinstance(tensor, nn.Parameter):  # the exact type first: a quick test
            return nn.Parameter(data, requires_grad=tensor.requires_grad)
        return data

    def _index(self, keep: np.ndarray, device: torch.device) -> torch.Tensor:
        """``keep`` as an index tensor on ``device``, made once per array and device."""
        index = self.indices.get((id(keep), device))
        if index is None:
            index = self.indices[id(keep), device] = torch.as_tensor(keep, device=device)
        return index

    def _intermediate(self, data: torch.Tensor, dim: int, keep: torch.Tensor, slot: int) -> torch.Tensor:
        """``data.index_select(dim, keep)``, into scratch memory when large (two slots: a step reads the other)."""
        shape = list(data.shape)
        shape[dim] = len(keep)
        size = math.prod(shape)
        if size * data.element_size() < SCRATCH_BYTES:
            return data.index_select(dim, keep)
        key = (data.device, data.dtype, slot)
        flat = self.scratch.get(key)
        if flat is None or flat.numel() < size:
            flat = self.scratch[key] = torch.empty(size, dtype=data.dtype, device=data.device)
        return torch.index_select(data, dim, keep, out=flat[:size].view(shape))


def _copy_tensor(tensor: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """``copy.deepcopy(tensor, memo)``, short-cut for a plain buffer that alone spans its storage.

    Such a buffer's deep copy is a clone of its whole storage (kept in ``memo`` as deep copies keep it, so that
    tensors sharing that storage still share the copy's), with the same strides; torch's generic
    ``Tensor.__deepcopy__`` takes 20 times as long for it.
    """
    if not _plain_buffer(tensor):
        return copy.deepcopy(tensor, memo)
    storage = tensor.untyped_storage()
    storages = memo.setdefault("torch", {})  # the deep copies of storages, by ``_cdata`` (Tensor.__deepcopy__)
    if storage._cdata in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
        return copy.deepcopy(tensor, memo)
    new = tensor.clone()  # preserve_format: the same strides, as the tensor is dense
    storages[storage._cdata] = new.untyped_storage()
    memo[id(tensor)] = new
    return new


def _plain_buffer(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a plain, dense, contiguous tensor with values, no gradient, no Python state."""
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type in _PLAIN_DEVICES
        and tensor.layout == torch.strided
        and tensor.is_leaf
        and not tensor.requires_grad
        and tensor.grad is None
        and tensor.storage_offset() == 0
        and tensor.is_contiguous()
        and not (tensor.is_quantized or tensor.is_conj() or tensor.is_neg())
        and not tensor.__dict__
        and not has_torch_function_unary(tensor)
    )


_PLAIN_DEVICES = frozenset({"cpu", "cuda"})


def _alone_in_storage(owned: Iterable[OwnedTensor]) -> set[int]:
    """The ``id`` of each tensor with values that alone spans its storage: giving its memory back frees it."""
    tensors = [o.tensor for o in owned]
    shared: dict[int, int] = {}
    for tensor in tensors:
        if not tensor.is_meta:
            key = tensor.untyped_storage().data_ptr()
            shared[key] = shared.get(key, 0) + 1
    return {
        id(t)
        for t in tensors
        if type(t) in (torch.Tensor, nn.Parameter)
        and not t.is_meta
        and shared[t.untyped_storage().data_ptr()] == 1
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    }
