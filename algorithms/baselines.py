"""Baselines that look at nothing: seeded random channels."""

from __future__ import annotations

import torch

from maskprune import Algorithm, Group


class Random(Algorithm):
    """A seeded random score per channel: the baseline every criterion must beat.

    Example:
        >>> Random(seed=3)
        Random(seed=3)
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def score(self, group: Group) -> torch.Tensor:
        return torch.rand(group.size, generator=self._generator, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"
