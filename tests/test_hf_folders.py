"""Hugging Face folders: an export whose layers keep the same sizes says them in its config, so that
``save_pretrained`` and a plain ``from_pretrained``, in a process that never imports maskprune, give the same
logits; where layers differ, the config keeps its fields and ``load_pruned(folder)`` rebuilds the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

import maskprune
from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2)


def _config(cls: type, **kwargs: Any) -> Any:
    return cls(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)


def _decoder(config_cls: type, model_cls: type) -> Callable[[], nn.Module]:
    sizes = SMALL | dict(num_key_value_heads=2, max_position_embeddings=64)
    return lambda: model_cls(_config(config_cls, **sizes))


# name -> (build, the Auto class that reloads it, the config fields that must say the new sizes)
CASES: dict[str, tuple[Callable[[], nn.Module], str, dict[str, int]]] = {
    "llama": (
        _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "AutoModelForCausalLM",
        {"hidden_size": 24, "intermediate_size": 36, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
    ),
    "qwen2": (
        _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "AutoModelForCausalLM",
        # Qwen2's config leaves head_dim out (hidden_size // num_attention_heads): written out now
        {"hidden_size": 24, "intermediate_size": 36, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
    ),
    "mistral": (
        _decoder(transformers.MistralConfig, transformers.MistralForCausalLM),
        "AutoModelForCausalLM",
        {"hidden_size": 24, "intermediate_size": 36, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
    ),
    "qwen2_moe": (  # the experts and the hidden size stay (fused experts are not pruned); the shared expert
        lambda: transformers.Qwen2MoeForCausalLM(
            _config(
                transformers.Qwen2MoeConfig,
                **SMALL | dict(num_key_value_heads=2, max_position_embeddings=64),
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
            )
        ),
        "AutoModelForCausalLM",
        {"num_attention_heads": 2, "num_key_value_heads": 1, "shared_expert_intermediate_size": 18, "num_experts": 3},
    ),
    "gpt2": (  # its own names, and n_inner left as None (4 * n_embd) before: written out now
        lambda: transformers.GPT2LMHeadModel(
            _config(transformers.GPT2Config, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        ),
        "AutoModelForCausalLM",
        {"n_embd": 24, "n_head": 3, "n_inner": 96},
    ),
    "bert": (
        lambda: transformers.BertForSequenceClassification(
            _config(transformers.BertConfig, **SMALL, max_position_embeddings=64, num_labels=3)
        ),
        "AutoModelForSequenceClassification",
        {"hidden_size": 24, "num_attention_heads": 3, "intermediate_size": 36},
    ),
}


def _inputs(seed: int, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))}


def _randomized(model: nn.Module) -> nn.Module:
    """Norm weights and biases away from 1 and 0, so that a mix-up of channels shows in the logits."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.dim() == 1:
                tensor.uniform_(0.5, 1.5) if name.endswith("weight") else tensor.uniform_(-0.5, 0.5)
    return model.eval()


def _uniform_prune(name: str) -> tuple[nn.Module, nn.Module]:
    """The model and its export with a quarter of every group removed (one of two key/value heads, one of four
    experts): the same positions in every layer, so the layers keep the same sizes."""
    torch.manual_seed(0)
    model = _randomized(CASES[name][0]())
    mask = Mask(model, _inputs(1)).make()
    for group in mask.groups:
        group.prune(list(range(1, 1 + max(1, group.size // 4))))
    return model, mask.generate_pruned_model()


RELOAD = textwrap.dedent(
    """
    import json, sys
    import safetensors.torch, torch, transformers

    results = {}
    for folder, auto in json.loads(open(sys.argv[1]).read()):
        model = getattr(transformers, auto).from_pretrained(folder).eval()
        check = safetensors.torch.load_file(folder + "/check.safetensors")
        with torch.no_grad():
            logits = model(input_ids=check["input_ids"]).logits
        scale = check["logits"].abs().max().item()
        results[folder] = {"error": (logits - check["logits"]).abs().max().item() / scale, "shape": list(logits.shape)}
    assert "maskprune" not in sys.modules
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, nn.Module, Path, dict]]:
    """Every case pruned uniformly and written by ``save_pretrained``, then reloaded in ONE process that never
    imports maskprune: per case, the model, its export, the folder and what that process saw."""
    root = tmp_path_factory.mktemp("hf")
    cases, folders = {}, []
    for name in CASES:
        model, pruned = _uniform_prune(name)
        folder = root / name
        pruned.save_pretrained(folder)
        check = _inputs(2, batch=3, length=9)
        with torch.no_grad():
            check["logits"] = pruned(**check).logits
        safetensors.torch.save_file(check, str(folder / "check.safetensors"))
        cases[name] = (model, pruned, folder)
        folders.append((str(folder), CASES[name][1]))
    (root / "cases.json").write_text(json.dumps(folders))
    run = subprocess.run(
        [sys.executable, "-c", RELOAD, str(root / "cases.json")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    return {name: (*case, seen[str(case[2])]) for name, case in cases.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_a_uniform_export_reloads_with_plain_from_pretrained(name: str, reloaded: dict) -> None:
    model, pruned, folder, seen = reloaded[name]
    expected = CASES[name][2]
    for field, value in expected.items():
        assert getattr(pruned.config, field) == value, f"{name}: config.{field} is {getattr(pruned.config, field)}"
    assert maskprune.PruneSpec.of(pruned).info["uniform"] is True
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
    written = json.loads((folder / "config.json").read_text())
    assert {field: written[field] for field in expected} == expected
    assert seen["shape"] == [3, 9, VOCAB] if name != "bert" else [3, 3]
    assert seen["error"] < 1e-5, f"{name}: the reloaded logits differ by {seen['error']:.3g} of their largest"
    assert model.config.to_dict() == CASES[name][0]().config.to_dict()  # the original model's config is untouched


def _masked(name: str) -> tuple[nn.Module, Mask]:
    torch.manual_seed(0)
    model = _randomized(CASES[name][0]())
    return model, Mask(model, _inputs(1)).make()


def test_layers_that_keep_other_sizes_leave_the_config_and_say_so() -> None:
    model, mask = _masked("llama")
    key = "model.layers.0.mlp.up_proj.weight"
    (mlp,) = [g for g in mask.groups if any(m.name == key and m.dim == 0 for m in g.members)]
    mlp.prune([0, 1, 2])  # layer 0 only
    pruned = mask.generate_pruned_model()
    assert pruned.model.layers[0].mlp.up_proj.out_features == 45
    assert pruned.model.layers[1].mlp.up_proj.out_features == 48
    assert pruned.config.to_dict() == model.config.to_dict()
    assert maskprune.PruneSpec.of(pruned).info["uniform"] is False


def test_heads_the_config_cannot_say_apart_from_the_hidden_size_leave_it() -> None:
    """GPT-2 derives its head size from n_embd // n_head: heads removed with the hidden size kept are sizes its
    config cannot say. The head counts the modules keep are still set (the export needs them)."""
    model, mask = _masked("gpt2")
    for group in mask.groups:  # Conv1D weights are (in, out): c_proj's rows are the heads' channels
        if any(m.name.endswith("attn.c_proj.weight") and m.dim == 0 for m in group.members):
            assert group.size == 4
            group.prune([0])  # one head of every layer; the hidden size stays
    pruned = mask.generate_pruned_model()
    assert (pruned.config.n_embd, pruned.config.n_inner) == (32, None)
    assert maskprune.PruneSpec.of(pruned).info["uniform"] is False
