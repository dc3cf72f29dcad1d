"""Every structure of :mod:`maskprune.testing`: the exact dependency groups, and soft == hard after export.

Groups are written as ``G(size, "module.tensor[dim]", ...)``: a group of ``size`` channels touching
exactly those tensor dimensions. Tensors that must never be pruned (model outputs, frozen ops) are
checked to be in no group at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import maskprune
from maskprune import Group, Mask, Member, count_parameters
from maskprune.testing import TINY_MODELS

RTOL = 1e-5

GroupKey = tuple[int, frozenset[str]]


# ---- helpers -----------------------------------------------------------------------------------
def G(size: int, *members: str) -> GroupKey:
    """A group as the tests write it: its size and the ``name[dim]`` of every member."""
    return size, frozenset(members)


def make(name: str) -> tuple[Mask, nn.Module, Any]:
    model, inputs = TINY_MODELS[name]()
    return Mask(model, inputs).make(), model, inputs


def found(mask: Mask) -> set[GroupKey]:
    return {(g.size, frozenset(f"{m.name}[{m.dim}]" for m in g.members)) for g in mask.groups}


def grouped(mask: Mask) -> set[str]:
    """Every ``name[dim]`` that belongs to some group."""
    return {f"{m.name}[{m.dim}]" for g in mask.groups for m in g.members}


def group_of(mask: Mask, name: str, dim: int) -> Group:
    matches = [g for g in mask.groups if any(m.name == name and m.dim == dim for m in g.members)]
    assert len(matches) == 1, f"{name}[{dim}] is in {len(matches)} groups"
    return matches[0]


def member(group: Group, name: str, dim: int) -> Member:
    matches = [m for m in group.members if m.name == name and m.dim == dim]
    assert len(matches) == 1, f"{name}[{dim}] is {len(matches)} times in group {group.index}"
    return matches[0]


def prune_every_group(mask: Mask) -> None:
    """Remove every other channel (from channel 0) of each group, keeping at least one."""
    for group in mask.groups:
        channels = list(range(0, group.size, 2))[: group.size - 1]
        if channels:
            group.prune(channels)
        assert group.pruned == channels and group.kept == group.size - len(channels) >= 1


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Every output tensor, in order (dicts, tuples and lists flattened)."""
    with eval_mode(model):
        if isinstance(inputs, dict):
            out = model(**inputs)
        elif isinstance(inputs, tuple):
            out = model(*inputs)
        else:
            out = model(inputs)

    def flat(obj: Any) -> Iterator[torch.Tensor]:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from flat(value)
        elif isinstance(obj, (tuple, list)):
            for value in obj:
                yield from flat(value)

    return list(flat(out))


def assert_soft_equals_hard(mask: Mask, model: nn.Module, inputs: Any, fresh: list[Any]) -> nn.Module:
    """Export and check the pruned model against the masked one on ``inputs`` and every ``fresh`` input.

    Checked: fewer parameters, the same module tree (names and types), no hook left on any exported
    module, ``maskprune.verify(...).max_rel <= RTOL`` and, independently of ``verify``, finite masked
    outputs of the original shapes that match the exported ones.
    """
    modules = [(name, type(m)) for name, m in model.named_modules()]
    pruned = mask.generate_pruned_model()
    assert count_parameters(pruned) < count_parameters(model)
    assert [(name, type(m)) for name, m in pruned.named_modules()] == modules
    for name, m in pruned.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        assert not any(hooks), f"hooks left on {name or '<root>'}"
    for x in [inputs, *fresh]:
        result = maskprune.verify(model, pruned, x)
        assert result.problem is None and result.max_rel <= RTOL, str(result)
        soft, hard = outputs(model, x), outputs(pruned, x)
        assert [s.shape for s in soft] == [h.shape for h in hard]
        for s, h in zip(soft, hard, strict=True):
            if s.is_floating_point():
                assert torch.isfinite(s).all(), "the masked model computes non-finite values"
                scale = max(h.abs().max().item(), 1e-12)
                assert (s - h).abs().max().item() / scale <= RTOL
            else:
                assert torch.equal(s, h)
    return pruned


# ---- fresh inputs: another batch size, and another spatial size where the model allows -------
def _randn(*shapes: tuple[int, ...]) -> Callable[[], list[torch.Tensor]]:
    return lambda: [torch.randn(*shape) for shape in shapes]


def _ids() -> list[torch.Tensor]:
    return [torch.randint(0, 10, (3, 6)), torch.randint(0, 10, (1, 9))]


def _dict_io() -> list[dict[str, Any]]:
    return [
        {"image": torch.randn(3, 3, 8, 8), "extra": torch.randn(3, 4), "scale": 2.0},
        {"image": torch.randn(1, 3, 12, 10), "extra": torch.randn(1, 4)},
    ]


def _bool_mask() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(3, 5, 6), torch.tensor([1, 5, 0])), (torch.randn(1, 7, 6), torch.tensor([4]))]


IMAGES = _randn((3, 3, 8, 8), (1, 3, 12, 10))
IMAGES_FIXED_SIZE = _randn((3, 3, 8, 8))  # the model's parameters fix the spatial size
TOKENS = _randn((3, 5, 6), (1, 7, 6))

FRESH: dict[str, Callable[[], list[Any]]] = {
    "conv1d": _randn((3, 3, 16), (1, 3, 21)),
    "conv2d": IMAGES,
    "conv3d": _randn((3, 3, 4, 6, 6), (1, 3, 5, 7, 4)),
    "conv_transpose2d": IMAGES,
    "depthwise_conv": IMAGES,
    "grouped_conv": IMAGES,
    "linear_3d": TOKENS,
    "batch_norm2d": IMAGES,
    "group_norm": IMAGES,
    "layer_norm": TOKENS,
    "instance_norm2d": IMAGES,
    "frozen_batch_norm2d": IMAGES,
    "instance_norm2d_no_affine": IMAGES,
    "batch_norm2d_no_affine": IMAGES,
    "group_norm_no_affine": IMAGES,
    "layer_norm_no_affine": TOKENS,
    "rms_norm_no_affine": TOKENS,
    "prelu": IMAGES,
    "embedding": _ids,
    "bare_parameter": IMAGES_FIXED_SIZE,
    "residual_add": IMAGES,
    "residual_sub": IMAGES,
    "residual_mul": IMAGES,
    "residual_div": IMAGES,
    "squeeze_excitation": IMAGES,
    "cat": IMAGES,
    "chunk": IMAGES,
    "split_unequal": IMAGES,
    "slice": IMAGES,
    "flatten_linear": IMAGES_FIXED_SIZE,
    "view_reshape": IMAGES,
    "permute_transpose": IMAGES,
    "channel_shuffle": IMAGES,
    "channel_shuffle_layer": IMAGES,
    "pixel_shuffle": _randn((3, 3, 4, 4), (1, 3, 6, 5)),
    "pixel_unshuffle": IMAGES,
    "patch_merging": _randn((3, 3, 8, 8), (1, 3, 12, 6)),
    "glu": TOKENS,
    "pooling": _randn((3, 3, 8, 8), (1, 3, 16, 12)),
    "interpolate": IMAGES,
    "relu": IMAGES,
    "gelu": IMAGES,
    "silu": IMAGES,
    "hardswish": IMAGES,
    "sigmoid": IMAGES,
    "dropout": IMAGES,
    "multihead_attention": TOKENS,
    "fused_qkv_attention": TOKENS,
    "grouped_query_attention": _randn((3, 5, 8), (1, 9, 8)),
    "literal_heads_attention": TOKENS,
    "spatial_reduction_attention": _randn((3, 3, 8, 8), (1, 3, 12, 12)),
    "rms_norm_hidden": _ids,
    "functional": IMAGES,
    "shared_module": IMAGES,
    "tied_parameters": _ids,
    "dict_io": _dict_io,
    "inplace": IMAGES,
    "no_grad": IMAGES,
    "bool_mask": _bool_mask,
    "unsupported_op": IMAGES,
}

# ---- the exact groups of every structure ------------------------------------------------------
TWO_CONVS = {
    G(8, "conv1.weight[0]", "conv1.bias[0]", "conv2.weight[1]"),
    G(6, "conv2.weight[0]", "conv2.bias[0]", "head.weight[1]"),
}
STEM_HEAD = {G(8, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")}
STEM_NORM_HEAD = {G(8, "stem.weight[0]", "stem.bias[0]", "body.0.weight[0]", "body.0.bias[0]", "head.weight[1]")}
RESIDUAL = {
    G(
        8,
        "stem.weight[0]",
        "stem.bias[0]",
        "branch1.weight[1]",
        "branch2.weight[0]",
        "branch2.bias[0]",
        "head.weight[1]",
    ),
    G(6, "branch1.weight[0]", "branch1.bias[0]", "branch2.weight[1]"),
}
STEM_ONLY = {G(6, "stem.weight[0]", "stem.bias[0]", "conv.weight[1]")}  # conv's output channels are frozen

EXPECTED: dict[str, set[GroupKey]] = {
    "conv1d": TWO_CONVS,
    "conv2d": TWO_CONVS,
    "conv3d": TWO_CONVS,
    "conv_transpose2d": {
        G(8, "conv.weight[0]", "conv.bias[0]", "up.weight[0]"),  # a transposed conv's weight is (in, out, ...)
        G(6, "up.weight[1]", "up.bias[0]", "head.weight[1]"),
    },
    "depthwise_conv": {
        G(
            8,
            "expand.weight[0]",
            "expand.bias[0]",
            "bn1.weight[0]",
            "bn1.bias[0]",
            "dw.weight[0]",
            "dw.bias[0]",
            "bn2.weight[0]",
            "bn2.bias[0]",
            "head.weight[1]",
        ),
    },
    "grouped_conv": {G(2, "expand.weight[0]", "expand.bias[0]", "gconv.weight[0]", "gconv.bias[0]", "head.weight[1]")},
    "linear_3d": {
        G(8, "fc1.weight[0]", "fc1.bias[0]", "fc2.weight[1]"),
        G(6, "fc2.weight[0]", "fc2.bias[0]", "head.weight[1]"),
    },
    "batch_norm2d": STEM_NORM_HEAD,
    "group_norm": {  # 4 norm groups of 2 channels: 4 units
        G(4, "stem.weight[0]", "stem.bias[0]", "body.0.weight[0]", "body.0.bias[0]", "head.weight[1]"),
    },
    "layer_norm": {G(8, "fc.weight[0]", "fc.bias[0]", "norm.weight[0]", "norm.bias[0]", "head.weight[1]")},
    "instance_norm2d": STEM_NORM_HEAD,
    "frozen_batch_norm2d": STEM_HEAD,  # its tensors are buffers: sliced, but not members
    "instance_norm2d_no_affine": STEM_HEAD,  # no tensors: the norm only passes its channels on
    "batch_norm2d_no_affine": STEM_HEAD,
    "group_norm_no_affine": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # 4 norm groups: 4 units
    "layer_norm_no_affine": {G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]")},
    "rms_norm_no_affine": {G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]")},
    "prelu": {G(8, "stem.weight[0]", "stem.bias[0]", "body.0.weight[0]", "head.weight[1]")},
    "embedding": {
        G(8, "emb.weight[1]", "fc.weight[1]"),
        G(6, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "bare_parameter": {
        G(
            8,
            "patch.weight[0]",
            "patch.bias[0]",
            "cls_token[2]",
            "pos_embed[2]",
            "fc1.weight[1]",
            "fc2.weight[0]",
            "fc2.bias[0]",
            "gamma[0]",
            "head.weight[1]",
        ),
        G(12, "fc1.weight[0]", "fc1.bias[0]", "fc2.weight[1]"),
    },
    "residual_add": RESIDUAL,
    "residual_sub": RESIDUAL,
    "residual_mul": RESIDUAL,
    "residual_div": {G(6, "branch1.weight[0]", "branch1.bias[0]", "branch2.weight[1]")},  # a / b: b frozen
    "squeeze_excitation": {
        G(
            8,
            "stem.weight[0]",
            "stem.bias[0]",
            "se.fc1.weight[1]",
            "se.fc2.weight[0]",
            "se.fc2.bias[0]",
            "head.weight[1]",
        ),
        G(4, "se.fc1.weight[0]", "se.fc1.bias[0]", "se.fc2.weight[1]"),
    },
    "cat": {
        G(4, "conv_a.weight[0]", "conv_a.bias[0]", "head.weight[1]"),
        G(6, "conv_b.weight[0]", "conv_b.bias[0]", "head.weight[1]"),
    },
    "chunk": {G(4, "conv.weight[0]", "conv.bias[0]", "head.weight[1]")},
    "split_unequal": STEM_ONLY,
    "slice": STEM_ONLY,
    "flatten_linear": {
        G(4, "conv.weight[0]", "conv.bias[0]", "fc.weight[1]"),
        G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "view_reshape": {G(8, "conv.weight[0]", "conv.bias[0]", "head.weight[1]")},
    "permute_transpose": {
        G(8, "conv.weight[0]", "conv.bias[0]", "fc.weight[1]"),
        G(6, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "channel_shuffle": {  # view-transpose-view in 2 groups written in the code: a unit is a position in both
        G(6, "stem.weight[0]", "stem.bias[0]", "conv.weight[1]"),
        G(4, "conv.weight[0]", "conv.bias[0]", "head.weight[1]"),
    },
    "channel_shuffle_layer": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: one per group
    "pixel_shuffle": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: 4 stem channels
    "pixel_unshuffle": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: 4 head columns
    "glu": {G(8, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: a value and its gate
    "patch_merging": {  # the channels carry the merge, not the 2x2 parts of the spatial split
        G(8, "stem.weight[0]", "stem.bias[0]", "reduce.weight[1]"),
        G(6, "reduce.weight[0]", "reduce.bias[0]", "head.weight[1]"),
    },
    "pooling": {
        G(8, "conv1.weight[0]", "conv1.bias[0]", "conv2.weight[1]"),
        G(8, "conv2.weight[0]", "conv2.bias[0]", "conv3.weight[1]"),
        G(6, "conv3.weight[0]", "conv3.bias[0]", "conv4.weight[1]"),
        G(6, "conv4.weight[0]", "conv4.bias[0]", "head.weight[1]"),
    },
    "interpolate": TWO_CONVS,
    "relu": STEM_HEAD,
    "gelu": STEM_HEAD,
    "silu": STEM_HEAD,
    "hardswish": STEM_HEAD,
    "sigmoid": STEM_HEAD,
    "dropout": {
        G(8, "conv.weight[0]", "conv.bias[0]", "fc.weight[1]"),
        G(6, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "multihead_attention": {  # 2 heads of 4: each with the same 4 channels of the query (embed_dim)
        G(10, "pre1.weight[0]", "pre1.bias[0]", "pre2.weight[1]"),
        G(
            2,
            "pre2.weight[0]",
            "pre2.bias[0]",
            "attn.in_proj_weight[0]",
            "attn.in_proj_weight[1]",
            "attn.in_proj_bias[0]",
            "attn.out_proj.weight[0]",
            "attn.out_proj.weight[1]",
            "attn.out_proj.bias[0]",
            "post1.weight[1]",
        ),
        G(12, "post1.weight[0]", "post1.bias[0]", "post2.weight[1]"),
    },
    "fused_qkv_attention": {  # the residual width, and 3 heads: q, k and v rows of a head go together
        G(
            8,
            "embed.weight[0]",
            "embed.bias[0]",
            "norm.weight[0]",
            "norm.bias[0]",
            "qkv.weight[1]",
            "proj.weight[0]",
            "proj.bias[0]",
            "head.weight[1]",
        ),
        G(3, "qkv.weight[0]", "qkv.bias[0]", "proj.weight[1]"),
    },
    "grouped_query_attention": {  # 2 key/value heads, each with its 2 query heads (the input width is the model's)
        G(2, "q_proj.weight[0]", "k_proj.weight[0]", "v_proj.weight[0]", "o_proj.weight[1]"),
    },
    "literal_heads_attention": {  # the residual width, and position i of both heads of the values
        G(
            8,
            "embed.weight[0]",
            "embed.bias[0]",
            "q.weight[1]",
            "k.weight[1]",
            "v.weight[1]",
            "proj.weight[0]",
            "proj.bias[0]",
            "head.weight[1]",
        ),
        G(4, "v.weight[0]", "v.bias[0]", "proj.weight[1]"),
    },
    "spatial_reduction_attention": {  # the residual width, a whole head at a time: the code sizes both by it
        G(
            2,
            "embed.weight[0]",
            "embed.bias[0]",
            "q.weight[0]",
            "q.weight[1]",
            "q.bias[0]",
            "sr.weight[0]",
            "sr.weight[1]",
            "sr.bias[0]",
            "kv.weight[0]",
            "kv.weight[1]",
            "kv.bias[0]",
            "proj.weight[0]",
            "proj.weight[1]",
            "proj.bias[0]",
            "head.weight[1]",
        ),
    },
    "rms_norm_hidden": {  # the hidden size through both RMS norms, and the gated MLP's width
        G(
            8,
            "embed.weight[1]",
            "norm1.weight[0]",
            "gate.weight[1]",
            "up.weight[1]",
            "down.weight[0]",
            "norm2.weight[0]",
            "head.weight[1]",
        ),
        G(12, "gate.weight[0]", "up.weight[0]", "down.weight[1]"),
    },
    "functional": {
        G(8, "stem.weight[0]", "stem.bias[0]", "proj.weight[1]"),
        G(6, "proj.weight[0]", "proj.bias[0]", "head.weight[1]"),
    },
    "shared_module": {
        G(8, "stem.weight[0]", "stem.bias[0]", "block.weight[0]", "block.weight[1]", "block.bias[0]", "head.weight[1]"),
    },
    "tied_parameters": {  # b.weight is a.weight: one tensor, named by its first owner
        G(8, "a.weight[1]", "mlp.0.weight[1]", "mlp.2.weight[0]", "mlp.2.bias[0]"),
        G(12, "mlp.0.weight[0]", "mlp.0.bias[0]", "mlp.2.weight[1]"),
    },
    "dict_io": {
        G(8, "conv.weight[0]", "conv.bias[0]", "head.weight[1]"),
        G(6, "aux.weight[0]", "aux.bias[0]", "head.weight[1]", "aux_head.weight[1]"),
    },
    "inplace": {
        G(8, "stem.weight[0]", "stem.bias[0]", "conv.weight[0]", "conv.weight[1]", "conv.bias[0]", "head.weight[1]"),
    },
    "no_grad": {
        G(8, "stem.weight[0]", "stem.bias[0]", "conv.weight[1]"),
        G(6, "conv.weight[0]", "conv.bias[0]", "head.weight[1]"),
    },
    "bool_mask": {G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]")},
    "unsupported_op": STEM_ONLY,
}

# tensor dims computing the model's outputs: never in a group
OUTPUTS: dict[str, tuple[str, ...]] = {
    "multihead_attention": ("post2.weight[0]", "post2.bias[0]"),
    "tied_parameters": ("a.weight[0]",),
    "dict_io": ("head.weight[0]", "head.bias[0]", "aux_head.weight[0]", "aux_head.bias[0]"),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not stall when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_structure_has_expectations() -> None:
    assert set(EXPECTED) == set(TINY_MODELS) == set(FRESH)


def test_factories_build_fresh_deterministic_models() -> None:
    state = torch.get_rng_state()
    (a, x), (b, y) = TINY_MODELS["conv2d"](), TINY_MODELS["conv2d"]()
    assert torch.equal(torch.get_rng_state(), state)
    assert a is not b and torch.equal(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_groups(name: str) -> None:
    mask, _, _ = make(name)
    assert found(mask) == EXPECTED[name]


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_outputs_never_pruned(name: str) -> None:
    mask, _, _ = make(name)
    assert not grouped(mask) & set(OUTPUTS.get(name, ("head.weight[0]", "head.bias[0]")))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_soft_equals_hard(name: str) -> None:
    mask, model, inputs = make(name)
    prune_every_group(mask)
    assert_soft_equals_hard(mask, model, inputs, FRESH[name]())


# ---- mappings that are not one channel to one position ----------------------------------------
def test_grouped_conv_removes_whole_conv_groups() -> None:
    mask, model, inputs = make("grouped_conv")
    (group,) = mask.groups
    assert group.size == 2  # one unit per conv group: 4 inputs and 6 outputs each
    per_group = {"expand.weight": 4, "expand.bias": 4, "gconv.weight": 6, "gconv.bias": 6, "head.weight": 6}
    for m in group.members:
        size = m.tensor.shape[m.dim]
        assert m.positions.tolist() == list(range(size))
        assert m.units.tolist() == (np.arange(size) // per_group[m.name]).tolist()
    assert "gconv.weight[1]" not in grouped(mask)  # inputs per conv group stay 4
    group.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert (pruned.gconv.groups, pruned.gconv.in_channels, pruned.gconv.out_channels) == (1, 4, 6)
    assert torch.equal(pruned.gconv.weight, model.gconv.weight[6:])
    assert pruned.expand.out_channels == 4 and pruned.head.in_channels == 6


def test_depthwise_conv_keeps_one_conv_group_per_channel() -> None:
    mask, model, inputs = make("depthwise_conv")
    mask.groups[0].prune([1, 2, 5])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert (pruned.dw.groups, pruned.dw.in_channels, pruned.dw.out_channels) == (5, 5, 5)
    assert pruned.bn2.num_features == 5 and pruned.bn2.running_mean.shape == (5,)


def test_group_norm_units_are_whole_norm_groups() -> None:
    mask, model, inputs = make("group_norm")
    (group,) = mask.groups
    for m in group.members:
        assert m.positions.tolist() == list(range(8))
        assert m.units.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    group.prune([1, 2])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    norm = pruned.body[0]
    assert (norm.num_groups, norm.num_channels) == (2, 4)
    assert torch.equal(norm.weight, model.body[0].weight[[0, 1, 6, 7]])


def test_cat_offsets() -> None:
    mask, _, _ = make("cat")
    a, b = group_of(mask, "conv_a.weight", 0), group_of(mask, "conv_b.weight", 0)
    assert member(a, "head.weight", 1).positions.tolist() == [0, 1, 2, 3]
    assert member(a, "head.weight", 1).units.tolist() == [0, 1, 2, 3]
    assert member(b, "head.weight", 1).positions.tolist() == [4, 5, 6, 7, 8, 9]
    assert member(b, "head.weight", 1).units.tolist() == [0, 1, 2, 3, 4, 5]


class NumpyKeywords(nn.Module):
    """A concatenation and a squeeze-excitation scale written with torch's NumPy-style keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_a(x)
        a = a * torch.mean(a, axis=(2, 3), keepdims=True)
        return self.head(torch.concatenate([a, self.conv_b(x)], axis=1))


def test_numpy_style_keywords_group_like_torch_ones() -> None:
    """``axis=`` and ``keepdims=``, which torch's parser takes for ``dim`` and ``keepdim``, are read as them."""
    torch.manual_seed(0)
    model = NumpyKeywords().eval()
    mask = Mask(model, IMAGES()[0]).make()
    assert found(mask) == {
        (4, frozenset({"conv_a.weight[0]", "conv_a.bias[0]", "head.weight[1]"})),
        (6, frozenset({"conv_b.weight[0]", "conv_b.bias[0]", "head.weight[1]"})),
    }
    assert member(group_of(mask, "conv_b.weight", 0), "head.weight", 1).positions.tolist() == [4, 5, 6, 7, 8, 9]
    prune_every_group(mask)
    assert_soft_equals_hard(mask, model, IMAGES()[0], IMAGES()[1:])


def test_chunk_removes_the_same_channels_from_every_chunk() -> None:
    mask, model, inputs = make("chunk")
    (group,) = mask.groups
    assert member(group, "conv.weight", 0).positions.tolist() == list(range(8))
    assert member(group, "conv.weight", 0).units.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert member(group, "head.weight", 1).units.tolist() == [0, 1, 2, 3]
    group.prune([1])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert torch.equal(pruned.conv.weight, model.conv.weight[[0, 2, 3, 4, 6, 7]])


def test_flatten_expands_a_channel_to_its_pixels() -> None:
    mask, model, inputs = make("flatten_linear")
    fc_in = member(group_of(mask, "conv.weight", 0), "fc.weight", 1)
    assert fc_in.positions.tolist() == list(range(64))
    assert fc_in.units.tolist() == np.repeat(np.arange(4), 16).tolist()  # 4x4 pixels per channel
    mask.groups[0].prune([2])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES_FIXED_SIZE())
    assert torch.equal(pruned.fc.weight, torch.cat([model.fc.weight[:, :32], model.fc.weight[:, 48:]], dim=1))


def test_bare_parameters_follow_the_channels() -> None:
    """Class token, position embedding and layer scale are sliced with the channels they carry."""
    mask, model, inputs = make("bare_parameter")
    assert found(mask) == EXPECTED["bare_parameter"]
    big = group_of(mask, "patch.weight", 0)
    for name, dim in (("cls_token", 2), ("pos_embed", 2), ("gamma", 0)):
        assert member(big, name, dim).positions.tolist() == list(range(8))
    assert not grouped(mask) & {"cls_token[1]", "pos_embed[1]"}  # the token dim is the model's
    big.prune([0, 3])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES_FIXED_SIZE())
    assert pruned.cls_token.shape == (1, 1, 6) and pruned.pos_embed.shape == (1, 5, 6)
    assert pruned.gamma.shape == (6,)


def test_no_group_for_size_one_parameter_dims() -> None:
    mask, _, _ = make("bare_parameter")
    assert all(g.size > 1 for g in mask.groups)
    assert not grouped(mask) & {"cls_token[0]", "pos_embed[0]"}


# ---- layers whose attributes follow their sliced tensors ---------------------------------------
def test_layer_norm_uses_masked_statistics() -> None:
    mask, model, inputs = make("layer_norm")
    mask.groups[0].prune([0, 5, 6])
    pruned = assert_soft_equals_hard(mask, model, inputs, TOKENS())
    assert pruned.norm.normalized_shape == (5,)


def test_masked_layer_norm_computes_the_exported_norm_exactly() -> None:
    """Eager masked forwards normalise the gathered kept channels as the export does: bit for bit, zero elsewhere."""
    mask, model, inputs = make("layer_norm")
    mask.groups[0].prune([0, 5, 6])
    pruned = mask.generate_pruned_model()
    with torch.no_grad():
        soft, hard = model.norm(model.fc(inputs)), pruned.norm(pruned.fc(inputs))
    kept = [1, 2, 3, 4, 7]
    assert torch.equal(soft[..., kept], hard)
    assert not soft[..., [0, 5, 6]].any()
    with torch.no_grad():  # the 0/1 flags, as compiled graphs use them
        x, norm = model.fc(inputs), model.norm
        by_flags = maskprune.masked_norm(x, 2, mask.groups[0].mask, norm.weight, norm.bias, norm.eps, "layer_norm")
    torch.testing.assert_close(by_flags, soft, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "attribute"),
    [
        ("batch_norm2d", "num_features"),
        ("instance_norm2d", "num_features"),
        ("frozen_batch_norm2d", None),
        ("prelu", "num_parameters"),
    ],
)
def test_per_channel_layers_are_sliced(name: str, attribute: str | None) -> None:
    mask, model, inputs = make(name)
    mask.groups[0].prune([0, 1, 7])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    layer = pruned.body[0]
    sliced = {key: tuple(t.shape) for key, t in layer.state_dict().items() if t.dim()}
    assert sliced and all(shape == (5,) for shape in sliced.values()), sliced  # parameters and buffers
    if attribute is not None:
        assert getattr(layer, attribute) == 5


@pytest.mark.parametrize(
    ("name", "removed", "widths"),
    [
        ("instance_norm2d_no_affine", [0, 1, 7], {"num_features": 5}),
        ("batch_norm2d_no_affine", [0, 1, 7], {"num_features": 5}),
        ("group_norm_no_affine", [1, 2], {"num_channels": 4, "num_groups": 2}),  # units: norm groups of 2
        ("layer_norm_no_affine", [0, 4, 6], {"normalized_shape": (5,)}),
        ("rms_norm_no_affine", [0, 4, 6], {"normalized_shape": (5,)}),
    ],
)
def test_norm_layers_without_tensors_get_their_new_width(
    name: str, removed: list[int], widths: dict[str, Any], tmp_path: Path
) -> None:
    """No tensor to slice says their width: the export sets it, the model runs without a width warning (an
    InstanceNorm warns on a mismatch, a LayerNorm fails), and a saved model loads with the same attributes."""
    mask, model, inputs = make(name)
    mask.groups[0].prune(removed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = assert_soft_equals_hard(mask, model, inputs, FRESH[name]())
    norm = pruned.body[0] if hasattr(pruned, "body") else pruned.norm
    assert {attribute: getattr(norm, attribute) for attribute in widths} == widths
    maskprune.save_pruned(pruned, tmp_path)
    loaded = maskprune.load_pruned(TINY_MODELS[name]()[0], tmp_path)
    loaded_norm = loaded.body[0] if hasattr(loaded, "body") else loaded.norm
    assert {attribute: getattr(loaded_norm, attribute) for attribute in widths} == widths


def test_a_norm_layer_without_tensors_called_on_two_spaces_joins_them() -> None:
    """One LayerNorm without affine tensors normalises two branches: it can hold one width, so the two
    branches lose the same channels, as a shared weight would make them."""

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
            self.norm = nn.LayerNorm(8, elementwise_affine=False)
            self.head = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.norm(self.a(x)), self.norm(self.b(x))], dim=-1))

    model, inputs = TwoBranches(), torch.randn(2, 5, 6)
    mask = Mask(model, inputs, ratio=0.5).make()
    assert found(mask) == {G(8, "a.weight[0]", "a.bias[0]", "b.weight[0]", "b.bias[0]", "head.weight[1]")}
    mask.groups[0].prune([1, 2, 5])
    pruned = assert_soft_equals_hard(mask, model, inputs, TOKENS())
    assert pruned.norm.normalized_shape == (5,) and pruned.head.in_features == 10


def test_a_group_norm_without_tensors_outside_its_layer_keeps_its_channels() -> None:
    """``F.group_norm(x, 4)`` in a model's own code: no layer holds the group count an export would change."""

    class FunctionalGroupNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.nn.functional.group_norm(self.stem(x), 4))

    with pytest.raises(maskprune.NothingToPruneError, match="`group_norm` in <root>"):
        Mask(FunctionalGroupNorm(), torch.randn(2, 3, 8, 8), ratio=0.5).make()


@pytest.mark.parametrize(
    ("name", "producer", "unit", "rows", "head_columns"),
    [
        ("channel_shuffle_layer", "stem", 1, [1, 5], [2, 3]),  # position 1 of both groups of 4 goes to 1 * 2 + (0, 1)
        ("channel_shuffle", "conv", 1, [1, 5], [2, 3]),  # the same shuffle written as view-transpose-view
        ("pixel_shuffle", "stem", 1, [4, 5, 6, 7], [1]),  # output channel 1 is made of input channels 4 … 7
        ("pixel_unshuffle", "stem", 1, [1], [4, 5, 6, 7]),  # input channel 1 becomes output channels 4 … 7
        ("glu", "stem", 2, [2, 10], [2]),  # output 2 is value 2 gated by channel 2 + 8
    ],
)
def test_channel_moving_ops_remove_whole_units(
    name: str, producer: str, unit: int, rows: list[int], head_columns: list[int]
) -> None:
    mask, model, inputs = make(name)
    group = group_of(mask, f"{producer}.weight", 0)
    group.prune([unit])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH[name]())
    before, after = model.get_submodule(producer).weight, pruned.get_submodule(producer).weight
    assert torch.equal(after, before[[i for i in range(before.shape[0]) if i not in rows]])
    keep_columns = [i for i in range(model.head.weight.shape[1]) if i not in head_columns]
    assert torch.equal(pruned.head.weight, model.head.weight[:, keep_columns])


def test_patch_merging_removes_a_channel_from_every_pixel_of_the_block() -> None:
    """Swin's ``(2, 2, C)`` merge: channel 3 is column 3 of each of the four pixels, ``p * 8 + 3``."""
    mask, model, inputs = make("patch_merging")
    group_of(mask, "stem.weight", 0).prune([3])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["patch_merging"]())
    assert torch.equal(pruned.reduce.weight, model.reduce.weight[:, [i for i in range(32) if i % 8 != 3]])


def test_a_head_count_written_in_the_code_stays_and_the_heads_lose_the_same_positions() -> None:
    mask, model, inputs = make("literal_heads_attention")
    group_of(mask, "v.weight", 0).prune([1])  # position 1 of each head of 4: value rows 1 and 5
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["literal_heads_attention"]())
    rows = [0, 2, 3, 4, 6, 7]
    assert torch.equal(pruned.v.weight, model.v.weight[rows]) and torch.equal(
        pruned.proj.weight, model.proj.weight[:, rows]
    )
    assert pruned.q.weight.shape == model.q.weight.shape and pruned.k.weight.shape == model.k.weight.shape


def test_sizes_read_from_the_input_keep_the_reduction_and_the_heads_at_its_width() -> None:
    """PVT sizes ``sr(...).reshape(B, C, -1)`` and the heads' ``reshape(B, N, C)`` by the width ``C`` it read
    from its input: the reduction's channels and the heads lose the residual's channels, a head at a time."""
    mask, model, inputs = make("spatial_reduction_attention")
    (heads,) = mask.groups
    heads.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["spatial_reduction_attention"]())
    kept = [4, 5, 6, 7]
    assert (pruned.num_heads, pruned.head_dim) == (1, 4) and (model.num_heads, model.head_dim) == (2, 4)
    assert torch.equal(pruned.sr.weight, model.sr.weight[kept][:, kept])
    assert torch.equal(pruned.kv.weight, model.kv.weight[kept + [8 + k for k in kept]][:, kept])
    assert torch.equal(pruned.proj.weight, model.proj.weight[kept][:, kept])
    assert torch.equal(pruned.head.weight, model.head.weight[:, kept])


def test_embedding_keeps_its_vocabulary() -> None:
    mask, model, inputs = make("embedding")
    assert "emb.weight[0]" not in grouped(mask)
    group_of(mask, "emb.weight", 1).prune([2, 3])
    pruned = assert_soft_equals_hard(mask, model, inputs, _ids())
    assert (pruned.emb.num_embeddings, pruned.emb.embedding_dim) == (10, 6)


def test_tied_parameter_stays_tied() -> None:
    mask, model, inputs = make("tied_parameters")
    assert not any(m.name.startswith("b.") for g in mask.groups for m in g.members)
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, _ids())
    assert pruned.a.weight is pruned.b.weight
    assert pruned.a.weight.shape == (10, 4) and pruned.b.in_features == 4


def test_shared_module_is_pruned_once() -> None:
    mask, model, inputs = make("shared_module")
    (group,) = mask.groups
    group.prune([0, 4])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert pruned.block.weight.shape == (6, 6, 3, 3)


def test_functional_calls_prune_the_borrowed_parameters() -> None:
    mask, model, inputs = make("functional")
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert pruned.stem.weight.shape == (4, 3, 3, 3)
    assert (pruned.proj.in_features, pruned.proj.out_features) == (4, 3)


def test_dict_inputs_and_outputs() -> None:
    mask, model, inputs = make("dict_io")
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, _dict_io())
    with eval_mode(pruned):
        out = pruned(**inputs)
    assert set(out) == {"logits", "extras"} and isinstance(out["extras"], tuple)
    assert out["logits"].shape == (2, 5) and out["extras"][0].shape == (2, 3)


# ---- frozen channels ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "frozen", "op"),
    [
        ("split_unequal", {"conv.weight[0]", "conv.bias[0]", "head.weight[1]"}, "`split` in <root>"),
        ("slice", {"conv.weight[0]", "conv.bias[0]", "head.weight[1]"}, "`getitem` in <root>"),
        ("unsupported_op", {"conv.weight[0]", "conv.bias[0]", "mix.scale[0]", "head.weight[1]"}, "`tensordot` in mix"),
    ],
)
def test_frozen_channels(name: str, frozen: set[str], op: str) -> None:
    mask, model, inputs = make(name)
    assert not grouped(mask) & frozen
    assert op in str(mask)
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH[name]())
    for key in frozen:  # every frozen dimension keeps its size
        tensor, dim = key[:-3], int(key[-2])
        assert pruned.get_parameter(tensor).shape[dim] == model.get_parameter(tensor).shape[dim], key


def test_attention_loses_whole_heads() -> None:
    mask, model, inputs = make("multihead_attention")
    (heads,) = [g for g in mask.groups if any(m.name.startswith("attn.") for m in g.members)]
    assert heads.size == 2
    heads.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, TOKENS())
    attn = pruned.attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.kdim) == (1, 4, 4, 4)
    assert attn.in_proj_weight.shape == (12, 4) and attn.out_proj.weight.shape == (4, 4)
    assert (pruned.pre2.out_features, pruned.post1.in_features) == (4, 4)  # the query's channels of head 1
    kept = torch.arange(4, 8)
    rows = torch.cat([kept, kept + 8, kept + 16])
    assert torch.equal(attn.in_proj_weight, model.attn.in_proj_weight[rows][:, kept])


def test_fused_qkv_loses_whole_heads_and_its_attributes_follow() -> None:
    mask, model, inputs = make("fused_qkv_attention")
    heads = group_of(mask, "qkv.weight", 0)
    assert heads.size == 3 and member(heads, "qkv.weight", 0).mapping() == "[0:18], 6 per channel"
    heads.prune([1])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["fused_qkv_attention"]())
    assert (pruned.num_heads, pruned.head_dim, pruned.attn_dim) == (2, 2, 4)
    rows = [r for part in range(3) for r in (6 * part + 0, 6 * part + 1, 6 * part + 4, 6 * part + 5)]
    assert torch.equal(pruned.qkv.weight, model.qkv.weight[rows])
    assert torch.equal(pruned.proj.weight, model.proj.weight[:, [0, 1, 4, 5]])
    assert (model.num_heads, model.attn_dim) == (3, 6)  # the masked model keeps its own


def test_grouped_query_heads_go_with_their_key_value_head() -> None:
    mask, model, inputs = make("grouped_query_attention")
    (kv_heads,) = mask.groups
    kv_heads.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["grouped_query_attention"]())
    assert torch.equal(pruned.k_proj.weight, model.k_proj.weight[3:])
    assert torch.equal(pruned.q_proj.weight, model.q_proj.weight[6:])  # query heads 2 and 3 read key head 1
    assert torch.equal(pruned.o_proj.weight, model.o_proj.weight[:, 6:])
    assert pruned.num_key_value_groups == 2


def test_rms_norm_module_statistics_over_kept_channels() -> None:
    mask, model, inputs = make("rms_norm_hidden")
    hidden = group_of(mask, "embed.weight", 1)
    hidden.prune([0, 3, 5])
    x = model.embed(inputs)
    masked_norm = model.norm1(x)  # the masked model: the embedding's columns 0, 3, 5 are zero
    kept = [1, 2, 4, 6, 7]
    expected = model.norm1.weight[kept] * x[..., kept] * torch.rsqrt(x[..., kept].pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(masked_norm[..., kept], expected)
    assert not masked_norm[..., [0, 3, 5]].any()
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["rms_norm_hidden"]())
    assert pruned.norm1.weight.shape == (5,) and pruned.embed.embedding_dim == 5


def test_unsupported_op_is_reported() -> None:
    mask, _, _ = make("unsupported_op")
    text = str(mask)
    assert "Unsupported ops (their channels are frozen): `tensordot` in mix" in text
    assert "unsupported op `tensordot` in mix: conv.weight[0]" in text


# ---- engine checks the structures rely on ------------------------------------------------------
def test_verify_reports_nan_as_different() -> None:
    class Nan(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    result = maskprune.verify(Nan(), nn.Identity(), torch.ones(3))
    assert not result


# ---- sizes read from tensors: a tensor built with them shares their channels --------------------
class SizedBuffer(nn.Module):
    """Builds a buffer from sizes read off an activation, as Keypoint R-CNN's heatmap decoding does."""

    def __init__(self, to_output: bool) -> None:
        super().__init__()
        self.to_output = to_output
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.b(self.a(x).relu())
        n, k = maps.shape[0], maps.shape[1]
        buffer = torch.zeros(n, k, 1, 1)  # its dim 1 has the size of maps' channels, whatever they become
        buffer[:, :, 0, 0] = maps.amax(dim=(2, 3))
        return buffer.flatten(1) if self.to_output else self.head(maps + buffer)


def test_a_buffer_sized_by_channels_reaching_the_output_freezes_them() -> None:
    model, x = SizedBuffer(to_output=True), torch.randn(2, 3, 6, 6)
    mask = Mask(model, x).make()
    assert found(mask) == {G(8, "a.weight[0]", "a.bias[0]", "b.weight[1]")}
    assert "b.weight[0]" in mask.selection.layout.frozen["reaches a model output"]


def test_a_buffer_sized_by_channels_is_pruned_with_them() -> None:
    model, x = SizedBuffer(to_output=False), torch.randn(2, 3, 6, 6)
    mask = Mask(model, x).make()
    assert G(6, "b.weight[0]", "b.bias[0]", "head.weight[1]") in found(mask)
    prune_every_group(mask)
    assert_soft_equals_hard(mask, model, x, [torch.randn(3, 3, 6, 6)])


class _GatherTokens(nn.Module):
    """Tokens reordered by ``torch.gather`` with an index expanded over the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        order = torch.argsort(x[..., :1], dim=1).expand(-1, -1, h.shape[-1])
        return self.b(torch.gather(h, 1, order))


def test_gather_along_tokens_keeps_channels() -> None:
    torch.manual_seed(0)
    model, x = _GatherTokens(), torch.randn(2, 5, 4)
    mask = Mask(model, x).make()
    assert found(mask) == {G(6, "a.weight[0]", "a.bias[0]", "b.weight[1]")}
    mask.groups[0].prune([0, 2])
    pruned = assert_soft_equals_hard(mask, model, x, [torch.randn(3, 7, 4)])
    assert pruned.a.out_features == 4


# ---- grouping internals ------------------------------------------------------------------------
def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    """Which sequences got the same label, whatever the labels are."""
    return {frozenset(np.flatnonzero(labels == label).tolist()) for label in np.unique(labels)}


def test_sequence_labels_tell_sequences_apart_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from maskprune import _groups

    sequences = [[1, 2], [3], [1, 2], [2, 1], [1, 2, 3], [3], [1], [1, 2]]
    values = np.asarray([v for s in sequences for v in s], dtype=np.int64)
    starts = np.cumsum([0] + [len(s) for s in sequences[:-1]])
    expected = {frozenset(i for i, t in enumerate(sequences) if t == s) for s in sequences}
    assert _partition(_groups.sequence_labels(values, starts)) == expected
    zeros = np.zeros(8, dtype=np.uint64)  # every sequence hashes alike: the exact comparison must separate them
    monkeypatch.setattr(_groups, "_hash_keys", lambda n_values, n_offsets: (zeros, zeros))
    assert _partition(_groups.sequence_labels(values, starts)) == expected
