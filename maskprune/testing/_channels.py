"""Tiny models that move channels (concatenation, chunks, splits, slices, reshapes, permutations, shuffles,
patch merging) and of spatial ops, activations and dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
