"""Two processes (gloo, CPU) train masked models sharded by FSDP2 (``fully_shard``) and prune them together.

Each model is masked before sharding, trained with two ``do_mask()`` calls, checkpointed with
``torch.distributed.checkpoint`` and exported; the test process trains the same model on the same
batches alone and compares: parameters, keep flags, export, resumed run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from maskprune.algorithms import FPGM, Taylor, WandaSP
from torch import nn

import maskprune
from maskprune import Mask

WORLD = 2
STEPS = 6  # the last step is not the first after a mask change: gradients are not masked there
MASK_AT = (1, 3)  # do_mask() after these steps
NAMES = ("transformer", "cnn", "wanda")
CHECKPOINT_AT = 1  # saved after this step's do_mask(); the resumed run trains the steps after it

fsdp = pytest.importorskip("torch.distributed.fsdp")
dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


class Block(nn.Module):
    """Pre-norm attention (2 heads of 4, fused qkv) and MLP, each on a residual of width 8."""

    def __init__(self) -> None:
        super().__init__()
        self.heads, self.head_dim = 2, 4
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 3 * self.heads * self.head_dim)
        self.proj = nn.Linear(self.heads * self.head_dim, 8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)  # 5 rows: shards of 3 and 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).mean(dim=1)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, padding=1)  # 7 filters: shards of 4 and 3
        self.conv2 = nn.Conv2d(7, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def build(name: str, ranks: Sequence[int] = ()) -> tuple[nn.Module, torch.Tensor, maskprune.Algorithm]:
    """The same model and example input in every process, and the criterion; ``ranks``: whose calibration
    batches a calibrated criterion sees (one process sees every rank's)."""
    torch.manual_seed(0)
    if name == "transformer":  # weights: the criterion scores gathered full tensors
        return TinyTransformer(), torch.randn(2, 5, 6), FPGM()
    if name == "wanda":  # calibration statistics summed over the ranks
        calibration = [batch(name, rank, 100 + i)[0] for rank in ranks for i in range(2)]
        return TinyTransformer(), torch.randn(2, 5, 6), WandaSP(calibration)
    return TinyCNN(), torch.randn(2, 3, 6, 6), Taylor()  # gradient statistics summed over the ranks


def batch(name: str, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: every rank its own data."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    shape = (4, 3, 6, 6) if name == "cnn" else (4, 5, 6)
    return torch.randn(shape, generator=g), torch.randint(0, 5, (4,), generator=g)


def masked(name: str, device: str = "cpu") -> tuple[nn.Module, Mask, torch.optim.Optimizer]:
    ranks = [dist.get_rank()] if dist.is_initialized() else range(WORLD)
    with torch.device(device):
        model, x, algorithm = build(name, ranks)
    mask = Mask(model, x, algorithm=algorithm, ratio=0.5, steps=2).make()
    return model, mask, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def removed_positions(mask: Mask) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Per parameter name: (dim, removed positions) for each pruned dimension."""
    out = {}
    for (module, attr), dims in mask.selection.plan().items():
        name = f"{module}.{attr}" if module else attr
        size = dict(mask.model.named_parameters())[name].shape
        out[name] = [(d, torch.tensor(sorted(set(range(size[d])) - set(keep.tolist())))) for d, keep in dims]
    return out


# ---- one process: the reference ------------------------------------------------------------------------------
def train_alone(name: str) -> dict:
    model, mask, optimizer = masked(name)
    mask.track_optimizer(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        losses = [F.cross_entropy(model(bx), by) for bx, by in (batch(name, r, step) for r in range(WORLD))]
        (sum(losses) / WORLD).backward()  # what FSDP's averaged gradients are
        optimizer.step()
        if step in MASK_AT:
            assert mask.do_mask()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    exported = mask.generate_pruned_model().state_dict()
    return {"params": params, "keep": mask.selection.keep.tolist(), "export": exported} | {
        "flops_removed": mask.sparsity().flops_removed
    }


# ---- two processes -------------------------------------------------------------------------------------------
def shard(model: nn.Module) -> None:
    children = list(model.blocks) if isinstance(model, TinyTransformer) else [model.conv1, model.conv2]
    for child in children:
        fsdp.fully_shard(child)
    fsdp.fully_shard(model)


def checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, mask: Mask, folder: Path, save: bool) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    mask_file = folder / f"mask{dist.get_rank()}.pt"  # per rank: a criterion's statistics are the rank's own
    if save:
        dcp.save(state, checkpoint_id=folder)
        torch.save(mask.state_dict(), mask_file)
        return
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mask.load_state_dict(torch.load(mask_file, weights_only=True))


def assert_removed_zero(mask: Mask, optimizer: torch.optim.Optimizer) -> None:
    """Every removed position of this rank's shards is exactly 0 in weights, gradients and momentum."""
    rank = dist.get_rank()
    parameters = dict(mask.model.named_parameters())
    for name, dims in removed_positions(mask).items():
        p = parameters[name]
        rows = torch.chunk(torch.arange(p.shape[0]), WORLD)[rank]  # Shard(0): torch.chunk's split
        for t in (p, p.grad, optimizer.state[p]["momentum_buffer"]):
            shard_ = t.to_local()
            assert shard_.shape[0] == len(rows)
            for dim, removed in dims:
                if dim == 0:
                    removed = torch.nonzero(torch.isin(rows, removed)).flatten()
                # bit-exact: removed positions are zeroed by multiplication with 0
                assert shard_.index_select(dim, removed).abs().sum().item() == 0.0, (name, dim)


def train_sharded(name: str, folder: Path, resume: bool = False, meta: bool = False) -> dict:
    """Masked, sharded training; ``meta``: masked on the meta device, given its weights once sharded."""
    model, mask, _ = masked(name, "meta" if meta else "cpu")
    shard(model)
    if meta:
        model.to_empty(device="cpu")
        set_model_state_dict(model, build(name)[0].state_dict(), options=StateDictOptions(full_state_dict=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # of the sharded parameters
    mask.track_optimizer(optimizer)
    first = CHECKPOINT_AT + 1 if resume else 0
    if resume:
        checkpoint(model, optimizer, mask, folder, save=False)
    for step in range(first, STEPS):
        bx, by = batch(name, dist.get_rank(), step)
        optimizer.zero_grad()
        F.cross_entropy(model(bx), by).backward()
        optimizer.step()
        if step in MASK_AT:
            assert mask.do_mask()
            keeps = [None] * WORLD
            dist.all_gather_object(keeps, mask.selection.keep.tolist())
            assert keeps[0] == keeps[1], "ranks disagree after do_mask()"
        if step == CHECKPOINT_AT and not resume:
            checkpoint(model, optimizer, mask, folder, save=True)
    assert_removed_zero(mask, optimizer)
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    x = build(name)[1]
    exported = mask.generate_pruned_model(inputs=x)  # a collective: every rank gets the plain pruned model
    assert not any(isinstance(m, fsdp.FSDPModule) for m in exported.modules())
    only = mask.generate_pruned_model(inputs=x, rank0_only=True)
    assert (only is None) == (dist.get_rank() != 0)
    if only is not None:
        for a, b in zip(only.state_dict().values(), exported.state_dict().values(), strict=True):
            # bit-exact: the same gathered tensors, sliced the same way
            assert torch.equal(a, b)
    result = {"params": params, "keep": mask.selection.keep.tolist(), "export": exported.state_dict()}
    return result | {"flops_removed": mask.sparsity().flops_removed}


def refusals(name: str) -> None:
    """make() on a sharded model, an export in place of one, and FSDP1 are refused with errors that say what to do."""
    model, x, algorithm = build(name)
    shard(model)
    with pytest.raises(RuntimeError, match="call Mask\\(...\\).make\\(\\) on the unsharded model"):
        Mask(model, x, algorithm=algorithm).make()
    model, mask, _ = masked(name)
    shard(model)
    with pytest.raises(maskprune.ExportError, match="without inplace=True"):
        mask.generate_pruned_model(inplace=True)
    model, mask, _ = masked(name)
    wrapped = fsdp.FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="FSDP1"):
        mask.track_optimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match="fully_shard"):
        Mask(wrapped, x).make()


def worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name in NAMES:
            folder = Path(out) / name
            results = {"run": train_sharded(name, folder, resume=False)}
            if name != "wanda":
                results["resumed"] = train_sharded(name, folder, resume=True)
            if name == "transformer":
                results["meta"] = train_sharded(name, folder, meta=True)
            torch.save(results, folder / f"rank{rank}.pt")
        refusals("cnn")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_under_fsdp2_train_prune_resume_and_export_as_one_process(tmp_path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for name in NAMES:
        alone = train_alone(name)
        assert 0 < sum(alone["keep"]) < len(alone["keep"])
        for rank in range(WORLD):
            results = torch.load(tmp_path / name / f"rank{rank}.pt", weights_only=True)
            for run in [results["run"]] + ([results["meta"]] if name == "transformer" else []):
                assert run["keep"] == alone["keep"], f"{name}: other channels than one process removes"
                assert run["flops_removed"] == pytest.approx(alone["flops_removed"], abs=1e-12)
                for key, value in alone["params"].items():
                    torch.testing.assert_close(run["params"][key], value, atol=1e-5, rtol=0, msg=f"{name} {key}")
                assert run["export"].keys() == alone["export"].keys()
                for key, value in alone["export"].items():
                    assert run["export"][key].shape == value.shape, (name, key)
                    torch.testing.assert_close(run["export"][key], value, atol=1e-5, rtol=0)
            if name == "wanda":
                continue
            run, resumed = results["run"], results["resumed"]
            assert resumed["keep"] == run["keep"]
            for key in run["params"]:
                # bit-exact: the same operations on the same restored state, in the same processes
                assert torch.equal(resumed["params"][key], run["params"][key]), (name, key)
            for key in run["export"]:
                # bit-exact: slices of bit-equal weights
                assert torch.equal(resumed["export"][key], run["export"][key]), (name, key)
