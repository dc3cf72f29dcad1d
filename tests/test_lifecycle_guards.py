"""Misuses of the Mask's lifecycle get a clear error and leave the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from maskprune.algorithms import L1Norm
from torch import nn

from maskprune import Mask


def convnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.randn(1, 3, 12, 12))
    return model.eval(), torch.randn(2, 3, 12, 12)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_an_algorithm_class_is_refused_in_the_constructor() -> None:
    model, x = convnet()
    with pytest.raises(
        TypeError, match=r"algorithm must be an instance, got the class L1Norm: pass algorithm=L1Norm\(\)"
    ):
        Mask(model, x, algorithm=L1Norm)
    assert hooks(model) == 0


def test_a_failure_inside_make_leaves_no_hook() -> None:
    class Failing(L1Norm):
        def attach(self, mask: Mask) -> None:
            raise RuntimeError("attach failed")

    model, x = convnet()
    before = copy.deepcopy(model.state_dict())
    mask = Mask(model, x, algorithm=Failing())
    with pytest.raises(RuntimeError, match="attach failed"):
        mask.make()
    assert hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit-exact: nothing was written
    Mask(model, x, algorithm=L1Norm()).make()  # the model is not taken


@pytest.mark.parametrize("semantics", ["frozen", "soft"])
def test_a_second_mask_on_a_masked_model_says_to_remove_the_first(semantics: str) -> None:
    model, x = convnet()
    first = Mask(model, x, algorithm=L1Norm(), semantics=semantics).make()
    first.do_mask()
    installed = hooks(model)
    with pytest.raises(RuntimeError, match=r"already masked by another Mask: call remove\(\) on that Mask first"):
        Mask(model, x, algorithm=L1Norm()).make()
    assert hooks(model) == installed
    first.remove()
    assert Mask(model, x, algorithm=L1Norm()).make().groups


def test_an_exported_in_place_model_can_be_masked_again() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm()).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model(inplace=True)
    assert [g.size for g in Mask(pruned, x).make().groups] == [4, 3]


def test_a_state_from_other_settings_is_refused_naming_the_difference() -> None:
    model, x = convnet()
    saved = Mask(model, x, algorithm=L1Norm(), ratio=0.6, steps=4).make()
    saved.do_mask()
    state, kept = saved.state_dict(), [g.kept for g in saved.groups]
    saved.remove()
    other = Mask(copy.deepcopy(model), x, algorithm=L1Norm(), ratio=0.2, steps=2).make()
    flags = other.selection.keep.copy()
    with pytest.raises(ValueError, match=r"saved by a Mask with ratio=0.6, steps=4; this one has ratio=0.2, steps=2"):
        other.load_state_dict(state)
    assert (other.selection.keep == flags).all() and other._pruner.step == 0
    same = Mask(copy.deepcopy(model), x, algorithm=L1Norm(), ratio=0.6, steps=4).make()
    same.load_state_dict(state)
    assert [g.kept for g in same.groups] == kept and kept != [g.size for g in same.groups]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_example_inputs_of_another_dtype_are_refused_in_make(dtype: torch.dtype) -> None:
    model, x = convnet()
    mask = Mask(model, x.to(dtype), algorithm=L1Norm())
    with pytest.raises(TypeError, match=rf"an example input is {dtype} but the model's parameters are torch.float32"):
        mask.make()
    assert hooks(model) == 0


def test_ratio_and_target_flops_together_are_an_error() -> None:
    model, x = convnet()
    with pytest.raises(ValueError, match=r"give ratio \(0.3\) or target_flops \(0.5\), not both"):
        Mask(model, x, ratio=0.3, target_flops=0.5)


def test_a_ratio_above_the_default_max_ratio_is_accepted() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.95).make()
    assert mask.settings.max_ratio == 0.95
    mask.do_mask()
    assert [g.kept for g in mask.groups] == [1, 1]
    with pytest.raises(ValueError, match=r"max_ratio \(0.9\) must be at least ratio \(0.95\)"):
        Mask(model, x, ratio=0.95, max_ratio=0.9)


def test_the_header_shows_the_target_in_use() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), target_flops=0.4)
    assert "target_flops=0.4, not made" in repr(mask)
    assert str(mask.make()).startswith("Mask(Sequential, L1Norm, target_flops=0.4): 2 groups")
    assert "ratio=0.5" in repr(Mask(copy.deepcopy(model), x))


def test_ignore_keeps_a_layers_outputs_and_prunes_its_inputs_freeze_keeps_everything() -> None:
    """``ignore=[model.fc]`` as Torch-Pruning's ``ignored_layers``: the classifier keeps its 1000 classes, its input
    columns follow layer4's channels; ``freeze=[model.fc]`` keeps its inputs too, and with them the last stage."""
    import torchvision

    x = torch.randn(1, 3, 64, 64)
    counts = {}
    for option in ("ignore", "freeze"):
        model = torchvision.models.resnet18()
        mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5, **{option: [model.fc]}).make()
        mask.do_mask()
        pruned = mask.generate_pruned_model()
        assert pruned.fc.out_features == 1000
        counts[option] = (pruned.fc.in_features, sum(p.numel() for p in pruned.parameters()))
        frozen = str(mask).split("Frozen", 1)[1]
        assert ("frozen by the user (fc): layer4.0.conv2.weight[0]" in frozen) == (option == "freeze"), frozen
    assert counts["ignore"] == (256, 3_055_880)
    assert counts["freeze"][0] == 512 and counts["freeze"][1] > 5_000_000


def test_an_ignored_norm_layer_keeps_all_its_channels() -> None:
    model, x = convnet()
    mask = Mask(model, x, ignore=[model[1]]).make()  # the BatchNorm after the first conv
    assert [g.size for g in mask.groups] == [6]  # the conv feeding it keeps its 8 channels too
