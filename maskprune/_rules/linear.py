"""Rules of layers with a weight: convolutions (transposed too), ``linear``, ``addmm``, ``einsum``, matrix
products, the grouped products of fused experts and ``embedding``, with the size updaters of their layers.

Channels flow from the input to the weight's consuming dim and from its producing dim to the output. The
shape-only meta kernels of ``linear`` and the convolutions are ``_meta._linear`` and ``_meta._conv`` (listed in
``_meta._PRODUCTS``, which a FLOPs count leaves to torch's own kernels); ``_meta._grouped_mm`` stands in for
torch's meta ``_grouped_mm``, which takes only 16-bit floats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from maskprune._layers import updater
from maskprune._records import NO_TENSORS, TensorNode
from maskprune._walk import store

from ._core import BIAS, CONSUMER, PRODUCER, OpCall, broadcast_prefix, call_reason, rule, running_in, shortcut

if TYPE_CHECKING:
    from maskprune._trace import Tracer


def _conv_args(call: OpCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int, int]:
    """(input, weight, bias, output, groups, channel dim of the input) of a convolution call."""
    x = call.args[0]
    spatial = int(call.name[-2])
    groups = int(call.arg(6, "groups", 1))  # the same position for conv and conv_transpose
    return x, call.arg(1, "weight"), call.arg(2, "bias"), call.outputs[0], groups, x.dim() - spatial - 1


@rule("conv1d", "conv2d", "conv3d")
def conv(call: OpCall) -> None:
    x, w, b, out, groups, c = _conv_args(call)
    if groups > 1 and not call.in_module(torch.nn.modules.conv._ConvNd):
        call.unproven("a group count outside a conv layer")
    out_ch, in_per_group = w.shape[0], w.shape[1]
    if groups == 1:
        call.unite(x, c, w, 1)
        call.role(w, 1, CONSUMER)
    elif in_per_group == 1 and out_ch == groups:
        call.unite(x, c, w, 0)
    else:  # grouped: a whole conv group (its inputs and outputs) is one unit
        _group_units(call, call.space(x, c), in_per_group, call.space(w, 0), out_ch // groups)
    call.role(w, 0, PRODUCER)
    if b is not None:
        call.unite(b, 0, w, 0)
        call.role(b, 0, BIAS)
    spaces: list[int | None] = [None] * out.dim()
    if c == 1:
        spaces[0] = call.space(x, 0)
    spaces[c] = call.space(w, 0)
    call.set_out(out, spaces)


@shortcut(conv)
def _convolution(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """:func:`conv` of a batched input by an ungrouped weight, or a depthwise one in a conv layer, every argument
    given by position (as ``nn.Conv2d`` calls it): channels flow from the input to the weight's columns (its rows,
    depthwise) and from the weight's rows to the output; the positions and the kernel's dims freeze."""
    if kwargs or not 2 <= len(args) <= 7 or not isinstance(out, torch.Tensor):
        return False
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    groups = args[6] if len(args) > 6 else 1
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and (b is None or isinstance(b, torch.Tensor))):
        return False
    if type(groups) is not int or groups < 1 or not all(_holds_no_tensor(a) for a in args[3:6]):
        return False
    ndim = int(name[-2]) + 2
    if x.dim() != ndim or w.dim() != ndim or out.dim() != ndim or (b is not None and b.dim() != 1):
        return False
    if x is w or b is x or b is w:
        return False
    depthwise = groups > 1
    if depthwise and (w.shape[1] != 1 or w.shape[0] != groups or not running_in(tracer, torch.nn.modules.conv._ConvNd)):
        return False
    graph, roles, owned = tracer.graph, tracer.roles, tracer.owned
    x_node, w_node = tracer.node(x), tracer.node(w)
    graph.unite(x_node.spaces[1], w_node.spaces[0 if depthwise else 1])
    if id(w) in owned:
        if not depthwise:
            roles.setdefault((id(w), 1), CONSUMER)
        roles.setdefault((id(w), 0), PRODUCER)
    tainted = x_node.tainted or w_node.tainted
    if b is not None:
        b_node = tracer.node(b)
        graph.unite(b_node.spaces[0], w_node.spaces[0])
        if id(b) in owned:
            roles.setdefault((id(b), 0), BIAS)
        tainted = tainted or b_node.tainted
    reason = call_reason(tracer, name)
    positions = [graph.new_space(n, reason) for n in out.shape[2:]]
    tracer.bind(out, TensorNode((x_node.spaces[0], w_node.spaces[0], *positions), tuple(out.shape), tainted))
    for space in (*x_node.spaces[2:], *w_node.spaces[1 + (not depthwise) :]):  # what the rule leaves unclaimed
        graph.freeze(space, reason)
    return True


def _holds_no_tensor(value: Any) -> bool:
    """Whether ``value`` is a plain argument: a number, string or the like, or a tuple or list of ints."""
    if isinstance(value, (tuple, list)):
        return all(type(v) is int for v in value)
    return isinstance(value, NO_TENSORS)


def _group_units(call: OpCall, in_space: int, in_per_group: int, out_space: int, out_per_group: int) -> None:
    g = call.graph
    n_in, n_out = g.size(in_space), g.size(out_space)
    call.link(in_space, np.arange(n_in), out_space, (np.arange(n_in) // in_per_group) * out_per_group)
    call.link(out_space, np.arange(n_out), out_space, (np.arange(n_out) // out_per_group) * out_per_group)


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(call: OpCall) -> None:
    x, w, b, out, groups, c = _conv_args(call)
    if groups > 1 and not call.in_module(torch.nn.modules.conv._ConvNd):
        call.unproven("a group count outside a conv layer")
    in_ch, out_per_group = w.shape[0], w.shape[1]
    call.unite(x, c, w, 0)
    call.role(w, 0, CONSUMER)
    if groups == 1:
        out_space = call.space(w, 1)
        call.role(w, 1, PRODUCER)
    else:
        out_space = call.graph.new_space(out_per_group * groups)
        _group_units(call, call.space(w, 0), in_ch // groups, out_space, out_per_group)
    if b is not None:
        call.graph.unite(call.space(b, 0), out_space)
        call.role(b, 0, BIAS)
    spaces: list[int | None] = [None] * out.dim()
    if c == 1:
        spaces[0] = call.space(x, 0)
    spaces[c] = out_space
    call.set_out(out, spaces)


@updater(_ConvNd)
def _update_conv(m: _ConvNd) -> None:
    w = m.weight
    if m.transposed:
        new_in = w.shape[0]
        groups = m.groups if m.groups == 1 else m.groups * new_in // m.in_channels
        store(m, in_channels=new_in, out_channels=w.shape[1] * groups, groups=groups)
    else:
        new_out = w.shape[0]
        groups = m.groups if m.groups == 1 else m.groups * new_out // m.out_channels
        store(m, in_channels=w.shape[1] * groups, out_channels=new_out, groups=groups)


# ---- linear layers and matrix products -----------------------------------------------------------
@rule("linear")
def linear(call: OpCall) -> None:
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    out = call.outputs[0]
    if w.dim() != 2:
        return
    param = _param_dims(call, w)  # the parameter itself, or one expert's slice of fused expert weights
    if param is not None:  # the weight's masked columns make the contraction exact
        call.unite(x, -1, w, 1)
        call.role(param[0], param[1][1], CONSUMER)
        call.role(param[0], param[1][0], PRODUCER)
    if b is not None:
        call.unite(b, -1, w, 0)
        call.role(b, -1, BIAS)
    call.set_out(out, [call.space(x, d) for d in range(x.dim() - 1)] + [call.space(w, 0)])


@rule("addmm")
def addmm(call: OpCall) -> None:
    """``bias + x @ weight`` with a ``(in, out)`` weight: Hugging Face's ``Conv1D`` (GPT-2)."""
    bias, x, w = call.args[0], call.args[1], call.args[2]
    out = call.outputs[0]
    if x.dim() != 2 or w.dim() != 2 or not call.is_param(w):
        return
    call.unite(x, 1, w, 0)
    call.role(w, 0, CONSUMER)
    call.role(w, 1, PRODUCER)
    if isinstance(bias, torch.Tensor) and bias.dim() >= 1 and bias.shape[-1] == w.shape[1]:
        call.unite(bias, -1, w, 1)
        call.role(bias, -1, BIAS)
        for dim in range(bias.dim() - 1):
            call.claimed.add((id(bias), dim))
    call.set_out(out, [call.space(x, 0), call.space(w, 1)])


@rule("einsum")
def einsum(call: OpCall) -> None:
    """Letters kept in the output pass through (united across operands); contracted letters are united
    when a parameter takes part (like ``linear``), else frozen (like an activation matmul)."""
    equation = call.args[0]
    operands = list(call.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    out = call.outputs[0]
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return
    lhs, rhs = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or any(len(t) != o.dim() for t, o in zip(terms, operands, strict=True)):
        return
    has_param = any(call.is_param(o) for o in operands)
    first: dict[str, int] = {}
    for term, operand in zip(terms, operands, strict=True):
        for dim, letter in enumerate(term):
            if operand.shape[dim] == 1 and letter in rhs and out.shape[rhs.index(letter)] != 1:
                call.claimed.add((id(operand), dim))  # broadcast
            elif letter in rhs or has_param:
                space = call.space(operand, dim)
                call.graph.unite(first.setdefault(letter, space), space)
                if letter not in rhs:
                    call.role(operand, dim, CONSUMER)
    call.set_out(out, [first.get(letter) for letter in rhs])


@rule("matmul", "rmatmul", "mm", "bmm")
def matmul(call: OpCall) -> None:
    a, b = call.inputs[0], call.inputs[-1]
    if call.name == "rmatmul":
        a, b = b, a
    out = call.outputs[0]
    if a.dim() < 2 or b.dim() < 2 or len(call.inputs) != 2:
        return
    batch = broadcast_prefix(call, out, [a, b])
    left, right = _param_dims(call, a), _param_dims(call, b)  # a parameter, or a view of one (``weight.T``)
    if left is not None or right is not None:
        call.unite(a, -1, b, -2)
        if left is not None:
            call.role(left[0], left[1][-1], CONSUMER)
            call.role(left[0], left[1][-2], PRODUCER)
        if right is not None:
            call.role(right[0], right[1][-2], CONSUMER)
            call.role(right[0], right[1][-1], PRODUCER)
    call.set_out(out, batch + [call.space(a, -2), call.space(b, -1)])


@rule("_grouped_mm", "grouped_mm")
def grouped_mm(call: OpCall) -> None:
    """Mixture-of-experts products: the rows of each expert (``offs``) of a 2-D input ``(rows, in)`` times that
    expert's slice of a 3-D weight ``(experts, in, out)`` give ``(rows, out)`` (transformers' fused experts).

    Like ``linear``: the input's channels are the weight's dim 1 when the weight is a parameter or a view of one
    with its dims permuted (its masked slices make every expert's sum exact), the output's are the weight's
    dim 2; the expert dim is no channel of the output.
    """
    a, b, out = call.args[0], call.args[1], call.outputs[0]
    if not isinstance(b, torch.Tensor) or a.dim() != 2 or b.dim() != 3 or out.dim() != 2:
        return
    param = _param_dims(call, b)
    if param is not None:
        call.unite(a, 1, b, 1)
        call.role(param[0], param[1][1], CONSUMER)
        call.role(param[0], param[1][2], PRODUCER)
    call.set_out(out, [call.space(a, 0), call.space(b, 2)])


def _param_dims(call: OpCall, t: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
    """``t``'s parameter and the parameter's dim of each dim of ``t``, when ``t`` is a parameter or a view of one
    whose every dim is a whole dim of it (``weight.transpose(-2, -1)``, one expert's ``gate_up_proj[e]``): its
    masked positions are zero in ``t`` too. Else None."""
    if call.is_param(t):
        return t, list(range(t.dim()))
    base = t._base
    if base is None or not call.is_param(base) or base.dim() < t.dim():
        return None
    dims: list[int] = []
    for d in range(t.dim()):
        same = [p for p in range(base.dim()) if (base.stride(p), base.shape[p]) == (t.stride(d), t.shape[d])]
        free = [p for p in same if p not in dims]
        if not free:
            return None
        dims.append(free[0])
    return base, dims


@rule("embedding")
def embedding(call: OpCall) -> None:
    ids, w = call.args[0], call.arg(1, "weight")
    out = call.outputs[0]
    call.role(w, 1, PRODUCER)
    call.set_out(out, [call.space(ids, d) for d in range(ids.dim())] + [call.space(w, 1)])


@updater(nn.Linear)
def _update_linear(m: nn.Linear) -> None:
    out_features, in_features = m.weight.shape
    store(m, out_features=out_features, in_features=in_features)


@updater(nn.Embedding)
def _update_embedding(m: nn.Embedding) -> None:
    num_embeddings, embedding_dim = m.weight.shape
    store(m, num_embeddings=num_embeddings, embedding_dim=embedding_dim)
