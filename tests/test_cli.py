"""The ``maskprune`` command line, run as real commands in subprocesses: output, files, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import maskprune
from maskprune import cli

SHAPE = "1,3,32,32"


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
    loaded = maskprune.load_pruned(torchvision.models.resnet18(), folder)
    assert loaded.layer1[0].conv1.out_channels == 45  # 30% of 64 removed
    assert info["build"] == "torchvision:resnet18"  # the folder says how to build it: no model needed
    assert maskprune.load_pruned(folder).layer1[0].conv1.out_channels == 45


def test_report_of_a_folder_prints_the_table_and_draws_the_plot(
    pruned_folder: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    folder, _ = pruned_folder
    plot = tmp_path / "channels.png"
    run = maskprune_command("report", str(folder), "--plot", str(plot), "--repeats", "2")
    assert run.returncode == 0, run.stderr
    loaded = maskprune.load_pruned(torchvision.models.resnet18(), folder)
    before, after = maskprune.count_parameters(torchvision.models.resnet18()), maskprune.count_parameters(loaded)
    row = re.search(r"\| parameters\s+\|\s+([\d,]+) \|\s+([\d,]+) \|\s+([\d.]+) \|", run.stdout)
    assert row, run.stdout
    assert (int(row[1].replace(",", "")), int(row[2].replace(",", ""))) == (before, after)
    assert float(row[3]) == pytest.approx(after / before, abs=1e-3)
    assert re.search(r"\| latency \(ms\)\s+\|\s+[\d.]+ \|\s+[\d.]+ \|", run.stdout)
    assert re.search(r"^\s+11\s+359/512\s+-\s+0\.299", run.stdout, re.MULTILINE)  # channels per group
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_report_on_a_model_prunes_to_a_flops_target_quietly() -> None:
    run = maskprune_command(
        "--quiet", "report", "torchvision:resnet18", "--input-shape", SHAPE, "--target-flops", "0.5", "--repeats", "1"
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no progress bar, no message
    removed = re.search(r"^FLOPs:.*\(([\d.]+)% removed\)", run.stdout, re.MULTILINE)
    assert removed and 49.0 <= float(removed[1]) <= 51.0


def test_a_users_own_model_by_module_and_factory(capsys) -> None:
    assert cli.main(["--quiet", "inspect", "maskprune.testing:TinyShared", "--input-shape", "2,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Mask(TinyShared, no algorithm, ratio=0.5): 1 groups, 8/8 channels kept")


def test_a_bad_model_is_an_error_message_and_status_1() -> None:
    run = maskprune_command("inspect", "torchvision:resnet")
    assert run.returncode == 1
    assert "error: torchvision has no model 'resnet'; valid names:" in run.stderr and "resnet18" in run.stderr


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
def test_model_names_that_do_not_resolve(model: str, message: str, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    assert cli.main(["--quiet", "inspect", model]) == 1
    assert message in caplog.text


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "torchvision:resnet18", "--input-shape", "1,3,x"], "an input shape is positive integers"),
        (["prune", "torchvision:resnet18"], "the following arguments are required: --out"),
        (["prune", "torchvision:resnet18", "--out", "x", "--algorithm", "taylor"], "invalid choice: 'taylor'"),
    ],
)
def test_bad_arguments_exit_with_usage(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


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


def test_an_hf_model_without_calibration_text_is_an_error(llama_folder: Path, tmp_path: Path, caplog) -> None:
    assert cli.main(["prune", f"hf:{llama_folder}", "--out", str(tmp_path / "out")]) == 1
    assert "needs --calib" in caplog.text
    assert cli.main(["prune", f"hf:{tmp_path}", "--calib", __file__, "--out", str(tmp_path / "out")]) == 1
    assert "no config.json" in caplog.text and not (tmp_path / "out").exists()


def test_prune_with_calib_reestimates_the_batch_norm_statistics(tmp_path: Path, caplog) -> None:
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
        caplog.clear()
        assert cli.main(["--quiet", *args, "--calib", str(tmp_path / name)]) == 1
        assert message in caplog.text
