"""Shared test setup: ``maskprune.algorithms`` must come from the package, torch is seeded, small models.

The repository's root folder ``algorithms/`` is installed as ``maskprune.algorithms``.
If it were ever imported as a top-level ``algorithms`` (the repository root on
``sys.path``), its classes would be second copies, and ``isinstance`` checks and
registrations would silently split in two. The check runs when pytest starts and
again when the session ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest
import torch
from _api import Build, image_model
from torch import nn

SEED = 0


def _algorithms_problem() -> str | None:
    """Why ``maskprune.algorithms`` is not reached through the package, or None."""
    import maskprune.algorithms
    from maskprune.algorithms import L1Norm, Random

    package = maskprune.algorithms
    if package.__name__ != "maskprune.algorithms" or maskprune.algorithms is not sys.modules["maskprune.algorithms"]:
        return f"maskprune.algorithms resolves to the module {package.__name__!r}"
    if package.L1Norm is not L1Norm or package.Random is not Random:
        return "maskprune.algorithms.L1Norm/Random are not the objects `from maskprune.algorithms import ...` gives"
    for cls in (L1Norm, Random):
        if not cls.__module__.startswith("maskprune.algorithms."):
            return f"{cls.__name__} is defined in {cls.__module__!r}, not under maskprune.algorithms"
    plain = sorted(name for name in sys.modules if name == "algorithms" or name.startswith("algorithms."))
    if plain:
        return f"a top-level `algorithms` was imported ({', '.join(plain)}); import maskprune.algorithms instead"
    return None


def pytest_configure(config: pytest.Config) -> None:
    problem = _algorithms_problem()
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(scope="session", autouse=True)
def _algorithms_namespace() -> Iterator[None]:
    """No test may reach the criteria through a top-level ``algorithms`` either."""
    yield
    problem = _algorithms_problem()
    assert problem is None, problem


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small models run fastest on one thread, and do not stall in OpenMP barriers when the cores are shared
    (xdist workers, a busy machine). Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same torch random state."""
    torch.manual_seed(SEED)
    return SEED


class TinyCNN(nn.Module):
    """conv-bn-relu, then a residual pair (two producers of one group), pooled into a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(3, 16, 1, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16, classes)
        with torch.no_grad():  # non-trivial statistics, so a masked channel is not zero by accident
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.normal_()
                bn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + self.bn3(self.conv3(x)))
        return self.fc(self.drop(y.mean((2, 3))))


@pytest.fixture
def tiny_cnn() -> Callable[[], TinyCNN]:
    """A builder of fresh :class:`TinyCNN` models (eval mode), input ``(N, 3, 16, 16)``."""
    return lambda: TinyCNN().eval()


@pytest.fixture
def build(tiny_cnn: Callable[[], TinyCNN]) -> Build:
    """``build(name)``: a fresh model of ``_api.SIZES`` (eval mode) and a maker of its image inputs for a batch size."""
    return lambda name: image_model(name, tiny_cnn)


def _leftover_hooks(model: nn.Module) -> list[str]:
    """Every module that has a forward, forward-pre or backward hook, as 'name: kinds'."""
    found = []
    for name, module in model.named_modules():
        kinds = [
            kind
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            if getattr(module, kind, None)
        ]
        if kinds:
            found.append(f"{name or '<root>'}: {', '.join(kinds)}")
    return found


@pytest.fixture
def leftover_hooks() -> Callable[[nn.Module], list[str]]:
    """``leftover_hooks(model)``: the modules of ``model`` that still carry hooks (empty when clean)."""
    return _leftover_hooks
