"""Find channel counts that the model's own code fixes, by a trial export on the meta device.

Tracing sees tensors, not Python integers: ``C = x.shape[-1]`` read from one
tensor and used to reshape another couples two spaces invisibly (Swin, MaxViT).
So after grouping, a weightless copy of the model is exported with one channel
removed from every group and run on meta tensors. If it fails, bisection finds
the groups whose size the code fixes; they are frozen with the model's error
as the reason. Costs one meta forward when nothing is wrong.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ._export import Plan, apply_plan
from ._trace import call_model, iter_tensors

MAX_PROBES = 200


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters, buffers and tensor attributes live on the meta device."""
    memo: dict[int, Any] = {}
    tensors = itertools.chain(
        model.parameters(),
        model.buffers(),
        (v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)),
    )
    for t in tensors:
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def to_meta(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return torch.empty_like(inputs, device="meta") if inputs.is_floating_point() else inputs.to("meta")
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        return type(inputs)(*(to_meta(v) for v in inputs))
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_meta(v) for v in inputs)
    if isinstance(inputs, dict):
        return type(inputs)((k, to_meta(v)) for k, v in inputs.items())
    return inputs


class FastMetaNorms(TorchFunctionMode):
    """``F.batch_norm`` on meta tensors: the same shape checks, without the slow Python decomposition.

    A weightless forward spends most of its time in batch norm's meta kernel (about 2.5 ms a call);
    only the shapes matter here, so they are checked and an empty tensor of the input's shape returned.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm or not args[0].is_meta:
            return func(*args, **kwargs)
        bound = _BATCH_NORM.bind(*args, **kwargs)
        bound.apply_defaults()
        x = bound.arguments["input"]
        channels = x.shape[1] if x.dim() > 1 else 0
        for name in ("running_mean", "running_var", "weight", "bias"):
            t = bound.arguments[name]
            if t is not None and t.numel() != channels:
                raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if bound.arguments["training"] and x.numel() == channels:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
        return torch.empty_like(x)


_BATCH_NORM = inspect.signature(F.batch_norm)


def _runs(model: nn.Module, inputs: Any, modes: list[bool]) -> str | None:
    """None if the model runs in every mode, else the first error."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        for mode in modes:
            model.train(mode)
            with torch.no_grad(), FastMetaNorms():
                out = call_model(model, inputs)
            for _ in iter_tensors(out):
                pass
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    finally:
        for m, mode in saved:
            m.training = mode
    return None


def fixed_size_groups(
    model: nn.Module,
    inputs: Any,
    modes: list[bool],
    n_groups: int,
    plan_for: Callable[[list[int]], Plan],
    suspects: set[int],
) -> tuple[dict[int, str], str | None]:
    """Groups whose channel count the model's code fixes, with the error removing a channel causes.

    ``suspects`` (groups whose size the code read) are searched alone when the
    others export fine. Returns ({group index: error}, note); the note says why
    no check was possible.
    """
    try:
        base = meta_copy(model)
        meta_inputs = to_meta(inputs)
    except Exception as error:  # noqa: BLE001
        return {}, f"no trial export on the meta device ({type(error).__name__}: {error})"
    probes = 0

    def failing(subset: list[int]) -> str | None:
        nonlocal probes
        probes += 1
        log = apply_plan(base, plan_for(subset))
        try:
            return _runs(base, meta_inputs, modes)
        finally:
            log.undo()

    culprits: dict[int, str] = {}
    remaining = list(range(n_groups))
    error = failing(remaining)
    if error is not None and (failure := _runs(base, meta_inputs, modes)) is not None:
        return {}, f"no trial export: the model does not run on the meta device ({failure})"
    innocent = [g for g in remaining if g not in suspects]
    if error is not None and suspects and innocent and failing(innocent) is None:
        for g in innocent:
            remaining.remove(g)
    while error is not None and remaining and probes < MAX_PROBES:
        candidates = remaining
        while len(candidates) > 1 and probes < MAX_PROBES:
            half = candidates[: len(candidates) // 2]
            if (found := failing(half)) is not None:
                candidates, error = half, found
                continue
            rest = candidates[len(candidates) // 2 :]
            if (found := failing(rest)) is None:
                break  # only the combination fails: freeze all of it
            candidates, error = rest, found
        for g in candidates:
            culprits[g] = error
        remaining = [g for g in remaining if g not in culprits]
        error = failing(remaining) if remaining else None
    if error is not None and remaining:
        for g in remaining:
            culprits[g] = error
    return culprits, None
