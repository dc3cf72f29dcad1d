"""Cost of masking under FSDP2: a masked training step against the same step unmasked, ``do_mask()``, the export.

Two processes (gloo, CPU, one torch thread each) build the same transformer (``--blocks`` pre-norm blocks of
width ``--width``, ``--heads`` heads, an MLP of 4x the width), shard each block and the root with
``fully_shard``, and train two copies side by side on the same batches:

* ``unmasked``: the sharded model, no Mask;
* ``masked``: ``Mask(model, x, algorithm=L2Norm(), ratio=0.5).make()`` before sharding, ``do_mask()`` after
  sharding (every group loses half its channels), ``track_optimizer(optimizer)``.

A step is forward, cross-entropy, ``zero_grad``, backward, SGD step with momentum. The two variants take turns,
in a rotating order, for ``--rounds`` rounds of ``--steps`` steps; each round gives the ratio of the masked
median step to the unmasked median step, and the table shows the median over the rounds. The clock is the
process's CPU time (``time.process_time``: gloo's threads included, time spent waiting for the other rank or
for other processes on the machine not counted). The masking work of a step (the zeroing after the optimizer
step and the check before the forward) is also timed alone, 100 calls each. Also timed once, in elapsed
time: ``do_mask()`` (the criterion scores gathered full tensors: one all-gather per prunable parameter) and
``generate_pruned_model()`` (a plain copy gathered on every rank, sliced, verified against the sharded model).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp_overhead.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp_overhead.py --width 128 --blocks 4 --output results.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from maskprune.algorithms import L2Norm
from torch import nn
from torch.distributed.fsdp import fully_shard

from maskprune import Mask

WORLD = 2


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(b, n, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, width: int, heads: int, blocks: int, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).mean(dim=1)


def sharded(args: argparse.Namespace, x: torch.Tensor, masked: bool) -> tuple[nn.Module, torch.optim.Optimizer, Mask]:
    torch.manual_seed(0)
    model = Transformer(args.width, args.heads, args.blocks)
    mask = Mask(model, x[:2], algorithm=L2Norm(), ratio=0.5).make() if masked else None
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if mask is not None:
        mask.track_optimizer(optimizer)
    return model, optimizer, mask


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def worker(rank: int, init: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(args.batch, args.tokens, 16, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
        plain = sharded(args, x, masked=False)
        masked_model, masked_opt, mask = sharded(args, x, masked=True)
        step(masked_model, masked_opt, x, y)
        dist.barrier()
        start = time.perf_counter()
        mask.do_mask()
        do_mask_s = time.perf_counter() - start
        variants = {"unmasked": plain[:2], "masked": (masked_model, masked_opt)}
        ratios = []
        for r in range(args.rounds):
            medians = {}
            names = list(variants)[r % 2 :] + list(variants)[: r % 2]
            for name in names:
                times = []
                for _ in range(args.steps):
                    begin = time.process_time()
                    step(*variants[name], x, y)
                    times.append(time.process_time() - begin)
                medians[name] = statistics.median(times)
            ratios.append(medians["masked"] / medians["unmasked"])
            if r == 0:
                first = medians
        runtime = mask._runtime  # the masking work of a step, timed alone: what the ratio above should show
        begin = time.process_time()
        for _ in range(100):
            runtime.apply()  # after every optimizer step: every masked shard multiplied by its masks
        apply_s = (time.process_time() - begin) / 100
        begin = time.process_time()
        for _ in range(100):
            runtime.apply(only_stale=True)  # before every forward: which shards were written to since
        check_s = (time.process_time() - begin) / 100
        dist.barrier()
        start = time.perf_counter()
        pruned = mask.generate_pruned_model(inputs=x[:2])
        export_s = time.perf_counter() - start
        traced = [o.tensor for o in mask.selection.trace.owned.values()]  # do_mask() gathers the sharded ones
        full_mb = sum(t.numel() * t.element_size() for t in traced if hasattr(t, "full_tensor")) / 2**20
        shard_mb = sum(t.to_local().numel() * t.element_size() for t in masked_model.parameters()) / 2**20
        if rank == 0:
            params = sum(p.numel() for p in masked_model.parameters())
            lines = [
                f"# FSDP2 masking cost ({WORLD} gloo processes on CPU)",
                "",
                f"Command: `OMP_NUM_THREADS=1 {' '.join([Path(sys.executable).name, *sys.argv])}`; "
                f"{time.strftime('%Y-%m-%d', time.gmtime())}; torch {torch.__version__}; {platform.machine()}, "
                f"{torch.get_num_threads()} torch thread per process.",
                "",
                f"Transformer: {args.blocks} blocks, width {args.width}, {args.heads} heads, {params:,} parameters; "
                f"batch {args.batch} x {args.tokens} tokens per rank; L2Norm, ratio 0.5.",
                "",
                "| measure | value |",
                "| --- | --- |",
                f"| masked step / unmasked step (CPU time, median of {args.rounds} rounds of {args.steps}) "
                f"| {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)}) |",
                f"| unmasked step, first round (CPU time) | {first['unmasked'] * 1e3:.1f} ms |",
                f"| masking work per step, timed alone: zeroing {len(runtime.active)} masked shards after the "
                f"optimizer step + the forward's check (CPU time) | {apply_s * 1e3:.2f} + {check_s * 1e3:.2f} ms |",
                f"| do_mask() (elapsed) | {do_mask_s * 1e3:.0f} ms |",
                f"| held in full on each rank while the criterion scores / this rank's shards | "
                f"{full_mb:.2f} MB / {shard_mb:.2f} MB |",
                f"| generate_pruned_model() (elapsed, verified) | {export_s * 1e3:.0f} ms |",
                f"| exported parameters | {sum(p.numel() for p in pruned.parameters()):,} |",
            ]
            text = "\n".join(lines) + "\n"
            print(text)
            if args.output:
                Path(args.output).write_text(text)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", type=str, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(str(Path(folder) / "init"), args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
