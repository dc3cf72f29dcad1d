"""Rules of norms (batch, instance, group, layer and RMS norms) and ``prelu``, with the size updaters of their
layers; EvoNorm layers, traced as one layer each.

A norm's channels pass through with its affine tensors; statistics taken over channels need masked
statistics (layer norms, resolved by the tracer) or whole norm groups. Their meta kernels are
``_meta._batch_norm``, ``_meta._instance_norm``, ``_meta._group_norm``, ``_meta._layer_norm`` and
``_meta._rms_norm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from maskprune._layers import norm_widths, updater
from maskprune._records import WIDTH, SizeSite, TensorNode, iter_tensors
from maskprune._walk import store

from ._core import NORM, OpCall, argument, call_reason, only_tensors, rule, shortcut

if TYPE_CHECKING:
    from maskprune._trace import Tracer


@rule("batch_norm", "instance_norm")
def batch_norm(call: OpCall) -> None:
    """Channels (dim 1) pass through. Statistics taken from the input mix it along the other dims, which
    are then frozen: a weight standardisation (``F.batch_norm(w.reshape(1, out, -1), training=True)``)
    averages over a weight's input channels there (timm's standardised conv layers are traced as one layer
    instead, :mod:`maskprune._rules.standardised`, and keep their input channels prunable)."""
    x, out = call.args[0], call.outputs[0]
    if x.dim() < 2:
        return
    channels = x.shape[1]
    tensorless = True
    for t in call.inputs[1:]:
        if t.dim() == 1 and t.shape[0] == channels:
            call.unite(x, 1, t, 0)
            call.role(t, 0, NORM)
            tensorless = False
    if tensorless and call.in_module((_BatchNorm, _InstanceNorm)):
        call.tracer.tensorless_layer(*call.tracer.running_module(), channels, call.space(x, 1))
    if _statistics_from_input(call.name, call.args, call.kwargs):
        call.set_out(out, [call.space(x, d) if d == 1 else None for d in range(x.dim())])
    else:
        call.set_out(out, call.spaces(x))


@shortcut(batch_norm)
def _full_batch_norm(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """:func:`batch_norm` with running statistics and affine tensors (four distinct 1-D tensors of the channel
    count): the four tensors share the input's channels, which pass to the output. Normalised by the running
    statistics, every other dim passes too; by the input's own (training), the others freeze."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.dim() < 2 or out.shape != x.shape:
        return False
    stats = only_tensors(args, kwargs, 4)
    if stats is None or len({id(t) for t in (x, *stats)}) != 5:
        return False
    channels = x.shape[1]
    if any(t.dim() != 1 or t.shape[0] != channels for t in stats):
        return False
    node = tracer.node(x)
    tainted = node.tainted
    for t in stats:  # in the order run_rule looks them up: their nodes are made in that order
        t_node = tracer.node(t)
        tracer.graph.unite(node.spaces[1], t_node.spaces[0])
        if id(t) in tracer.owned:
            tracer.roles.setdefault((id(t), 0), NORM)
        tainted = tainted or t_node.tainted
    if not _statistics_from_input(name, args, kwargs):
        tracer.bind(out, TensorNode(node.spaces, tuple(out.shape), tainted))
        return True
    graph, reason = tracer.graph, call_reason(tracer, name)
    spaces = [
        space if d == 1 else graph.new_space(n, reason)
        for d, (space, n) in enumerate(zip(node.spaces, out.shape, strict=True))
    ]
    tracer.bind(out, TensorNode(tuple(spaces), tuple(out.shape), tainted))
    for d, space in enumerate(node.spaces):  # averaged over: what the rule leaves unclaimed
        if d != 1:
            graph.freeze(space, reason)
    return True


def _statistics_from_input(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a ``batch_norm`` or ``instance_norm`` call normalises by the input's own statistics."""
    if name == "batch_norm":
        return bool(argument(args, kwargs, 5, "training", False)) or argument(args, kwargs, 1, "running_mean") is None
    return bool(argument(args, kwargs, 5, "use_input_stats", True))


@rule("group_norm")
def group_norm(call: OpCall) -> None:
    """Channels of one norm group are one unit: removing whole groups keeps the statistics exact."""
    x, out = call.args[0], call.outputs[0]
    tensorless = call.arg(2, "weight") is None
    if not call.in_module(torch.nn.GroupNorm):
        if tensorless:
            return  # no tensor and no layer to hold the new group count: keep it whole
        call.unproven("a group count outside a GroupNorm")
    groups = int(call.arg(1, "num_groups"))
    channels = x.shape[1]
    per_group = channels // groups
    space = call.space(x, 1)
    if per_group > 1:
        idx = np.arange(channels)
        call.link(space, idx, space, (idx // per_group) * per_group)
    for t in call.inputs[1:]:
        if t.dim() == 1 and t.shape[0] == channels:
            call.unite(x, 1, t, 0)
            call.role(t, 0, NORM)
    if tensorless:
        call.tracer.tensorless_layer(*call.tracer.running_module(), channels, space)
    call.set_out(out, call.spaces(x))


@rule("layer_norm", "rms_norm")
def layer_norm(call: OpCall) -> None:
    """A norm over the last dim stays prunable when its module can compute statistics over kept channels."""
    x, out = call.args[0], call.outputs[0]
    shape = call.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    if k != 1:
        call.set_out(out, [call.space(x, d) if d < x.dim() - k else None for d in range(x.dim())])
        return
    for t in call.inputs[1:]:
        if t.dim() == 1:
            call.unite(x, -1, t, 0)
            call.role(t, 0, NORM)
    call.set_out(out, call.spaces(x))
    pending = call.tracer.pending_ln
    if pending:
        pending[-1].append((call.space(x, -1), call.name))
    else:
        call.graph.freeze(call.space(x, -1), "layer norm outside any module")


@rule("prelu")
def prelu(call: OpCall) -> None:
    x, w = call.args[0], call.arg(1, "weight")
    out = call.outputs[0]
    if w.numel() > 1 and x.dim() >= 2:
        call.unite(x, 1, w, 0)
        call.role(w, 0, NORM)
    else:
        call.claim_all(w)
    call.set_out(out, call.spaces(x))


# ---- EvoNorm layers (timm's EvoNorm2dB0 … EvoNorm2dS2a), traced as one layer each ---------------
def is_evo_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an EvoNorm layer this rule knows: a module named ``EvoNorm*`` whose parameters and
    buffers (``weight``, ``bias``, ``v``, ``running_var``) are all of one channel count, its children without
    tensors (the activation of ``S1`` and ``S2``), with a ``groups`` count dividing it where it has one (the ``S``
    variants).

    Examples:
        >>> from timm.layers import EvoNorm2dB0, EvoNorm2dS0
        >>> is_evo_norm(EvoNorm2dB0(8)), is_evo_norm(EvoNorm2dS0(8, groups=4)), is_evo_norm(nn.GroupNorm(4, 8))
        (True, True, False)
    """
    if "evonorm" not in type(module).__name__.lower():
        return False
    if any(
        next(child.parameters(), None) is not None or next(child.buffers(), None) is not None
        for child in module.children()
    ):
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return False
    channels = weight.shape[0]
    if any(t.shape != (channels,) for t in (*module.parameters(), *module.buffers())):
        return False
    groups = getattr(module, "groups", None)
    return groups is None or (type(groups) is int and groups > 0 and channels % groups == 0)


def evo_norm(tracer: Tracer, module: nn.Module, args: tuple, output: Any) -> None:
    """One call of an EvoNorm layer: its statistics are per channel (the ``B`` variants' batch and instance
    variances) or per norm group (the ``S`` variants' group std, as ``group_norm``'s). Channels pass with its
    tensors; a norm group is one unit, so removing whole groups keeps every kept group's std, and the export sets
    ``groups`` to the groups kept."""
    x = next(iter_tensors(args))
    call = OpCall(tracer, type(module).__name__, False, (x,), {}, output)
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        call.unite(x, 1, t, 0)
        call.role(t, 0, NORM)
    groups = getattr(module, "groups", None)
    if groups is not None:
        channels, space = x.shape[1], call.space(x, 1)
        counted = call.graph.new_space(groups)
        idx = np.arange(channels)
        call.link(counted, idx // (channels // groups), space, idx)  # the channels of a group are one unit
        path = tracer.module_paths.get(id(module), "")
        tracer.size_sites.append(SizeSite(path, groups, counted, WIDTH, written=False, attribute="groups"))
    for t in iter_tensors(output):
        if t.shape == x.shape:
            call.set_out(t, call.spaces(x))
    call.finish([x, *tensors], f"EvoNorm layer {type(module).__name__} in {tracer.path()}")


# ---- size updaters -------------------------------------------------------------------------------
@updater(_BatchNorm, _InstanceNorm)
def _update_batch_norm(m: nn.Module) -> None:
    tensor = m.weight if m.weight is not None else m.running_mean
    if tensor is not None:
        store(m, **norm_widths(m, tensor.shape[0]))


@updater(nn.GroupNorm)
def _update_group_norm(m: nn.GroupNorm) -> None:
    store(m, **norm_widths(m, m.weight.shape[0]))


@updater(nn.LayerNorm)
def _update_layer_norm(m: nn.Module) -> None:
    if m.weight is not None:
        store(m, normalized_shape=tuple(m.weight.shape))


@updater(nn.PReLU)
def _update_prelu(m: nn.PReLU) -> None:
    store(m, num_parameters=m.weight.numel())


if hasattr(nn, "RMSNorm"):
    updater(nn.RMSNorm)(_update_layer_norm)
