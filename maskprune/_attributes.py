"""Attributes that hold channel counts (``num_heads``, ``split_size`` …): what an export must update.

Slicing parameters fixes the attributes of torch's own layers (:mod:`maskprune._layers`). A model's
own modules often keep counts too, and read them in ``forward``:
``qkv.reshape(B, N, 3, self.num_heads, self.head_dim)``, ``x.split(self.split_size, dim=2)``. The
trace records each such size as a :class:`~maskprune._records.SizeSite` (module, value, channel space).
When an export changes the count of a site's space, the attributes of that module with a known name
and the site's old value get the new count; a Hugging Face style ``config`` shared by the model gets
its head counts when every site agrees. Whatever this misses, the trial export finds (the model then
fails to run) and those channels stay frozen. A torch norm layer without tensors (``affine=False``)
records the width it normalises as a site too, and gets its ``num_features`` (``num_channels`` and
``num_groups``, ``normalized_shape``) from it.

Some sizes are read only by a model's other methods, after the export: timm's ``reparameterize()``
builds a convolution of ``self.in_chs`` by ``self.out_chs`` channels. A model's own module records
each of its :data:`SIZE_ATTRIBUTES` that equals a dimension of its inputs (``in_*``), of its outputs
(``out_*``) or of either (``dim`` …) as a site naming that attribute (:func:`module_size_sites`): the
export sets it where that dimension is pruned, and leaves it where two pruned dimensions disagree.

Examples:
    >>> class Heads(nn.Module):
    ...     num_heads = 4
    >>> module = Heads()
    >>> updates = attribute_updates({"": module}, [SizeSite("", 4, 7, HEADS)], {7: 3}.get)
    >>> updates
    {'': {'num_heads': 3}}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ._layers import has_updater, norm_widths
from ._records import HEADS, LAYER, WIDTH, SizeSite, TensorNode

# module path -> {attribute (``config.<field>`` for its config): new value (a tuple for ``normalized_shape``)}
Attributes = dict[str, dict[str, int | tuple[int, ...]]]

HEAD_COUNTS = frozenset(
    {
        "num_heads",
        "num_attention_heads",
        "n_head",
        "n_heads",
        "heads",
        "num_key_value_heads",
        "num_kv_heads",
        "n_kv_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
    }
)
# the expert counts an export of expert groups sets (never found by matching a traced size)
EXPERT_COUNTS = frozenset({"num_experts", "num_local_experts"})
WIDTH_ENDINGS = ("dim", "size", "_features", "channels")  # attn_dim, all_head_size, val_attn_dim, inner_dim …
WIDTH_NAMES = frozenset({"nf", "width"})
# a module's sizes that its methods may read after an export, by the tensors they measure (``groups``: where it
# equals the input width, a depthwise block's)
SIZE_ATTRIBUTES = {
    "in_chs": "inputs",
    "in_channels": "inputs",
    "channels": "inputs",
    "groups": "inputs",
    "out_chs": "outputs",
    "out_channels": "outputs",
    "num_features": "either",
    "dim": "either",
    "hidden_size": "either",
}

# names that end like a count but say a geometry or a vocabulary: never a channel count
NOT_COUNTS = frozenset(
    {
        "kernel_size",
        "patch_size",
        "window_size",
        "pool_size",
        "stride_size",
        "output_size",
        "image_size",
        "img_size",
        "vocab_size",
        "batch_size",
        "step_size",
        "chunk_size",
    }
)


def is_count_name(name: str) -> bool:
    """Whether an attribute's name says it holds a head count or a width.

    Examples:
        >>> [is_count_name(n) for n in ("num_heads", "split_size", "attn_dim", "kernel_size", "layer_idx")]
        [True, True, True, False, False]
    """
    return name in HEAD_COUNTS or name in WIDTH_NAMES or (name.endswith(WIDTH_ENDINGS) and name not in NOT_COUNTS)


def holds_count(module: nn.Module | None, value: int) -> bool:
    """Whether ``module`` keeps ``value`` in a count attribute (``num_heads``, ``split_size`` …) that an export can set.

    Examples:
        >>> holds_count(nn.MultiheadAttention(8, 2), 2), holds_count(nn.ReLU(), 2)
        (True, False)
    """
    return module is not None and bool(_count_attributes(module, value))


def module_size_sites(
    path: str, module: nn.Module, inputs: list[TensorNode], outputs: list[TensorNode]
) -> list[SizeSite]:
    """The sites of ``module``'s :data:`SIZE_ATTRIBUTES`: one per dimension of the tensors it measures that it
    equals (none for a layer the export sets from its tensors: torch's, their subclasses).

    Examples:
        >>> class Block(nn.Module):
        ...     in_chs, out_chs, dim = 8, 4, 3
        >>> x, y = TensorNode((0, 1), (2, 8)), TensorNode((0, 2), (2, 4))
        >>> [(s.attribute, s.space) for s in module_size_sites("b", Block(), [x], [y])]
        [('in_chs', 1), ('out_chs', 2)]
    """
    if type(module).__module__.startswith("torch.") or has_updater(module):
        return []
    sites = []
    for name, measures in SIZE_ATTRIBUTES.items():
        value = inspect.getattr_static(module, name, None)  # a property (timm's ConvNormAct.in_channels) is not set
        if type(value) is not int:
            continue
        nodes = {"inputs": inputs, "outputs": outputs, "either": inputs + outputs}[measures]
        for node in nodes:
            sites += [
                SizeSite(path, value, space, WIDTH, written=False, attribute=name)
                for space, size in zip(node.spaces, node.shape, strict=True)
                if size == value
            ]
    return sites


def attribute_updates(
    modules: Mapping[str, nn.Module], sites: list[SizeSite], kept: Callable[[int], int | None]
) -> Attributes:
    """The attributes to set so that the modules' code agrees with the new counts.

    ``kept(space)``: the number of channels the export keeps in a space.
    """
    proposals: dict[tuple[str, int], set[int]] = {}
    named: dict[tuple[str, str], set[int]] = {}  # a site naming its attribute: that attribute's new counts
    widths: set[tuple[str, int]] = set()  # written sizes some site counts channels with, not only heads
    configs: dict[tuple[int, str], tuple[str, set[int]]] = {}  # a shared config's field: every layer's count
    updates: Attributes = {}
    for site in sites:
        new = kept(site.space)
        if new is None:
            continue
        if site.kind == LAYER:  # one space per tensorless layer (Tracer.tensorless_layer): no conflict
            if new != site.value:
                updates.setdefault(site.path, {}).update(norm_widths(modules[site.path], new))
            continue
        if site.attribute is not None:
            if new != site.value:
                named.setdefault((site.path, site.attribute), set()).add(new)
            continue
        if new != site.value:
            proposals.setdefault((site.path, site.value), set()).add(new)
            if site.kind != HEADS:
                widths.add((site.path, site.value))
        config = getattr(modules.get(site.path), "config", None)
        if site.kind == HEADS and config is not None and not isinstance(config, nn.Module):
            for name in _matching(vars(config), HEAD_COUNTS.__contains__, site.value):
                configs.setdefault((id(config), name), (site.path, set()))[1].add(new)
    for (path, old), news in proposals.items():
        module = modules.get(path)
        if module is None or len(news) != 1:
            continue  # two counts for one written size: the code cannot hold both, the trial export decides
        (new,) = news
        # a count of heads goes to head-count attributes only: ``head_dim`` may hold the same number
        counts = is_count_name if (path, old) in widths else HEAD_COUNTS.__contains__
        for name in _count_attributes(module, old, counts):
            updates.setdefault(path, {})[name] = new
    for (path, name), news in named.items():
        if len(news) == 1:  # two pruned dimensions of that size: which one it counts is unknown, it stays
            updates.setdefault(path, {}).setdefault(name, news.pop())
    for (_, name), (path, news) in configs.items():
        new = news.pop()
        if not news and new != getattr(modules[path].config, name):  # every layer agrees: the config can say it
            updates.setdefault(path, {})[f"config.{name}"] = new
    return updates


def _count_attributes(module: nn.Module, value: int, named: Callable[[str], bool] = is_count_name) -> list[str]:
    """The count attributes of ``module`` holding ``value``, its own or its class's defaults (set on the instance);
    ``named``: which names count."""
    return list(dict.fromkeys(_matching(vars(module), named, value) + _matching(vars(type(module)), named, value)))


def _matching(namespace: Mapping[str, Any], named: Callable[[str], bool], value: int) -> list[str]:
    return [name for name, held in namespace.items() if type(held) is int and held == value and named(name)]


def set_attributes(modules: Mapping[str, nn.Module], updates: Attributes, undo: list[tuple[Any, str, Any]]) -> None:
    """Apply ``updates``, appending (object, attribute, old value) to ``undo`` before each change."""
    for path, values in updates.items():
        module = modules[path]
        for name, value in values.items():
            owner, attr = (module.config, name[len("config.") :]) if name.startswith("config.") else (module, name)
            undo.append((owner, attr, owner.__dict__.get(attr, _MISSING)))
            setattr(owner, attr, value)


def undo_attributes(undo: list[tuple[Any, str, Any]]) -> None:
    """Put back what :func:`set_attributes` changed."""
    for owner, attr, old in reversed(undo):
        if old is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, old)


_MISSING = object()
