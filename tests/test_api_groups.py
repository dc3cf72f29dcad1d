"""Which channels go: criteria (Random, L1Norm computed independently with numpy), ignored modules, a user's
registered layer, and how groups are printed."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from _api import Build, assert_equal_models, pruned_positions
from maskprune.algorithms import L1Norm, Random
from torch import nn

import maskprune
from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


def member_names(mask: Mask) -> list[set[tuple[str, int]]]:
    return [{(m.name, m.dim) for m in g.members} for g in mask.groups]


def test_random_same_seed_same_channels_other_seed_other_channels(build: Build) -> None:
    def pruned_with(seed: int) -> list[list[int]]:
        model, inputs = build("resnet18")
        mask = Mask(model, inputs(1), algorithm=Random(seed=seed), ratio=0.5).make()
        mask.do_mask()
        return [g.pruned for g in mask.groups]

    first = pruned_with(0)
    assert first == pruned_with(0)
    assert first != pruned_with(1)


# ---- L1Norm: computed independently with numpy ---------------------------------------------------------------
def _filters_with_l1(l1: np.ndarray, in_channels: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random-sign filters whose L1 norm (sum of |w|) is exactly ``l1[i]`` for filter i, in float32."""
    shape = (len(l1), in_channels, k, k)
    w = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    w *= (l1 / np.abs(w).sum(axis=(1, 2, 3)))[:, None, None, None]
    return w.astype(np.float32)


def test_l1norm_prunes_the_lowest_l1_filters() -> None:
    rng = np.random.default_rng(0)
    l1 = np.array([3.0, 0.5, 2.0, 0.1, 5.0, 1.0, 4.0, 0.7])
    w1 = _filters_with_l1(l1, 2, 3, rng)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w1))
    w2 = model[2].weight.detach().clone()

    measured = np.abs(w1.astype(np.float64)).sum(axis=(1, 2, 3))
    drop = np.sort(np.argsort(measured)[:4])  # ratio 0.5 of 8 filters
    keep = np.setdiff1d(np.arange(8), drop)
    assert drop.tolist() == [1, 3, 5, 7]  # the construction of the weights itself

    x = torch.randn(2, 2, 6, 6)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    zero = (model[0].weight.detach().abs().sum((1, 2, 3)) == 0).numpy()
    assert np.flatnonzero(zero).tolist() == drop.tolist()

    pruned = mask.generate_pruned_model()
    # bit-exact: exported tensors are copies of the kept slices
    torch.testing.assert_close(pruned[0].weight, torch.from_numpy(w1[keep]), rtol=0, atol=0)
    torch.testing.assert_close(pruned[2].weight, w2[:, keep], rtol=0, atol=0)


def test_l1norm_sums_mean_normalised_producers_of_a_residual_group() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 6, 3, padding=1, bias=False)
            self.b = nn.Conv2d(2, 6, 1, bias=False)
            self.head = nn.Conv2d(6, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.a(x) + self.b(x)))

    rng = np.random.default_rng(1)
    la = np.array([1.0, 8.0, 3.0, 9.0, 2.0, 7.0])
    lb = np.array([50.0, 10.0, 40.0, 30.0, 60.0, 20.0])
    model = Residual().eval()
    with torch.no_grad():
        model.a.weight.copy_(torch.from_numpy(_filters_with_l1(la, 2, 3, rng)))
        model.b.weight.copy_(torch.from_numpy(_filters_with_l1(lb, 2, 1, rng)))
    wa = model.a.weight.detach().double().abs().sum((1, 2, 3)).numpy()
    wb = model.b.weight.detach().double().abs().sum((1, 2, 3)).numpy()
    expected = set(np.argsort(wa / wa.mean() + wb / wb.mean())[:3].tolist())
    assert expected != set(np.argsort(wa + wb)[:3].tolist())  # the normalisation matters for these weights

    mask = Mask(model, torch.randn(1, 2, 5, 5), algorithm=L1Norm(), ratio=0.5).make()
    (group,) = mask.groups
    mask.do_mask()
    producer = next(m for m in group.members if m.name == "a.weight" and m.dim == 0)
    assert set(pruned_positions(group, producer).tolist()) == expected


@pytest.mark.parametrize("how", ["name", "module"])
def test_ignored_modules_keep_their_channels(how: str, tiny_cnn) -> None:
    model = tiny_cnn()
    full = Mask(copy.deepcopy(model), torch.randn(1, 3, 16, 16)).make()
    assert any(("conv1.weight", 0) in g for g in member_names(full))
    mask = Mask(model, torch.randn(1, 3, 16, 16), ignore=["conv1"] if how == "name" else [model.conv1]).make()
    assert len(mask.groups) == len(full.groups) - 1
    assert not any(("conv1.weight", 0) in g for g in member_names(mask))
    assert "ignored by the user (conv1)" in str(mask).split("Frozen", 1)[1]


# ---- reports ----------------------------------------------------------------------------------------------
def test_print_mask_lists_groups_kept_total_and_frozen(build: Build, capsys) -> None:
    model, inputs = build("resnet18")
    mask = Mask(model, inputs(1), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    print(mask)
    text = capsys.readouterr().out
    kept, total = sum(g.kept for g in mask.groups), sum(g.size for g in mask.groups)
    assert f"{len(mask.groups)} groups, {kept}/{total} channels kept" in text
    for group in mask.groups:
        assert f"{group.kept}/{group.size}" in text
    frozen = text.split("Frozen", 1)
    assert len(frozen) == 2 and "fc.weight[0]" in frozen[1] and "model output" in frozen[1]


def test_str_group_is_a_table_of_members(tiny_cnn) -> None:
    mask = Mask(tiny_cnn(), torch.randn(1, 3, 16, 16), algorithm=L1Norm()).make()
    group = mask.groups[0]
    lines = str(group).splitlines()
    assert lines[0].startswith(f"Group 0: {group.kept}/{group.size}")
    assert lines[1].split()[:4] == ["module", "tensor", "dim", "role"]
    rows = [line.split()[:4] for line in lines[2:]]
    assert ["conv1", "weight", "0", "producer"] in rows
    assert ["bn1", "bias", "0", "norm"] in rows
    assert ["conv2", "weight", "1", "consumer"] in rows


# ---- a user's registered layer --------------------------------------------------------------------------
class ScaledLinear(nn.Module):
    """A linear layer scaled per output channel through an op the tracer does not know (einsum)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.inner = nn.Linear(a, b)
        self.scale = nn.Parameter(torch.rand(b) + 0.5)
        self.bias = nn.Parameter(torch.randn(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...i,i->...i", self.inner(x), self.scale) + self.bias


SCALED_LINEAR_RULE = maskprune.LayerRule(
    inputs={0: {-1: "in"}},
    outputs={0: {-1: "out"}},
    params={"inner.weight": {0: "out", 1: "in"}, "inner.bias": {0: "out"}, "scale": {0: "out"}, "bias": {0: "out"}},
    roles={"out": "producer", "in": "consumer"},
)


def scaled_linear_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), ScaledLinear(8, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def test_unregistered_layer_with_unknown_op_is_frozen() -> None:
    model = scaled_linear_model()
    mask = Mask(model, torch.randn(4, 6), algorithm=L1Norm(), ratio=0.5).make()
    groups = member_names(mask)
    assert not any(("2.scale", 0) in g or ("2.inner.weight", 0) in g or ("4.weight", 1) in g for g in groups)
    assert any(("0.weight", 0) in g for g in groups)  # its input side is still prunable
    text = str(mask)
    assert "einsum" in text and "2.inner.weight[0]" in text.split("Frozen", 1)[1]
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert pruned[2].scale.shape == (10,) and pruned[2].inner.out_features == 10


@pytest.fixture
def registered_scaled_linear() -> Iterator[None]:
    maskprune.register(ScaledLinear, SCALED_LINEAR_RULE)
    try:
        yield
    finally:
        maskprune.unregister(ScaledLinear)


def test_registered_layer_is_pruned_with_its_neighbours(registered_scaled_linear) -> None:
    model = scaled_linear_model()
    mask = Mask(model, torch.randn(4, 6), algorithm=L1Norm(), ratio=0.5).make()
    groups = member_names(mask)
    assert {("2.inner.weight", 0), ("2.inner.bias", 0), ("2.scale", 0), ("2.bias", 0), ("4.weight", 1)} in groups
    assert any({("0.weight", 0), ("2.inner.weight", 1)} <= g for g in groups)
    assert mask.do_mask()

    pruned = mask.generate_pruned_model()
    assert_equal_models(model, pruned, torch.randn(7, 6))
    layer = pruned[2]
    assert type(layer) is ScaledLinear and type(layer.inner) is nn.Linear
    assert layer.scale.shape == layer.bias.shape == (5,)
    assert layer.inner.weight.shape == (5, 4) and (layer.inner.out_features, layer.inner.in_features) == (5, 4)
    assert pruned[0].out_features == 4 and pruned[4].in_features == 5
    assert isinstance(layer.scale, nn.Parameter) and isinstance(layer.bias, nn.Parameter)
