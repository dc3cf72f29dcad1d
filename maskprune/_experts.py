"""Experts: the experts of a mixture-of-experts layer as units of an expert group (``kind == "experts"``).

Hugging Face's MoE layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE …) hold their experts as fused tensors of
one module (``gate_up_proj`` of shape ``(experts, 2 * inner, hidden)``, ``down_proj`` of ``(experts, hidden,
inner)``) beside a router whose weight has one row per expert and whose forward returns ``(logits, scores,
indices)``: softmax over the logits, the ``top_k`` highest, renormalised where ``norm_topk_prob`` says so
(always for Mixtral). An expert is unit ``i`` of its layer's group: its router row and its slice ``i`` of
dim 0 of every fused tensor.

A removed expert gets a logit of minus infinity in the masked model (a forward hook on the router computes
the scores and the top-k again from the masked logits: :func:`masked_routing`), so no token is routed to it,
and the export slices it out of dim 0 of those tensors and sets the counts (``num_experts`` of the modules,
``num_local_experts`` / ``num_experts`` of a config all of whose expert layers keep as many).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# routers whose forward is softmax -> top-k -> optional renormalisation, returning (logits, scores, indices)
ROUTERS = frozenset(
    {
        "MixtralTopKRouter",
        "Qwen2MoeTopKRouter",
        "Qwen3MoeTopKRouter",
        "Qwen3NextTopKRouter",
        "OlmoeTopKRouter",
        "FlexOlmoTopKRouter",
    }
)
CONFIG_COUNTS = ("num_local_experts", "num_experts")
FUSED = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer's experts: the units ``start .. start + count`` of the keep flags."""

    router: str  # qualified name of the router module
    experts: str  # qualified name of the module holding the fused expert tensors
    count: int  # experts of the layer
    top_k: int  # experts each token is routed to
    start: int  # flat unit of expert 0
    tensors: tuple[tuple[str, str], ...]  # (module, attribute) of every tensor whose dim 0 is the expert


def find_expert_layers(model: nn.Module, ignore: Mapping[str, nn.Module]) -> list[tuple[str, str, int, int, tuple]]:
    """Every MoE layer of ``model``: (router, experts, count, top_k, tensors), in module order.

    ``ignore``: modules never pruned (a layer whose router or experts is one of them, or inside one, is left out).
    """
    ignored = tuple(ignore)
    found = []
    for path, parent in model.named_modules():
        routers = [(n, m) for n, m in parent.named_children() if type(m).__name__ in ROUTERS]
        holders = [(n, m) for n, m in parent.named_children() if _fused(m)]
        if len(routers) != 1 or len(holders) != 1:
            continue
        (router_name, router), (experts_name, experts) = routers[0], holders[0]
        count = experts.num_experts
        weight = router.__dict__["_parameters"].get("weight")
        top_k = getattr(router, "top_k", None)
        if weight is None or weight.dim() != 2 or weight.shape[0] != count or type(top_k) is not int:
            continue
        router_path, experts_path = (f"{path}.{n}" if path else n for n in (router_name, experts_name))
        if any(_under(p, ignored) for p in (router_path, experts_path)) or not 0 < top_k < count:
            continue
        tensors = [(router_path, name) for name, t in _own_tensors(router) if t.dim() and t.shape[0] == count]
        tensors += [(experts_path, name) for name, t in _own_tensors(experts) if t.dim() and t.shape[0] == count]
        found.append((router_path, experts_path, count, top_k, tuple(tensors)))
    return found


def _fused(module: nn.Module) -> bool:
    """Whether ``module`` holds fused expert tensors: 3-D, one slice per expert along dim 0."""
    count = getattr(module, "num_experts", None)
    params = module.__dict__["_parameters"]
    fused = [params[name] for name in FUSED if params.get(name) is not None]
    return (
        type(count) is int
        and "down_proj" in params
        and len(fused) >= 2
        and all(t.dim() == 3 and t.shape[0] == count for t in fused)
    )


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]


def _under(path: str, ignored: tuple[str, ...]) -> bool:
    return any(path == i or path.startswith(f"{i}.") or i == "<root>" for i in ignored)


def expert_layers(found: Sequence[tuple[str, str, int, int, tuple]], first_unit: int) -> list[ExpertLayer]:
    """Number the experts of ``found`` as flat units from ``first_unit`` on."""
    layers = []
    for router, experts, count, top_k, tensors in found:
        layers.append(ExpertLayer(router, experts, count, top_k, first_unit, tensors))
        first_unit += count
    return layers


def expert_plan(layers: Sequence[ExpertLayer], keep: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Kept experts (dim 0) of each tensor of a layer that loses some: ``{(module, attribute): positions}``."""
    plan = {}
    for layer in layers:
        flags = keep[layer.start : layer.start + layer.count]
        if not flags.all():
            kept = np.flatnonzero(flags)
            plan.update(dict.fromkeys(layer.tensors, kept))
    return plan


def expert_counts(
    layers: Sequence[ExpertLayer], modules: Mapping[str, nn.Module], keep: np.ndarray
) -> dict[str, dict[str, int]]:
    """The expert counts the export sets: the modules' ``num_experts`` and, where every expert layer of a config
    keeps as many, its ``num_local_experts`` / ``num_experts`` (as ``config.<field>`` of the experts module)."""
    updates: dict[str, dict[str, int]] = {}
    by_config: dict[int, tuple[str, set[int], set[int]]] = {}  # config id -> (a path, counts before, counts after)
    for layer in layers:
        kept = int(keep[layer.start : layer.start + layer.count].sum())
        experts = modules[layer.experts]
        config = experts.__dict__.get("config")
        if config is not None and not isinstance(config, nn.Module):
            path, before, after = by_config.setdefault(id(config), (layer.experts, set(), set()))
            before.add(layer.count)
            after.add(kept)
        if kept == layer.count:
            continue
        for path in (layer.router, layer.experts):
            if type(modules[path].__dict__.get("num_experts")) is int:
                updates.setdefault(path, {})["num_experts"] = kept
    for path, before, after in by_config.values():
        config = modules[path].config
        if len(before) != 1 or len(after) != 1 or before == after:
            continue
        (old,), (new,) = before, after
        for name in CONFIG_COUNTS:
            if type(vars(config).get(name)) is int and vars(config)[name] == old:
                updates.setdefault(path, {})[f"config.{name}"] = new
    return updates


def masked_routing(router: nn.Module, output: Any, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The router's ``(logits, scores, indices)`` again with ``bias`` (0, or minus infinity for a removed expert)
    added to the logits: the softmax, the top-k and the renormalisation of the router's own forward."""
    if not (isinstance(output, tuple) and len(output) == 3):
        raise RuntimeError(
            f"the router {type(router).__name__} returned {type(output).__name__}, not (logits, scores, indices): "
            "its removed experts cannot be masked"
        )
    logits, scores, _ = output
    logits = logits + bias.to(logits.device, logits.dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    top, indices = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(scores.dtype), indices
