"""Experts: tiny Mixtral, Qwen2-MoE and Qwen3-MoE configs (4 experts, top 2, 2 layers) in transformers' fused form.

One group of ``kind == "experts"`` per MoE layer; a removed expert is never routed while masked, and the export
slices it out of the router and the fused tensors, exactly (soft == hard, the same ``generate()`` tokens), with
the expert counts of the modules and of the config updated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers
from maskprune.algorithms import L1Norm, RouterUsage, Uniform
from torch import nn
from zoo import _randomize_zero_parameters

import maskprune
from maskprune import Mask
from maskprune.errors import SpecError

RTOL = 1e-5
VOCAB = 128
SIZES = dict(
    vocab_size=VOCAB,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)


def _mixtral() -> nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**SIZES, num_local_experts=4))


def _qwen2_moe() -> nn.Module:
    config = transformers.Qwen2MoeConfig(
        **SIZES, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40, norm_topk_prob=False
    )
    return transformers.Qwen2MoeForCausalLM(config)


def _qwen3_moe() -> nn.Module:
    config = transformers.Qwen3MoeConfig(**SIZES, num_experts=4, moe_intermediate_size=24, norm_topk_prob=True)
    return transformers.Qwen3MoeForCausalLM(config)


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "mixtral": (_mixtral, "num_local_experts"),
    "qwen2_moe": (_qwen2_moe, "num_experts"),
    "qwen3_moe": (_qwen3_moe, "num_experts"),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    _randomize_zero_parameters(model)  # the Qwen routers start at zero: every expert would tie
    return model.eval()


def _inputs(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}


def _expert_groups(mask: Mask) -> list[maskprune.ExpertGroup]:
    return [g for g in mask.groups if g.kind == "experts"]


def _routed(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, set[int]]:
    """The experts each router's top-k chose on ``inputs`` (read from the router's output, after every hook)."""
    chosen: dict[str, set[int]] = {}
    handles = []
    for path, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):
            chosen[path] = set()

            def record(module: nn.Module, args: tuple, output: tuple, path: str = path) -> None:
                chosen[path] |= set(output[2].flatten().tolist())

            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return chosen


@pytest.mark.parametrize("name", list(MODELS))
def test_removed_experts_are_never_routed_and_exported_exactly(name: str) -> None:
    model = _build(name)
    mask = Mask(model, _inputs(2, 9, seed=1)).make()
    groups = _expert_groups(mask)
    assert [(g.size, g.top_k) for g in groups] == [(4, 2), (4, 2)]
    assert [g.router for g in groups] == [f"model.layers.{i}.mlp.gate" for i in range(2)]
    fresh = _inputs(3, 11, seed=2)
    assert all(len(chosen) == 4 for chosen in _routed(model, fresh).values())  # every expert is used unmasked
    groups[0].prune([1])
    groups[1].prune([0, 3])
    routed = _routed(model, fresh)
    assert routed["model.layers.0.mlp.gate"] == {0, 2, 3} and routed["model.layers.1.mlp.gate"] == {1, 2}
    with torch.no_grad():
        soft = model(**fresh).logits
    pruned = mask.generate_pruned_model()
    layers = pruned.model.layers
    assert [layer.mlp.gate.weight.shape[0] for layer in layers] == [3, 2]
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in layers] == [3, 2]
    assert [layer.mlp.experts.down_proj.shape[0] for layer in layers] == [3, 2]
    assert [(layer.mlp.gate.num_experts, layer.mlp.experts.num_experts) for layer in layers] == [(3, 3), (2, 2)]
    assert getattr(pruned.config, MODELS[name][1]) == 4  # the layers disagree: the config keeps its count
    torch.testing.assert_close(
        layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj[[0, 2, 3]], rtol=0, atol=0
    )  # bit-exact: a slice
    with torch.no_grad():
        hard = pruned(**fresh).logits
    torch.testing.assert_close(hard, soft, rtol=RTOL, atol=RTOL * soft.abs().max().item())


@pytest.mark.parametrize("name", list(MODELS))
def test_generate_and_the_config_follow(name: str) -> None:
    model = _build(name)
    mask = Mask(model, _inputs(2, 9, seed=1)).make()
    for group in _expert_groups(mask):
        group.prune([2])
    prompt = _inputs(1, 5, seed=3)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        masked = model.generate(**prompt, **options)
    pruned = mask.generate_pruned_model()
    assert getattr(pruned.config, MODELS[name][1]) == 3  # every layer keeps 3: the config says so
    with torch.no_grad():
        assert torch.equal(pruned.generate(**prompt, **options), masked)  # bit-exact: token ids, not floats


def test_too_few_experts_is_an_error_and_the_allocation_keeps_top_k() -> None:
    model = _build("mixtral")
    mask = Mask(model, _inputs(2, 9, seed=1)).make()
    group = _expert_groups(mask)[0]
    group.prune([0])
    with pytest.raises(ValueError, match="keep 1 of its 4 experts, fewer than the 2 each token is routed to"):
        group.prune([1, 2])
    assert group.pruned == [0]

    model = _build("mixtral")
    mask = Mask(model, _inputs(2, 9, seed=1), algorithm=Uniform(seed=0), ratio=0.75).make()
    mask.do_mask()
    assert [g.kept for g in _expert_groups(mask)] == [2, 2]
    mask.generate_pruned_model()  # verified: soft == hard


def test_channel_criteria_leave_experts_alone() -> None:
    model = _build("qwen3_moe")
    mask = Mask(model, _inputs(2, 9, seed=1), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    assert [g.kept for g in _expert_groups(mask)] == [4, 4]
    assert any(g.kept < g.size for g in mask.groups if g.kind == "channels")


def test_saved_loaded_and_replayed(tmp_path) -> None:
    model = _build("qwen2_moe")
    mask = Mask(model, _inputs(2, 9, seed=1)).make()
    groups = _expert_groups(mask)
    groups[0].prune([3])
    groups[1].prune([3])
    pruned = mask.generate_pruned_model()
    spec = maskprune.PruneSpec.of(pruned)
    assert spec.attributes["model.layers.0.mlp.experts"] == {"num_experts": 3, "config.num_experts": 3}
    maskprune.save_pruned(pruned, tmp_path / "moe")
    loaded = maskprune.load_pruned(_build("qwen2_moe"), tmp_path / "moe")
    assert loaded.config.num_experts == 3 and loaded.model.layers[1].mlp.experts.num_experts == 3
    fresh = _inputs(1, 7, seed=5)
    with torch.no_grad():  # bit-exact: the same shapes and weights, the same kernels
        assert torch.equal(loaded(**fresh).logits, pruned(**fresh).logits)

    again = Mask(_build("qwen2_moe"), _inputs(2, 9, seed=1)).make().apply_spec(pruned)
    assert [g.pruned for g in again.groups] == [g.pruned for g in mask.groups]
    spec.tensors = [
        type(t)(t.module, t.attr, t.shape, tuple((d, k[:1]) if d == 0 else (d, k) for d, k in t.kept))
        for t in spec.tensors
    ]
    with pytest.raises(SpecError, match="keeps 1 experts of model.layers.0.mlp.experts, fewer than top_k=2"):
        Mask(_build("qwen2_moe"), _inputs(2, 9, seed=1)).make().apply_spec(spec)


@pytest.mark.parametrize("name", list(MODELS))
def test_inner_width_and_hidden_size_through_the_experts(name: str) -> None:
    model = _build(name)
    mask = Mask(model, _inputs(2, 9, seed=1), algorithm=L1Norm(), ratio=0.5).make()
    groups = {
        m.name.rpartition(".")[2] + f"[{m.dim}]": g
        for g in mask.groups
        for m in g.members
        if m.module == "model.layers.0.mlp.experts"
    }
    assert groups["gate_up_proj[2]"] is groups["down_proj[1]"]  # the hidden size
    assert groups["gate_up_proj[1]"] is groups["down_proj[2]"]  # the inner width: gate and up halves as one unit
    inner = groups["gate_up_proj[1]"]
    assert inner.size == model.model.layers[0].mlp.experts.down_proj.shape[2]
    assert not [reason for reason in mask.selection.layout.frozen if "experts" in reason]
    mask.do_mask()
    for group in _expert_groups(mask):
        group.prune([1])
    fresh = _inputs(3, 11, seed=2)
    with torch.no_grad():
        soft = model(**fresh).logits
    pruned = mask.generate_pruned_model()
    experts = pruned.model.layers[0].mlp.experts
    width, hidden = inner.kept, groups["down_proj[1]"].kept
    assert 0 < hidden < 32 and 0 < width < inner.size
    assert experts.gate_up_proj.shape == (3, 2 * width, hidden) and experts.down_proj.shape == (3, hidden, width)
    kept = torch.as_tensor(inner.keep).nonzero().flatten()
    up = model.model.layers[0].mlp.experts.gate_up_proj[[0, 2, 3]][:, inner.size + kept]
    torch.testing.assert_close(  # bit-exact: slices (the up half follows the gate half's channels)
        experts.gate_up_proj[:, width:], up[..., groups["down_proj[1]"].keep], rtol=0, atol=0
    )
    with torch.no_grad():
        hard = pruned(**fresh).logits
    torch.testing.assert_close(hard, soft, rtol=RTOL, atol=RTOL * soft.abs().max().item())


def test_eager_experts_and_widths_are_removed_exactly() -> None:
    """The eager loop over experts (``F.linear`` with one expert's slice, ``index_add_``) moves the channels too."""
    model = _build("mixtral")
    model.set_experts_implementation("eager")
    mask = Mask(model, _inputs(2, 9, seed=1), algorithm=L1Norm(), ratio=0.5).make()
    mask.do_mask()
    groups = _expert_groups(mask)
    groups[0].prune([2, 3])
    assert _routed(model, _inputs(3, 11, seed=2))["model.layers.0.mlp.gate"] == {0, 1}
    fresh = _inputs(3, 11, seed=2)
    with torch.no_grad():
        soft = model(**fresh).logits
    pruned = mask.generate_pruned_model()
    assert pruned.model.layers[0].mlp.experts.gate_up_proj.shape == (2, 48, 16)  # experts, 2 * inner, hidden
    with torch.no_grad():
        hard = pruned(**fresh).logits
    torch.testing.assert_close(hard, soft, rtol=RTOL, atol=RTOL * soft.abs().max().item())


def test_budgets_keep_widths_through_the_experts_aligned() -> None:
    """torch's grouped products read rows of a multiple of 16 bytes: widths through fused experts keep a multiple of
    4 float32 channels; a parameter budget is met with experts and widths together, and the report counts FLOPs."""
    model = _build("qwen2_moe")
    mask = Mask(model, _inputs(2, 9, seed=1), algorithm=Uniform(seed=0), target_params=0.7).make()
    mask.do_mask()
    through = [g for g in mask.groups if any(m.name.endswith(("gate_up_proj", "down_proj")) for m in g.members)]
    assert through and all(g.kept % 4 == 0 and g.kept < g.size for g in through)
    assert all(g.kept < g.size for g in _expert_groups(mask))
    report = mask.sparsity()
    assert 0 < report.flops_after < report.flops_before
    pruned = mask.generate_pruned_model()
    ratio = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
    assert ratio == pytest.approx(0.7, abs=0.01)


def test_router_usage_is_the_mean_routing_weight_of_each_expert() -> None:
    data = [_inputs(2, 9, seed=s) for s in (4, 5)]
    model = _build("qwen3_moe")
    expected = {f"model.layers.{i}.mlp.gate": np.zeros(4) for i in range(2)}
    tokens = 0
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda m, a, out, path=path: np.add.at(
                expected[path], out[2].numpy().ravel(), out[1].double().numpy().ravel()
            )
        )
        for path in expected
    ]
    with torch.no_grad():
        for batch in data:
            model(**batch)
            tokens += batch["input_ids"].numel()
    for handle in handles:
        handle.remove()
    mask = Mask(model, data[0], algorithm=RouterUsage(data), ratio=0.5).make()
    algorithm = mask.algorithm
    algorithm.prepare(mask, mask.groups)
    for group in _expert_groups(mask):
        np.testing.assert_allclose(algorithm.score(group), expected[group.router] / tokens, rtol=1e-12)
    assert all(algorithm.score(g) is None for g in mask.groups if g.kind == "channels")
    mask.do_mask()
    for group in _expert_groups(mask):
        assert group.kept == 2
        assert sorted(group.pruned) == sorted(np.argsort(expected[group.router], kind="stable")[:2].tolist())
    assert all(g.kept == g.size for g in mask.groups if g.kind == "channels")
    mask.generate_pruned_model()  # verified: soft == hard
