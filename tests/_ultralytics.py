"""Ultralytics for the tests, without the global state it changes leaking into the rest of the suite.

Importing ``ultralytics`` replaces ``torch.save``, sets torch's and numpy's print options and adds warning
filters; its trainer and validator set torch's thread count and deterministic algorithms. The suite runs
every test module in the same processes, so the import puts all of these back, and
:func:`torch_state_kept` does the same around a test that trains or validates.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update check, no download
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "maskprune-ultralytics"))

_PRINT_OPTIONS = ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")


@contextmanager
def _globals_kept() -> Iterator[None]:
    save, numpy_print = torch.save, np.get_printoptions()
    torch_print = {name: getattr(torch._tensor_str.PRINT_OPTS, name) for name in _PRINT_OPTIONS}
    filters = list(warnings.filters)
    try:
        yield
    finally:
        torch.save = save
        np.set_printoptions(**numpy_print)
        torch.set_printoptions(**torch_print)
        warnings.filters[:] = filters


@contextmanager
def torch_state_kept() -> Iterator[None]:
    """Put back torch's thread count and deterministic-algorithm settings (Ultralytics' trainer sets them)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        with _globals_kept():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


with _globals_kept():
    from ultralytics import RTDETR, YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.modules.block import Attention, C2f

__all__ = ["RTDETR", "YOLO", "DetectionTrainer", "C2f", "Attention", "torch_state_kept"]
