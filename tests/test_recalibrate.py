"""recalibrate_bn: BatchNorm statistics re-estimated without changing weights or modes, and soft == hard after it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from maskprune.algorithms import L1Norm
from torch import nn

import maskprune
from maskprune import Mask, recalibrate_bn
from maskprune.testing import randomize_norms


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus a conv-BN stem shortcut, dropout, pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(self.drop(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(x + y), 1).flatten(1))


def batches(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 6, 6, generator=generator) * 2 + 1 for _ in range(count)]


def norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_statistics_are_the_plain_average_of_the_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Dropout(0.5), nn.BatchNorm2d(5)).eval()
    data = batches(3)
    assert recalibrate_bn(model, data) == 3
    weight, bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    means, variances = [], []
    for x in data:  # dropout stays off (eval): the BatchNorm sees the plain conv output
        out = F.conv2d(x.double(), weight, bias).numpy()
        values = out.transpose(1, 0, 2, 3).reshape(5, -1)
        means.append(values.mean(1))
        variances.append(values.var(1, ddof=1))
    bn = model[2]
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean(means, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean(variances, 0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize("training", [False, True])
def test_weights_modes_and_momentum_are_left_as_they_were(training: bool) -> None:
    torch.manual_seed(0)
    model = Residual().train(training)
    model.bn1.momentum = 0.3
    model.bn2.eval()  # a mixed state comes back mixed
    flags = {name: m.training for name, m in model.named_modules()}
    before = snapshot(model)
    recalibrate_bn(model, batches(2))
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == name.endswith(("running_mean", "running_var", "num_batches_tracked")), name
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert [bn.momentum for bn in norms(model)] == [0.1, 0.3, 0.1]
    assert all(p.grad is None for p in model.parameters())


def test_batches_limits_the_count_and_batch_forms_are_understood() -> None:
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.bn(x * scale)

    data = [torch.randn(8, 3) for _ in range(4)]
    model = Keywords()
    assert recalibrate_bn(model, data, batches=2) == 2
    expected = torch.stack([x.mean(0) for x in data[:2]]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, expected)
    assert recalibrate_bn(model, [(x, torch.zeros(8)) for x in data]) == 4  # (inputs, labels)
    torch.testing.assert_close(model.bn.running_mean, torch.stack([x.mean(0) for x in data]).mean(0))
    assert recalibrate_bn(model, [{"x": x, "scale": 2.0} for x in data[:1]]) == 1
    torch.testing.assert_close(model.bn.running_mean, data[0].mean(0) * 2)
    assert recalibrate_bn(model, [[x] for x in data[:1]], inputs=lambda b: b[0] * 3) == 1
    torch.testing.assert_close(model.bn.running_mean, data[0].mean(0) * 3)


def test_clear_errors_and_statistics_put_back_on_error() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="batches must be a positive integer"):
        recalibrate_bn(model, [torch.randn(2, 3)], batches=0)
    with pytest.raises(ValueError, match="gave no batch"):
        recalibrate_bn(model, iter([]))
    with pytest.raises(TypeError, match="inputs must be a function"):
        recalibrate_bn(model, [torch.randn(2, 3)], inputs=3)
    before = snapshot(model)

    def broken():
        yield torch.randn(4, 3)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        recalibrate_bn(model, broken())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert model[1].momentum == 0.1 and model.training
    assert recalibrate_bn(nn.Linear(3, 3), []) == 0  # nothing to re-estimate


def test_masked_and_exported_models_get_the_same_statistics() -> None:
    torch.manual_seed(0)
    model = randomize_norms(Residual()).eval()
    x = torch.randn(2, 3, 6, 6)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.4).make()
    mask.do_mask()
    data = batches(3, seed=5)
    exported = mask.generate_pruned_model()  # before: the stale statistics of the unpruned model
    recalibrate_bn(model, data)
    recalibrate_bn(exported, data)
    assert maskprune.verify(model, exported, torch.randn(3, 3, 6, 6)).ok
    again = mask.generate_pruned_model()  # the export of the recalibrated masked model verifies too
    for (name, masked), pruned, copied in zip(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)),
        norms(exported),
        norms(again),
        strict=True,
    ):
        kept = masked.weight.detach() != 0
        assert 0 < int(kept.sum()) < len(kept), name  # the test prunes every BatchNorm
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(pruned, stat), getattr(masked, stat)[kept], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(getattr(copied, stat), getattr(masked, stat)[kept], rtol=0, atol=0)


def test_mask_recalibrates_after_each_do_mask_that_changed_something() -> None:
    torch.manual_seed(0)
    model = randomize_norms(Residual()).eval()
    twin = copy.deepcopy(model)
    data = batches(2, seed=3)
    x = torch.randn(2, 3, 6, 6)
    mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5, recalibrate=data).make()
    plain = Mask(twin, x, algorithm=L1Norm(), ratio=0.5).make()
    assert mask.do_mask() and plain.do_mask()
    stale = twin.bn1.running_mean.clone()
    recalibrate_bn(twin, data)
    assert not torch.allclose(stale, twin.bn1.running_mean)
    for ours, theirs in zip(norms(model), norms(twin), strict=True):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    model.bn1.running_mean.fill_(7.0)
    assert not mask.do_mask()  # one shot: nothing changes, nothing is re-estimated
    assert torch.all(model.bn1.running_mean == 7.0)
    with pytest.raises(TypeError, match="recalibrate must be an iterable"):
        Mask(model, x, recalibrate=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_batches_go_to_the_models_device() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)).eval()
    data = batches(2)
    on_gpu = copy.deepcopy(model).cuda()
    recalibrate_bn(model, data)
    recalibrate_bn(on_gpu, [(x, torch.zeros(4)) for x in data])  # CPU tensors inside tuples
    assert on_gpu[1].running_mean.is_cuda and not on_gpu.training
    torch.testing.assert_close(on_gpu[1].running_var.cpu(), model[1].running_var, rtol=1e-4, atol=1e-5)
