"""Time save_pruned / load_pruned against a plain state dict (torch.save / torch.load) in the same run.

For each torchvision model (``weights=None``, L1 at ratio 0.5 on a 1x3x64x64 input, exported), it times:

* save: ``maskprune.save_pruned(pruned, folder)`` vs ``torch.save(pruned.state_dict(), file)``;
* load: ``maskprune.load_pruned(fresh, folder)`` (reshape a fresh instance of the architecture by the spec,
  then load the safetensors weights) vs ``model.load_state_dict(torch.load(file, weights_only=True))`` into
  a model that already has the pruned shapes (the fastest any loader can be; the fresh instances are built
  outside the timed region).

Runs take turns in every round; each timing is the median of ``--repeats`` rounds after one warm-up.
It prints the ratios maskprune/baseline and the size of the spec next to the weights.

Usage:
    .venv/bin/python benchmarks/save_load.py
    .venv/bin/python benchmarks/save_load.py --models resnet50 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from maskprune.algorithms import L1Norm

import maskprune
from maskprune import Mask

MODELS = ("resnet18", "mobilenet_v2", "resnet50")


def timed(run: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def load_state_dict(model: torch.nn.Module, file: Path) -> None:
    model.load_state_dict(torch.load(file, weights_only=True))


def measure(name: str, repeats: int, workdir: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    mask = Mask(model, input_shape=(1, 3, 64, 64), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    folder, file = workdir / name, workdir / f"{name}.pt"
    times: dict[str, list[float]] = {"save": [], "save_base": [], "load": [], "load_base": []}
    for round_ in range(repeats + 1):
        fresh, shaped = torchvision.models.get_model(name, weights=None), copy.deepcopy(pruned)
        results = {
            "save": timed(maskprune.save_pruned, pruned, folder),
            "save_base": timed(torch.save, pruned.state_dict(), file),
            "load": timed(maskprune.load_pruned, fresh, folder),
            "load_base": timed(load_state_dict, shaped, file),
        }
        if round_:  # the first round warms up
            for key, value in results.items():
                times[key].append(value)
    median = {key: statistics.median(values) for key, values in times.items()}
    median["spec_kib"] = (folder / "spec.json").stat().st_size / 1024
    median["weights_mib"] = (folder / "model.safetensors").stat().st_size / 2**20
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats} rounds")
    print("| model | save ms | torch.save ms | ratio | load ms | torch.load ms | ratio | spec KiB | weights MiB |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: | --: |")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            m = measure(name, args.repeats, Path(workdir))
            print(
                f"| {name} | {m['save'] * 1e3:.1f} | {m['save_base'] * 1e3:.1f} | {m['save'] / m['save_base']:.2f} "
                f"| {m['load'] * 1e3:.1f} | {m['load_base'] * 1e3:.1f} | {m['load'] / m['load_base']:.2f} "
                f"| {m['spec_kib']:.0f} | {m['weights_mib']:.1f} |"
            )


if __name__ == "__main__":
    main()
