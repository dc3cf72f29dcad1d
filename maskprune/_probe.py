"""Find channel counts that the model's own code fixes, by a trial export on the meta device.

Tracing sees tensors, not Python integers: ``C = x.shape[-1]`` read from one
tensor and used to reshape another couples two spaces invisibly (Swin, MaxViT).
So after grouping, a weightless copy of the model is exported with one channel
removed from every group and run on meta tensors. If it fails, bisection finds
the groups whose size the code fixes; they are frozen with the model's error
as the reason. Costs one meta forward when nothing is wrong, and is skipped
when the trace proves the export (:func:`needs_trial_export`).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._attributes import Attributes
from ._export import Plan, apply_plan
from ._graph import Resolution
from ._groups import GroupLayout, build_layout, groups_by_module, groups_of_spaces
from ._meta import FastMeta, meta_copy, to_meta
from ._records import Trace, call_model, iter_tensors
from ._selection import Selection
from ._walk import ModelIndex, restore_training, set_mode, training_flags
from .errors import first_line

MAX_PROBES = 200
MAX_NEAR = 16  # groups of the raising module tried one by one before bisecting


@dataclass(frozen=True)
class Failure:
    """Why the trial export failed, and the innermost module whose code raised (None if unknown)."""

    text: str
    module: str | None


def needs_trial_export(trace: Trace, layout: GroupLayout, size_read_groups: set[int]) -> bool:
    """Whether the trace leaves a prunable channel count that only a trial export can check.

    An export changes nothing but the sliced tensors and the attributes of the layers that hold them
    (a conv's ``groups``, a norm's ``num_features``). The model's code could still fix a count the
    rules do not see: an integer read from a tensor's size (``size_read_groups``: the groups whose
    size was read), one written in the code (a size site: ``view(B, 8, -1)``), one the rules flagged
    (``trace.unproven``: ``expand`` to a written shape, a group count outside its layer, a registered
    module), or the work of an op the trace did not see. Without any of these the trial export
    could only succeed, and is skipped; a trace of the model itself (not of a meta copy) always
    runs it.

    Examples:
        >>> mask = Mask(torchvision.models.resnet18(), input_shape=(1, 3, 64, 64)).make()
        >>> needs_trial_export(mask.selection.trace, mask.selection.layout, set())
        False
    """
    if trace.shadow is None or trace.unproven or size_read_groups:
        return True
    return bool(groups_of_spaces(layout, (site.space for site in trace.size_sites if site.written)))


def _runs(index: ModelIndex, inputs: Any, modes: list[bool]) -> Failure | None:
    """None if ``index``'s model runs in every mode, else the first error."""
    model = index.model
    flags = training_flags(index.table)
    try:
        for mode in modes:
            set_mode(model, mode)  # also when already in it: an override may clear caches (timm's LeViT)
            with torch.no_grad(), FastMeta():
                out = call_model(model, inputs)
            for _ in iter_tensors(out):
                pass
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        return Failure(first_line(error), _raising_module(error, index.paths))
    finally:
        restore_training(flags)
    return None


def _raising_module(error: Exception, paths: dict[int, str]) -> str | None:
    """The innermost module of ``paths`` whose method is on the error's traceback."""
    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in paths:
            found = paths[id(owner)]
    return found


def fixed_size_groups(
    model: nn.Module,
    inputs: Any,
    modes: list[bool],
    n_groups: int,
    plan_for: Callable[[list[int]], tuple[Plan, Attributes]],
    suspects: set[int],
    near: Callable[[str], set[int]],
    shadow: nn.Module | None = None,
) -> tuple[dict[int, str], str | None]:
    """Groups whose channel count the model's code fixes, with the error removing a channel causes.

    ``suspects`` (groups whose size the code read) are searched alone when the
    others export fine. ``near(module)``: the groups with a tensor in that module
    (or below it), tried one by one first when the export fails there.
    ``shadow``: a meta copy of ``model`` to use (the trace's).
    Returns ({group index: error}, note); the note says why no check was possible.
    """
    try:
        base = shadow if shadow is not None else meta_copy(ModelIndex(model))
        meta_inputs = to_meta(inputs)
    except Exception as error:  # noqa: BLE001
        return {}, f"no trial export on the meta device ({type(error).__name__}: {error})"
    index = ModelIndex(base)  # the same after every undo
    probes = 0

    def failing(subset: list[int]) -> Failure | None:
        nonlocal probes
        probes += 1
        log = apply_plan(index, *plan_for(subset))
        try:
            return _runs(index, meta_inputs, modes)
        finally:
            log.undo()

    culprits: dict[int, str] = {}
    remaining = list(range(n_groups))
    error = failing(remaining)
    if error is not None and (failure := _runs(index, meta_inputs, modes)) is not None:
        return {}, f"no trial export: the model does not run on the meta device ({failure.text})"
    innocent = [g for g in remaining if g not in suspects]
    if error is not None and suspects and innocent and failing(innocent) is None:
        for g in innocent:
            remaining.remove(g)
    while error is not None and remaining and probes < MAX_PROBES:
        alone = _failing_alone(failing, near(error.module) if error.module is not None else set(), remaining)
        if alone:
            culprits.update(alone)
        else:
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
                culprits[g] = error.text
        remaining = [g for g in remaining if g not in culprits]
        error = failing(remaining) if remaining else None
    if error is not None and remaining:
        for g in remaining:
            culprits[g] = error.text
    return culprits, None


def _failing_alone(
    failing: Callable[[list[int]], Failure | None], near: set[int], remaining: list[int]
) -> dict[int, str]:
    """The groups of ``near`` whose export fails on its own, with their errors (none tried if too many)."""
    tried = [g for g in remaining if g in near]
    if len(tried) > MAX_NEAR:
        return {}
    return {g: found.text for g in tried if (found := failing([g])) is not None}


def settled_layout(model: nn.Module, inputs: Any, trace: Trace, res: Resolution, layout: GroupLayout) -> GroupLayout:
    """``layout`` after the trial export: the groups whose count the model's code fixes frozen, with the reason.

    The trial export runs only where :func:`needs_trial_export` says the trace alone does not prove the export;
    a note on ``trace`` says why it could not run, where it could not.
    """
    suspects = groups_of_spaces(layout, trace.size_reads)
    if not needs_trial_export(trace, layout, suspects):
        return layout
    first = Selection(trace, res, layout)
    modules = ModelIndex(model).modules if trace.size_sites else {}

    def plan_for(groups: list[int]) -> tuple[Plan, Attributes]:
        keep = first.without_last_unit(groups)
        return first.plan(keep), first.attributes(modules, keep)

    fixed, note = fixed_size_groups(
        model, inputs, trace.modes, len(layout.groups), plan_for, suspects, groups_by_module(layout), trace.shadow
    )
    if note:
        trace.notes.append(note)
    if not fixed:
        return layout
    for index, error in fixed.items():
        start, size, _ = layout.groups[index]
        comps = np.flatnonzero((layout.component_unit >= start) & (layout.component_unit < start + size))
        res.freeze_components(comps, f"the model's code fixes this size (trial export: {error})")
    return build_layout(trace, res)
