"""Size and cost of a model: parameters and FLOPs (counted by torch.utils.flop_counter)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._records import call_model, evaluating


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, each tied parameter counted once.

    Examples:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass on ``inputs`` in eval mode (a multiply-add counts as 2).

    Examples:
        >>> count_flops(torch.nn.Linear(3, 2), torch.randn(1, 3))
        12
    """
    from torch.utils.flop_counter import FlopCounterMode  # imported at first use: it imports triton

    with evaluating(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, inputs)
    return counter.get_total_flops()
