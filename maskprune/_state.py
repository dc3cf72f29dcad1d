"""A Mask's checkpoint: keep flags, schedule position, requested ratios and the criterion's state.

Tensors, numbers, strings, lists and dicts only, so ``torch.load(path, weights_only=True)`` reads it
back. The model's own ``state_dict()`` is not part of it (save it next to this one): masking never
changes the model's keys, so a masked model's checkpoint loads into an unmasked copy too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .mask import Mask

FORMAT = 1
KEYS = (
    "format",
    "group_sizes",
    "keep",
    "semantics",
    "step",
    "cursor",
    "layer_counts",
    "requested",
    "algorithm_type",
    "algorithm",
)


def mask_state(mask: Mask) -> dict[str, Any]:
    """Everything ``do_mask()`` needs to continue exactly where ``mask`` is."""
    pruner = mask._pruner
    counts = pruner.layer_counts
    return {
        "format": FORMAT,
        "group_sizes": torch.tensor([g.size for g in mask.groups]),
        "keep": torch.as_tensor(mask._keep.copy()),
        "semantics": mask.settings.semantics,
        "step": pruner.step,
        "cursor": pruner.cursor,
        "layer_counts": None if counts is None else [torch.as_tensor(part) for part in counts],
        "requested": {int(k): float(v) for k, v in mask._requested.items()},
        "algorithm_type": _algorithm_type(mask),
        "algorithm": mask.algorithm.state_dict() if mask.algorithm is not None else {},
    }


def load_mask_state(mask: Mask, state: Any) -> None:
    """Put ``state`` (from :func:`mask_state`) into ``mask``; checked first, so a bad state changes nothing."""
    if not isinstance(state, dict):
        raise TypeError(f"a Mask state is the dict Mask.state_dict() returns, got {type(state).__name__}")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"not a Mask state: missing {', '.join(missing)} (expected the keys {', '.join(KEYS)})")
    if state["format"] != FORMAT:
        raise ValueError(f"Mask state format {state['format']!r} is not supported (this version reads {FORMAT})")
    sizes = [g.size for g in mask.groups]
    saved = [int(n) for n in state["group_sizes"]]
    if saved != sizes:
        raise ValueError(
            f"the state is of a Mask with {len(saved)} groups of sizes {saved[:8]}..., this one has {len(sizes)} "
            f"groups of sizes {sizes[:8]}...: load it into a Mask made on the same architecture and inputs"
        )
    keep = state["keep"].numpy().astype(bool) if isinstance(state["keep"], torch.Tensor) else None
    if keep is None or keep.shape != mask._keep.shape:
        raise ValueError(f"the state's keep flags do not fit: expected a bool tensor of shape {mask._keep.shape}")
    if state["algorithm_type"] != _algorithm_type(mask):
        raise ValueError(
            f"the state was saved with the criterion {state['algorithm_type']}, this Mask has {_algorithm_type(mask)}: "
            "give the Mask the same criterion"
        )
    if mask.algorithm is not None:
        mask.algorithm.load_state_dict(state["algorithm"])
    pruner = mask._pruner
    pruner.step, pruner.cursor = int(state["step"]), int(state["cursor"])
    counts = state["layer_counts"]
    pruner.layer_counts = None if counts is None else tuple(np.asarray(part.numpy()) for part in counts)
    mask._requested = {int(k): float(v) for k, v in state["requested"].items()}
    if state["semantics"] != mask.settings.semantics:
        mask.semantics = state["semantics"]
    mask._keep = keep
    mask._runtime.refresh(keep)
    if mask.settings.semantics == "frozen":
        mask._runtime.apply()


def _algorithm_type(mask: Mask) -> str:
    return type(mask.algorithm).__name__ if mask.algorithm is not None else "None"
