"""The trial export of make(): it runs wherever the model's code may fix a channel count that the rules cannot
see, freezing what fails, and is skipped where the trace proves the export.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import maskprune
import maskprune._probe
from maskprune import Mask
from maskprune.testing import TINY_MODELS

TRIAL_REASON = "the model's code fixes this size (trial export"


def _forbid_trial_export(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trial export ran")

    monkeypatch.setattr(maskprune._probe, "fixed_size_groups", refuse)


def _prune_and_verify(mask: Mask, model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    for group in mask.groups:
        group.prune(range(group.size // 2))
    pruned = mask.generate_pruned_model()
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
    assert maskprune.verify(model, pruned, inputs).max_rel <= 1e-5
    return pruned


@pytest.mark.parametrize(
    "name", ["conv2d", "depthwise_conv", "grouped_conv", "group_norm", "cat", "squeeze_excitation"]
)
def test_a_trace_that_proves_the_export_skips_the_trial_export(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_trial_export(monkeypatch)
    model, inputs = TINY_MODELS[name]()
    mask = Mask(model, inputs).make()
    assert mask.groups and TRIAL_REASON not in str(mask)
    _prune_and_verify(mask, model, inputs)


def test_a_torchvision_cnn_skips_the_trial_export(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_trial_export(monkeypatch)
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None, num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    mask = Mask(model, x, ignore=[model.fc]).make()
    _prune_and_verify(mask, model, x)


class ExpandsToWrittenShape(nn.Module):
    """``expand(1, 8, 4, 4)``: the 8 channels of ``a`` are written in the code."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.a(x).mean((2, 3), keepdim=True).expand(1, 8, 4, 4)
        return self.c(F.relu(self.b(pooled)))


class ReshapesByTheInputWidth(nn.Module):
    """``reshape(B, x.shape[1], -1)`` of ``a``'s output: the count is read from the (never pruned) input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv1d(8, 6, 1), nn.Conv1d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.a(x).reshape(x.shape[0], x.shape[1], -1)
        return self.c(F.relu(self.b(flat)))


class FunctionalGroupedConv(nn.Module):
    """``F.conv2d(..., groups=2)`` with a bare weight: the group count is written in the code, not a layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(4, 2, 1)
        self.weight = nn.Parameter(torch.randn(6, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(F.relu(self.c(F.relu(F.conv2d(self.a(x), self.weight, groups=2)))))


class GathersByABuffer(nn.Module):
    """``gather`` along the width by an index buffer of 8 channels: the index keeps its channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 2, 1)
        self.register_buffer("index", torch.randint(0, 4, (1, 8, 4, 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(torch.gather(self.a(x), 3, self.index))))


class ViewsAsAnother(nn.Module):
    """``view_as`` the output of ``d``, never pruned (a model output): ``a`` keeps its count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.b, self.c = nn.Conv2d(8, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        other = self.d(x)
        return self.c(F.relu(self.b(self.a(x).flatten(2).view_as(other)))), other


class ShufflesInWrittenParts(nn.Module):
    """A channel shuffle ``view(B, 2, 4, H, W)`` that writes the size of its parts too: ``b`` keeps its count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(F.relu(self.a(x)))
        n, _, h, w = y.shape
        return self.c(y.view(n, 2, 4, h, w).transpose(1, 2).reshape(n, -1, h, w))


class AssertsItsWidth(nn.Module):
    """A bare ``assert`` (no message) on ``a``'s channel count: ``a`` keeps its count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.shape[1] != 8:
            raise AssertionError  # a bare ``assert`` (pytest would give one in this file a message)
        return self.c(F.relu(self.b(y)))


class SizedByAnotherBranch(nn.Module):
    """``b``'s 8 channels reshaped (or expanded) to the width read from ``a``'s output (``ya.shape[1]``): the two
    counts must stay equal. Each branch alone would be a group, and losing one channel from every group (what the
    trial export tries) keeps them equal by chance."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya, yb = self.a(x), self.b(x).mean((2, 3))
        if self.op == "reshape":
            yb = yb.reshape(ya.shape[0], ya.shape[1])
        else:
            yb = yb[:, :, None].expand(ya.shape[0], ya.shape[1], 4).mean(-1)
        return self.c(F.relu(ya)).mean((2, 3)) + self.d(F.relu(yb))


@pytest.mark.parametrize("op", ["reshape", "expand"])
def test_a_width_read_from_one_branch_sizes_the_other_one_group(op: str) -> None:
    torch.manual_seed(0)
    model, x = SizedByAnotherBranch(op).eval(), torch.randn(2, 3, 4, 4)
    mask = Mask(model, x).make()
    (group,) = mask.groups
    assert {f"{m.name}[{m.dim}]" for m in group.members} >= {"a.weight[0]", "b.weight[0]", "c.weight[1]", "d.weight[1]"}
    group.prune([0, 5])
    pruned = mask.generate_pruned_model()
    kept = [1, 2, 3, 4, 6, 7]
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.a.weight, model.a.weight[kept]) and torch.equal(pruned.b.weight, model.b.weight[kept])
    assert maskprune.verify(model, pruned, torch.randn(3, 3, 6, 6)).ok


@pytest.mark.parametrize(
    ("model_type", "input_shape", "fixed", "free"),
    [
        (AssertsItsWidth, (1, 3, 4, 4), "a.weight", "b.weight"),
        (ShufflesInWrittenParts, (1, 3, 4, 4), "c.weight", "a.weight"),  # c reads b's shuffled channels
        (ExpandsToWrittenShape, (1, 3, 4, 4), "a.weight", "b.weight"),
        (ReshapesByTheInputWidth, (2, 8, 4, 4), "a.weight", "b.weight"),
        (FunctionalGroupedConv, (1, 3, 4, 4), "weight", "c.weight"),
        (GathersByABuffer, (1, 3, 4, 4), "a.weight", "b.weight"),
        (ViewsAsAnother, (1, 3, 4, 4), "a.weight", "b.weight"),
    ],
)
def test_a_count_the_rules_cannot_see_is_frozen_by_the_trial_export(
    model_type: type[nn.Module], input_shape: tuple[int, ...], fixed: str, free: str
) -> None:
    """Each of these models fails to run when ``fixed``'s group loses a channel: only ``free``'s group stays."""
    torch.manual_seed(0)
    model, x = model_type().eval(), torch.randn(input_shape)
    mask = Mask(model, x).make()
    assert TRIAL_REASON in str(mask)
    members = [{member.name for member in group.members} for group in mask.groups]
    assert len(members) == 1 and free in members[0] and fixed not in members[0]
    _prune_and_verify(mask, model, x)
