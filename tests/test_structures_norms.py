"""Norm layers: statistics over kept channels, the exported norm's width, norm groups as units."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _structures import FRESH, IMAGES, TOKENS, G, assert_soft_equals_hard, found, group_of, make
from torch import nn

import maskprune
from maskprune import Mask
from maskprune.testing import TINY_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- layers whose attributes follow their sliced tensors ---------------------------------------
def test_layer_norm_uses_masked_statistics() -> None:
    mask, model, inputs = make("layer_norm")
    mask.groups[0].prune([0, 5, 6])
    pruned = assert_soft_equals_hard(mask, model, inputs, TOKENS())
    assert pruned.norm.normalized_shape == (5,)


def test_masked_layer_norm_computes_the_exported_norm_exactly() -> None:
    """Eager masked forwards normalise the gathered kept channels as the export does, zero elsewhere.

    The same values up to float rounding only: the masked ``fc`` computes 8 columns and the exported one 5, and a
    BLAS kernel may round differently for other widths (by 6e-8 on AMD EPYC, which moves the norm by 1.2e-7)."""
    mask, model, inputs = make("layer_norm")
    mask.groups[0].prune([0, 5, 6])
    pruned = mask.generate_pruned_model()
    with torch.no_grad():
        soft, hard = model.norm(model.fc(inputs)), pruned.norm(pruned.fc(inputs))
    kept = [1, 2, 3, 4, 7]
    torch.testing.assert_close(soft[..., kept], hard, rtol=1e-6, atol=1e-6)
    assert not soft[..., [0, 5, 6]].any()  # bit-exact: removed channels' norm weight and bias are exactly zero
    with torch.no_grad():  # the 0/1 flags, as compiled graphs use them
        x, norm = model.fc(inputs), model.norm
        by_flags = maskprune.masked_norm(x, 2, mask.groups[0].mask, norm.weight, norm.bias, norm.eps, "layer_norm")
    torch.testing.assert_close(by_flags, soft, rtol=1e-6, atol=1e-6)


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
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(norm.weight, model.body[0].weight[[0, 1, 6, 7]])


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


def test_rms_norm_module_statistics_over_kept_channels() -> None:
    mask, model, inputs = make("rms_norm_hidden")
    hidden = group_of(mask, "embed.weight", 1)
    hidden.prune([0, 3, 5])
    x = model.embed(inputs)
    masked_norm = model.norm1(x)  # the masked model: the embedding's columns 0, 3, 5 are zero
    kept = [1, 2, 4, 6, 7]
    expected = model.norm1.weight[kept] * x[..., kept] * torch.rsqrt(x[..., kept].pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(masked_norm[..., kept], expected)
    # bit-exact: the embedding's removed columns are exact zeros, and so are their norm's outputs
    assert not masked_norm[..., [0, 3, 5]].any()
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["rms_norm_hidden"]())
    assert pruned.norm1.weight.shape == (5,) and pruned.embed.embedding_dim == 5
