"""What the criteria that score in ``prepare()`` share: calibration data, and the scores handed out by ``score()``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from maskprune import Algorithm, Group, Mask

from ._calibration import BatchInputs, check_batches, check_inputs


class Prepared(Algorithm):
    """A criterion whose :meth:`prepare` computes, over calibration batches, the scores of the groups it is given;
    :meth:`score` hands them out (None for a group of another ``kind``) and :meth:`finish` forgets them.

    Subclasses implement :meth:`prepare`, filling ``self._scores`` (``{group: scores or None}``).
    """

    def __init__(self, data: Iterable[Any], *, max_batches: int | None, inputs: BatchInputs | None) -> None:
        self.data = data
        self.max_batches = check_batches(max_batches)
        self.inputs = check_inputs(inputs)
        self._scores: dict[Group, np.ndarray | None] = {}

    def score(self, group: Group) -> np.ndarray | None:
        """The scores computed by :meth:`prepare`; None for a declined group or one of another kind."""
        if group.kind not in self.kinds:
            return None
        if group not in self._scores:
            raise RuntimeError(
                f"{type(self).__name__} has no statistics for group {group.index}: it scores the groups given to "
                "prepare(), which Mask.do_mask() calls"
            )
        return self._scores[group]

    def finish(self, mask: Mask) -> None:
        self._scores = {}
