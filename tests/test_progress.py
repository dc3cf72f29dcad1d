"""Progress: make() and the export log their timings at INFO on the "maskprune" logger; bars (calibration, the
command line's steps) show on a terminal while logging is not configured, and follow that logger's level once it
is."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
import torch
from maskprune.algorithms import APoZ
from torch import nn

from maskprune import Mask, progress, shows_progress

LOGGER = logging.getLogger("maskprune")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def level() -> Iterator[None]:
    """The "maskprune" logger's level is put back after the test."""
    old = LOGGER.level
    yield
    LOGGER.setLevel(old)


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), torch.randn(2, 3, 8, 8)


def test_make_and_the_export_log_what_they_did_and_how_long_it_took(caplog: pytest.LogCaptureFixture) -> None:
    model, x = _model()
    with caplog.at_level(logging.INFO, logger="maskprune"):
        mask = Mask(model, x).make()
        mask.groups[0].prune([0, 1])
        mask.generate_pruned_model()
    messages = [r.getMessage() for r in caplog.records if r.name == "maskprune"]
    assert len(messages) == 3, messages
    make, verified, exported = messages
    assert make.startswith("make(): traced Sequential in ") and "(3 module calls), then 1 groups of 8 channels" in make
    assert verified.startswith("generate_pruned_model(): verified against the masked model: equal: max |soft - hard|")
    assert exported.startswith("generate_pruned_model(): exported a sliced copy and verified in ")
    seconds = float(exported.rsplit(" in ", 1)[1].removesuffix(" s"))
    assert 0 <= seconds < 60


def test_a_level_above_info_silences_log_lines_and_bars(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, level: None
) -> None:
    model, x = _model()
    LOGGER.setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="maskprune"):
        mask = Mask(model, x, algorithm=APoZ([x, x]), ratio=0.5).make()
        mask.do_mask()
        mask.generate_pruned_model()
    assert not [r for r in caplog.records if r.name == "maskprune"]
    assert not shows_progress()
    assert capsys.readouterr().err == ""


def test_calibration_shows_a_bar_when_the_logger_is_at_info(capsys: pytest.CaptureFixture, level: None) -> None:
    model, x = _model()
    LOGGER.setLevel(logging.INFO)
    mask = Mask(model, x, algorithm=APoZ([x, x, x]), ratio=0.5).make()
    mask.do_mask()
    err = capsys.readouterr().err
    assert "APoZ:" in err and "/3 " in err, err


def test_without_logging_configured_a_bar_shows_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, level: None
) -> None:
    LOGGER.setLevel(logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not shows_progress()
    assert list(progress(range(3), desc="steps")) == [0, 1, 2]
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert shows_progress()
    assert list(progress(range(3), desc="steps", unit="step")) == [0, 1, 2]
    assert "steps:" in terminal.getvalue() and "/3 " in terminal.getvalue()  # the bar, cleared when done
