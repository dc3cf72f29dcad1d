"""What the engine asks of an importance criterion: one score per channel of a group."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._groups import Group


class Algorithm(ABC):
    """Scores the channels of a group; the lowest scores are removed first.

    Subclasses look at ``group.members`` (each a tensor dimension with the positions
    of every channel) and return a tensor of ``group.size`` scores.

    Example:
        >>> class Constant(Algorithm):
        ...     def score(self, group):
        ...         return torch.zeros(group.size)
    """

    @abstractmethod
    def score(self, group: Group) -> torch.Tensor:
        """One score per channel of ``group`` (higher = more important)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
