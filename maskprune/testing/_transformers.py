"""Tiny attention models (multi-head, fused qkv, grouped query by expand or ``repeat_interleave``, literal head
counts, spatial reduction) and RMS norms over a hidden size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---- attention ---------------------------------------------------------------------------------
class TinyAttention(nn.Module):
    """An MLP, nn.MultiheadAttention with a residual, another MLP, on (batch, tokens, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre1 = nn.Linear(6, 10)
        self.pre2 = nn.Linear(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.post1 = nn.Linear(8, 12)
        self.post2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre2(F.relu(self.pre1(x)))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        return self.post2(F.relu(self.post1(h)))


class TinyFusedAttention(nn.Module):
    """timm-style self-attention: one fused qkv linear split into ``num_heads`` heads by a reshape that
    reads ``self.num_heads`` and ``self.head_dim``, SDPA, and a merge back to ``self.attn_dim``; pre-norm,
    residual and an MLP around it. 3 heads of 2 on a width of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 3, 2
        self.attn_dim = self.num_heads * self.head_dim
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.head(x + self.proj(a))


class TinyLiteralHeads(nn.Module):
    """Self-attention whose code writes its head count (``view(B, N, 2, -1)``) and keeps it in no attribute: an
    export cannot change it, so the heads stay and every head loses the same positions of ``head_dim``
    where nothing else fixes them (the values; the queries' and keys' are contracted with each other)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        B, N, _ = x.shape
        q, k, v = (t.view(B, N, 2, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return self.head(x + self.proj(a))


class TinySpatialReduction(nn.Module):
    """PVT's spatial-reduction attention, which sizes its reshapes by the token width it reads from its input
    (``B, N, C = x.shape``): a strided conv reduces the tokens laid out as an image to fewer keys and values
    (``sr(...).reshape(B, C, -1)``), and the heads merge back into that width (``reshape(B, N, C)``). The
    reduction's channels and the heads (2 of 4 channels) must keep the residual's count. A width of 8 on 4x4 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 2, 4
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.q = nn.Linear(8, 8)
        self.sr = nn.Conv2d(8, 8, 2, stride=2)
        self.kv = nn.Linear(8, 16)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        reduced = self.sr(x.transpose(1, 2).reshape(B, C, H, W)).reshape(B, C, -1).transpose(1, 2)
        kv = self.kv(reduced).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head((x + self.proj(a)).mean(1))


class TinyGroupedQueryAttention(nn.Module):
    """Llama-style grouped-query attention: 4 query heads share 2 key/value heads (``repeat_kv`` by
    expand and reshape), heads inferred by ``view(B, N, -1, head_dim)``, a causal SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim, self.num_key_value_groups = 3, 2
        self.q_proj = nn.Linear(8, 4 * 3, bias=False)
        self.k_proj = nn.Linear(8, 2 * 3, bias=False)
        self.v_proj = nn.Linear(8, 2 * 3, bias=False)
        self.o_proj = nn.Linear(4 * 3, 8, bias=False)
        self.head = nn.Linear(8, 5)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, kv_heads, n, d = x.shape
        x = x[:, :, None].expand(b, kv_heads, self.num_key_value_groups, n, d)
        return x.reshape(b, kv_heads * self.num_key_value_groups, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        shape = (B, N, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self._repeat_kv(self.k_proj(x).view(shape).transpose(1, 2))
        v = self._repeat_kv(self.v_proj(x).view(shape).transpose(1, 2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o_proj(a.transpose(1, 2).reshape(B, N, -1)))


class TinyRepeatInterleave(TinyGroupedQueryAttention):
    """Grouped-query attention with ``repeat_kv`` written as ``k.repeat_interleave(groups, dim=1)``."""

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.num_key_value_groups, dim=1)


class TinyRMSNorm(nn.Module):
    """An RMS norm written as a module, as Llama and T5 write theirs (not ``nn.RMSNorm``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)


class TinyRMSNormHidden(nn.Module):
    """A pruned hidden size under RMS norms: embedding -> norm -> gated MLP (Llama) -> residual ->
    final norm -> head. The masked norms compute their statistic over the kept channels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm1 = TinyRMSNorm(8)
        self.gate = nn.Linear(8, 12, bias=False)
        self.up = nn.Linear(8, 12, bias=False)
        self.down = nn.Linear(12, 8, bias=False)
        self.norm2 = TinyRMSNorm(8)
        self.head = nn.Linear(8, 5, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        x = self.norm1(h)
        h = h + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.head(self.norm2(h))
