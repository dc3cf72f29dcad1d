"""Fashion-MNIST for the pruning examples: idx files, a small ResNet, training, accuracy, CPU latency.

The data are the standard idx files (60,000 training and 10,000 test images, 28x28, 10 classes),
as the Debian package ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``)
and as torchvision's ``FashionMNIST`` downloads them. Nothing is downloaded here.

Example:
    >>> data = load_fashion_mnist()                                             # doctest: +SKIP
    >>> model, info = base_model(data, epochs=4, seed=0)   # trained once, then read from .cache/
    >>> evaluate(model, data.test_loader())                                     # doctest: +SKIP
    0.921
"""

from __future__ import annotations

import copy
import gzip
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from maskprune import model_device, recalibrate_bn, summary

#: Where ``apt-get install dataset-fashion-mnist`` puts the idx files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four standard files (each may also be gzipped, with ``.gz`` appended).
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: Base checkpoints are cached here, one file per architecture, epochs, seed and training-set size.
CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "fashion_mnist"
#: Bumped whenever :func:`train`'s recipe changes, so that stale checkpoints are not reused.
RECIPE = "sgd-onecycle-v1"

# idx type code -> numpy dtype (big-endian, as the format stores it)
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(ValueError):
    """An idx file that cannot be read; the message names the file and what is wrong with it."""


class DataNotFoundError(FileNotFoundError):
    """The Fashion-MNIST idx files are in none of the places searched."""


# ---- idx files -------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzipped or plain, recognised by its first bytes) into a numpy array.

    The header is checked: two zero bytes, a known type code, the number of dimensions,
    and a payload of exactly the announced size. Any problem raises :class:`IdxError`
    naming the file.

    Example:
        >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape, images.dtype                                                        # doctest: +SKIP
        ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise IdxError(f"{path}: cannot read the file ({error.strerror or error})") from error
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise IdxError(f"{path}: broken or truncated gzip data ({error})") from error
    if len(raw) < 4:
        raise IdxError(f"{path}: {len(raw)} bytes, too short for an idx header (4 bytes at least)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES:
        raise IdxError(
            f"{path}: bad magic number 0x{raw[:4].hex()} (an idx file starts with 0x0000, a type code "
            f"among {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)} and the number of dimensions); not an idx file?"
        )
    if ndim == 0:
        raise IdxError(f"{path}: the header announces 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated header ({len(raw)} bytes, {header} needed for {ndim} dimensions)")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise IdxError(
            f"{path}: {what}: shape {shape} of {dtype.name} needs {expected:,} data bytes, the file has {actual:,}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an idx file (gzipped when ``compress``, by default when the name ends in ``.gz``).

    Example:
        >>> write_idx(tmp / "labels-idx1-ubyte.gz", np.arange(3, dtype=np.uint8))   # doctest: +SKIP
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype: code for code, dtype in _IDX_DTYPES.items()}
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in codes:
        raise ValueError(f"idx files cannot hold {array.dtype}; use one of {sorted(str(d) for d in codes)}")
    header = bytes([0, 0, codes[big], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(big).tobytes()
    compress = path.name.endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def find_idx_files(directory: str | os.PathLike) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``directory`` (plain or ``.gz``; also under ``FashionMNIST/raw``,
    torchvision's layout), or None when any is missing.

    Example:
        >>> sorted(find_idx_files("/usr/share/datasets/fashion-mnist"))          # doctest: +SKIP
        ['test_images', 'test_labels', 'train_images', 'train_labels']
    """
    directory = Path(directory)
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        found = {}
        for key, name in FILES.items():
            path = next((folder / n for n in (name, name + ".gz") if (folder / n).is_file()), None)
            if path is not None:
                found[key] = path
        if len(found) == len(FILES):
            return found
    return None


def locate(root: str | os.PathLike | None = None, fallback: Sequence[Path] = (DEBIAN_DIR,)) -> dict[str, Path]:
    """The four files: in ``root`` if given, else in the first ``fallback`` directory that holds them.

    Raises :class:`DataNotFoundError` saying where it looked and how to get the data.

    Example:
        >>> locate()["test_labels"]                                              # doctest: +SKIP
        PosixPath('/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz')
    """
    names = ", ".join(f"{n}[.gz]" for n in FILES.values())
    if root is not None:
        found = find_idx_files(root)
        if found is None:
            raise DataNotFoundError(
                f"{root} does not hold the four Fashion-MNIST idx files ({names}); pass a directory "
                f"that does, or leave the directory out to use {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)"
            )
        return found
    for directory in fallback:
        found = find_idx_files(directory)
        if found is not None:
            return found
    searched = ", ".join(str(d) for d in fallback) or "nowhere"
    raise DataNotFoundError(
        f"Fashion-MNIST not found (looked in {searched} for {names}). Install it with "
        f"`sudo apt-get install dataset-fashion-mnist`, or pass a directory holding the four files "
        f"(e.g. --data DIR, or load_fashion_mnist(root=DIR))"
    )


# ---- the data set ----------------------------------------------------------------------------------
@dataclass
class FashionMNIST:
    """Normalised images ``(N, 1, 28, 28)`` float32 and labels ``(N,)`` int64, with loaders.

    ``mean`` and ``std`` are the training pixels' statistics (in [0, 1] units), used for both splits.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float
    std: float
    source: Path

    def subset(self, train: int | None = None, test: int | None = None) -> FashionMNIST:
        """The first ``train`` training and ``test`` test examples (all when None), e.g. for smoke tests.

        Example:
            >>> small = data.subset(train=512, test=256)                             # doctest: +SKIP
        """
        return FashionMNIST(
            self.train_images[:train],
            self.train_labels[:train],
            self.test_images[:test],
            self.test_labels[:test],
            self.mean,
            self.std,
            self.source,
        )

    def train_loader(self, batch_size: int = 128, *, seed: int = 0, drop_last: bool = True) -> DataLoader:
        """Shuffled training batches ``(images, labels)``, in an order fixed by ``seed``."""
        return make_loader(
            self.train_images, self.train_labels, batch_size, shuffle=True, seed=seed, drop_last=drop_last
        )

    def test_loader(self, batch_size: int = 500) -> DataLoader:
        """The test set in order, in batches of ``batch_size``."""
        return make_loader(self.test_images, self.test_labels, batch_size)

    def calibration_loader(self, batches: int = 8, batch_size: int = 64, *, seed: int = 0) -> DataLoader:
        """A few fixed, seeded training batches (for criteria that look at activations: APoZ, ThiNet)."""
        count = min(batches * batch_size, len(self.train_labels))
        index = torch.randperm(len(self.train_labels), generator=torch.Generator().manual_seed(seed))[:count]
        return make_loader(self.train_images[index], self.train_labels[index], batch_size)

    def __repr__(self) -> str:
        return (
            f"FashionMNIST({len(self.train_labels):,} train, {len(self.test_labels):,} test, "
            f"mean={self.mean:.4f}, std={self.std:.4f}, from {self.source})"
        )


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of ``(images, labels)`` batches cut from in-memory tensors (whole batches at once, fast).

    Example:
        >>> loader = make_loader(torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long), 4)
        >>> [len(y) for _, y in loader]
        [4, 4, 2]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dataset = TensorDataset(images, labels)
    order = (
        RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(dataset)
    )
    # batch_size=None: the sampler yields lists of indices and TensorDataset slices whole batches
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last))


def load_fashion_mnist(
    root: str | os.PathLike | None = None, *, fallback: Sequence[Path] = (DEBIAN_DIR,)
) -> FashionMNIST:
    """Fashion-MNIST from ``root`` (a directory with the four idx files), else from ``/usr/share/datasets``.

    Images are scaled to [0, 1] and normalised with the training set's mean and std. Raises
    :class:`DataNotFoundError` (how to install the data) or :class:`IdxError` (which file is broken).

    Example:
        >>> data = load_fashion_mnist()                                          # doctest: +SKIP
        >>> data.train_images.shape, data.test_labels[:5].tolist()               # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), [9, 2, 1, 1, 6])
    """
    files = locate(root, fallback)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise IdxError(
                f"{files[f'{split}_images']} and {files[f'{split}_labels']}: expected images (N, H, W) and N labels, "
                f"got shapes {images.shape} and {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise IdxError(f"{files[f'{split}_labels']}: labels outside 0..{len(CLASSES) - 1}")
    train = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0)
    mean, std = float(train.mean()), float(train.std())

    def images(key: str) -> torch.Tensor:
        return ((torch.from_numpy(arrays[key].astype(np.float32) / 255.0) - mean) / std).unsqueeze(1)

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(arrays[key].astype(np.int64))

    return FashionMNIST(
        images("train_images"),
        labels("train_labels"),
        images("test_images"),
        labels("test_labels"),
        mean,
        std,
        files["train_images"].parent,
    )


# ---- the model -------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; a 1x1 conv-BN shortcut when the shape changes.

    The ReLUs are modules (not ``F.relu``) so that activation criteria such as APoZ can watch them.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for 1x28x28 images: a 3x3 stem, three stages of BasicBlocks, pooling, a linear head.

    The stem has stride ``stem_stride`` (2 by default: stages at 14x14, 7x7 and 4x4, which keeps training
    on two CPU cores to seconds per thousand images). Each stage's blocks share one residual stream,
    so the pruning engine groups the stem (or the downsample shortcut) with every block's last conv.

    Example:
        >>> model = SmallResNet()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in model.parameters())
        272790
    """

    def __init__(
        self,
        widths: Sequence[int] = (20, 40, 80),
        blocks: int = 2,
        *,
        stem_stride: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.widths, self.blocks, self.stem_stride = tuple(widths), blocks, stem_stride
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, channels = [], widths[0]
        for index, width in enumerate(widths):
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(channels, width, 2 if index > 0 and block == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def arch(self) -> str:
        """A short name of the architecture, e.g. ``resnet-20.40.80x2-s2`` (part of the checkpoint key)."""
        return f"resnet-{'.'.join(map(str, self.widths))}x{self.blocks}-s{self.stem_stride}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- training and measurement ----------------------------------------------------------------------
def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int = 1,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    flip: bool = True,
    log: Callable[[str], None] | None = print,
) -> None:
    """Train with SGD (Nesterov momentum) and a one-cycle learning rate over ``epochs`` passes of ``loader``.

    Batches go to the model's device. ``flip`` mirrors a random half of each batch left-right
    (clothes stay clothes).

    Example:
        >>> train(model, data.train_loader(), epochs=4)                          # doctest: +SKIP
    """
    steps = epochs * len(loader)
    if steps < 1:
        raise ValueError(f"nothing to train on: {epochs} epoch(s) of {len(loader)} batches")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = None  # one cycle: warm up over a quarter of the steps (at least 2), anneal over the rest
    if steps >= 3:
        warmup = max(0.25, 2 / steps)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warmup)
    model.train()
    device = model_device(model)
    start, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
    for epoch in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if flip:
                images = random_flip(images)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            loss_sum += loss.detach() * len(labels)  # summed on the device: no host synchronisation per step
            seen += len(labels)
        if log is not None:
            mean = float(loss_sum) / seen
            log(f"  epoch {epoch + 1}/{epochs}: train loss {mean:.4f} ({time.perf_counter() - start:.0f} s)")
        loss_sum.zero_()
        seen = 0


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the batch left-right (uses torch's global random state)."""
    flip = torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode over ``loader``, on the model's device.

    The mode is restored.

    Example:
        >>> evaluate(model, data.test_loader())                                  # doctest: +SKIP
        0.9213
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    try:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            correct += (model(images).argmax(1) == labels).sum()
            total += len(labels)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate() got an empty loader")
    return int(correct) / total


@torch.no_grad()
def recalibrated_accuracy(model: nn.Module, data: FashionMNIST, batches: int = 20, *, seed: int = 0) -> float:
    """Test accuracy after re-estimating the BatchNorm statistics on ``batches`` training batches.

    Pruning changes what every BatchNorm sees; its running statistics are then stale. Forward
    passes in train mode (no gradient, no weight change) re-estimate them, as "adaptive BN"
    evaluations of pruning criteria do. The model's statistics and mode are restored after.

    Example:
        >>> recalibrated_accuracy(masked_model, data)                           # doctest: +SKIP
        0.7812
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers()} for m in norms]
    try:
        recalibrate_bn(model, data.train_loader(128, seed=seed), batches=batches)
        return evaluate(model, data.test_loader())
    finally:
        for norm, buffers in zip(norms, saved, strict=True):
            for name, value in buffers.items():
                getattr(norm, name).copy_(value)


def measure_latency(model: nn.Module, batch_size: int = 1, *, repeats: int = 30, warmup: int = 5) -> float:
    """Median seconds of one forward pass in eval mode on ``batch_size`` 1x28x28 images, after ``warmup`` passes.

    Measured on the CPU (a CPU copy of a model on another device), on the threads torch is set to use
    (``torch.set_num_threads``), by :func:`maskprune.summary.measure_latency`. The mode is restored.

    Example:
        >>> seconds = measure_latency(model, batch_size=64)                      # doctest: +SKIP
    """
    if model_device(model).type != "cpu":
        model = copy.deepcopy(model).cpu()
    return summary.measure_latency(model, torch.randn(batch_size, 1, 28, 28), repeats=repeats, warmup=warmup)


def checkpoint_path(
    model: SmallResNet, epochs: int, seed: int, train_size: int, batch_size: int, cache_dir: Path = CACHE_DIR
) -> Path:
    """Where :func:`base_model` caches a trained model: one file per architecture, epochs, seed, data, batch size."""
    return Path(cache_dir) / f"{model.arch}-e{epochs}-seed{seed}-n{train_size}-b{batch_size}-{RECIPE}.pt"


def base_model(
    data: FashionMNIST,
    *,
    epochs: int = 4,
    seed: int = 0,
    batch_size: int = 128,
    cache_dir: str | os.PathLike | None = CACHE_DIR,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = print,
    **model_options: object,
) -> tuple[SmallResNet, dict[str, float | str]]:
    """A trained :class:`SmallResNet` on ``device``: read from ``cache_dir`` when this exact one was trained before.

    Returns the model (eval mode) and ``{"test_accuracy", "train_seconds", "path"}``. The cache
    holds a plain CPU state dict (``torch.load(weights_only=True)``-safe), whichever device trained it;
    ``cache_dir=None`` disables it.

    Example:
        >>> model, info = base_model(load_fashion_mnist(), epochs=4, seed=0)     # doctest: +SKIP
        >>> info["test_accuracy"]                                                # doctest: +SKIP
        0.9213
    """
    torch.manual_seed(seed)
    model = SmallResNet(**model_options)
    path = checkpoint_path(model, epochs, seed, len(data.train_labels), batch_size, Path(cache_dir or "."))
    if cache_dir is not None and path.is_file():
        saved = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        model.to(device)
        if log is not None:
            log(f"base model: {path.name} from the cache (test accuracy {saved['test_accuracy']:.2%})")
        return model.eval(), {"test_accuracy": saved["test_accuracy"], "train_seconds": 0.0, "path": str(path)}
    if log is not None:
        log(f"base model: training {model.arch} for {epochs} epoch(s), seed {seed} ({describe(model)})")
    start = time.perf_counter()
    model.to(device)
    train(model, data.train_loader(batch_size, seed=seed), epochs=epochs, log=log)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, data.test_loader())
    if log is not None:
        log(f"base model: test accuracy {accuracy:.2%} after {seconds:.0f} s")
    if cache_dir is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        state = {key: value.cpu() for key, value in model.state_dict().items()}
        torch.save({"state_dict": state, "test_accuracy": accuracy}, partial)
        os.replace(partial, path)  # atomic: a concurrent run never reads half a file
    return model.eval(), {"test_accuracy": accuracy, "train_seconds": seconds, "path": str(path)}


def describe(model: nn.Module) -> str:
    """``"272,778 parameters"``."""
    return f"{sum(p.numel() for p in model.parameters()):,} parameters"


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads in torch (None: leave torch's default); returns the number in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


if __name__ == "__main__":  # python examples/fashion_mnist.py [DIR]: train (or load) the base model
    fashion = load_fashion_mnist(sys.argv[1] if len(sys.argv) > 1 else None)
    print(fashion)
    net, _ = base_model(fashion)
    print(f"latency batch 1: {measure_latency(net) * 1e3:.2f} ms, batch 64: {measure_latency(net, 64) * 1e3:.2f} ms")
