"""Tiny models, one per structure maskprune has to handle: for tests, examples and bug reports.

Each entry of :data:`TINY_MODELS` builds a fresh model with deterministic weights (norm
statistics and affine tensors randomised too, so that no layer is an identity) and example
inputs small enough that tracing, masking and exporting take milliseconds. Building an entry
does not touch the global random state.

Example:
    >>> from maskprune import Mask, verify
    >>> from maskprune.testing import TINY_MODELS
    >>> model, inputs = TINY_MODELS["cat"]()
    >>> mask = Mask(model, inputs).make()
    >>> sorted(group.size for group in mask.groups)
    [4, 6]
    >>> for group in mask.groups:
    ...     group.prune([0])
    >>> pruned = mask.generate_pruned_model()   # verified against the masked model
    >>> verify(model, pruned, inputs).max_rel <= 1e-5
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TINY_MODELS", "TinyModelFactory", "randomize_norms"]

TinyModelFactory = Callable[[], tuple[nn.Module, Any]]


# ---- plain layers -----------------------------------------------------------------------------
class TinyConv(nn.Module):
    """``conv1 -> relu -> conv2 -> relu -> head`` with 1-, 2- or 3-d convolutions."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv1 = conv(3, 8, 3, padding=1)
        self.conv2 = conv(8, 6, 3, padding=1)
        self.head = conv(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))))


class TinyConvTranspose(nn.Module):
    """A stride-2 transposed convolution between two convolutions (the output is twice as large)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.up(F.relu(self.conv(x)))))


class TinyDepthwise(nn.Module):
    """MobileNet block: pointwise -> BN -> ReLU -> depthwise 3x3 -> BN -> ReLU -> pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.expand(x)))
        x = F.relu(self.bn2(self.dw(x)))
        return self.head(x)


class TinyGroupedConv(nn.Module):
    """A grouped convolution (2 groups, 4 inputs and 6 outputs per group) between two 1x1 convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.gconv = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.gconv(F.relu(self.expand(x)))))


class TinyMLP(nn.Module):
    """Linear layers on a (batch, tokens, features) input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.gelu(self.fc1(x)))))


class TinyConvBlock(nn.Module):
    """``stem (3 -> 8 channels) -> body -> head (8 -> 4)``: a norm or activation layer in context."""

    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(*body)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _frozen_batch_norm(channels: int) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d  # torchvision is optional: imported on use

    return FrozenBatchNorm2d(channels)


class TinyLayerNorm(nn.Module):
    """A LayerNorm (or ``norm``) over the channel (last) dimension of tokens, between two Linear layers."""

    def __init__(self, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8) if norm is None else norm
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.norm(self.fc(x))))


class TinyEmbedding(nn.Module):
    """Token ids -> Embedding -> Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.emb(ids))))


class TinyViT(nn.Module):
    """Bare parameters in forward: a class token (concatenated on the token dim), a position
    embedding (added) and a layer-scale vector (multiplied)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8) * 0.5)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, 8) for an 8x8 image
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


# ---- elementwise and broadcasting -------------------------------------------------------------
class TinyBinary(nn.Module):
    """A residual branch combined with its input by ``add``, ``sub``, ``mul`` or ``div``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        if op not in ("add", "sub", "mul", "div"):
            raise ValueError(f"op must be add, sub, mul or div, got {op!r}")
        self.op = op
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch1 = nn.Conv2d(8, 6, 3, padding=1)
        self.branch2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.stem(x))
        b = self.branch2(F.relu(self.branch1(a)))
        if self.op == "add":
            y = a + b
        elif self.op == "sub":
            y = a - b
        elif self.op == "mul":
            y = a * b
        else:
            y = a / (b.abs() + 1.0)  # bounded away from 0; the divisor's channels are frozen all the same
        return self.head(F.relu(y))


class SqueezeExcitation(nn.Module):
    """avgpool -> conv1x1 -> relu -> conv1x1 -> sigmoid -> x * s (a broadcast multiply)."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class TinySE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.se = SqueezeExcitation(8, 4)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.se(F.relu(self.stem(x))))


# ---- channel bookkeeping: concat, chunk, split, slice, reshape, permute, shuffle -------------
class TinyCat(nn.Module):
    """Two convolutions (4 and 6 channels) concatenated on the channel dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(torch.cat([self.conv_a(x), self.conv_b(x)], dim=1)))


class TinyChunk(nn.Module):
    """A gated unit: 8 channels chunked into two equal halves, ``a * sigmoid(b)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return self.head(a * torch.sigmoid(b))


class TinySplit(nn.Module):
    """8 channels split into fixed unequal parts (3 and 5), activated differently, concatenated back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.relu(self.stem(x)))
        a, b = torch.split(y, [3, 5], dim=1)
        return self.head(torch.cat([F.relu(a), torch.sigmoid(b)], dim=1))


class TinySlice(nn.Module):
    """``x[:, :4]``: the first 4 of 8 channels are kept by the model's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(y[:, :4])


class TinyFlatten(nn.Module):
    """A conv's 4 channels of 4x4 pixels flattened into 64 Linear features (16 per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.flatten(F.relu(self.conv(x))))))


class TinyReshape(nn.Module):
    """view / reshape / unsqueeze / squeeze that merge and restore spatial dims, channels untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        b, c, h, w = y.shape
        t = y.reshape(b, c, h * w).unsqueeze(1)  # (B, 1, C, HW)
        t = torch.softmax(t, dim=-1).squeeze(1)
        return self.head(t.view(b, c, h, w))


class TinyChannelsLast(nn.Module):
    """permute to channels-last, a Linear over channels, transpose back (H and W swapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x)).permute(0, 2, 3, 1)  # (B, H, W, 8)
        y = F.gelu(self.fc(y)).transpose(1, 3)  # (B, 6, W, H)
        return self.head(y)


class TinyShuffle(nn.Module):
    """ShuffleNet channel shuffle (view -> transpose -> view) with 2 groups."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.relu(self.stem(x))))
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.head(y)


class TinyRearrange(nn.Module):
    """``stem (3 or 6 -> width) -> op -> head (-> 4)``: an op that moves channels (pixel and channel shuffles,
    GLU's halves); ``tokens`` makes stem and head Linear layers, else 1x1 convolutions."""

    def __init__(self, op: nn.Module, width: int, head_width: int, tokens: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(6, width) if tokens else nn.Conv2d(3, width, 1)
        self.op = op
        self.head = nn.Linear(head_width, 4) if tokens else nn.Conv2d(head_width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.stem(x)))


class TinyPatchMerging(nn.Module):
    """Swin's patch merging: each 2x2 block of pixels goes into the channels, ``(H / 2, 2, W / 2, 2, C)`` ->
    ``(H / 2, W / 2, 2, 2, C)`` -> ``(H / 2, W / 2, 4C)``, then a Linear; the spatial split writes its counts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Linear(32, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).permute(0, 2, 3, 1)
        b, h, w, c = y.shape
        y = y.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.head(F.relu(self.reduce(y)).mean((1, 2)))


# ---- spatial ops, activations, dropout ---------------------------------------------------------
class TinyPooling(nn.Module):
    """Max, average, adaptive max and adaptive average pooling between convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.max = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.adaptive_max = nn.AdaptiveMaxPool2d(2)
        self.conv4 = nn.Conv2d(6, 6, 1)
        self.adaptive_avg = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max(F.relu(self.conv1(x)))
        x = self.avg(F.relu(self.conv2(x)))
        x = self.adaptive_max(F.relu(self.conv3(x)))
        x = self.adaptive_avg(F.relu(self.conv4(x)))
        return self.head(x.flatten(1))


class TinyInterpolate(nn.Module):
    """Nearest upsampling by a scale factor, then bilinear resampling to a fixed size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(F.relu(self.conv1(x)), scale_factor=2, mode="nearest")
        x = F.interpolate(F.relu(self.conv2(x)), size=(5, 5), mode="bilinear", align_corners=False)
        return self.head(x)


class TinyDropout(nn.Module):
    """Dropout2d on conv features and Dropout on Linear features (identities in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.25)
        self.fc = nn.Linear(8, 6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.drop2d(self.conv(x))).mean(dim=(2, 3))
        return self.head(F.relu(self.drop(self.fc(x))))


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


# ---- how parameters are reached ----------------------------------------------------------------
class TinyFunctional(nn.Module):
    """F.conv2d and F.linear called with the parameters of modules that are never called."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.stem.weight, self.stem.bias, padding=1)).mean(dim=(2, 3))
        y = F.relu(F.linear(y, self.proj.weight, self.proj.bias))
        return self.head(y)


class TinyShared(nn.Module):
    """One convolution called twice in a row (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        y = F.relu(self.block(y))
        y = F.relu(self.block(y))
        return self.head(y)


class TinyTied(nn.Module):
    """A language model whose output layer ``b`` shares its weight with the embedding ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(10, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
        self.b = nn.Linear(8, 10, bias=False)
        self.b.weight = self.a.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.a(ids)
        h = h + self.mlp(h)
        return self.b(h)


class TinyDictIO(nn.Module):
    """Keyword inputs (two tensors and a float) and a dict output holding a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Linear(4, 6)
        self.head = nn.Linear(14, 5)
        self.aux_head = nn.Linear(6, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor, *, scale: float = 1.0) -> dict[str, Any]:
        f = F.relu(self.conv(image)).mean(dim=(2, 3))
        g = F.relu(self.aux(extra))
        logits = self.head(torch.cat([f, g], dim=1)) * scale
        return {"logits": logits, "extras": (self.aux_head(g), torch.softmax(logits, dim=-1))}


class TinyInplace(nn.Module):
    """In-place ops: ``relu_``, ``+=``, ``ReLU(inplace=True)``, ``mul_``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).relu_()
        z = self.conv(y)
        z += y
        z = self.act(z)
        z.mul_(0.5)
        return self.head(z)


class TinyNoGrad(nn.Module):
    """A per-channel scale computed under ``torch.no_grad()`` inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        with torch.no_grad():
            scale = torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))
        y = y * scale
        return self.head(F.relu(self.conv(y)))


class TinyMaskedFill(nn.Module):
    """Integer lengths turned into a boolean padding mask used with ``masked_fill``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        positions = torch.arange(x.shape[1], device=x.device)
        padding = positions[None, :] >= lengths[:, None]  # (B, T) bool
        h = h.masked_fill(padding[..., None], 0.0)
        return self.head(h.sum(dim=1) / lengths.clamp(min=1)[:, None].to(h.dtype))


class TensordotScale(nn.Module):
    """Scales channels with ``torch.tensordot`` against a diagonal matrix, an op maskprune has no rule for."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diagonal = self.scale * torch.eye(len(self.scale), device=self.scale.device)
        return torch.tensordot(x, diagonal, dims=([1], [0])).movedim(-1, 1)


class TinyUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.mix = TensordotScale(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(self.mix(y))


# ---- registry ----------------------------------------------------------------------------------
def randomize_norms(model: nn.Module) -> nn.Module:
    """Give norm layers non-trivial affine tensors and running statistics (a random-init zoo model's outputs
    can be nearly zero otherwise, which proves nothing when comparing two models). Returns the model.

    Example:
        >>> model = randomize_norms(torchvision.models.mobilenet_v3_small())
    """
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            if not (is_norm or type(module).__name__ == "FrozenBatchNorm2d"):
                continue
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue
                if name in ("weight", "running_var"):
                    tensor.copy_(torch.rand_like(tensor) + 0.5)
                else:
                    tensor.copy_(torch.randn_like(tensor) * 0.5)
    return model


def _seeded(build: Callable[[], tuple[nn.Module, Any]]) -> TinyModelFactory:
    def factory() -> tuple[nn.Module, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, inputs = build()
            randomize_norms(model)
        return model, inputs

    return factory


TINY_MODELS: dict[str, TinyModelFactory] = {
    # layers
    "conv1d": _seeded(lambda: (TinyConv(1), torch.randn(2, 3, 16))),
    "conv2d": _seeded(lambda: (TinyConv(2), torch.randn(2, 3, 8, 8))),
    "conv3d": _seeded(lambda: (TinyConv(3), torch.randn(2, 3, 4, 6, 6))),
    "conv_transpose2d": _seeded(lambda: (TinyConvTranspose(), torch.randn(2, 3, 8, 8))),
    "depthwise_conv": _seeded(lambda: (TinyDepthwise(), torch.randn(2, 3, 8, 8))),
    "grouped_conv": _seeded(lambda: (TinyGroupedConv(), torch.randn(2, 3, 8, 8))),
    "linear_3d": _seeded(lambda: (TinyMLP(), torch.randn(2, 5, 6))),
    "batch_norm2d": _seeded(lambda: (TinyConvBlock(nn.BatchNorm2d(8), nn.ReLU()), torch.randn(2, 3, 8, 8))),
    "group_norm": _seeded(lambda: (TinyConvBlock(nn.GroupNorm(4, 8), nn.ReLU()), torch.randn(2, 3, 8, 8))),
    "layer_norm": _seeded(lambda: (TinyLayerNorm(), torch.randn(2, 5, 6))),
    "instance_norm2d": _seeded(
        lambda: (TinyConvBlock(nn.InstanceNorm2d(8, affine=True), nn.ReLU()), torch.randn(2, 3, 8, 8))
    ),
    "frozen_batch_norm2d": _seeded(lambda: (TinyConvBlock(_frozen_batch_norm(8), nn.ReLU()), torch.randn(2, 3, 8, 8))),
    # norms without tensors (torch's default for InstanceNorm): only their width attributes change
    "instance_norm2d_no_affine": _seeded(
        lambda: (TinyConvBlock(nn.InstanceNorm2d(8), nn.ReLU()), torch.randn(2, 3, 8, 8))
    ),
    "batch_norm2d_no_affine": _seeded(
        lambda: (
            TinyConvBlock(nn.BatchNorm2d(8, affine=False, track_running_stats=False), nn.ReLU()),
            torch.randn(2, 3, 8, 8),
        )
    ),
    "group_norm_no_affine": _seeded(
        lambda: (TinyConvBlock(nn.GroupNorm(4, 8, affine=False), nn.ReLU()), torch.randn(2, 3, 8, 8))
    ),
    "layer_norm_no_affine": _seeded(
        lambda: (TinyLayerNorm(nn.LayerNorm(8, elementwise_affine=False)), torch.randn(2, 5, 6))
    ),
    "rms_norm_no_affine": _seeded(
        lambda: (TinyLayerNorm(nn.RMSNorm(8, elementwise_affine=False)), torch.randn(2, 5, 6))
    ),
    "prelu": _seeded(lambda: (TinyConvBlock(nn.PReLU(8)), torch.randn(2, 3, 8, 8))),
    "embedding": _seeded(lambda: (TinyEmbedding(), torch.randint(0, 10, (2, 6)))),
    "bare_parameter": _seeded(lambda: (TinyViT(), torch.randn(2, 3, 8, 8))),
    # elementwise and broadcasting
    "residual_add": _seeded(lambda: (TinyBinary("add"), torch.randn(2, 3, 8, 8))),
    "residual_sub": _seeded(lambda: (TinyBinary("sub"), torch.randn(2, 3, 8, 8))),
    "residual_mul": _seeded(lambda: (TinyBinary("mul"), torch.randn(2, 3, 8, 8))),
    "residual_div": _seeded(lambda: (TinyBinary("div"), torch.randn(2, 3, 8, 8))),
    "squeeze_excitation": _seeded(lambda: (TinySE(), torch.randn(2, 3, 8, 8))),
    # channel bookkeeping
    "cat": _seeded(lambda: (TinyCat(), torch.randn(2, 3, 8, 8))),
    "chunk": _seeded(lambda: (TinyChunk(), torch.randn(2, 3, 8, 8))),
    "split_unequal": _seeded(lambda: (TinySplit(), torch.randn(2, 3, 8, 8))),
    "slice": _seeded(lambda: (TinySlice(), torch.randn(2, 3, 8, 8))),
    "flatten_linear": _seeded(lambda: (TinyFlatten(), torch.randn(2, 3, 8, 8))),
    "view_reshape": _seeded(lambda: (TinyReshape(), torch.randn(2, 3, 8, 8))),
    "permute_transpose": _seeded(lambda: (TinyChannelsLast(), torch.randn(2, 3, 8, 8))),
    "channel_shuffle": _seeded(lambda: (TinyShuffle(), torch.randn(2, 3, 8, 8))),
    "channel_shuffle_layer": _seeded(lambda: (TinyRearrange(nn.ChannelShuffle(2), 8, 8), torch.randn(2, 3, 8, 8))),
    "pixel_shuffle": _seeded(lambda: (TinyRearrange(nn.PixelShuffle(2), 16, 4), torch.randn(2, 3, 4, 4))),
    "pixel_unshuffle": _seeded(lambda: (TinyRearrange(nn.PixelUnshuffle(2), 4, 16), torch.randn(2, 3, 8, 8))),
    "patch_merging": _seeded(lambda: (TinyPatchMerging(), torch.randn(2, 3, 8, 8))),
    "glu": _seeded(lambda: (TinyRearrange(nn.GLU(), 16, 8, tokens=True), torch.randn(2, 5, 6))),
    # spatial ops, activations, dropout
    "pooling": _seeded(lambda: (TinyPooling(), torch.randn(2, 3, 8, 8))),
    "interpolate": _seeded(lambda: (TinyInterpolate(), torch.randn(2, 3, 8, 8))),
    "relu": _seeded(lambda: (TinyConvBlock(nn.ReLU()), torch.randn(2, 3, 8, 8))),
    "gelu": _seeded(lambda: (TinyConvBlock(nn.GELU()), torch.randn(2, 3, 8, 8))),
    "silu": _seeded(lambda: (TinyConvBlock(nn.SiLU()), torch.randn(2, 3, 8, 8))),
    "hardswish": _seeded(lambda: (TinyConvBlock(nn.Hardswish()), torch.randn(2, 3, 8, 8))),
    "sigmoid": _seeded(lambda: (TinyConvBlock(nn.Sigmoid()), torch.randn(2, 3, 8, 8))),
    "dropout": _seeded(lambda: (TinyDropout(), torch.randn(2, 3, 8, 8))),
    # attention
    "multihead_attention": _seeded(lambda: (TinyAttention(), torch.randn(2, 5, 6))),
    "fused_qkv_attention": _seeded(lambda: (TinyFusedAttention(), torch.randn(2, 5, 6))),
    "grouped_query_attention": _seeded(lambda: (TinyGroupedQueryAttention(), torch.randn(2, 5, 8))),
    "literal_heads_attention": _seeded(lambda: (TinyLiteralHeads(), torch.randn(2, 5, 6))),
    "spatial_reduction_attention": _seeded(lambda: (TinySpatialReduction(), torch.randn(2, 3, 8, 8))),
    "rms_norm_hidden": _seeded(lambda: (TinyRMSNormHidden(), torch.randint(0, 10, (2, 6)))),
    # how parameters and inputs are reached
    "functional": _seeded(lambda: (TinyFunctional(), torch.randn(2, 3, 8, 8))),
    "shared_module": _seeded(lambda: (TinyShared(), torch.randn(2, 3, 8, 8))),
    "tied_parameters": _seeded(lambda: (TinyTied(), torch.randint(0, 10, (2, 6)))),
    "dict_io": _seeded(
        lambda: (TinyDictIO(), {"image": torch.randn(2, 3, 8, 8), "extra": torch.randn(2, 4), "scale": 0.5})
    ),
    "inplace": _seeded(lambda: (TinyInplace(), torch.randn(2, 3, 8, 8))),
    "no_grad": _seeded(lambda: (TinyNoGrad(), torch.randn(2, 3, 8, 8))),
    "bool_mask": _seeded(lambda: (TinyMaskedFill(), (torch.randn(2, 5, 6), torch.tensor([3, 5])))),
    "unsupported_op": _seeded(lambda: (TinyUnsupported(), torch.randn(2, 3, 8, 8))),
}
"""Structure name -> factory returning ``(model, example_inputs)``; every call builds a fresh pair."""
