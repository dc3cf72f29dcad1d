"""Channel mappings that are not one channel to one position: grouped convolutions, concatenation offsets,
chunks, flattening, shuffles, pixel (un)shuffles, gates, patch merging and gathers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _structures import (
    FRESH,
    IMAGES,
    IMAGES_FIXED_SIZE,
    G,
    assert_soft_equals_hard,
    found,
    group_of,
    grouped,
    make,
    member,
    prune_every_group,
)
from torch import nn

from maskprune import Mask, NothingToPruneError

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.gconv.weight, model.gconv.weight[6:])
    assert pruned.expand.out_channels == 4 and pruned.head.in_channels == 6


def test_depthwise_conv_keeps_one_conv_group_per_channel() -> None:
    mask, model, inputs = make("depthwise_conv")
    mask.groups[0].prune([1, 2, 5])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert (pruned.dw.groups, pruned.dw.in_channels, pruned.dw.out_channels) == (5, 5, 5)
    assert pruned.bn2.num_features == 5 and pruned.bn2.running_mean.shape == (5,)


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
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.conv.weight, model.conv.weight[[0, 2, 3, 4, 6, 7]])


def test_flatten_expands_a_channel_to_its_pixels() -> None:
    mask, model, inputs = make("flatten_linear")
    fc_in = member(group_of(mask, "conv.weight", 0), "fc.weight", 1)
    assert fc_in.positions.tolist() == list(range(64))
    assert fc_in.units.tolist() == np.repeat(np.arange(4), 16).tolist()  # 4x4 pixels per channel
    mask.groups[0].prune([2])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES_FIXED_SIZE())
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.fc.weight, torch.cat([model.fc.weight[:, :32], model.fc.weight[:, 48:]], dim=1))


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
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(after, before[[i for i in range(before.shape[0]) if i not in rows]])
    keep_columns = [i for i in range(model.head.weight.shape[1]) if i not in head_columns]
    assert torch.equal(pruned.head.weight, model.head.weight[:, keep_columns])


def test_patch_merging_removes_a_channel_from_every_pixel_of_the_block() -> None:
    """Swin's ``(2, 2, C)`` merge: channel 3 is column 3 of each of the four pixels, ``p * 8 + 3``."""
    mask, model, inputs = make("patch_merging")
    group_of(mask, "stem.weight", 0).prune([3])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["patch_merging"]())
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.reduce.weight, model.reduce.weight[:, [i for i in range(32) if i % 8 != 3]])


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


class _NarrowTokens(nn.Module):
    """``narrow`` along the tokens, then along the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 5)
        self.c = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)).narrow(1, 1, 3))  # tokens 1 to 3 of 5
        return self.c(h.narrow(-1, 0, 3))  # channels 0 to 2 of 5


def test_narrow_along_the_tokens_keeps_the_channels_and_freezes_a_part_of_them() -> None:
    torch.manual_seed(0)
    model, x = _NarrowTokens(), torch.randn(2, 5, 4)
    mask = Mask(model, x).make()
    assert found(mask) == {G(6, "a.weight[0]", "a.bias[0]", "b.weight[1]")}  # b's outputs: 3 of 5 read
    assert any("`narrow`" in reason for reason in mask.selection.layout.frozen)
    mask.groups[0].prune([0, 2])
    pruned = assert_soft_equals_hard(mask, model, x, [torch.randn(3, 5, 4)])
    assert pruned.a.out_features == 4 and pruned.b.out_features == 5


def test_a_narrow_of_a_whole_dim_freezes_it() -> None:
    """Found by the random-model fuzzer: ``narrow`` does not clamp its length as a slice does, so a whole dim it
    narrows keeps its size."""
    model = nn.Sequential(nn.Linear(4, 6), _Narrow(-1, 6), nn.Linear(6, 5))
    with pytest.raises(NothingToPruneError, match="`narrow` in 1: 0.weight"):
        Mask(model, torch.randn(2, 4)).make()


class _Narrow(nn.Module):
    def __init__(self, dim: int, length: int) -> None:
        super().__init__()
        self.dim, self.length = dim, length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.narrow(self.dim, 0, self.length)
