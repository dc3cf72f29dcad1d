"""ShortGPT's block influence: how much a residual block changes the hidden states it is given."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from maskprune import Group, Mask, evaluating
from maskprune.distributed import all_reduce_sum

from ._calibration import BatchInputs, run_batches
from ._prepared import Prepared


class BlockImportance(Prepared):
    """Block influence (ShortGPT, Men et al. 2024): ``BI = 1 - mean cos(x_in, x_out)`` per block.

    Scores the groups of ``kind == "block"`` (``Mask(..., depth=True)``) and declines every other
    group. For each block, the cosine similarity between its input and its first output is taken
    per token over the hidden dimension (the last one; for 4-D ``(N, C, H, W)`` feature maps, per
    pixel over the channels) and averaged over every token of every calibration batch. A block that
    barely changes its input scores low and is removed first.

    Args:
        data: calibration batches (a DataLoader, a list: anything iterable again at each ``do_mask()``).
        inputs: batch -> model inputs; by default a tensor or a dict is the input and a tuple or list
            ``(inputs, targets, ...)`` gives its first element.
        max_batches: batches per ``do_mask()`` at most (all when None).

    Examples:
        >>> model = torchvision.models.resnet18()
        >>> data = [torch.randn(2, 3, 64, 64)]
        >>> mask = Mask(model, data[0], algorithm=BlockImportance(data), ratio=0.5, depth=True).make()
        >>> mask.do_mask()
        True
        >>> [g.kept for g in mask.groups if g.kind == "block"]
        [1, 1, 1, 1]
    """

    kinds = ("block",)

    def __init__(self, data: Iterable[Any], *, inputs: BatchInputs | None = None, max_batches: int | None = None):
        super().__init__(data, max_batches=max_batches, inputs=inputs)

    def prepare(self, mask: Mask, groups: Sequence[Group]) -> None:
        """Run the calibration batches, summing ``1 - cos`` and the token count at every block's output."""
        blocks = [g for g in groups if g.kind == "block"]
        self._scores = {}
        if not blocks:
            return
        model = mask.model
        entries = [model.get_submodule(path) for g in blocks for path in g.paths]
        sums = [torch.zeros((), dtype=torch.float64) for _ in entries]
        counts = [torch.zeros((), dtype=torch.float64) for _ in entries]
        handles = [e.register_forward_hook(_tally(sums, counts, i), with_kwargs=True) for i, e in enumerate(entries)]
        try:
            with evaluating(model), torch.no_grad():
                run_batches(model, self.data, inputs=self.inputs, max_batches=self.max_batches, desc="BlockImportance")
        finally:
            for handle in handles:
                handle.remove()
        summed, tokens = all_reduce_sum([torch.stack(sums), torch.stack(counts)])
        influence = (summed / tokens.clamp(min=1)).cpu().numpy()
        start = 0
        for group in blocks:
            self._scores[group] = influence[start : start + group.size]
            start += group.size

    def __repr__(self) -> str:
        return f"BlockImportance(max_batches={self.max_batches})"


def _tally(sums: list[torch.Tensor], counts: list[torch.Tensor], i: int):
    def hook(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], output: Any) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), kwargs.get("hidden_states"))
        y = output if isinstance(output, torch.Tensor) else output[0]
        dim = 1 if x.dim() == 4 else -1
        cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=dim)
        if sums[i].device != cos.device:
            sums[i], counts[i] = sums[i].to(cos.device), counts[i].to(cos.device)
        sums[i] += (1 - cos).sum()
        counts[i] += cos.numel()

    return hook
