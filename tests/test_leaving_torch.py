"""Tensors that leave torch (NumPy, a list, an autograd.Function the trace cannot see through) and come back: the
channels they carry are frozen at make(), with the reason, so that the export is never wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from maskprune.algorithms import L1Norm
from torch import nn

import maskprune
from maskprune import Mask


class NumpyTanh(torch.autograd.Function):
    """tanh computed by NumPy: the trace sees the values leave (``numpy()``), not how they come back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.from_numpy(np.tanh(x.detach().cpu().numpy()))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class Unseen(torch.autograd.Function):
    """Mixes channels by ops the trace does not see (as an extension's kernel would): no value is read in Python."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunction():
            return x.roll(1, dims=1) * 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.roll(-1, dims=1)


class Twice(torch.autograd.Function):
    """Computed by torch ops the trace sees: its channels pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


def through_list(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.tolist())


def through_numpy(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.numpy() * 2)


class Net(nn.Module):
    """conv1 -> ``middle`` -> conv2 -> ReLU -> conv3: conv2's channels stay prunable whatever ``middle`` is."""

    def __init__(self, middle) -> None:
        super().__init__()
        self.middle = middle
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(self.middle(self.conv1(x)))))


def masked(middle) -> tuple[nn.Module, Mask, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Net(middle).eval(), torch.randn(2, 3, 8, 8)
    return model, Mask(model, x, algorithm=L1Norm(), ratio=0.5).make(), x


@pytest.mark.parametrize(
    ("middle", "reason"),
    [
        (NumpyTanh.apply, "`numpy` in <root> (autograd.Function `NumpyTanh`): its values leave torch"),
        (Unseen.apply, "autograd.Function `Unseen` in <root>: its output is not made by a traced torch op"),
        (through_list, "`tolist` in <root>: its values leave torch"),
        (through_numpy, "`numpy` in <root>: its values leave torch"),
    ],
    ids=["numpy-function", "unseen-function", "tolist", "numpy"],
)
def test_channels_that_leave_torch_are_frozen_at_make_with_the_reason(middle, reason: str) -> None:
    model, mask, x = masked(middle)
    assert [m.name for g in mask.groups for m in g.members] == ["conv2.weight", "conv2.bias", "conv3.weight"]
    assert [names for why, names in mask.selection.layout.frozen.items() if why.startswith(reason)] == [
        ["conv1.weight[0]"]
    ]
    assert reason in str(mask)
    mask.do_mask()
    pruned = mask.generate_pruned_model(verify_inputs=[torch.randn(3, 3, 8, 8)])
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels) == (8, 3)
    assert maskprune.verify(model, pruned, torch.randn(1, 3, 8, 8)).ok


def constant_list(x: torch.Tensor) -> torch.Tensor:
    order = torch.zeros(x.shape[1]).tolist()  # a constant over the channels: no value of theirs leaves
    return x + sum(order)


@pytest.mark.parametrize("middle", [Twice.apply, constant_list], ids=["traced-function", "constant-list"])
def test_traced_functions_and_constants_keep_their_channels_prunable(middle) -> None:
    model, mask, x = masked(middle)
    assert [g.size for g in mask.groups] == [8, 6]
    mask.do_mask()
    pruned = mask.generate_pruned_model()
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels) == (4, 3)


def test_the_functions_are_watched_through_an_alias_and_restored_even_when_the_forward_raises() -> None:
    before = {cls: cls.__dict__["forward"] for cls in (NumpyTanh, Unseen, Twice)}
    unseen = Unseen.apply  # taken before the trace: torch still looks up forward at each call

    def broken(x: torch.Tensor) -> torch.Tensor:
        Twice.apply(unseen(x))
        raise RuntimeError("the model's own error")

    with pytest.raises(maskprune.TraceError, match="the model's own error"):
        masked(broken)
    assert all(cls.__dict__["forward"] is forward for cls, forward in before.items())
    assert torch.equal(Twice.apply(torch.ones(2)), torch.full((2,), 2.0))  # bit-exact: 1 * 2
    model, mask, _ = masked(lambda x: unseen(x))
    assert [g.size for g in mask.groups] == [6]
