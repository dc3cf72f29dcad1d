"""The building blocks of :func:`maskprune.testing.random_model`: small modules, each one structure the channel
rules must get right (branches, channel bookkeeping, gates, heads split by a reshape, products of activations).

``dim`` is the channel dimension of the tensor a block receives: 1 for an image ``(B, C, H, W)``, -1 for tokens
``(B, N, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---- branches ------------------------------------------------------------------------------------------------
class Residual(nn.Module):
    """``x + body(x)`` (or ``x * body(x)``, ``x - body(x)``)."""

    def __init__(self, body: nn.Module, op: str = "add") -> None:
        super().__init__()
        self.body, self.op = body, op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return {"add": torch.add, "sub": torch.sub, "mul": torch.mul}[self.op](x, y)


class Concat(nn.Module):
    """The branches' outputs concatenated along ``dim``."""

    def __init__(self, branches: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.branches, self.dim = nn.ModuleList(branches), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=self.dim)


class ChunkEach(nn.Module):
    """``x`` split into ``len(branches)`` chunks along ``dim`` (``split`` sizes when given), one branch per chunk,
    the results concatenated."""

    def __init__(self, branches: list[nn.Module], dim: int, split: list[int] | None = None) -> None:
        super().__init__()
        self.branches, self.dim, self.split = nn.ModuleList(branches), dim, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.split, self.dim) if self.split else x.chunk(len(self.branches), self.dim)
        return torch.cat([branch(part) for branch, part in zip(self.branches, parts, strict=True)], dim=self.dim)


class ChunkGate(nn.Module):
    """GLU-style: ``a * sigmoid(b)`` (or ``silu``) of the two halves of ``x`` along ``dim``."""

    def __init__(self, dim: int, gate: str = "sigmoid") -> None:
        super().__init__()
        self.dim, self.gate = dim, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=self.dim)
        return a * (torch.sigmoid(b) if self.gate == "sigmoid" else F.silu(b))


class Slice(nn.Module):
    """Channels ``start:stop`` of ``x`` along ``dim``, by indexing or ``narrow``."""

    def __init__(self, start: int, stop: int, dim: int, narrow: bool = False) -> None:
        super().__init__()
        self.start, self.stop, self.dim, self.narrow = start, stop, dim, narrow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        if self.narrow:
            return x.narrow(dim, self.start, self.stop - self.start)
        return x[(slice(None),) * dim + (slice(self.start, self.stop),)]


# ---- images --------------------------------------------------------------------------------------------------
class ChannelsLastNorm(nn.Module):
    """A LayerNorm over the channels of an image, applied channels-last (ConvNeXt)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle, by ``view`` and ``transpose``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Pool(nn.Module):
    """Max or average pooling: halving the size (``stride=2``) or keeping it (3x3, stride 1)."""

    def __init__(self, kind: str, halve: bool, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kind, self.halve, self.ceil_mode = kind, halve, ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool2d if self.kind == "max" else F.avg_pool2d
        if self.halve:
            return pool(x, 2, ceil_mode=self.ceil_mode)
        return pool(x, 3, stride=1, padding=1)


class Upsample(nn.Module):
    """``F.interpolate`` to twice the size."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corners = False if self.mode == "bilinear" else None
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=corners)


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(mean(x)))))``, the gate from 1x1 convolutions of the pooled image."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SpatialGate(nn.Module):
    """CBAM's spatial attention: the mean and max over channels, a convolution, a sigmoid gate on ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(s))


class ImageHead(nn.Module):
    """Global average pooling, flatten, a linear classifier."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ToTokens(nn.Module):
    """An image ``(B, C, H, W)`` as tokens ``(B, H * W, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


# ---- values that decide ----------------------------------------------------------------------------------------
class DataGate(nn.Module):
    """A gate computed from the data itself, along channel dimension ``dim``.

    ``kind``: ``"positive"`` (``x * (x > 0)``), ``"where"`` (``torch.where(x > 0, x, 0.1 * x)``), ``"mean"``
    (``x * sigmoid(mean of x over the channels)``), ``"softmax"`` (``x * softmax(x)`` over the channels), ``"norm"``
    (``x / (1 + |x|)`` with the norm over the channels), ``"max"`` (``torch.maximum(x, x.flip(0))`` across the
    batch).
    """

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        self.kind, self.dim = kind, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "positive":
            return x * (x > 0)
        if self.kind == "where":
            return torch.where(x > 0, x, 0.1 * x)
        if self.kind == "mean":
            return x * torch.sigmoid(x.mean(self.dim, keepdim=True))
        if self.kind == "softmax":
            return x * torch.softmax(x, dim=self.dim)
        if self.kind == "norm":
            return x / (1 + x.norm(dim=self.dim, keepdim=True))
        return torch.maximum(x, x.flip(0))


# ---- tokens --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Self-attention with its heads split and merged by reshapes.

    ``fused``: one ``qkv`` linear (split by ``reshape(B, N, 3, heads, head_dim)``) or three; ``split``: how the
    reshape names the heads (``"attribute"``: ``self.num_heads`` and ``self.head_dim``; ``"heads"``:
    ``(B, N, self.num_heads, -1)``; ``"head_dim"``: ``(B, N, -1, self.head_dim)``); ``sdpa``: PyTorch's
    ``scaled_dot_product_attention`` or ``softmax(q @ k^T) @ v`` written out.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, fused: bool, split: str, sdpa: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused, self.split, self.sdpa = heads, head_dim, fused, split, sdpa
        inner = heads * head_dim
        if fused:
            self.qkv = nn.Linear(dim, 3 * inner)
        else:
            self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        if self.split == "heads":
            return t.view(b, n, self.num_heads, -1).transpose(1, 2)
        if self.split == "head_dim":
            return t.view(b, n, -1, self.head_dim).transpose(1, 2)
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.fused:
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, n, -1))


class TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` as self-attention on ``(B, N, D)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class TokenMix(nn.Module):
    """MLP-Mixer's token mixing: a linear layer across the tokens."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.fc = nn.Linear(tokens, tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.transpose(1, 2)).transpose(1, 2)


class SelfSimilarity(nn.Module):
    """A product of activations: ``softmax(x @ x^T) @ x`` (the features contracted, then carried)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x


class TokenHead(nn.Module):
    """The tokens' mean, a linear classifier."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(1))
