"""The torchvision model zoo as test cases: how to build each model, feed it and train it one step.

Every classification, segmentation, detection, video and optical-flow model of
torchvision, with ``weights=None`` and inputs as small as the model allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torchvision
from torch import nn

models = torchvision.models


@dataclass(frozen=True)
class ZooCase:
    """A model and how to call it: inputs for a batch size, and a training loss."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, bool], Any]  # (batch, other_size) -> example inputs
    loss: Callable[[nn.Module, Any], torch.Tensor]
    other_size: bool = True  # whether the model accepts another spatial size
    # Detectors end in top-k and NMS, which turn a 1e-7 rounding difference between two near-equal
    # scores of an untrained head into a different box. They are compared end to end in float64 (where
    # rounding is 1e-16), and their feature extractor, where the pruned channels are, in float32 too.
    dtype: torch.dtype = torch.float32
    float32_part: str | None = None

    @property
    def heavy(self) -> bool:
        """Several GB while traced: run these one at a time (one xdist worker)."""
        return self.name in _HEAVY


# The detectors (about 2 GB each, in float64) share the two workers with everything else: run one at a
# time they kept one worker busy for most of the suite while the other idled.
_HEAVY = {"regnet_y_128gf", "regnet_y_32gf", "vit_h_14", "vit_l_16", "vit_l_32", "efficientnet_v2_l", "convnext_large"}
_HEAVY |= {"mvit_v1_b", "mvit_v2_s", "s3d"}  # 16x224x224 clips


def _images(channels: int, size: int, other: int) -> Callable[[int, bool], torch.Tensor]:
    return lambda batch, other_size: torch.randn(batch, channels, *(2 * [other if other_size else size]))


def _output_loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(inputs) if not isinstance(inputs, tuple) else model(*inputs)
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return sum(o.float().pow(2).mean() for o in out if isinstance(o, torch.Tensor))
    return out.float().pow(2).mean()


def _classification_size(name: str) -> tuple[int, int, bool]:
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return 2 * patch, 2 * patch, False  # built with image_size = 2 patches: 4 tokens + the class token
    if name.startswith("maxvit"):
        return 224, 224, False
    if name.startswith("inception"):
        return 299, 320, True  # the auxiliary head (train mode) needs 299
    if name.startswith(("googlenet", "swin")):
        return 96, 128, True
    return 64, 96, True


def classification_cases() -> list[ZooCase]:
    cases = []
    for name in models.list_models(module=models):
        size, other, ok = _classification_size(name)
        kwargs = {"image_size": size} if name.startswith("vit_") else {}
        build = _builder(models.get_model, name, **kwargs)
        cases.append(ZooCase(name, build, _images(3, size, other), _output_loss, ok))
    return cases


def segmentation_cases() -> list[ZooCase]:
    return [
        ZooCase(name, _builder(models.get_model, name, weights_backbone=None), _images(3, 64, 96), _output_loss)
        for name in models.list_models(module=models.segmentation)
    ]


def video_cases() -> list[ZooCase]:
    cases = []
    for name in models.list_models(module=models.video):
        if name.startswith("mvit"):
            shape, other = (16, 224, 224), None  # MViT's positional embedding fixes T, H and W
        elif name.startswith("swin3d"):
            shape, other = (4, 64, 64), (4, 96, 96)
        elif name == "s3d":
            shape, other = (16, 224, 224), None  # its last average pool has a fixed (2, 7, 7) kernel
        else:
            shape, other = (4, 32, 32), (4, 48, 48)

        def inputs(batch: int, other_size: bool, shape=shape, other=other) -> torch.Tensor:
            return torch.randn(batch, 3, *(other if other_size and other else shape))

        cases.append(ZooCase(name, _builder(models.get_model, name), inputs, _output_loss, other is not None))
    return cases


def _flow_inputs(batch: int, other_size: bool) -> tuple[torch.Tensor, torch.Tensor]:
    size = (128, 160) if other_size else (128, 128)
    return torch.randn(batch, 3, *size), torch.randn(batch, 3, *size)


def _flow_loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    return sum(flow.pow(2).mean() for flow in model(*inputs, num_flow_updates=2))


def optical_flow_cases() -> list[ZooCase]:
    return [
        ZooCase(name, _builder(models.get_model, name), _flow_inputs, _flow_loss)
        for name in models.list_models(module=models.optical_flow)
    ]


_DETECTION_SIZE = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}


def _detection_inputs(batch: int, other_size: bool) -> tuple[list[torch.Tensor]]:
    size = (160, 192) if other_size else (160, 160)
    generator = torch.Generator().manual_seed(batch)
    return ([torch.rand(3, *size, generator=generator, dtype=torch.float64) for _ in range(batch)],)


def _detection_targets(name: str, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        corners = [[10.0, 12.0, 90.0, 100.0], [40.0, 30.0, 150.0, 140.0]]
        boxes = torch.tensor(corners, dtype=image.dtype) * min(h, w) / 160
        labels = torch.tensor([1, 1]) if name.startswith("keypointrcnn") else torch.tensor([1, 2])
        target = {"boxes": boxes, "labels": labels}
        if name.startswith("maskrcnn"):
            masks = torch.zeros(2, h, w, dtype=torch.uint8)
            masks[0, 12:100, 10:90] = 1
            masks[1, 30:140, 40:150] = 1
            target["masks"] = masks
        if name.startswith("keypointrcnn"):
            kp = torch.cat([torch.linspace(20, 120, 17)[:, None].expand(17, 2), torch.ones(17, 1)], dim=1)
            target["keypoints"] = kp.expand(2, 17, 3).clone()  # float32 whatever the images
        targets.append(target)
    return targets


def _detection_loss_for(name: str) -> Callable[[nn.Module, Any], torch.Tensor]:
    def loss(model: nn.Module, inputs: Any) -> torch.Tensor:
        images = inputs[0]
        losses = model(images, _detection_targets(name, images))
        return sum(losses.values())

    return loss


def detection_cases() -> list[ZooCase]:
    cases = []
    for name in models.list_models(module=models.detection):
        kwargs: dict[str, Any] = {"weights_backbone": None}
        if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn", "retinanet", "fcos")):
            kwargs.update(min_size=160, max_size=192)
        # random weights score below the default thresholds: keep every detection so outputs are compared
        if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn")):
            kwargs.update(box_score_thresh=0.0, box_detections_per_img=20)
        else:
            kwargs.update(score_thresh=0.0, detections_per_img=20)
        size = _DETECTION_SIZE.get(name, 160)  # SSD's backbone alone needs its own input size
        # SSD300's softmax scores are spread already; x50 saturates them to exact 1.0 ties
        spread = 1.0 if name == "ssd300_vgg16" else 50.0
        post = partial(_realistic_detector, size=size, spread=spread)
        build = _builder(models.get_model, name, post=post, dtype=torch.float64, **kwargs)
        loss = _detection_loss_for(name)
        cases.append(ZooCase(name, build, _detection_inputs, loss, dtype=torch.float64, float32_part="backbone"))
    return cases


_SCORE_LAYERS = ("cls_score", "cls_logits", "bbox_ctrness", "classification_head", "kps_score", "mask_fcn_logits")


def _realistic_detector(model: nn.Module, size: int, spread: float) -> None:
    """Make an untrained detector behave like a trained one where exactness can be observed.

    With default BatchNorm statistics an untrained MobileNetV3 backbone shrinks activations to 1e-8, and
    untrained heads score every box about equally: NMS and top-k then pick among exact ties, and any two
    exact implementations differ by their rounding. So calibrate the BatchNorm statistics on random images
    and spread the scores, as training does.
    """
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.backbone.train()
        for seed in range(2):
            model.backbone(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(seed)))
        for bn in norms:
            bn.momentum = 0.1
        for name, p in model.named_parameters():
            if any(layer in name for layer in _SCORE_LAYERS):
                p.mul_(spread)


def _builder(
    factory: Callable[..., nn.Module],
    name: str,
    post: Callable[[nn.Module], None] | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = factory(name, weights=None, **kwargs)
        _randomize_zero_parameters(model)
        if post is not None:
            post(model)
        return model.to(dtype).eval()

    return build


def _randomize_zero_parameters(model: nn.Module) -> None:
    """Zero-initialised heads (ViT) would make every comparison vacuous: give them small random values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)


def all_cases() -> list[ZooCase]:
    return classification_cases() + segmentation_cases() + detection_cases() + video_cases() + optical_flow_cases()
