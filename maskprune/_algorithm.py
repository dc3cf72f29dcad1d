"""What the engine asks of an importance criterion: one score per channel of a group."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ._groups import Group
    from .mask import Mask


class Algorithm(ABC):
    """Scores the channels of a group; the lowest scores are removed first.

    Subclasses look at ``group.members`` (each a tensor dimension with the positions
    of every channel) or ``group.activations()`` and return ``group.size`` scores.
    The engine decides how many channels each group loses (the allocation); the
    optional hooks below let a criterion watch training or calibration data.

    Examples:
        >>> class Constant(Algorithm):
        ...     def score(self, group):
        ...         return torch.zeros(group.size)
    """

    #: True when raw scores compare across groups (|gamma|, Taylor); otherwise a global
    #: ranking divides each group's scores by their mean first.
    comparable_across_groups: bool = False

    #: the kinds of groups the criterion scores (``group.kind``): ``"channels"``, ``"block"`` for a
    #: depth criterion, ``"experts"`` for the experts of a mixture-of-experts layer. ``do_mask()`` leaves the
    #: groups of other kinds alone and never asks about them.
    kinds: tuple[str, ...] = ("channels",)

    @abstractmethod
    def score(self, group: Group) -> torch.Tensor:
        """One score per channel of ``group`` (higher = more important)."""

    def attach(self, mask: Mask) -> None:  # noqa: B027 - optional hook
        """Called once by :meth:`Mask.make`, after the groups exist (install training hooks here)."""

    def detach(self, mask: Mask) -> None:  # noqa: B027 - optional hook
        """Called by :meth:`Mask.remove`: take off whatever :meth:`attach` installed."""

    def prepare(self, mask: Mask, groups: Sequence[Group]) -> None:  # noqa: B027 - optional hook
        """Called at the start of each :meth:`Mask.do_mask` before ``groups`` are scored (run calibration here)."""

    def finish(self, mask: Mask) -> None:  # noqa: B027 - optional hook
        """Called at the end of each :meth:`Mask.do_mask` (reset accumulated statistics here)."""

    def state_dict(self) -> dict:
        """What the criterion carries between ``do_mask()`` calls (statistics, random state), for checkpoints.

        Tensors, numbers, strings, lists and dicts only, so that ``torch.load(weights_only=True)`` reads it.
        """
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional hook
        """Take back what :meth:`state_dict` gave (called by :meth:`Mask.load_state_dict` after ``make()``)."""

    def group_weights(self, sizes: np.ndarray) -> np.ndarray | None:
        """Relative removal ratio per group (channel-weighted mean 1), or None for the same ratio everywhere.

        The random baseline draws them; the engine scales them to the requested ratio.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
