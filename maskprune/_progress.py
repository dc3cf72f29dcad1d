"""Progress where work is long: log lines with timings on the ``"maskprune"`` logger, and progress bars.

``make()`` and ``generate_pruned_model()`` (its export and verification) log what they did and how long it took
at INFO, which Python shows only once logging is configured (``logging.basicConfig(level=logging.INFO)``).
Per-item work (calibration batches, the command line's pruning steps) shows a tqdm bar through :func:`progress`:

* while logging is not configured (the root logger has no handler and ``"maskprune"`` no level), a bar shows
  when stderr is a terminal;
* once it is, a bar shows when the ``"maskprune"`` logger is enabled for INFO, and never above:
  ``logging.getLogger("maskprune").setLevel(logging.WARNING)`` silences bars and log lines alike.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

logger = logging.getLogger("maskprune")

Item = TypeVar("Item")


def shows_progress() -> bool:
    """Whether :func:`progress` draws a bar now (see the module's docstring).

    Examples:
        >>> logging.getLogger("maskprune").setLevel(logging.WARNING)
        >>> shows_progress()
        False
        >>> logging.getLogger("maskprune").setLevel(logging.NOTSET)
    """
    configured = logger.level != logging.NOTSET or bool(logging.getLogger().handlers)
    if configured:
        return logger.isEnabledFor(logging.INFO)
    stderr = sys.stderr
    return stderr is not None and hasattr(stderr, "isatty") and stderr.isatty()


def progress(items: Iterable[Item], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[Item]:
    """``items``, with a tqdm progress bar on stderr where :func:`shows_progress` says so (the bar goes away
    when done). For criteria that run long loops (calibration batches).

    Examples:
        >>> sum(progress(range(4), desc="calibration"))
        6
    """
    if not shows_progress():
        yield from items
        return
    from tqdm.auto import tqdm  # imported when a bar is drawn, not by ``import maskprune``

    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False)


class Stopwatch:
    """Seconds since it was made, and since the last :meth:`lap`.

    Examples:
        >>> watch = Stopwatch()
        >>> watch.lap() >= 0 and watch.total() >= 0
        True
    """

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last lap (or since the start)."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self.start
