"""A forward that decides Python control flow by tensor values: make() says so, strict=True refuses, and the export
is verified on every batch of verify_inputs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from maskprune.algorithms import L1Norm
from torch import nn

import maskprune
from maskprune import Mask
from maskprune.errors import DataDependentError, DataDependentWarning, ExportError, MaskpruneError


class Body(nn.Module):
    """The issue's forward: the second conv sees the first one's channels reversed when the input's mean is > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        if x.mean() > 0:
            h = h.flip(1)
        return self.conv2(h)


class Flips(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def flips() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model, an input taking the branch without the flip (the example) and one taking the flip."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8).abs()
    return Flips().eval(), -x, x


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def made(model: nn.Module, x: torch.Tensor, **options) -> tuple[Mask, list[warnings.WarningMessage]]:
    """``Mask(model, x, **options).make()`` and the DataDependentWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = Mask(model, x, **options).make()
    return mask, [w for w in caught if issubclass(w.category, DataDependentWarning)]


def test_a_branch_on_a_tensor_value_warns_once_at_make_naming_the_module_op_and_line() -> None:
    model, x, _ = flips()
    mask, found = made(model, x)
    assert len(found) == 1
    text = str(found[0].message)
    assert "`__bool__` in body at test_control_flow.py:" in text and "(`if x.mean() > 0:`)" in text
    assert "verify_inputs=[batch, ...]" in text and "strict=True" in text
    assert found[0].filename == __file__  # it points at the make() call
    assert "`__bool__` in body at test_control_flow.py:" in str(mask)  # and print(mask) lists it
    assert "Branches decided by tensor values" in str(mask)


def test_strict_refuses_the_branch_before_any_hook_is_installed() -> None:
    model, x, _ = flips()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DataDependentError, match=r"Mask\(strict=True\): .*`__bool__` in body .*if x.mean\(\) > 0:"):
        Mask(model, x, strict=True).make()
    assert issubclass(DataDependentError, MaskpruneError)
    assert hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit-exact: nothing was written
    mask, found = made(model, x)  # without strict the same model is masked, with the warning
    assert len(found) == 1 and [g.size for g in mask.groups] == [8, 8]


def test_the_export_is_verified_on_every_batch_of_verify_inputs() -> None:
    model, x, other_branch = flips()
    mask, _ = made(model, x, algorithm=L1Norm(), ratio=0.5)
    mask.do_mask()
    pruned = mask.generate_pruned_model()  # the example inputs take the traced branch
    assert maskprune.verify(model, pruned, x * 0.5).ok
    missed = maskprune.verify(model, pruned, x, verify_inputs=[x * 0.5, other_branch])
    assert not missed.ok and missed.max_rel > 0.01 and missed.batch == "verify_inputs[1]"
    assert "on verify_inputs[1]" in str(missed)

    with pytest.raises(ExportError, match=r"first diverging module: body\.conv2 .*; on verify_inputs\[0\]"):
        mask.generate_pruned_model(verify_inputs=[other_branch])
    masked_out = model(other_branch)
    with pytest.raises(ExportError, match=r"on verify_inputs\[1\]"):
        mask.generate_pruned_model(inplace=True, verify_inputs=[x * 2, other_branch])
    assert torch.equal(model(other_branch), masked_out)  # bit-exact: the failed in-place export was undone
    assert model.body.conv1.out_channels == 8 and hooks(model) > 0
    pruned = mask.generate_pruned_model(verify_inputs=(x * 2, torch.randn(3, 3, 8, 8).abs().neg()))
    assert pruned.body.conv1.out_channels == 4


def test_verify_inputs_is_a_list_of_batches_of_the_models_dtype() -> None:
    model, x, _ = flips()
    mask, _ = made(model, x, algorithm=L1Norm())
    mask.do_mask()
    with pytest.raises(TypeError, match=r"verify_inputs takes a list of batches.*got a Tensor: pass \[batch\]"):
        mask.generate_pruned_model(verify_inputs=x)
    with pytest.raises(TypeError, match="an example input is torch.float64"):
        mask.generate_pruned_model(verify_inputs=[x.double()])
    with pytest.raises(TypeError, match="verify_inputs takes a list of batches"):
        maskprune.verify(model, model, x, verify_inputs={"x": x})


class ReadsNumbers(nn.Module):
    """Numbers read by item(): compared after arithmetic (a branch), or only a size (no branch)."""

    def __init__(self, compare: bool) -> None:
        super().__init__()
        self.compare = compare
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        columns = (x[0, 0, 0] > -1e9).sum().item()  # every column, but only the values say so: a size
        h = h[..., :columns]
        scale = torch.tensor(2.0).log2().item()  # a constant: the same whatever the input
        if scale > 0 and torch.ones(1).bool():
            h = h * scale
        torch._assert(x.mean() > -1e9, "a check inside torch decides no branch of the model")
        if self.compare and 2 * x.mean().item() - 1 > -1e9:
            h = h + 1
        if self.compare and torch.tensor(x.sum().item()) > -1e9:  # a tensor made of a value is no constant
            h = h - 1
        return self.head(h)


def test_a_number_read_by_item_is_followed_into_the_comparison_that_decides() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    _, found = made(ReadsNumbers(compare=True).eval(), x)
    assert len(found) == 1
    text = str(found[0].message)
    assert "`item()` in <root> at test_control_flow.py:" in text and "2 * x.mean().item() - 1 > -1e9" in text
    assert "`__bool__` in <root> at test_control_flow.py:" in text and "torch.tensor(x.sum().item())" in text
    assert "torch._assert" not in text and "scale > 0" not in text


def test_values_read_as_a_size_from_constants_or_by_torch_itself_do_not_warn() -> None:
    torch.manual_seed(0)
    model, x = ReadsNumbers(compare=False).eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataDependentWarning)
        mask = Mask(model, x, algorithm=L1Norm()).make()
    assert "Branches decided" not in str(mask)
    mask.do_mask()
    assert mask.generate_pruned_model(verify_inputs=[torch.randn(1, 3, 8, 8)]).conv.out_channels == 4


class TinyDetector(nn.Module):
    """A backbone, then per image a top-k of the scores and reads of their values (as NMS and thresholds do)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.scores = nn.Conv2d(16, 1, 1)
        self.boxes = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        scores, boxes = self.scores(features).flatten(1), self.boxes(features).flatten(2)
        found = []
        for image_scores, image_boxes in zip(scores, boxes, strict=True):
            top = image_scores.topk(5)
            picked = image_boxes[:, top.indices]
            if (top.values > 1e9).any():  # a threshold no score reaches
                picked = picked * 0
            if top.values[0].item() < -1e9:
                picked = picked.flip(1)
            found.append(picked)
        return torch.stack(found)


def test_a_detector_reading_scores_after_its_backbone_warns_once_and_prunes_the_backbone() -> None:
    torch.manual_seed(0)
    model, x = TinyDetector().eval(), torch.randn(2, 3, 8, 8)
    mask, found = made(model, x, algorithm=L1Norm(), ratio=0.5)
    assert len(found) == 1  # one warning for both images and both reads
    text = str(found[0].message)
    assert "`__bool__` in <root>" in text and "`item()` in <root>" in text and "more)" not in text
    assert [g.size for g in mask.groups] == [16, 16]
    mask.do_mask()
    pruned = mask.generate_pruned_model(verify_inputs=[torch.randn(3, 3, 8, 8)])
    assert pruned.backbone[0].out_channels == 8 and pruned.backbone[3].out_channels == 8
