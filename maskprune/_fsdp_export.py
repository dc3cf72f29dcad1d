"""The export of a model sharded by FSDP2: a plain copy gathered on the CPU, sliced, verified.

Every rank calls it (each sharded parameter is all-gathered, and the verification runs the masked,
sharded model once); every rank, or rank 0 alone, gets the plain pruned model.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._activations import strip_watch_hooks
from ._export import apply_plan
from ._fsdp import is_sharded, resharded
from ._hf import export_attributes
from ._meta import copy_modules
from ._records import model_device, to_device
from ._spec import PruneSpec, attach_text
from ._verify import compare, float32_outputs
from ._walk import ModelIndex
from .errors import ExportError

if TYPE_CHECKING:
    from ._masking import MaskRuntime
    from ._selection import Selection

def gathered_copy(model: nn.Module, keep: bool = True) -> nn.Module | None:
    """A plain copy of a ``fully_shard``-ed ``model`` on the CPU: full tensors, its own classes, no FSDP hooks.

    A collective: every rank gathers every sharded parameter. ``keep=False`` (the ranks that do not
    need the copy) drops each full tensor as soon as it is gathered and returns None.
    """
    resharded(model)
    memo: dict[int, Any] = {}
    tensors = itertools.chain(
        ((t, True) for t in model.parameters()), ((t, False) for t in model.buffers() if t is not None)
    )
    with torch.no_grad():
        for tensor, is_param in tensors:
            full = tensor.full_tensor() if is_sharded(tensor) else tensor.detach()
            if not keep:
                continue
            full = full.to("cpu", copy=True)
            memo[id(tensor)] = nn.Parameter(full, requires_grad=tensor.requires_grad) if is_param else full
    if not keep:
        return None
    return copy_modules(model, memo)  # as a plain module: without FSDP's class, hooks and state


def sharded_export(
    model: nn.Module,
    selection: Selection,
    runtime: MaskRuntime,
    batches: list[Any],
    verify: bool,
    rtol: float | None,
    keep: bool,
) -> nn.Module | None:
    """The pruned model of a ``fully_shard``-ed, masked ``model``: a gathered plain copy on the CPU, sliced by the
    selection's plan and verified against the masked, sharded model on each of ``batches``. A collective;
    ``keep=False``: this rank takes part but gets None."""
    if verify:  # every rank: FSDP gathers each block's weights (on their device: example inputs may be on the CPU)
        soft = [float32_outputs(model, to_device(batch, model_device(model))) for batch in batches]
    runtime.uninstall()  # the copy takes no mask hook
    try:
        plain = gathered_copy(model, keep)
    finally:
        runtime.install()
    if plain is None:
        return None
    strip_watch_hooks(plain)
    index = ModelIndex(plain)
    plan, attributes = selection.plan(), selection.attributes(index.modules)
    attributes, info = export_attributes(index, plan, attributes)
    removed = selection.removed_entries()
    spec_text = PruneSpec.text_of_plan(index, plan, attributes, removed, info)
    if plan or removed:
        apply_plan(index, plan, attributes, removed)
    if verify:
        cpu = torch.device("cpu")
        for i, (batch, outputs) in enumerate(zip(batches, soft, strict=True)):
            result = compare([s.to(cpu) for s in outputs], float32_outputs(plain, to_device(batch, cpu)), rtol)
            if not result:
                on = "" if i == 0 else f" on verify_inputs[{i - 1}]"
                raise ExportError(f"the exported model differs from the masked, sharded model{on}: {result}")
    attach_text(plain, spec_text)
    return plain
