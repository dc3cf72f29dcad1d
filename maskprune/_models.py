"""Models named on the command line: ``torchvision:NAME``, ``timm:NAME``, ``hf:FOLDER`` or ``module.path:factory``."""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import first_line


def build_model(name: str, *, weights: str | None = None, pretrained: bool = False) -> nn.Module:
    """A fresh instance of the model ``name`` names, in eval mode: random weights, unless ``weights`` names
    torchvision weights (``"DEFAULT"``, ``"IMAGENET1K_V1"`` …) or ``pretrained`` asks timm for its own.

    ``hf:FOLDER`` is the exception: a Hugging Face causal language model saved with ``save_pretrained``,
    read with its weights from that local folder (nothing is downloaded).

    Examples:
        >>> type(build_model("torchvision:resnet18")).__name__
        'ResNet'
        >>> build_model("torchvision:resnet19")
        Traceback (most recent call last):
        ...
        ValueError: torchvision has no model 'resnet19'; did you mean resnet18, resnet152 or resnet101? ...
    """
    source, sep, item = name.partition(":")
    if not sep or not source or not item:
        raise ValueError(f"a model is torchvision:NAME, timm:NAME, hf:FOLDER or module.path:factory, got {name!r}")
    if weights is not None and source != "torchvision":
        raise ValueError(f"weights name torchvision's weights; {name!r} is not a torchvision model")
    if pretrained and source != "timm":
        raise ValueError(f"pretrained asks timm for its weights; {name!r} is not a timm model")
    if source == "hf":
        model = _hugging_face(item)
    elif source == "torchvision":
        model = _torchvision(item, weights)
    elif source == "timm":
        model = _timm(item, pretrained)
    else:
        model = _factory(source, item)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the state dict saved in ``path`` into ``model``: a ``torch.save`` file read with
    ``weights_only=True`` (nothing unpickled but tensors and containers) or a ``.safetensors`` file. A training
    checkpoint that holds the state dict under ``"state_dict"`` or ``"model"`` works too, and so do the
    ``module.`` prefixes of a model saved from ``DistributedDataParallel``. Every key and shape must fit.

    Examples:
        >>> torch.save(nn.Linear(3, 2).state_dict(), "linear.pt")
        >>> load_checkpoint(nn.Linear(3, 2), "linear.pt")
        >>> load_checkpoint(nn.Linear(4, 2), "linear.pt")
        Traceback (most recent call last):
        ...
        ValueError: the checkpoint linear.pt does not fit the Linear: weight has shape (2, 3) there, (2, 4) here
    """
    state = _state_dict(Path(path))
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} has shape {tuple(state[key].shape)} there, {tuple(tensor.shape)} here"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = shapes + [_keys(keys, what) for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys]
    if problems:
        raise ValueError(f"the checkpoint {path} does not fit the {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``.

    Examples:
        >>> parse_shape("1,3,64,64")
        (1, 3, 64, 64)
    """
    try:
        shape = tuple(int(n) for n in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(f"an input shape is positive integers separated by commas (1,3,224,224), got {text!r}")
    return shape


def _torchvision(item: str, weights: str | None) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if item not in names:
        raise ValueError(f"torchvision has no model {item!r}{did_you_mean(item, names, 'torchvision.models')}")
    if weights is not None:
        valid = ["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(item))]
        if weights.rpartition(".")[2] not in valid:  # also the enum's own spelling, ResNet18_Weights.IMAGENET1K_V1
            raise ValueError(f"torchvision:{item} has no weights {weights!r}; valid: {', '.join(valid)}")
    try:
        return torchvision.models.get_model(item, weights=weights)
    except OSError as error:  # no network (a URLError), a full disk
        raise ValueError(
            f"cannot download the {weights} weights of torchvision:{item} ({first_line(error)}); where they cannot "
            "be downloaded, load a state dict saved elsewhere (--checkpoint FILE)"
        ) from error


def _timm(item: str, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"'timm:{item}' needs timm, which is not installed (pip install timm)") from error
    architecture, _ = timm.models.split_model_name_tag(item)  # "resnet18.a1_in1k": an architecture and its weights
    if not timm.is_model(architecture):
        raise ValueError(f"timm has no model {item!r}{did_you_mean(architecture, timm.list_models(), 'timm')}")
    if not pretrained:
        return timm.create_model(item, pretrained=False)
    try:
        return timm.create_model(item, pretrained=True)
    except Exception as error:  # no network, no weights for the architecture: timm's and the hub's errors
        raise ValueError(
            f"cannot load timm's pretrained weights of timm:{item} ({first_line(error)}); where they cannot be "
            "downloaded, load a state dict saved elsewhere (--checkpoint FILE)"
        ) from error


def did_you_mean(name: str, names: Iterable[str], where: str) -> str:
    """The end of an error for an unknown ``name``: the closest of ``names`` and where to list them all.

    Examples:
        >>> did_you_mean("resnet19", ["resnet18", "resnet50", "vgg11"], "torchvision.models")
        '; did you mean resnet18 or resnet50? (torchvision.models.list_models() lists all 3)'
        >>> did_you_mean("notamodel", ["resnet18"], "timm")
        ' (timm.list_models() lists all 1)'
    """
    names = list(names)
    close = difflib.get_close_matches(name, names, n=3)
    suggestion = f"; did you mean {' or '.join(', '.join(close).rsplit(', ', 1))}?" if close else ""
    return f"{suggestion} ({where}.list_models() lists all {len(names)})"


def _factory(module_path: str, attr: str) -> nn.Module:
    try:
        module = importlib.import_module(module_path)
    except ImportError as error:
        raise ValueError(f"cannot import {module_path!r} for the model {module_path}:{attr} ({error})") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_path!r} has no callable {attr!r} (a class or function building the model)")
    return factory()


def _state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors saved in ``path``, by name (see :func:`load_checkpoint`)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path))
        except Exception as error:  # safetensors' own error types
            raise ValueError(
                f"the checkpoint {path} is not a readable safetensors file ({first_line(error)})"
            ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # unreadable, or more than weights
        raise ValueError(
            f"the checkpoint {path} is not a state dict saved with torch.save that loads with weights_only=True "
            f"({first_line(error)})"
        ) from error
    for key in ("state_dict", "model"):  # a training checkpoint: the model's state under a key
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"the checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors by name")
    if state and all(key.startswith("module.") for key in state):  # saved from a DistributedDataParallel wrapper
        state = {key[len("module.") :]: tensor for key, tensor in state.items()}
    return state


def _keys(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({shown})"


def _hugging_face(folder: str) -> nn.Module:
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"hf:{folder} is not a folder written by save_pretrained (no config.json in it)")
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)


def text_batches(
    text_file: str | os.PathLike, folder: str | os.PathLike | None = None, *, length: int = 128, count: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches of ``count`` sequences of ``length`` tokens, in batches of 4, from a text file.

    The text is tokenized with the tokenizer saved in ``folder`` when it holds one, else read as bytes
    (token ids 0-255). Consecutive windows from the start of the text: a file too short for ``count``
    windows gives fewer (and at least one, of the whole text when that is shorter than ``length``).

    Examples:
        >>> path = Path("calib.txt")
        >>> _ = path.write_text("abcdefghij" * 10)
        >>> [b["input_ids"].shape for b in text_batches(path, length=16, count=6)]
        [torch.Size([4, 16]), torch.Size([2, 16])]
    """
    text = Path(text_file).read_bytes()
    if folder is not None and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ids = torch.tensor(tokenizer(text.decode("utf-8", errors="replace"))["input_ids"], dtype=torch.long)
    else:
        ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    if len(ids) == 0:
        raise ValueError(f"the calibration text {text_file} is empty")
    length = min(length, len(ids))
    windows = ids[: len(ids) // length * length].view(-1, length)[:count]
    return [{"input_ids": chunk} for chunk in windows.split(4)]
