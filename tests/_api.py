"""Helpers of the ``test_api_*.py`` files: small image models, running them, comparing masked and exported ones."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import maskprune

RTOL = 1e-5


# ---- models --------------------------------------------------------------------------------------------
SIZES = {"resnet18": 32, "mobilenet_v3_small": 32, "tiny_cnn": 16}
Build = Callable[[str], tuple[nn.Module, Callable[[int], torch.Tensor]]]


@functools.cache
def _torchvision(name: str) -> nn.Module:
    """One instance per process; tests take deep copies."""
    import torchvision  # on first use: conftest imports this module, and most sessions build no torchvision model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None).eval()


def image_model(name: str, tiny_cnn: Callable[[], nn.Module]) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """A fresh model of ``SIZES`` (eval mode) and a maker of its image inputs for a batch size."""
    size = SIZES[name]
    model = tiny_cnn() if name == "tiny_cnn" else copy.deepcopy(_torchvision(name))
    return model, lambda batch: torch.randn(batch, 3, size, size)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def pruned_positions(group: maskprune.Group, member: maskprune.Member) -> np.ndarray:
    """The positions of ``member``'s dimension that belong to the group's removed channels."""
    return member.positions[np.isin(member.units, group.pruned)]


def assert_equal_models(masked: nn.Module, pruned: nn.Module, inputs: object) -> None:
    result = maskprune.verify(masked, pruned, inputs)
    assert result.ok and result.max_rel <= RTOL, str(result)
