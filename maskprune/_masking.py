"""The masked forward: zero the removed channels of every parameter, cheaply.

One flat 0/1 buffer holds every group's channels (each group's mask is a view of
it). Each prunable parameter dimension gets a small derived mask, refreshed
when masks change, never per step. A single forward pre-hook on the model
multiplies the parameters that have removed channels in place (through
``.data``, so autograd's saved tensors are not invalidated), and layer norms over
pruned channels get a hook that computes their statistics over kept channels.
No hook reads a tensor value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._layers import masked_norm
from ._trace import LayerNormSite


@dataclass
class DimMask:
    """The mask of one dimension of one parameter."""

    tensor: torch.Tensor
    dim: int
    units: np.ndarray  # flat unit per position
    index: torch.Tensor
    values: torch.Tensor
    shaped: torch.Tensor
    active: bool = False


@dataclass
class NormMask:
    site: LayerNormSite
    units: np.ndarray
    index: torch.Tensor
    values: torch.Tensor
    active: bool = False


class MaskRuntime:
    """Mask buffers and hooks of one model."""

    def __init__(self, model: nn.Module, n_units: int, device: torch.device):
        self.model = model
        self.keep = torch.ones(n_units + 1, device=device)
        self.dims: list[DimMask] = []
        self.norms: list[NormMask] = []
        self.handles: list[RemovableHandle] = []
        self.active: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_dim(self, tensor: torch.Tensor, dim: int, units: np.ndarray) -> None:
        device = tensor.device
        index = torch.as_tensor(units, device=device)
        values = torch.ones(len(units), device=device, dtype=tensor.dtype)
        shape = [1] * tensor.dim()
        shape[dim] = -1
        self.dims.append(DimMask(tensor, dim, units, index, values, values.view(shape)))

    def add_norm(self, site: LayerNormSite, units: np.ndarray) -> None:
        index = torch.as_tensor(units, device=self.keep.device)
        self.norms.append(NormMask(site, units, index, torch.ones(len(units), device=self.keep.device)))

    def refresh(self, keep_host: np.ndarray) -> None:
        """Copy the host keep flags into every derived mask (once per change, not per step)."""
        with torch.no_grad():
            self.keep.copy_(torch.as_tensor(keep_host, dtype=self.keep.dtype))
            for d in self.dims:
                d.values.copy_(self.keep[d.index.to(self.keep.device)].to(d.values.device, d.values.dtype))
                d.active = not keep_host[d.units].all()
            for n in self.norms:
                n.values.copy_(self.keep[n.index])
                n.active = not keep_host[n.units].all()
        self.active = [(d.tensor, d.shaped) for d in self.dims if d.active]

    def apply(self) -> None:
        """Zero the removed channels of every parameter, in place."""
        with torch.no_grad():
            for tensor, shaped in self.active:
                if shaped.device != tensor.device:
                    self._follow_device(tensor.device)
                    return self.apply()
                tensor.data.mul_(shaped)

    def _follow_device(self, device: torch.device) -> None:
        """The model moved: move every mask with it (host-side metadata check only)."""
        self.keep = self.keep.to(device)
        for d in self.dims:
            d.index, d.values = d.index.to(device), d.values.to(device)
            d.shaped = d.values.view(d.shaped.shape)
        for n in self.norms:
            n.index, n.values = n.index.to(device), n.values.to(device)
        self.active = [(d.tensor, d.shaped) for d in self.dims if d.active]

    def install(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self._pre_hook))
        for norm in self.norms:
            self.handles.append(norm.site.module.register_forward_hook(self._norm_hook(norm)))

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        self.apply()

    @staticmethod
    def _norm_hook(norm: NormMask):
        site = norm.site

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not norm.active:
                return None
            values = norm.values if norm.values.device == args[0].device else norm.values.to(args[0].device)
            return masked_norm(
                args[0], site.in_dim, values, module.weight, getattr(module, "bias", None), site.eps, site.kind
            )

        return hook
