"""Loading is safe: a saved folder can set only the counts an export sets, every error of ``load_pruned`` is a
``SpecError`` saying what and where (the model untouched), and ``save_pruned`` replaces a folder whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from maskprune.algorithms import Random
from test_save_load import assert_untouched, edit_spec, output, prune, snapshot
from torch import nn

import maskprune
from maskprune import SpecError
from maskprune.testing import TINY_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def saved_cnn(tmp_path: Path, tiny_cnn) -> Path:
    torch.manual_seed(0)
    _, pruned = prune(tiny_cnn(), torch.randn(2, 3, 16, 16))
    return maskprune.save_pruned(pruned, tmp_path / "cnn")


def _refused(folder: Path, model: nn.Module, message: str) -> None:
    before = snapshot(model)
    with pytest.raises(SpecError, match=message):
        maskprune.load_pruned(model, folder)
    assert_untouched(model, before)


# ---- spec.json attributes: only the counts an export sets ---------------------------------------------------
ATTRIBUTES = {  # what a folder from elsewhere might set -> what the error says
    "a conv's stride": ({"conv1": {"stride": [1, 1]}}, r"module 'conv1' \(Conv2d\): an export never sets 'stride'"),
    "a norm's eps": ({"bn1": {"eps": 0}}, r"module 'bn1' \(BatchNorm2d\): an export never sets 'eps'"),
    "a method": ({"conv1": {"forward": 1}}, r"module 'conv1' \(Conv2d\): an export never sets 'forward'"),
    "a private field": ({"bn1": {"_version": 1}}, r"an export never sets '_version'"),
    "a path": ({"../../etc": {"num_heads": 1}}, r"module '\.\./\.\./etc' named by the spec is not in the model"),
    "a config without one": (
        {"conv1": {"config.hidden_size": 4}},
        r"config\.hidden_size is set, but the module has no config",
    ),
    "a larger width": (
        {"bn1": {"num_features": 9}},
        r"bn1.*num_features: 9 is not a positive count no larger than the model's 8",
    ),
    "a zero width": ({"bn1": {"num_features": 0}}, r"num_features: 0 is not a positive count"),
    "a conv's own width": (
        {"conv1": {"out_channels": 4}},
        r"module 'conv1' \(Conv2d\): an export never sets 'out_channels'",
    ),
}


@pytest.mark.parametrize("case", list(ATTRIBUTES))
def test_an_attribute_an_export_never_sets_is_refused(case: str, saved_cnn: Path, tiny_cnn) -> None:
    attributes, message = ATTRIBUTES[case]
    edit_spec(saved_cnn, lambda data: data.update(attributes=attributes))
    _refused(saved_cnn, tiny_cnn(), message)


def test_the_counts_an_export_sets_still_load(tmp_path: Path) -> None:
    """A module's own head count and width (set by the export) load; a head count above the original does not."""
    model, inputs = TINY_MODELS["fused_qkv_attention"]()
    _, pruned = prune(model, inputs)
    folder = maskprune.save_pruned(pruned, tmp_path / "qkv")
    assert json.loads((folder / "spec.json").read_text())["attributes"] == {"": {"num_heads": 2, "attn_dim": 4}}
    loaded = maskprune.load_pruned(TINY_MODELS["fused_qkv_attention"]()[0], folder)
    assert (loaded.num_heads, loaded.attn_dim) == (2, 4)
    # bit-exact: the loaded model has the saved one's shapes and weights: the same kernels
    assert torch.equal(output(loaded, inputs), output(pruned, inputs))
    edit_spec(folder, lambda data: data["attributes"][""].update(num_heads=64))
    _refused(folder, TINY_MODELS["fused_qkv_attention"]()[0], r"module '' .*num_heads: 64 is not a positive count")


def _tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2,
        num_hidden_layers=1, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", 8, r"an export never sets config\.vocab_size \(only size fields"),
        ("rms_norm_eps", 1, r"an export never sets config\.rms_norm_eps"),
        ("hidden_size", 32, r"config\.hidden_size: 32 is not a positive count no larger than the model's 16"),
        ("n_inner", 8, r"config\.n_inner is a NoneType, not a count"),  # a field Llama's config does not have
    ],
)
def test_config_fields_are_the_size_fields_no_larger(field: str, value: int, message: str, tmp_path: Path) -> None:
    mask = maskprune.Mask(_tiny_llama(), {"input_ids": torch.randint(3, 64, (1, 6))}).make()
    for group in mask.groups:
        group.prune([0])
    folder = maskprune.save_pruned(mask.generate_pruned_model(), tmp_path / "llama")
    edit_spec(folder, lambda data: data["attributes"][""].update({f"config.{field}": value}))
    model = _tiny_llama()
    config = model.config.to_dict()
    _refused(folder, model, message)
    assert model.config.to_dict() == config


# ---- every error of load_pruned is a SpecError ------------------------------------------------------------
def test_a_truncated_safetensors_file_is_a_spec_error(saved_cnn: Path, tiny_cnn) -> None:
    file = saved_cnn / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _refused(saved_cnn, tiny_cnn(), r"cannot read the weights file .*model\.safetensors: SafetensorError")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda state: [1, 2], r"model\.pt is not a state dict"),
        (lambda state: {**state, "conv1.weight": [1.0]}, r"model\.pt is not a state dict"),
        (lambda state: {k: v.double() for k, v in state.items() if k != "fc.bias"}, r"lacks 1 tensors .*'fc\.bias'"),
    ],
    ids=["a list", "a value not a tensor", "a missing tensor"],
)
def test_a_plain_state_dict_that_is_no_state_dict_is_a_spec_error(content, message, saved_cnn: Path, tiny_cnn) -> None:
    state = safetensors.torch.load_file(str(saved_cnn / "model.safetensors"))
    (saved_cnn / "model.safetensors").unlink()
    torch.save(content(state), saved_cnn / "model.pt")
    _refused(saved_cnn, tiny_cnn(), message)


def test_a_spec_that_is_not_text_and_missing_files_are_spec_errors(saved_cnn: Path, tiny_cnn, tmp_path: Path) -> None:
    (saved_cnn / "spec.json").write_bytes(b"\xff\xfe\x00")
    _refused(saved_cnn, tiny_cnn(), r"cannot read the pruning spec .*spec\.json: UnicodeDecodeError")
    (saved_cnn / "spec.json").unlink()
    _refused(saved_cnn, tiny_cnn(), r"no pruning spec at")
    _refused(tmp_path / "nowhere", tiny_cnn(), r"is not a folder written by maskprune\.save_pruned")


def test_a_folder_holding_both_weights_files_is_refused(saved_cnn: Path, tiny_cnn) -> None:
    torch.save(safetensors.torch.load_file(str(saved_cnn / "model.safetensors")), saved_cnn / "model.pt")
    _refused(saved_cnn, tiny_cnn(), r"holds both model\.safetensors and model\.pt")


# ---- save_pruned replaces the folder whole ----------------------------------------------------------------
def test_saving_torch_weights_over_safetensors_leaves_no_stale_file(saved_cnn: Path, tiny_cnn) -> None:
    torch.manual_seed(1)
    _, other = prune(tiny_cnn(), torch.randn(2, 3, 16, 16), Random(seed=5))
    (saved_cnn / "notes.txt").write_text("mine")
    maskprune.save_pruned(other, saved_cnn, weights="torch")
    assert sorted(p.name for p in saved_cnn.iterdir()) == ["model.pt", "notes.txt", "spec.json"]
    assert (saved_cnn / "notes.txt").read_text() == "mine"  # the folder's other files stay
    assert not [p for p in saved_cnn.parent.iterdir() if p.name.startswith(".")]  # nothing left beside it
    loaded = maskprune.load_pruned(tiny_cnn(), saved_cnn)
    x = torch.randn(1, 3, 16, 16)
    # bit-exact: the loaded model has the saved one's shapes and weights: the same kernels
    assert torch.equal(output(loaded, x), output(other, x))


CRASH = textwrap.dedent(
    """
    import os, sys
    import safetensors.torch
    import maskprune
    from maskprune.testing import TINY_MODELS

    model = maskprune.load_pruned(TINY_MODELS["cat"]()[0], sys.argv[1])

    def crash(state, filename, metadata=None):  # the process dies halfway through writing the weights
        with open(filename, "wb") as file:
            file.write(b"partial")
        os._exit(3)

    safetensors.torch.save_file = crash
    maskprune.save_pruned(model, sys.argv[1])
    """
)


def test_a_crash_while_saving_leaves_the_old_folder_whole(tmp_path: Path) -> None:
    model, inputs = TINY_MODELS["cat"]()
    _, pruned = prune(model, inputs)
    folder = maskprune.save_pruned(pruned, tmp_path / "cat")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    run = subprocess.run([sys.executable, "-c", CRASH, str(folder)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    loaded = maskprune.load_pruned(TINY_MODELS["cat"]()[0], folder)
    # bit-exact: the loaded model has the saved one's shapes and weights: the same kernels
    assert torch.equal(output(loaded, inputs), output(pruned, inputs))


def test_a_failed_save_leaves_the_old_folder_and_nothing_beside_it(
    saved_cnn: Path, tiny_cnn, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {p.name: p.read_bytes() for p in saved_cnn.iterdir()}
    _, other = prune(tiny_cnn(), torch.randn(2, 3, 16, 16))

    def fail(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        maskprune.save_pruned(other, saved_cnn)
    assert {p.name: p.read_bytes() for p in saved_cnn.iterdir()} == files
    assert sorted(p.name for p in saved_cnn.parent.iterdir()) == [saved_cnn.name]
    assert os.access(saved_cnn, os.R_OK | os.W_OK | os.X_OK)
