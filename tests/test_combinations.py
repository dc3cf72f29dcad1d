"""Every criterion with every allocation and schedule, on a small residual network: exact counts, exact export."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from maskprune.algorithms import FPGM, APoZ, BNScale, L1Norm, L2Norm, Random, Taylor, ThiNet, Uniform
from torch import nn

import maskprune
from maskprune import Algorithm, Mask

pytestmark = pytest.mark.usefixtures("one_thread")


def network() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    model.layer3, model.layer4 = nn.Identity(), nn.Identity()
    model.fc = nn.Linear(128, 5)
    x = torch.randn(4, 3, 32, 32)
    calibration = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    return model.eval(), x, calibration


CRITERIA: dict[str, Callable[[list[torch.Tensor]], Algorithm]] = {
    "fpgm": lambda data: FPGM(),
    "fpgm_two_stage": lambda data: FPGM(rate_norm=0.7, distance="cosine"),
    "l1": lambda data: L1Norm(),
    "l2": lambda data: L2Norm(reduction="max", include_consumers=True),
    "apoz": lambda data: APoZ(data),
    "thinet": lambda data: ThiNet(data, rescale=True),
    "taylor": lambda data: Taylor(),
    "bnscale": lambda data: BNScale(),
    "random": lambda data: Random(seed=1),
    "uniform": lambda data: Uniform(seed=1),
}
SCHEDULES = {"one_shot": {}, "iterative": {"steps": 2, "ramp": "exp"}, "layer": {"pre_layer": True}}


def backward(model: nn.Module, x: torch.Tensor) -> None:
    """What the user's training loop does between do_mask() calls (Taylor needs it)."""
    model.train()
    model.zero_grad()
    model(x).square().mean().backward()
    model.eval()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_every_criterion_allocation_and_schedule(criterion: str, allocation: str, schedule: str) -> None:
    model, x, data = network()
    algorithm = CRITERIA[criterion](data)
    mask = Mask(model, x, algorithm=algorithm, ratio=0.4, allocation=allocation, **SCHEDULES[schedule]).make()
    calls = 0
    while not mask.finished:
        backward(model, x)
        mask.do_mask()
        calls += 1
        assert calls <= len(mask.groups) + 2, "the schedule never ends"
    assert mask.do_mask() is False  # a finished schedule changes nothing
    expected_calls = {"one_shot": 1, "iterative": 2, "layer": len(mask.groups)}[schedule]
    assert calls == expected_calls
    sizes = np.asarray([g.size for g in mask.groups])
    kept = np.asarray([g.kept for g in mask.groups])
    declined = [g.index for g in mask.groups if mask.sparsity().groups[g.index].requested is None]
    live = np.asarray([g.index not in declined for g in mask.groups])
    if allocation == "uniform" and criterion != "random":
        assert (kept[live] == sizes[live] - np.floor(0.4 * sizes[live]).astype(int)).all()
    else:
        removed = (sizes[live] - kept[live]).sum()
        assert abs(removed - 0.4 * sizes[live].sum()) <= len(sizes)  # floors per group
    pruned = mask.generate_pruned_model()
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
    assert maskprune.verify(model, pruned, torch.randn(2, 3, 40, 40))
