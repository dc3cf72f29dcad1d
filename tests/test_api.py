"""End-to-end behaviour of the public API on small models: make, mask, export, verify, train, register."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pytest
import torch
import torchvision
from maskprune.algorithms import L1Norm, Random, Uniform
from torch import nn

import maskprune
import maskprune._export
import maskprune._walk
from maskprune import Mask
from maskprune._walk import ModelIndex, OwnedTensor

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5


# ---- models --------------------------------------------------------------------------------------------
SIZES = {"resnet18": 32, "mobilenet_v3_small": 32, "tiny_cnn": 16}
Build = Callable[[str], tuple[nn.Module, Callable[[int], torch.Tensor]]]


@functools.cache
def _torchvision(name: str) -> nn.Module:
    """One instance per process; tests take deep copies."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None).eval()


@pytest.fixture
def build(tiny_cnn) -> Build:
    """``build(name)``: a fresh model (eval mode) and a maker of its image inputs for a batch size."""

    def build(name: str) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
        size = SIZES[name]
        model = tiny_cnn() if name == "tiny_cnn" else copy.deepcopy(_torchvision(name))
        return model, lambda batch: torch.randn(batch, 3, size, size)

    return build


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


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


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def pruned_positions(group: maskprune.Group, member: maskprune.Member) -> np.ndarray:
    """The positions of ``member``'s dimension that belong to the group's removed channels."""
    return member.positions[np.isin(member.units, group.pruned)]


def member_names(mask: Mask) -> list[set[tuple[str, int]]]:
    return [{(m.name, m.dim) for m in g.members} for g in mask.groups]


def assert_equal_models(masked: nn.Module, pruned: nn.Module, inputs: object) -> None:
    result = maskprune.verify(masked, pruned, inputs)
    assert result.ok and result.max_rel <= RTOL, str(result)


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


def test_random_same_seed_same_channels_other_seed_other_channels(build: Build) -> None:
    def pruned_with(seed: int) -> list[list[int]]:
        model, inputs = build("resnet18")
        mask = Mask(model, inputs(1), algorithm=Random(seed=seed), ratio=0.5).make()
        mask.do_mask()
        return [g.pruned for g in mask.groups]

    first = pruned_with(0)
    assert first == pruned_with(0)
    assert first != pruned_with(1)


# ---- L1Norm: computed independently with numpy ---------------------------------------------------------------
def _filters_with_l1(l1: np.ndarray, in_channels: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random-sign filters whose L1 norm (sum of |w|) is exactly ``l1[i]`` for filter i, in float32."""
    shape = (len(l1), in_channels, k, k)
    w = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    w *= (l1 / np.abs(w).sum(axis=(1, 2, 3)))[:, None, None, None]
    return w.astype(np.float32)


def test_l1norm_prunes_the_lowest_l1_filters() -> None:
    rng = np.random.default_rng(0)
    l1 = np.array([3.0, 0.5, 2.0, 0.1, 5.0, 1.0, 4.0, 0.7])
    w1 = _filters_with_l1(l1, 2, 3, rng)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w1))
    w2 = model[2].weight.detach().clone()

    measured = np.abs(w1.astype(np.float64)).sum(axis=(1, 2, 3))
    drop = np.sort(np.argsort(measured)[:4])  # ratio 0.5 of 8 filters
    keep = np.setdiff1d(np.arange(8), drop)
    assert drop.tolist() == [1, 3, 5, 7]  # the construction of the weights itself

    x = torch.randn(2, 2, 6, 6)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    zero = (model[0].weight.detach().abs().sum((1, 2, 3)) == 0).numpy()
    assert np.flatnonzero(zero).tolist() == drop.tolist()

    pruned = mask.generate_pruned_model()
    torch.testing.assert_close(pruned[0].weight, torch.from_numpy(w1[keep]), rtol=0, atol=0)
    torch.testing.assert_close(pruned[2].weight, w2[:, keep], rtol=0, atol=0)


def test_l1norm_sums_mean_normalised_producers_of_a_residual_group() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 6, 3, padding=1, bias=False)
            self.b = nn.Conv2d(2, 6, 1, bias=False)
            self.head = nn.Conv2d(6, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.a(x) + self.b(x)))

    rng = np.random.default_rng(1)
    la = np.array([1.0, 8.0, 3.0, 9.0, 2.0, 7.0])
    lb = np.array([50.0, 10.0, 40.0, 30.0, 60.0, 20.0])
    model = Residual().eval()
    with torch.no_grad():
        model.a.weight.copy_(torch.from_numpy(_filters_with_l1(la, 2, 3, rng)))
        model.b.weight.copy_(torch.from_numpy(_filters_with_l1(lb, 2, 1, rng)))
    wa = model.a.weight.detach().double().abs().sum((1, 2, 3)).numpy()
    wb = model.b.weight.detach().double().abs().sum((1, 2, 3)).numpy()
    expected = set(np.argsort(wa / wa.mean() + wb / wb.mean())[:3].tolist())
    assert expected != set(np.argsort(wa + wb)[:3].tolist())  # the normalisation matters for these weights

    mask = Mask(model, torch.randn(1, 2, 5, 5), algorithm=L1Norm(), ratio=0.5).make()
    (group,) = mask.groups
    mask.do_mask()
    producer = next(m for m in group.members if m.name == "a.weight" and m.dim == 0)
    assert set(pruned_positions(group, producer).tolist()) == expected


@pytest.mark.parametrize("how", ["name", "module"])
def test_ignored_modules_keep_their_channels(how: str, tiny_cnn) -> None:
    model = tiny_cnn()
    full = Mask(copy.deepcopy(model), torch.randn(1, 3, 16, 16)).make()
    assert any(("conv1.weight", 0) in g for g in member_names(full))
    mask = Mask(model, torch.randn(1, 3, 16, 16), ignore=["conv1"] if how == "name" else [model.conv1]).make()
    assert len(mask.groups) == len(full.groups) - 1
    assert not any(("conv1.weight", 0) in g for g in member_names(mask))
    assert "ignored by the user (conv1)" in str(mask).split("Frozen", 1)[1]


# ---- the masked model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_make_changes_no_name_shape_or_value(train: bool, tiny_cnn) -> None:
    model = tiny_cnn().train(train)
    x = torch.randn(4, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    rng = torch.get_rng_state()

    Mask(model, x, algorithm=L1Norm()).make()

    assert torch.equal(torch.get_rng_state(), rng), "make() consumed random numbers (dropout in train mode)"
    after = model.state_dict()
    assert list(after) == list(state)
    assert [n for n, _ in model.named_parameters()] == names
    for key, value in state.items():
        assert torch.equal(after[key], value), f"make() changed {key}"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_lifecycle_preserves_every_training_flag(train: bool, tiny_cnn) -> None:
    model = tiny_cnn().train(train)
    model.bn2.train(not train)  # a mixed model: every flag must come back as it was
    flags = modes(model)
    mask = Mask(model, torch.randn(2, 3, 16, 16), algorithm=L1Norm()).make()
    assert modes(model) == flags
    mask.do_mask()
    assert modes(model) == flags
    pruned = mask.generate_pruned_model()
    assert modes(model) == flags and modes(pruned) == flags


class CachesOnTrain(nn.Module):
    """Rebuilds a cache in ``train()`` whatever the mode was (as timm's LeViT attention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Dropout()
        self.calls: list[bool] = []

    def train(self, mode: bool = True) -> CachesOnTrain:
        self.calls.append(mode)
        return super().train(mode)


@pytest.mark.parametrize("mode", [False, True], ids=["eval", "train"])
def test_set_mode_sets_the_flags_train_sets_and_calls_overrides(mode: bool) -> None:
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), shared, nn.Sequential(shared, CachesOnTrain()), CachesOnTrain())
    model[0].train(not mode)  # mixed flags: set_mode writes only the ones that differ
    reference = copy.deepcopy(model).train(mode)
    maskprune._walk.set_mode(model, mode)
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
    assert all(m.training == mode for m in model.modules())
    assert model[2][1].calls == [mode] and model[3].calls == [mode]  # called also where the mode did not change


class LayerNormMLP(nn.Module):
    """A LayerNorm over prunable channels: its mask needs a hook of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


@pytest.mark.parametrize("kind", ["cnn", "layer_norm"])
def test_remove_takes_every_hook_off_and_keeps_the_weights(kind: str, tiny_cnn, leftover_hooks) -> None:
    model, x = (tiny_cnn(), torch.randn(2, 3, 16, 16)) if kind == "cnn" else (LayerNormMLP().eval(), torch.randn(4, 6))
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    assert leftover_hooks(model)  # the mask is installed
    masked_out = run(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    mask.remove()

    assert leftover_hooks(model) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), f"remove() changed {key}"
    if kind == "cnn":  # no hook computed anything, so the plain forward is the masked one
        torch.testing.assert_close(run(model, x), masked_out, rtol=0, atol=0)


def test_training_the_masked_model_keeps_removed_channels_zero(tiny_cnn) -> None:
    model = tiny_cnn().train()
    mask = Mask(model, torch.randn(4, 3, 16, 16), algorithm=L1Norm(), ratio=0.5).make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out.detach()))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
    ]

    def step() -> None:
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)

    step()  # momentum from unmasked steps pushes removed weights away from zero: the mask must win
    assert mask.do_mask()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    checked = 0
    for _ in range(3):
        step()
        for group in mask.groups:
            for member in group.members:
                if member.dim == 0 and member.module in outputs and member.role in ("producer", "norm"):
                    channels = torch.as_tensor(pruned_positions(group, member))
                    assert torch.count_nonzero(outputs[member.module][:, channels]) == 0, member.name
                    checked += 1
    assert checked >= 9
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters()), "nothing trained"
    for handle in handles:
        handle.remove()

    pruned = mask.generate_pruned_model()
    assert_equal_models(model, pruned, torch.randn(3, 3, 16, 16))
    assert model.training


# ---- reports ----------------------------------------------------------------------------------------------
def test_print_mask_lists_groups_kept_total_and_frozen(build: Build, capsys) -> None:
    model, inputs = build("resnet18")
    mask = Mask(model, inputs(1), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    print(mask)
    text = capsys.readouterr().out
    kept, total = sum(g.kept for g in mask.groups), sum(g.size for g in mask.groups)
    assert f"{len(mask.groups)} groups, {kept}/{total} channels kept" in text
    for group in mask.groups:
        assert f"{group.kept}/{group.size}" in text
    frozen = text.split("Frozen", 1)
    assert len(frozen) == 2 and "fc.weight[0]" in frozen[1] and "model output" in frozen[1]


def test_str_group_is_a_table_of_members(tiny_cnn) -> None:
    mask = Mask(tiny_cnn(), torch.randn(1, 3, 16, 16), algorithm=L1Norm()).make()
    group = mask.groups[0]
    lines = str(group).splitlines()
    assert lines[0].startswith(f"Group 0: {group.kept}/{group.size}")
    assert lines[1].split()[:4] == ["module", "tensor", "dim", "role"]
    rows = [line.split()[:4] for line in lines[2:]]
    assert ["conv1", "weight", "0", "producer"] in rows
    assert ["bn1", "bias", "0", "norm"] in rows
    assert ["conv2", "weight", "1", "consumer"] in rows


# ---- inputs -----------------------------------------------------------------------------------------------
def test_input_shape_shorthand(tiny_cnn) -> None:
    model = tiny_cnn()
    mask = Mask(model, input_shape=(2, 3, 16, 16), algorithm=L1Norm()).make()
    assert isinstance(mask.example_inputs, torch.Tensor) and mask.example_inputs.shape == (2, 3, 16, 16)
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert_equal_models(model, pruned, torch.randn(5, 3, 16, 16))


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(4, 8)
        self.extra = nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, image: torch.Tensor, *, extra: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.image(image) + self.extra(extra)))


def test_dict_inputs_are_keyword_arguments() -> None:
    model = KeywordModel().eval()

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        return {"image": torch.randn(batch, 4), "extra": torch.randn(batch, 2)}

    mask = Mask(model, inputs(3), algorithm=L1Norm(), ratio=0.5).make()
    assert [g.size for g in mask.groups] == [8]
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert pruned.image.out_features == pruned.extra.out_features == pruned.head.in_features == 4
    assert_equal_models(model, pruned, inputs(5))


def test_meta_device_model(build: Build) -> None:
    model = torchvision.models.resnet18(weights=None).to("meta")
    mask = Mask(model, torch.randn(2, 3, 32, 32, device="meta"), algorithm=Uniform(seed=0), ratio=0.5).make()
    real, inputs = build("resnet18")
    assert [g.size for g in mask.groups] == [g.size for g in Mask(real, inputs(1)).make().groups]
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert mask.do_mask()

    pruned = mask.generate_pruned_model(verify=False)
    assert all(t.is_meta for t in [*pruned.parameters(), *pruned.buffers()])
    assert pruned.conv1.weight.shape == (32, 3, 7, 7)
    assert pruned.fc.weight.shape == (1000, 256)
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)


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


BROKEN_EXPORTS = [
    pytest.param(True, lambda t: t + 1.0, id="inplace-wrong_values"),
    pytest.param(False, lambda t: t + 1.0, id="copy-wrong_values"),
    pytest.param(True, lambda t: t[:, :-1], id="inplace-crash"),
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

    patch_export(monkeypatch, tuple(model.conv2.weight.shape), change)
    with pytest.raises(maskprune.ExportError, match=r"first diverging module: .*(conv2|bn2)"):
        mask.generate_pruned_model(inplace=inplace)

    after, after_sizes, after_hooks = masked_state(model)
    assert list(after) == list(state)
    for key, value in state.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
    assert after_hooks == hooks and after_sizes == sizes
    torch.testing.assert_close(run(model, x), soft, rtol=0, atol=0)
    group = mask.groups[0]
    producer = group.members[0]
    assert producer.name == "conv1.weight"
    removed = torch.as_tensor(pruned_positions(group, producer))
    with torch.no_grad():  # the hooks are live: removed weights brought back are zeroed again by the forward
        model.conv1.weight[removed] = 1.0
    torch.testing.assert_close(run(model, x), soft, rtol=0, atol=0)
    assert torch.count_nonzero(model.conv1.weight[removed]) == 0

    monkeypatch.undo()  # a faithful export again: the mask is still usable
    pruned = mask.generate_pruned_model(inplace=inplace)
    assert (pruned is model) == inplace and pruned.conv1.out_channels == 4


def test_verify_names_the_first_diverging_module(tiny_cnn) -> None:
    a, b = tiny_cnn(), tiny_cnn()  # two random initialisations
    result = maskprune.verify(a, b, torch.randn(2, 3, 16, 16))
    assert not result
    assert result.max_rel > result.rtol == RTOL
    assert result.first_divergence is not None and result.first_divergence.startswith("conv1 ")
    assert "DIFFERENT" in str(result) and "first diverging module: conv1" in str(result)
    assert maskprune.verify(a, copy.deepcopy(a), torch.randn(2, 3, 16, 16)).max_rel == 0


def test_verify_names_the_module_that_raised_even_without_a_message(tiny_cnn) -> None:
    """A pruned model whose layer raises differs from the masked one, and the layer is named (a bare ``assert``
    has no message to show)."""
    model = tiny_cnn()
    broken = copy.deepcopy(model)

    def bare_assert(module: nn.Module, args: tuple) -> None:
        raise AssertionError  # what a bare ``assert`` raises (pytest would give one in this file a message)

    broken.conv2.register_forward_pre_hook(bare_assert)
    result = maskprune.verify(model, broken, torch.randn(2, 3, 16, 16))
    assert not result and result.first_divergence == "conv2 (raised AssertionError)"


class _TopKScorer(nn.Module):
    """Features, then a discrete step (top-k positions): its output is an integer tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.score = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x)).flatten(1).topk(5).indices


def test_verify_within_a_submodule_compares_every_module_on_kept_channels() -> None:
    torch.manual_seed(0)
    model, x = _TopKScorer().eval(), torch.randn(2, 3, 8, 8)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert pruned.features[0].out_channels == 4 and pruned.features[3].out_channels == 4
    result = maskprune.verify(model, pruned, x, within="features", mask=mask)
    assert result.ok and result.scale > 0 and result.max_rel <= RTOL
    unmatched = maskprune.verify(model, pruned, x, within="features")  # without the mask: full widths compared
    assert not unmatched and unmatched.problem == "output shape (2, 4, 8, 8), expected (2, 8, 8, 8)"

    broken = copy.deepcopy(pruned)
    with torch.no_grad():
        broken.features[3].weight[0] += 0.5
    result = maskprune.verify(model, broken, x, within="features", mask=mask)
    assert not result and result.first_divergence.startswith("features.3 ")
    assert maskprune.verify(model, broken, x, within="features.0", mask=mask).ok  # before the change

    with pytest.raises(ValueError, match=r"verify\(within='head'\): not a submodule of the masked model"):
        maskprune.verify(model, pruned, x, within="head")


class _PrecisionSpy(nn.Module):
    """Records the float32 precision settings its forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.seen: list[tuple[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backends = torch.backends
        self.seen.append((backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision))
        return self.conv(x)


def test_verify_compares_full_float32_and_restores_the_settings() -> None:
    """TF32 would make two exact float32 computations differ by 1e-4: verify turns it off, then back on."""
    backends = torch.backends
    saved = backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision
    backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
    try:
        model = _PrecisionSpy()
        assert maskprune.verify(model, copy.deepcopy(model), torch.randn(1, 3, 2, 2)).ok
        assert model.seen == [("ieee", "ieee")]
        assert (backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    finally:
        backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = saved


class _PrecisionSpyNet(nn.Module):
    """Two convolutions (the first one's channels prunable); every forward of every copy logs its precision settings."""

    log: ClassVar[list[tuple[str, str]]] = []  # on the class: deep copies and exports log here too

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backends = torch.backends
        self.log.append((backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision))
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_the_export_verifies_in_full_float32_and_restores_the_settings(inplace: bool) -> None:
    """Both forwards of the export (masked and exported) run without TF32 or bf16, in a copy and in place."""
    backends = torch.backends
    saved = backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision
    backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
    try:
        model, x = _PrecisionSpyNet(), torch.randn(1, 3, 2, 2)
        mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
        mask.do_mask()
        _PrecisionSpyNet.log.clear()
        pruned = mask.generate_pruned_model(inplace=inplace)
        assert pruned.conv1.out_channels == 2
        assert _PrecisionSpyNet.log == [("ieee", "ieee")] * 2
        assert (backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    finally:
        backends.cudnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision = saved
        _PrecisionSpyNet.log.clear()


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


# ---- a user's registered layer --------------------------------------------------------------------------
class ScaledLinear(nn.Module):
    """A linear layer scaled per output channel through an op the tracer does not know (einsum)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.inner = nn.Linear(a, b)
        self.scale = nn.Parameter(torch.rand(b) + 0.5)
        self.bias = nn.Parameter(torch.randn(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...i,i->...i", self.inner(x), self.scale) + self.bias


SCALED_LINEAR_RULE = maskprune.LayerRule(
    inputs={0: {-1: "in"}},
    outputs={0: {-1: "out"}},
    params={"inner.weight": {0: "out", 1: "in"}, "inner.bias": {0: "out"}, "scale": {0: "out"}, "bias": {0: "out"}},
    roles={"out": "producer", "in": "consumer"},
)


def scaled_linear_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), ScaledLinear(8, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def test_unregistered_layer_with_unknown_op_is_frozen() -> None:
    model = scaled_linear_model()
    mask = Mask(model, torch.randn(4, 6), algorithm=L1Norm(), ratio=0.5).make()
    groups = member_names(mask)
    assert not any(("2.scale", 0) in g or ("2.inner.weight", 0) in g or ("4.weight", 1) in g for g in groups)
    assert any(("0.weight", 0) in g for g in groups)  # its input side is still prunable
    text = str(mask)
    assert "einsum" in text and "2.inner.weight[0]" in text.split("Frozen", 1)[1]
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert pruned[2].scale.shape == (10,) and pruned[2].inner.out_features == 10


@pytest.fixture
def registered_scaled_linear() -> Iterator[None]:
    maskprune.register(ScaledLinear, SCALED_LINEAR_RULE)
    try:
        yield
    finally:
        maskprune.unregister(ScaledLinear)


def test_registered_layer_is_pruned_with_its_neighbours(registered_scaled_linear) -> None:
    model = scaled_linear_model()
    mask = Mask(model, torch.randn(4, 6), algorithm=L1Norm(), ratio=0.5).make()
    groups = member_names(mask)
    assert {("2.inner.weight", 0), ("2.inner.bias", 0), ("2.scale", 0), ("2.bias", 0), ("4.weight", 1)} in groups
    assert any({("0.weight", 0), ("2.inner.weight", 1)} <= g for g in groups)
    assert mask.do_mask()

    pruned = mask.generate_pruned_model()
    assert_equal_models(model, pruned, torch.randn(7, 6))
    layer = pruned[2]
    assert type(layer) is ScaledLinear and type(layer.inner) is nn.Linear
    assert layer.scale.shape == layer.bias.shape == (5,)
    assert layer.inner.weight.shape == (5, 4) and (layer.inner.out_features, layer.inner.in_features) == (5, 4)
    assert pruned[0].out_features == 4 and pruned[4].in_features == 5
    assert isinstance(layer.scale, nn.Parameter) and isinstance(layer.bias, nn.Parameter)


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
        assert torch.equal(out[name], expected), name
        assert out[name].is_contiguous() and out[name].untyped_storage().nbytes() == expected.nbytes
    scratch_pointers = {flat.data_ptr() for flat in slicer.scratch.values()}
    assert len(slicer.scratch) == 2 and not scratch_pointers & {t.data_ptr() for t in out.values()}
    assert slicer.slice(OwnedTensor(torch.ones(3), False, [("", "absent")])) is None
