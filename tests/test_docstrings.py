"""Every example in the docstrings of ``maskprune`` and ``maskprune.algorithms`` runs and prints what it shows.

The modules are imported under their installed names (``maskprune.algorithms``, never a top-level
``algorithms``), and each docstring runs in its module's globals plus the imports below, in a fresh
folder (examples that save files write there).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import maskprune.algorithms
import numpy as np
import pytest
import torch
import torchvision
from maskprune.algorithms import L1Norm
from torch import nn

import maskprune
from maskprune import Mask

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    names = []
    for package in (maskprune, maskprune.algorithms):
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(n for n in set(names) if n != "maskprune.__main__")


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    return [t for t in tests if t.examples and Path(t.filename or "").resolve().is_relative_to(_ROOT)]


_ROOT = Path(maskprune.__file__).resolve().parents[1]
WITH_EXAMPLES = [name for name in _modules() if _examples(name)]


def test_the_public_modules_have_examples() -> None:
    assert {"maskprune.mask", "maskprune.serialization", "maskprune.algorithms.norms"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    shared = {"np": np, "torch": torch, "nn": nn, "torchvision": torchvision, "maskprune": maskprune}
    shared |= {"Mask": Mask, "L1Norm": L1Norm}
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    for test in _examples(name):
        test.globs = {**test.globs, **shared}
        runner.run(test, out=report.append, clear_globs=True)
    assert runner.failures == 0, "".join(report)
