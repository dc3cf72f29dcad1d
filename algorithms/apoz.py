"""APoZ (Hu et al., 2016): channels whose activation after the ReLU is mostly zero are removed first."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from maskprune import ActivationSite, Algorithm, Group, Mask, evaluating, watch
from maskprune.distributed import all_reduce_sum, is_distributed

from ._calibration import BatchInputs, check_batches, check_inputs, run_batches
from ._consumers import consumer_input_sites, covers


@dataclass
class _Plan:
    """Where a group is measured and how: exact zeros (``eps`` None) or ``|a| <= eps``."""

    sites: list[ActivationSite]
    eps: float | None
    where: str


class _Counter:
    """Zeros (or near-zeros) and elements per position of one dimension of one watched tensor."""

    def __init__(self, dim: int, eps: float | None) -> None:
        self.dim = dim
        self.eps = eps
        self.hits: torch.Tensor | None = None  # per position, on the model's device
        self.elements = 0  # per position (host integer: read from shapes, never from values)

    def __call__(self, site: ActivationSite, tensor: torch.Tensor) -> None:
        if tensor.dim() <= self.dim:
            return
        hit = tensor.eq(0) if self.eps is None else tensor.abs().le(self.eps)
        other = [d for d in range(tensor.dim()) if d != self.dim]
        counts = hit.sum(dim=other) if other else hit.long()
        if self.hits is None:
            self.hits = counts
        else:
            self.hits += counts
        self.elements += tensor.numel() // tensor.shape[self.dim]

    def fraction(self, site: ActivationSite, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Fraction of hits per channel of the group, and which channels this site covers."""
        hits = site.per_channel(self.hits.cpu().double(), size).numpy()
        positions = np.bincount(site.units, minlength=size).astype(float)
        covered = positions > 0
        fraction = np.zeros(size)
        fraction[covered] = hits[covered] / (positions[covered] * self.elements)
        return fraction, covered


class APoZ(Algorithm):
    """Average Percentage of Zeros (Hu et al., 2016): importance = 1 - the fraction of exact zeros.

    At every ``do_mask()`` the calibration ``data`` runs through the model (eval mode, no
    gradients, the model's device, training flags restored after) while the outputs of the
    ``nn.ReLU``/``nn.ReLU6`` modules that read a group's channels are watched; per channel,
    zeros and elements are counted over the batch and every position. A residual group read
    by several ReLUs averages their fractions.

    Groups without a ReLU module (a linear bottleneck, SiLU, GELU, or a ReLU applied as a
    function, which module hooks cannot see) fall back to the rule ``|a| <= eps``, measured
    where the group's consumers (the next conv/linear layers) read the channels, that is
    after any functional activation; where no consumer is a module, at the last module
    output that carries the channels. Such groups are listed in :attr:`fallback` and named in
    one warning per ``do_mask()``. With ``eps=None`` they are declined instead (left as
    they are) and listed in :attr:`declined`. Under ``torch.distributed`` every rank runs its
    own ``data`` and the counts are summed over the ranks before scoring.

    Args:
        data: calibration batches: a DataLoader, a list, any iterable that can be iterated again
            at every ``do_mask()``. A batch is a tensor, a dict (keyword arguments) or a tuple/list
            ``(inputs, targets, ...)`` whose element 0 is fed.
        max_batches: use at most this many batches per ``do_mask()``.
        eps: threshold of the fallback rule (1e-3), or None to decline groups without a ReLU.
        inputs: ``inputs(batch)`` gives what to feed (a tensor, a tuple of positional arguments
            or a dict of keyword arguments) when the default above does not fit.

    Attributes:
        fallback: ``{group index: where it was measured}`` for groups scored by ``|a| <= eps``.
        declined: ``{group index: why}`` for groups left alone.

    Examples:
        >>> from maskprune import Mask
        >>> from maskprune.algorithms import APoZ
        >>> from maskprune.testing import TINY_MODELS
        >>> model, x = TINY_MODELS["batch_norm2d"]()
        >>> mask = Mask(model, x, algorithm=APoZ([x, x], max_batches=2), ratio=0.25).make()
        >>> mask.do_mask()
        True
    """

    #: Module types whose output counts exact zeros; extend for your own ReLU-like modules.
    relu_types: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

    def __init__(
        self,
        data: Iterable[Any],
        *,
        max_batches: int | None = None,
        eps: float | None = 1e-3,
        inputs: BatchInputs | None = None,
    ) -> None:
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0):
            raise ValueError(f"eps must be a number >= 0 or None (decline groups without a ReLU), got {eps!r}")
        self.data = data
        self.max_batches = check_batches(max_batches)
        self.eps = None if eps is None else float(eps)
        self.inputs = check_inputs(inputs)
        self.fallback: dict[int, str] = {}
        self.declined: dict[int, str] = {}
        self._scores: dict[Group, np.ndarray | None] = {}

    def prepare(self, mask: Mask, groups: Sequence[Group]) -> None:
        """Run the calibration data once, counting zeros at the sites of ``groups``."""
        self._scores = {}
        plans: dict[Group, _Plan] = {}
        for group in groups:
            plan = self._plan(mask, group)
            self.fallback.pop(group.index, None)
            self.declined.pop(group.index, None)
            if plan is None:
                reason = "no ReLU module reads its channels (eps=None)" if self.eps is None else "no activation site"
                self.declined[group.index] = reason
                self._scores[group] = None
                continue
            if plan.eps is not None:
                self.fallback[group.index] = plan.where
            plans[group] = plan
        self._warn(groups)
        if not plans:
            return
        counters: dict[tuple, _Counter] = {}
        watched: list[ActivationSite] = []
        for plan in plans.values():
            for site in plan.sites:
                key = _key(site, plan.eps)
                if key not in counters:
                    counters[key] = _Counter(site.dim, plan.eps)
                    watched.append(site)
        by_site = {id(site): counters[_key(site, plan.eps)] for plan in plans.values() for site in plan.sites}

        def count(site: ActivationSite, tensor: torch.Tensor) -> None:
            by_site[id(site)](site, tensor)

        with evaluating(mask.model), torch.no_grad(), watch(mask.model, watched, count):
            run_batches(mask.model, self.data, inputs=self.inputs, max_batches=self.max_batches, desc="APoZ")
        if is_distributed():
            _sum_over_ranks(list(counters.values()))
        for group, plan in plans.items():
            total, covered = np.zeros(group.size), np.zeros(group.size)
            for site in plan.sites:
                counter = counters[_key(site, plan.eps)]
                if counter.hits is None:
                    continue  # the site was not reached by these batches
                fraction, here = counter.fraction(site, group.size)
                total += fraction
                covered += here
            if not covered.all():
                self.declined[group.index] = "the calibration batches did not reach its activations"
                self.fallback.pop(group.index, None)
                self._scores[group] = None
                continue
            self._scores[group] = 1.0 - total / covered

    def score(self, group: Group) -> np.ndarray | None:
        """``1 - APoZ`` per channel (averaged over the group's ReLU sites), or None when declined."""
        if group.kind not in self.kinds:
            return None  # a block group: this criterion scores channels
        if group not in self._scores:
            raise RuntimeError(
                f"APoZ has no statistics for group {group.index}: it scores the groups given to prepare(), "
                "which Mask.do_mask() calls"
            )
        return self._scores[group]

    def finish(self, mask: Mask) -> None:
        self._scores = {}

    def _plan(self, mask: Mask, group: Group) -> _Plan | None:
        outputs = group.activations("output")
        relus = [s for s in outputs if isinstance(s.module, self.relu_types)]
        if _covers(relus, group.size):
            return _Plan(relus, None, "ReLU")
        if self.eps is None:
            return None
        reads = consumer_input_sites(mask, group)
        if _covers(reads, group.size):
            return _Plan(reads, self.eps, "input of " + ", ".join(dict.fromkeys(s.path for s in reads)))
        if outputs and _covers(outputs[-1:], group.size):
            return _Plan(outputs[-1:], self.eps, f"output of {outputs[-1].path}")
        return None

    def _warn(self, groups: Sequence[Group]) -> None:
        indices = {g.index for g in groups}
        fallback = [f"{i} ({where})" for i, where in self.fallback.items() if i in indices]
        lost = [str(i) for i in self.declined if i in indices and self.eps is not None]
        if lost:
            warnings.warn(
                f"APoZ: group(s) {', '.join(lost)} have no activation site to measure; declined", stacklevel=3
            )
        if fallback:
            warnings.warn(
                f"APoZ: no ReLU module reads the channels of group(s) {', '.join(fallback)}; "
                f"scored by the fraction of |a| <= {self.eps:g} instead (see APoZ.fallback)",
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return f"APoZ(max_batches={self.max_batches}, eps={self.eps})"


def _sum_over_ranks(counters: list[_Counter]) -> None:
    """Every rank's zero counts and element counts added up (each rank ran its own calibration batches)."""
    (reached,) = all_reduce_sum([torch.tensor([float(c.hits is not None) for c in counters])])
    ranks = torch.distributed.get_world_size()
    if bool((reached.gt(0) & reached.lt(ranks)).any()):
        raise RuntimeError("APoZ: the calibration batches reached some activations on some ranks only")
    live = [c for c in counters if c.hits is not None]
    elements = torch.tensor([float(c.elements) for c in live], dtype=torch.float64)
    *hits, elements = all_reduce_sum([*(c.hits for c in live), elements])
    for counter, total, count in zip(live, hits, elements.tolist(), strict=True):
        counter.hits, counter.elements = total, int(count)


def _key(site: ActivationSite, eps: float | None) -> tuple:
    return (id(site.module), site.call, site.kind, site.index, site.dim, eps)


def _covers(sites: list[ActivationSite], size: int) -> bool:
    return bool(sites) and covers(sites, size)
