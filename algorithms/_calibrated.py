"""What the calibrated criteria share: one calibration pass per ``do_mask()``, statistics at planned sites."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from maskprune import ActivationSite, Group, Mask

from ._calibration import BatchInputs
from ._moments import Moments, collect, site_key
from ._prepared import Prepared


class Calibrated(Prepared):
    """A criterion scored from :class:`~._moments.Moments` at sites it plans per group (see :meth:`plan`).

    Subclasses say where to measure (:meth:`plan`), what one watched tensor contributes (:meth:`samples`)
    and how the statistics become scores (:meth:`scores`). Groups without a plan are declined (left as they
    are), listed in :attr:`declined` and named in one warning per ``do_mask()``.
    """

    def __init__(self, data: Iterable[Any], *, max_batches: int | None, inputs: BatchInputs | None) -> None:
        super().__init__(data, max_batches=max_batches, inputs=inputs)
        #: ``{group index: why}`` for groups left alone.
        self.declined: dict[int, str] = {}

    @abstractmethod
    def plan(self, mask: Mask, group: Group) -> Any:
        """What to measure for ``group`` (an object with a ``sites`` list), or a string saying why it is declined."""

    @abstractmethod
    def samples(self, site: ActivationSite, tensor: torch.Tensor) -> torch.Tensor:
        """The samples one watched tensor gives: ``(samples, positions of site.dim)``."""

    @abstractmethod
    def scores(self, group: Group, plan: Any, moments: dict[tuple, Moments]) -> np.ndarray:
        """One score per channel of ``group`` from the statistics at its planned sites."""

    def prepare(self, mask: Mask, groups: Sequence[Group]) -> None:
        """Run the calibration data once, gathering statistics at the sites of ``groups``; then score them."""
        self._scores = {}
        plans = {}
        for group in groups:
            self.declined.pop(group.index, None)
            if group.kind not in self.kinds:
                self._scores[group] = None  # a block or expert group: not this criterion's to score
                continue
            plan = self.plan(mask, group)
            if isinstance(plan, str):
                self.declined[group.index] = plan
                self._scores[group] = None
            else:
                plans[group] = plan
        sites = [site for plan in plans.values() for site in plan.sites]
        moments = {}
        if sites:
            moments = collect(
                mask,
                sites,
                self.samples,
                self.data,
                inputs=self.inputs,
                max_batches=self.max_batches,
                desc=type(self).__name__,
            )
        for group, plan in plans.items():
            if not all(site_key(s) in moments for s in plan.sites):
                self.declined[group.index] = "the calibration batches did not reach its activations"
                self._scores[group] = None
            else:
                self._scores[group] = self.scores(group, plan, moments)
        self._warn(groups)

    def _warn(self, groups: Sequence[Group]) -> None:
        lost = [f"{g.index} ({self.declined[g.index]})" for g in groups if g.index in self.declined]
        if lost:
            warnings.warn(
                f"{type(self).__name__}: group(s) left as they are: {'; '.join(lost)}", UserWarning, stacklevel=4
            )
