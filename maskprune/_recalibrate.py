"""Re-estimating BatchNorm running statistics after pruning ("adaptive BN"): forward passes only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._records import batch_input, call_model, evaluating, model_device, to_device

#: How many batches :func:`recalibrate_bn` reads by default.
DEFAULT_BATCHES = 100


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    batches: int | None = DEFAULT_BATCHES,
    inputs: Callable[[Any], Any] | None = None,
) -> int:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``model`` on ``loader``'s batches.

    Pruning changes what each BatchNorm sees, so its running statistics go stale; re-estimating
    them on a few training batches recovers much of the accuracy lost right after pruning (the
    "adaptive BN" evaluation of Li et al., EagleEye, ECCV 2020). Each BatchNorm with running
    statistics is reset and then averages over the batches cumulatively (``momentum=None``), in
    training mode; every other module stays in eval mode (dropout off), no gradient is taken and
    no weight changes. Afterwards each BatchNorm's momentum and every module's ``training`` flag
    are what they were; on an error the running statistics are put back too.

    A batch is a tensor (``model(x)``), a dict of keyword arguments (``model(**x)``), or a tuple
    or list whose first element is the input (``(images, labels)`` from a DataLoader; a tuple
    inside it is unpacked as positional arguments). ``inputs`` maps a batch to the model input
    when it is none of these. Tensors go to the device of the model's first parameter.

    The masked model of a :class:`~maskprune.Mask` and its export see the same values at every
    kept channel, so both get the same statistics from the same batches and soft == hard still
    holds; ``Mask(..., recalibrate=loader)`` calls this after every ``do_mask()`` that changed
    the masks.

    Args:
        model: any module; its BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) with
            ``track_running_stats`` are re-estimated.
        loader: an iterable of batches (a DataLoader, a list of tensors).
        batches: read at most this many batches (None: every batch of ``loader``).
        inputs: optional function batch -> model input.

    Returns:
        The number of batches run (0 when the model has no BatchNorm with running statistics).

    Raises:
        ValueError: ``batches`` below 1, or ``loader`` gave no batch.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> recalibrate_bn(model, [torch.randn(4, 3, 8, 8) for _ in range(3)])
        3
        >>> model[1].momentum, model.training, int(model[1].num_batches_tracked)
        (0.1, False, 3)
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches must be a positive integer or None, got {batches!r}")
    if inputs is not None and not callable(inputs):
        raise TypeError(f"inputs must be a function batch -> model input, got {type(inputs).__name__}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    saved = [{name: buffer.clone() for name, buffer in norm.named_buffers(recurse=False)} for norm in norms]
    device = model_device(model)
    count = 0
    try:
        with evaluating(model), torch.no_grad():  # every training flag comes back, also on error
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the batches
                norm.train()
            for batch in loader if batches is None else islice(loader, batches):
                call_model(model, to_device(inputs(batch) if inputs else batch_input(batch), device))
                count += 1
            if count == 0:
                raise ValueError(
                    "recalibrate_bn: the loader gave no batch (an exhausted iterator? pass a DataLoader or a list)"
                )
    except BaseException:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(norm, name).copy_(value)
        raise
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    return count
