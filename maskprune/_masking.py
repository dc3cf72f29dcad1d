"""The masked forward: zero the removed channels of every parameter, cheaply.

One flat 0/1 buffer holds every group's channels (each group's mask is a view of
it). Each prunable parameter dimension gets a small derived mask, refreshed
when masks change, never per step. Layer norms over pruned channels get a hook
that computes their statistics over kept channels; so do weight-standardised convs
over pruned input channels. No hook reads a tensor value
on the host.

A parameter with removed channels is zeroed there in place (through ``.data``, so
autograd's saved tensors are not invalidated) by a forward pre-hook on the model.
With a tracked optimizer, its post-step hook zeroes every masked parameter after
each step, and the pre-hook then zeroes only parameters that something else wrote
to since (their version counter or storage changed: host metadata, no
synchronisation), so a training step costs one multiplication per masked
parameter and forwards without weight updates cost none. A removed channel
usually carries zeros, so its weights get a zero gradient and standard
optimizers leave its zero weights and states alone; the optimizer hooks zero
gradients and states at the first step after each mask change. Where a removed
position does get a gradient (a loss term on the weights, a consumer column
reading a channel that carries a constant), the re-zeroing after every step
still holds the weights at zero; only its optimizer state may then drift.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._depth import identity_output
from ._experts import masked_routing
from ._fsdp import local, shard_view, writable
from ._layers import kept_input_conv, masked_norm, rms_rescale
from ._records import LayerNormSite

JOINT_FRACTION = 4  # masks of a tensor are multiplied together when their product is at most 1/4 of its size


@dataclass(eq=False)
class DimMask:
    """The mask of one dimension of one parameter: ``values`` is shaped to broadcast along ``dim``."""

    tensor: torch.Tensor
    dim: int
    units: np.ndarray  # flat unit per position
    producer: bool = False
    active: bool = False
    values: torch.Tensor = field(init=False)  # a view of its MaskBuffer's tensor
    local: torch.Tensor = field(init=False)  # the part of ``values`` for this rank's shard (all of it, unsharded)


@dataclass(eq=False)
class NormMask:
    """The kept channels of a layer norm's input."""

    site: LayerNormSite
    units: np.ndarray
    active: bool = False
    values: torch.Tensor = field(init=False)  # a view of its MaskBuffer's tensor
    index: torch.Tensor = field(init=False)  # the kept positions (while active)

    def refresh(self, keep_host: np.ndarray, device: torch.device) -> None:
        if self.active:
            self.index = torch.as_tensor(np.flatnonzero(keep_host[self.units]), device=device)


@dataclass(eq=False)
class MaskBuffer:
    """The masks of many dimensions in one tensor, so that one gather refreshes them all.

    The tensor has ``ndim`` dimensions, all of size one but ``dim``: split along it, it gives each slot
    its values already shaped to broadcast against its parameter.
    """

    slots: list[DimMask] | list[NormMask]
    units: np.ndarray  # every slot's units, concatenated
    starts: np.ndarray  # where each slot's units start
    dim: int
    index: torch.Tensor = field(init=False)  # ``units`` on the buffer's device
    values: torch.Tensor = field(init=False)

    @classmethod
    def of(
        cls, slots: list[DimMask] | list[NormMask], device: torch.device, dtype: torch.dtype, ndim: int, dim: int
    ) -> MaskBuffer:
        sizes = [len(slot.units) for slot in slots]
        units = np.concatenate([slot.units for slot in slots])
        shape = [1] * ndim
        shape[dim] = len(units)
        buffer = cls(slots, units, np.cumsum(sizes) - sizes, dim)
        buffer.move(torch.ones(shape, device=device, dtype=dtype), torch.as_tensor(units, device=device))
        return buffer

    def move(self, values: torch.Tensor, index: torch.Tensor) -> None:
        """Hold ``values`` (and ``index``): every slot's values become views of it."""
        self.values, self.index = values, index
        views = values.split([len(slot.units) for slot in self.slots], dim=self.dim)
        for slot, view in zip(self.slots, views, strict=True):
            slot.values = view
            if isinstance(slot, DimMask):
                slot.local = shard_view(view, slot.tensor, slot.dim)

    def refresh(self, keep_host: np.ndarray, keep: torch.Tensor) -> None:
        """Copy the keep flags of ``units`` in; mark each slot active when it removes a channel."""
        flags = keep_host[self.units]
        if keep.device.type == "cpu":  # a torch gather may wake the intra-op thread pool; numpy's does not
            self.values.view(-1).copy_(torch.from_numpy(flags))
        else:
            self.values.view(-1).copy_(keep[self.index.to(keep.device)])
        active = ~np.logical_and.reduceat(flags, self.starts)
        for slot, is_active in zip(self.slots, active.tolist(), strict=True):
            slot.active = is_active


@dataclass(eq=False)
class MaskedTensor:
    """A parameter with removed channels: its masks, and its (version, storage) right after it was last zeroed.

    Of a parameter sharded by ``fully_shard`` (a ``DTensor``), the masks and the writes are of this rank's shard.
    """

    tensor: torch.Tensor
    masks: list[torch.Tensor]
    stamp: tuple[int, int] | None = None
    joint: bool = False  # multiply the masks together first (see mask_)

    def stale(self) -> bool:
        """Whether something may have written to the tensor since it was last zeroed (host metadata only)."""
        data = local(self.tensor)
        return self.stamp != (data._version, data.data_ptr())

    def mask_(self, target: torch.Tensor) -> None:
        """Zero the removed positions of ``target`` (the parameter's data, gradient or an optimizer state).

        With ``joint``, the masks' product multiplies ``target`` in one pass: the same values, as masks hold 0 and 1.
        The product is made per call, not kept: kept, it would hold up to a quarter of the tensor's size.
        """
        target = local(target)
        if self.joint:
            target.mul_(functools.reduce(operator.mul, self.masks))
            return
        for mask in self.masks:
            target.mul_(mask)

    def zero(self) -> None:
        self.mask_(writable(self.tensor))
        data = local(self.tensor)
        self.stamp = (data._version, data.data_ptr())


# model -> the runtime masking it (weak both ways: a runtime lives while its hooks or its Mask hold it)
_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def runtime_on(model: nn.Module) -> MaskRuntime | None:
    """The runtime of the Mask that masks ``model`` now, if one does (until that Mask's ``remove()``)."""
    ref = _RUNTIMES.get(model)
    return ref() if ref is not None else None


class MaskRuntime:
    """Mask buffers and hooks of one model.

    ``enforce`` (frozen semantics) re-zeroes the removed channels before a forward
    when the parameters changed, and masks layer-norm statistics; without it
    (soft-filter semantics) the hooks stay off and removed weights train until the
    next ``do_mask()``.
    """

    def __init__(self, model: nn.Module, n_flags: int, device: torch.device):
        self.model = model
        self.enforce = True
        self.optimizer_handles: list[RemovableHandle] = []
        self.optimizers: list[torch.optim.Optimizer] = []  # tracked: hooked again by a runtime that replaces this one
        self.keep = torch.ones(n_flags, device=device)
        self.blocks: list[tuple[nn.Module, int]] = []  # (container entry, flat unit): removed, it is the identity
        self.removed_blocks: frozenset[int] = frozenset()
        self.routers: list[tuple[nn.Module, int, int]] = []  # (router, flat unit of expert 0, experts)
        self.router_bias: dict[int, torch.Tensor | None] = {}  # router index -> 0 / -inf per expert (None: all kept)
        self.dims: list[DimMask] = []
        self.norms: list[NormMask] = []
        self.buffers: list[MaskBuffer] = []
        self.handles: list[RemovableHandle] = []
        self.active: list[MaskedTensor] = []
        self.stepped: set[int] = set()  # ids of the tracked optimizers that stepped since the masks last changed
        self.zeroed_depth = 0  # inside zeroed(): the weights were just zeroed, the forward pre-hook need not
        _RUNTIMES[model] = weakref.ref(self)

    def add_dims(self, dims: list[tuple[torch.Tensor, int, np.ndarray, bool]]) -> None:
        """Mask these (tensor, dim, flat unit per position, is a producer): a buffer per device, dtype and shape."""
        by_kind: dict[tuple[torch.device, torch.dtype, int, int], list[DimMask]] = {}
        for tensor, dim, units, producer in dims:
            mask = DimMask(tensor, dim, units, producer)
            self.dims.append(mask)
            by_kind.setdefault((tensor.device, tensor.dtype, tensor.dim(), dim), []).append(mask)
        for kind, slots in by_kind.items():
            self.buffers.append(MaskBuffer.of(slots, *kind))

    def add_norms(self, norms: list[tuple[LayerNormSite, np.ndarray]]) -> None:
        """Mask the statistics of these layer norms (site, flat unit per input channel)."""
        slots = [NormMask(site, units) for site, units in norms]
        if slots:
            self.norms += slots
            self.buffers.append(MaskBuffer.of(slots, self.keep.device, torch.get_default_dtype(), 1, 0))

    def add_blocks(self, blocks: list[tuple[nn.Module, int]]) -> None:
        """Make these container entries (entry, flat unit) the identity while their unit is removed."""
        self.blocks += blocks

    def add_routers(self, routers: list[tuple[nn.Module, int, int]]) -> None:
        """Route no token to the removed experts of these routers (router, flat unit of expert 0, experts)."""
        self.routers += routers

    def refresh(self, keep_host: np.ndarray) -> None:
        """Copy the host keep flags into every derived mask (once per change, not per step)."""
        self.removed_blocks = frozenset(unit for _, unit in self.blocks if not keep_host[unit])
        for i, (_, start, count) in enumerate(self.routers):
            flags = torch.as_tensor(keep_host[start : start + count])
            bias = torch.zeros(count).masked_fill_(~flags, -math.inf).to(self.keep.device)
            self.router_bias[i] = None if flags.all() else bias
        with torch.no_grad():
            self.keep.copy_(torch.as_tensor(keep_host, dtype=self.keep.dtype))
            for buffer in self.buffers:
                buffer.refresh(keep_host, self.keep)
        for norm in self.norms:
            norm.refresh(keep_host, self.keep.device)
        self._collect_active()
        self.stepped.clear()

    def _collect_active(self) -> None:
        """One entry per parameter with removed channels, holding the masks of all its pruned dimensions."""
        by_tensor: dict[int, MaskedTensor] = {}
        for d in self.dims:
            if d.active:
                entry = by_tensor.setdefault(id(d.tensor), MaskedTensor(d.tensor, []))
                entry.masks.append(d.local)
        for entry in by_tensor.values():
            # one pass with the product where it is a fraction of the tensor (a kernel's positions per channel pair)
            joint_size = math.prod(mask.numel() for mask in entry.masks)
            entry.joint = len(entry.masks) > 1 and joint_size * JOINT_FRACTION <= local(entry.tensor).numel()
        self.active = list(by_tensor.values())

    def apply(self, only_stale: bool = False) -> None:
        """Zero the removed channels of every parameter in place (``only_stale``: of those written to since)."""
        with torch.no_grad():
            if torch.compiler.is_compiling():  # a compiled graph re-applies its masks by value, every call
                for entry in self.active:
                    entry.mask_(writable(entry.tensor))
                return
            for entry in self.active:
                if entry.masks[0].device != entry.tensor.device:
                    self._follow_device(entry.tensor.device)
                    return self.apply(only_stale)
                if not only_stale or entry.stale():
                    entry.zero()

    @contextmanager
    def zeroed(self, only_stale: bool = False) -> Iterator[None]:
        """Zero the removed channels now; inside the block, forwards do not zero them again.

        For work that only reads the weights between its forwards (the export and its verification),
        where the pre-hook's second pass over every masked parameter would find nothing to do.
        ``only_stale`` zeroes only the parameters whose version counter or storage changed since they were
        last zeroed: a write past both (through ``.data``, a fused optimizer step) is then missed, so the
        caller must be able to tell (the export's verification zeroes all and runs again where outputs differ).
        """
        self.apply(only_stale)
        self.zeroed_depth += 1
        try:
            yield
        finally:
            self.zeroed_depth -= 1

    def apply_producers(self) -> None:
        """Zero only the filters that compute removed channels (soft-filter semantics, as SFP and FPGM do)."""
        with torch.no_grad():
            for d in self.dims:
                if d.active and d.producer:
                    writable(d.tensor).mul_(d.local.to(d.tensor.device))
        for entry in self.active:
            entry.stamp = None

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Frozen semantics through optimizer steps: removed positions get no gradient, no momentum, stay zero."""
        self.optimizers.append(optimizer)
        self.optimizer_handles.append(optimizer.register_step_pre_hook(self._before_step))
        self.optimizer_handles.append(optimizer.register_step_post_hook(self._after_step))

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """At an optimizer's first step after a mask change: gradients of removed positions are zeroed."""
        if not self.enforce or id(optimizer) in self.stepped:
            return
        with torch.no_grad():
            for entry in self.active:
                if entry.tensor.grad is not None:
                    entry.mask_(entry.tensor.grad)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Every masked weight is zeroed again; at an optimizer's first step after a mask change, its states too."""
        if not self.enforce:
            return
        self.apply()  # every weight: fused optimizers write without bumping version counters
        if id(optimizer) in self.stepped:
            return
        with torch.no_grad():
            for entry in self.active:
                for value in optimizer.state.get(entry.tensor, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == entry.tensor.shape:
                        entry.mask_(value)
        self.stepped.add(id(optimizer))

    def unhook_optimizers(self) -> None:
        for handle in self.optimizer_handles:
            handle.remove()
        self.optimizer_handles.clear()
        self.optimizers.clear()

    def release(self) -> None:
        """Take every hook off and forget the model: it is no longer masked."""
        self.uninstall()
        self.unhook_optimizers()
        if runtime_on(self.model) is self:
            del _RUNTIMES[self.model]

    def _follow_device(self, device: torch.device) -> None:
        """The model moved: move every mask with it (host-side metadata check only)."""
        self.keep = self.keep.to(device)
        for buffer in self.buffers:
            buffer.move(buffer.values.to(device), buffer.index.to(device))
        for norm in self.norms:
            if norm.active:
                norm.index = norm.index.to(device)
        self._collect_active()

    def install(self) -> None:
        for entry, unit in self.blocks:  # a removed block is removed under either semantics
            self.handles.append(entry.register_forward_hook(self._block_hook(unit), with_kwargs=True))
        for i, (router, _, _) in enumerate(self.routers):  # so is a removed expert
            self.handles.append(router.register_forward_hook(self._router_hook(i)))
        if not self.enforce:
            return
        self.handles.append(self.model.register_forward_pre_hook(self._pre_hook))
        for norm in self.norms:
            self.handles.append(norm.site.module.register_forward_hook(self._norm_hook(norm)))

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.zeroed_depth:
            return
        # with a tracked optimizer, its steps re-zero what they write: only other writes remain to be caught
        self.apply(only_stale=bool(self.optimizer_handles))

    def _block_hook(self, unit: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return identity_output(args, kwargs, output) if unit in self.removed_blocks else None

        return hook

    def _router_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            bias = self.router_bias.get(index)
            return None if bias is None else masked_routing(module, output, bias)

        return hook

    @staticmethod
    def _norm_hook(norm: NormMask):
        site = norm.site

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not norm.active:
                return None
            x = args[0]
            if site.kind == "std_conv":  # its own forward on the kept input channels: as exported
                index = norm.index if norm.index.device == x.device else norm.index.to(x.device)
                return kept_input_conv(module, x, index)
            if site.kind != "rms_scale" and not torch.compiler.is_compiling():
                return kept_norm(x, site, norm.index if norm.index.device == x.device else norm.index.to(x.device))
            # by the 0/1 flags, which change by value: a compiled graph's shapes must not change with the mask
            values = norm.values if norm.values.device == x.device else norm.values.to(x.device)
            if site.kind == "rms_scale":
                return rms_rescale(x, output, site.in_dim, values, site.eps)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            return masked_norm(x, site.in_dim, values, weight, bias, site.eps, site.kind)

        return hook


def kept_norm(x: torch.Tensor, site: LayerNormSite, index: torch.Tensor) -> torch.Tensor:
    """The layer norm (or RMS norm) of ``site`` on its input ``x``, over the kept channels ``index``; zero elsewhere.

    The kept channels are gathered and normalised by torch's own ``F.layer_norm`` or ``F.rms_norm``, bit for bit
    as the exported model normalises them, then put back in place: a third of the passes over ``x`` that
    :func:`~maskprune._layers.masked_norm` makes. No value is read on the host. The shape of ``index`` changes with
    the mask, so a compiled graph uses ``masked_norm`` instead, whose 0/1 flags change by value.

    Examples:
        >>> norm, x = nn.LayerNorm(4), torch.randn(2, 4)
        >>> y = kept_norm(x, LayerNormSite("layer_norm", norm, "norm", 0, 1, 1e-5), torch.tensor([0, 2, 3]))
        >>> torch.equal(y[:, [0, 2, 3]], F.layer_norm(x[:, [0, 2, 3]], (3,))), y[:, 1].abs().sum().item()
        (True, 0.0)
    """
    weight = getattr(site.module, "weight", None)
    weight = weight.index_select(0, index) if weight is not None else None
    kept = x.index_select(site.in_dim, index).movedim(site.in_dim, -1)
    if site.kind == "rms_norm":
        y = F.rms_norm(kept, (len(index),), weight, site.eps)
    else:
        bias = getattr(site.module, "bias", None)
        bias = bias.index_select(0, index) if bias is not None else None
        y = F.layer_norm(kept, (len(index),), weight, bias, site.eps)
    return y.new_zeros(x.shape).index_copy_(site.in_dim, index, y.movedim(-1, site.in_dim))
