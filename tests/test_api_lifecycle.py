"""The masked model's lifecycle: ``make()`` changes nothing, training flags come back, ``remove()`` takes every hook
off, training keeps removed channels zero; the forms of example inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from _api import Build, assert_equal_models, pruned_positions, run
from maskprune.algorithms import L1Norm, Uniform
from torch import nn

import maskprune
import maskprune._walk
from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ---- the masked model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_make_changes_no_name_shape_or_value(train: bool, tiny_cnn) -> None:
    model = tiny_cnn().train(train)
    x = torch.randn(4, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    rng = torch.get_rng_state()

    Mask(model, x, algorithm=L1Norm()).make()

    assert torch.equal(torch.get_rng_state(), rng), "make() consumed random numbers (dropout in train mode)"
    after = model.state_dict()
    assert list(after) == list(state)
    assert [n for n, _ in model.named_parameters()] == names
    for key, value in state.items():
        # bit-exact: compared with a copy taken before, and nothing may write to it
        assert torch.equal(after[key], value), f"make() changed {key}"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_lifecycle_preserves_every_training_flag(train: bool, tiny_cnn) -> None:
    model = tiny_cnn().train(train)
    model.bn2.train(not train)  # a mixed model: every flag must come back as it was
    flags = modes(model)
    mask = Mask(model, torch.randn(2, 3, 16, 16), algorithm=L1Norm()).make()
    assert modes(model) == flags
    mask.do_mask()
    assert modes(model) == flags
    pruned = mask.generate_pruned_model()
    assert modes(model) == flags and modes(pruned) == flags


class CachesOnTrain(nn.Module):
    """Rebuilds a cache in ``train()`` whatever the mode was (as timm's LeViT attention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Dropout()
        self.calls: list[bool] = []

    def train(self, mode: bool = True) -> CachesOnTrain:
        self.calls.append(mode)
        return super().train(mode)


@pytest.mark.parametrize("mode", [False, True], ids=["eval", "train"])
def test_set_mode_sets_the_flags_train_sets_and_calls_overrides(mode: bool) -> None:
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), shared, nn.Sequential(shared, CachesOnTrain()), CachesOnTrain())
    model[0].train(not mode)  # mixed flags: set_mode writes only the ones that differ
    reference = copy.deepcopy(model).train(mode)
    maskprune._walk.set_mode(model, mode)
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
    assert all(m.training == mode for m in model.modules())
    assert model[2][1].calls == [mode] and model[3].calls == [mode]  # called also where the mode did not change


class LayerNormMLP(nn.Module):
    """A LayerNorm over prunable channels: its mask needs a hook of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


@pytest.mark.parametrize("kind", ["cnn", "layer_norm"])
def test_remove_takes_every_hook_off_and_keeps_the_weights(kind: str, tiny_cnn, leftover_hooks) -> None:
    model, x = (tiny_cnn(), torch.randn(2, 3, 16, 16)) if kind == "cnn" else (LayerNormMLP().eval(), torch.randn(4, 6))
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    assert leftover_hooks(model)  # the mask is installed
    masked_out = run(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    mask.remove()

    assert leftover_hooks(model) == []
    for key, value in model.state_dict().items():
        # bit-exact: compared with a copy taken before, and nothing may write to it
        assert torch.equal(value, weights[key]), f"remove() changed {key}"
    if kind == "cnn":  # no hook computed anything, so the plain forward is the masked one
        # bit-exact: the same weights, kernels and shapes
        torch.testing.assert_close(run(model, x), masked_out, rtol=0, atol=0)


def test_training_the_masked_model_keeps_removed_channels_zero(tiny_cnn) -> None:
    model = tiny_cnn().train()
    mask = Mask(model, torch.randn(4, 3, 16, 16), algorithm=L1Norm(), ratio=0.5).make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out.detach()))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
    ]

    def step() -> None:
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)

    step()  # momentum from unmasked steps pushes removed weights away from zero: the mask must win
    assert mask.do_mask()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    checked = 0
    for _ in range(3):
        step()
        for group in mask.groups:
            for member in group.members:
                if member.dim == 0 and member.module in outputs and member.role in ("producer", "norm"):
                    channels = torch.as_tensor(pruned_positions(group, member))
                    # bit-exact: removed channels' weights, biases and norm parameters are exact zeros
                    assert torch.count_nonzero(outputs[member.module][:, channels]) == 0, member.name
                    checked += 1
    assert checked >= 9
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters()), "nothing trained"
    for handle in handles:
        handle.remove()

    pruned = mask.generate_pruned_model()
    assert_equal_models(model, pruned, torch.randn(3, 3, 16, 16))
    assert model.training


# ---- inputs -----------------------------------------------------------------------------------------------
def test_input_shape_shorthand(tiny_cnn) -> None:
    model = tiny_cnn()
    mask = Mask(model, input_shape=(2, 3, 16, 16), algorithm=L1Norm()).make()
    assert isinstance(mask.example_inputs, torch.Tensor) and mask.example_inputs.shape == (2, 3, 16, 16)
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert_equal_models(model, pruned, torch.randn(5, 3, 16, 16))


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(4, 8)
        self.extra = nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, image: torch.Tensor, *, extra: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.image(image) + self.extra(extra)))


def test_dict_inputs_are_keyword_arguments() -> None:
    model = KeywordModel().eval()

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        return {"image": torch.randn(batch, 4), "extra": torch.randn(batch, 2)}

    mask = Mask(model, inputs(3), algorithm=L1Norm(), ratio=0.5).make()
    assert [g.size for g in mask.groups] == [8]
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert pruned.image.out_features == pruned.extra.out_features == pruned.head.in_features == 4
    assert_equal_models(model, pruned, inputs(5))


def test_meta_device_model(build: Build) -> None:
    model = torchvision.models.resnet18(weights=None).to("meta")
    mask = Mask(model, torch.randn(2, 3, 32, 32, device="meta"), algorithm=Uniform(seed=0), ratio=0.5).make()
    real, inputs = build("resnet18")
    assert [g.size for g in mask.groups] == [g.size for g in Mask(real, inputs(1)).make().groups]
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert mask.do_mask()

    pruned = mask.generate_pruned_model(verify=False)
    assert all(t.is_meta for t in [*pruned.parameters(), *pruned.buffers()])
    assert pruned.conv1.weight.shape == (32, 3, 7, 7)
    assert pruned.fc.weight.shape == (1000, 256)
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
