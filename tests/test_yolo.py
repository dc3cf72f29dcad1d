"""Ultralytics YOLO and RT-DETR, built from their yaml files (no weights, no network).

Each family is pruned by half, exported, and compared with the masked model end to end in float64 and module
by module in float32. The exported YOLOv8n and YOLO11n then run in Ultralytics itself: ``predict`` and ONNX
export (checked with onnxruntime); YOLOv8n also ``val`` and a training epoch on a tiny dataset the test writes.
Ultralytics comes from ``_ultralytics``, which keeps its import from changing the rest of the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ultralytics import RTDETR, YOLO, Attention, DetectionTrainer, torch_state_kept
from maskprune.algorithms import L1Norm
from torch import nn

import maskprune
from maskprune import Mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the example, as a plain module
import prune_yolo  # noqa: E402 - after Ultralytics' import, which _ultralytics guards
from prune_yolo import sync_c2f, tiny_dataset  # noqa: E402

FAMILIES = [
    "yolov8n.yaml",
    "yolo11n.yaml",
    "yolov8n-seg.yaml",
    "yolov8n-pose.yaml",
    "yolov8n-obb.yaml",
    "yolov8n-cls.yaml",
    "yolov10n.yaml",
    "rtdetr-l.yaml",
]
SIZE, OTHER_SIZE = 64, 96


@pytest.fixture(autouse=True)
def _torch_state_kept():
    with torch_state_kept():
        yield


def _build(name: str) -> nn.Module:
    """The family's ``nn.Module``, made to behave like a trained one where exactness can be observed.

    With default BatchNorm statistics and one shared score bias, an untrained head scores boxes nearly alike,
    and top-k (YOLOv10, RT-DETR) picks among near ties. So calibrate BatchNorm on random images and spread the
    score biases, as training does.
    """
    torch.manual_seed(0)
    model = (RTDETR if name.startswith("rtdetr") else YOLO)(name).model
    maskprune.recalibrate_bn(model, [torch.rand(4, 3, SIZE, SIZE) for _ in range(2)])
    head = model.model[-1]
    score_layers = [getattr(head, "linear", None), getattr(head, "enc_score_head", None)]
    for branches in ("cv3", "one2one_cv3", "dec_score_head"):
        score_layers += [
            branch[-1] if isinstance(branch, nn.Sequential) else branch for branch in getattr(head, branches, [])
        ]
    with torch.no_grad():
        for layer in filter(None, score_layers):
            layer.bias.add_(torch.randn_like(layer.bias) * 2)
    return model.double().eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_yolo_family_soft_equals_hard(name: str) -> None:
    model = _build(name)
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64)
    mask = Mask(model, (x,), algorithm=L1Norm(), ratio=0.5).make()
    assert mask.do_mask()
    pruned = mask.generate_pruned_model()  # verified on the example inputs, in float64
    assert maskprune.count_parameters(pruned) < 0.4 * maskprune.count_parameters(model)

    fresh = torch.rand(1, 3, OTHER_SIZE, OTHER_SIZE, dtype=torch.float64)
    result = maskprune.verify(model, pruned, (fresh,))
    assert result.ok and result.scale > 0, f"{name}: {result}"

    model.float(), pruned.float()  # every module in float32, on kept channels; the outputs too
    part = maskprune.verify(model, pruned, (x.float(),), within="model", mask=mask)
    assert part.ok and part.scale > 0, f"{name} in float32, every module of model: {part}"
    for module in pruned.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


class Predictions(nn.Module):
    """The model's predictions alone: in eval mode a YOLO head also returns the features it reads, which would
    freeze the channels of the convolutions that make them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


@pytest.fixture
def pruned_yolo(request, tmp_path, monkeypatch) -> tuple[YOLO, int]:
    """A YOLOv8n (or the yaml parametrised) whose ``nn.Module`` is the float32 export of half its channels; and
    the export's parameters."""
    monkeypatch.chdir(tmp_path)  # Ultralytics writes an export next to the working directory
    torch.manual_seed(0)
    yolo = YOLO(getattr(request, "param", "yolov8n.yaml"))
    full = maskprune.count_parameters(yolo.model)
    # Through the wrapper, the trial export cannot run (see the tutorial): freeze what it would have frozen,
    # the attention's heads, whose code fixes their size.
    attention = [m for m in yolo.model.modules() if isinstance(m, Attention)]
    x = torch.rand(1, 3, SIZE, SIZE)
    mask = Mask(Predictions(yolo.model.eval()), (x,), algorithm=L1Norm(), ratio=0.5, freeze=attention)
    mask.make().do_mask()
    yolo.model = mask.generate_pruned_model().model
    assert maskprune.count_parameters(yolo.model) < 0.3 * full  # the head's input convolutions pruned too
    sync_c2f(yolo.model)
    return yolo, maskprune.count_parameters(yolo.model)


@pytest.mark.parametrize("pruned_yolo", ["yolov8n.yaml", "yolo11n.yaml"], indirect=True)
def test_pruned_yolo_predicts_and_exports_to_onnx(pruned_yolo, tmp_path) -> None:
    import onnxruntime

    yolo, _ = pruned_yolo
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    boxes = yolo.predict(image, imgsz=SIZE, conf=0.0, verbose=False)[0].boxes
    assert boxes.data.shape[1] == 6 and len(boxes) > 0 and torch.isfinite(boxes.data).all()

    path = yolo.export(format="onnx", imgsz=SIZE, simplify=False)  # onnxslim is not installed
    assert Path(path).resolve().parent == tmp_path
    x = torch.rand(1, 3, SIZE, SIZE)
    session = onnxruntime.InferenceSession(path)
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch_out = yolo.model.float().eval()(x)[0].numpy()
    assert onnx_out.shape == torch_out.shape == (1, 84, 84)
    assert np.abs(onnx_out - torch_out).max() <= 1e-5 * np.abs(torch_out).max()


def test_pruned_yolo_validates_and_trains_in_ultralytics(pruned_yolo, tmp_path) -> None:
    yolo, parameters = pruned_yolo
    data = tiny_dataset(tmp_path / "data", SIZE)
    settings = dict(data=str(data), imgsz=SIZE, batch=4, workers=0, device="cpu", plots=False, verbose=False)
    metrics = yolo.val(project=str(tmp_path / "runs"), **settings)
    assert 0.0 <= metrics.box.map <= 1.0

    pruned = yolo.model
    before = {name: p.detach().clone() for name, p in pruned.state_dict().items() if p.is_floating_point()}

    class PrunedTrainer(DetectionTrainer):  # Ultralytics would rebuild the full model from its yaml
        def get_model(self, cfg=None, weights=None, verbose=True):
            return pruned

    yolo.train(trainer=PrunedTrainer, epochs=1, amp=False, project=str(tmp_path / "runs"), **settings)
    trained = yolo.model  # Ultralytics loads its best checkpoint back
    assert maskprune.count_parameters(trained) == parameters
    changed = [n for n, p in trained.state_dict().items() if n in before and not torch.equal(p.float(), before[n])]
    assert changed, "training changed no weight"


def test_the_example_prunes_while_training_in_ultralytics_and_exports_to_onnx(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = prune_yolo.main(["--out", str(tmp_path), "--epochs", "2", "--steps", "2", "--target-flops", "0.5"])
    assert result["pruned_parameters"] < 0.6 * result["parameters"]
    assert result["onnx_difference"] <= 1e-5
    assert (tmp_path / "runs" / "recover" / "weights" / "best.onnx").is_file()


def test_ultralytics_leaves_the_rest_of_the_suite_as_it_was() -> None:
    import warnings

    assert torch.save.__module__ == "torch.serialization"  # Ultralytics' import replaces it
    assert not any(category is torch.jit.TracerWarning for _, _, category, _, _ in warnings.filters)
