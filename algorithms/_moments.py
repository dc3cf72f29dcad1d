"""Per-channel statistics of activations over calibration batches: counts, means and squared deviations.

The calibrated criteria (Activation, WandaSP, FLAP) keep statistics, never activations: for every
watched site, per position of its channel dimension, the number of samples, their mean and the sum of
squared deviations from it, merged batch by batch on the model's device (Chan et al.'s pairwise update,
in float64), so no value is read to the host until the scores are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from maskprune import ActivationSite, Mask, evaluating, watch
from maskprune.distributed import all_reduce_sum, is_distributed

from ._calibration import BatchInputs, run_batches

#: ``values(site, tensor)`` gives the samples of one watched tensor: ``(samples, positions of site.dim)``.
Samples = Callable[[ActivationSite, torch.Tensor], torch.Tensor]


class Moments:
    """Count, mean and sum of squared deviations per position, merged one batch of samples at a time."""

    def __init__(self) -> None:
        self.count = 0  # a host integer, read from shapes, never from values
        self.mean: torch.Tensor | None = None  # float64, on the device of the samples
        self.m2: torch.Tensor | None = None

    def add(self, samples: torch.Tensor) -> None:
        """Merge ``samples`` (``(n, positions)``) into the statistics."""
        n = samples.shape[0]
        if n == 0:
            return
        samples = samples.float()
        rough = samples.mean(0)
        deviations = samples - rough
        shift = deviations.sum(0).double() / n  # what float32 rounding left out of the mean
        mean = rough.double() + shift
        m2 = deviations.square().sum(0).double() - shift.square() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    @staticmethod
    def merged(parts: list[Moments]) -> Moments:
        """The statistics of the samples of every part (parts that are one object count once)."""
        distinct = list({id(p): p for p in parts}.values())
        if len(distinct) == 1:
            return distinct[0]
        out = Moments()
        out.count = sum(p.count for p in distinct)
        out.mean = sum(p.mean * p.count for p in distinct) / out.count
        out.m2 = sum(p.m2 + (p.mean - out.mean).square() * p.count for p in distinct)
        return out

    def sum_squares(self) -> torch.Tensor:
        """Sum over the samples of the squared values, per position."""
        return self.m2 + self.mean.square() * self.count

    def variance(self, ddof: int) -> torch.Tensor:
        """Variance per position, dividing by ``count - ddof`` (0 where that is not positive)."""
        return self.m2 / (self.count - ddof) if self.count > ddof else torch.zeros_like(self.m2)


def site_key(site: ActivationSite) -> tuple:
    """Sites with one key watch the same tensor dimension of the same module call."""
    return (id(site.module), site.call, site.kind, site.index, site.dim)


def collect(
    mask: Mask,
    sites: Sequence[ActivationSite],
    values: Samples,
    data: Iterable[Any],
    *,
    inputs: BatchInputs | None,
    max_batches: int | None,
    desc: str,
) -> dict[tuple, Moments]:
    """Run the calibration ``data`` through ``mask.model`` and gather :class:`Moments` at ``sites``.

    Returns them by :func:`site_key`. Sites that see the very same tensor in a forward (the query, key and
    value projections reading one normalised hidden state) share one :class:`Moments`: it is measured once.
    Sites the batches never reached have none. Under ``torch.distributed`` the statistics of every rank are
    merged before they are returned.
    """
    model = mask.model
    moments: dict[tuple, Moments] = {}
    seen: dict[tuple[int, int], tuple[torch.Tensor, tuple]] = {}  # this forward's tensors, held until the next

    def on_tensor(site: ActivationSite, tensor: torch.Tensor) -> None:
        if tensor.dim() <= site.dim or not tensor.is_floating_point():
            return
        key = site_key(site)
        first = seen.get((id(tensor), site.dim))
        if first is not None and first[0] is tensor:
            if first[1] != key:
                moments.setdefault(key, moments[first[1]])
            return
        seen[(id(tensor), site.dim)] = (tensor, key)
        moments.setdefault(key, Moments()).add(values(site, tensor.detach()))

    handle = model.register_forward_pre_hook(lambda *_: seen.clear())
    distinct = {site_key(s): s for s in sites}
    try:
        with evaluating(model), torch.no_grad(), watch(model, list(distinct.values()), on_tensor):
            run_batches(model, data, inputs=inputs, max_batches=max_batches, desc=desc)
    finally:
        handle.remove()
        seen.clear()
    if is_distributed():
        _merge_ranks(moments, list(distinct))
    return moments


def tokens(site: ActivationSite, tensor: torch.Tensor) -> torch.Tensor:
    """Every position of every sample as one sample: ``(tokens, channels)``."""
    moved = tensor.movedim(site.dim, -1)
    return moved.reshape(-1, moved.shape[-1])


def _merge_ranks(moments: dict[tuple, Moments], keys: list[tuple]) -> None:
    """Every rank's counts, sums and sums of squares added up, for the sites of ``keys`` (same order on every rank)."""
    reached = torch.tensor([float(k in moments) for k in keys])
    (reached,) = all_reduce_sum([reached])
    ranks = torch.distributed.get_world_size()
    if bool((reached.gt(0) & reached.lt(ranks)).any()):
        raise RuntimeError("the calibration batches reached some activations on some ranks only")
    live = list({id(moments[k]): moments[k] for k in keys if k in moments}.values())
    counts = torch.tensor([float(m.count) for m in live], dtype=torch.float64)
    sums = [m.mean * m.count for m in live]
    squares = [m.sum_squares() for m in live]
    counts, *merged = all_reduce_sum([counts, *sums, *squares])
    for m, n, total, square in zip(live, counts.tolist(), merged[: len(live)], merged[len(live) :], strict=True):
        m.count = int(n)
        m.mean = total / n
        m.m2 = (square - m.mean.square() * n).clamp_min(0)
