"""Masks on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

``fully_shard`` replaces every parameter of the modules it shards with a new ``nn.Parameter``
holding a ``DTensor``: each rank keeps a block of rows (``Shard(0)``, ``torch.chunk``
semantics: ceil-divided, the last blocks possibly short or empty). The Mask follows the
model's parameters by name (:func:`rebind`): its runtime then zeroes the rows each rank holds
(:func:`shard_view` of a mask along a sharded dimension; a mask along another dimension
applies to every local row), without gathering a parameter. The criteria score full tensors
(:func:`gathered`, one all-gather per sharded parameter, once per ``do_mask()``), and the
export gathers a plain copy of the model on the CPU (:mod:`maskprune._fsdp_export`).
FSDP1's ``FullyShardedDataParallel`` flattens parameters into one buffer per unit: refused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from ._records import Trace


def _loaded(module: str, *names: str) -> tuple[Any, ...]:
    """The classes ``names`` of ``module`` where it is imported, else Nones: no model holds a ``DTensor`` or an
    FSDP module before its user imported them, and importing them costs ``import maskprune`` a second."""
    found = sys.modules.get(module)
    return tuple(getattr(found, name, None) if found is not None else None for name in names)

_FSDP1 = (
    "FSDP1 (FullyShardedDataParallel) flattens parameters into one buffer, which per-channel masks cannot "
    "follow: shard the model with FSDP2 instead (torch.distributed.fsdp.fully_shard on its blocks, then the "
    "root), after Mask.make()"
)


FSDP_KEYS = ("__composable_api_state_key", "_is_fsdp_managed_module", "_fsdp_use_orig_params")  # set by fully_shard


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by ``fully_shard``).

    Examples:
        >>> is_sharded(torch.zeros(2))
        False
    """
    if type(tensor) is torch.Tensor or type(tensor) is nn.Parameter:  # the masks' every step: the quick answer
        return False
    (dtensor,) = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def any_sharded(trace: Trace) -> bool:
    """Whether a traced tensor is (now) a ``DTensor``."""
    return any(is_sharded(o.tensor) for o in trace.owned.values())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds of a ``DTensor`` (its local shard, sharing its memory); any other tensor as it is.

    Examples:
        >>> t = torch.zeros(2)
        >>> local(t) is t
        True
    """
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():  # without autograd, to_local() is the shard itself, not a differentiable view of it
        return tensor.to_local()


def writable(tensor: torch.Tensor) -> torch.Tensor:
    """What to zero in place for a parameter: its local shard, or its ``.data`` (autograd does not see the write)."""
    return local(tensor) if is_sharded(tensor) else tensor.data


def local_rows(tensor: DTensor, dim: int) -> tuple[int, int]:
    """``(start, length)`` of the positions along ``dim`` of ``tensor`` that this rank holds.

    ``Shard(d)`` placements split as ``torch.chunk`` does (ceil-divided chunks; the last ones may be
    short or empty); ``Replicate`` keeps every position. Other placements are refused.
    """
    shard, replicate = _loaded("torch.distributed.tensor", "Shard", "Replicate")
    start, length = 0, tensor.shape[dim]
    mesh = tensor.device_mesh
    for mesh_dim, placement in enumerate(tensor.placements):
        if type(placement) is shard:
            if placement.dim != dim:
                continue
            ranks, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
            chunk = -(-length // ranks)
            first = min(rank * chunk, length)
            start, length = start + first, min(chunk, length - first)
        elif type(placement) is not replicate:
            raise NotImplementedError(
                f"a parameter placed as {placement} cannot be masked: maskprune masks parameters sharded by "
                "FSDP2 (Shard(d), Replicate)"
            )
    if local(tensor).shape[dim] != length:
        raise NotImplementedError(
            f"the local shard of a {tuple(tensor.shape)} parameter has {local(tensor).shape[dim]} positions along "
            f"dim {dim}, not the {length} of torch.chunk's split: uneven shardings cannot be masked"
        )
    return start, length


def shard_view(values: torch.Tensor, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The part of a mask ``values`` (full length along ``dim``) that applies to this rank's shard of ``tensor``.

    Examples:
        >>> shard_view(torch.ones(1, 4), torch.zeros(3, 4), 1).shape   # not sharded: all of it
        torch.Size([1, 4])
    """
    if not is_sharded(tensor):
        return values
    start, length = local_rows(tensor, dim)
    return values.narrow(dim, start, length)


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise where ``model`` or one of its modules is wrapped by FSDP1."""
    (fsdp1,) = _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise NotImplementedError(_FSDP1)


def refuse_sharded(model: nn.Module) -> None:
    """``make()`` traces a whole model: raise where ``model`` is sharded already."""
    refuse_fsdp1(model)
    if any(is_sharded(p) for p in model.parameters()):
        raise RuntimeError(
            "the model is already sharded (fully_shard made its parameters DTensors): call Mask(...).make() on the "
            "unsharded model (on the CPU or the meta device), then fully_shard it, then mask.track_optimizer()"
        )


def resharded(model: nn.Module) -> None:
    """Every FSDP2 module of ``model`` back to its sharded parameters (after a forward that left them gathered)."""
    (fsdp_module,) = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def rebind(trace: Trace, members: Iterator, new: dict[int, torch.Tensor]) -> None:
    """Point the trace's tensors and the groups' ``members`` at ``new`` tensors (by the ``id`` of the old one)."""
    for owned in trace.owned.values():
        owned.tensor = new.get(id(owned.tensor), owned.tensor)
    for member in members:
        member.tensor = new.get(id(member.tensor), member.tensor)


def moved_parameters(model: nn.Module, trace: Trace) -> dict[int, torch.Tensor]:
    """The model's current parameters and buffers (by name) that are not the traced ones, by the traced one's ``id``.

    Empty unless something replaced a parameter object: ``fully_shard`` does, ``model.to()`` does not.
    """
    refuse_fsdp1(model)
    resharded(model)
    found: dict[int, torch.Tensor] = {}
    for owned in trace.owned.values():
        module_path, attr = owned.names[0]
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise RuntimeError(f"the module {module_path!r} is no longer in the model: {_FSDP1}") from None
        current = module._parameters.get(attr) if owned.is_param else module._buffers.get(attr)
        if current is None:
            current = getattr(module, attr, None)
        if owned.is_param and not (isinstance(current, nn.Parameter) and current.shape == owned.tensor.shape):
            if getattr(module, "_is_fsdp_managed_module", False):  # FSDP1 turned it into a view of a flat buffer
                shape = tuple(owned.tensor.shape)
                raise NotImplementedError(f"{owned.qualname} is no longer a {shape} parameter of the model: {_FSDP1}")
            continue  # something else stands in its place (a parametrization): the traced parameter stays
        if isinstance(current, torch.Tensor) and current is not owned.tensor:
            found[id(owned.tensor)] = current
    return found


@contextmanager
def gathered(trace: Trace, members: list) -> Iterator[None]:
    """Inside the block, the trace and the groups' members hold full tensors instead of ``DTensor`` shards.

    A collective: every rank gathers every sharded tensor of the trace, in the trace's order. The full
    tensors are the single-process tensors, so a criterion scores as one process would.
    """
    sharded = [o.tensor for o in trace.owned.values() if is_sharded(o.tensor)]
    if not sharded:
        yield
        return
    with torch.no_grad():
        full = {id(t): t.full_tensor() for t in sharded}
    back = {id(full[id(t)]): t for t in sharded}
    rebind(trace, members, full)
    try:
        yield
    finally:
        rebind(trace, members, back)


def without_fsdp(state: dict[str, Any]) -> dict[str, Any]:
    """A module's ``__dict__`` without what ``fully_shard`` added: its state's keys and hooks (for a plain copy)."""
    state = {k: v for k, v in state.items() if not k.startswith(FSDP_KEYS)}
    for key, value in state.items():
        if key.endswith("hooks") and isinstance(value, dict) and value:
            state[key] = type(value)((k, h) for k, h in value.items() if not _from_distributed(h))
    return state


def _from_distributed(hook: Any) -> bool:
    """Whether ``hook`` (a function, a bound method, or a wrapper of one) comes from ``torch.distributed``."""
    target = getattr(hook, "hook", hook)  # nn.Module's _WrappedHook keeps the function
    target = getattr(target, "func", target)  # functools.partial
    owner = getattr(target, "__self__", None)
    origin = type(owner).__module__ if owner is not None else getattr(target, "__module__", None)
    return (origin or "").startswith("torch.distributed")


def plain_class(cls: type) -> type:
    """The class ``fully_shard`` swapped out for ``FSDP<cls>`` (``cls`` itself for any other class)."""
    (fsdp_module,) = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, fsdp_module))
    return cls


def rank() -> int:
    """This process's rank in the default group (0 outside one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
