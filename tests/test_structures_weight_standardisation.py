"""Weight-standardised convs (timm's StdConv2d, ScaledStdConv2d and their Same variants) and EvoNorm layers: pruned
exactly, the standardisation's statistics over kept input channels, EvoNorm's statistics over whole kept groups."""

from __future__ import annotations

import pytest
import timm
import torch
from _structures import IMAGES, G, assert_soft_equals_hard, found, member
from maskprune.algorithms import L1Norm
from timm.layers import (
    EvoNorm2dB0,
    EvoNorm2dS0,
    EvoNorm2dS0a,
    EvoNorm2dS1,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from torch import nn

import maskprune
from maskprune import Mask, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(model: nn.Module) -> nn.Module:
    """Gains, norm weights and biases away from their initial ones and zeros, so that every tensor matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("weight") or p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _std_stack() -> nn.Sequential:
    return _randomised(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            StdConv2d(8, 6, 3, bias=True),
            nn.ReLU(),
            ScaledStdConv2d(6, 4, 3, gamma=1.7),
        )
    )


# ---- weight-standardised convs -------------------------------------------------------------------
def test_standardised_convs_group_their_input_channels() -> None:
    model = _std_stack()
    mask = Mask(model, torch.randn(2, 3, 8, 8)).make()
    assert found(mask) == {
        G(8, "0.weight[0]", "0.bias[0]", "2.weight[1]"),
        G(6, "2.weight[0]", "2.bias[0]", "4.weight[1]"),
    }


def test_input_channels_of_standardised_convs_prune_exactly() -> None:
    model = _std_stack()
    scale = model[4].scale
    mask = Mask(model, torch.randn(2, 3, 8, 8)).make()
    mask.groups[0].prune([0, 3, 4])
    mask.groups[1].prune([1, 5])
    pruned = assert_soft_equals_hard(mask, model, torch.randn(2, 3, 8, 8), IMAGES())
    assert (pruned[2].in_channels, pruned[2].out_channels, pruned[4].in_channels) == (5, 4, 4)
    assert tuple(pruned[4].weight.shape) == (4, 4, 3, 3) and tuple(pruned[4].gain.shape) == (4, 1, 1, 1)
    assert pruned[4].scale == scale  # bit-exact: the export keeps the number the masked forward used


def test_masked_standardisation_is_over_kept_inputs_only() -> None:
    """The masked layer computes a layer built of the kept columns on the kept channels; its own forward over the
    zeroed columns (the statistics counting them) would not."""
    model = _std_stack()
    x = torch.randn(2, 3, 8, 8)
    mask = Mask(model, x).make()
    mask.groups[0].prune([0, 3, 4])
    kept = [1, 2, 5, 6, 7]
    conv = model[2]
    small = StdConv2d(5, 6, 3, bias=True)
    with torch.no_grad():
        small.weight.copy_(conv.weight[:, kept])
        small.bias.copy_(conv.bias)
        h = model[1](model[0](x))
        masked, unhooked = conv(h), type(conv).forward(conv, h)
        expected = small(h[:, kept])
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
    assert (unhooked - expected).abs().max() > 1e-2


def test_removed_input_columns_get_no_gradient() -> None:
    """Training the masked model: the standardisation over kept inputs leaves the removed columns out of the graph."""
    model = _std_stack()
    mask = Mask(model, torch.randn(2, 3, 8, 8)).make()
    mask.groups[1].prune([1, 5])
    model.train()
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    grad = model[4].weight.grad
    assert torch.isfinite(grad).all() and grad[:, [0, 2, 3, 4]].abs().sum() > 0
    assert not grad[:, [1, 5]].any()  # bit-exact: index_select's backward writes nothing to the removed columns


@pytest.mark.parametrize("same", [StdConv2dSame, ScaledStdConv2dSame])
def test_same_padded_standardised_convs_prune_exactly(same: type[nn.Conv2d]) -> None:
    """Their forward pads the input by its size (stride 2): the masked layer runs that forward too."""
    model = _randomised(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), same(8, 4, 3, stride=2), nn.Flatten()))
    mask = Mask(model, torch.randn(2, 3, 9, 9)).make()
    mask.groups[0].prune([1, 2, 6])
    pruned = assert_soft_equals_hard(mask, model, torch.randn(2, 3, 9, 9), [torch.randn(3, 3, 9, 9)])
    assert pruned[2].in_channels == 5


def test_grouped_standardised_conv_prunes_whole_conv_groups() -> None:
    model = _randomised(nn.Sequential(nn.Conv2d(3, 8, 1), StdConv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)))
    mask = Mask(model, torch.randn(2, 3, 8, 8)).make()
    group = next(g for g in mask.groups if any(m.name == "1.weight" and m.dim == 0 for m in g.members))
    assert member(group, "0.weight", 0).units.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    group.prune([1])
    pruned = assert_soft_equals_hard(mask, model, torch.randn(2, 3, 8, 8), IMAGES())
    assert (pruned[1].in_channels, pruned[1].out_channels, pruned[1].groups) == (4, 4, 1)


# ---- EvoNorm layers ------------------------------------------------------------------------------
def _evo_stack(norm: nn.Module) -> nn.Sequential:
    model = _randomised(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 3)))
    model.train()
    model(torch.randn(4, 3, 8, 8))  # a running variance of its own (B0)
    return model.eval()


@pytest.mark.parametrize(
    ("norm", "units", "removed", "groups"),
    [
        (lambda: EvoNorm2dS0(8, groups=4), [0, 0, 1, 1, 2, 2, 3, 3], [1, 2], 2),
        (lambda: EvoNorm2dS0a(8, group_size=4), [0, 0, 0, 0, 1, 1, 1, 1], [0], 1),
        (lambda: EvoNorm2dS1(8, groups=2), [0, 0, 0, 0, 1, 1, 1, 1], [1], 1),
        (lambda: EvoNorm2dB0(8), list(range(8)), [0, 2, 5, 6], None),
    ],
    ids=["S0", "S0a", "S1", "B0"],
)
def test_evo_norms_prune_whole_groups_exactly(norm, units: list[int], removed: list[int], groups: int | None) -> None:
    """The S variants' units are whole norm groups (the export sets ``groups``); B0's statistics are per channel."""
    model = _evo_stack(norm())
    mask = Mask(model, torch.randn(2, 3, 8, 8)).make()
    (group,) = mask.groups
    tensors = {f"{m.name}[{m.dim}]" for m in group.members}
    assert {"1.weight[0]", "1.bias[0]"} <= tensors and ("1.v[0]" in tensors) == (not isinstance(model[1], EvoNorm2dS1))
    assert member(group, "1.weight", 0).units.tolist() == units
    group.prune(removed)
    pruned = assert_soft_equals_hard(mask, model, torch.randn(2, 3, 8, 8), IMAGES())
    assert {key: tuple(t.shape) for key, t in pruned[1].state_dict().items()} == {
        key: (4,) for key in model[1].state_dict()
    }  # weight, bias, v, running_var (B0)
    assert pruned[2].in_channels == 4
    assert getattr(pruned[1], "groups", None) == groups


def test_evo_norm_group_cannot_lose_part_of_its_channels() -> None:
    model = _evo_stack(EvoNorm2dS0(8, groups=2))
    (group,) = Mask(model, torch.randn(2, 3, 8, 8)).make().groups
    assert group.size == 2  # one unit per norm group of four channels


# ---- timm models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nf_resnet26", "resnetv2_50x1_bit", "resnetv2_50d_evos"])
def test_timm_families_prune_exactly(name: str) -> None:
    """NF-ResNets (ScaledStdConv2d), BiT (StdConv2d, GroupNorm) and an EvoNorm ResNet."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.3).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert count_parameters(pruned) < 0.7 * count_parameters(model)
    for inputs in (x, torch.randn(2, 3, 64, 64)):
        result = maskprune.verify(model, pruned, inputs)
        assert result.problem is None and result.max_rel <= 1e-5, str(result)
