"""save_pruned / load_pruned / Mask.apply_spec: round trips in a new process, ties, every mismatch error."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from maskprune.algorithms import L1Norm, Random
from torch import nn

import maskprune
from maskprune import Mask, PruneSpec, SpecError, TensorCut
from maskprune._walk import ModelIndex
from maskprune.testing import TINY_MODELS, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = {"resnet18": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32}
TINY = ["tied_parameters", "multihead_attention", "fused_qkv_attention", "squeeze_excitation", "cat"]


def build(case: str) -> tuple[nn.Module, object]:
    """A fresh model and example inputs; the same ``case`` string rebuilds the architecture in another process."""
    if case in ZOO:
        model = randomize_norms(torchvision.models.get_model(case, weights=None).eval())
        return model, torch.randn(2, 3, ZOO[case], ZOO[case])
    return TINY_MODELS[case]()


def prune(model: nn.Module, inputs: object, algorithm=None) -> tuple[Mask, nn.Module]:
    mask = Mask(model, inputs, algorithm=algorithm or L1Norm(), ratio=0.5).make()
    mask.do_mask()
    return mask, mask.generate_pruned_model()


def output(model: nn.Module, inputs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


# ---- round trip in a new process ------------------------------------------------------------------------
LOADER = textwrap.dedent(
    """
    import json, sys
    import safetensors.torch, torch, torchvision
    import maskprune
    from maskprune.testing import TINY_MODELS

    torch.set_num_threads(int(sys.argv[2]))
    results = {}
    for case, folder in json.loads(open(sys.argv[1]).read()).items():
        if case.startswith("tv:"):
            fresh = torchvision.models.get_model(case.split(":")[1], weights=None).eval()
        else:
            fresh = TINY_MODELS[case]()[0]
        with torch.no_grad():  # other weights than the saved model's, whatever the factory's seed
            for tensor in fresh.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(1)
        model = maskprune.load_pruned(fresh, folder)
        check = safetensors.torch.load_file(folder + "/check.safetensors")
        inputs = tuple(check[k] for k in sorted(check) if k.startswith("input"))
        with torch.no_grad():
            out = model(*inputs)
        results[case] = {
            # bit-exact: the same shapes, weights and thread count on the same machine: the same kernels
            "equal": torch.equal(out, check["output"]),
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "spec": maskprune.PruneSpec.of(model).to_json(),
        }
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case pruned and saved here, then loaded in ONE new process; what that process saw, per case."""
    root = tmp_path_factory.mktemp("saved")
    folders, expected = {}, {}
    for case in [*ZOO, *TINY]:
        torch.manual_seed(0)
        model, inputs = build(case)
        mask, pruned = prune(model, inputs)
        key = f"tv:{case}" if case in ZOO else case
        folder = root / case
        maskprune.save_pruned(pruned, folder, weights="torch" if case == "cat" else "safetensors")
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        check = {f"input{i}": t for i, t in enumerate(inputs)} | {"output": output(pruned, inputs)}
        safetensors.torch.save_file(check, str(folder / "check.safetensors"))
        folders[key] = str(folder)
        expected[key] = {
            "shapes": {k: list(v.shape) for k, v in pruned.state_dict().items()},
            "spec": PruneSpec.of(pruned).to_json(),
            "smaller": maskprune.count_parameters(pruned) < maskprune.count_parameters(model),
        }
    (root / "cases.json").write_text(json.dumps(folders))
    run = subprocess.run(
        [sys.executable, "-c", LOADER, str(root / "cases.json"), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    return {key: {"loaded": loaded[key], "expected": expected[key]} for key in folders}


@pytest.mark.parametrize("case", [f"tv:{name}" for name in ZOO] + TINY)
def test_round_trip_in_a_new_process_gives_identical_outputs(case: str, saved: dict[str, dict]) -> None:
    loaded, expected = saved[case]["loaded"], saved[case]["expected"]
    assert expected["smaller"]
    assert loaded["equal"], f"{case}: the loaded model's outputs differ from the saved model's"
    assert loaded["shapes"] == expected["shapes"]
    loaded_spec, expected_spec = PruneSpec.from_json(loaded["spec"]), PruneSpec.from_json(expected["spec"])
    assert loaded_spec.tensors == expected_spec.tensors and loaded_spec.attributes == expected_spec.attributes
    if case == "fused_qkv_attention":  # its code reads num_heads and attn_dim: the spec carries them
        assert expected_spec.attributes == {"": {"num_heads": 2, "attn_dim": 4}}


def test_saved_folder_holds_a_small_versioned_spec_and_the_weights(tmp_path: Path, tiny_cnn) -> None:
    model = tiny_cnn()
    _, pruned = prune(model, torch.randn(2, 3, 16, 16))
    folder = maskprune.save_pruned(pruned, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "spec.json"]
    data = json.loads((folder / "spec.json").read_text())
    assert data["format"] == "maskprune-pruned" and data["version"] == 3 and data["attributes"] == {}
    assert data["architecture"] == f"{type(model).__module__}.TinyCNN"
    cuts = {(t["module"], t["attr"]): t for t in data["tensors"]}
    conv1 = cuts[("conv1", "weight")]
    assert conv1["shape"] == [8, 3, 3, 3]
    ((dim, kept),) = conv1["kept"]
    assert dim == 0 and len(kept) == pruned.conv1.out_channels == 4
    assert cuts[("fc", "weight")]["kept"][0][0] == 1  # the head's inputs, not its classes
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_the_spec_text_is_the_compact_json_of_its_fields(tiny_cnn) -> None:
    """to_json writes shared shapes and kept positions once each, and exactly what json.dumps writes."""
    _, pruned = prune(tiny_cnn(), torch.randn(2, 3, 16, 16))
    spec = PruneSpec.of(pruned)
    spec.attributes = {"blocks.0.attn": {"num_heads": 2, "config.num_attention_heads": 2}}
    spec.info = {"model": "tiny", "input": [1, 3, 16, 16], "tied": {"b.weight": "a.weight"}, "note": 'é"'}
    fields = {
        "format": "maskprune-pruned",
        "version": spec.version,
        "architecture": spec.architecture,
        "tensors": [{"module": t.module, "attr": t.attr, "shape": list(t.shape), "kept": t.kept} for t in spec.tensors],
        "attributes": spec.attributes,
        "removed": {},
        "info": spec.info,
    }
    assert spec.to_json() == json.dumps(fields, separators=(",", ":"))
    assert PruneSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("case", ["resnet18", "multihead_attention", "fused_qkv_attention", "tied_parameters"])
def test_an_export_writes_the_spec_text_its_fields_give(case: str) -> None:
    """The export writes its spec straight from the plan: the text the spec's fields write, attributes included."""
    model, inputs = build(case)
    mask, pruned = prune(model, inputs)
    index = ModelIndex(model)
    long_way = PruneSpec.from_plan(index, mask.selection.plan(), mask.selection.attributes(index.modules))
    assert pruned.maskprune_spec == long_way.to_json()
    assert PruneSpec.of(pruned) == long_way and long_way.tensors


def test_a_version_1_folder_still_loads(tmp_path: Path, tiny_cnn) -> None:
    """Version 1 had a reserved, always empty ``heads`` list where version 2 has ``attributes``."""
    torch.manual_seed(0)
    _, pruned = prune(tiny_cnn(), torch.randn(2, 3, 16, 16))
    folder = maskprune.save_pruned(pruned, tmp_path / "v1")
    data = json.loads((folder / "spec.json").read_text())
    del data["attributes"]
    data.update(version=1, heads=[])
    (folder / "spec.json").write_text(json.dumps(data))
    loaded = maskprune.load_pruned(tiny_cnn(), folder)
    x = torch.randn(1, 3, 16, 16)
    # bit-exact: the loaded model has the saved one's shapes and weights: the same kernels
    assert torch.equal(output(loaded, x), output(pruned, x))


def test_tied_weights_are_stored_once_and_tied_again_on_load(tmp_path: Path) -> None:
    model, ids = TINY_MODELS["tied_parameters"]()
    _, pruned = prune(model, ids)
    assert pruned.a.weight is pruned.b.weight
    maskprune.save_pruned(pruned, tmp_path)
    stored = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert "a.weight" in stored and "b.weight" not in stored
    loaded = maskprune.load_pruned(TINY_MODELS["tied_parameters"]()[0], tmp_path)
    assert loaded.a.weight is loaded.b.weight
    assert loaded.a.weight.shape == pruned.a.weight.shape and loaded.a.embedding_dim == pruned.a.embedding_dim
    # bit-exact: the loaded model has the saved one's shapes and weights: the same kernels
    assert torch.equal(output(loaded, ids), output(pruned, ids))
    maskprune.save_pruned(loaded, tmp_path / "again")  # a loaded model carries its spec too
    assert (tmp_path / "again" / "spec.json").read_text() == (tmp_path / "spec.json").read_text()


def test_pruning_a_pruned_model_saves_one_spec_of_the_original(tmp_path: Path, tiny_cnn) -> None:
    x, model = torch.randn(2, 3, 16, 16), tiny_cnn()
    twin = copy.deepcopy(model)
    _, once = prune(model, x, Random(seed=1))
    _, twice = prune(once, x, Random(seed=2))
    assert twice.conv1.out_channels == 2
    maskprune.save_pruned(twice, tmp_path)
    loaded = maskprune.load_pruned(tiny_cnn(), tmp_path)  # the first original's shapes
    # bit-exact: the loaded model has the saved one's shapes and weights: the same kernels
    assert torch.equal(output(loaded, x), output(twice, x))
    conv1 = next(t for t in PruneSpec.of(twice).tensors if t.name == "conv1.weight")
    assert conv1.shape == (8, 3, 3, 3)
    replayed = Mask(twin, x).make().apply_spec(twice).generate_pruned_model()  # the composed kept positions
    for name, tensor in twice.state_dict().items():
        # bit-exact: copies of the same kept positions
        assert torch.equal(replayed.state_dict()[name], tensor), name


# ---- apply_spec -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tiny_cnn", "residual_add", "cat", "tied_parameters", "multihead_attention"])
def test_apply_spec_replays_the_decision_on_a_new_mask(case: str, tiny_cnn, tmp_path: Path) -> None:
    model, inputs = (tiny_cnn(), torch.randn(2, 3, 16, 16)) if case == "tiny_cnn" else TINY_MODELS[case]()
    twin = copy.deepcopy(model)
    _, pruned = prune(model, inputs, Random(seed=3))  # scattered kept positions
    maskprune.save_pruned(pruned, tmp_path)
    replay = Mask(twin, inputs).make().apply_spec(tmp_path)
    again = replay.generate_pruned_model()
    assert PruneSpec.of(again).tensors == PruneSpec.of(pruned).tensors
    expected, got = pruned.state_dict(), again.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        # bit-exact: copies of the same kept positions, then the same kernels on the same shapes
        assert torch.equal(expected[name], got[name]), name
    assert torch.equal(output(again, inputs), output(pruned, inputs))


def _spec_with(pruned: nn.Module, cut: TensorCut) -> PruneSpec:
    spec = PruneSpec.of(pruned)
    spec.tensors = [t for t in spec.tensors if (t.module, t.attr) != (cut.module, cut.attr)] + [cut]
    return spec


def test_apply_spec_refuses_channels_the_groups_tie_together(tiny_cnn) -> None:
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    _, pruned = prune(copy.deepcopy(model), x)
    conv2 = next(t for t in PruneSpec.of(pruned).tensors if t.name == "conv2.weight")
    kept = dict(conv2.kept)[0]
    other = tuple(i for i in range(16) if i not in kept)[: len(kept)]  # conv3 feeds the same residual sum
    spec = _spec_with(pruned, TensorCut("conv3", "weight", (16, 3, 1, 1), ((0, other),)))
    mask = Mask(model, x).make()
    with pytest.raises(SpecError, match=r"conv3\.weight\[dim 0\].*tie these channels together"):
        mask.apply_spec(spec)
    assert all(g.kept == g.size for g in mask.groups)  # nothing was masked


def test_apply_spec_refuses_to_remove_frozen_channels(tiny_cnn) -> None:
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    _, pruned = prune(copy.deepcopy(model), x)
    spec = _spec_with(pruned, TensorCut("fc", "weight", (5, 16), ((0, (0, 1, 2)),)))
    with pytest.raises(SpecError, match=r"removes 2 positions of fc\.weight\[dim 0\], which this mask never prunes"):
        Mask(model, x).make().apply_spec(spec)


def test_apply_spec_needs_make_and_the_same_architecture(tiny_cnn) -> None:
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    _, pruned = prune(copy.deepcopy(model), x)
    with pytest.raises(maskprune.NotMadeError, match=r"make\(\) before apply_spec"):
        Mask(model, x).apply_spec(pruned)
    other, ids = TINY_MODELS["tied_parameters"]()
    with pytest.raises(SpecError, match=r"saved from a .*TinyCNN, got a maskprune\.testing\..*TinyTied"):
        Mask(other, ids).make().apply_spec(pruned)
    with pytest.raises(TypeError, match="a spec is a PruneSpec"):
        Mask(model, x).make().apply_spec(3)


# ---- load and save errors: each names what was wrong and leaves the model untouched ------------------------
@pytest.fixture
def saved_cnn(tmp_path: Path, tiny_cnn) -> Path:
    _, pruned = prune(tiny_cnn(), torch.randn(2, 3, 16, 16))
    return maskprune.save_pruned(pruned, tmp_path / "cnn")


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = [
        (n, getattr(m, "out_channels", None), getattr(m, "num_features", None)) for n, m in model.named_modules()
    ]
    return state, attributes


def assert_untouched(model: nn.Module, before: tuple[dict[str, torch.Tensor], list]) -> None:
    state, attributes = snapshot(model)
    assert attributes == before[1]
    assert state.keys() == before[0].keys()
    for name, tensor in state.items():
        # bit-exact: compared with a copy taken before, and nothing may write to it
        assert torch.equal(tensor, before[0][name]), name
    assert not hasattr(model, maskprune._spec.SPEC_ATTRIBUTE)


def edit_spec(folder: Path, change) -> None:
    data = json.loads((folder / "spec.json").read_text())
    change(data)
    (folder / "spec.json").write_text(json.dumps(data))


def rename_module(data: dict) -> None:
    next(t for t in data["tensors"] if t["module"] == "conv3")["module"] = "conv9"


def out_of_range(data: dict) -> None:
    next(t for t in data["tensors"] if t["module"] == "conv1" and t["attr"] == "weight")["kept"][0][1][-1] = 99


MISMATCHES = {
    "unknown version": (
        lambda d: d.update(version=4),
        r"unknown pruning spec format version 4: this maskprune reads versions 1, 2, 3",
    ),
    "not a spec": (lambda d: d.pop("format"), r"not a maskprune pruning spec"),
    "module renamed": (rename_module, r"module 'conv9' named by the spec is not in the TinyCNN given"),
    "index out of range": (
        out_of_range,
        r"module 'conv1': the kept positions of weight\[dim 0\] must be .* in \[0, 8\)",
    ),
    "malformed": (lambda d: d["tensors"][0].pop("shape"), r"malformed pruning spec \(KeyError"),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_a_spec_that_does_not_fit_fails_naming_what_was_expected(name: str, saved_cnn: Path, tiny_cnn) -> None:
    change, message = MISMATCHES[name]
    edit_spec(saved_cnn, change)
    model = tiny_cnn()
    before = snapshot(model)
    with pytest.raises(SpecError, match=message):
        maskprune.load_pruned(model, saved_cnn)
    assert_untouched(model, before)


def test_changed_shapes_name_the_module_and_the_original_shape(saved_cnn: Path, tiny_cnn) -> None:
    model = type(tiny_cnn())(classes=7).eval()
    before = snapshot(model)
    with pytest.raises(
        SpecError, match=r"module 'fc': weight has shape \(7, 16\), the spec expects the original shape \(5, 16\)"
    ):
        maskprune.load_pruned(model, saved_cnn)
    assert_untouched(model, before)


def test_wrong_architecture_names_both(saved_cnn: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"saved from a .*\.TinyCNN, got a torch\.nn\.modules\.container\.Sequential"):
        maskprune.load_pruned(model, saved_cnn)
    assert_untouched(model, before)


@pytest.mark.parametrize("problem", ["wrong shape", "missing tensor", "extra tensor"])
def test_a_weights_file_that_does_not_fit_is_refused_after_reshaping_and_undone(
    problem: str, saved_cnn: Path, tiny_cnn
) -> None:
    file = str(saved_cnn / "model.safetensors")
    weights = safetensors.torch.load_file(file)
    if problem == "wrong shape":
        weights["bn1.running_mean"] = torch.zeros(7)
        message = (
            r"module 'bn1': the reshaped model expects bn1\.running_mean of shape \(4,\), the weights file holds \(7,\)"
        )
    elif problem == "missing tensor":
        del weights["conv2.weight"]
        message = r"the weights file lacks 1 tensors of the model, first 'conv2\.weight'"
    else:
        weights["conv4.weight"] = torch.zeros(1)
        message = r"the weights file holds 1 tensors the model lacks, first 'conv4\.weight'"
    safetensors.torch.save_file(weights, file)
    model = tiny_cnn()
    before = snapshot(model)
    with pytest.raises(SpecError, match=message):
        maskprune.load_pruned(model, saved_cnn)
    assert_untouched(model, before)


def test_missing_files_are_named(saved_cnn: Path, tiny_cnn, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder written by maskprune.save_pruned"):
        maskprune.load_pruned(tiny_cnn(), tmp_path / "nowhere")
    (saved_cnn / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*: expected model\.safetensors or model\.pt"):
        maskprune.load_pruned(tiny_cnn(), saved_cnn)
    (saved_cnn / "spec.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no pruning spec at .*spec\.json"):
        maskprune.load_pruned(tiny_cnn(), saved_cnn)


class Payload:
    """Unpickling this would call print: a plain state dict loader must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_a_plain_state_dict_is_read_without_unpickling_code(saved_cnn: Path, tiny_cnn, capsys) -> None:
    state = safetensors.torch.load_file(str(saved_cnn / "model.safetensors"))
    (saved_cnn / "model.safetensors").unlink()
    torch.save({**state, "payload": Payload()}, saved_cnn / "model.pt")
    model = tiny_cnn()
    before = snapshot(model)
    with pytest.raises(
        SpecError, match=r"cannot read the weights file .*model\.pt: UnpicklingError: Weights only"
    ) as error:
        maskprune.load_pruned(model, saved_cnn)
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)
    assert "unpickled code ran" not in capsys.readouterr().out
    assert_untouched(model, before)


def test_save_needs_an_exported_model_and_a_known_weights_format(tmp_path: Path, tiny_cnn) -> None:
    with pytest.raises(
        SpecError, match=r"carries no pruning spec: pass a model returned by Mask\.generate_pruned_model"
    ):
        maskprune.save_pruned(tiny_cnn(), tmp_path)
    _, pruned = prune(tiny_cnn(), torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"weights must be one of \['safetensors', 'torch'\], got 'pickle'"):
        maskprune.save_pruned(pruned, tmp_path, weights="pickle")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        maskprune.save_pruned(pruned, tmp_path / "file")
