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
from maskprune.summary import compare

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
    kept, total = mask.sparsity().channels
    mask.remove()

    print(f"\n{args.model}, {args.algorithm}, ratio {args.ratio}: make {traced:.2f} s, export {exported:.2f} s")
    print(compare(model, pruned, x, channels=(total, kept)))
    print(f"\nsoft vs hard on a fresh batch of 2: {check}")


if __name__ == "__main__":
    main()
