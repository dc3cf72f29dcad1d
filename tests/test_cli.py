"""The ``maskprune`` command line, run as real commands in subprocesses: output, files, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

import maskprune
from maskprune import cli
from maskprune._models import load_checkpoint
from maskprune.testing import TinyShared

SHAPE = "1,3,32,32"
TINY = ["maskprune.testing:TinyShared", "--input-shape", "2,3,8,8"]


def maskprune_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maskprune", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "maskprune"
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for command in ("inspect", "prune", "report"):
        assert command in run.stdout


def test_inspect_prints_groups_and_frozen_channels() -> None:
    run = maskprune_command("inspect", "torchvision:resnet18", "--input-shape", SHAPE, "--groups")
    assert run.returncode == 0, run.stderr
    assert "Mask(ResNet, no algorithm, ratio=0.5): 12 groups, 2880/2880 channels kept" in run.stdout
    assert re.search(r"^\s+0\s+64/64\s+conv1\.weight\[0\]", run.stdout, re.MULTILINE)
    assert "Frozen (never pruned):" in run.stdout and "fc.weight[0]" in run.stdout
    assert "Group 11" in run.stdout  # --groups: every group's member table


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """``maskprune inspect ... | head -1``: the closed pipe ends the command quietly, with status 0."""
    command = [sys.executable, "-m", "maskprune", "inspect", "torchvision:resnet18", "--input-shape", SHAPE, "--groups"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as process:
        first = process.stdout.readline()
        process.stdout.close()  # like `head -1`: stop reading after the first line
        stderr = process.stderr.read().decode()
        status = process.wait(timeout=300)
    assert first.startswith(b"Mask(ResNet")
    assert status == 0 and "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("cli") / "resnet18-fpgm"
    run = maskprune_command(
        "prune",
        "torchvision:resnet18",
        "--algorithm",
        "fpgm",
        "--ratio",
        "0.3",
        "--input-shape",
        SHAPE,
        "--out",
        str(folder),
    )
    return folder, run


def test_prune_exports_verifies_and_saves(pruned_folder: tuple[Path, subprocess.CompletedProcess]) -> None:
    folder, run = pruned_folder
    assert run.returncode == 0, run.stderr
    assert f"saved torchvision:resnet18 (2022/2880 channels kept) to {folder}" in run.stdout
    assert "pruning: 100%" in run.stderr  # tqdm
    assert "soft vs hard on a fresh batch: equal" in run.stderr  # logging
    info = json.loads((folder / "spec.json").read_text())["info"]
    assert info["model"] == "torchvision:resnet18" and info["input_shape"] == [1, 3, 32, 32]
    assert info["pruning"] == {"algorithm": "fpgm", "ratio": 0.3, "allocation": "uniform", "steps": 1}
    loaded = maskprune.load_pruned(torchvision.models.resnet18(), folder)
    assert loaded.layer1[0].conv1.out_channels == 45  # 30% of 64 removed
    assert info["build"] == "torchvision:resnet18"  # the folder says how to build it: no model needed
    assert maskprune.load_pruned(folder).layer1[0].conv1.out_channels == 45


def test_report_of_a_folder_prints_the_table_and_draws_the_plot(
    pruned_folder: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    folder, _ = pruned_folder
    plot = tmp_path / "channels.png"
    run = maskprune_command("report", str(folder), "--plot", str(plot), "--min-time", "0.05")
    assert run.returncode == 0, run.stderr
    assert f"Requested: fpgm, ratio=0.3 (uniform), the spec saved in {folder.name}" in run.stdout
    loaded = maskprune.load_pruned(torchvision.models.resnet18(), folder)
    before, after = maskprune.count_parameters(torchvision.models.resnet18()), maskprune.count_parameters(loaded)
    row = re.search(r"\| parameters\s+\|\s+([\d,]+) \|\s+([\d,]+) \|\s+([\d.]+) \|", run.stdout)
    assert row, run.stdout
    assert (int(row[1].replace(",", "")), int(row[2].replace(",", ""))) == (before, after)
    assert float(row[3]) == pytest.approx(after / before, abs=1e-3)
    latency = re.search(r"\| latency \(ms\)\s+\|\s+([\d,.]+) \|\s+([\d,.]+) \|\s+([\d.]+) \|", run.stdout)
    assert latency, run.stdout
    before_ms, after_ms = (float(latency[i].replace(",", "")) for i in (1, 2))
    assert float(latency[3]) == pytest.approx(after_ms / before_ms, abs=2e-3)
    assert re.search(r"\| latency IQR \(ms\)\s+\|\s+[\d,.]+ \|\s+[\d,.]+ \|\s+\|", run.stdout)  # the spread
    blocks = re.search(r"^latency: median and interquartile range of (\d+) and (\d+) timed blocks", run.stdout, re.M)
    assert blocks and min(int(blocks[1]), int(blocks[2])) >= 5, run.stdout
    assert "(torch.utils.benchmark, 1 thread)" in run.stdout
    assert re.search(r"^\s+11\s+359/512\s+-\s+0\.299", run.stdout, re.MULTILINE)  # channels per group
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_report_on_a_model_prunes_to_a_flops_target_quietly() -> None:
    run = maskprune_command(
        "--quiet", "report", "torchvision:resnet18", "--input-shape", SHAPE, "--target-flops", "0.5",
        "--min-time", "0.05",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no progress bar, no message
    assert "Requested: l1, target_flops=0.5 (uniform)\n" in run.stdout
    removed = re.search(r"^FLOPs:.*\(([\d.]+)% removed\)", run.stdout, re.MULTILINE)
    assert removed and 49.0 <= float(removed[1]) <= 51.0


def test_a_users_own_model_by_module_and_factory(capsys) -> None:
    assert cli.main(["--quiet", "inspect", "maskprune.testing:TinyShared", "--input-shape", "2,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Mask(TinyShared, no algorithm, ratio=0.5): 1 groups, 8/8 channels kept")


def error_of(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a command that must fail: exit status 2 and one line on stderr, returned without ``maskprune: error:``."""
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskprune: error: "), err
    return lines[0][len("maskprune: error: ") :]


def test_an_error_is_one_line_and_status_2_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    """As a real process: ``timm:notamodel`` once ended in a traceback."""
    run = maskprune_command("prune", "timm:notamodel", "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    assert run.stderr == "maskprune: error: timm has no model 'notamodel' (timm.list_models() lists all " + (
        f"{len(timm.list_models())})\n"
    )
    run = maskprune_command("--debug", "inspect", "torchvision:resnet19")
    assert run.returncode == 1 and "Traceback (most recent call last)" in run.stderr
    assert "ValueError: torchvision has no model 'resnet19'; did you mean" in run.stderr


@pytest.mark.parametrize(
    "model, message",
    [
        (
            "torchvision:resnet19",
            "torchvision has no model 'resnet19'; did you mean resnet18, resnet152 or resnet101? "
            "(torchvision.models.list_models() lists all",
        ),
        ("timm:resnt18", "timm has no model 'resnt18'; did you mean resnet18, resnet18d or skresnet18? (timm.list"),
        ("timm:notamodel", "timm has no model 'notamodel' (timm.list_models() lists all"),
    ],
)
def test_an_unknown_model_says_what_it_may_have_meant(model: str, message: str, tmp_path: Path, capsys) -> None:
    assert error_of(["--quiet", "prune", model, "--out", str(tmp_path / "out")], capsys).startswith(message)
    assert not (tmp_path / "out").exists()


def test_out_is_checked_before_any_work_and_force_replaces(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    prune = ["--quiet", "prune", *TINY, "--ratio", "0.5"]
    first = ["--quiet", "prune", "torchvision:resnet19"]  # --out is checked before the model is even built
    message = f"--out {a_file} is a file: a pruned model is saved as a folder, name a new one"
    assert error_of([*first, "--out", str(a_file)], capsys) == message
    assert a_file.read_text() == "mine"

    out = tmp_path / "pruned"
    out.mkdir()
    (out / "notes.txt").write_text("kept")  # a folder of other files: the model is saved beside them
    assert cli.main([*prune, "--out", str(out)]) == 0
    spec = (out / "spec.json").read_text()
    message = f"--out {out} already holds a pruned model (model.safetensors, spec.json): --force replaces it"
    assert error_of([*first, "--out", str(out)], capsys) == message
    assert (out / "spec.json").read_text() == spec
    assert cli.main([*prune[:-1], "0.25", "--out", str(out), "--force"]) == 0
    assert maskprune.load_pruned(out, trust_architecture=True).stem.out_channels == 6  # 8 less a quarter
    assert (out / "notes.txt").read_text() == "kept"


def test_an_unforeseen_error_names_its_type_and_debug(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("inside the model\nsecond line")

    monkeypatch.setattr(maskprune.testing.TinyShared, "forward", broken)
    message = error_of(["--quiet", "inspect", *TINY], capsys)
    assert message == "the model rejected the example inputs: RuntimeError: inside the model second line"
    monkeypatch.setattr(cli, "inspect", broken)  # an error no check foresaw, raised by the command itself
    assert cli.main(["inspect", "x:y"]) == 2
    assert capsys.readouterr().err == (
        "maskprune: error: RuntimeError: inside the model second line (run with --debug for the traceback)\n"
    )


@pytest.mark.parametrize(
    "model, message",
    [
        ("resnet18", "a model is torchvision:NAME, timm:NAME, hf:FOLDER or module.path:factory, got 'resnet18'"),
        ("no_such_package:build", "cannot import 'no_such_package'"),
        ("maskprune.testing:nothing", "'maskprune.testing' has no callable 'nothing'"),
        ("maskprune.testing:TINY_MODELS", "'maskprune.testing' has no callable 'TINY_MODELS'"),
        ("timm:resnet18", "'timm:resnet18' needs timm, which is not installed (pip install timm)"),
    ],
)
def test_model_names_that_do_not_resolve(model: str, message: str, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    assert message in error_of(["--quiet", "inspect", model], capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "torchvision:resnet18", "--input-shape", "1,3,x"], "an input shape is positive integers"),
        (["prune", "torchvision:resnet18"], "the following arguments are required: --out"),
        (["prune", "torchvision:resnet18", "--out", "x", "--algorithm", "taylor"], "invalid choice: 'taylor'"),
    ],
)
def test_bad_arguments_are_one_line_and_status_2(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"maskprune {args[0]}: error: ") and message in line
    assert line.endswith(f"(see maskprune {args[0]} --help)")


@pytest.fixture
def llama_folder(tmp_path: Path) -> Path:
    """A tiny Llama (byte vocabulary, no tokenizer) saved with save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_prune_a_hugging_face_folder_with_calibration_text(llama_folder: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(Path(cli.__file__).read_text())  # prose enough: bytes, as the folder has no tokenizer
    args = ["--quiet", "prune", f"hf:{llama_folder}", "--calib", str(calib), "--algorithm", "wandasp"]
    assert cli.main([*args, "--target-params", "0.75", "--out", str(tmp_path / "out")]) == 0

    original = maskprune._models.build_model(f"hf:{llama_folder}")
    pruned = maskprune.load_pruned(maskprune._models.build_model(f"hf:{llama_folder}"), tmp_path / "out")
    kept = maskprune.count_parameters(pruned) / maskprune.count_parameters(original)
    assert abs(kept - 0.75) <= 0.01, kept
    batch = maskprune._models.text_batches(calib, llama_folder, length=16, count=2)
    assert batch[0]["input_ids"].shape == (2, 16) and int(batch[0]["input_ids"].max()) < 256
    assert json.loads((tmp_path / "out" / "spec.json").read_text())["info"]["calib"] == str(calib)


def test_an_hf_model_without_calibration_text_is_an_error(llama_folder: Path, tmp_path: Path, capsys) -> None:
    assert "needs --calib" in error_of(["prune", f"hf:{llama_folder}", "--out", str(tmp_path / "out")], capsys)
    (tmp_path / "calib.txt").write_text("some text")
    args = ["prune", f"hf:{tmp_path}", "--calib", str(tmp_path / "calib.txt"), "--out", str(tmp_path / "out")]
    assert "no config.json" in error_of(args, capsys) and not (tmp_path / "out").exists()


def test_prune_with_calib_reestimates_the_batch_norm_statistics(tmp_path: Path, capsys) -> None:
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 + 1
    torch.save(images, tmp_path / "calib.pt")
    out = tmp_path / "pruned"
    args = ["prune", "torchvision:resnet18", "--ratio", "0.3", "--input-shape", SHAPE, "--out", str(out)]
    assert cli.main(["--quiet", *args, "--calib", str(tmp_path / "calib.pt"), "--calib-batch-size", "8"]) == 0
    loaded = maskprune.load_pruned(torchvision.models.resnet18(), out)
    saved = {k: v.clone() for k, v in loaded.state_dict().items()}
    assert not torch.allclose(saved["bn1.running_mean"], torch.zeros(()))  # a fresh resnet18 has zeros there
    maskprune.recalibrate_bn(loaded, list(images.split(8)))  # the exported model sees what the masked one saw
    for name, value in loaded.state_dict().items():
        # float32 rounding of sliced convs, amplified by train-mode BatchNorms over 8 x 1 x 1 values in layer4
        torch.testing.assert_close(value, saved[name], rtol=1e-3, atol=1e-3)
    assert saved["bn1.num_batches_tracked"] == 2

    (tmp_path / "text.pt").write_text("not a tensor file")
    torch.save({"images": images}, tmp_path / "dict.pt")
    for name, message in [
        ("text.pt", "text.pt: not a tensor file saved with torch.save"),
        ("dict.pt", "dict.pt: expected one floating tensor of inputs (N, 3, 32, 32), got a dict"),
    ]:
        assert message in error_of(["--quiet", *args, "--force", "--calib", str(tmp_path / name)], capsys)


# ---- the weights pruned: --checkpoint, --weights, --pretrained -------------------------------------------------


def test_prune_ranks_the_checkpoints_weights(tmp_path: Path) -> None:
    """L1 ranks the weights of ``--checkpoint``, not random ones: the four channels made large are the ones kept."""
    model = TinyShared()
    with torch.no_grad():
        for conv in (model.stem, model.block):
            conv.weight[1::2] *= 100
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    out = tmp_path / "out"
    assert cli.main(["--quiet", "prune", *TINY, "--checkpoint", str(tmp_path / "mine.pt"), "--out", str(out)]) == 0
    pruned = maskprune.load_pruned(TinyShared(), out)
    assert torch.equal(pruned.stem.weight, model.stem.weight[1::2])  # bit-exact: a slice of the checkpoint's tensor
    assert torch.equal(pruned.block.weight, model.block.weight[1::2, 1::2])  # bit-exact: likewise
    assert json.loads((out / "spec.json").read_text())["info"]["checkpoint"] == str(tmp_path / "mine.pt")


@pytest.mark.parametrize("form", ["state dict", "training checkpoint", "DistributedDataParallel", "safetensors"])
def test_a_checkpoint_in_the_usual_forms(form: str, tmp_path: Path) -> None:
    state = TinyShared().state_dict()
    path = tmp_path / ("mine.safetensors" if form == "safetensors" else "mine.pt")
    if form == "safetensors":
        safetensors.torch.save_file(state, str(path))
    elif form == "training checkpoint":
        torch.save({"state_dict": state, "epoch": 3, "optimizer": {}}, path)
    elif form == "DistributedDataParallel":
        torch.save({f"module.{key}": tensor for key, tensor in state.items()}, path)
    else:
        torch.save(state, path)
    model = TinyShared()
    load_checkpoint(model, path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key])  # bit-exact: the saved tensors, copied


def test_checkpoints_that_cannot_load_are_one_line(tmp_path: Path, capsys) -> None:
    torch.save(nn.Sequential(nn.Linear(3, 2)).state_dict(), tmp_path / "other.pt")
    torch.save(TinyShared(), tmp_path / "pickled.pt")  # a whole module: code, not weights
    cases = {
        "other.pt": f"the checkpoint {tmp_path / 'other.pt'} does not fit the TinyShared: 6 missing keys "
        "(stem.weight, stem.bias, block.weight and 3 more); 2 unexpected keys (0.weight, 0.bias)",
        "pickled.pt": f"the checkpoint {tmp_path / 'pickled.pt'} is not a state dict saved with torch.save that "
        "loads with weights_only=True (UnpicklingError: Weights only load failed.",
        "absent.pt": f"--checkpoint {tmp_path / 'absent.pt'}: no such file",
    }
    for name, message in cases.items():
        args = ["--quiet", "prune", *TINY, "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "out")]
        assert error_of(args, capsys).startswith(message)
    assert not (tmp_path / "out").exists()


def test_weights_and_pretrained_reach_the_factories(monkeypatch, tmp_path: Path) -> None:
    """``--weights`` goes to torchvision's ``get_model``, ``--pretrained`` to timm's ``create_model`` (both stand-ins
    here: nothing is downloaded), and the spec records them."""
    asked = {}

    def get_model(name: str, weights: str | None = None) -> nn.Module:
        asked["torchvision"] = name, weights
        return TinyShared()

    def create_model(name: str, pretrained: bool = False) -> nn.Module:
        asked["timm"] = name, pretrained
        return TinyShared()

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    monkeypatch.setattr(timm, "create_model", create_model)
    shape = ["--input-shape", "2,3,8,8"]
    for model, flag, out in [
        ("torchvision:resnet18", ["--weights", "DEFAULT"], "tv"),
        ("timm:resnet18", ["--pretrained"], "timm"),
    ]:
        assert cli.main(["--quiet", "prune", model, *flag, *shape, "--out", str(tmp_path / out)]) == 0
    assert asked == {"torchvision": ("resnet18", "DEFAULT"), "timm": ("resnet18", True)}
    assert json.loads((tmp_path / "tv" / "spec.json").read_text())["info"]["weights"] == "DEFAULT"
    assert json.loads((tmp_path / "timm" / "spec.json").read_text())["info"]["pretrained"] is True


def test_weights_that_cannot_be_had_are_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    def offline(*args, **kwargs) -> nn.Module:
        raise urllib.error.URLError("no network")

    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["torchvision:resnet18", "--weights", "IMAGENET1K_V9"], "torchvision:resnet18 has no weights "
         "'IMAGENET1K_V9'; valid: DEFAULT, IMAGENET1K_V1"),
        (["timm:resnet18", "--weights", "DEFAULT"], "--weights names torchvision's weights; timm:resnet18 is not a "
         "torchvision model (a timm model takes --pretrained)"),
        (["torchvision:resnet18", "--pretrained"], "--pretrained asks timm for its weights; torchvision:resnet18 is "
         "not a timm model (a torchvision model takes --weights DEFAULT)"),
        (["torchvision:resnet18", "--weights", "DEFAULT"], "cannot download the DEFAULT weights of "
         "torchvision:resnet18 (URLError: <urlopen error no network>); where they cannot be downloaded, load a state "
         "dict saved elsewhere (--checkpoint FILE)"),
        (["timm:resnet18", "--pretrained"], "cannot load timm's pretrained weights of timm:resnet18 (URLError: "
         "<urlopen error no network>)"),
    ]  # fmt: skip
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    monkeypatch.setattr(timm, "create_model", offline)
    for args, message in cases:
        assert error_of(["--quiet", "prune", *args, *out], capsys).startswith(message)


def test_a_saved_folder_takes_no_weights(pruned_folder: tuple[Path, subprocess.CompletedProcess], capsys) -> None:
    folder, _ = pruned_folder
    assert cli.main(["report", str(folder), "--weights", "DEFAULT"]) == 2
    assert capsys.readouterr().err == (
        f"maskprune: error: {folder} is a saved folder, which holds its weights: --weights, --pretrained and "
        "--checkpoint are for a model pruned here\n"
    )


def test_report_times_on_the_threads_asked(capsys) -> None:
    assert cli.main(["--quiet", "report", *TINY, "--min-time", "0.02", "--threads", "2", "--ratio", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "Requested: l1, ratio=0.25 (uniform)\n" in out
    assert re.search(r"^latency: median and interquartile range of \d+ and \d+ timed blocks "
                     r"\(torch\.utils\.benchmark, 2 threads\)$", out, re.MULTILINE)  # fmt: skip
