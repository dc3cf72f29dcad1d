"""The Fashion-MNIST example: idx reader, data location, and the main job end to end on a tiny budget."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import each other as plain modules, as when run as scripts

import fashion_mnist as fm  # noqa: E402
import prune_fashion_mnist as job  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file written by hand (independently of fm.write_idx): 0x0000, type 0x08, ndim, big-endian sizes."""
    assert array.dtype == np.uint8
    return struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape) + array.tobytes()


def write(path: Path, raw: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_idx(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write(tmp_path / "images-idx3-ubyte", idx_bytes(images), compress)
    read = fm.read_idx(path)
    assert read.shape == (2, 3, 4) and read.dtype == np.uint8
    np.testing.assert_array_equal(read, images)
    labels = fm.read_idx(write(tmp_path / "labels", idx_bytes(np.array([3, 1, 4], dtype=np.uint8)), compress))
    assert labels.tolist() == [3, 1, 4]


def test_write_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    assert fm.read_idx(fm.write_idx(tmp_path / "a-idx2-int.gz", array)).tolist() == array.tolist()


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_idx_bad_magic(tmp_path: Path, compress: bool) -> None:
    raw = bytearray(idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    raw[0] = 0x42
    path = write(tmp_path / "broken-idx2-ubyte", bytes(raw), compress)
    with pytest.raises(fm.IdxError, match=r"broken-idx2-ubyte: bad magic number 0x42000802"):
        fm.read_idx(path)
    path = write(tmp_path / "badtype", idx_bytes(np.zeros(2, dtype=np.uint8))[:2] + b"\x07\x01" + b"\x00" * 6, compress)
    with pytest.raises(fm.IdxError, match=r"badtype: bad magic number 0x00000701"):
        fm.read_idx(path)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_idx_truncated(tmp_path: Path, compress: bool) -> None:
    raw = idx_bytes(np.ones((4, 5, 5), dtype=np.uint8))
    path = write(tmp_path / "short-idx3-ubyte", raw[:-7], compress)
    with pytest.raises(fm.IdxError, match=r"short-idx3-ubyte: truncated: shape \(4, 5, 5\).*100 data bytes.* 93"):
        fm.read_idx(path)
    header = write(tmp_path / "header", raw[:9], compress)  # 3 dimensions announced, 1 given
    with pytest.raises(fm.IdxError, match=r"header: truncated header \(9 bytes, 16 needed"):
        fm.read_idx(header)
    longer = write(tmp_path / "long", raw + b"\x00", compress)
    with pytest.raises(fm.IdxError, match="long: longer than its header says"):
        fm.read_idx(longer)


def test_read_idx_broken_gzip_and_missing_file(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.ones((50, 50), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(fm.IdxError, match=r"cut.gz: broken or truncated gzip data"):
        fm.read_idx(path)
    with pytest.raises(fm.IdxError, match=r"nothing-here: cannot read the file"):
        fm.read_idx(tmp_path / "nothing-here")


def fake_fashion_mnist(directory: Path, train: int = 6, test: int = 4) -> Path:
    """The four files, tiny: training images gzipped, the others plain (both kinds are accepted)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write(directory / f"{split}-images-idx3-ubyte.gz", idx_bytes(images), compress=True)
        write(directory / f"{split}-labels-idx1-ubyte", idx_bytes(labels), compress=False)
    return directory


def test_load_from_directory(tmp_path: Path) -> None:
    data = fm.load_fashion_mnist(fake_fashion_mnist(tmp_path / "fm"), fallback=())
    assert data.train_images.shape == (6, 1, 28, 28) and data.test_images.shape == (4, 1, 28, 28)
    assert data.train_labels.dtype == torch.int64 and data.test_labels.tolist() == [0, 1, 2, 3]
    assert abs(float(data.train_images.mean())) < 1e-4 and abs(float(data.train_images.std()) - 1) < 1e-3
    assert [len(y) for _, y in data.train_loader(4)] == [4]  # drop_last
    assert [len(y) for _, y in data.test_loader(3)] == [3, 1]
    # torchvision's layout: ROOT/FashionMNIST/raw
    fake_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert fm.load_fashion_mnist(tmp_path / "tv", fallback=()).source == tmp_path / "tv" / "FashionMNIST" / "raw"


def test_load_rejects_mismatched_files(tmp_path: Path) -> None:
    directory = fake_fashion_mnist(tmp_path)
    write(directory / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(3, dtype=np.uint8)), compress=False)
    with pytest.raises(fm.IdxError, match=r"t10k-images-idx3-ubyte.gz and .*t10k-labels-idx1-ubyte: expected"):
        fm.load_fashion_mnist(directory)


def test_data_not_found_messages(tmp_path: Path) -> None:
    missing = tmp_path / "not-installed"
    with pytest.raises(fm.DataNotFoundError) as error:
        fm.load_fashion_mnist(fallback=(missing,))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and str(missing) in message
    assert "train-images-idx3-ubyte[.gz]" in message and "--data DIR" in message
    (tmp_path / "partial").mkdir()
    with pytest.raises(fm.DataNotFoundError, match=r"partial does not hold the four Fashion-MNIST idx files"):
        fm.load_fashion_mnist(tmp_path / "partial")


def test_small_resnet_has_residual_groups() -> None:
    from maskprune.algorithms import L1Norm

    from maskprune import Mask

    model = fm.SmallResNet(widths=(4, 8, 16), blocks=2).eval()
    mask = Mask(model, torch.randn(2, 1, 28, 28), algorithm=L1Norm(), ratio=0.5).make()
    residual = [g for g in mask.groups if len(g.producers()) > 1]
    assert len(mask.groups) == 9 and len(residual) == 3  # one residual stream per stage, two inner widths each
    assert {m.module for m in residual[0].producers()} == {"stem.0", "layer1.0.conv2", "layer1.1.conv2"}


@pytest.mark.parametrize(
    "options",
    [
        [],  # the defaults: FPGM, target_flops=0.5, iterative with the cubic ramp
        ["--algorithm", "taylor", "--schedule", "oneshot", "--semantics", "soft"],
        ["--algorithm", "l1norm", "--schedule", "layer", "--ratio", "0.3"],
    ],
    ids=["fpgm-iterative", "taylor-oneshot-soft", "l1norm-layer-ratio"],
)
def test_main_smoke(tmp_path: Path, options: list[str]) -> None:
    assert fm.find_idx_files(fm.DEBIAN_DIR), "no Fashion-MNIST: scripts/test.sh installs it (scripts/data.sh)"
    tiny = ["--train-subset", "512", "--test-subset", "256", "--batch-size", "32", "--base-epochs", "1"]
    tiny += ["--finetune-steps", "16", "--steps", "4"] if not options else ["--finetune-steps", "24"]
    tiny += ["--cache-dir", str(tmp_path), "--latency-repeats", "2", "--calibration-batches", "2"]
    lines: list[str] = []
    report = job.main(tiny + options, log=lines.append)
    assert report.check.ok and report.check.max_rel <= 1e-5
    assert report.pruned.parameters < report.base.parameters
    groups = report.sparsity.groups
    if "--ratio" in options:  # 30% of every group's channels
        assert all(g.kept == g.channels - int(0.3 * g.channels) for g in groups)
    else:
        assert abs(report.flops_removed - 0.5) <= 0.01
    assert 0 <= report.pruned.accuracy <= 1
    assert "| test accuracy |" in "\n".join(lines)
    if "oneshot" in options:
        assert report.accuracy_after_pruning is not None and report.result.do_mask_calls == 1
        assert 0 <= report.result.accuracy_after_recalibration <= 1
        assert "BatchNorm statistics re-estimated" in "\n".join(lines)
    elif "layer" in options:  # one group per call until the mask is finished
        assert report.result.do_mask_calls == len(groups)
    else:
        assert report.result.do_mask_calls == 4
    assert list(tmp_path.glob("resnet-*-e1-seed0-n512-b32-*.pt"))  # the base model was cached


def test_parse_args_validation(capsys: pytest.CaptureFixture[str]) -> None:
    assert job.parse_args([]).target_flops == 0.5 and job.parse_args([]).steps == 8
    assert job.parse_args(["--ratio", "0.3"]).target_flops is None
    for bad, message in (
        (["--target-flops", "1.5"], "--target-flops must be in (0, 1)"),
        (["--ratio", "0.3", "--target-flops", "0.5"], "not allowed with argument"),
        (["--schedule", "oneshot", "--steps", "4"], "needs --schedule iterative"),
        (["--finetune-steps", "10", "--steps", "8"], "--finetune-steps must be at least 16"),
        (["--algorithm", "l1norm", "--sparsity-steps", "5"], "criterion with regularize() (bnscale)"),
        (["--algorithm", "nope"], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            job.parse_args(bad)
        assert message in capsys.readouterr().err
    assert set(job.ALGORITHMS) >= {"fpgm", "l1norm", "random"}
