"""The export: soft == hard on small models, a plain result, in a copy or in place, a failed export undone, the sliced
copy's buffers and scratch memory, train-only branches."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from _api import SIZES, Build, assert_equal_models, pruned_positions, run
from maskprune.algorithms import L1Norm, Uniform
from torch import nn

import maskprune
import maskprune._export
from maskprune import Mask
from maskprune._walk import ModelIndex, OwnedTensor

pytestmark = pytest.mark.usefixtures("one_thread")


def describe(model: nn.Module) -> dict[str, object]:
    """What an export must not change: module names and types, buffer names, parameter names."""
    return {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "buffers": [name for name, _ in model.named_buffers()],
        "parameters": [name for name, _ in model.named_parameters()],
    }


def channel_attributes(model: nn.Module) -> list[tuple[str, tuple]]:
    keys = ("in_channels", "out_channels", "num_features", "in_features", "out_features")
    return [(n, tuple(getattr(m, k, None) for k in keys)) for n, m in model.named_modules()]


# ---- soft == hard, plain export ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:FutureWarning")
@pytest.mark.parametrize("algorithm", ["l1", "uniform"])
@pytest.mark.parametrize("name", list(SIZES))
def test_soft_equals_hard_and_export_is_plain(name: str, algorithm: str, build: Build, leftover_hooks) -> None:
    model, inputs = build(name)
    before = describe(model)
    n_params = maskprune.count_parameters(model)
    x = inputs(2)

    criterion = L1Norm() if algorithm == "l1" else Uniform(seed=0)
    mask = Mask(model, x, algorithm=criterion, ratio=0.5).make()
    assert mask.do_mask()
    assert all(g.kept == g.size - g.size // 2 for g in mask.groups)
    pruned = mask.generate_pruned_model()

    assert pruned is not model
    assert_equal_models(model, pruned, x)
    assert_equal_models(model, pruned, inputs(3))
    assert run(pruned, x).abs().max() > 0, "all-zero outputs would make the comparison prove nothing"
    assert maskprune.count_parameters(pruned) < n_params
    assert maskprune.count_parameters(model) == n_params  # the masked model keeps its shapes

    assert leftover_hooks(pruned) == []
    assert describe(pruned) == before  # no extra buffers or parameters, module types unchanged
    traced = torch.jit.trace(pruned, x, check_trace=False)  # compared below, on other inputs
    y = inputs(3)
    torch.testing.assert_close(run(traced, y), run(pruned, y), rtol=1e-5, atol=1e-6)


# ---- export ---------------------------------------------------------------------------------------------
def test_inplace_export_returns_the_same_smaller_model(build: Build, leftover_hooks) -> None:
    model, inputs = build("resnet18")
    n_params = maskprune.count_parameters(model)
    x, y = inputs(2), inputs(3)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    soft_x, soft_y = run(model, x), run(model, y)

    pruned = mask.generate_pruned_model(inplace=True)

    assert pruned is model
    assert maskprune.count_parameters(model) < n_params
    assert leftover_hooks(model) == []
    torch.testing.assert_close(run(model, x), soft_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(model, y), soft_y, rtol=1e-5, atol=1e-6)


def test_inplace_export_gives_the_sliced_tensors_memory_back(build: Build) -> None:
    """The original of each sliced tensor is emptied as it goes (its memory given back at once, whoever else holds
    the parameter), so an in-place export needs about no memory beyond the masked model's; the tensors it keeps
    whole stay the same objects."""
    model, inputs = build("resnet18")
    mask = Mask(model, inputs(2), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    before = dict(model.named_parameters())
    bytes_before = sum(p.numel() * p.element_size() for p in before.values())

    mask.generate_pruned_model(inplace=True)

    after = dict(model.named_parameters())
    sliced = [name for name in before if after[name] is not before[name]]
    assert "layer1.0.conv1.weight" in sliced and "fc.bias" not in sliced  # the classes stay
    assert all(before[name].numel() == 0 for name in sliced)
    held = sum(p.numel() * p.element_size() for p in before.values())  # the originals, as a caller holding them
    assert held < 0.05 * bytes_before


def patch_export(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], change: Callable) -> None:
    """Until ``monkeypatch.undo()``, the export of a tensor of ``shape`` goes wrong: ``change`` is applied to it."""
    slice_ = maskprune._export.Slicer.slice

    def sliced(slicer: maskprune._export.Slicer, owned: OwnedTensor) -> torch.Tensor | None:
        out = slice_(slicer, owned)
        if out is None or tuple(owned.tensor.shape) != shape:
            return out
        with torch.no_grad():
            changed = change(out.detach()).clone()
        return nn.Parameter(changed, requires_grad=out.requires_grad) if isinstance(out, nn.Parameter) else changed

    monkeypatch.setattr(maskprune._export.Slicer, "slice", sliced)


def patch_plan(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], wrong: str) -> None:
    """Until ``monkeypatch.undo()``, the plan of a tensor of ``shape`` goes wrong: ``wrong="positions"`` keeps as many
    positions shifted by one (wrong values), ``"count"`` one fewer (a crash). The in-place export gives the sliced
    tensors' memory back and keeps their removed positions; its undo must still rebuild them exactly."""
    dims_ = maskprune._export.Slicer.dims

    def dims(slicer: maskprune._export.Slicer, owned: OwnedTensor) -> list | None:
        out = dims_(slicer, owned)
        if out is None or tuple(owned.tensor.shape) != shape:
            return out
        if wrong == "count":
            return [*out[:-1], (out[-1][0], out[-1][1][:-1])]
        return [(dim, np.sort((keep + 1) % owned.tensor.shape[dim])) for dim, keep in out]

    monkeypatch.setattr(maskprune._export.Slicer, "dims", dims)


BROKEN_EXPORTS = [
    pytest.param(True, "positions", id="inplace-wrong_values"),
    pytest.param(False, lambda t: t + 1.0, id="copy-wrong_values"),
    pytest.param(True, "count", id="inplace-crash"),
    pytest.param(False, lambda t: t[:, :-1], id="copy-crash"),
]


def masked_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list, list]:
    """Values, shapes, module attributes and hooks: what a failed export must leave as it was."""
    hooks = [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()]
    return {k: v.clone() for k, v in model.state_dict().items()}, channel_attributes(model), hooks


@pytest.mark.parametrize("inplace, change", BROKEN_EXPORTS)
def test_failed_export_leaves_the_masked_model_as_it_was(inplace: bool, change, tiny_cnn, monkeypatch) -> None:
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    state, sizes, hooks = masked_state(model)
    soft = run(model, x)

    if isinstance(change, str):
        patch_plan(monkeypatch, tuple(model.conv2.weight.shape), change)
    else:
        patch_export(monkeypatch, tuple(model.conv2.weight.shape), change)
    with pytest.raises(maskprune.ExportError, match=r"first diverging module: .*(conv2|bn2)"):
        mask.generate_pruned_model(inplace=inplace)

    after, after_sizes, after_hooks = masked_state(model)
    assert list(after) == list(state)
    for key, value in state.items():
        # bit-exact: compared with a copy taken before, and nothing may write to it
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
    assert after_hooks == hooks and after_sizes == sizes
    # bit-exact: the same model, weights and input: the same kernels on the same shapes
    torch.testing.assert_close(run(model, x), soft, rtol=0, atol=0)
    group = mask.groups[0]
    producer = group.members[0]
    assert producer.name == "conv1.weight"
    removed = torch.as_tensor(pruned_positions(group, producer))
    with torch.no_grad():  # the hooks are live: removed weights brought back are zeroed again by the forward
        model.conv1.weight[removed] = 1.0
    # bit-exact: the removed weights are zeroed again: the same weights, kernels and shapes
    torch.testing.assert_close(run(model, x), soft, rtol=0, atol=0)
    # bit-exact: masks write exact zeros
    assert torch.count_nonzero(model.conv1.weight[removed]) == 0

    monkeypatch.undo()  # a faithful export again: the mask is still usable
    pruned = mask.generate_pruned_model(inplace=inplace)
    assert (pruned is model) == inplace and pruned.conv1.out_channels == 4


def test_failed_inplace_export_too_large_to_copy_says_so_and_restores(tiny_cnn, monkeypatch) -> None:
    """Naming the diverging module compares the model with a pruned copy; where no copy fits in memory (a 7B model
    on its host), the in-place export raises without it, the model put back as it was."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    state, _, _ = masked_state(model)
    patch_plan(monkeypatch, tuple(model.conv2.weight.shape), "positions")
    monkeypatch.setattr(maskprune.mask, "_copy_fits", lambda model: False)
    copies = []
    monkeypatch.setattr(Mask, "_plain_copy", lambda *args: copies.append(args))
    with pytest.raises(maskprune.ExportError, match="differs from the masked model: .*named by an export that is not"):
        mask.generate_pruned_model(inplace=True)
    assert copies == []
    after, _, _ = masked_state(model)
    for key, value in state.items():
        # bit-exact: rebuilt from the kept and the removed positions, which are copies of the same values
        assert torch.equal(after[key], value), key


# ---- train-only branches --------------------------------------------------------------------------------
def test_googlenet_aux_branches_are_pruned_and_train() -> None:
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).eval()
    x = torch.randn(2, 3, 96, 96)
    mask = Mask(model, x, algorithm=Uniform(seed=0), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert_equal_models(model, pruned, torch.randn(1, 3, 96, 96))
    assert pruned.aux1.fc1.out_features == pruned.aux2.fc1.out_features == 512  # traced in train mode only
    assert pruned.aux1.fc2.out_features == 1000

    pruned.train()
    out = pruned(torch.randn(2, 3, 96, 96))
    assert out.aux_logits1 is not None and out.aux_logits2 is not None
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 1000)
    (out.logits.square().mean() + 0.3 * (out.aux_logits1.square().mean() + out.aux_logits2.square().mean())).backward()
    for module in (pruned.conv1.conv, pruned.aux1.fc1, pruned.aux2.conv.conv):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_the_sliced_copy_copies_unsliced_buffers_as_deepcopy_does() -> None:
    """Shared storages stay shared, strides and values stay, odd buffers (views, subclasses) take deepcopy's path."""

    class Buffers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("whole", torch.arange(6.0))
            self.register_buffer("view", self.whole.view(2, 3))  # the same storage
            self.register_buffer("part", self.whole[2:])  # a part of it
            self.register_buffer("strided", torch.arange(6.0).view(2, 3).t())
            self.register_buffer("count", torch.tensor(3))
            self.register_buffer("tagged", torch.ones(2))
            self.tagged.note = "kept"

    model = Buffers()
    new, old = maskprune._export.sliced_copy(ModelIndex(model), {}), copy.deepcopy(model)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        copied, reference = getattr(new, name), getattr(old, name)
        # bit-exact: the buffers are copies
        assert (
            torch.equal(copied, buffer) and copied.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        )
        assert (copied.stride(), copied.storage_offset(), copied.dtype) == (
            reference.stride(),
            reference.storage_offset(),
            reference.dtype,
        )
    pointer = new.whole.untyped_storage().data_ptr()
    assert new.view.untyped_storage().data_ptr() == new.part.untyped_storage().data_ptr() == pointer
    assert new.tagged.note == "kept"


def test_slices_of_large_tensors_pruned_along_several_dims_are_their_own_and_exact() -> None:
    """Large intermediates go through reused scratch memory; each result owns its memory and holds its kept values."""
    rows, cols = 2048, 512  # 4 MiB of float32: intermediates and results above the size where scratch is used
    assert rows // 2 * 300 * 4 >= maskprune._export.SCRATCH_BYTES
    tensors = {
        "first": torch.randn(rows, cols),
        "second": torch.randn(rows, cols),  # the same shape: it reuses the first one's scratch
        "three_dims": torch.randn(32, 128, 256),  # two large intermediates: both scratch slots
        "small": torch.randn(8, 6),  # below the size: plain selections
    }
    plan = {
        ("", "first"): [(0, np.arange(0, rows, 2)), (1, np.arange(100, 500))],
        ("", "second"): [(0, np.arange(rows // 2)), (1, np.arange(cols - 300, cols))],
        ("", "three_dims"): [(0, np.arange(30)), (1, np.arange(96)), (2, np.arange(0, 256, 8))],
        ("", "small"): [(0, np.array([1, 7])), (1, np.array([0, 5]))],
    }
    slicer = maskprune._export.Slicer(plan)
    out = {
        name: slicer.slice(OwnedTensor(tensor, False, [("", name)]))
        for name, tensor in tensors.items()  # in order: each later slice writes the scratch again
    }
    for name, tensor in tensors.items():
        expected = tensor
        for dim, keep in plan["", name]:
            expected = expected.index_select(dim, torch.as_tensor(keep))
        # bit-exact: index selections copy values
        assert torch.equal(out[name], expected), name
        assert out[name].is_contiguous() and out[name].untyped_storage().nbytes() == expected.nbytes
    scratch_pointers = {flat.data_ptr() for flat in slicer.scratch.values()}
    assert len(slicer.scratch) == 2 and not scratch_pointers & {t.data_ptr() for t in out.values()}
    assert slicer.slice(OwnedTensor(torch.ones(3), False, [("", "absent")])) is None
