"""Export: slice removed channels out of every parameter and buffer, fix module attributes.

The plan is computed once from the masks: for each tensor (by its first name),
the kept positions of each pruned dimension. Applying it to a model (the masked
one, or a deep copy) is undoable, so a failed in-place export leaves the masked
model exactly as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._attributes import Attributes, set_attributes, undo_attributes
from ._layers import update_module
from ._meta import copy_modules
from ._trace import OwnedTensor, owned_tensors

Plan = dict[tuple[str, str], list[tuple[int, np.ndarray]]]
Dims = list[tuple[int, np.ndarray | torch.Tensor]]  # a tensor's pruned dimensions and their kept positions


@dataclass
class UndoLog:
    """What applying a plan changed, to put back on failure."""

    tensors: list[tuple[nn.Module, str, bool, Any]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)
    counts: list[tuple[Any, str, Any]] = field(default_factory=list)

    def undo(self) -> None:
        undo_attributes(self.counts)
        for module, saved in reversed(self.attributes):
            module.__dict__.update(saved)
        for module, attr, is_param, tensor in reversed(self.tensors):
            (module._parameters if is_param else module._buffers)[attr] = tensor


def apply_plan(model: nn.Module, plan: Plan, attributes: Attributes | None = None) -> UndoLog:
    """Slice ``model``'s tensors by ``plan`` (ties stay tied), update the modules that changed and ``attributes``."""
    log = UndoLog()
    modules = dict(model.named_modules(remove_duplicate=False))
    changed: dict[int, nn.Module] = {}
    indices: dict[int, torch.Tensor] = {}
    try:
        for owned in owned_tensors(model).values():
            dims = _planned_dims(owned, plan, indices)
            if not dims:
                continue
            new = _slice(owned.tensor, dims)
            for path, attr in owned.names:
                module = modules[path]
                log.tensors.append((module, attr, owned.is_param, owned.tensor))
                (module._parameters if owned.is_param else module._buffers)[attr] = new
                changed[id(module)] = module
        for module in changed.values():
            log.attributes.append((module, dict(module.__dict__)))
            update_module(module)
        set_attributes(modules, attributes or {}, log.counts)
    except Exception:
        log.undo()
        raise
    return log


def sliced_copy(model: nn.Module, plan: Plan, attributes: Attributes | None = None) -> nn.Module:
    """A deep copy of ``model`` with ``plan`` applied: pruned tensors are sliced from the original, not copied whole.

    Example:
        >>> keep = [(0, np.array([0, 2]))]
        >>> small = sliced_copy(torch.nn.Linear(4, 3), {("", "weight"): keep, ("", "bias"): keep})
        >>> tuple(small.weight.shape), tuple(small.bias.shape), small.out_features
        ((2, 4), (2,), 2)
    """
    memo: dict[int, Any] = {}
    sliced: list[tuple[str, str]] = []
    indices: dict[int, torch.Tensor] = {}
    for owned in owned_tensors(model).values():
        dims = _planned_dims(owned, plan, indices)
        memo[id(owned.tensor)] = _slice(owned.tensor, dims) if dims else copy.deepcopy(owned.tensor, memo)
        if dims:
            sliced += owned.names
    pruned = copy_modules(model, memo)
    modules = dict(pruned.named_modules(remove_duplicate=False))
    changed = {id(m): m for m in (modules[path] for path, _ in sliced)}
    for module in changed.values():
        update_module(module)
    set_attributes(modules, attributes or {}, [])
    return pruned


def _planned_dims(owned: OwnedTensor, plan: Plan, indices: dict[int, torch.Tensor]) -> Dims | None:
    """The plan's pruned dimensions of a tensor, under whichever of its names the plan uses.

    Kept positions come as index tensors, each made once per array of the plan (``indices``, by ``id``:
    the plan keeps its arrays alive) and shared by the tensors of one channel set.
    """
    dims = next((plan[name] for name in owned.names if name in plan), None)
    if dims is None:
        return None
    for _, keep in dims:
        if id(keep) not in indices:
            indices[id(keep)] = torch.as_tensor(keep)
    return [(dim, indices[id(keep)]) for dim, keep in dims]


def _slice(tensor: torch.Tensor, dims: Dims) -> torch.Tensor:
    """The kept positions of ``tensor`` along each pruned dimension, as a new tensor (``dims`` is not empty)."""
    if tensor.is_meta:  # no values to select: only the shape changes (meta index_select is slow)
        shape = list(tensor.shape)
        for dim, keep in dims:
            shape[dim] = len(keep)
        data = torch.empty(shape, dtype=tensor.dtype, device="meta")
    else:
        data = tensor.detach()  # detached: the selection records no autograd graph
        for dim, keep in dims:
            data = data.index_select(dim, torch.as_tensor(keep, device=data.device))
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(data, requires_grad=tensor.requires_grad)
    return data
