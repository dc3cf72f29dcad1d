"""``load_pruned(folder)`` without a model: the folder records how to build the original architecture (a
``transformers`` class and its config, a timm or torchvision name, a ``module:factory`` the user trusts), and the
model it rebuilds computes what the saved one computes, whatever sizes its layers keep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import transformers
from maskprune.algorithms import L1Norm, Random
from test_save_load import edit_spec, output, prune
from torch import nn

import maskprune
from maskprune import Mask, SpecError

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_same(loaded: nn.Module, pruned: nn.Module, inputs: object) -> None:
    assert type(loaded) is type(pruned) and not loaded.training
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    torch.testing.assert_close(output(loaded, inputs), output(pruned, inputs), rtol=1e-6, atol=1e-6)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_hugging_face_layers_of_other_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 10))
    mask = Mask(_llama(), {"input_ids": ids}).make()
    for group in mask.groups:  # the first layer loses a key/value head, the second 12 MLP channels
        names = {m.name for m in group.members}
        if "model.layers.0.self_attn.k_proj.weight" in names or "model.layers.1.mlp.up_proj.weight" in names:
            group.prune(list(range(1 if group.size == 2 else 12)))
    pruned = mask.generate_pruned_model()
    assert maskprune.PruneSpec.of(pruned).info["uniform"] is False
    folder = maskprune.save_pruned(pruned, tmp_path / "llama")
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["info"]["build"] == "transformers:LlamaForCausalLM"
    assert spec["info"]["config"]["intermediate_size"] == 48  # the original config
    loaded = maskprune.load_pruned(folder)
    assert loaded.model.layers[0].self_attn.k_proj.out_features == 8
    assert loaded.model.layers[1].mlp.up_proj.out_features == 36
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_hugging_face_uniform_with_tied_weights(tmp_path: Path) -> None:
    """GPT-2 ties its head to its embedding; its config says the new sizes, and the folder keeps the original."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ids = torch.randint(3, 128, (2, 10))
    mask = Mask(transformers.GPT2LMHeadModel(config).eval(), {"input_ids": ids}, algorithm=L1Norm(), ratio=0.5)
    mask.make().do_mask()
    pruned = mask.generate_pruned_model()
    loaded = maskprune.load_pruned(maskprune.save_pruned(pruned, tmp_path / "gpt2"))
    assert loaded.config.to_dict() == pruned.config.to_dict()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_timm_by_its_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    _, pruned = prune(timm.create_model("test_resnet", pretrained=False).eval(), x, Random(seed=1))
    folder = maskprune.save_pruned(pruned, tmp_path / "timm")
    assert json.loads((folder / "spec.json").read_text())["info"]["build"] == "timm:test_resnet"
    _assert_same(maskprune.load_pruned(folder), pruned, x)


def test_torchvision_by_the_name_given_when_saving(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    _, pruned = prune(torchvision.models.resnet18().eval(), x)
    folder = maskprune.save_pruned(pruned, tmp_path / "resnet18", architecture="torchvision:resnet18")
    _assert_same(maskprune.load_pruned(folder), pruned, x)
    _assert_same(maskprune.load_pruned(torchvision.models.resnet18().eval(), folder), pruned, x)  # as before


def test_a_bfloat16_save_loads_in_bfloat16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    _, pruned = prune(torchvision.models.resnet18().eval(), x)
    folder = maskprune.save_pruned(pruned.bfloat16(), tmp_path / "bf16", architecture="torchvision:resnet18")
    loaded = maskprune.load_pruned(folder)
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    _assert_same(loaded, pruned, x.bfloat16())


def test_a_module_factory_runs_only_when_trusted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    _, pruned = prune(torchvision.models.resnet18().eval(), x)
    folder = maskprune.save_pruned(pruned, tmp_path / "factory", architecture="torchvision.models:resnet18")
    with pytest.raises(
        SpecError, match=r"imports 'torchvision\.models' .*load_pruned\(folder, trust_architecture=True\)"
    ):
        maskprune.load_pruned(folder)
    _assert_same(maskprune.load_pruned(folder, trust_architecture=True), pruned, x)


def test_what_a_folder_cannot_build_is_a_spec_error(tmp_path: Path, tiny_cnn) -> None:
    _, pruned = prune(tiny_cnn(), torch.randn(2, 3, 16, 16))
    folder = maskprune.save_pruned(pruned, tmp_path / "cnn")
    with pytest.raises(SpecError, match=r"does not record how to build its architecture: pass the model"):
        maskprune.load_pruned(folder)
    for build, message in [
        ("transformers:AutoConfig", r"transformers .* has no model class 'AutoConfig'"),
        ("transformers:os.system", r"has no model class 'os\.system'"),
        ("timm:notamodel", r"cannot build the architecture 'timm:notamodel'"),
        ("torchvision:resnet19", r"cannot build the architecture 'torchvision:resnet19'"),
    ]:
        edit_spec(folder, lambda data, build=build: data["info"].update(build=build, config={}))
        with pytest.raises(SpecError, match=message):
            maskprune.load_pruned(folder)
    edit_spec(folder, lambda data: data["info"].update(build="torchvision:resnet18"))
    with pytest.raises(SpecError, match=r"saved from a .*TinyCNN, got a torchvision\.models\.resnet\.ResNet"):
        maskprune.load_pruned(folder)
    with pytest.raises(ValueError, match="architecture is torchvision:NAME"):
        maskprune.save_pruned(pruned, folder, architecture="resnet18")
