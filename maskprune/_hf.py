"""Hugging Face configs: the fields that describe an export's sizes, found by building the architecture on meta.

A ``transformers`` model is built from its config, so ``from_pretrained`` reloads an export only when the
config says the new sizes. Which tensor dimensions a field sizes is read from the architecture itself: the
model is built on the meta device (no memory, no values) from its config and from copies with one field
doubled, and the dimensions that change are the field's. The export's sizes of those dimensions give the
new value of each field; a config with them is built once more and must give every tensor the export's
shape. When it does not (the layers keep different sizes, or sizes the config cannot say, such as a head
count apart from the hidden size where the model derives one from the other), the config keeps its fields
and the export is recorded as not uniform: :func:`maskprune.load_pruned` still rebuilds it from the spec.

Examples:
    >>> import transformers
    >>> config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
    ...     num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)
    >>> model = transformers.LlamaForCausalLM(config)
    >>> shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    >>> shapes["model.layers.0.mlp.up_proj.weight"] = (6, 8)
    >>> shapes["model.layers.0.mlp.gate_proj.weight"] = (6, 8)
    >>> shapes["model.layers.0.mlp.down_proj.weight"] = (8, 6)
    >>> config_updates(model, shapes, {})
    {'intermediate_size': 6}
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._attributes import HEAD_COUNTS, Attributes
from ._walk import ModelIndex
from .errors import SpecError

if TYPE_CHECKING:
    from ._export import Plan

# the config fields an export may set: widths, head counts and head sizes, expert counts
CONFIG_FIELDS = HEAD_COUNTS | {
    "hidden_size",
    "n_embd",
    "d_model",
    "intermediate_size",
    "n_inner",
    "d_ff",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "head_dim",
    "d_kv",
    "kv_channels",
    "num_local_experts",
    "num_experts",
}
log = logging.getLogger("maskprune")

DERIVED = ("head_dim",)  # a field that some configs leave out and their models read where present (Qwen2)
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")  # one layer is enough to see what a field sizes

Shapes = dict[str, tuple[int, ...]]
Dim = tuple[str, int]  # a state-dict name (layer indices as ``#``) and a dimension


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model with its config (not a module that only holds a config)."""
    config = getattr(model, "config", None)
    return hasattr(type(model), "config_class") and hasattr(config, "to_dict") and not isinstance(config, nn.Module)


def config_updates(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], heads: Mapping[str, int]) -> dict | None:
    """The config fields that make ``type(model)(config)`` have ``shapes``, the export's state-dict shapes.

    ``heads``: the head counts already found from the traced sizes (``num_attention_heads`` …), used where no
    tensor dimension says them. Returns the fields that change (an empty dict where none does), or None where no
    config built by changing the fields of :data:`CONFIG_FIELDS` has the export's shapes.
    """
    config = copy.deepcopy(model.config)
    original = {name: value for name, value in vars(model.config).items() if name in CONFIG_FIELDS}
    for name in DERIVED:
        if not isinstance(getattr(type(config), name, None), property):  # Falcon's head_dim: computed, not set
            original.setdefault(name, _ABSENT)
    for name, value in original.items():  # a field left to a default (GPT-2's n_inner): its value, written out
        if value is None or value is _ABSENT:
            materialised = _default_of(model, config, name)
            if materialised is not None:
                setattr(config, name, materialised)
    values = {name: value for name in original if type(value := getattr(config, name, None)) is int and value > 0}
    sensitivity = {name: _changed_dims(model, config, name, value) for name, value in values.items()}
    sizes: dict[Dim, set[int]] = {}  # the export's sizes of each dimension, over the layers
    for tensor, shape in shapes.items():
        for dim, size in enumerate(shape):
            sizes.setdefault((_key(tensor), dim), set()).add(size)
    owners: dict[Dim, int] = {}
    for dims in sensitivity.values():
        for dim in dims:
            owners[dim] = owners.get(dim, 0) + 1
    new = dict(values)
    for name, dims in sensitivity.items():
        found = {
            (size - offset) / scale
            for (key, dim), (scale, offset) in dims.items()
            if owners[key, dim] == 1 and scale > 0
            for size in sizes.get((key, dim), ())
        }
        if len(found) > 1 or any(v != int(v) or v < 1 for v in found):
            return None  # layers disagree, or a size the field cannot give
        if found:
            new[name] = int(found.pop())
        elif name in heads:
            new[name] = heads[name]
    for name, value in new.items():
        setattr(config, name, value)
    built = _shapes(model, config)
    if built is None or any(shapes.get(name) != shape for name, shape in built.items()):
        return None
    return {name: new[name] for name in values if new[name] != original[name]}


def _shapes(model: nn.Module, config: Any) -> Shapes | None:
    """The state-dict shapes of ``type(model)`` built from ``config`` on the meta device; None where it fails."""
    try:
        with torch.device("meta"):
            built = type(model)(config)
    except Exception:  # a config the architecture refuses: no shapes to go by
        return None
    return {name: tuple(tensor.shape) for name, tensor in built.state_dict().items()}


_LAYER_INDEX = re.compile(r"\.\d+(?=\.)")


def _key(name: str) -> str:
    """A state-dict name with its layer indices as ``#``: one key for the same tensor of every layer."""
    return _LAYER_INDEX.sub(".#", name)


def _few_layers(config: Any) -> Any:
    """``config`` with one layer, where it has a layer count: the same tensors per layer, built sooner."""
    fewer = copy.deepcopy(config)
    for name in LAYER_COUNTS:
        if type(getattr(fewer, name, None)) is int and getattr(fewer, name) > 1:
            setattr(fewer, name, 1)
    return fewer


def _changed_dims(model: nn.Module, config: Any, name: str, value: int) -> dict[Dim, tuple[float, float]]:
    """The dimensions ``name`` sizes, each with ``(scale, offset)``: size = scale * value + offset."""
    small = _few_layers(config)
    before = _shapes(model, small)
    setattr(small, name, 2 * value)
    after = _shapes(model, small)
    if before is None or after is None:
        return {}
    dims: dict[Dim, tuple[float, float]] = {}
    for tensor, shape in before.items():
        changed = after.get(tensor)
        if changed is None or len(changed) != len(shape):
            continue
        for dim, (old, new) in enumerate(zip(shape, changed, strict=True)):
            if old != new:
                scale = (new - old) / value
                dims[_key(tensor), dim] = (scale, old - scale * value)
    return dims


def _default_of(model: nn.Module, config: Any, name: str) -> int | None:
    """The size a field left out or None stands for, where the model reads it when set: two values set give
    each dimension it sizes as ``scale * value + offset``, and the size now as that of the value sought."""
    small = _few_layers(config)
    base = _shapes(model, small)
    probes = [2 * max((v for v in vars(config).values() if type(v) is int), default=1) + k for k in (1, 2)]
    built = []
    for probe in probes:
        setattr(small, name, probe)
        built.append(_shapes(model, small))
    if base is None or None in built:
        return None
    found = set()
    for tensor, shape in base.items():
        for dim, old in enumerate(shape):
            first, second = built[0].get(tensor, shape), built[1].get(tensor, shape)
            if dim >= len(first) or dim >= len(second) or first[dim] == second[dim]:
                continue
            scale = second[dim] - first[dim]  # the probes are one apart
            found.add((old - (first[dim] - scale * probes[0])) / scale)
    if len(found) != 1:
        return None
    value = found.pop()
    return int(value) if value == int(value) and value >= 1 else None


_ABSENT = object()


def build_info(model: nn.Module) -> dict[str, Any]:
    """What a saved folder records to build ``model``'s architecture again, where the model says it.

    A ``transformers`` model: its class (``"transformers:LlamaForCausalLM"``) and its config; a timm model
    (with ``pretrained_cfg["architecture"]``): ``"timm:NAME"``. Other models: nothing
    (``save_pruned(..., architecture=...)`` names them).
    """
    if is_transformers_model(model) and type(model).__module__.startswith("transformers."):
        config = json.loads(model.config.to_json_string(use_diff=False))  # what save_pretrained writes
        return {"build": f"transformers:{type(model).__name__}", "config": config}
    pretrained = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(pretrained, dict):
        name = pretrained.get("architecture")
        if isinstance(name, str) and name:
            return {"build": f"timm:{name}"}
    return {}


def export_attributes(index: ModelIndex, plan: Plan, attributes: Attributes) -> tuple[Attributes, dict[str, Any]]:
    """``attributes`` with the config fields a ``transformers`` model's export changes, and the spec's ``info``:
    how to build the architecture (:func:`build_info`) and, for a ``transformers`` model, whether its config
    says the export's sizes (``"uniform"``)."""
    model = index.model
    info = build_info(model)
    if not plan or not is_transformers_model(model):
        return attributes, info
    heads = {
        name[len("config.") :]: value
        for values in attributes.values()
        for name, value in values.items()
        if name.startswith("config.") and type(value) is int
    }
    updates = config_updates(model, pruned_shapes(index, plan), heads)
    info["uniform"] = updates is not None
    if updates is None:
        log.info(
            "the %s's layers keep different sizes (or sizes its config cannot say): its config keeps the original "
            "sizes, so reload it with maskprune.save_pruned / maskprune.load_pruned(folder), not from_pretrained",
            type(model).__name__,
        )
    if not updates:
        return attributes, info
    root = {**attributes.get("", {}), **{f"config.{name}": value for name, value in updates.items()}}
    return {**attributes, "": root}, info


def pruned_shapes(index: ModelIndex, plan: Plan) -> Shapes:
    """Every parameter's and buffer's shape after ``plan``, under each of its names."""
    shapes: Shapes = {}
    for owned in index.owned.values():
        shape = list(owned.tensor.shape)
        for name in owned.names:
            for dim, keep in plan.get(name, ()):
                shape[dim] = len(keep)
        for path, attr in owned.names:
            shapes[f"{path}.{attr}" if path else attr] = tuple(shape)
    return shapes


def build_transformers(name: str, config: dict[str, Any]) -> nn.Module:
    """A ``transformers`` model of the class named ``name`` (looked up in ``transformers`` only, never imported
    from elsewhere), built from ``config`` (a config's ``to_dict()``) with fresh weights, in eval mode."""
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "config_class")):
        raise SpecError(f"transformers {transformers.__version__} has no model class {name!r}")
    try:
        return cls(cls.config_class.from_dict(config)).eval()
    except Exception as error:
        raise SpecError(f"cannot build a transformers {name} from the saved config: {error}") from error
