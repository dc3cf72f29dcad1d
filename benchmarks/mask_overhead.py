"""Cost of a masked training step against the same step unmasked, next to PyTorch's own ways of masking.

For each model, in one process, with the same weights and the same batch, one training step
(forward, cross-entropy, ``zero_grad``, backward, SGD step with momentum and weight decay) is timed for:

* ``unmasked``: the plain model (the baseline of every ratio);
* ``maskprune``: ``Mask(model, x, algorithm=L1Norm(), ratio=0.5)``, ``make()``, ``do_mask()``, frozen
  semantics, ``track_optimizer(optimizer)``;
* ``prune.ln_structured``: ``torch.nn.utils.prune.ln_structured(m, "weight", 0.5, n=1, dim=0)`` on every
  conv and linear layer but the classifier (a ``weight_orig * weight_mask`` pre-hook per layer);
* ``parametrize``: a ``torch.nn.utils.parametrize`` parametrisation ``weight * channel_mask`` on the same layers;
* ``forward hooks``: a forward hook per layer multiplying its output by a channel mask.

The anchors mask half of each layer's output channels (no dependency groups: they only say what
masking costs in PyTorch). The variants take turns, in a rotating order, for ``--rounds`` rounds of
``--steps`` steps; each round gives one ratio per variant (its median step / the unmasked median step
of the same round), and the table shows the median over the rounds, so that changes in the machine's
load weigh on all variants alike. On CPU the clock is the process's CPU time (``time.process_time``),
with one torch thread by default: time the process waits while other processes use the cores is not
counted, which makes the ratios far steadier on a shared machine than elapsed time; ``--clock wall`` gives
elapsed time. On CUDA the clock is elapsed time around ``torch.cuda.synchronize()``.

Usage:
    .venv/bin/python benchmarks/mask_overhead.py                       # CPU: ResNet-50 and ViT-S, small batches
    .venv/bin/python benchmarks/mask_overhead.py --models resnet50 --rounds 3 --steps 3
    .venv/bin/python benchmarks/mask_overhead.py --device cuda --amp bf16 --batch 64 --image-size 224
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from maskprune.algorithms import L1Norm
from torch import nn
from torch.nn.utils import parametrize, prune

from maskprune import Mask

RATIO = 0.5
CLASSES = 10


def build(name: str, image_size: int) -> nn.Module:
    """ResNet-50, or a ViT-S/16 (12 layers, 6 heads, hidden 384, MLP 1536), with ``CLASSES`` outputs."""
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None, num_classes=CLASSES)
    if name == "vit_s":
        return torchvision.models.VisionTransformer(
            image_size=image_size,
            patch_size=16,
            num_layers=12,
            num_heads=6,
            hidden_dim=384,
            mlp_dim=1536,
            num_classes=CLASSES,
        )
    if name == "vit_b":
        return torchvision.models.vit_b_16(weights=None, image_size=image_size, num_classes=CLASSES)
    raise ValueError(f"unknown model {name!r}; choose from resnet50, vit_s, vit_b")


def masked_layers(model: nn.Module) -> list[nn.Module]:
    """Every conv and linear layer except the last (the classifier), as the anchors mask them.

    ``nn.MultiheadAttention`` reads its ``out_proj`` weight without calling it, so hooks there would not run.
    """
    inside_attention = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inside_attention]
    return layers[:-1]


def half_channels(n: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(n, device=device)
    mask[::2] = 0
    return mask


class ChannelMask(nn.Module):
    """A parametrisation: the weight times a 0/1 mask over its output channels."""

    def __init__(self, mask: torch.Tensor, ndim: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask.view(-1, *([1] * (ndim - 1))))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def with_maskprune(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    mask = Mask(model, x[:1], algorithm=L1Norm(), ratio=RATIO).make()
    mask.do_mask()
    mask.track_optimizer(optimizer)
    model._maskprune = mask  # keep the Mask alive as long as the model


def with_ln_structured(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    for layer in masked_layers(model):
        prune.ln_structured(layer, "weight", amount=RATIO, n=1, dim=0)


def with_parametrize(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    for layer in masked_layers(model):
        mask = half_channels(layer.weight.shape[0], layer.weight.device)
        parametrize.register_parametrization(layer, "weight", ChannelMask(mask, layer.weight.dim()))


def with_output_hooks(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    for layer in masked_layers(model):
        mask = half_channels(layer.weight.shape[0], layer.weight.device)
        shaped = mask.view(-1, 1, 1) if isinstance(layer, nn.Conv2d) else mask

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, shaped: torch.Tensor = shaped) -> torch.Tensor:
            return output * shaped

        layer.register_forward_hook(hook)


VARIANTS: dict[str, Callable[[nn.Module, torch.Tensor, torch.optim.Optimizer], None] | None] = {
    "unmasked": None,
    "maskprune": with_maskprune,
    "prune.ln_structured": with_ln_structured,
    "parametrize": with_parametrize,
    "forward hooks": with_output_hooks,
}


@dataclass
class Runner:
    """One variant: its own copy of the model and optimizer, and the step times of every round."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times: list[list[float]]


def make_runner(name: str, base: nn.Module, x: torch.Tensor) -> Runner:
    model = copy.deepcopy(base).train()
    # the anchors replace `weight` by a parametrisation or a pre-hook attribute: build the optimizer after them
    setup = VARIANTS[name]
    if setup is not None and name != "maskprune":
        setup(model, x, None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if name == "maskprune":
        setup(model, x, optimizer)
    return Runner(name, model, optimizer, [])


def step(runner: Runner, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> None:
    autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else nullcontext()
    with autocast:
        loss = F.cross_entropy(runner.model(x), y)
    runner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    runner.optimizer.step()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed_steps(
    runner: Runner, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None, steps: int, clock: str
) -> list[float]:
    now = CLOCKS[clock]
    times = []
    for _ in range(steps):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = now()
        step(runner, x, y, amp)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(now() - start)
    return times


def measure(name: str, args: argparse.Namespace) -> dict[str, tuple[float, float, list[float]]]:
    """{variant: (median step seconds, median ratio to unmasked, per-round ratios)} for one model."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = build(name, args.image_size).to(device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, CLASSES, (args.batch,), device=device)
    runners = [make_runner(variant, base, x) for variant in args.variants]
    for runner in runners:  # warm-up: allocator, lazy optimizer state, first-call work
        timed_steps(runner, x, y, args.amp, args.warmup, args.clock)
    for round_index in range(args.rounds):
        shift = round_index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.times.append(timed_steps(runner, x, y, args.amp, args.steps, args.clock))
        print(f"... {name}: round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
    baseline = runners[0]
    results = {}
    for runner in runners:
        ratios = [
            statistics.median(mine) / statistics.median(base_times)
            for mine, base_times in zip(runner.times, baseline.times, strict=True)
        ]
        seconds = statistics.median(t for round_times in runner.times for t in round_times)
        results[runner.name] = (seconds, statistics.median(ratios), ratios)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_s"], help="resnet50, vit_s, vit_b")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype of the forward")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--image-size", type=int, default=None, help="default: 96 on CPU, 224 on CUDA")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of interleaved measurements")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default=None, help="cpu: process CPU time (default on CPU), wall: elapsed"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see benchmarks/README.md)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"a subset of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variants = ["unmasked"] + [v for v in args.variants if v != "unmasked"]
    args.clock = args.clock or ("wall" if cuda else "cpu")
    args.batch = args.batch or (64 if cuda else 8)
    args.image_size = args.image_size or (224 if cuda else 96)
    torch.set_num_threads(args.threads)
    args.amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {args.device} ({device_name}), threads {torch.get_num_threads()}, "
        f"batch {args.batch}, {args.image_size}x{args.image_size}, amp {args.amp}, "
        f"{args.rounds} rounds x {args.steps} steps, {args.clock} clock, ratio {RATIO}"
    )
    for name in args.models:
        results = measure(name, args)
        print(f"\n{name}\n")
        print("| variant | step (ms) | ratio to unmasked (median of rounds) | min - max over rounds |")
        print("| --- | --: | --: | --: |")
        for variant, (seconds, ratio, ratios) in results.items():
            print(f"| {variant} | {seconds * 1e3:.1f} | {ratio:.3f} | {min(ratios):.3f} - {max(ratios):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
