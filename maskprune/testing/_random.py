""":func:`random_model`: a random architecture from a seed, built of the blocks of :mod:`._blocks`."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn

from ._blocks import (
    Attention,
    ChannelsLastNorm,
    ChunkEach,
    ChunkGate,
    Concat,
    DataGate,
    ImageHead,
    Pool,
    Residual,
    SelfSimilarity,
    Shuffle,
    Slice,
    SpatialGate,
    SqueezeExcite,
    TokenHead,
    TokenMix,
    TorchAttention,
    ToTokens,
    Upsample,
)
from ._registry import randomize_norms

WIDTHS = (2, 3, 4, 6, 8)
MAX_DEPTH = 2  # branches inside branches inside the trunk, at most
#: builds a branch's body on so many channels: (body, channels out, names)
Body = Callable[[int], tuple[nn.Module, int, list[str]]]


class RandomModel(nn.Sequential):
    """A random architecture: :func:`random_model`'s blocks in sequence; ``ops`` names them, nested branches in
    brackets."""

    def __init__(self, blocks: list[nn.Module], ops: list[str]) -> None:
        super().__init__(*blocks)
        self.ops = ops


def _divisors(*values: int) -> list[int]:
    return [d for d in range(1, min(values) + 1) if all(v % d == 0 for v in values)]


class _Builder:
    """One model's random choices. Each block method takes the channel count it receives and returns the block,
    its output channel count and the names of what it holds."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def width(self) -> int:
        return self.rng.choice(WIDTHS)

    def activation(self, c: int | None = None) -> nn.Module:
        """An activation; with ``c``, maybe a PReLU with one slope per channel (of dim 1)."""
        if c is not None and self.rng.random() < 0.15:
            return nn.PReLU(c)
        return self.rng.choice([nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh])()

    # ---- images: (B, C, H, W); spatial changes only in the trunk, where no branch must match them ----
    def conv(self, c: int) -> tuple[nn.Module, int, str]:
        """A convolution keeping the size: 1x1, 3x3 (maybe dilated), grouped, depthwise or transposed."""
        rng = self.rng
        kind = rng.choice(["conv", "conv", "grouped", "depthwise", "transpose", "dilated"])
        bias = rng.random() < 0.8
        if kind == "depthwise":
            out = c * rng.choice([1, 2])
            return nn.Conv2d(c, out, 3, padding=1, groups=c, bias=bias), out, "depthwise"
        out = self.width()
        if kind == "transpose":
            return nn.ConvTranspose2d(c, out, 3, padding=1, bias=bias), out, "conv_transpose"
        if kind == "dilated":
            return nn.Conv2d(c, out, 3, padding=2, dilation=2, bias=bias), out, "conv3x3_dilated"
        groups = rng.choice(_divisors(c, out)) if kind == "grouped" else 1
        kernel = rng.choice([1, 3])
        conv = nn.Conv2d(c, out, kernel, padding=kernel // 2, groups=groups, bias=bias)
        return conv, out, f"conv{kernel}x{kernel}/g{groups}"

    def image_norm(self, c: int) -> tuple[nn.Module, str]:
        """A norm over the channels; some without affine tensors (only their width changes at export)."""
        kind = self.rng.choice(["batch", "batch", "group", "instance", "layer"])
        affine = self.rng.random() < 0.8
        if kind == "group":
            return nn.GroupNorm(self.rng.choice(_divisors(c)), c, affine=affine), "group_norm"
        if kind == "instance":
            return nn.InstanceNorm2d(c, affine=affine), "instance_norm"
        if kind == "layer":
            return ChannelsLastNorm(c), "channels_last_layer_norm"
        return nn.BatchNorm2d(c, affine=affine), "batch_norm"

    def image_block(self, c: int, size: int, depth: int) -> tuple[nn.Module, int, int, list[str]]:
        """A block on ``c`` channels of ``size`` x ``size``: (block, channels out, size out, names)."""
        rng = self.rng
        kinds = ["conv", "conv_norm_act", "norm", "act", "gate", "data_gate", "spatial_gate", "shuffle", "slice"]
        kinds += ["pool_same"]
        if depth < MAX_DEPTH:
            kinds += ["residual", "residual", "concat"] + ["chunk_each"] * (c >= 2)
        if c % 2 == 0:
            kinds += ["chunk_gate"]
        if depth == 0 and size >= 4:
            kinds += ["pool", "conv_stride2"]
        if depth == 0 and size <= 4:
            kinds += ["upsample"]
        kind = rng.choice(kinds)
        if kind == "conv":
            block, out, name = self.conv(c)
            return block, out, size, [name]
        if kind == "conv_norm_act":
            conv, out, name = self.conv(c)
            norm, norm_name = self.image_norm(out)
            return nn.Sequential(conv, norm, self.activation(out)), out, size, [name, norm_name, "act"]
        if kind == "conv_stride2":
            out = self.width()
            return nn.Conv2d(c, out, 3, stride=2, padding=1), out, (size + 1) // 2, ["conv3x3_stride2"]
        if kind == "norm":
            norm, name = self.image_norm(c)
            return norm, c, size, [name]
        if kind == "act":
            return self.activation(c), c, size, ["act"]
        if kind == "gate":
            return SqueezeExcite(c, self.width()), c, size, ["squeeze_excite"]
        if kind == "data_gate":
            gate = rng.choice(["positive", "where", "mean", "softmax", "norm", "max"])
            return DataGate(gate, 1), c, size, [f"data_gate_{gate}"]
        if kind == "spatial_gate":
            return SpatialGate(), c, size, ["spatial_gate"]
        if kind == "shuffle":
            groups = rng.choice(_divisors(c)[1:] or [1])
            return Shuffle(groups), c, size, [f"shuffle/{groups}"]
        if kind == "slice":
            start = rng.randrange(c)
            stop = rng.randrange(start + 1, c + 1)
            narrow = rng.random() < 0.5
            return Slice(start, stop, 1, narrow), stop - start, size, [f"slice[{start}:{stop}]"]
        if kind == "pool_same":
            pool = rng.choice(["max", "avg"])
            return Pool(pool, halve=False), c, size, [f"{pool}_pool_3x3"]
        if kind == "pool":
            pool, ceil_mode = rng.choice(["max", "avg"]), rng.random() < 0.5
            out_size = -(-size // 2) if ceil_mode else size // 2
            return Pool(pool, halve=True, ceil_mode=ceil_mode), c, out_size, [f"{pool}_pool_2x2"]
        if kind == "upsample":
            mode = rng.choice(["nearest", "bilinear"])
            return Upsample(mode), c, 2 * size, [f"upsample_{mode}"]
        if kind == "chunk_gate":
            return ChunkGate(1, rng.choice(["sigmoid", "silu"])), c // 2, size, ["chunk_gate"]
        block, out, names = self.branches(kind, c, 1, lambda width: self.image_body(width, size, depth + 1))
        return block, out, size, names

    def image_body(self, c: int, size: int, depth: int) -> tuple[nn.Module, int, list[str]]:
        blocks, names = [], []
        for _ in range(self.rng.randint(1, 2)):
            block, c, size, found = self.image_block(c, size, depth)
            blocks.append(block)
            names += found
        return nn.Sequential(*blocks), c, names

    # ---- tokens: (B, N, D) ----
    def token_block(self, d: int, tokens: int, depth: int) -> tuple[nn.Module, int, list[str]]:
        rng = self.rng
        kinds = ["linear", "linear", "layer_norm", "rms_norm", "act", "attention", "torch_attention", "token_mix"]
        kinds += ["self_similarity", "data_gate", "slice"]
        if depth < MAX_DEPTH:
            kinds += ["residual", "residual", "concat", "mlp"] + ["chunk_each"] * (d >= 2)
        if d % 2 == 0:
            kinds += ["chunk_gate"]
        kind = rng.choice(kinds)
        if kind == "linear":
            out = self.width()
            return nn.Linear(d, out, bias=rng.random() < 0.8), out, ["linear"]
        if kind == "layer_norm":
            return nn.LayerNorm(d, elementwise_affine=rng.random() < 0.8), d, ["layer_norm"]
        if kind == "rms_norm":
            return nn.RMSNorm(d), d, ["rms_norm"]
        if kind == "act":
            return self.activation(), d, ["act"]
        if kind == "attention":
            heads, head_dim = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
            fused, split, sdpa = rng.random() < 0.5, rng.choice(["attribute", "heads", "head_dim"]), rng.random() < 0.5
            name = f"attention/{heads}x{head_dim}/{'fused' if fused else split}/{'sdpa' if sdpa else 'matmul'}"
            return Residual(Attention(d, heads, head_dim, fused, split, sdpa)), d, [name]
        if kind == "torch_attention":
            heads = rng.choice(_divisors(d))
            return Residual(TorchAttention(d, heads)), d, [f"multihead_attention/{heads}"]
        if kind == "token_mix":
            return TokenMix(tokens), d, ["token_mix"]
        if kind == "self_similarity":
            return SelfSimilarity(), d, ["self_similarity"]
        if kind == "data_gate":
            gate = rng.choice(["positive", "where", "mean", "softmax", "norm", "max"])
            return DataGate(gate, -1), d, [f"data_gate_{gate}"]
        if kind == "slice":
            start = rng.randrange(d)
            stop = rng.randrange(start + 1, d + 1)
            return Slice(start, stop, -1, rng.random() < 0.5), stop - start, [f"slice[{start}:{stop}]"]
        if kind == "chunk_gate":
            return ChunkGate(-1, rng.choice(["sigmoid", "silu"])), d // 2, ["chunk_gate"]
        if kind == "mlp":
            hidden = self.width()
            mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), self.activation(), nn.Linear(hidden, d))
            return Residual(mlp), d, ["residual_mlp"]
        return self.branches(kind, d, -1, lambda width: self.token_body(width, tokens, depth + 1))

    def token_body(self, d: int, tokens: int, depth: int) -> tuple[nn.Module, int, list[str]]:
        blocks, names = [], []
        for _ in range(self.rng.randint(1, 2)):
            block, d, found = self.token_block(d, tokens, depth)
            blocks.append(block)
            names += found
        return nn.Sequential(*blocks), d, names

    # ---- branches, on either ----
    def branches(self, kind: str, c: int, dim: int, body: Body) -> tuple[nn.Module, int, list[str]]:
        """Along channel dimension ``dim``: a residual (the body brought back to ``c`` channels by a last
        projection), a concat of 2 or 3 bodies, or a body per chunk of the channels."""
        rng = self.rng
        image = dim == 1
        if kind == "residual":
            inner, width, names = body(c)
            close = nn.Conv2d(width, c, 1) if image else nn.Linear(width, c)
            op = rng.choice(["add", "add", "sub", "mul"])
            block = Residual(nn.Sequential(inner, close), op)
            names = [f"residual_{op}[", *names, "]"]
            out = c
        elif kind == "concat":
            parts = [body(c) for _ in range(rng.randint(2, 3))]
            block = Concat([p[0] for p in parts], dim)
            names = ["concat[", *[n for p in parts for n in (*p[2], "|")][:-1], "]"]
            out = sum(p[1] for p in parts)
        else:
            n = rng.choice([n for n in (2, 3) if n <= c])
            split = None if c % n == 0 or rng.random() < 0.5 else _uneven(rng, c, n)
            sizes = split or [len(chunk) for chunk in torch.arange(c).chunk(n)]
            parts = [body(width) for width in sizes]
            block = ChunkEach([p[0] for p in parts], dim, split)
            names = [f"{'split' if split else 'chunk'}_each[", *[n for p in parts for n in (*p[2], "|")][:-1], "]"]
            out = sum(p[1] for p in parts)
        return block, out, names


def _uneven(rng: random.Random, c: int, n: int) -> list[int]:
    cuts = sorted(rng.sample(range(1, c), n - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, c], strict=True)]


def random_model(seed: int) -> tuple[RandomModel, torch.Tensor]:
    """A random tiny architecture and example inputs, the same for the same ``seed``.

    An image model (``(2, C, H, W)`` inputs; convolutions, norms, branches, pooling, gates; maybe then tokens) or a
    token model (``(2, N, D)``; linear layers, norms, attention, products of activations); a classifier head;
    norms with random statistics. Building does not touch the global random state. ``model.ops`` names its blocks.

    Examples:
        >>> model, x = random_model(3)
        >>> model(x).shape[0], len(model.ops) > 1
        (2, True)
    """
    rng = random.Random(seed)
    builder = _Builder(rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks, ops = [], []
        if rng.random() < 0.6:
            c, size = rng.choice([2, 3, 4]), rng.choice([4, 5, 6])
            inputs = torch.randn(2, c, size, size)
            stem, width, name = builder.conv(c)  # a stem: a first layer whose output channels may go
            blocks.append(stem)
            ops.append(name)
            for _ in range(rng.randint(1, 4)):
                block, width, size, names = builder.image_block(width, size, 0)
                blocks.append(block)
                ops += names
            head = rng.random()
            if head < 0.4:
                blocks.append(ImageHead(width, rng.choice([3, 5])))
                ops.append("image_head")
                return _finish(blocks, ops), inputs
            if head < 0.5:  # every position of every channel a feature of the classifier
                blocks += [nn.Flatten(1), nn.Linear(width * size * size, rng.choice([3, 5]))]
                ops.append("flatten_head")
                return _finish(blocks, ops), inputs
            blocks.append(ToTokens())
            ops.append("to_tokens")
            tokens = size * size
        else:
            tokens, width = rng.choice([3, 4, 5]), rng.choice([4, 6, 8])
            inputs = torch.randn(2, tokens, width)
            hidden = builder.width()
            blocks.append(nn.Linear(width, hidden))
            ops.append("linear")
            width = hidden
        for _ in range(rng.randint(1, 4)):
            block, width, names = builder.token_block(width, tokens, 0)
            blocks.append(block)
            ops += names
        blocks.append(TokenHead(width, rng.choice([3, 5])))
        ops.append("token_head")
        return _finish(blocks, ops), inputs


def _finish(blocks: list[nn.Module], ops: list[str]) -> RandomModel:
    return randomize_norms(RandomModel(blocks, ops)).eval()
