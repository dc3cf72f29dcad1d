"""Depth: the residual blocks of a container (``nn.ModuleList``, ``nn.Sequential``) as units of a block group.

A *residual block* is a container entry whose output is its input plus something, of the same shape:
``Mask(..., depth=True)`` finds them by running the model once on the example inputs, watching each
entry's forward for an addition that takes the entry's input tensor itself as an operand (the skip
connection: ``residual + hidden_states``, ResNet's ``out += identity``, BERT's post-norm
``LayerNorm(x + input_tensor)``). An entry that writes its input in place, is called more than once,
or whose first output differs from its input in shape or dtype is not removable. A container gets one
block group whose units are its removable entries; the others (a ResNet stage's downsampling first
block) stay, and the container always keeps one entry.

A removed entry computes the identity in the masked model (a forward hook returns its input in place
of its first output) and is deleted from its container by the export (:func:`remove_entries`), which
renumbers what counts layers on Hugging Face models: ``config.num_hidden_layers``, per-layer config
lists such as ``layer_types``, and each module's ``layer_idx``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._records import call_model, evaluating

_ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})
# per-layer lists of a Hugging Face config (one entry per hidden layer), cut like the layers
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers", "sliding_window_layers", "attention_chunk_layers")


@dataclass(frozen=True)
class BlockContainer:
    """A container's removable entries: the units ``start .. start + len(entries)`` of the keep flags."""

    path: str  # the container's qualified name ("" for the model itself)
    entries: tuple[int, ...]  # positions of the removable entries in the container
    length: int  # entries in the container
    start: int  # flat unit of the first removable entry

    def entry_path(self, position: int) -> str:
        return f"{self.path}.{position}" if self.path else str(position)


def block_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The tensor a block adds its branch to: its first tensor argument, else ``hidden_states=``."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def first_output(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def identity_output(args: tuple, kwargs: Mapping[str, Any], output: Any) -> Any:
    """``output`` with its first tensor replaced by the block's input: the block as the identity."""
    x = block_input(args, kwargs)
    if isinstance(output, torch.Tensor):
        return x
    return type(output)([x, *output[1:]]) if isinstance(output, list) else (x, *output[1:])


class _Watch:
    """One call of a candidate entry: its input, and whether an addition took it as an operand."""

    def __init__(self, x: torch.Tensor | None) -> None:
        self.x = x
        self.skip = False
        self.written = False


class _AddWatcher(TorchFunctionMode):
    """Marks the open calls whose input is an operand of an addition (or is written in place)."""

    def __init__(self, open_calls: list[_Watch]) -> None:
        super().__init__()
        self.open_calls = open_calls

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.open_calls:
            name = getattr(func, "__name__", "")
            inplace = name.endswith("_") and not name.endswith("__") or name == "__iadd__" or kwargs.get("inplace")
            for call in self.open_calls:
                if call.x is None:
                    continue
                if name in _ADDS and any(a is call.x for a in args):
                    call.skip = True
                if inplace and args and args[0] is call.x:
                    call.written = True
        return func(*args, **kwargs)


def find_blocks(
    model: nn.Module, inputs: Any, ignore: Mapping[str, nn.Module]
) -> list[tuple[str, tuple[int, ...], int]]:
    """Every container with removable residual entries: (path, their positions, the container's length).

    ``ignore``: modules never pruned (an ignored container, entry or module above them keeps its entries).
    """
    named = list(model.named_modules(remove_duplicate=False))
    counts: dict[int, int] = {}
    for _, module in named:
        counts[id(module)] = counts.get(id(module), 0) + 1
    ignored = tuple(ignore)
    candidates: list[tuple[str, nn.Module]] = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2 and not _under(path, ignored)
    ]
    if not candidates:
        return []
    calls: dict[int, list[tuple[_Watch, torch.Tensor | None]]] = {}
    open_calls: list[_Watch] = []
    handles = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        open_calls.append(_Watch(block_input(args, kwargs)))

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = open_calls.pop()
        calls.setdefault(id(module), []).append((call, first_output(output)))

    entries = {id(e) for _, c in candidates for e in c if not isinstance(e, (nn.ModuleList, nn.ModuleDict))}
    try:
        for _, container in candidates:
            for entry in container:
                if id(entry) in entries and counts[id(entry)] == 1:
                    handles.append(entry.register_forward_pre_hook(before, with_kwargs=True))
                    handles.append(entry.register_forward_hook(after, with_kwargs=True))
        with torch.no_grad(), evaluating(model), _AddWatcher(open_calls):
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for path, container in candidates:
        removable = tuple(
            i
            for i, entry in enumerate(container)
            if _residual(calls.get(id(entry), [])) and not _under(f"{path}.{i}" if path else str(i), ignored)
        )
        if removable:
            found.append((path, removable, len(container)))
    return found


def _under(path: str, ignored: tuple[str, ...]) -> bool:
    """Whether the module ``path`` is one of ``ignored`` or inside one."""
    return any(path == i or path.startswith(f"{i}.") or i == "<root>" for i in ignored)


def _residual(calls: list[tuple[_Watch, torch.Tensor | None]]) -> bool:
    """One call whose first output has its input's shape and dtype, through an addition with that input."""
    if len(calls) != 1:
        return False
    call, out = calls[0]
    x = call.x
    return (
        x is not None
        and out is not None
        and call.skip
        and not call.written
        and out.shape == x.shape
        and out.dtype == x.dtype
        and out is not x
    )


def block_containers(found: Sequence[tuple[str, tuple[int, ...], int]], first_unit: int) -> list[BlockContainer]:
    """Number the removable entries of ``found`` as flat units from ``first_unit`` on."""
    containers = []
    for path, entries, length in found:
        containers.append(BlockContainer(path, entries, length, first_unit))
        first_unit += len(entries)
    return containers


def remove_entries(model: nn.Module, removed: Mapping[str, Sequence[int]], undo: list[tuple[Any, str, Any]]) -> None:
    """Delete the ``removed`` positions of each container, renumbering it and what counts its entries.

    Deeper containers first, so the paths of the others stay valid. Each change is appended to ``undo`` as
    (object, attribute, old value), which :func:`maskprune._attributes.undo_attributes` puts back.
    """
    configs = _configs(model)
    for path in sorted(removed, key=lambda p: -len(p.split("."))):
        container = model.get_submodule(path)
        gone = set(removed[path])
        items = list(container._modules.items())
        numbered = [key for key, _ in items] == [str(i) for i in range(len(items))]
        kept = [(i, key, m) for i, (key, m) in enumerate(items) if i not in gone]
        modules = {(str(j) if numbered else key): m for j, (_, key, m) in enumerate(kept)}
        _set(container, "_modules", type(container._modules)(modules), undo)
        for j, (i, _, entry) in enumerate(kept):
            if i != j and entry is not None:
                for sub in entry.modules():
                    if type(sub.__dict__.get("layer_idx")) is int and sub.layer_idx == i:
                        _set(sub, "layer_idx", j, undo)
        for config in configs:
            _renumber_config(config, len(items), sorted(gone), undo)


def _configs(model: nn.Module) -> list[Any]:
    """The distinct Hugging Face configs (objects with ``num_hidden_layers``) the model's modules hold."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
            found.setdefault(id(config), config)
    return list(found.values())


def _renumber_config(config: Any, length: int, gone: list[int], undo: list[tuple[Any, str, Any]]) -> None:
    """A container of ``config.num_hidden_layers`` entries lost ``gone``: the count and per-layer lists follow."""
    if config.num_hidden_layers != length:
        return
    attr = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    _set(config, attr, length - len(gone), undo)
    for name in PER_LAYER_CONFIG:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == length:
            kept = [v for i, v in enumerate(value) if i not in gone]
            _set(config, name, type(value)(kept), undo)


def _set(owner: Any, attr: str, value: Any, undo: list[tuple[Any, str, Any]]) -> None:
    undo.append((owner, attr, owner.__dict__[attr]))
    if attr == "_modules":
        object.__setattr__(owner, attr, value)
    else:
        setattr(owner, attr, value)
