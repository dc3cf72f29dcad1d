"""Activation criteria (APoZ, Taylor, ThiNet) against computations written out here, on hand-built tensors."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from maskprune.algorithms import APoZ, Taylor, ThiNet
from maskprune.algorithms.thinet import greedy_order
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn
from torch.overrides import TorchFunctionMode

from maskprune import Group, Mask
from maskprune.testing import TINY_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


def group_of(mask: Mask, producer: str) -> Group:
    """The group whose producers include ``producer`` (a module path)."""
    for group in mask.groups:
        if any(m.module == producer for m in group.producers()):
            return group
    raise AssertionError(f"no group produced by {producer!r}: {[str(g) for g in mask.groups]}")


def set_conv(conv: nn.Conv2d, weight: list, bias: list | None = None) -> None:
    """Hand-set a 1x1 convolution: ``weight[out][in]``."""
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight, dtype=torch.float32).view_as(conv.weight))
        if bias is not None:
            conv.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def conv1x1(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    """A 1x1 convolution in numpy (float64): (N, C, H, W) -> (N, O, H, W)."""
    w = conv.weight.detach().double().numpy()[:, :, 0, 0]
    out = np.einsum("oc,nchw->nohw", w, x)
    return out if conv.bias is None else out + conv.bias.detach().double().numpy()[None, :, None, None]


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def zero_fraction(batches: list[np.ndarray], hit: Callable[[np.ndarray], np.ndarray] = lambda a: a == 0) -> np.ndarray:
    """Per channel (dim 1): the fraction of ``hit`` elements over every batch, image and position."""
    hits = sum(hit(a).sum(axis=(0, 2, 3)) for a in batches)
    elements = sum(a.shape[0] * a.shape[2] * a.shape[3] for a in batches)
    return hits / elements


def integer_images(*shape: int, seed: int) -> torch.Tensor:
    """Small integers in [-3, 3]: every value below is exact in float32, so zeros are exact too."""
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ---- APoZ ------------------------------------------------------------------------------------------------
class ReluNet(nn.Module):
    """conv1 (1 -> 4) -> ReLU -> conv2 (4 -> 3) -> ReLU -> head, all 1x1 and hand-set."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 4, 1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 3, 1), nn.ReLU()
        self.head = nn.Conv2d(3, 2, 1)
        set_conv(self.conv1, [[1], [-1], [2], [0]], [0, 1, -2, 0])  # channel 3 is always exactly zero
        set_conv(self.conv2, [[1, 1, 0, 0], [0, -1, 1, 0], [-1, 0, 0, 1]], [0, 1, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


def relunet_activations(model: ReluNet, batches: list[torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    a1 = [relu(conv1x1(x.double().numpy(), model.conv1)) for x in batches]
    a2 = [relu(conv1x1(a, model.conv2)) for a in a1]
    return a1, a2


def test_apoz_equals_the_zero_fraction_after_each_relu() -> None:
    model = ReluNet().eval()
    batches = [
        integer_images(2, 1, 3, 4, seed=1),
        integer_images(3, 1, 3, 4, seed=2),
        integer_images(2, 1, 3, 4, seed=3),
    ]
    data = [(x, torch.zeros(len(x))) for x in batches]  # (inputs, targets): element 0 is fed
    algo = APoZ(data, max_batches=2)
    mask = Mask(model, batches[0], algorithm=algo).make()
    g1, g2 = group_of(mask, "conv1"), group_of(mask, "conv2")
    algo.prepare(mask, [g1, g2])
    a1, a2 = relunet_activations(model, batches[:2])  # max_batches=2: the third batch is not used
    np.testing.assert_allclose(algo.score(g1), 1 - zero_fraction(a1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(algo.score(g2), 1 - zero_fraction(a2), rtol=0, atol=1e-12)
    # bit-exact: 1 - 1 is exactly 0
    assert algo.score(g1)[3] == 0.0  # always zero: APoZ = 1
    assert algo.fallback == {} and algo.declined == {}
    algo.finish(mask)
    with pytest.raises(RuntimeError, match="prepare"):
        algo.score(g1)


def test_apoz_inputs_function_and_plain_tensors() -> None:
    model = ReluNet().eval()
    batches = [integer_images(2, 1, 3, 4, seed=4), integer_images(1, 1, 3, 4, seed=5)]
    mask = Mask(model, batches[0]).make()
    g1 = group_of(mask, "conv1")
    a1, _ = relunet_activations(model, batches)
    expected = 1 - zero_fraction(a1)
    by_function = APoZ([{"image": x} for x in batches], inputs=lambda batch: batch["image"])
    plain = APoZ(batches)
    for algo in (by_function, plain):
        algo.prepare(mask, [g1])
        np.testing.assert_allclose(algo.score(g1), expected, rtol=0, atol=1e-12)


class ResidualReluNet(nn.Module):
    """``s = stem(x)``; ``t = back(relu(mid(relu1(s))))``; ``head(relu2(s + t))``: two ReLUs read s's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu1 = nn.Conv2d(1, 3, 1), nn.ReLU()
        self.mid, self.relu_mid = nn.Conv2d(3, 2, 1), nn.ReLU()
        self.back, self.relu2 = nn.Conv2d(2, 3, 1), nn.ReLU()
        self.head = nn.Conv2d(3, 2, 1)
        set_conv(self.stem, [[1], [-2], [1]], [0, 1, -1])
        set_conv(self.mid, [[1, 0, 1], [0, 1, -1]], [0, 0])
        set_conv(self.back, [[-1, 0], [1, 1], [0, 2]], [1, 0, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        t = self.back(self.relu_mid(self.mid(self.relu1(s))))
        return self.head(self.relu2(s + t))


def test_apoz_averages_every_relu_of_a_residual_group() -> None:
    model = ResidualReluNet().eval()
    batches = [integer_images(2, 1, 4, 4, seed=6), integer_images(2, 1, 4, 4, seed=7)]
    algo = APoZ(batches)
    mask = Mask(model, batches[0], algorithm=algo).make()
    group = group_of(mask, "stem")
    assert {m.module for m in group.producers()} == {"stem", "back"}
    algo.prepare(mask, [group])
    s = [conv1x1(x.double().numpy(), model.stem) for x in batches]
    after_relu1 = [relu(v) for v in s]
    t = [conv1x1(relu(conv1x1(a, model.mid)), model.back) for a in after_relu1]
    after_relu2 = [relu(v + w) for v, w in zip(s, t, strict=True)]
    expected = 1 - (zero_fraction(after_relu1) + zero_fraction(after_relu2)) / 2
    np.testing.assert_allclose(algo.score(group), expected, rtol=0, atol=1e-12)
    assert not np.allclose(zero_fraction(after_relu1), zero_fraction(after_relu2))  # the average matters


class FunctionalNet(nn.Module):
    """``conv1 -> torch.relu -> conv2 -> SiLU -> F.conv2d(., bare weight)``: no ReLU module anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.act = nn.SiLU()
        self.head_weight = nn.Parameter(torch.ones(2, 3, 1, 1))
        set_conv(self.conv1, [[1], [0], [-2]], [0, 0.0005, 1])  # channel 1: always 0.0005 (<= eps, not zero)
        set_conv(self.conv2, [[4, 0, 0], [0, 0, -5], [2, 0, 3]], [0, 0, -10])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.act(self.conv2(torch.relu(self.conv1(x)))), self.head_weight)


def test_apoz_falls_back_to_near_zeros_without_a_relu_module() -> None:
    model = FunctionalNet().eval()
    batches = [integer_images(2, 1, 3, 3, seed=8), integer_images(2, 1, 3, 3, seed=9)]
    algo = APoZ(batches, eps=1e-3)
    mask = Mask(model, batches[0], algorithm=algo).make()
    g1, g2 = group_of(mask, "conv1"), group_of(mask, "conv2")
    with pytest.warns(UserWarning, match="no ReLU module") as record:
        algo.prepare(mask, [g1, g2])
    assert len(record) == 1
    # group 1: measured where conv2 reads it (after the functional ReLU); group 2: its last module output (SiLU)
    assert algo.fallback == {g1.index: "input of conv2", g2.index: "output of act"}
    near_zero = lambda a: np.abs(a) <= 1e-3  # noqa: E731
    a1 = [relu(conv1x1(x.double().numpy(), model.conv1)) for x in batches]
    z2 = [conv1x1(a, model.conv2) for a in a1]
    a2 = [z / (1 + np.exp(-z)) for z in z2]  # SiLU
    np.testing.assert_allclose(algo.score(g1), 1 - zero_fraction(a1, near_zero), rtol=0, atol=1e-12)
    np.testing.assert_allclose(algo.score(g2), 1 - zero_fraction(a2, near_zero), rtol=0, atol=1e-12)
    # bit-exact: 1 - 1 is exactly 0
    assert algo.score(g1)[1] == 0.0  # 0.0005 counts as zero under the eps rule


def test_apoz_without_eps_declines_groups_without_a_relu_module() -> None:
    model = FunctionalNet().eval()
    batches = [integer_images(2, 1, 3, 3, seed=8)]
    algo = APoZ(batches, eps=None)
    mask = Mask(model, batches[0], algorithm=algo, ratio=0.5).make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algo.prepare(mask, mask.groups)
        assert all(algo.score(g) is None for g in mask.groups)
    assert set(algo.declined) == {g.index for g in mask.groups} and algo.fallback == {}
    mask.do_mask()  # declined groups are left as they are
    assert all(g.kept == g.size for g in mask.groups)


def test_apoz_do_mask_removes_the_channels_with_most_zeros() -> None:
    model = ReluNet().eval()
    batches = [integer_images(4, 1, 3, 4, seed=10)]
    mask = Mask(model, batches[0], algorithm=APoZ(batches), ratio=0.25).make()
    assert mask.do_mask()
    assert group_of(mask, "conv1").pruned == [3]  # the channel that is always zero
    pruned = mask.generate_pruned_model()
    assert pruned.conv1.out_channels == 3


class HostReads(TorchFunctionMode):
    """Counts the tensor calls that read values on the host (each one a device synchronisation on a GPU)."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [lambda data: APoZ(data), lambda data: Taylor()], ids=["apoz", "taylor"])
def test_statistics_read_nothing_on_the_host_per_batch(make) -> None:
    """Statistics accumulate on the model's device: the host reads of a do_mask() do not grow with the batches."""
    reads = []
    for n_batches in (2, 7):
        torch.manual_seed(0)
        model = Calibrated().eval()
        batches = [torch.randn(2, 3, 6, 6) for _ in range(n_batches)]
        algorithm = make(batches)
        mask = Mask(model, batches[0], algorithm=algorithm, ratio=0.5).make()
        with HostReads() as counter:
            if isinstance(algorithm, Taylor):  # the user's own training steps feed Taylor's statistics
                for x in batches:
                    model(x).sum().backward()
            mask.do_mask()
        reads.append(counter.count)
        assert any(g.kept < g.size for g in mask.groups)
    assert reads[0] == reads[1], f"host reads with 2 and 7 batches: {reads}"


class Calibrated(nn.Module):
    """A model with BatchNorm and Dropout, to see modes and statistics during calibration."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.conv2, self.drop = nn.Conv2d(6, 4, 3, padding=1), nn.Dropout(0.5)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))))))


@pytest.mark.parametrize(
    "make", [lambda data: APoZ(data), lambda data: ThiNet(data, rescale=False)], ids=["apoz", "thinet"]
)
def test_calibration_restores_modes_and_leaves_weights_alone(make, leftover_hooks) -> None:
    model = Calibrated().train()
    model.conv2.eval()  # mixed flags must come back as they were
    batches = [torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)]
    algo = make(batches)
    mask = Mask(model, batches[0], algorithm=algo).make()
    flags, hooks = training_flags(model), leftover_hooks(model)
    state = copy.deepcopy(model.state_dict())
    seen: list[bool] = []
    handle = model.bn1.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        algo.prepare(mask, mask.groups)
    finally:
        handle.remove()
    assert seen == [False, False]  # eval mode: BatchNorm uses (and keeps) its running statistics
    assert training_flags(model) == flags and leftover_hooks(model) == hooks
    for group in mask.groups:
        algo.score(group)
    algo.finish(mask)
    for name, value in model.state_dict().items():
        # bit-exact: compared with a copy taken before, and nothing may write to it
        assert torch.equal(value, state[name]), name

    def failing(batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] == 3:
            raise RuntimeError("broken batch")
        return batch

    algo.inputs = failing
    with pytest.raises(RuntimeError, match="broken batch"):
        algo.prepare(mask, mask.groups)
    assert training_flags(model) == flags and leftover_hooks(model) == hooks


def test_calibration_rejects_exhausted_data() -> None:
    model = ReluNet().eval()
    x = integer_images(1, 1, 2, 2, seed=0)
    algo = APoZ(iter([x]))
    mask = Mask(model, x, algorithm=algo).make()
    algo.prepare(mask, mask.groups)
    with pytest.raises(ValueError, match="no batch"):
        algo.prepare(mask, mask.groups)


# ---- Taylor ----------------------------------------------------------------------------------------------
class TaylorNet(nn.Module):
    """conv1-bn1-ReLU(inplace), then ``bn2(conv2(.)) += bn3(conv3(x))`` in place (as ResNet's blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv3, self.bn3 = nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        z += self.bn3(self.conv3(x))
        return self.fc(self.relu(z).mean((2, 3)))


def taylor_reference(model: TaylorNet, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[np.ndarray]:
    """Mean over batches of (sum a * dL/da)**2 at bn1, bn2, bn3, with autograd's retained gradients."""
    totals = [0.0, 0.0, 0.0]
    for x, target in batches:
        a1 = model.bn1(model.conv1(x))
        a2 = model.bn2(model.conv2(torch.relu(a1)))
        a3 = model.bn3(model.conv3(x))
        for a in (a1, a2, a3):
            a.retain_grad()
        loss = F.cross_entropy(model.fc(torch.relu(a2 + a3).mean((2, 3))), target)
        loss.backward()
        for i, a in enumerate((a1, a2, a3)):
            s = (a.detach().double() * a.grad.double()).sum((0, 2, 3)).numpy()
            totals[i] = totals[i] + s**2
    return [t / len(batches) for t in totals]


def taylor_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))) for _ in range(count)]


def test_taylor_equals_the_squared_sum_of_activation_times_gradient() -> None:
    model = TaylorNet().train()
    reference = copy.deepcopy(model)  # copied before any hook
    batches = taylor_batches(3)
    algo = Taylor()
    mask = Mask(model, batches[0][0], algorithm=algo).make()
    g1, g2 = group_of(mask, "conv1"), group_of(mask, "conv2")
    with pytest.raises(ValueError, match="forward and backward"):
        algo.score(g1)
    with torch.no_grad():  # no gradient: not counted
        model(batches[0][0])
    model(batches[0][0]).sum()  # forward without backward: not counted
    for x, target in batches:
        model.zero_grad()
        F.cross_entropy(model(x), target).backward()
    s1, s2, s3 = taylor_reference(reference, batches)
    np.testing.assert_allclose(algo.score(g1), s1, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(algo.score(g2), (s2 + s3) / 2, rtol=1e-4, atol=1e-12)  # two BNs: the mean
    assert Taylor.comparable_across_groups and algo.fallback == {} and algo.declined == {}
    algo.finish(mask)  # a new accumulation starts
    with pytest.raises(ValueError, match="forward and backward"):
        algo.score(g1)


class PlainNet(nn.Module):
    """No BatchNorm: conv1 -> ReLU(inplace) -> conv2 -> ReLU -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv2(self.relu(self.conv1(x)))).mean((2, 3)))


def test_taylor_falls_back_to_producer_outputs_without_batch_norm() -> None:
    model = PlainNet().train()
    reference = copy.deepcopy(model)
    batches = taylor_batches(2)
    algo = Taylor()
    mask = Mask(model, batches[0][0], algorithm=algo).make()
    group = group_of(mask, "conv1")
    assert algo.fallback[group.index] == "conv1"
    for x, target in batches:
        F.cross_entropy(model(x), target).backward()
    total = 0.0
    for x, target in batches:
        a = reference.conv1(x)
        a.retain_grad()
        out = reference.head(torch.relu(reference.conv2(torch.relu(a))).mean((2, 3)))
        F.cross_entropy(out, target).backward()
        total = total + (a.detach().double() * a.grad.double()).sum((0, 2, 3)).numpy() ** 2
    np.testing.assert_allclose(algo.score(group), total / len(batches), rtol=1e-4, atol=1e-12)


def test_taylor_do_mask_then_detach_takes_its_hooks_off(leftover_hooks) -> None:
    model = TaylorNet().train()
    batches = taylor_batches(2)
    algo = Taylor()
    mask = Mask(model, batches[0][0], algorithm=algo, ratio=0.4, allocation="global").make()
    assert model.bn1._forward_hooks  # attached by make()
    algo.attach(mask)  # a second attach to the same Mask changes nothing
    assert len(model.bn1._forward_hooks) == 1
    for x, target in batches:
        F.cross_entropy(model(x), target).backward()
    assert mask.do_mask()
    assert sum(len(g.pruned) for g in mask.groups) == 4  # 40% of 9 channels, ranked across groups
    with pytest.raises(ValueError, match="forward and backward"):
        algo.score(mask.groups[0])  # finish() reset the accumulation
    algo.detach(mask)
    assert not any(m._forward_hooks for m in (model.bn1, model.bn2, model.bn3))
    mask.remove()  # detaches again: harmless
    assert leftover_hooks(model) == []


def test_taylor_export_while_attached() -> None:
    model = TaylorNet().train()
    x, target = taylor_batches(1)[0]
    mask = Mask(model, x, algorithm=Taylor(), ratio=0.4).make()
    F.cross_entropy(model(x), target).backward()
    mask.do_mask()
    model.eval()
    pruned = mask.generate_pruned_model()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pruned.modules())
    assert any(m._forward_hooks for m in model.modules())  # the masked model is still watched


# ---- ThiNet ----------------------------------------------------------------------------------------------
def numpy_greedy(samples: np.ndarray) -> list[int]:
    """ThiNet's Algorithm 1 written out: add the channel whose addition keeps sum (sum_T x)^2 smallest."""
    removed: list[int] = []
    left = list(range(samples.shape[1]))
    while left:
        errors = [float((samples[:, removed + [c]].sum(1) ** 2).sum()) for c in left]
        removed.append(left.pop(int(np.argmin(errors))))
    return removed


def order_to_scores(order: list[int], size: int) -> np.ndarray:
    scores = np.empty(size)
    scores[order] = np.arange(size)
    return scores


def test_greedy_order_on_fixed_samples() -> None:
    samples = np.random.default_rng(0).normal(size=(40, 7)) + np.linspace(-1, 1, 7)
    assert greedy_order(samples.T @ samples).tolist() == numpy_greedy(samples)
    # the weakest channel goes first, then the one that cancels it (removing both costs nothing)
    x = np.random.default_rng(1).normal(size=(30, 3)) * [0.1, 1.0, 1.0]
    paired = np.column_stack([x, -x[:, 0]])
    assert greedy_order(paired.T @ paired)[:2].tolist() == [0, 3]
    assert numpy_greedy(paired)[:2] == [0, 3]


def conv_contributions(x: np.ndarray, conv: nn.Conv2d) -> tuple[np.ndarray, np.ndarray]:
    """Every output value of ``conv`` on ``x`` (numpy): each input channel's contribution, and the output."""
    (ph, pw), (sh, sw), (kh, kw) = conv.padding, conv.stride, conv.kernel_size
    w = conv.weight.detach().double().numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # (N, C, Ho, Wo, kh, kw)
    per_channel = np.einsum("nchwij,ocij->nohwc", windows, w).reshape(-1, x.shape[1])
    bias = conv.bias.detach().double().numpy()[None, :, None, None]
    outputs = np.einsum("nchwij,ocij->nohw", windows, w) + bias
    return per_channel, outputs.reshape(-1)


class ThiNetConv(nn.Module):
    """conv1 (2 -> 5) -> ReLU -> conv2 (5 -> 3, 3x3, stride 2) -> ReLU -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(2, 5, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(5, 3, 3, stride=2, padding=1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv2(self.relu(self.conv1(x)))))


def test_thinet_order_on_every_output_of_a_conv_consumer() -> None:
    model = ThiNetConv().eval()
    batches = [torch.randn(2, 2, 6, 6), torch.randn(1, 2, 6, 6)]
    algo = ThiNet(batches, samples=None)
    mask = Mask(model, batches[0], algorithm=algo).make()
    group = group_of(mask, "conv1")
    algo.prepare(mask, [group])
    with torch.no_grad():
        inputs = [torch.relu(model.conv1(x)).double().numpy() for x in batches]
    samples = np.concatenate([conv_contributions(a, model.conv2)[0] for a in inputs])
    # bit-exact: integer ranks; the float64 sums they order are nowhere near a tie
    np.testing.assert_array_equal(algo.score(group), order_to_scores(numpy_greedy(samples), 5))


class ThiNetFork(nn.Module):
    """conv1 (2 -> 4 channels of 4x4) -> ReLU, read by a 1x1 conv and, flattened (16 features each), by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()
        self.conv_a = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(64, 5)
        with torch.no_grad():
            self.fc.weight.mul_(8.0)  # a larger scale than conv_a's: the scaling must even it out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.relu(self.conv1(x))
        return self.conv_a(a), self.fc(a.flatten(1))


def test_thinet_scales_each_consumer_to_unit_mean_square() -> None:
    model = ThiNetFork().eval()
    batches = [torch.randn(3, 2, 4, 4), torch.randn(2, 2, 4, 4)]
    algo = ThiNet(batches, samples=None)
    mask = Mask(model, batches[0], algorithm=algo).make()
    group = group_of(mask, "conv1")
    algo.prepare(mask, [group])
    with torch.no_grad():
        inputs = np.concatenate([torch.relu(model.conv1(x)).double().numpy() for x in batches])
    conv_part, conv_out = conv_contributions(inputs, model.conv_a)
    flat = inputs.reshape(len(inputs), -1)  # feature f belongs to channel f // 16
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    per_feature = (flat[:, None, :] * w[None]).reshape(-1, 64)  # every (image, output) pair
    fc_part = per_feature.reshape(-1, 4, 16).sum(2)
    fc_out = per_feature.sum(1) + np.tile(b, len(flat))
    pooled = np.concatenate([conv_part / np.sqrt(np.mean(conv_out**2)), fc_part / np.sqrt(np.mean(fc_out**2))])
    # bit-exact: integer ranks; the float64 sums they order are nowhere near a tie
    np.testing.assert_array_equal(algo.score(group), order_to_scores(numpy_greedy(pooled), 4))


def test_thinet_sampling_is_seeded() -> None:
    model = ThiNetConv().eval()
    batches = [torch.randn(4, 2, 6, 6)]
    mask = Mask(model, batches[0]).make()
    group = group_of(mask, "conv1")
    scores = []
    for _ in range(2):
        algo = ThiNet(batches, samples=3, seed=5)
        algo.prepare(mask, [group])
        scores.append(algo.score(group))
    # bit-exact: the same seed draws the same numbers
    np.testing.assert_array_equal(scores[0], scores[1])
    assert sorted(scores[0].tolist()) == [0, 1, 2, 3, 4]


def conv2_error(model: ThiNetConv, full: ThiNetConv, batches: list[torch.Tensor]) -> float:
    """Squared difference of conv2's outputs (before its ReLU) between the masked and the original model."""
    with torch.no_grad():
        return sum(
            float(((model.conv2(torch.relu(model.conv1(x))) - full.conv2(torch.relu(full.conv1(x)))) ** 2).sum())
            for x in batches
        )


def test_thinet_rescale_is_the_least_squares_fit() -> None:
    original = ThiNetConv().eval()
    batches = [torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6)]
    errors, removed = {}, {}
    for rescale in (False, True):
        model = copy.deepcopy(original)
        algo = ThiNet(batches, samples=None, rescale=rescale)
        mask = Mask(model, batches[0], algorithm=algo).make()
        group = group_of(mask, "conv1")
        algo.prepare(mask, [group])
        removed[rescale] = np.argsort(algo.score(group))[:2].tolist()
        group.prune(removed[rescale])
        algo.finish(mask)
        errors[rescale] = conv2_error(model, original, batches)
        pruned = mask.generate_pruned_model()  # the rescaled weights are exported as they are masked
        assert pruned.conv2.weight.shape[1] == 3
    assert removed[False] == removed[True]
    # the least-squares optimum, written out: min_w ||y - X_kept w||^2 with y the outputs before removal
    with torch.no_grad():
        inputs = np.concatenate([torch.relu(original.conv1(x)).double().numpy() for x in batches])
    samples, _ = conv_contributions(inputs, original.conv2)
    kept = [c for c in range(5) if c not in removed[True]]
    y = samples.sum(1)
    w, *_ = np.linalg.lstsq(samples[:, kept], y, rcond=None)
    best = float(((y - samples[:, kept] @ w) ** 2).sum())
    assert errors[True] < errors[False]
    assert errors[True] == pytest.approx(best, rel=1e-3)


def test_thinet_do_mask_with_rescale_changes_only_kept_columns() -> None:
    model = ThiNetConv().eval()
    batches = [torch.randn(2, 2, 6, 6)]
    before = model.conv2.weight.detach().clone()
    mask = Mask(model, batches[0], algorithm=ThiNet(batches, rescale=True), ratio=0.4, ratios={"conv2": 0.0}).make()
    assert mask.do_mask()
    group = group_of(mask, "conv1")
    assert len(group.pruned) == 2
    ratio = model.conv2.weight.detach() / before
    kept = [c for c in range(5) if c not in group.pruned]
    assert torch.all(ratio[:, group.pruned] == 0)  # removed: masked to zero
    # kept: one factor per input channel, the same for every output channel and kernel position
    factors = ratio[:, kept]
    torch.testing.assert_close(factors, factors[:1, :, :1, :1].expand_as(factors))
    mask.generate_pruned_model()


def test_thinet_declines_groups_without_a_conv_or_linear_consumer() -> None:
    model, x = TINY_MODELS["conv_transpose2d"]()  # conv -> ConvTranspose2d: not a ThiNet consumer
    algo = ThiNet([x])
    mask = Mask(model, x, algorithm=algo, ratio=0.5).make()
    conv, up = group_of(mask, "conv"), group_of(mask, "up")
    algo.prepare(mask, mask.groups)
    assert algo.score(conv) is None and algo.score(up) is not None
    assert set(algo.declined) == {conv.index}
    assert mask.do_mask()
    assert conv.kept == conv.size and up.kept < up.size
