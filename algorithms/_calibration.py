"""Running calibration batches through a model: eval mode, no gradients, the model's device, a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from torch import nn

from maskprune import batch_input, call_model, model_device, progress, to_device

BatchInputs = Callable[[Any], Any]


def check_batches(max_batches: int | None) -> int | None:
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    return max_batches


def check_inputs(inputs: BatchInputs | None) -> BatchInputs | None:
    if inputs is not None and not callable(inputs):
        raise TypeError(f"inputs must be a function batch -> model inputs, got {type(inputs).__name__}")
    return inputs


def run_batches(
    model: nn.Module,
    data: Iterable[Any],
    *,
    inputs: BatchInputs | None,
    max_batches: int | None,
    desc: str,
) -> int:
    """Feed the batches of ``data`` to ``model`` (call inside :func:`maskprune.evaluating`, ``torch.no_grad()`` and a
    ``watch``); returns their count.

    Raises ValueError when ``data`` gives no batch (an exhausted iterator, for one) or when the model
    rejects a batch (naming it, counted from 0, with the model's error).
    """
    device = model_device(model)
    get = inputs or batch_input
    total = len(data) if hasattr(data, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    batches = data if max_batches is None else islice(data, max_batches)
    count = 0
    for batch in progress(batches, desc=desc, total=total, unit="batch"):
        fed = to_device(get(batch), device)
        try:
            call_model(model, fed)
        except Exception as error:
            raise ValueError(
                f"{desc}: the model rejected calibration batch {count} (counted from 0): "
                f"{type(error).__name__}: {error}"
            ) from error
        count += 1
    if count == 0:
        raise ValueError(
            f"{desc}: the calibration data gave no batch (an exhausted iterator? pass a DataLoader or a list, "
            "which can be iterated again at every do_mask())"
        )
    return count
