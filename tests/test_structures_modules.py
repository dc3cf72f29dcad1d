"""Parameters and modules used in other ways: embeddings, tied parameters, a module called twice, functional
calls, dict inputs and outputs, buffers the forward builds from sizes it reads."""

from __future__ import annotations

import pytest
import torch
from _structures import (
    IMAGES,
    G,
    assert_soft_equals_hard,
    dict_inputs,
    eval_mode,
    found,
    group_of,
    grouped,
    make,
    prune_every_group,
    token_ids,
)
from torch import nn

from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- parameters and modules ---------------------------------------------------------------------------
def test_embedding_keeps_its_vocabulary() -> None:
    mask, model, inputs = make("embedding")
    assert "emb.weight[0]" not in grouped(mask)
    group_of(mask, "emb.weight", 1).prune([2, 3])
    pruned = assert_soft_equals_hard(mask, model, inputs, token_ids())
    assert (pruned.emb.num_embeddings, pruned.emb.embedding_dim) == (10, 6)


def test_tied_parameter_stays_tied() -> None:
    mask, model, inputs = make("tied_parameters")
    assert not any(m.name.startswith("b.") for g in mask.groups for m in g.members)
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, token_ids())
    assert pruned.a.weight is pruned.b.weight
    assert pruned.a.weight.shape == (10, 4) and pruned.b.in_features == 4


def test_shared_module_is_pruned_once() -> None:
    mask, model, inputs = make("shared_module")
    (group,) = mask.groups
    group.prune([0, 4])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert pruned.block.weight.shape == (6, 6, 3, 3)


def test_functional_calls_prune_the_borrowed_parameters() -> None:
    mask, model, inputs = make("functional")
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES())
    assert pruned.stem.weight.shape == (4, 3, 3, 3)
    assert (pruned.proj.in_features, pruned.proj.out_features) == (4, 3)


def test_dict_inputs_and_outputs() -> None:
    mask, model, inputs = make("dict_io")
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, dict_inputs())
    with eval_mode(pruned):
        out = pruned(**inputs)
    assert set(out) == {"logits", "extras"} and isinstance(out["extras"], tuple)
    assert out["logits"].shape == (2, 5) and out["extras"][0].shape == (2, 3)


# ---- sizes read from tensors: a tensor built with them shares their channels --------------------
class SizedBuffer(nn.Module):
    """Builds a buffer from sizes read off an activation, as Keypoint R-CNN's heatmap decoding does."""

    def __init__(self, to_output: bool) -> None:
        super().__init__()
        self.to_output = to_output
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.b(self.a(x).relu())
        n, k = maps.shape[0], maps.shape[1]
        buffer = torch.zeros(n, k, 1, 1)  # its dim 1 has the size of maps' channels, whatever they become
        buffer[:, :, 0, 0] = maps.amax(dim=(2, 3))
        return buffer.flatten(1) if self.to_output else self.head(maps + buffer)


def test_a_buffer_sized_by_channels_reaching_the_output_freezes_them() -> None:
    model, x = SizedBuffer(to_output=True), torch.randn(2, 3, 6, 6)
    mask = Mask(model, x).make()
    assert found(mask) == {G(8, "a.weight[0]", "a.bias[0]", "b.weight[1]")}
    assert "b.weight[0]" in mask.selection.layout.frozen["reaches a model output"]


def test_a_buffer_sized_by_channels_is_pruned_with_them() -> None:
    model, x = SizedBuffer(to_output=False), torch.randn(2, 3, 6, 6)
    mask = Mask(model, x).make()
    assert G(6, "b.weight[0]", "b.bias[0]", "head.weight[1]") in found(mask)
    prune_every_group(mask)
    assert_soft_equals_hard(mask, model, x, [torch.randn(3, 3, 6, 6)])
