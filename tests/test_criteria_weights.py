"""Weight criteria (FPGM, L1/L2 norm, BN scale) and the random baselines, against independent numpy/scipy.

Every expected value is computed here from the model's tensors with numpy and
``scipy.spatial.distance.cdist``, never with the criteria's own helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from maskprune.algorithms import FPGM, BNScale, L1Norm, L2Norm, Random, Uniform
from maskprune.algorithms.fpgm import survivor_count
from scipy.spatial.distance import cdist
from torch import nn

from maskprune import Group, Mask
from maskprune.testing import TINY_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = {"l2": "euclidean", "l1": "cityblock", "cosine": "cosine"}


# ---- helpers -----------------------------------------------------------------------------------------------
def groups_of(model: nn.Module, inputs: object) -> list[Group]:
    return Mask(model, inputs).make().groups


def group_with(groups: Sequence[Group], name: str) -> Group:
    """The group in which tensor ``name`` (e.g. "conv1.weight") produces the channels."""
    found = [g for g in groups if any(m.name == name and m.role == "producer" for m in g.members)]
    assert len(found) == 1, f"{name} produces {len(found)} groups: {[str(g) for g in groups]}"
    return found[0]


def tiny(name: str) -> tuple[nn.Module, list[Group]]:
    model, inputs = TINY_MODELS[name]()
    return model, groups_of(model, inputs)


def rows(tensor: torch.Tensor) -> np.ndarray:
    """One flattened filter per output channel (dim 0)."""
    w = tensor.detach().double().numpy()
    return w.reshape(w.shape[0], -1)


def scores_of(criterion: object, group: Group) -> np.ndarray:
    return criterion.score(group).detach().cpu().double().numpy()


def reduce(per_member: Sequence[np.ndarray], reduction: str) -> np.ndarray:
    """Mean-normalise each member's scores, then reduce across members."""
    stacked = np.stack([s / s.mean() for s in per_member])
    return {"sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.max(0)}[reduction]


def fpgm_expected(
    mats: Sequence[np.ndarray], distance: str, reduction: str, keep: np.ndarray, rate_norm: float = 1.0
) -> np.ndarray:
    """FPGM as specified: distance sums among kept (and norm-surviving) channels, per member, combined."""
    kept = np.flatnonzero(keep)
    out = np.zeros(len(keep))
    survivors = kept
    if rate_norm < 1:
        norms = reduce([np.linalg.norm(m[kept], axis=1) for m in mats], reduction)
        top = np.argsort(-norms, kind="stable")[: math.ceil(rate_norm * len(kept))]
        inside = np.isin(np.arange(len(kept)), top)
        out[kept[~inside]] = -1.0 / (1.0 + norms[~inside])
        survivors = kept[inside]
    sums = [cdist(m[survivors], m[survivors], METRICS[distance]).sum(1) for m in mats]
    out[survivors] = reduce(sums, reduction)
    return out


class Fixed(nn.Module):
    """``fc (3 -> 5) -> relu -> head``: five filters in R^3 set by the test."""

    def __init__(self, filters: Sequence[Sequence[float]]) -> None:
        super().__init__()
        self.fc = nn.Linear(3, len(filters))
        self.head = nn.Linear(len(filters), 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(filters))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


# each metric ranks a different filter lowest (l2: 1, l1: 2, cosine: 4)
SPREAD = [[-2.0, 1.0, -3.0], [0.0, 1.0, -1.0], [1.0, 1.0, 3.0], [2.0, -2.0, 3.0], [-2.0, 2.0, 2.0]]


# ---- FPGM --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", list(METRICS))
def test_fpgm_one_producer_matches_cdist(distance: str) -> None:
    model, groups = tiny("conv2d")
    group = group_with(groups, "conv1.weight")
    expected = fpgm_expected([rows(model.conv1.weight)], distance, "sum", np.ones(group.size, dtype=bool))
    np.testing.assert_allclose(scores_of(FPGM(distance=distance), group), expected, rtol=1e-9)
    assert not FPGM.comparable_across_groups


@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
@pytest.mark.parametrize("distance", list(METRICS))
def test_fpgm_coupled_producers_of_a_residual_sum(distance: str, reduction: str) -> None:
    model, groups = tiny("residual_add")
    group = group_with(groups, "branch2.weight")
    assert {m.name for m in group.producers()} == {"stem.weight", "branch2.weight"}
    mats = [rows(model.stem.weight), rows(model.branch2.weight)]
    expected = fpgm_expected(mats, distance, reduction, np.ones(group.size, dtype=bool))
    np.testing.assert_allclose(scores_of(FPGM(distance=distance, reduction=reduction), group), expected, rtol=1e-9)


@pytest.mark.parametrize("distance", list(METRICS))
def test_fpgm_concatenates_the_positions_of_a_channel(distance: str) -> None:
    """A conv channel flattened into 16 linear features: its 16 columns of fc.weight are one filter."""
    model, groups = tiny("flatten_linear")
    group = group_with(groups, "conv.weight")
    fc_columns = model.fc.weight.detach().double().numpy().T  # (64 features, 8 outputs), 16 features per channel
    mats = [rows(model.conv.weight), fc_columns.reshape(4, -1)]
    expected = fpgm_expected(mats, distance, "sum", np.ones(4, dtype=bool))
    np.testing.assert_allclose(scores_of(FPGM(distance=distance, include_consumers=True), group), expected, rtol=1e-9)


def test_fpgm_whole_conv_groups_are_one_filter() -> None:
    """Two channels that are whole conv groups (4 and 6 positions each) of two coupled producers."""
    model, groups = tiny("grouped_conv")
    group = group_with(groups, "gconv.weight")
    mats = [rows(model.expand.weight).reshape(2, -1), rows(model.gconv.weight).reshape(2, -1)]
    expected = fpgm_expected(mats, "l2", "sum", np.ones(2, dtype=bool))
    np.testing.assert_allclose(scores_of(FPGM(), group), expected, rtol=1e-9)


@pytest.mark.parametrize("distance", list(METRICS))
def test_fpgm_scores_only_kept_channels(distance: str) -> None:
    model, groups = tiny("residual_add")
    group = group_with(groups, "stem.weight")
    group.prune([1, 4, 6])
    keep = group.keep
    criterion = FPGM(distance=distance)
    scores = scores_of(criterion, group)
    mats = [rows(model.stem.weight), rows(model.branch2.weight)]
    np.testing.assert_allclose(scores, fpgm_expected(mats, distance, "sum", keep), rtol=1e-9)
    # bit-exact: removed channels are given 0, not computed
    assert (scores[~keep] == 0).all()

    with torch.no_grad():  # removed filters take no part in the others' sums, whatever their weights
        model.stem.weight[[1, 4, 6]] = 100.0
    np.testing.assert_allclose(scores_of(criterion, group)[keep], scores[keep], rtol=1e-12)


@pytest.mark.parametrize(
    ("name", "producer", "rate_norm"), [("conv2d", "conv1.weight", 0.5), ("residual_add", "stem.weight", 0.7)]
)
@pytest.mark.parametrize("distance", list(METRICS))
def test_fpgm_two_stage_norm_then_distance(name: str, producer: str, rate_norm: float, distance: str) -> None:
    model, groups = tiny(name)
    group = group_with(groups, producer)
    mats = [rows(m.tensor) for m in group.producers()]
    keep = np.ones(group.size, dtype=bool)
    scores = scores_of(FPGM(rate_norm=rate_norm, distance=distance), group)
    np.testing.assert_allclose(scores, fpgm_expected(mats, distance, "sum", keep, rate_norm), rtol=1e-9)

    survivors = math.ceil(rate_norm * group.size)
    norms = sum(np.linalg.norm(m, axis=1) / np.linalg.norm(m, axis=1).mean() for m in mats)
    by_norm = np.argsort(-norms)
    first_out = by_norm[survivors:]
    assert scores[first_out].max() < scores[by_norm[:survivors]].min()  # norm-pruned go first
    # bit-exact: integer orders; the float64 norms they order are nowhere near a tie
    np.testing.assert_array_equal(np.argsort(scores[first_out]), np.argsort(norms[first_out]))  # by norm
    assert (scores[first_out] < 0).all() and (scores[first_out] >= -1).all()


def test_fpgm_two_stage_counts_kept_channels_only() -> None:
    model, groups = tiny("conv2d")
    group = group_with(groups, "conv1.weight")
    group.prune([0, 3])
    keep = group.keep  # 6 kept: ceil(0.5 * 6) = 3 survive the norm stage
    scores = scores_of(FPGM(rate_norm=0.5), group)
    np.testing.assert_allclose(scores, fpgm_expected([rows(model.conv1.weight)], "l2", "sum", keep, 0.5), rtol=1e-9)
    # bit-exact: removed channels are given 0, not computed
    assert (scores > 0).sum() == 3 and (scores < 0).sum() == 3 and (scores[[0, 3]] == 0).all()


def test_fpgm_distances_rank_differently() -> None:
    """On one fixed set of filters, L2, L1 and cosine each prune a different filter first."""
    model = Fixed(SPREAD)
    group = group_with(groups_of(model, torch.randn(2, 3)), "fc.weight")
    first = {}
    for distance, metric in METRICS.items():
        scores = scores_of(FPGM(distance=distance), group)
        w = np.asarray(SPREAD)
        expected = cdist(w, w, metric).sum(1)
        np.testing.assert_allclose(scores, expected / expected.mean(), rtol=1e-9)
        first[distance] = int(np.argmin(scores))
    assert first == {"l2": 1, "l1": 2, "cosine": 4}


def test_fpgm_cosine_with_zero_filters() -> None:
    """A zero filter is at cosine distance 1 from every non-zero filter and 0 from another zero filter."""
    filters = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    group = group_with(groups_of(Fixed(filters), torch.randn(2, 3)), "fc.weight")
    w = np.asarray(filters)
    norms = np.linalg.norm(w, axis=1)
    zero = norms == 0
    unit = w / np.where(zero, 1.0, norms)[:, None]
    cos = np.where(zero[:, None] & zero[None, :], 1.0, unit @ unit.T)
    sums = (1.0 - cos).sum(1)  # [1 + 1 + 1 + (1 - 1/sqrt2), 3, ...]
    np.testing.assert_allclose(sums[1], 3.0)
    scores = scores_of(FPGM(distance="cosine"), group)
    np.testing.assert_allclose(scores, sums / sums.mean(), rtol=1e-9)
    assert np.isfinite(scores).all()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"distance": "euclidean"}, "'l2', 'l1', 'cosine'"),
        ({"reduction": "median"}, "'sum', 'mean', 'max'"),
        ({"rate_norm": 0.0}, "(0, 1]"),
        ({"rate_norm": 1.5}, "(0, 1]"),
        ({"rate_norm": True}, "(0, 1]"),
        ({"rate_norm": "0.5"}, "(0, 1]"),
    ],
)
def test_fpgm_rejects_bad_arguments(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        FPGM(**kwargs)


def test_survivor_count_has_no_float_noise() -> None:
    cases = {(0.07, 100): 7, (0.5, 7): 4, (0.01, 3): 1, (1.0, 9): 9}  # 0.07 * 100 is 7.000000000000001
    assert {case: survivor_count(*case) for case in cases} == cases


# ---- L1 / L2 norm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("criterion", "order"), [(L1Norm, 1), (L2Norm, 2)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
def test_norms_of_coupled_producers(criterion: Callable, order: int, reduction: str) -> None:
    model, groups = tiny("residual_add")
    group = group_with(groups, "stem.weight")
    norms = [np.linalg.norm(rows(m.weight), ord=order, axis=1) for m in (model.stem, model.branch2)]
    np.testing.assert_allclose(scores_of(criterion(reduction=reduction), group), reduce(norms, reduction), rtol=1e-6)


@pytest.mark.parametrize(("criterion", "order"), [(L1Norm, 1), (L2Norm, 2)])
def test_norms_of_a_channel_with_several_positions(criterion: Callable, order: int) -> None:
    """With consumers: a conv channel's 16 columns of fc.weight form one vector (the norm of their concatenation)."""
    model, groups = tiny("flatten_linear")
    group = group_with(groups, "conv.weight")
    fc = model.fc.weight.detach().double().numpy().T.reshape(4, -1)
    norms = [np.linalg.norm(rows(model.conv.weight), ord=order, axis=1), np.linalg.norm(fc, ord=order, axis=1)]
    scores = scores_of(criterion(include_consumers=True), group)
    np.testing.assert_allclose(scores, reduce(norms, "sum"), rtol=1e-6)


def test_l2_norm_is_the_filter_norm() -> None:
    model, groups = tiny("conv2d")
    group = group_with(groups, "conv1.weight")
    norms = np.sqrt((model.conv1.weight.detach().double().numpy() ** 2).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(scores_of(L2Norm(), group), norms / norms.mean(), rtol=1e-9)
    assert repr(L2Norm(reduction="max")) == "L2Norm(reduction='max')"
    with pytest.raises(ValueError, match="'sum', 'mean', 'max'"):
        L2Norm(reduction="l2")


# ---- Random / Uniform --------------------------------------------------------------------------------------
SIZES = np.array([8, 16, 64, 6, 32])


def test_random_group_weights_seeded_with_channel_weighted_mean_one() -> None:
    weights = Random(seed=0).group_weights(SIZES)
    assert weights.shape == (len(SIZES),) and (weights > 0).all()
    np.testing.assert_allclose((weights * SIZES).sum() / SIZES.sum(), 1.0, rtol=1e-12)
    # bit-exact: the same seed draws the same numbers
    np.testing.assert_array_equal(weights, Random(seed=0).group_weights(SIZES))  # another instance
    criterion = Random(seed=0)
    criterion.score(group_with(tiny("conv2d")[1], "conv1.weight"))  # scores draw from their own stream
    np.testing.assert_array_equal(criterion.group_weights(SIZES), weights)
    other = Random(seed=1).group_weights(SIZES)
    assert not np.allclose(weights, other)
    np.testing.assert_allclose((other * SIZES).sum() / SIZES.sum(), 1.0, rtol=1e-12)
    assert len(np.unique(weights)) == len(SIZES)  # really per group


@pytest.mark.parametrize("baseline", [Random, Uniform])
def test_seeded_channel_scores(baseline: Callable) -> None:
    _, groups = tiny("residual_add")

    def draws(seed: int) -> list[np.ndarray]:
        criterion = baseline(seed=seed)
        return [scores_of(criterion, g) for g in groups]

    first = draws(0)
    assert [len(s) for s in first] == [g.size for g in groups]
    for a, b in zip(first, draws(0), strict=True):
        # bit-exact: the same seed draws the same numbers
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, draws(1), strict=True))
    assert not np.array_equal(first[0][:6], first[1])  # every group draws anew


def test_uniform_has_the_same_ratio_everywhere() -> None:
    assert Uniform(seed=3).group_weights(SIZES) is None
    assert repr(Uniform(seed=3)) == "Uniform(seed=3)" and repr(Random(seed=2)) == "Random(seed=2)"


@pytest.mark.parametrize("baseline", [Random, Uniform])
@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_baselines_reject_bad_seeds(baseline: Callable, seed: object) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        baseline(seed=seed)


# ---- BN scale ----------------------------------------------------------------------------------------------
def test_bn_scale_is_abs_gamma(tiny_cnn: Callable) -> None:
    model = tiny_cnn()
    groups = groups_of(model, torch.randn(2, 3, 16, 16))
    gamma = model.bn1.weight.detach().double().numpy()
    assert (gamma < 0).any()  # the sign really is dropped
    np.testing.assert_allclose(scores_of(BNScale(), group_with(groups, "conv1.weight")), np.abs(gamma), rtol=1e-12)


def test_bn_scale_averages_coupled_batch_norms(tiny_cnn: Callable) -> None:
    model = tiny_cnn()
    group = group_with(groups_of(model, torch.randn(2, 3, 16, 16)), "conv2.weight")
    gammas = [bn.weight.detach().double().numpy() for bn in (model.bn2, model.bn3)]
    expected = (np.abs(gammas[0]) + np.abs(gammas[1])) / 2
    np.testing.assert_allclose(scores_of(BNScale(), group), expected, rtol=1e-12)
    assert BNScale.comparable_across_groups


def test_bn_scale_of_flattened_features_averages_their_gammas() -> None:
    """BatchNorm1d over a conv's flattened features: a channel owns 16 gammas."""

    class FlatBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm1d(64)
            self.fc = nn.Linear(64, 5)
            with torch.no_grad():
                self.bn.weight.normal_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bn(self.conv(x).flatten(1))))

    model = FlatBN().eval()
    group = group_with(groups_of(model, torch.randn(2, 3, 8, 8)), "conv.weight")
    expected = np.abs(model.bn.weight.detach().double().numpy()).reshape(4, 16).mean(1)
    np.testing.assert_allclose(scores_of(BNScale(), group), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["conv2d", "group_norm", "instance_norm2d", "residual_add"])
def test_bn_scale_declines_groups_without_batch_norm(name: str) -> None:
    _, groups = tiny(name)
    assert groups and all(BNScale().score(g) is None for g in groups)


def test_bn_scale_declines_batch_norm_without_affine() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    groups = groups_of(model, torch.randn(2, 3, 8, 8))
    assert groups and all(BNScale().score(g) is None for g in groups)


def test_regularize_adds_the_l1_subgradient(tiny_cnn: Callable) -> None:
    model = tiny_cnn().double().train()
    with torch.no_grad():
        model.bn1.weight[2] = 0.0  # sign(0) = 0: a removed channel gets no push
    model.bn3.weight.requires_grad_(False)
    model(torch.randn(4, 3, 16, 16, dtype=torch.float64)).square().sum().backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert "bn3.weight" not in before

    BNScale(strength=1e-3).regularize(model)

    for name, p in model.named_parameters():
        if name not in before:
            assert p.grad is None, name
            continue
        change = (p.grad - before[name]).numpy()
        expected = 1e-3 * np.sign(p.detach().numpy()) if name in ("bn1.weight", "bn2.weight") else 0.0
        np.testing.assert_allclose(change, np.broadcast_to(expected, change.shape), rtol=1e-9, atol=1e-15)
    assert before["bn1.weight"][2] == model.bn1.weight.grad[2]


def test_regularize_needs_no_values_on_the_host(tiny_cnn: Callable) -> None:
    """On the meta device every .item() or branch on a value would raise: regularize has none."""
    model = tiny_cnn().to("meta")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    BNScale().regularize(model)
    assert model.bn1.weight.grad.is_meta


@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf"), True, "1e-4"])
def test_bn_scale_rejects_bad_strength(strength: object) -> None:
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        BNScale(strength=strength)
