"""Baselines that look at nothing: seeded random channels, with random or uniform ratios per group."""

from __future__ import annotations

import numpy as np
import torch

from maskprune import Algorithm, Group


class _Seeded(Algorithm):
    """A seeded random score per channel (or per block of a ``kind == "block"`` group: the random depth
    baseline; per expert of a ``kind == "experts"`` group); each call of :meth:`score` draws new ones from one
    stream."""

    kinds = ("channels", "block", "experts")

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def score(self, group: Group) -> torch.Tensor:
        return torch.rand(group.size, generator=self._generator, dtype=torch.float64)

    def state_dict(self) -> dict:
        """The seed and the position in the random stream."""
        return {"seed": self.seed, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"the state is of {type(self).__name__}(seed={state.get('seed')}), not seed={self.seed}")
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class Random(_Seeded):
    """The random baseline: seeded random channels and a seeded random ratio per group.

    :meth:`group_weights` draws one uniform value in (0, 1] per group and rescales them so
    that their channel-weighted mean is 1; the engine multiplies them by the requested
    ratio (so the overall ratio is the target) and clips. The draw depends only on
    ``seed`` and the number of groups: every call gives the same weights, so iterative
    pruning keeps one random allocation. Channel scores come from a separate stream.

    Examples:
        >>> import numpy as np
        >>> weights = Random(seed=3).group_weights(np.array([8, 16, 32]))
        >>> float(np.round((weights * [8, 16, 32]).sum() / 56, 12))
        1.0
    """

    def group_weights(self, sizes: np.ndarray) -> np.ndarray:
        sizes = np.asarray(sizes, dtype=np.float64)
        draws = 1.0 - np.random.default_rng([self.seed, 1]).random(len(sizes))  # (0, 1]: never all zero
        weighted = float((draws * sizes).sum())
        if weighted <= 0:
            return np.ones(len(sizes))
        return draws * (float(sizes.sum()) / weighted)


class Uniform(_Seeded):
    """The same ratio in every group, seeded random channels: "just make it thinner".

    Examples:
        >>> Uniform(seed=1).group_weights([8, 16]) is None
        True
    """

    def group_weights(self, sizes: np.ndarray) -> None:
        return None  # the engine applies the requested ratio to every group
