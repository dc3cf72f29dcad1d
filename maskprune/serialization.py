"""Save a pruned model as a JSON spec plus its weights; load it into a fresh copy of the original architecture.

A saved model is a folder::

    spec.json            format version, architecture, per tensor its original shape and kept positions,
                         the counts the export set on modules (num_heads …), how to build the architecture
    model.safetensors    the weights (or model.pt, a plain state dict read with weights_only=True)

Nothing is pickled: loading runs no code from the files. ``load_pruned(folder)``, without a model, builds the
architecture the folder names: a ``transformers`` class (looked up in ``transformers`` by name) from its
config, a timm or torchvision model by name, or a ``module:factory`` only with ``trust_architecture=True``.

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
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ._export import apply_plan
from ._hf import build_transformers
from ._models import build_model
from ._spec import SPEC_FILE, PruneSpec, as_spec, check_fits
from ._walk import ModelIndex
from .errors import SpecError, SpecNotFoundError, first_line

WEIGHT_FILES = {"safetensors": "model.safetensors", "torch": "model.pt"}
OWN_FILES = frozenset({SPEC_FILE, *WEIGHT_FILES.values()})  # what save_pruned writes; the folder's other files stay
NAMED_SOURCES = ("torchvision", "timm")  # architectures built by name alone; a module:factory runs the module's code


def save_pruned(
    pruned: nn.Module,
    path: str | os.PathLike,
    *,
    weights: str = "safetensors",
    info: dict | None = None,
    architecture: str | None = None,
) -> Path:
    """Write ``pruned`` (from :meth:`Mask.generate_pruned_model` or :func:`load_pruned`) to the folder ``path``.

    ``weights="safetensors"`` (default) or ``"torch"`` (a plain state dict). Tied parameters are stored
    once and re-tied on load. ``info``: JSON metadata kept in the spec (the CLI records the model there).
    ``architecture``: how :func:`load_pruned` without a model builds the original again, where the model does
    not say it (``transformers`` and timm models do): ``"torchvision:resnet18"``, ``"timm:NAME"`` or
    ``"package.module:factory"`` (a callable returning the model; loading it needs ``trust_architecture=True``).

    The files are written into a new folder beside ``path``, which then takes its place: a crash leaves the
    old folder whole, and no weights file of the other format stays beside the new one. Other files of an
    existing folder are kept. Returns the folder.

    Examples:
        >>> mask = Mask(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(1, 4)).make()
        >>> mask.groups[0].prune([0, 1])
        >>> save_pruned(mask.generate_pruned_model(), "out")
        PosixPath('out')
    """
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    if architecture is not None:
        source, sep, item = architecture.partition(":")
        if not (sep and source and item):
            raise ValueError(
                f"architecture is torchvision:NAME, timm:NAME or package.module:factory, got {architecture!r}"
            )
    spec = PruneSpec.of(pruned)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    state, aliases = _unique_state(pruned)
    spec.info = {**spec.info, **(info or {}), "tied": aliases}
    if architecture is not None:
        spec.info["build"] = architecture
        spec.info.pop("config", None)

    def write(into: Path) -> None:
        if weights == "safetensors":
            safetensors.torch.save_file(state, str(into / WEIGHT_FILES[weights]), metadata={"format": "pt"})
        else:
            torch.save(state, into / WEIGHT_FILES[weights])
        (into / SPEC_FILE).write_text(spec.to_json())

    _replace_folder(folder.resolve(), write)  # a link's target, "." as its own name
    return folder


def load_pruned(
    model: nn.Module | str | os.PathLike, path: str | os.PathLike | None = None, *, trust_architecture: bool = False
) -> nn.Module:
    """Reshape ``model`` (a fresh instance of the original architecture) by the saved spec and load the weights.

    ``load_pruned(folder)``, without a model, builds the original architecture as the folder records it
    (see :func:`save_pruned`'s ``architecture``): a ``transformers`` model from its class name, looked up in
    ``transformers`` only, and its original config; a timm or torchvision model by name. A
    ``package.module:factory`` imports that module, which runs its code: only with ``trust_architecture=True``.

    Returns the model, now equal to the saved pruned model (bit-identical outputs). Whatever does not fit (the
    spec, an attribute the export never sets, a weights file that cannot be read or has other tensors)
    raises :class:`SpecError` saying what and where, and leaves ``model`` untouched.

    Examples:
        >>> mask = Mask(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(1, 4)).make()
        >>> mask.groups[0].prune([0, 1])
        >>> folder = save_pruned(mask.generate_pruned_model(), "out")
        >>> load_pruned(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), folder)[0]
        Linear(in_features=4, out_features=4, bias=True)
    """
    if path is None and isinstance(model, (str, os.PathLike)):
        model, path = None, model
    elif not isinstance(model, nn.Module) or path is None:
        raise TypeError(
            "load_pruned takes a folder, or a torch.nn.Module (the original architecture) and a folder, got "
            f"{type(model).__name__}" + ("" if path is None else f" and {type(path).__name__}")
        )
    folder = Path(path)
    if not folder.is_dir():
        raise SpecNotFoundError(f"{folder} is not a folder written by maskprune.save_pruned ({SPEC_FILE} + weights)")
    spec = as_spec(folder)
    state = _read_weights(folder)
    _tie(spec, state)
    if model is None:
        model = _build(spec, trust_architecture)
        _cast_to(model, state)
    check_fits(spec, model)
    try:
        log = apply_plan(ModelIndex(model), spec.plan(), spec.attributes, spec.removed)
    except Exception as error:  # undone by apply_plan
        raise SpecError(f"reshaping the {type(model).__name__} by the spec failed: {first_line(error)}") from error
    try:
        _check_state(model, state)
        model.load_state_dict(state)
    except Exception as error:
        log.undo()
        if isinstance(error, SpecError):
            raise
        raise SpecError(f"loading the weights of {folder} failed: {first_line(error)}") from error
    spec.attach(model)
    return model


def _build(spec: PruneSpec, trust: bool) -> nn.Module:
    """The original architecture, built as ``spec.info`` records it."""
    name = spec.info.get("build")
    if not isinstance(name, str):
        raise SpecError(
            "the folder does not record how to build its architecture: pass the model, load_pruned(model, folder), "
            "or save it with save_pruned(..., architecture='torchvision:NAME' or 'package.module:factory')"
        )
    source, _, item = name.partition(":")
    if source == "transformers":
        config = spec.info.get("config")
        if not isinstance(config, dict):
            raise SpecError(f"the folder names {name!r} but holds no config to build it from")
        return build_transformers(item, config)
    if source not in NAMED_SOURCES and not trust:
        raise SpecError(
            f"the folder builds its architecture with {name!r}, which imports {source!r} and runs its code: "
            "pass load_pruned(folder, trust_architecture=True) if you trust the folder, or pass the model, "
            "load_pruned(model, folder)"
        )
    try:
        return build_model(name)
    except Exception as error:
        raise SpecError(f"cannot build the architecture {name!r}: {first_line(error)}") from error


def _cast_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A model built here takes the weights' floating dtype, where they have one (a bfloat16 save stays so)."""
    dtypes = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())


def _tie(spec: PruneSpec, state: dict[str, torch.Tensor]) -> None:
    """Every other name of a tied tensor, from the name stored in the weights file."""
    tied = spec.info.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise SpecError("malformed pruning spec: info.tied maps tensor names to tensor names")
    for alias, source in tied.items():
        if source in state:
            state[alias] = state[source]


def _replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a new folder beside ``folder`` (with the old folder's other files), then rename it into
    place. Until the rename the old folder is whole; a failure removes the new one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:12]}.saving"
    staging.mkdir()
    try:
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name not in OWN_FILES:
                    _carry(entry, staging / entry.name)
        write(staging)
        if not folder.is_dir():
            staging.rename(folder)
            return
        old = staging.with_suffix(".old")
        folder.rename(old)
        try:
            staging.rename(folder)
        except BaseException:
            old.rename(folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _carry(source: Path, target: Path) -> None:
    """A file or folder of the old folder into the new one: hard links where the file system has them."""
    if source.is_symlink():
        target.symlink_to(os.readlink(source))
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source: Any, target: Any) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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
    """The weights file's tensors; a missing, second, unreadable or malformed file is a :class:`SpecError`."""
    present = [(kind, folder / name) for kind, name in WEIGHT_FILES.items() if (folder / name).is_file()]
    if not present:
        raise SpecNotFoundError(f"no weights in {folder}: expected {' or '.join(WEIGHT_FILES.values())}")
    if len(present) > 1:
        raise SpecError(
            f"{folder} holds both {' and '.join(file.name for _, file in present)}: which one is the pruned model's "
            "is unknown (save_pruned writes one); remove the stale one"
        )
    ((kind, file),) = present
    try:
        if kind == "safetensors":
            state = safetensors.torch.load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SpecError(f"cannot read the weights file {file}: {first_line(error)}") from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SpecError(f"the weights file {file} is not a state dict (tensors by name)")
    return state


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
