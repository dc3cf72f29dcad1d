"""GroupMagnitude and LAMP against independent numpy computations on a group with producers, consumers and norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from maskprune.algorithms import LAMP, GroupMagnitude
from maskprune.algorithms.lamp import lamp_scores
from torch import nn

from maskprune import Mask, verify
from maskprune.testing import randomize_norms


class TwoBranches(nn.Module):
    """Two conv-BN branches summed (two producers, two norm scales), read by a conv and a linear head.

    The head reads the channels flattened over a 2x2 map, so each channel owns four of its columns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv_b, self.bn_b = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.conv_out = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(6 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))
        return self.conv_out(y).mean((2, 3)).sum(1, keepdim=True) + self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def tiny() -> tuple[TwoBranches, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = randomize_norms(TwoBranches()).eval()
        return model, torch.randn(2, 3, 6, 6)


def the_group(model: nn.Module, x: torch.Tensor, algorithm=None) -> tuple[Mask, object]:
    mask = Mask(model, x, algorithm=algorithm, ratio=0.5).make()
    (group,) = [g for g in mask.groups if any(m.name == "conv_a.weight" for m in g.members)]
    roles = sorted((m.name, m.role) for m in group.members)
    assert roles == [
        ("bn_a.bias", "norm"),
        ("bn_a.weight", "norm"),
        ("bn_b.bias", "norm"),
        ("bn_b.weight", "norm"),
        ("conv_a.weight", "producer"),
        ("conv_b.weight", "producer"),
        ("conv_out.weight", "consumer"),
        ("head.weight", "consumer"),
    ]
    return mask, group


def member_values(model: TwoBranches, p: int, include_norms: bool) -> list[np.ndarray]:
    """sum |w|^p per channel of each member, from the weights alone."""
    conv_a, conv_b = (m.weight.detach().double().numpy() for m in (model.conv_a, model.conv_b))
    conv_out, head = model.conv_out.weight.detach().double().numpy(), model.head.weight.detach().double().numpy()
    values = [
        (np.abs(conv_a) ** p).sum((1, 2, 3)),
        (np.abs(conv_b) ** p).sum((1, 2, 3)),
        (np.abs(conv_out) ** p).sum((0, 2, 3)),
        (np.abs(head) ** p).sum(0).reshape(6, 4).sum(1),  # flatten order: channel-major, four columns each
    ]
    if include_norms:
        values += [np.abs(bn.weight.detach().double().numpy()) ** p for bn in (model.bn_a, model.bn_b)]
    return values


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("include_norms", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_group_magnitude_matches_numpy(p: int, include_norms: bool, reduction: str) -> None:
    model, x = tiny()
    _, group = the_group(model, x)
    normalised = np.stack([v / v.mean() for v in member_values(model, p, include_norms)])
    expected = {"mean": normalised.mean(0), "sum": normalised.sum(0), "max": normalised.max(0)}[reduction]
    got = GroupMagnitude(p, include_norms=include_norms, reduction=reduction).score(group)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_group_magnitude_normalises_over_the_kept_channels() -> None:
    model, x = tiny()
    mask, group = the_group(model, x, GroupMagnitude())
    group.prune([1, 4])  # frozen semantics: their slices are zeroed
    keep = group.keep
    assert keep.tolist() == [True, False, True, True, False, True]
    values = member_values(model, 2, include_norms=True)
    assert all(np.all(v[~keep] == 0) for v in values)  # the masks zeroed every member's slice
    expected = np.mean([v / v[keep].mean() for v in values], 0)
    np.testing.assert_allclose(GroupMagnitude().score(group).numpy(), expected, rtol=1e-9)


def numpy_lamp(squared: np.ndarray) -> np.ndarray:
    return np.array([s / squared[squared >= s].sum() if squared[squared >= s].sum() > 0 else 0.0 for s in squared])


def test_lamp_scores_by_the_definition_with_ties() -> None:
    squared = torch.tensor([1.0, 2.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    np.testing.assert_allclose(lamp_scores(squared).numpy(), [1 / 8, 2 / 7, 2 / 7, 1.0, 0.0])
    rng = np.random.default_rng(0)
    values = rng.random(50) ** 3
    np.testing.assert_allclose(lamp_scores(torch.from_numpy(values)).numpy(), numpy_lamp(values), rtol=1e-12)
    assert lamp_scores(torch.zeros(3, dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("include_consumers", [False, True])
def test_lamp_matches_numpy_per_layer_then_mean(include_consumers: bool) -> None:
    model, x = tiny()
    _, group = the_group(model, x)
    values = member_values(model, 2, include_norms=False)
    scored = values if include_consumers else values[:2]
    expected = np.mean([numpy_lamp(v) for v in scored], 0)
    got = LAMP(include_consumers=include_consumers).score(group)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    assert got.max() <= 1 and got.min() > 0


@pytest.mark.parametrize(
    "algorithm, allocation",
    [
        (GroupMagnitude(p=1), "uniform"),
        (GroupMagnitude(p=2, reduction="max"), "global"),
        (LAMP(), "uniform"),
        (LAMP(include_consumers=True), "global"),
    ],
    ids=repr,
)
def test_pruning_with_each_exports_exactly(algorithm, allocation: str) -> None:
    model, x = tiny()
    mask = Mask(model, x, algorithm=algorithm, ratio=0.5, allocation=allocation).make()
    assert mask.do_mask()
    kept, total = mask.sparsity().channels
    assert kept < total
    pruned = mask.generate_pruned_model()  # verifies soft == hard on x
    result = verify(model, pruned, torch.randn(3, 3, 6, 6))
    assert result.ok and result.scale > 0, result


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        GroupMagnitude(p=3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        GroupMagnitude(reduction="prod")
    with pytest.raises(ValueError, match="reduction must be one of"):
        LAMP(reduction="first")
