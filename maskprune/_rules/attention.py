"""Rules of attention ops: ``nn.MultiheadAttention``'s forward (whole heads) and
``scaled_dot_product_attention`` (heads shared with the mask, grouped-query heads), with the size updater of
``nn.MultiheadAttention``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from maskprune._layers import updater

from ._core import BIAS, CONSUMER, PRODUCER, OpCall, broadcast_prefix, rule


@rule("multi_head_attention_forward")
def multi_head_attention(call: OpCall) -> None:
    """``nn.MultiheadAttention`` loses whole heads, each with the same channels of its query.

    Its code ties the inner width to the query's (``embed_dim``): inner channel ``r`` goes with query
    channel ``r``, and a head's ``head_dim`` channels go together, so the export keeps ``head_dim``
    (and the attention scale) and sets ``num_heads`` and ``embed_dim``.
    """
    query, key, value = call.args[0], call.arg(1, "key"), call.arg(2, "value")
    heads = int(call.arg(4, "num_heads"))
    if not call.in_module(torch.nn.MultiheadAttention):
        call.unproven("a head count outside a MultiheadAttention")
    out = call.outputs[0]
    width = query.shape[-1]
    if width % heads or out.shape[-1] != width:
        return
    idx = np.arange(width)
    inner = call.space(query, -1)
    call.link(inner, idx, inner, idx - idx % (width // heads))  # a head's channels are one unit
    separate = call.arg(17, "use_separate_proj_weight", False)
    if separate:
        projections = [(call.arg(18, "q_proj_weight"), query), (call.arg(19, "k_proj_weight"), key)]
        projections.append((call.arg(20, "v_proj_weight"), value))
    else:
        projections = [(call.arg(5, "in_proj_weight"), t) for t in (query, key, value)]
    for weight, source in projections:
        _rows_to_heads(call, weight, 0, inner, width, PRODUCER)
        call.unite(source, -1, weight, 1)
        call.role(weight, 1, CONSUMER)
    for index, name in ((6, "in_proj_bias"), (7, "bias_k"), (8, "bias_v")):
        bias = call.arg(index, name)
        if isinstance(bias, torch.Tensor):
            _rows_to_heads(call, bias, -1, inner, width, BIAS)
            for dim in range(bias.dim() - 1):
                call.claimed.add((id(bias), dim))
    out_weight, out_bias = call.arg(11, "out_proj_weight"), call.arg(12, "out_proj_bias")
    call.unite(out_weight, 1, query, -1)
    call.role(out_weight, 1, CONSUMER)
    call.role(out_weight, 0, PRODUCER)
    if isinstance(out_bias, torch.Tensor):
        call.unite(out_bias, 0, out_weight, 0)
        call.role(out_bias, 0, BIAS)
    for name, index in (("key_padding_mask", 14), ("attn_mask", 16)):
        if isinstance(mask := call.arg(index, name), torch.Tensor):
            call.claim_all(mask)
    _freeze_key_tokens(call, [key, value], 0)  # (S, N, E) or (S, E): the keys' tokens come first
    call.set_out(out, [call.space(query, d) for d in range(query.dim() - 1)] + [call.space(out_weight, 0)])


def _rows_to_heads(call: OpCall, t: torch.Tensor, dim: int, inner: int, width: int, role: str) -> None:
    """Row ``r`` of a (possibly packed q/k/v) projection is inner channel ``r % width``."""
    rows = np.arange(t.shape[dim])
    call.link(call.space(t, dim), rows, inner, rows % width)
    call.role(t, dim, role)


@rule("scaled_dot_product_attention")
def scaled_dot_product_attention(call: OpCall) -> None:
    """Heads (and batch dims) pass through; a mask or bias shares them; grouped-query keys serve head groups."""
    q, k, v = call.args[0], call.arg(1, "key"), call.arg(2, "value")
    mask = call.arg(3, "attn_mask")
    out = call.outputs[0]
    tensors = [q, k, v] + ([mask] if isinstance(mask, torch.Tensor) and mask.dim() >= 2 else [])
    batch = broadcast_prefix(call, out, tensors)
    if call.arg(7, "enable_gqa", False) and q.dim() >= 3 and k.shape[-3] not in (q.shape[-3], 1):
        heads, kv_heads = q.shape[-3], k.shape[-3]  # query head h reads key/value head h // (heads // kv_heads)
        idx = np.arange(heads)
        call.link(call.space(q, -3), idx, call.space(k, -3), idx // (heads // kv_heads))
        call.unite(k, -3, v, -3)
    call.unite(k, -2, v, -2)
    if len(tensors) == 4:
        for dim, other in ((-2, q), (-1, k)):
            if mask.shape[dim] == other.shape[-2]:
                call.unite(mask, dim, other, -2)
            elif mask.shape[dim] == 1:
                call.claimed.add((id(mask), mask.dim() + dim))
    _freeze_key_tokens(call, [k], -2)
    call.set_out(out, batch + [call.space(q, -2), call.space(v, -1)])


def _freeze_key_tokens(call: OpCall, tensors: list[torch.Tensor], dim: int) -> None:
    """The keys' (and values') tokens freeze: the softmax runs over them, so a removed key token, masked to zeros,
    would still take its share of every query's attention (its score is not minus infinity). In self-attention
    they are the query's tokens too, which would otherwise pass through."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            call.graph.freeze(call.space(t, dim), call.reason())


@updater(nn.MultiheadAttention)
def _update_multihead_attention(m: nn.MultiheadAttention) -> None:
    if m._qkv_same_embed_dim:
        m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[1]
    else:
        m.embed_dim, m.kdim, m.vdim = m.q_proj_weight.shape[1], m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    m.num_heads = m.embed_dim // m.head_dim
