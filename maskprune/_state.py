"""A Mask's checkpoint: keep flags, schedule position, requested ratios and the criterion's state.

Tensors, numbers, strings, lists and dicts only, so ``torch.load(path, weights_only=True)`` reads it
back. The model's own ``state_dict()`` is not part of it (save it next to this one): masking never
changes the model's keys, so a masked model's checkpoint loads into an unmasked copy too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ._algorithm import Algorithm
    from ._pruning import Pruner
    from ._selection import Selection
    from ._settings import Settings

FORMAT = 2
READS = (1, 2)  # format 1 had no "settings": its schedule is taken on trust
#: The options a state is only valid under: the schedule it is a position in.
SCHEDULE = (
    "ratio",
    "target_flops",
    "target_params",
    "ratios",
    "allocation",
    "min_channels",
    "max_ratio",
    "round_to",
    "steps",
    "ramp",
    "pre_layer",
)
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


@dataclass
class MaskState:
    """A checked Mask state, ready to be put into the Mask it was checked against."""

    keep: np.ndarray
    semantics: str
    step: int
    cursor: int
    layer_counts: tuple[np.ndarray, ...] | None
    requested: dict[int, float]
    algorithm: dict


def mask_state(
    selection: Selection, pruner: Pruner, requested: dict[int, float], algorithm: Algorithm | None
) -> dict[str, Any]:
    """Everything ``do_mask()`` needs to continue exactly where a Mask is."""
    counts = pruner.layer_counts
    return {
        "format": FORMAT,
        "group_sizes": torch.tensor([g.size for g in selection.groups]),
        "keep": torch.as_tensor(selection.keep.copy()),
        "semantics": pruner.settings.semantics,
        "step": pruner.step,
        "cursor": pruner.cursor,
        "layer_counts": None if counts is None else [torch.as_tensor(part) for part in counts],
        "requested": {int(k): float(v) for k, v in requested.items()},
        "algorithm_type": _algorithm_type(algorithm),
        "algorithm": algorithm.state_dict() if algorithm is not None else {},
        "settings": _schedule(pruner.settings),
    }


def read_mask_state(state: Any, selection: Selection, settings: Settings, algorithm: Algorithm | None) -> MaskState:
    """``state`` (from :func:`mask_state`) checked against ``selection``, the Mask's options and its criterion."""
    if not isinstance(state, dict):
        raise TypeError(f"a Mask state is the dict Mask.state_dict() returns, got {type(state).__name__}")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"not a Mask state: missing {', '.join(missing)} (expected the keys {', '.join(KEYS)})")
    if state["format"] not in READS:
        raise ValueError(f"Mask state format {state['format']!r} is not supported (this version reads {READS})")
    if "settings" in state:
        saved, now = state["settings"], _schedule(settings)
        differ = [k for k in SCHEDULE if saved.get(k) != now[k]]
        if differ:
            said = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            have = ", ".join(f"{k}={now[k]!r}" for k in differ)
            raise ValueError(
                f"the state was saved by a Mask with {said}; this one has {have}: "
                "make the Mask with the options of the one that saved it"
            )
    sizes = [g.size for g in selection.groups]
    saved = [int(n) for n in state["group_sizes"]]
    if saved != sizes:
        raise ValueError(
            f"the state is of a Mask with {len(saved)} groups of sizes {saved[:8]}..., this one has {len(sizes)} "
            f"groups of sizes {sizes[:8]}...: load it into a Mask made on the same architecture and inputs"
        )
    keep = state["keep"].numpy().astype(bool) if isinstance(state["keep"], torch.Tensor) else None
    if keep is None or keep.shape != selection.keep.shape:
        raise ValueError(f"the state's keep flags do not fit: expected a bool tensor of shape {selection.keep.shape}")
    if state["algorithm_type"] != _algorithm_type(algorithm):
        raise ValueError(
            f"the state was saved with the criterion {state['algorithm_type']}, this Mask has "
            f"{_algorithm_type(algorithm)}: give the Mask the same criterion"
        )
    counts = state["layer_counts"]
    return MaskState(
        keep=keep,
        semantics=state["semantics"],
        step=int(state["step"]),
        cursor=int(state["cursor"]),
        layer_counts=None if counts is None else tuple(np.asarray(part.numpy()) for part in counts),
        requested={int(k): float(v) for k, v in state["requested"].items()},
        algorithm=state["algorithm"],
    )


def _schedule(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in SCHEDULE}


def _algorithm_type(algorithm: Algorithm | None) -> str:
    return type(algorithm).__name__ if algorithm is not None else "None"
