"""FLOPs of the model a mask would export, counted on the would-be exported shapes.

A weightless copy of the model on the meta device is sliced by the export plan,
run once in eval mode under ``torch.utils.flop_counter``, and put back: the count
is the exported model's, not an estimate from a nominal pruning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._attributes import Attributes
from ._export import Plan, apply_plan
from ._meta import FastMeta, meta_copy, to_meta
from ._records import call_model
from ._walk import ModelIndex


@dataclass
class FlopCount:
    """Total FLOPs of one eval forward, and the FLOPs of each module by qualified name ('' is the root)."""

    total: int
    per_module: dict[str, int]


class FlopsProbe:
    """Counts the FLOPs of exports of one model without touching its weights.

    Examples:
        >>> model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), torch.randn(1, 3, 32, 32)
        >>> probe = FlopsProbe(model, x)
        >>> probe.count({}).total == maskprune.count_flops(model, x)
        True
    """

    def __init__(self, model: nn.Module, inputs: Any, shadow: nn.Module | None = None) -> None:
        """``shadow``: a meta copy of ``model`` to use instead of making one."""
        self.model = (shadow if shadow is not None else meta_copy(ModelIndex(model))).eval()
        self.index = ModelIndex(self.model)  # the same after every undo
        self.inputs = to_meta(inputs)
        self._dense: FlopCount | None = None

    def count(self, plan: Plan, attributes: Attributes | None = None) -> FlopCount:
        """FLOPs of the model sliced by ``plan`` (an empty plan: the unpruned model), with the counts its code
        reads set to ``attributes`` (``Selection.attributes`` of this probe's modules)."""
        if not plan and self._dense is not None:
            return self._dense
        from torch.utils.flop_counter import FlopCounterMode  # imported at first use: it imports triton

        log = apply_plan(self.index, plan, attributes) if plan else None
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter, FastMeta(products=False):
                call_model(self.model, self.inputs)
        finally:
            if log is not None:
                log.undo()
        per_module = {}
        for name, ops in counter.get_flop_counts().items():
            if name == "Global":
                continue
            _, _, path = name.partition(".")
            per_module[path] = int(sum(ops.values()))
        result = FlopCount(int(counter.get_total_flops()), per_module)
        if not plan:
            self._dense = result
        return result
