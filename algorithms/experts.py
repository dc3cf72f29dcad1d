"""Router usage: how much routing weight the tokens of calibration batches give each expert of an MoE layer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from maskprune import Group, Mask, evaluating
from maskprune.distributed import all_reduce_sum

from ._calibration import BatchInputs, run_batches
from ._prepared import Prepared


class RouterUsage(Prepared):
    """The mean routing weight of each expert: its score in the router's top-k, summed over the tokens of the
    calibration batches and divided by their number (0 for a token not routed to it).

    Scores the groups of ``kind == "experts"`` (mixture-of-experts layers) and declines every other group. The
    router's output is read after the Mask's own hook, so experts already removed score 0. An expert the tokens
    seldom choose, or choose with a small weight, scores low and is removed first.

    Args:
        data: calibration batches (a DataLoader, a list: anything iterable again at each ``do_mask()``).
        inputs: batch -> model inputs; by default a tensor or a dict is the input and a tuple or list
            ``(inputs, targets, ...)`` gives its first element.
        max_batches: batches per ``do_mask()`` at most (all when None).
    """

    kinds = ("experts",)

    def __init__(self, data: Iterable[Any], *, inputs: BatchInputs | None = None, max_batches: int | None = None):
        super().__init__(data, max_batches=max_batches, inputs=inputs)

    def prepare(self, mask: Mask, groups: Sequence[Group]) -> None:
        """Run the calibration batches, summing each expert's routing weight and the token count at every router."""
        layers = [g for g in groups if g.kind == "experts"]
        self._scores = {}
        if not layers:
            return
        model = mask.model
        sums = [torch.zeros(g.size, dtype=torch.float64) for g in layers]
        counts = [torch.zeros((), dtype=torch.float64) for _ in layers]
        handles = [
            model.get_submodule(g.router).register_forward_hook(_tally(sums, counts, i)) for i, g in enumerate(layers)
        ]
        try:
            with evaluating(model), torch.no_grad():
                run_batches(model, self.data, inputs=self.inputs, max_batches=self.max_batches, desc="RouterUsage")
        finally:
            for handle in handles:
                handle.remove()
        reduced = all_reduce_sum([*sums, *counts])
        for i, group in enumerate(layers):
            self._scores[group] = (reduced[i] / reduced[len(layers) + i].clamp(min=1)).cpu().numpy()

    def __repr__(self) -> str:
        return f"RouterUsage(max_batches={self.max_batches})"


def _tally(sums: list[torch.Tensor], counts: list[torch.Tensor], i: int):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        _, scores, indices = output
        weights = scores.detach().double().reshape(-1, indices.shape[-1])
        chosen = indices.reshape(-1, indices.shape[-1])
        if sums[i].device != weights.device:
            sums[i], counts[i] = sums[i].to(weights.device), counts[i].to(weights.device)
        sums[i].index_add_(0, chosen.flatten(), weights.flatten())
        counts[i] += chosen.shape[0]

    return hook
