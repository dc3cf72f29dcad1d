"""Depth: ``Mask(..., depth=True)`` removes whole residual blocks of containers.

Tiny Hugging Face models (Llama, Qwen2, GPT-2, BERT, ViT) and a torchvision ResNet: a removed block is the
identity in the masked model and gone from its container in the export (soft == hard), the config's layer
count, per-layer lists and each attention's ``layer_idx`` follow, ``generate()`` gives the masked model's
tokens, the spec replays it, and every channel criterion declines block groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import transformers
from maskprune.algorithms import (
    FPGM,
    APoZ,
    BlockImportance,
    BNScale,
    ByKind,
    L1Norm,
    L2Norm,
    Taylor,
    ThiNet,
    Uniform,
)
from test_transformers import _greedy_tokens
from torch import nn

import maskprune
from maskprune import Mask, SpecError

VOCAB = 128
LAYERS = 3
SIZES = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=LAYERS)


def _config(cls: type, **kwargs: Any) -> Any:
    return cls(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)


DECODERS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama": (
        lambda: transformers.LlamaForCausalLM(
            _config(transformers.LlamaConfig, **SIZES, num_key_value_heads=2, max_position_embeddings=64)
        ),
        "model.layers",
    ),
    "qwen2": (
        lambda: transformers.Qwen2ForCausalLM(
            _config(transformers.Qwen2Config, **SIZES, num_key_value_heads=2, max_position_embeddings=64)
        ),
        "model.layers",
    ),
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(
            _config(transformers.GPT2Config, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64)
        ),
        "transformer.h",
    ),
}
ENCODERS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "bert": (
        lambda: transformers.BertForSequenceClassification(
            _config(transformers.BertConfig, **SIZES, max_position_embeddings=64, num_labels=3)
        ),
        "bert.encoder.layer",
    ),
    "vit": (
        lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(**SIZES, image_size=32, patch_size=8, num_labels=5)
        ),
        "vit.layers",
    ),
}


def _inputs(name: str, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}


def _block_groups(mask: Mask) -> list[maskprune.Group]:
    return [g for g in mask.groups if g.kind == "block"]


def _layer_indices(model: nn.Module) -> list[int]:
    return [m.layer_idx for m in model.modules() if type(m.__dict__.get("layer_idx")) is int]


def _removed_middle_layer(name: str, build: Callable[[], nn.Module], container: str) -> tuple[nn.Module, Mask]:
    """The model (masked) and its Mask with entry 1 of ``container`` removed."""
    torch.manual_seed(0)
    model = build().eval()
    mask = Mask(model, _inputs(name, 2, 12, seed=1), depth=True).make()
    (blocks,) = _block_groups(mask)
    assert (blocks.container, blocks.entries, blocks.length) == (container, (0, 1, 2), LAYERS)
    assert all(g.kind == "channels" for g in mask.groups if g is not blocks)
    blocks.prune([1])
    assert blocks.pruned == [1] and blocks.kept == 2
    return model, mask


@pytest.mark.parametrize("name", list(DECODERS))
def test_a_decoder_layer_removed_gives_the_same_tokens(name: str) -> None:
    build, container = DECODERS[name]
    model, mask = _removed_middle_layer(name, build, container)
    assert _layer_indices(model) == [0, 1, 2]
    pruned = mask.generate_pruned_model()  # verified on the example inputs

    assert len(pruned.get_submodule(container)) == 2 and len(model.get_submodule(container)) == LAYERS
    assert pruned.config.num_hidden_layers == 2 and model.config.num_hidden_layers == LAYERS
    assert _layer_indices(pruned) == [0, 1]  # the cache is indexed by them: renumbered
    if name == "qwen2":
        assert len(pruned.config.layer_types) == 2 and len(model.config.layer_types) == LAYERS
    kept, original = pruned.get_submodule(container)[1].state_dict(), model.get_submodule(container)[2].state_dict()
    assert kept.keys() == original.keys()
    assert all(torch.equal(kept[k], original[k]) for k in kept)  # bit-exact: the export copies the last layer
    assert maskprune.verify(model, pruned, _inputs(name, 3, 7, seed=2)).ok
    prompt = _inputs(name, 2, 6, seed=3)
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        masked_tokens = _greedy_tokens(model, prompt, options)
        pruned_tokens = pruned.generate(**prompt, **options)
    assert masked_tokens.shape == (2, 14)
    # bit-exact: integer tokens, no greedy step is a near tie (`_greedy_tokens`)
    assert torch.equal(masked_tokens, pruned_tokens)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_an_encoder_layer_removed(name: str) -> None:
    build, container = ENCODERS[name]
    model, mask = _removed_middle_layer(name, build, container)
    pruned = mask.generate_pruned_model()
    assert len(pruned.get_submodule(container)) == 2
    assert pruned.config.num_hidden_layers == 2
    result = maskprune.verify(model, pruned, _inputs(name, 3, 7, seed=2))
    assert result.ok and result.scale > 0, result
    with torch.no_grad():  # the masked model is not the dense one: the block was really skipped
        dense = build().eval()
        dense.load_state_dict(model.state_dict())
        out = dense.base_model(**_inputs(name, 3, 7, seed=2)).last_hidden_state
        hard = pruned.base_model(**_inputs(name, 3, 7, seed=2)).last_hidden_state
        assert not torch.allclose(out, hard, rtol=1e-3, atol=1e-3)


def test_depth_and_width_in_one_mask() -> None:
    build, container = DECODERS["llama"]
    torch.manual_seed(0)
    model = build().eval()
    mask = Mask(model, _inputs("llama", 2, 12, seed=1), algorithm=L1Norm(), ratio=0.5, depth=True).make()
    assert mask.do_mask()
    (blocks,) = _block_groups(mask)
    assert blocks.kept == LAYERS  # L1Norm scores channels, not blocks
    blocks.prune([0, 2])
    pruned = mask.generate_pruned_model()
    (layer,) = pruned.get_submodule(container)
    assert layer.mlp.up_proj.out_features == 24 and _layer_indices(pruned) == [0]
    assert maskprune.verify(model, pruned, _inputs("llama", 1, 9, seed=4)).ok
    before, after = mask.selection.parameter_counts()
    assert after == maskprune.count_parameters(pruned) < before == maskprune.count_parameters(model)


def test_resnet_stages_lose_the_blocks_that_keep_their_shape() -> None:
    """Per container, the entries that keep the shape: a stage's downsampling first block stays."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    mask = Mask(model, x, depth=True).make()
    blocks = {g.container: g for g in _block_groups(mask)}
    assert {path: g.entries for path, g in blocks.items()} == {
        "layer1": (0, 1),
        "layer2": (1,),
        "layer3": (1,),
        "layer4": (1,),
    }
    with pytest.raises(ValueError, match="would remove all 2 entries of layer1"):
        blocks["layer1"].prune([0, 1])
    assert blocks["layer1"].kept == 2  # nothing changed
    blocks["layer1"].prune([0])
    blocks["layer3"].prune([0])  # its only removable block: layer3[0] stays
    pruned = mask.generate_pruned_model()
    assert [len(pruned.get_submodule(f"layer{i}")) for i in range(1, 5)] == [1, 2, 1, 2]
    # bit-exact: the kept block is a copy of layer1[1]
    assert torch.equal(pruned.layer1[0].conv1.weight, model.layer1[1].conv1.weight)
    assert maskprune.verify(model, pruned, torch.randn(3, 3, 64, 64)).ok
    report = mask.sparsity()
    assert report.parameters_after == maskprune.count_parameters(pruned)


def test_convnext_blocks_with_layer_scale_and_stochastic_depth() -> None:
    """ConvNeXt blocks (depthwise 7x7, LayerNorm, layer scale, stochastic depth in eval) are residual: each stage's
    blocks form one group; a whole stage between two downsamplings is itself a removable entry of ``features``."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    stages = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, 48, 4), CNBlockConfig(48, None, 2)]
    model = ConvNeXt(stages, stochastic_depth_prob=0.1, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = Mask(model, x, depth=True).make()
    blocks = {g.container: g for g in _block_groups(mask)}
    sizes = {path: g.size for path, g in blocks.items()}
    assert sizes == {"features": 3, "features.1": 2, "features.3": 4, "features.5": 2}
    assert blocks["features"].entries == (1, 3, 5)  # the stages; the stem and downsamplings change the shape
    blocks["features.1"].prune([0])
    blocks["features.3"].prune([1, 3])
    pruned = mask.generate_pruned_model()
    assert [len(pruned.features[i]) for i in (1, 3, 5)] == [1, 2, 2]
    assert maskprune.verify(model, pruned, torch.randn(3, 3, 64, 64)).ok


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _InPlace(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(self.fc2(torch.relu(self.fc1(x))))


def test_containers_without_residual_blocks_give_no_block_group() -> None:
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))  # same shapes, no skip
    mask = Mask(plain, torch.randn(2, 8), depth=True).make()
    assert mask.groups and not _block_groups(mask)
    written = nn.Sequential(nn.Linear(8, 8), _InPlace(8), _InPlace(8))  # writes its input: not the identity
    assert not _block_groups(Mask(written, torch.randn(2, 8), depth=True).make())
    ignored = nn.Sequential(_Residual(8), _Residual(8), _Residual(8))
    (group,) = _block_groups(Mask(ignored, torch.randn(2, 8), depth=True, ignore=[ignored[1]]).make())
    assert (group.container, group.entries) == ("", (0, 2))
    default = nn.Sequential(_Residual(8), _Residual(8))
    assert not _block_groups(Mask(default, torch.randn(2, 8)).make())  # depth=False: channels only


def test_removing_every_block_of_a_container_is_an_error() -> None:
    model = nn.Sequential(_Residual(8), _Residual(8))
    (group,) = _block_groups(Mask(model, torch.randn(2, 8), depth=True).make())
    group.prune([1])
    with pytest.raises(ValueError, match="would remove all 2 entries of <root>; keep at least one"):
        group.prune([0])


def test_saved_loaded_and_replayed(tmp_path) -> None:
    build, container = DECODERS["llama"]
    model, mask = _removed_middle_layer("llama", build, container)
    for group in mask.groups:
        if any(m.name.endswith("k_proj.weight") and m.dim == 0 for m in group.members):
            group.prune([0])
    pruned = mask.generate_pruned_model()
    spec = maskprune.PruneSpec.of(pruned)
    assert spec.removed == {container: (1,)} and spec.version == 3
    maskprune.save_pruned(pruned, tmp_path / "llama")
    torch.manual_seed(1)
    loaded = maskprune.load_pruned(build().eval(), tmp_path / "llama")
    assert len(loaded.get_submodule(container)) == 2 and loaded.config.num_hidden_layers == 2
    assert _layer_indices(loaded) == [0, 1]
    fresh = _inputs("llama", 1, 9, seed=5)
    with torch.no_grad():  # bit-exact: the same shapes and weights, the same kernels
        assert torch.equal(loaded(**fresh).logits, pruned(**fresh).logits)

    torch.manual_seed(0)
    again = Mask(build().eval(), _inputs("llama", 2, 12, seed=1), depth=True).make().apply_spec(pruned)
    assert [g.pruned for g in again.groups] == [g.pruned for g in mask.groups]
    torch.manual_seed(0)
    with pytest.raises(SpecError, match=r"removes model\.layers\.1, which this mask cannot remove"):
        Mask(build().eval(), _inputs("llama", 2, 12, seed=1)).make().apply_spec(pruned)
    spec.removed = {container: (0, 1, 2)}
    with pytest.raises(SpecError, match="removes every entry of 'model.layers'"):
        maskprune.load_pruned(build().eval(), _saved_spec(tmp_path, spec))


def _saved_spec(tmp_path, spec: maskprune.PruneSpec):
    (tmp_path / "llama" / "spec.json").write_text(spec.to_json())
    return tmp_path / "llama"


def _criteria(data: list[torch.Tensor]) -> list[maskprune.Algorithm]:
    return [L1Norm(), L2Norm(), FPGM(), BNScale(), Taylor(), APoZ(data), ThiNet(data, samples=4)]


def test_every_channel_criterion_declines_block_groups() -> None:
    data = [torch.randn(2, 3, 32, 32)]
    for criterion in _criteria(data):
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
        mask = Mask(model, data[0], algorithm=criterion, ratio=0.25, depth=True).make()
        blocks = _block_groups(mask)
        assert [criterion.score(g) for g in blocks] == [None] * 4, type(criterion).__name__
        if isinstance(criterion, Taylor):
            nn.functional.cross_entropy(model(data[0]), torch.tensor([0, 1])).backward()
        assert mask.do_mask(), type(criterion).__name__
        assert all(g.kept == g.size for g in blocks), type(criterion).__name__
        assert any(g.kept < g.size for g in mask.groups if g.kind == "channels")
    torch.manual_seed(0)
    mask = Mask(nn.Sequential(_Residual(8), _Residual(8)), torch.randn(2, 8), algorithm=Uniform(), depth=True).make()
    mask.do_mask()  # the random baselines draw blocks too
    assert _block_groups(mask)[0].kept == 1


def test_block_importance_is_one_minus_the_mean_cosine() -> None:
    torch.manual_seed(0)
    width = 6
    model = nn.Sequential(nn.Linear(width, width), _Residual(width), _Residual(width), _Residual(width))
    data = [torch.randn(2, 5, width), torch.randn(3, 5, width)]
    criterion = BlockImportance(data)
    mask = Mask(model, data[0], algorithm=criterion, ratio=1 / 3, depth=True).make()
    (group,) = _block_groups(mask)
    assert group.entries == (1, 2, 3)
    criterion.prepare(mask, [group])
    scores = criterion.score(group)

    # numpy, layer by layer: tokens of every batch, cosine over the hidden dimension
    params = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    influence = np.zeros(3)
    tokens = 0
    for x in data:
        h = x.double().numpy().reshape(-1, width) @ params["0.weight"].T + params["0.bias"]
        tokens += len(h)
        for b in range(3):
            hidden = np.maximum(h @ params[f"{b + 1}.fc1.weight"].T + params[f"{b + 1}.fc1.bias"], 0)
            out = h + hidden @ params[f"{b + 1}.fc2.weight"].T + params[f"{b + 1}.fc2.bias"]
            cos = (h * out).sum(1) / (np.linalg.norm(h, axis=1) * np.linalg.norm(out, axis=1))
            influence[b] += (1 - cos).sum()
            h = out
    np.testing.assert_allclose(scores, influence / tokens, rtol=1e-5)  # the model runs in float32
    assert L1Norm().score(group) is None and criterion.score(mask.groups[0]) is None

    assert mask.do_mask()
    assert group.pruned == [int(np.argmin(influence))]
    pruned = mask.generate_pruned_model()
    assert len(pruned) == 3 and maskprune.verify(model, pruned, data[1]).ok


@pytest.mark.parametrize("target", [0.75, 0.6])
def test_a_parameter_budget_with_depth_and_width(target: float) -> None:
    """``target_params`` is the fraction of parameters kept, met within 1% of the exported count, by blocks and
    channels together (the random baseline scores both)."""
    build, _ = DECODERS["llama"]
    torch.manual_seed(0)
    model = build().eval()
    mask = Mask(model, _inputs("llama", 2, 12, seed=1), algorithm=Uniform(), target_params=target, depth=True)
    mask.make().do_mask()
    pruned = mask.generate_pruned_model()
    kept = maskprune.count_parameters(pruned) / maskprune.count_parameters(model)
    assert abs(kept - target) <= 0.01, kept
    assert any(g.kept < g.size for g in mask.groups if g.kind == "channels")
    assert maskprune.verify(model, pruned, _inputs("llama", 1, 9, seed=4)).ok


def test_a_parameter_budget_with_depth_and_a_channel_criterion_prunes_channels_only() -> None:
    """A criterion that scores channels only (L1Norm) leaves the blocks; the budget is met by channels alone."""
    build, _ = DECODERS["llama"]
    torch.manual_seed(0)
    model = build().eval()
    mask = Mask(model, _inputs("llama", 2, 12, seed=1), algorithm=L1Norm(), target_params=0.75, depth=True)
    mask.make().do_mask()
    pruned = mask.generate_pruned_model()
    kept = maskprune.count_parameters(pruned) / maskprune.count_parameters(model)
    assert abs(kept - 0.75) <= 0.01, kept
    assert all(g.kept == g.size for g in mask.groups if g.kind == "block")


def test_a_parameter_budget_counts_the_blocks_the_criterion_removes() -> None:
    """Width and depth by two criteria (ByKind): the budget counts the blocks BlockImportance removes, not the last
    ones, so channels removed inside a removed block are not counted twice (here 0.759 was kept for 0.75)."""
    config = _config(
        transformers.LlamaConfig, hidden_size=128, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2
    )
    config.intermediate_size, config.max_position_embeddings = 384, 64
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # layers of unequal scale: the block criterion removes middle layers, not the last
        for i, layer in enumerate(model.model.layers):
            for parameter in layer.parameters():
                parameter.mul_(1 + 0.3 * (i * 7 % 5))
    ids = _inputs("llama", 2, 32, seed=1)
    algorithm = ByKind(channels=L2Norm(), block=BlockImportance([ids]))
    mask = Mask(model, ids, algorithm=algorithm, target_params=0.75, depth=True).make()
    mask.do_mask()
    (blocks,) = _block_groups(mask)
    assert blocks.pruned and blocks.pruned != list(range(12 - len(blocks.pruned), 12))
    pruned = mask.generate_pruned_model()
    kept = maskprune.count_parameters(pruned) / maskprune.count_parameters(model)
    assert abs(kept - 0.75) <= 0.01 * 0.75, kept
    assert pruned.config.num_hidden_layers == 12 - len(blocks.pruned)


def test_by_kind_takes_instances_of_the_kind_they_score() -> None:
    with pytest.raises(TypeError, match=r"ByKind\(channels=...\) takes an Algorithm instance"):
        ByKind(channels=L2Norm)
    with pytest.raises(ValueError, match="scores groups of kinds"):
        ByKind(block=L2Norm())
    with pytest.raises(ValueError, match="at least one of"):
        ByKind()


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, float("nan")])
def test_target_params_outside_zero_one_is_an_error(value: float) -> None:
    with pytest.raises(ValueError, match=r"target_params must be a number in \(0, 1\)"):
        Mask(nn.Linear(4, 4), torch.randn(1, 4), target_params=value)
    with pytest.raises(ValueError, match="give target_params"):
        Mask(nn.Linear(4, 4), torch.randn(1, 4), target_params=0.5, ratio=0.2)
