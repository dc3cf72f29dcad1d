"""Allocation, schedules and mask semantics: exact counts at every step, FLOPs targets, optimizer steps."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from maskprune.algorithms import L1Norm, Random, Uniform
from torch import nn

import maskprune
from maskprune import Algorithm, Mask
from maskprune._allocate import global_kept, kept_counts, ramp_ratio, spread_ratios

pytestmark = pytest.mark.usefixtures("one_thread")


def convnet() -> tuple[nn.Module, torch.Tensor]:
    """Four prunable groups of 16, 24, 40 and 20 channels; BatchNorm after every conv."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    widths = [3, 16, 24, 40]
    for cin, cout in zip(widths, widths[1:], strict=False):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 5)
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval(), torch.randn(4, 3, 8, 8)


def kept(mask: Mask) -> list[int]:
    return [g.kept for g in mask.groups]


def sizes(mask: Mask) -> np.ndarray:
    return np.asarray([g.size for g in mask.groups])


class Fixed(Algorithm):
    """Scores given per group index, to test the allocation alone."""

    def __init__(self, scores: dict[int, np.ndarray], comparable: bool = False) -> None:
        self.scores = scores
        self.comparable_across_groups = comparable

    def score(self, group):
        return torch.as_tensor(self.scores[group.index], dtype=torch.float64)


# ---- the arithmetic ------------------------------------------------------------------------------------------
def test_ramps_follow_their_formulas() -> None:
    for step in range(5):
        f = step / 4
        assert ramp_ratio(0.6, step, 4, "linear") == pytest.approx(0.6 * f)
        assert ramp_ratio(0.6, step, 4, "exp") == pytest.approx(1 - 0.4**f)
        assert ramp_ratio(0.6, step, 4, "cubic") == pytest.approx(0.6 * (1 - (1 - f) ** 3))
    with pytest.raises(ValueError, match="ramp must be one of"):
        ramp_ratio(0.5, 1, 2, "square")


def test_kept_counts_floor_round_to_and_minimum() -> None:
    assert kept_counts(np.array([64, 10, 7]), np.array([0.5, 0.55, 0.9]), 1, 1).tolist() == [32, 5, 1]
    assert kept_counts(np.array([64, 10, 7]), np.array([0.5, 0.55, 0.9]), 3, 1).tolist() == [32, 5, 3]
    assert kept_counts(np.array([64, 10, 7]), np.array([0.6, 0.55, 0.9]), 1, 8).tolist() == [32, 8, 7]
    # dithered: equal groups share the rounding, so the total follows the ratio channel by channel
    dithered = kept_counts(np.full(6, 5), np.full(6, 0.5), 1, 1, dither=True)
    assert sorted(set(dithered.tolist())) == [2, 3] and dithered.sum() == 30 - 15


def test_spread_ratios_keep_the_weighted_mean_and_the_cap() -> None:
    s = np.array([10, 30, 60])
    r = spread_ratios(s, np.array([3.0, 1.0, 0.5]), 0.4, 0.8)
    assert (r <= 0.8 + 1e-12).all()
    assert float((r * s).sum() / s.sum()) == pytest.approx(0.4)
    assert r[0] == pytest.approx(0.8)  # capped; the others take the rest in proportion
    assert r[1] / r[2] == pytest.approx(2.0)


def test_global_kept_takes_the_lowest_scores_above_the_floors() -> None:
    scores = [np.array([0.1, 0.2, 5.0]), np.array([0.15, 3.0, 4.0, 6.0])]
    assert global_kept(scores, 3, np.array([1, 1]), 1).tolist() == [1, 3]
    assert global_kept(scores, 3, np.array([2, 1]), 1).tolist() == [2, 2]


# ---- one shot and iterative schedules ------------------------------------------------------------------------
@pytest.mark.parametrize("ramp", ["linear", "exp", "cubic"])
def test_iterative_schedule_gives_the_promised_counts_at_every_step(ramp: str) -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.6, steps=4, ramp=ramp).make()
    size = sizes(mask)
    previous = set()
    for step in range(1, 5):
        assert mask.do_mask() is True
        expected = size - np.floor(ramp_ratio(0.6, step, 4, ramp) * size + 1e-9).astype(int)
        assert kept(mask) == expected.tolist()
        pruned = {(g.index, c) for g in mask.groups for c in g.pruned}
        assert previous <= pruned  # frozen: a removed channel stays removed
        previous = pruned
    assert mask.do_mask() is False  # the schedule is over
    assert kept(mask) == expected.tolist()
    pruned_model = mask.generate_pruned_model()
    assert maskprune.verify(model, pruned_model, x)


def test_one_shot_reaches_the_target_then_changes_nothing() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    assert mask.do_mask() is True
    assert kept(mask) == (sizes(mask) - sizes(mask) // 2).tolist()
    assert mask.do_mask() is False


def test_layer_by_layer_visits_every_group_once_then_is_finished() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5, pre_layer=True).make()
    size = sizes(mask)
    for visited in range(len(size)):
        assert not mask.finished
        assert mask.do_mask() is True
        expected = [s - s // 2 if i <= visited else s for i, s in enumerate(size)]
        assert kept(mask) == expected
    assert mask.finished
    assert mask.do_mask() is False
    assert mask.do_mask() is False


def test_layer_by_layer_do_mask_says_whether_the_visited_group_changed() -> None:
    """A group whose override keeps every channel is visited without change: ``do_mask()`` is False, the
    loop goes on until ``finished``."""
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5, ratios={"0": 0.0}, pre_layer=True).make()
    first = next(g.index for g in mask.groups if (g.producers() or g.members)[0].module == "0")
    changes = []
    while not mask.finished:
        changes.append(mask.do_mask())
    assert len(changes) == len(mask.groups)
    assert [i for i, changed in enumerate(changes) if not changed] == [first]
    assert mask.groups[first].kept == mask.groups[first].size


def test_layer_by_layer_with_a_flops_target_lands_on_it() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), target_flops=0.4, pre_layer=True).make()
    while not mask.finished:
        mask.do_mask()
    dense = maskprune.count_flops(model, x)
    pruned = mask.generate_pruned_model()
    assert abs(1 - maskprune.count_flops(pruned, x) / dense - 0.4) <= 0.01


# ---- allocation options --------------------------------------------------------------------------------------
def test_round_to_min_channels_and_module_overrides() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.7, round_to=8, ratios={"6": 0.2}, min_channels=10).make()
    mask.do_mask()
    by_first = {(g.producers() or g.members)[0].module: g for g in mask.groups}
    assert by_first["0"].kept == 16  # 16 - floor(11.2) = 5 -> at least 10 -> a multiple of 8: 16
    assert by_first["3"].kept == 16  # 24 - floor(16.8) = 8 -> 10 -> 16
    assert by_first["6"].kept == 40 - math.floor(0.2 * 40)  # the override: 32, a multiple of 8
    assert by_first["11"].kept == 16  # 20 - 14 = 6 -> 10 -> 16


def test_global_ranking_normalises_each_group_unless_scores_compare() -> None:
    model, x = convnet()
    mask = Mask(model, x, ratio=0.5, allocation="global").make()
    n = sizes(mask)
    rng = np.random.default_rng(0)
    # group 0's scores are 1000x larger: raw ranking would never touch it, normalised ranking treats it fairly
    scores = {i: rng.uniform(1, 2, size=s) * (1000 if i == 0 else 1) for i, s in enumerate(n)}
    mask.algorithm = Fixed(scores)
    mask.do_mask()
    total = n.sum()
    assert sum(kept(mask)) == total - round(0.5 * total)
    normalised = np.concatenate([scores[i] / scores[i].mean() for i in range(len(n))])
    owner = np.concatenate([np.full(s, i) for i, s in enumerate(n)])
    lowest = np.argsort(normalised, kind="stable")[: round(0.5 * total)]
    assert kept(mask) == (n - np.bincount(owner[lowest], minlength=len(n))).tolist()

    model, x = convnet()
    raw = Mask(model, x, ratio=0.3, allocation="global", max_ratio=0.9).make()
    raw.algorithm = Fixed(scores, comparable=True)
    raw.do_mask()
    assert raw.groups[0].kept == n[0]  # large raw scores: untouched


def test_random_draws_a_ratio_per_group_with_the_requested_mean() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=Random(seed=3), ratio=0.5).make()
    mask.do_mask()
    n = sizes(mask)
    achieved = 1 - np.asarray(kept(mask)) / n
    assert len(set(np.round(achieved, 2))) > 1  # not one ratio for all
    assert float((achieved * n).sum() / n.sum()) == pytest.approx(0.5, abs=len(n) / n.sum())


def test_declined_groups_are_left_alone() -> None:
    class OnlyFirst(Algorithm):
        def score(self, group):
            return torch.arange(group.size, dtype=torch.float64) if group.index == 0 else None

    model, x = convnet()
    mask = Mask(model, x, algorithm=OnlyFirst(), ratio=0.5).make()
    mask.do_mask()
    assert kept(mask) == [8] + sizes(mask)[1:].tolist()
    assert mask.groups[0].pruned == list(range(8))


# ---- FLOPs targets on the exported model ---------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_target_flops_lands_within_one_percent(name: str, allocation: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    dense = maskprune.count_flops(model, x)
    mask = Mask(model, x, algorithm=L1Norm(), target_flops=0.5, allocation=allocation).make()
    mask.do_mask()
    report = mask.sparsity()
    pruned = mask.generate_pruned_model()
    removed = 1 - maskprune.count_flops(pruned, x) / dense
    assert abs(removed - 0.5) <= 0.01
    assert report.flops_before == dense
    assert report.flops_after == maskprune.count_flops(pruned, x)
    assert report.parameters_after == maskprune.count_parameters(pruned)


def test_iterative_flops_target_moves_along_the_ramp() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    dense = maskprune.count_flops(model, x)
    mask = Mask(model, x, algorithm=L1Norm(), target_flops=0.6, steps=3, ramp="cubic").make()
    for step in range(1, 4):
        mask.do_mask()
        removed = 1 - mask.sparsity().flops_after / dense
        assert abs(removed - ramp_ratio(0.6, step, 3, "cubic")) <= 0.01


def test_frozen_flops_ramp_reports_what_earlier_steps_removed() -> None:
    """Late steps of a cubic ramp ask for little more: groups keep what earlier steps removed, and say so."""
    model = torchvision.models.resnet18(weights=None).eval()
    mask = Mask(model, torch.randn(1, 3, 32, 32), algorithm=L1Norm(), target_flops=0.5, steps=8, ramp="cubic").make()
    for _ in range(8):
        mask.do_mask()
        for group in mask.sparsity().groups:
            assert group.requested > group.achieved - 1 / group.channels, str(group)


def test_unreachable_flops_target_warns_and_goes_as_far_as_allowed() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), target_flops=0.99, max_ratio=0.5).make()
    with pytest.warns(UserWarning, match="out of reach"):
        mask.do_mask()
    assert kept(mask) == (sizes(mask) - sizes(mask) // 2).tolist()


def test_sparsity_report_prints_requested_and_achieved() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    before = mask.sparsity()
    assert before.flops_after == before.flops_before and all(g.requested is None for g in before.groups)
    mask.do_mask()
    report = mask.sparsity()
    assert [g.requested for g in report.groups] == [0.5] * len(mask.groups)
    assert [g.achieved for g in report.groups] == [1 - g.kept / g.size for g in mask.groups]
    assert sum(g.flops_after for g in report.groups) < sum(g.flops_before for g in report.groups)
    text = str(report)
    assert "Requested: ratio=0.5 (uniform)" in text and "FLOPs:" in text and "removed" in text


# ---- semantics through real optimizer steps ------------------------------------------------------------------
def train_steps(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer, n: int) -> None:
    model.train()
    target = torch.randint(0, 5, (x.shape[0],))
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    model.eval()


def removed_slices(mask: Mask) -> list[torch.Tensor]:
    out = []
    for g in mask.groups:
        for m in g.members:
            idx = torch.as_tensor(m.positions[~g.keep[m.units]])
            out.append(m.tensor.detach().index_select(m.dim, idx))
    return out


@pytest.mark.parametrize("make_optimizer", ["sgd", "adamw"])
def test_frozen_channels_stay_zero_and_get_no_gradient_or_momentum(make_optimizer: str) -> None:
    model, x = convnet()
    if make_optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    train_steps(model, x, optimizer, 3)  # momentum and Adam moments are non-zero everywhere now
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make().track_optimizer(optimizer)
    mask.do_mask()
    train_steps(model, x, optimizer, 5)
    # bit-exact: masks write exact zeros
    assert all(t.abs().max() == 0 for t in removed_slices(mask))
    for g in mask.groups:
        for m in g.members:
            idx = torch.as_tensor(m.positions[~g.keep[m.units]])
            # bit-exact: masks write exact zeros into gradients and optimizer states
            assert m.tensor.grad.index_select(m.dim, idx).abs().max() == 0
            for state in optimizer.state[m.tensor].values():
                if isinstance(state, torch.Tensor) and state.shape == m.tensor.shape:
                    assert state.index_select(m.dim, idx).abs().max() == 0
    assert maskprune.verify(model, mask.generate_pruned_model(), x)


def test_soft_filters_keep_training_and_can_come_back() -> None:
    model, x = convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5, semantics="soft").make().track_optimizer(optimizer)
    mask.do_mask()
    first = mask.groups[1].pruned
    conv = model[3].weight
    # bit-exact: masks write exact zeros
    assert conv.detach()[first].abs().max() == 0  # do_mask zeroed the removed filters
    train_steps(model, x, optimizer, 3)
    regrown = conv.detach()[first].abs().amax(dim=(1, 2, 3)) > 0
    # they train (a filter whose BatchNorm shift is negative stays dead: ReLU passes it no gradient)
    assert regrown.sum() >= len(first) // 2
    with torch.no_grad():
        conv[first[0]] = 10.0  # a removed filter that grew large comes back at the next selection
    mask.do_mask()
    assert first[0] not in mask.groups[1].pruned
    assert mask.groups[1].kept == 12
    pruned = mask.generate_pruned_model()  # the whole mask, verified
    assert maskprune.verify(model, pruned, x)
    assert mask.semantics == "soft"


def test_switching_soft_to_frozen_zeroes_the_whole_mask() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=Uniform(seed=0), ratio=0.5, semantics="soft").make()
    mask.do_mask()
    mask.semantics = "frozen"
    # bit-exact: masks write exact zeros
    assert all(t.abs().max() == 0 for t in removed_slices(mask))


# ---- bad options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 1.0}, r"ratio must be a number in \[0, 1\)"),
        ({"target_flops": 0.0}, r"target_flops must be a number in \(0, 1\)"),
        ({"allocation": "best"}, "allocation must be one of 'uniform', 'global'"),
        ({"ramp": "square"}, "ramp must be one of 'linear', 'exp', 'cubic'"),
        ({"semantics": "hard"}, "semantics must be one of 'frozen', 'soft'"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"round_to": 0}, "round_to must be a positive integer"),
        ({"min_channels": 1.5}, "min_channels must be a positive integer"),
        ({"ratio": 0.5, "max_ratio": 0.3}, r"max_ratio \(0.3\) must be at least ratio"),
        ({"pre_layer": True, "steps": 3}, "pre_layer prunes each group once"),
        ({"ratios": {"nope": 0.5}}, "ratios: 'nope' is not a module of the model"),
        ({"ratios": {"0": 1.5}}, r"ratios\['0'\] must be a number in \[0, 1\)"),
    ],
)
def test_bad_options_fail_in_the_constructor(options: dict, message: str) -> None:
    model, x = convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        Mask(model, x, algorithm=L1Norm(), **options)
    # bit-exact: compared with a copy taken before, and nothing may write to it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_warning_for_a_reachable_target() -> None:
    model, x = convnet()
    mask = Mask(model, x, algorithm=L1Norm(), target_flops=0.3).make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask.do_mask()


def test_fast_meta_batch_norm_checks_shapes_like_torch() -> None:
    from maskprune._meta import FastMeta

    x = torch.empty(2, 8, 4, 4, device="meta")
    bn = nn.BatchNorm2d(8).to("meta")
    with FastMeta():
        assert bn(x).shape == x.shape
        with pytest.raises(RuntimeError, match="weight should contain 6 elements not 8|running_mean should contain 6"):
            bn(torch.empty(2, 6, 4, 4, device="meta"))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn.train()(torch.empty(1, 8, 1, 1, device="meta"))
