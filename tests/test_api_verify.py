"""``maskprune.verify``: the first diverging module, a module that raised, ``within=`` a submodule, full float32."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from _api import RTOL
from maskprune.algorithms import L1Norm
from torch import nn

import maskprune
import maskprune._verify
from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_verify_names_the_first_diverging_module(tiny_cnn) -> None:
    a, b = tiny_cnn(), tiny_cnn()  # two random initialisations
    result = maskprune.verify(a, b, torch.randn(2, 3, 16, 16))
    assert not result
    assert result.max_rel > result.rtol == RTOL
    assert result.first_divergence is not None and result.first_divergence.startswith("conv1 ")
    assert "DIFFERENT" in str(result) and "first diverging module: conv1" in str(result)
    # bit-exact: a deep copy runs the same kernels on the same shapes
    assert maskprune.verify(a, copy.deepcopy(a), torch.randn(2, 3, 16, 16)).max_rel == 0


def test_verify_names_the_module_that_raised_even_without_a_message(tiny_cnn) -> None:
    """A pruned model whose layer raises differs from the masked one, and the layer is named (a bare ``assert``
    has no message to show)."""
    model = tiny_cnn()
    broken = copy.deepcopy(model)

    def bare_assert(module: nn.Module, args: tuple) -> None:
        raise AssertionError  # what a bare ``assert`` raises (pytest would give one in this file a message)

    broken.conv2.register_forward_pre_hook(bare_assert)
    result = maskprune.verify(model, broken, torch.randn(2, 3, 16, 16))
    assert not result and result.first_divergence == "conv2 (raised AssertionError)"


class _TopKScorer(nn.Module):
    """Features, then a discrete step (top-k positions): its output is an integer tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.score = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x)).flatten(1).topk(5).indices


def test_verify_within_a_submodule_compares_every_module_on_kept_channels() -> None:
    torch.manual_seed(0)
    model, x = _TopKScorer().eval(), torch.randn(2, 3, 8, 8)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert pruned.features[0].out_channels == 4 and pruned.features[3].out_channels == 4
    result = maskprune.verify(model, pruned, x, within="features", mask=mask)
    assert result.ok and result.scale > 0 and result.max_rel <= RTOL
    unmatched = maskprune.verify(model, pruned, x, within="features")  # without the mask: full widths compared
    assert not unmatched and unmatched.problem == "output shape (2, 4, 8, 8), expected (2, 8, 8, 8)"

    broken = copy.deepcopy(pruned)
    with torch.no_grad():
        broken.features[3].weight[0] += 0.5
    result = maskprune.verify(model, broken, x, within="features", mask=mask)
    assert not result and result.first_divergence.startswith("features.3 ")
    assert maskprune.verify(model, broken, x, within="features.0", mask=mask).ok  # before the change

    with pytest.raises(ValueError, match=r"verify\(within='head'\): not a submodule of the masked model"):
        maskprune.verify(model, pruned, x, within="head")


class _SharedActivation(nn.Module):
    """One ``nn.SiLU`` after convolutions of different widths, as Ultralytics' ``Conv.default_act``."""

    def __init__(self) -> None:
        super().__init__()
        act = nn.SiLU()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 16, 3, padding=1), act)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_verify_within_leaves_out_a_module_shared_by_several_paths() -> None:
    torch.manual_seed(0)
    model, x = _SharedActivation().eval(), torch.randn(2, 3, 8, 8)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert pruned.features[0].out_channels == 4 and pruned.features[2].out_channels == 8
    # the shared SiLU's calls see 8 then 16 channels: none of them are its own to compare on kept channels
    result = maskprune.verify(model, pruned, x, within="features", mask=mask)
    assert result.ok and result.scale > 0 and result.max_rel <= RTOL

    broken = copy.deepcopy(pruned)
    with torch.no_grad():
        broken.features[2].weight[0] += 0.5
    result = maskprune.verify(model, broken, x, within="features", mask=mask)
    assert not result and result.first_divergence.startswith("features.2 ")


class _PrecisionSpy(nn.Module):
    """Records the float32 precision settings its forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.seen: list[tuple[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backends = torch.backends
        self.seen.append((backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision))
        return self.conv(x)


def test_verify_compares_full_float32_and_restores_the_settings() -> None:
    """TF32 would make two exact float32 computations differ by 1e-4: verify turns it off, then back on."""
    backends = torch.backends
    saved = backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision
    backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
    try:
        model = _PrecisionSpy()
        assert maskprune.verify(model, copy.deepcopy(model), torch.randn(1, 3, 2, 2)).ok
        assert model.seen == [("ieee", "ieee")]
        assert (backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    finally:
        backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = saved


class _PrecisionSpyNet(nn.Module):
    """Two convolutions (the first one's channels prunable); every forward of every copy logs its precision settings."""

    log: ClassVar[list[tuple[str, str]]] = []  # on the class: deep copies and exports log here too

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backends = torch.backends
        self.log.append((backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision))
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_the_export_verifies_in_full_float32_and_restores_the_settings(inplace: bool) -> None:
    """Both forwards of the export (masked and exported) run without TF32 or bf16, in a copy and in place."""
    backends = torch.backends
    saved = backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision
    backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
    try:
        model, x = _PrecisionSpyNet(), torch.randn(1, 3, 2, 2)
        mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
        mask.do_mask()
        _PrecisionSpyNet.log.clear()
        pruned = mask.generate_pruned_model(inplace=inplace)
        assert pruned.conv1.out_channels == 2
        assert _PrecisionSpyNet.log == [("ieee", "ieee")] * 2
        assert (backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    finally:
        backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = saved
        _PrecisionSpyNet.log.clear()


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_the_default_tolerance_follows_the_dtype(dtype: torch.dtype, rtol: float) -> None:
    """A half-precision model's export verifies at its dtype's tolerance (kernels of other widths round
    differently); float32's 1e-5 would refuse it, and stays the tolerance of float32 outputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    mask = Mask(model, (torch.randint(0, 64, (2, 12)),), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()  # verified at the default tolerance
    result = maskprune.verify(model, pruned, torch.randint(0, 64, (3, 9)), mask=mask)
    assert result.ok and result.rtol == rtol and 1e-5 < result.max_rel < rtol
    assert not maskprune.verify(model, pruned, torch.randint(0, 64, (3, 9)), rtol=1e-5)
    assert maskprune._verify.tolerance([torch.ones(2), torch.ones(2, dtype=dtype)]) == rtol
    assert maskprune._verify.tolerance([torch.ones(2), torch.ones(2, dtype=torch.float64)]) == 1e-5
