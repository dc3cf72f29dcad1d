"""Prune a torchvision model one shot, export it, verify it, and print what changed.

Example:
    python examples/prune_torchvision.py --model resnet50 --algorithm l1 --ratio 0.5
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from maskprune.algorithms import L1Norm, Random

import maskprune
from maskprune import Mask

ALGORITHMS = {"l1": L1Norm, "random": Random}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=torchvision.models.list_models(torchvision.models))
    parser.add_argument("--algorithm", default="l1", choices=sorted(ALGORITHMS))
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels to remove")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--groups", action="store_true", help="print every group's members")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    before = maskprune.count_parameters(model), maskprune.count_flops(model, x)

    start = time.perf_counter()
    mask = Mask(model, x, algorithm=ALGORITHMS[args.algorithm](), ratio=args.ratio).make()
    traced = time.perf_counter() - start
    mask.do_mask()
    print(mask)
    if args.groups:
        for group in mask.groups:
            print(group)
    start = time.perf_counter()
    pruned = mask.generate_pruned_model()  # raises if the export differs from the masked model
    exported = time.perf_counter() - start
    check = maskprune.verify(model, pruned, torch.randn(2, 3, args.size, args.size))

    channels = sum(g.size for g in mask.groups), sum(g.kept for g in mask.groups)
    after = maskprune.count_parameters(pruned), maskprune.count_flops(pruned, x)
    print(f"\n{args.model}, {args.algorithm}, ratio {args.ratio}: make {traced:.2f} s, export {exported:.2f} s")
    print(f"| {'':24} | {'before':>14} | {'after':>14} | {'after/before':>12} |")
    print(f"|{'-' * 26}|{'-' * 16}|{'-' * 16}|{'-' * 14}|")
    for label, b, a in (
        ("prunable channels", channels[0], channels[1]),
        ("parameters", before[0], after[0]),
        ("GFLOPs (batch 1)", before[1] / 1e9, after[1] / 1e9),
    ):
        fmt = "{:>14,.3f}" if isinstance(b, float) else "{:>14,}"
        print(f"| {label:24} | {fmt.format(b)} | {fmt.format(a)} | {a / b:>12.3f} |")
    print(f"\nsoft vs hard on a fresh batch of 2: {check}")


if __name__ == "__main__":
    main()
