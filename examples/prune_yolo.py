"""Prune an Ultralytics YOLO while it fine-tunes in Ultralytics' own trainer, export it, and export that to ONNX.

1. A ``Mask`` on the YOLO's ``nn.Module``; a callback calls ``do_mask()`` at the end of each epoch until the
   schedule reaches ``--target-flops``; ``track_optimizer`` keeps removed channels at zero between calls.
2. ``generate_pruned_model()`` exports the trained masked model (and checks it against it).
3. The export fine-tunes for ``--recover-epochs`` in Ultralytics (a trainer whose ``get_model`` returns it:
   Ultralytics would otherwise rebuild the full model from its yaml), is validated, and exported to ONNX,
   whose outputs are compared with the PyTorch model's.

Without ``--data`` it writes a tiny random dataset (8 images, 2 classes) to a temporary folder, so the
script runs anywhere, offline; give a real data yaml (``coco8.yaml``, yours) and ``--weights yolov8n.pt``
for a meaningful result.

Example:
    python examples/prune_yolo.py --model yolov8n.yaml --epochs 4 --target-flops 0.5
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update check or asset download: everything here is local

import numpy as np
import torch
from maskprune.algorithms import L1Norm
from PIL import Image
from torch import nn
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.modules.block import C2f

import maskprune
from maskprune import Mask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n.yaml", help="a detection model yaml (random weights)")
    parser.add_argument("--weights", help="a trained .pt to start from instead of --model")
    parser.add_argument("--data", help="a data yaml; default: a tiny random dataset in a temporary folder")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of pruning while fine-tuning")
    parser.add_argument("--steps", type=int, default=2, help="do_mask() calls (one per epoch) to reach the target")
    parser.add_argument("--target-flops", type=float, default=0.5, help="share of the FLOPs to keep")
    parser.add_argument("--recover-epochs", type=int, default=1, help="epochs of fine-tuning the export")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None, help="folder for runs and the ONNX file (default: a temporary one)")
    return parser.parse_args(argv)


def tiny_dataset(root: Path, size: int) -> Path:
    """Four random images per split, two boxes each, in YOLO's layout; returns the data yaml."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n1 0.3 0.3 0.2 0.2\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")
    return data


def sync_c2f(model: nn.Module) -> None:
    """Ultralytics' exporter runs ``C2f.forward_split``, which splits by ``self.c``; the traced ``forward``
    (``chunk(2, 1)``) never reads it, so the export leaves it: set it to the pruned width."""
    for module in model.modules():
        if isinstance(module, C2f):
            module.c = module.cv1.conv.out_channels // 2


def trainer_for(model: nn.Module) -> type[DetectionTrainer]:
    """A detection trainer that trains ``model`` itself (Ultralytics rebuilds a yaml model from its yaml)."""

    class Trainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            return model

    return Trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="prune_yolo_"))
    data = args.data or str(tiny_dataset(out / "data", args.imgsz))
    settings = dict(data=data, imgsz=args.imgsz, batch=args.batch, workers=0, plots=False, verbose=False)
    settings.update(project=str(out / "runs"), exist_ok=True)

    torch.manual_seed(0)
    yolo = YOLO(args.weights or args.model)
    model = yolo.model
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    mask = Mask(model.eval(), (x,), algorithm=L1Norm(), target_flops=args.target_flops, steps=args.steps).make()
    print(mask)

    # 1. prune while fine-tuning: one do_mask() per epoch. Ultralytics validates and saves its EMA copy of the
    # model, which does not follow the masks: the export below is made from the trained masked model itself.
    pruning = {
        "on_train_start": lambda trainer: mask.track_optimizer(trainer.optimizer),
        "on_train_epoch_end": lambda trainer: mask.do_mask(),
    }
    for event, callback in pruning.items():
        yolo.add_callback(event, callback)
    yolo.train(trainer=trainer_for(model), epochs=args.epochs, name="prune", **settings)
    for event, callback in pruning.items():
        yolo.callbacks[event].remove(callback)
    print(mask.sparsity())

    # 2. export: the masked channels removed; raises if the export differs from the masked model
    pruned = mask.generate_pruned_model()
    sync_c2f(pruned)
    mask.remove()
    before, after = maskprune.count_parameters(model), maskprune.count_parameters(pruned)

    # 3. fine-tune the export in Ultralytics, validate it, export it to ONNX
    yolo.model = pruned
    yolo.train(trainer=trainer_for(pruned), epochs=args.recover_epochs, name="recover", **settings)
    metrics = yolo.val(name="val", **settings)
    onnx_path = yolo.export(format="onnx", imgsz=args.imgsz, simplify=False, project=str(out))
    difference = onnx_difference(yolo.model, onnx_path, x)

    print(f"\nparameters: {before:,} -> {after:,} ({after / before:.1%})")
    print(f"validation mAP50-95 of the fine-tuned export: {metrics.box.map:.4f}")
    print(f"ONNX ({onnx_path}) vs PyTorch, max |difference| / max |output|: {difference:.2e}")
    return {"parameters": before, "pruned_parameters": after, "map": metrics.box.map, "onnx_difference": difference}


def onnx_difference(model: nn.Module, path: str, x: torch.Tensor) -> float:
    """The largest difference between the ONNX file's first output and the model's, relative to the output."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model.float().eval()(x)[0].numpy()
    return float(np.abs(got - expected).max() / np.abs(expected).max())


if __name__ == "__main__":
    main()
