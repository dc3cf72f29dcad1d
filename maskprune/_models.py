"""Models named on the command line: ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``."""

from __future__ import annotations

import importlib

from torch import nn


def build_model(name: str) -> nn.Module:
    """A fresh instance (random weights) of the model ``name`` names, in eval mode.

    Examples:
        >>> type(build_model("torchvision:resnet18")).__name__
        'ResNet'
    """
    source, sep, item = name.partition(":")
    if not sep or not source or not item:
        raise ValueError(f"a model is torchvision:NAME, timm:NAME or module.path:factory, got {name!r}")
    if source == "torchvision":
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
