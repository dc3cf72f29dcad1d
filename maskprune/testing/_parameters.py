"""Tiny models that reach parameters and inputs in other ways: functional calls, shared modules, tied
parameters, dict inputs and outputs, in-place ops, ``no_grad``, boolean masks, an op maskprune has no rule for."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
