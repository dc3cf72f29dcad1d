"""Models named on the command line: ``torchvision:NAME``, ``timm:NAME``, ``hf:FOLDER`` or ``module.path:factory``."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn


def build_model(name: str) -> nn.Module:
    """A fresh instance (random weights) of the model ``name`` names, in eval mode.

    ``hf:FOLDER`` is the exception: a Hugging Face causal language model saved with ``save_pretrained``,
    read with its weights from that local folder (nothing is downloaded).

    Examples:
        >>> type(build_model("torchvision:resnet18")).__name__
        'ResNet'
    """
    source, sep, item = name.partition(":")
    if not sep or not source or not item:
        raise ValueError(f"a model is torchvision:NAME, timm:NAME, hf:FOLDER or module.path:factory, got {name!r}")
    if source == "hf":
        model = _hugging_face(item)
    elif source == "torchvision":
        model = _torchvision(item)
    elif source == "timm":
        try:
            import timm
        except ImportError as error:
            raise ValueError(f"{name!r} needs timm, which is not installed (pip install timm)") from error
        model = timm.create_model(item, pretrained=False)
    else:
        model = _factory(source, item)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


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


def _torchvision(item: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if item not in names:
        raise ValueError(f"torchvision has no model {item!r}; valid names: {', '.join(sorted(names))}")
    return torchvision.models.get_model(item, weights=None)


def _factory(module_path: str, attr: str) -> nn.Module:
    try:
        module = importlib.import_module(module_path)
    except ImportError as error:
        raise ValueError(f"cannot import {module_path!r} for the model {module_path}:{attr} ({error})") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_path!r} has no callable {attr!r} (a class or function building the model)")
    return factory()


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
