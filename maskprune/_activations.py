"""Where a group's channels appear in activations, and how to watch them during a forward.

Activation-based criteria (APoZ, Taylor, ThiNet) need the tensors a leaf module
reads or writes, and which of their positions are which channel of a group. The
trace recorded every leaf-module call; :func:`activation_sites` maps them to a
group, and :func:`watch` calls back with the live tensors on later forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._records import TensorNode, iter_tensors


@dataclass(eq=False)
class ActivationSite:
    """One dimension of one tensor a leaf module reads (``kind="input"``) or writes (``"output"``).

    ``positions[i]`` of dimension ``dim`` holds channel ``units[i]`` of the group;
    ``call`` says which call of the module within one forward (modules such as a
    shared ``ReLU`` run several times), ``index`` which tensor among its inputs or outputs.
    """

    path: str
    module: nn.Module
    call: int
    kind: str
    index: int
    dim: int
    positions: np.ndarray
    units: np.ndarray

    def per_channel(self, values: torch.Tensor, size: int) -> torch.Tensor:
        """Sum per-position ``values`` (one per position of ``dim``) into the group's ``size`` channels."""
        positions = torch.as_tensor(self.positions, device=values.device)
        units = torch.as_tensor(self.units, device=values.device)
        out = torch.zeros(size, dtype=values.dtype, device=values.device)
        return out.index_add_(0, units, values.index_select(0, positions))


def activation_sites(
    calls: Sequence, units_of: Callable[[int], np.ndarray], start: int, size: int, kind: str
) -> list[ActivationSite]:
    """The sites of every recorded leaf call whose ``kind`` tensors carry units ``start..start+size-1``."""
    if kind not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")
    sites = []
    for call in calls:
        nodes: list[TensorNode] = call.inputs if kind == "input" else call.outputs
        for index, node in enumerate(nodes):
            for dim, space in enumerate(node.spaces):
                units = units_of(space)
                inside = (units >= start) & (units < start + size)
                if inside.any():
                    positions = np.flatnonzero(inside)
                    sites.append(
                        ActivationSite(
                            call.path, call.module, call.call, kind, index, dim, positions, units[positions] - start
                        )
                    )
    return sites


_WATCH_HOOKS: set[int] = set()  # ids of the hooks watch() installed and not yet removed


def strip_watch_hooks(model: nn.Module) -> None:
    """Drop :func:`watch` hooks that a deep copy of a watched model carried over (the copy is not watched)."""
    if not _WATCH_HOOKS:
        return
    for module in model.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
        ):
            for key in [k for k in hooks if k in _WATCH_HOOKS]:
                del hooks[key]


@contextmanager
def watch(
    model: nn.Module, sites: Sequence[ActivationSite], callback: Callable[[ActivationSite, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``callback(site, tensor)`` for every site on each forward of ``model`` inside the block.

    Examples:
        >>> model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
        >>> group = Mask(model, x).make().groups[0]
        >>> seen = []
        >>> with watch(model, group.activations(), lambda site, t: seen.append((site.path, tuple(t.shape)))):
        ...     _ = model(x)
        >>> seen[:2]
        [('conv1', (1, 64, 32, 32)), ('bn1', (1, 64, 32, 32))]
    """
    by_module: dict[int, list[ActivationSite]] = {}
    for site in sites:
        by_module.setdefault(id(site.module), []).append(site)
    counts: dict[int, int] = {}
    handles = [model.register_forward_pre_hook(lambda *_: counts.clear())]

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if id(module) not in by_module:
            return
        call = counts.get(id(module), 0)
        counts[id(module)] = call + 1
        tensors = {"input": None, "output": None}
        for site in by_module[id(module)]:
            if site.call != call:
                continue
            if tensors[site.kind] is None:
                tensors[site.kind] = list(iter_tensors(args if site.kind == "input" else output))
            if site.index < len(tensors[site.kind]):
                callback(site, tensors[site.kind][site.index])

    try:
        for site_list in by_module.values():
            handles.append(site_list[0].module.register_forward_hook(hook))
        _WATCH_HOOKS.update(h.id for h in handles)
        yield
    finally:
        for handle in handles:
            handle.remove()
            _WATCH_HOOKS.discard(handle.id)
