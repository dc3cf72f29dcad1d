"""Tiny models of plain layers (convolutions, linear layers, norms, embeddings, bare parameters) and of
elementwise ops with broadcasting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
