"""Helpers of the ``test_structures_*.py`` files: build, group, prune and export every structure of
:mod:`maskprune.testing`, and check soft == hard.

Groups are written as ``G(size, "module.tensor[dim]", ...)``: a group of ``size`` channels touching
exactly those tensor dimensions. Tensors that must never be pruned (model outputs, frozen ops) are
checked to be in no group at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
                # bit-exact: an integer output (no tiny model computes one from floats, where rounding could flip it)
                assert torch.equal(s, h)
    return pruned


# ---- fresh inputs: another batch size, and another spatial size where the model allows -------
def _randn(*shapes: tuple[int, ...]) -> Callable[[], list[torch.Tensor]]:
    return lambda: [torch.randn(*shape) for shape in shapes]


def token_ids() -> list[torch.Tensor]:
    return [torch.randint(0, 10, (3, 6)), torch.randint(0, 10, (1, 9))]


def dict_inputs() -> list[dict[str, Any]]:
    return [
        {"image": torch.randn(3, 3, 8, 8), "extra": torch.randn(3, 4), "scale": 2.0},
        {"image": torch.randn(1, 3, 12, 10), "extra": torch.randn(1, 4)},
    ]


def _bool_mask() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(3, 5, 6), torch.tensor([1, 5, 0])), (torch.randn(1, 7, 6), torch.tensor([4]))]


IMAGES = _randn((3, 3, 8, 8), (1, 3, 12, 10))
IMAGES_FIXED_SIZE = _randn((3, 3, 8, 8))  # the model's parameters fix the spatial size
TOKENS = _randn((3, 5, 6), (1, 7, 6))
SEQUENCES = _randn((9, 4, 5), (3, 1, 5))  # (time, batch, features)

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
    "embedding": token_ids,
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
    "repeat_interleave_attention": _randn((3, 5, 8), (1, 9, 8)),
    "literal_heads_attention": TOKENS,
    "spatial_reduction_attention": _randn((3, 3, 8, 8), (1, 3, 12, 12)),
    "rms_norm_hidden": token_ids,
    "conv_lstm": _randn((4, 3, 9), (1, 3, 4)),
    "gru_bidirectional": SEQUENCES,
    "lstm_proj": SEQUENCES,
    "rnn_batch_first": _randn((4, 9, 5), (1, 3, 5)),
    "lstm_initial_state": SEQUENCES,
    "lstm_cell_loop": SEQUENCES,
    "gru_cell_loop": SEQUENCES,
    "functional": IMAGES,
    "shared_module": IMAGES,
    "tied_parameters": token_ids,
    "dict_io": dict_inputs,
    "inplace": IMAGES,
    "no_grad": IMAGES,
    "bool_mask": _bool_mask,
    "unsupported_op": IMAGES,
}
