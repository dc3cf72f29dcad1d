"""Latency by ``torch.utils.benchmark``: threads as asked, models timed in turns, a median and its spread."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskprune.summary import Latency, compare, time_forward


class Recorder(nn.Module):
    """Logs each call with the threads torch runs on and whether gradients are recorded."""

    def __init__(self, name: str, log: list[tuple[str, int, bool, bool]]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, torch.get_num_threads(), torch.is_grad_enabled(), self.training))
        return self.linear(x)


def test_models_are_timed_in_turns_on_the_threads_asked_in_eval_mode_without_gradients() -> None:
    log: list[tuple[str, int, bool, bool]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    threads = torch.get_num_threads()
    latencies = time_forward([a.train(), b], torch.randn(1, 4), threads=2, min_run_time=0.02)
    assert [latency.threads for latency in latencies] == [2, 2] and all(lat.blocks >= 5 for lat in latencies)
    assert all(lat.median > 0 and lat.iqr >= 0 for lat in latencies)
    assert {(threads_seen, grad, training) for _, threads_seen, grad, training in log} == {(2, False, False)}
    names = [name for name, *_ in log]
    last_a, first_b = len(names) - 1 - names[::-1].index("a"), names.index("b")
    assert first_b < last_a  # b's warm-up and blocks come before a's last block: turns, not one after the other
    assert a.training and torch.get_num_threads() == threads  # the mode and the threads are put back


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threads": 0}, "threads must be a positive integer, got 0"),
        ({"threads": True}, "threads must be a positive integer, got True"),
        ({"min_run_time": 0.0}, "min_run_time must be a positive number of seconds, got 0.0"),
    ],
)
def test_bad_timing_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        time_forward(nn.Linear(2, 2), torch.randn(1, 2), **options)


def test_the_comparison_shows_the_spread_and_says_when_it_is_noisy() -> None:
    comparison = compare(nn.Linear(8, 8), nn.Linear(8, 4), torch.randn(1, 8), min_run_time=0.01)
    comparison.latency = (Latency(0.010, 0.0005, 40, 1), Latency(0.005, 0.002, 80, 1))
    text = str(comparison)
    assert "| latency (ms)       |         10.000 |          5.000 |        0.500 |" in text
    assert "| latency IQR (ms)   |          0.500 |          2.000 |              |" in text
    assert "interquartile range of 40 and 80 timed blocks (torch.utils.benchmark, 1 thread)" in text
    assert "latency is noisy here (an interquartile range over 10% of the median)" in text  # 2.0 of 5.0
    comparison.latency = (Latency(0.010, 0.0005, 40, 4), Latency(0.005, 0.0004, 80, 4))
    assert "noisy" not in str(comparison) and "4 threads" in str(comparison)
