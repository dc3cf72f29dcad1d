"""Structured Wanda (Sun et al. 2023; the ``wanda_sp`` baseline of FLAP, An et al. 2024): |W| times input norms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from maskprune import ActivationSite, Group, Mask

from ._calibrated import Calibrated
from ._calibration import BatchInputs
from ._combine import per_unit
from ._consumers import ReaderPlan, reader_plan
from ._moments import Moments, tokens


class WandaSP(Calibrated):
    """Structured Wanda: a channel scores ``sum over i of |W_ij| * ||X_j||_2`` at every layer that reads it.

    Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models") scores a
    weight by ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the norm of input feature ``j`` over every
    calibration token; its structured form (``wanda_sp`` in FLAP's code) removes whole input channels of a
    layer. Here a channel ``j`` of a group is an input channel of its consumers (the layers whose weights
    read it: an attention's output projection for a head, the MLP's down projection for a neuron, every
    projection of a block for a hidden channel); its score is the sum of its elements' scores over every
    consumer and every position it occupies (a head's columns). FLAP's code averages over the output rows
    instead of summing, which ranks a layer's channels the same.

    At every ``do_mask()`` the calibration ``data`` runs through the model (eval mode, no gradients, on
    the model's device, a progress bar); per input feature only a count, a mean and a sum of squared
    deviations are kept, on the device. Groups read by a layer whose weight does not pair with its input
    (a functional call, a grouped convolution) are declined (:attr:`declined`). Scores are not compared
    across groups: a global allocation divides each group's scores by their mean.

    Args:
        data: calibration batches: a DataLoader, a list, any iterable that can be iterated again at every
            ``do_mask()``. A batch is a tensor, a dict or ``BatchEncoding`` (keyword arguments) or a
            tuple/list ``(inputs, targets, ...)`` whose element 0 is fed.
        max_batches: use at most this many batches per ``do_mask()``.
        inputs: ``inputs(batch)`` gives what to feed when the default above does not fit.

    Examples:
        >>> from maskprune import Mask
        >>> from maskprune.algorithms import WandaSP
        >>> from maskprune.testing import TINY_MODELS
        >>> model, x = TINY_MODELS["grouped_query_attention"]()
        >>> mask = Mask(model, x, algorithm=WandaSP([x, x]), ratio=0.5).make()
        >>> mask.do_mask()
        True
    """

    def __init__(
        self, data: Iterable[Any], *, max_batches: int | None = None, inputs: BatchInputs | None = None
    ) -> None:
        super().__init__(data, max_batches=max_batches, inputs=inputs)

    def plan(self, mask: Mask, group: Group) -> ReaderPlan | str:
        return reader_plan(mask, group)

    def samples(self, site: ActivationSite, tensor: torch.Tensor) -> torch.Tensor:
        return tokens(site, tensor)

    def scores(self, group: Group, plan: ReaderPlan, moments: dict[tuple, Moments]) -> np.ndarray:
        total = torch.zeros(group.size, dtype=torch.float64)
        for reader in plan.readers:
            norms = reader.statistics(moments).sum_squares().sqrt()
            elements = reader.column_sums(1).to(norms.device) * norms
            total += per_unit(reader.member, elements, group.size).cpu()
        return total.numpy()

    def __repr__(self) -> str:
        return f"WandaSP(max_batches={self.max_batches})"
