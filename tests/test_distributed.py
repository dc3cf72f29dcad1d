"""Two processes (gloo, CPU) train one masked model under DistributedDataParallel and prune it together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from maskprune.algorithms import APoZ, Random, Taylor
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import maskprune
from maskprune import Mask
from maskprune.distributed import all_reduce_sum, broadcast_flags, is_distributed

WORLD = 2


def small_net() -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on every rank (DDP would broadcast rank 0's anyway)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def everywhere(value: object) -> list:
    """``value`` of every rank, in rank order."""
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def local_taylor_means(algorithm: Taylor) -> dict[int, list]:
    """This rank's own sums and mini-batch counts (before any reduction), per group and site."""
    return {i: [(t.clone(), n) for t, n in sites] for i, sites in algorithm.state_dict()["sums"].items()}


def prune_together(rank: int, name: str, out: Path) -> None:
    """Train a few DDP steps between do_mask() calls; every rank must end each do_mask() with the same masks."""
    model = small_net()
    x = torch.randn(2, 3, 6, 6)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    calibration = [torch.randn(4, 3, 6, 6, generator=generator) for _ in range(2)]
    algorithm = {"taylor": Taylor(), "apoz": APoZ(calibration), "random": Random(seed=rank)}[name]
    mask = Mask(model, x, algorithm=algorithm, ratio=0.5, steps=3).make()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    mask.track_optimizer(optimizer)
    history = []
    for _ in range(3):
        for _ in range(2):
            bx, by = torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 4, (4,), generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(ddp(bx), by).backward()
            optimizer.step()
        if name == "taylor":  # statistics differ per rank; the scores every rank uses are of their sums
            own = everywhere(local_taylor_means(algorithm))
            assert any(not torch.equal(own[0][0][0][0], other[0][0][0]) for other in own[1:])
            algorithm.prepare(mask, mask.groups)
            for group in mask.groups:
                sites = [[r[group.index][s] for r in own] for s in range(len(own[0][group.index]))]
                expected = np.mean([(sum(t for t, _ in site) / sum(n for _, n in site)).double() for site in sites], 0)
                np.testing.assert_allclose(algorithm.score(group), expected, rtol=1e-6)
        assert mask.do_mask()
        keeps = everywhere([g.keep.tolist() for g in mask.groups])
        assert all(k == keeps[0] for k in keeps), f"{name}: ranks disagree after do_mask()"
        history.append(sum(sum(k) for k in keeps[0]))
    assert history[0] > history[1] > history[2]  # three steps of the schedule
    params = everywhere([p.detach().clone() for p in model.parameters()])
    # bit-exact: every rank applies the same averaged gradients to the same weights
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[1], strict=True))  # DDP kept them in sync
    if rank == 0:
        model.eval()
        pruned = mask.generate_pruned_model()  # verified against the masked model
        assert maskprune.verify(model, pruned, x)
        result = {"params": maskprune.count_parameters(pruned), "kept": [g.kept for g in mask.groups]}
        (out / f"{name}.json").write_text(json.dumps(result))


def worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert is_distributed()
        (total,) = all_reduce_sum([torch.tensor([rank + 1.0])])
        # bit-exact: small integers sum exactly in floating point
        assert total.item() == sum(range(1, WORLD + 1))
        assert broadcast_flags(np.array([rank == 0, rank != 0])).tolist() == [True, False]
        for name in ("taylor", "apoz", "random"):
            prune_together(rank, name, Path(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_prune_to_the_same_masks_under_ddp(tmp_path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for name in ("taylor", "apoz", "random"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["params"] < maskprune.count_parameters(small_net())


def test_outside_a_process_group_the_helpers_do_nothing() -> None:
    assert not is_distributed()
    flags = np.array([True, False, True])
    assert broadcast_flags(flags) is flags
    a = torch.arange(3.0)
    (b,) = all_reduce_sum([a])
    # bit-exact: a copy
    assert torch.equal(a, b) and b is not a
