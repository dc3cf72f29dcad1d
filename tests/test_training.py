"""Pruning inside real training: no host reads per step, torch.compile, autocast, checkpoints and resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from maskprune.algorithms import APoZ, L1Norm, Random, Taylor
from torch import nn
from torch.overrides import TorchFunctionMode

import maskprune
from maskprune import Mask
from maskprune._masking import MaskedTensor, MaskRuntime
from maskprune.callbacks import PruningCallback

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Conv-BN-ReLU with a residual add, then linear - LayerNorm - linear: groups, norm hooks and a norm over them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc2(self.relu(self.norm(self.fc1(y))))


def net(seed: int = 0) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return model, torch.randn(4, 3, 6, 6)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 5, (4,), generator=generator)) for _ in range(n)
    ]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def removed_values(mask: Mask) -> torch.Tensor:
    """Every parameter value of every removed channel, concatenated."""
    out = []
    for g in mask.groups:
        for m in g.members:
            idx = torch.as_tensor(m.positions[~g.keep[m.units]])
            out.append(m.tensor.detach().index_select(m.dim, idx).flatten())
    return torch.cat(out)


# ---- no host synchronisation per step ------------------------------------------------------------------------
class NoHostReads(TorchFunctionMode):
    """Rejects every tensor call that reads values on the host (each one a device synchronisation on a GPU)."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            raise AssertionError(f"host read in per-step code: Tensor.{name}")
        return func(*args, **(kwargs or {}))


def test_the_mode_rejects_host_reads() -> None:
    with pytest.raises(AssertionError, match="Tensor.item"), NoHostReads():
        torch.ones(1).sum().item()


@pytest.mark.parametrize("foreach", [False, True])
def test_masked_training_steps_read_nothing_on_the_host(foreach: bool) -> None:
    """SGD (AdamW's CPU step reads its step count with ``item()`` itself: a CPU tensor, no GPU synchronisation)."""
    model, x = net()
    algorithm = Taylor()
    mask = Mask(model, x, algorithm=algorithm, ratio=0.5, steps=2).make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=foreach)
    mask.track_optimizer(optimizer)
    data = batches(6)
    with NoHostReads():  # Taylor's hooks collect statistics in these steps
        for bx, by in data[:3]:
            train_step(model, optimizer, bx, by)
    mask.do_mask()  # reads the decision on the host: once per do_mask(), not per step
    with NoHostReads():  # the first steps after a mask change (gradients and states masked) and the later ones
        for bx, by in data[3:]:
            train_step(model, optimizer, bx, by)
        model.eval()
        model(x)
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    assert maskprune.verify(model, mask.generate_pruned_model(), x)


def test_apoz_counts_zeros_without_host_reads_per_batch() -> None:
    model, x = net()
    data = [bx for bx, _ in batches(3)]

    class Strict:
        """Calibration batches whose forward passes (and the zero counting in them) run under NoHostReads."""

        def __iter__(self):
            for batch in data:
                with NoHostReads():
                    yield batch

    mask = Mask(model, x, algorithm=APoZ(Strict()), ratio=0.5).make()
    assert mask.do_mask()
    assert any(g.kept < g.size for g in mask.groups)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the CPU test above is the required one)"
)
def test_masked_training_steps_do_not_synchronise_the_gpu() -> None:
    model, x = net()
    model, x = model.cuda(), x.cuda()
    mask = Mask(model, x, algorithm=Taylor(), ratio=0.5).make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask.track_optimizer(optimizer)
    data = [(bx.cuda(), by.cuda()) for bx, by in batches(4)]
    train_step(model, optimizer, *data[0])
    mask.do_mask()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for bx, by in data:
            train_step(model, optimizer, bx, by)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert maskprune.verify(model, mask.generate_pruned_model(), x)


# ---- weights stay zero whatever writes them -------------------------------------------------------------------
def regularised_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """A loss with a term pulling every weight towards 1: removed positions get a gradient."""
    optimizer.zero_grad(set_to_none=True)
    pull = sum(((p - 1) ** 2).sum() for p in model.parameters())
    (F.cross_entropy(model(x), y) + 1e-2 * pull).backward()
    optimizer.step()


OPTIMIZERS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("implementation", list(OPTIMIZERS))
def test_tracked_steps_rezero_weights_that_a_loss_term_moves(implementation: str) -> None:
    model, x = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **OPTIMIZERS[implementation])
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make().track_optimizer(optimizer)
    mask.do_mask()
    for bx, by in batches(3):
        regularised_step(model, optimizer, bx, by)
        # bit-exact: masks write exact zeros
        assert removed_values(mask).abs().max() == 0  # right after the step, before any forward
    assert maskprune.verify(model, mask.generate_pruned_model(), x)


def test_every_tracked_optimizer_has_its_states_masked_after_a_mask_change() -> None:
    model, x = net()
    convs = [p for name, p in model.named_parameters() if name.startswith(("conv", "bn"))]
    rest = [p for name, p in model.named_parameters() if not name.startswith(("conv", "bn"))]
    optimizers = [torch.optim.SGD(convs, lr=0.1, momentum=0.9), torch.optim.Adam(rest, lr=1e-2)]

    def step(bx: torch.Tensor, by: torch.Tensor) -> None:
        for optimizer in optimizers:
            optimizer.zero_grad()
        F.cross_entropy(model(bx), by).backward()
        for optimizer in optimizers:
            optimizer.step()

    data = batches(5)
    for bx, by in data[:2]:
        step(bx, by)  # momentum and Adam moments are non-zero everywhere now
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    for optimizer in optimizers:
        mask.track_optimizer(optimizer)
    mask.do_mask()
    for bx, by in data[2:]:
        step(bx, by)
    for g in mask.groups:
        for m in g.members:
            idx = torch.as_tensor(m.positions[~g.keep[m.units]])
            states = [s for opt in optimizers for s in opt.state.get(m.tensor, {}).values()]
            assert states, m.name
            for state in states:
                if isinstance(state, torch.Tensor) and state.shape == m.tensor.shape:
                    # bit-exact: masks write exact zeros into optimizer states
                    assert state.index_select(m.dim, idx).abs().max() == 0, m.name
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0


@pytest.mark.parametrize("implementation", list(OPTIMIZERS))
def test_untracked_optimizer_steps_are_rezeroed_before_the_forward(implementation: str) -> None:
    model, x = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **OPTIMIZERS[implementation])
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    for bx, by in batches(3):
        regularised_step(model, optimizer, bx, by)
    assert removed_values(mask).abs().max() > 0  # nothing tracks this optimizer: the step moved them
    model.eval()
    soft = model(x)  # the forward re-zeroes what the step wrote to
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    pruned = mask.generate_pruned_model()
    assert torch.allclose(soft, pruned(x), rtol=1e-5, atol=1e-6)


def test_with_a_tracked_optimizer_the_forward_rezeroes_what_something_else_wrote() -> None:
    """Writes PyTorch counts (in-place ops, load_state_dict) are re-zeroed by the next forward; writes through
    ``.data`` are not counted and wait for the next optimizer step or do_mask() (documented)."""
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mask.track_optimizer(optimizer)
    mask.do_mask()
    model.eval()
    model.conv2.weight.data.add_(1.0)
    model(x)
    assert removed_values(mask).abs().max() > 0  # not seen: no version bump
    with torch.no_grad():
        model.conv2.weight.add_(1.0)  # a plain in-place write
    model(x)
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    model.load_state_dict(net(seed=5)[0].state_dict())  # new weights everywhere
    model(x)
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    assert maskprune.verify(model, mask.generate_pruned_model(), x)


def count_zeroing(monkeypatch) -> tuple[list[bool], list[torch.Tensor]]:
    """Record each MaskRuntime.apply (its ``only_stale``) and each parameter it zeroed."""
    calls: list[bool] = []
    zeroed: list[torch.Tensor] = []
    apply, zero = MaskRuntime.apply, MaskedTensor.zero

    def counted_apply(runtime: MaskRuntime, only_stale: bool = False) -> None:
        calls.append(only_stale)
        apply(runtime, only_stale)

    def counted_zero(entry: MaskedTensor) -> None:
        zeroed.append(entry.tensor)
        zero(entry)

    monkeypatch.setattr(MaskRuntime, "apply", counted_apply)
    monkeypatch.setattr(MaskedTensor, "zero", counted_zero)
    return calls, zeroed


def test_the_export_zeroes_only_weights_written_since_and_its_verification_forward_does_not_zero_again(
    monkeypatch,
) -> None:
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    model.eval()
    calls, zeroed = count_zeroing(monkeypatch)
    pruned = mask.generate_pruned_model()
    assert calls == [True] and zeroed == []  # do_mask() zeroed them: nothing was written since
    with torch.no_grad():
        model.conv2.weight.add_(1.0)  # a write its version counter sees
    pruned = mask.generate_pruned_model()
    assert calls == [True, True] and [t is model.conv2.weight for t in zeroed] == [True]
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    model(x)
    assert calls[2:] == [False]  # outside the export, every forward zeroes again
    assert maskprune.verify(model, pruned, x)


def test_an_export_after_a_write_no_version_counter_saw_zeroes_all_and_verifies_again(monkeypatch) -> None:
    """Writes through ``.data`` leave removed weights non-zero unseen: the outputs differ, so the export zeroes
    every masked weight and runs the masked model again, and the export passes."""
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    model.eval()
    for parameter in model.parameters():
        parameter.data.add_(1.0)  # writes no version counter sees, to producers and consumers of removed channels
    calls, _ = count_zeroing(monkeypatch)
    pruned = mask.generate_pruned_model()
    assert calls == [True, False]  # the stale pass found nothing, then all were zeroed where the outputs differed
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    assert maskprune.verify(model, pruned, x)
    assert torch.allclose(model(x), pruned(x), rtol=1e-5, atol=1e-6)


def test_an_export_without_verification_slices_without_zeroing(monkeypatch) -> None:
    """The slices leave out every masked position, so verify=False skips the pass over the weights: same model."""
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    model.eval()
    for parameter in model.parameters():
        parameter.data.add_(1.0)  # removed positions no longer zero, and no version counter saw it
    monkeypatch.setattr(MaskRuntime, "apply", lambda *args, **kwargs: pytest.fail("verify=False zeroed the weights"))
    unverified = mask.generate_pruned_model(verify=False)
    assert removed_values(mask).abs().max() > 0
    monkeypatch.undo()
    verified = mask.generate_pruned_model()
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    assert unverified.state_dict().keys() == verified.state_dict().keys()
    # bit-exact: copies of the same kept positions
    assert all(torch.equal(t, verified.state_dict()[k]) for k, t in unverified.state_dict().items())


# ---- torch.compile ---------------------------------------------------------------------------------------------
class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph.forward


def test_compiled_masked_model_matches_eager_and_do_mask_does_not_recompile() -> None:
    torch._dynamo.reset()
    model, x = net()
    model.eval()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.75, steps=3).make()
    mask.do_mask()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    # eager norms gather the kept channels, the compiled graph masks them by value: equal but for rounding
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    graphs = backend.graphs
    for _ in range(2):
        before = [g.kept for g in mask.groups]
        mask.do_mask()
        assert [g.kept for g in mask.groups] != before  # the masks changed by value
        out = compiled(x)
        assert torch.allclose(out, model(x), rtol=1e-6, atol=1e-6)
        pruned = mask.generate_pruned_model()
        assert torch.allclose(out, pruned(x), rtol=1e-5, atol=1e-6)
    assert backend.graphs == graphs, f"do_mask() recompiled: {backend.graphs - graphs} new graph(s)"


def test_compiled_masked_training_keeps_removed_channels_zero() -> None:
    torch._dynamo.reset()
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask.track_optimizer(optimizer)
    compiled = torch.compile(model, backend="aot_eager")
    for bx, by in batches(3):
        regularised_step(compiled, optimizer, bx, by)
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    model.eval()
    pruned = mask.generate_pruned_model()
    assert torch.allclose(compiled(x), pruned(x), rtol=1e-5, atol=1e-6)


def test_exported_model_compiles() -> None:
    torch._dynamo.reset()
    model, x = net()
    model.eval()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    compiled = torch.compile(pruned, backend="aot_eager")
    assert torch.allclose(compiled(x), pruned(x), rtol=1e-6, atol=1e-6)


# ---- mixed precision -------------------------------------------------------------------------------------------
def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_soft_equals_hard_under_cpu_bf16_autocast() -> None:
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask.track_optimizer(optimizer)
    for bx, by in batches(3):  # training steps under autocast keep removed channels at zero
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(bx), by)
        loss.backward()
        optimizer.step()
    # bit-exact: masks write exact zeros
    assert removed_values(mask).abs().max() == 0
    model.eval()
    pruned = mask.generate_pruned_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        soft, hard = model(x), pruned(x)
    assert soft.dtype == hard.dtype
    # bf16 keeps 8 significant bits (2**-8 = 4e-3 per rounding; 6e-3 here): a leaking channel would be O(1)
    assert relative_difference(soft, hard) <= 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_equals_hard_under_cuda_autocast(dtype: torch.dtype) -> None:
    model, x = net()
    model, x = model.cuda().eval(), x.cuda()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    with torch.autocast("cuda", dtype=dtype):
        soft, hard = model(x), pruned(x)
    assert relative_difference(soft, hard) <= 2e-2


# ---- checkpoints and resume ------------------------------------------------------------------------------------
SCHEDULE = 4  # do_mask() every SCHEDULE training steps, steps=4: the last one at step 16


def run(algorithm_for, steps: range, state: dict | None = None) -> tuple[Mask, nn.Module, torch.optim.Optimizer]:
    """Train ``steps`` of the schedule, from scratch or from a checkpoint ``state``."""
    model, x = net(seed=0 if state is None else 9)  # a resumed run starts from other weights: the checkpoint's count
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    mask = Mask(model, x, algorithm=algorithm_for(), ratio=0.5, steps=4).make()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        mask.load_state_dict(state["mask"])
    mask.track_optimizer(optimizer)
    data = batches(16)
    for step in steps:
        train_step(model, optimizer, *data[step])
        if (step + 1) % SCHEDULE == 0:
            mask.do_mask()
    return mask, model, optimizer


@pytest.mark.parametrize("algorithm_for", [Taylor, lambda: Random(seed=3)], ids=["taylor", "random"])
def test_resume_mid_schedule_gives_the_same_masks_and_export(algorithm_for, tmp_path) -> None:
    full, full_model, _ = run(algorithm_for, range(16))
    first, model, optimizer = run(algorithm_for, range(10))  # two do_mask() calls, two steps of statistics after
    assert first._pruner.step == 2
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "mask": first.state_dict()}, path)
    del first, model, optimizer
    state = torch.load(path, weights_only=True)
    resumed, resumed_model, _ = run(algorithm_for, range(10, 16), state)
    assert [g.keep.tolist() for g in resumed.groups] == [g.keep.tolist() for g in full.groups]
    assert resumed.sparsity().groups == full.sparsity().groups
    a, b = full.generate_pruned_model(), resumed.generate_pruned_model()
    assert list(a.state_dict()) == list(b.state_dict())
    for name, value in a.state_dict().items():
        # bit-exact: the same steps on the same shapes and data, in the same order
        assert torch.equal(value, b.state_dict()[name]), name
    assert not resumed.do_mask()  # the schedule is over in both


def test_taylor_state_carries_the_statistics_between_do_mask_calls() -> None:
    model, x = net()
    algorithm = Taylor()
    mask = Mask(model, x, algorithm=algorithm, ratio=0.5).make()
    for bx, by in batches(2):
        F.cross_entropy(model(bx), by).backward()
    scores = [algorithm.score(g) for g in mask.groups]
    state = mask.state_dict()
    fresh, _ = net(seed=4)
    other = Taylor()
    copy_mask = Mask(fresh, x, algorithm=other, ratio=0.5).make()
    copy_mask.load_state_dict(state)
    for g, expected in zip(copy_mask.groups, scores, strict=True):
        # bit-exact: load_state_dict copies the statistics
        assert (other.score(g) == expected).all()


def test_load_state_dict_rejects_a_state_of_another_model_and_changes_nothing() -> None:
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    state = mask.state_dict()
    other = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    other_mask = Mask(other, x, algorithm=L1Norm(), ratio=0.5).make()
    weights = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="same architecture"):
        other_mask.load_state_dict(state)
    taylor_mask = Mask(net()[0], x, algorithm=Taylor(), ratio=0.5).make()
    with pytest.raises(ValueError, match="saved with the criterion L1Norm, this Mask has Taylor"):
        taylor_mask.load_state_dict(state)
    assert all(g.kept == g.size for g in taylor_mask.groups)
    with pytest.raises(ValueError, match="missing"):
        other_mask.load_state_dict({"keep": state["keep"]})
    with pytest.raises(TypeError, match="dict"):
        other_mask.load_state_dict([1, 2])
    assert all(g.kept == g.size for g in other_mask.groups)
    # bit-exact: compared with a copy taken before, and nothing may write to it
    assert all(torch.equal(v, weights[k]) for k, v in other.state_dict().items())


def test_masking_keeps_the_models_state_dict_keys() -> None:
    model, x = net()
    keys = list(model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    mask = Mask(model, x, algorithm=Taylor(), ratio=0.5).make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask.track_optimizer(optimizer)
    for bx, by in batches(2):
        train_step(model, optimizer, bx, by)
    mask.do_mask()
    train_step(model, optimizer, *batches(1)[0])
    assert list(model.state_dict()) == keys
    assert [name for name, _ in model.named_parameters()] == names
    assert all(".mask" not in key and "keep" not in key for key in keys)


def conv_bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def test_a_masked_models_checkpoint_loads_into_an_unmasked_copy() -> None:
    torch.manual_seed(0)
    model, x = conv_bn_net(), torch.randn(4, 3, 6, 6)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask.track_optimizer(optimizer)
    mask.do_mask()
    for bx, by in batches(2):
        train_step(model, optimizer, bx, by)
    plain = conv_bn_net()
    plain.load_state_dict(model.state_dict())  # strict: the same keys and shapes
    model.eval(), plain.eval()
    # removed channels are stored as zeros (weights, BN affine parameters), so the plain copy computes the same
    assert torch.allclose(plain(x), model(x), rtol=1e-6, atol=1e-7)
    assert torch.allclose(plain(x), mask.generate_pruned_model()(x), rtol=1e-5, atol=1e-6)


# ---- a Lightning-style callback --------------------------------------------------------------------------------
class FakeTrainer:
    """What the callback reads of a Lightning trainer: its optimizers and the count of optimizer steps."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers = [optimizer]
        self.global_step = 0


def fit(callback: PruningCallback, trainer: FakeTrainer, model: nn.Module, steps: range, accumulate: int) -> None:
    """A Lightning-like loop: ``accumulate`` batches per optimizer step, the hooks where Lightning calls them."""
    optimizer = trainer.optimizers[0]
    callback.on_train_start(trainer, model)
    data = batches(32)
    for index in steps:
        F.cross_entropy(model(data[index][0]), data[index][1]).backward()
        if (index + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            trainer.global_step += 1
        callback.on_train_batch_end(trainer, model, None, data[index], index)


def test_callback_prunes_every_n_optimizer_steps_and_resumes(tmp_path) -> None:
    model, x = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask = Mask(model, x, algorithm=Random(seed=1), ratio=0.5, steps=3).make()
    callback = PruningCallback(mask, every=2, start=1)
    trainer = FakeTrainer(optimizer)
    fit(callback, trainer, model, range(12), accumulate=2)  # optimizer steps 1..6: do_mask() at 3 and 5
    assert callback.last_step == 5 and mask._pruner.step == 2
    assert mask._runtime.optimizer_handles  # the optimizer is tracked
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "callback": callback.state_dict()}, path)
    fit(callback, trainer, model, range(12, 16), accumulate=2)  # step 7 then do_mask() at 7
    expected = [g.keep.tolist() for g in mask.groups]

    state = torch.load(path, weights_only=True)
    other, _ = net(seed=3)
    other.load_state_dict(state["model"])
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    resumed = PruningCallback(Mask(other, x, algorithm=Random(seed=1), ratio=0.5, steps=3).make(), every=2, start=1)
    resumed.load_state_dict(state["callback"])
    other_trainer = FakeTrainer(other_optimizer)
    other_trainer.global_step = 6
    fit(resumed, other_trainer, other, range(12, 16), accumulate=2)
    assert resumed.last_step == 7 and [g.keep.tolist() for g in resumed.mask.groups] == expected


def test_callback_rejects_bad_options() -> None:
    model, x = net()
    mask = Mask(model, x, algorithm=L1Norm()).make()
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        PruningCallback(mask, every=0)
    with pytest.raises(TypeError, match="maskprune.Mask"):
        PruningCallback(model, every=2)


def test_a_kernels_masks_multiplied_together_zero_the_same_bits() -> None:
    """Joint masks (one pass over a 3x3 kernel) give what one mask at a time gives: NaN, infinities, -0, denormals."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    mask = Mask(model, torch.randn(1, 3, 12, 12), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    (entry,) = [e for e in mask._runtime.active if e.tensor is model[2].weight]
    assert entry.joint and len(entry.masks) == 2
    assert not next(e for e in mask._runtime.active if e.tensor is model[4].weight).joint  # 1x1: a pass per mask
    values = torch.randn(8, 8, 3, 3)
    values.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, -0.0, 1e-42])
    joint, apart = values.clone(), values.clone()
    entry.mask_(joint)
    MaskedTensor(apart, entry.masks).mask_(apart)
    # bit-exact: multiplying by 0 or 1 is exact, in any order
    assert torch.equal(joint.view(torch.int32), apart.view(torch.int32))
    assert joint.count_nonzero() < values.count_nonzero()
