"""Python's cyclic garbage collector paused over short bursts of allocation (a trace, an export).

A trace allocates tens of thousands of small objects that all survive it (records, channel spaces, the meta
copy's modules). Each time enough of them pile up, the collector walks every object the process holds, the
user's model and all its tensors included: on DenseNet-121 those walks are a fifth of ``make()``. Paused, it
walks once later, when the burst's objects are already old. Memory is not held back: tensors and most other
objects are freed by reference counting as before; only cycles wait for the collector's next pass.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off inside the block; switched back on after only if it was on before.

    Also usable as a decorator. Meant for blocks that end: a trace, an export, not a user's training loop.

    Examples:
        >>> with collector_paused():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
