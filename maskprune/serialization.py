"""Save a pruned model as a JSON spec plus its weights; load it into a fresh copy of the original architecture.

A saved model is a folder::

    spec.json            format version, architecture, per tensor its original shape and kept positions,
                         the counts the export set on modules (num_heads …)
    model.safetensors    the weights (or model.pt, a plain state dict read with weights_only=True)

Nothing is pickled: loading runs no code from the files.

Examples:
    >>> mask = Mask(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), algorithm=L1Norm()).make()
    >>> mask.do_mask(); pruned = mask.generate_pruned_model()
    True
    >>> maskprune.save_pruned(pruned, "resnet18-pruned")
    PosixPath('resnet18-pruned')
    >>> model = maskprune.load_pruned(torchvision.models.resnet18(), "resnet18-pruned")
    >>> model.layer1[0].conv1.weight.shape
    torch.Size([32, 32, 3, 3])
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ._export import apply_plan
from ._spec import SPEC_FILE, PruneSpec, as_spec, check_fits
from ._walk import ModelIndex
from .errors import SpecError

WEIGHT_FILES = {"safetensors": "model.safetensors", "torch": "model.pt"}


def save_pruned(
    pruned: nn.Module, path: str | os.PathLike, *, weights: str = "safetensors", info: dict | None = None
) -> Path:
    """Write ``pruned`` (from :meth:`Mask.generate_pruned_model` or :func:`load_pruned`) to the folder ``path``.

    ``weights="safetensors"`` (default) or ``"torch"`` (a plain state dict). Tied parameters are stored
    once and re-tied on load. ``info``: JSON metadata kept in the spec (the CLI records the model there).
    Returns the folder.

    Examples:
        >>> mask = Mask(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(1, 4)).make()
        >>> mask.groups[0].prune([0, 1])
        >>> save_pruned(mask.generate_pruned_model(), "out")
        PosixPath('out')
    """
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    spec = PruneSpec.of(pruned)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    state, aliases = _unique_state(pruned)
    spec.info = {**spec.info, **(info or {}), "tied": aliases}
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        safetensors.torch.save_file(state, str(folder / WEIGHT_FILES[weights]), metadata={"format": "pt"})
    else:
        torch.save(state, folder / WEIGHT_FILES[weights])
    (folder / SPEC_FILE).write_text(spec.to_json())
    return folder


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Reshape ``model`` (a fresh instance of the original architecture) by the saved spec and load the weights.

    Returns ``model``, now equal to the saved pruned model (bit-identical outputs). A spec or weights
    file that does not fit raises :class:`SpecError` naming the module and what was expected, and
    leaves ``model`` untouched.

    Examples:
        >>> mask = Mask(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(1, 4)).make()
        >>> mask.groups[0].prune([0, 1])
        >>> folder = save_pruned(mask.generate_pruned_model(), "out")
        >>> load_pruned(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), folder)[0]
        Linear(in_features=4, out_features=4, bias=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pruned takes a torch.nn.Module (the original architecture), got {type(model).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder written by maskprune.save_pruned ({SPEC_FILE} + weights)")
    spec = as_spec(folder)
    state = _read_weights(folder)
    for alias, source in spec.info.get("tied", {}).items():
        if source in state:
            state[alias] = state[source]
    check_fits(spec, model)
    log = apply_plan(ModelIndex(model), spec.plan(), spec.attributes, spec.removed)
    try:
        _check_state(model, state)
        model.load_state_dict(state)
    except Exception:
        log.undo()
        raise
    spec.attach(model)
    return model


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tied tensor once (safetensors refuses shared storage), and alias -> saved name."""
    state = model.state_dict()
    aliases: dict[str, str] = {}
    for owned in ModelIndex(model).owned.values():
        names = [f"{path}.{attr}" if path else attr for path, attr in owned.names]
        names = [name for name in names if name in state]
        for alias in names[1:]:
            aliases[alias] = names[0]
    unique: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        if name in aliases:
            continue
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # a view of another tensor: store a copy
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        unique[name] = tensor
    return unique, aliases


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for kind, name in WEIGHT_FILES.items():
        file = folder / name
        if file.is_file():
            if kind == "safetensors":
                return safetensors.torch.load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in {folder}: expected {' or '.join(WEIGHT_FILES.values())}")


def _check_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    if missing:
        raise SpecError(f"the weights file lacks {len(missing)} tensors of the model, first {missing[0]!r}")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise SpecError(f"the weights file holds {len(unexpected)} tensors the model lacks, first {unexpected[0]!r}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            module = name.rpartition(".")[0] or "<root>"
            raise SpecError(
                f"module {module!r}: the reshaped model expects {name} of shape {tuple(tensor.shape)}, "
                f"the weights file holds {tuple(state[name].shape)}"
            )
