"""Activation importance (Minitron; Muralidharan et al. 2024): the magnitude of what a channel carries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maskprune import ActivationSite, Group, Mask

from ._calibrated import Calibrated
from ._calibration import BatchInputs
from ._consumers import consumer_input_sites, covers
from ._moments import Moments, site_key

AGGREGATIONS = ("l2", "mean", "var")


@dataclass
class _Plan:
    sites: list[ActivationSite]


class Activation(Calibrated):
    """Minitron's activation importance: how large a channel's activations are on calibration batches.

    Muralidharan et al. 2024 ("Compact Language Models via Pruning and Knowledge Distillation") score a
    head by the norm of its attention output, an MLP neuron by its activation after the first projection
    (for SwiGLU, ``act(gate) * up``) and a hidden (embedding) channel by the output of the LayerNorms or
    RMSNorms that feed the blocks, with forward passes only. One rule gives all three: a channel is
    measured where the layers that read it take it in (the group's consumers): the input of ``o_proj``
    (a head's columns), of ``down_proj`` (a neuron), of the projections after each norm (a hidden channel;
    the final norm's output, read by the language-model head, counts too). Several consumers reading one
    tensor (query, key and value projections) measure it once.

    Per sample, the activation ``a`` of a channel is aggregated over the sequence (every position but the
    batch): ``seq_agg="mean"`` the mean of ``|a|``, ``"l2"`` the norm of ``a``, ``"var"`` the variance of
    ``a``; then over the samples of every batch: ``batch_agg="l2"`` the norm, ``"mean"``, ``"var"`` (the
    variance). A channel at several positions (a head's columns) takes the norm of its positions' scores;
    a channel measured at several tensors (a hidden channel after every norm) sums them. The paper ablates
    mean, L2 norm and variance over each axis; the defaults, ``batch_agg="l2", seq_agg="mean"``, are what
    its reference implementation (NVIDIA Model Optimizer's Minitron pruning) computes for heads, neurons and
    hidden channels: the mean of ``|a|`` over the sequence, squared, summed over the batch, square root.

    Statistics are kept per channel on the model's device (the count, mean and sum of squared deviations
    of the per-sample values), never the activations. A group no consumer layer reads as a module input is
    declined (:attr:`declined`). Scores are not compared across groups: a global allocation divides each
    group's scores by their mean.

    Args:
        data: calibration batches: a DataLoader, a list, any iterable that can be iterated again at every
            ``do_mask()``. A batch is a tensor, a dict or ``BatchEncoding`` (keyword arguments) or a
            tuple/list ``(inputs, targets, ...)`` whose element 0 is fed.
        batch_agg: ``"l2"``, ``"mean"`` or ``"var"`` over the samples.
        seq_agg: ``"mean"``, ``"l2"`` or ``"var"`` over the positions of one sample.
        max_batches: use at most this many batches per ``do_mask()``.
        inputs: ``inputs(batch)`` gives what to feed when the default above does not fit.

    Examples:
        >>> from maskprune import Mask
        >>> from maskprune.algorithms import Activation
        >>> from maskprune.testing import TINY_MODELS
        >>> model, x = TINY_MODELS["grouped_query_attention"]()
        >>> mask = Mask(model, x, algorithm=Activation([x, x]), ratio=0.5).make()
        >>> mask.do_mask()
        True
    """

    def __init__(
        self,
        data: Iterable[Any],
        *,
        batch_agg: str = "l2",
        seq_agg: str = "mean",
        max_batches: int | None = None,
        inputs: BatchInputs | None = None,
    ) -> None:
        for name, value in (("batch_agg", batch_agg), ("seq_agg", seq_agg)):
            if value not in AGGREGATIONS:
                raise ValueError(f"{name} must be one of {AGGREGATIONS}, got {value!r}")
        super().__init__(data, max_batches=max_batches, inputs=inputs)
        self.batch_agg = batch_agg
        self.seq_agg = seq_agg

    def plan(self, mask: Mask, group: Group) -> _Plan | str:
        sites = consumer_input_sites(mask, group)
        if not sites or not covers(sites, group.size):
            return "no layer reads its channels as a module input"
        return _Plan(sites)

    def samples(self, site: ActivationSite, tensor: torch.Tensor) -> torch.Tensor:
        """Per sample (the first dim other than the channel's), the sequence aggregate of each channel."""
        moved = tensor.movedim(site.dim, -1).float()
        per_sample = moved.reshape(moved.shape[0] if moved.dim() > 1 else 1, -1, moved.shape[-1])
        if self.seq_agg == "mean":
            return per_sample.abs().mean(1)
        if self.seq_agg == "l2":
            return torch.linalg.vector_norm(per_sample, dim=1)
        return per_sample.var(1, correction=0)

    def scores(self, group: Group, plan: _Plan, moments: dict[tuple, Moments]) -> np.ndarray:
        total = torch.zeros(group.size, dtype=torch.float64)
        seen: set[int] = set()
        for site in plan.sites:
            stats = moments[site_key(site)]
            if id(stats) in seen:
                continue  # the same tensor as an earlier site (query, key and value read one input)
            seen.add(id(stats))
            if self.batch_agg == "l2":
                per_position = stats.sum_squares().sqrt()
            elif self.batch_agg == "mean":
                per_position = stats.mean
            else:
                per_position = stats.variance(ddof=0)
            squares = site.per_channel(per_position.square(), group.size)
            total += squares.sqrt().cpu()
        return total.numpy()

    def __repr__(self) -> str:
        return f"Activation(batch_agg={self.batch_agg!r}, seq_agg={self.seq_agg!r}, max_batches={self.max_batches})"
