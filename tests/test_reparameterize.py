"""Size attributes read after the export: timm's ``reparameterize_model`` on exported re-parameterizable models.

Their blocks keep ``in_chs``, ``out_chs``, ``groups`` (and a mixer its ``dim``) and read them only when they fuse
their branches into one convolution, long after the export: the export sets them to the kept counts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from maskprune.algorithms import L1Norm
from timm.utils import reparameterize_model
from torch import nn

import maskprune
from maskprune import Mask, SpecError
from maskprune.testing import randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def size_attributes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    names = ("in_chs", "out_chs", "groups", "dim")
    return {
        path: tuple(getattr(m, n) for n in names if type(getattr(m, n, None)) is int)
        for path, m in model.named_modules()
        if hasattr(m, "reparameterize")
    }


@pytest.mark.parametrize(
    "name, holds_sizes",
    [("fastvit_t8", True), ("mobileone_s0", True), ("repvgg_a0", False)],  # RepVGG's blocks read their convs' sizes
)
def test_reparameterize_the_export_as_the_masked_model(name: str, holds_sizes: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, pretrained=False, num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
    before, after = size_attributes(model), size_attributes(pruned)
    assert any(after[path] != sizes for path, sizes in before.items()) == holds_sizes
    maskprune.save_pruned(pruned, tmp_path)
    loaded = maskprune.load_pruned(timm.create_model(name, pretrained=False, num_classes=10).eval(), tmp_path)
    assert size_attributes(loaded) == after  # the spec carries them, and safe loading accepts them

    with torch.no_grad():
        masked = mask.model(x)
        fused_masked = reparameterize_model(copy.deepcopy(mask.model))(x)
        for exported in (pruned, loaded):
            fused = reparameterize_model(copy.deepcopy(exported))
            assert not any(hasattr(m, "conv_kxk") for m in fused.modules())  # every block fused into one conv
            assert relative_error(fused(x), masked) <= 1e-5
            assert relative_error(fused(x), fused_masked) <= 1e-5


class Block(nn.Module):
    """Keeps its sizes as a re-parameterizable block does; its forward never reads them."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.dim = in_chs, out_chs, in_chs
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        self.depthwise = nn.Conv2d(out_chs, out_chs, 3, padding=1, groups=out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.conv(x))


def test_each_size_follows_its_own_dimension_and_loads_no_larger(tmp_path: Path) -> None:
    """``in_chs`` counts the input, ``out_chs`` the output; ``dim`` equals both, pruned apart: it stays."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Block(8, 8), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    mask = Mask(model, x).make()
    first, second = mask.groups  # the output channels of "0" (the block's input), then of "1.conv"
    first.prune([0, 1])
    second.prune([0, 1, 2, 3])
    pruned = mask.generate_pruned_model()
    assert (pruned[1].in_chs, pruned[1].out_chs, pruned[1].dim) == (6, 4, 8)

    maskprune.save_pruned(pruned, tmp_path)
    loaded = maskprune.load_pruned(copy.deepcopy(model), tmp_path)
    assert (loaded[1].in_chs, loaded[1].out_chs) == (6, 4)
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec["attributes"]["1"]["in_chs"] = 16
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(SpecError, match=r"module '1' \(Block\): in_chs: 16 is not a positive count no larger"):
        maskprune.load_pruned(copy.deepcopy(model), tmp_path)
