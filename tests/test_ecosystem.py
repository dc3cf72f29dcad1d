"""Exported models in the wider ecosystem: TorchScript (trace and script), torch.export, ONNX run by ONNX Runtime."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from maskprune.algorithms import L1Norm
from torch import nn

import maskprune
from maskprune import Mask
from maskprune.testing import randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"resnet18": 32, "mobilenet_v3_small": 32}


@functools.cache
def exported(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(original, pruned, input), once per process: random weights with non-trivial batch norms."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomize_norms(torchvision.models.get_model(name, weights=None).eval())
        size = MODELS[name]
        x = torch.randn(2, 3, size, size)
        original = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
        original.do_mask()
        pruned = original.generate_pruned_model()
        original.remove()
    return model, pruned, x


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_close(got: torch.Tensor | np.ndarray, expected: torch.Tensor) -> None:
    got = torch.as_tensor(got)
    scale = expected.abs().max().item()
    assert scale > 1e-3, "outputs near zero prove nothing"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_is_plain_and_carries_only_a_string_spec(name: str, leftover_hooks) -> None:
    model, pruned, _ = exported(name)
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert [type(m) for m in pruned.modules()] == [type(m) for m in model.modules()]
    assert leftover_hooks(pruned) == []
    assert isinstance(pruned.maskprune_spec, str)
    assert maskprune.PruneSpec.of(pruned).architecture == f"{type(model).__module__}.{type(model).__qualname__}"
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, and still in use
@pytest.mark.parametrize("how", ["trace", "script"])
@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript(name: str, how: str) -> None:
    _, pruned, x = exported(name)
    compiled = torch.jit.trace(pruned, x) if how == "trace" else torch.jit.script(pruned)
    fresh = torch.randn_like(x)
    assert_close(reference(compiled, fresh), reference(pruned, fresh))


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export(name: str) -> None:
    _, pruned, x = exported(name)
    program = torch.export.export(pruned, (x,))
    fresh = torch.randn_like(x)
    assert_close(reference(program.module(), fresh), reference(pruned, fresh))


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_matches_pytorch(name: str, tmp_path: Path) -> None:
    _, pruned, x = exported(name)
    file = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(pruned, (x,), dynamo=True, verbose=False).save(str(file))
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == (2, 1000)
    assert_close(got, reference(pruned, x))
