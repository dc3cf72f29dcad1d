"""Tensor values the traced forward reads into Python: the branches they decide, and values that leave torch.

A trace runs one forward, so it sees one branch of every ``if`` on a tensor's value. Each such decision on a
value that is not a constant is recorded as a :class:`~maskprune._records.ControlFlowSite`: the truth of a
tensor (``if x.mean() > 0:``, ``while``, ``and``), ``equal``, ``allclose``, ``is_nonzero``, ``item()`` of a
boolean, and a comparison or truth test of a number ``item()`` read (followed through arithmetic on it). A value
that only feeds a size or an index (``torch.zeros(int(n))``, ``x[:, : n.item()]``) decides no branch and is not
recorded; nor is a comparison of ``float(t)`` or ``int(t)``, whose result Python requires to be a plain number.

Values that leave torch (``numpy()``, ``tolist()``, ``__array__``, ``__dlpack__``, a ``data_ptr()`` or storage
handed to a kernel) may come back as a tensor the trace cannot relate to them: the channels of the tensor read
are frozen. So are the inputs and outputs of an ``autograd.Function`` whose output no traced op made (its forward
computes outside torch, in NumPy or an extension).
"""

from __future__ import annotations

import linecache
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ._records import ControlFlowSite, iter_tensors

if TYPE_CHECKING:
    from ._trace import Tracer

DECIDING = frozenset({"bool", "is_nonzero", "equal", "allclose"})  # their Python bool decides a branch
LEAVING = frozenset({"numpy", "tolist", "array", "dlpack", "data_ptr", "untyped_storage", "storage"})
VALUE_READS = DECIDING | LEAVING | {"item"}
_LABELS = {"bool": "__bool__", "item": "item()"}

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_ENGINE_DIR = os.path.dirname(__file__) + os.sep
_TESTING_DIR = os.path.join(_ENGINE_DIR, "testing") + os.sep  # its models are a user's code
_BOOKKEEPING = {os.path.join(_ENGINE_DIR, name) for name in ("_reads.py", "_trace.py")}  # what records a read


def value_read(tracer: Tracer, name: str, args: tuple, out: Any) -> Any:
    """Record one read of tensor values into Python (``name`` in :data:`VALUE_READS`); returns ``out``, or the
    number ``item()`` read wrapped so that a branch it decides is recorded."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in LEAVING:
        leaves_torch(tracer, name, tensors[:1])
        return out
    if all(tracer.is_constant(t) for t in tensors):
        return out  # the same branch for every input
    path = tracer.path()
    if name in DECIDING or isinstance(out, bool):
        decided(tracer, path, _LABELS.get(name, name))
    elif type(out) in _FOLLOWED:
        return follow(out, _Decider(tracer, path))
    return out


def leaves_torch(tracer: Tracer, name: str, tensors: list[torch.Tensor]) -> None:
    """``tensors``' values leave torch by ``name``: freeze their channels. A constant's carry none (what comes back
    as a tensor gets new spaces, frozen: those the trace did not see made)."""
    inside = f" (autograd.Function `{tracer.functions[-1]}`)" if tracer.functions else ""
    reason = f"`{name}` in {tracer.path()}{inside}: its values leave torch, and what comes back does not carry channels"
    for t in tensors:
        node = tracer.known(t)
        for space in node.spaces if node is not None and not node.constant else ():
            tracer.graph.freeze(space, reason)


def decided(tracer: Tracer, path: str, op: str) -> None:
    """Python control flow was decided by a value ``op`` read in module ``path``: record the line, once.

    The line is the innermost frame of the model's code; a check inside torch (``torch._assert``, an argument
    check) or inside maskprune's own rules decides no branch of the model, and is not recorded.
    """
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in _BOOKKEEPING:
        frame = frame.f_back
    if frame is None or _internal(frame.f_code.co_filename):
        return
    filename, line = frame.f_code.co_filename, frame.f_lineno
    key = (path, op, filename, line)
    if key not in tracer.control_flow:  # a loop decides at one line many times: the first is recorded
        location = f"{_short(filename)}:{line}"
        tracer.control_flow[key] = ControlFlowSite(path, op, location, linecache.getline(filename, line).strip())


def _internal(filename: str) -> bool:
    """Whether ``filename`` is torch's or maskprune's engine's (its bundled test models are a user's code)."""
    return filename.startswith(_TORCH_DIR) or (
        filename.startswith(_ENGINE_DIR) and not filename.startswith(_TESTING_DIR)
    )


def _short(filename: str) -> str:
    """``filename`` relative to the ``sys.path`` entry holding it (``torchvision/ops/boxes.py``), else its name."""
    for root in sorted((p for p in sys.path if p), key=len, reverse=True):
        root = os.path.join(os.path.abspath(root), "")
        if filename.startswith(root):
            return filename[len(root) :]
    return os.path.basename(filename)


# ---- numbers read by item() ----------------------------------------------------------------------
class _Decider:
    """Records a branch decided by a number ``item()`` read in ``path`` (for as long as the tracer lives)."""

    __slots__ = ("path", "tracer")

    def __init__(self, tracer: Tracer, path: str) -> None:
        self.tracer = weakref.ref(tracer)
        self.path = path

    def __call__(self) -> None:
        tracer = self.tracer()
        if tracer is not None:
            decided(tracer, self.path, "item()")


_COMPARISONS = ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__")
_ARITHMETIC = (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__",
)  # fmt: skip


def _comparison(base: type, name: str) -> Callable:
    method = getattr(base, name)

    def compare(self: Any, other: Any) -> Any:
        result = method(self, other)
        if result is not NotImplemented:
            self._decide()
        return result

    return compare


def _arithmetic(base: type, name: str) -> Callable:
    method = getattr(base, name)

    def compute(self: Any, *other: Any) -> Any:
        result = method(self, *other)
        if result is NotImplemented and base is int and other and type(other[0]) is float:
            result = getattr(float, name)(float(self), *other)  # int + float: float's, not a plain float's
        return follow(result, self._decide) if type(result) in _FOLLOWED else result

    return compute


def _followed_type(base: type) -> type:
    """A ``base`` (int or float) that calls its ``_decide`` when compared or tested for truth; arithmetic on it
    gives another."""

    def truth(self: Any) -> bool:
        self._decide()
        return base.__bool__(self)

    namespace: dict[str, Any] = {
        "__doc__": f"A {base.__name__} that ``item()`` read in a trace: a branch on it is recorded.",
        "__hash__": base.__hash__,
        "__bool__": truth,
        "__reduce__": lambda self: (base, (base(self),)),  # copied or pickled: a plain number
    }
    namespace.update({name: _comparison(base, name) for name in _COMPARISONS})
    namespace.update({name: _arithmetic(base, name) for name in _ARITHMETIC})
    return type(f"Read{base.__name__.capitalize()}", (base, ReadNumber), namespace)


class ReadNumber:
    """What every number ``item()`` read during a trace is, besides an ``int`` or a ``float`` (see :func:`follow`)."""


_FOLLOWED = {int: _followed_type(int), float: _followed_type(float)}


def holds_read_number(values: tuple | list) -> bool:
    """Whether ``values`` (a call's arguments, and lists or tuples in them) hold a number ``item()`` read: a tensor
    made from it (``torch.tensor(n.item())``) is no constant.

    Examples:
        >>> holds_read_number((3, [0.5, follow(2.0, print)])), holds_read_number(([1, 2], 3.0))
        (True, False)
    """
    return any(isinstance(v, ReadNumber) or (type(v) in (list, tuple) and holds_read_number(v)) for v in values)


def follow(value: int | float, decide: Callable[[], None]) -> Any:
    """``value`` as a number that calls ``decide()`` when a branch depends on it.

    Examples:
        >>> seen = []
        >>> v = follow(0.5, lambda: seen.append(1))
        >>> w = 2 * v - 1  # still followed
        >>> (w > 0, v + 1, len(seen))
        (False, 1.5, 1)
    """
    number = _FOLLOWED[type(value)](value)
    number._decide = decide
    return number


# ---- autograd.Function ---------------------------------------------------------------------------
@contextmanager
def watched_functions(tracer: Tracer, quiet: Callable[[], Any]) -> Iterator[None]:
    """Inside the block, the forward of every ``autograd.Function`` outside torch that runs in this thread is
    checked: when the trace does not know one of its outputs (no traced op made it), its inputs' and outputs'
    channels are frozen.

    Each such class's ``forward`` is wrapped for the block (torch looks it up at every ``apply``, also through
    an alias such as ``swish = Swish.apply``). ``quiet()``: a context in which the check reads shapes untraced.
    """
    thread = threading.get_ident()

    def watched(cls: type, forward: Callable) -> staticmethod:
        def run(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != thread or tracer.leaf_depth:
                return forward(*args, **kwargs)
            tracer.functions.append(cls.__name__)
            try:
                out = forward(*args, **kwargs)
            finally:
                tracer.functions.pop()
            with quiet():
                _check_function(tracer, cls.__name__, (args, kwargs), out)
            return out

        return staticmethod(run)

    with _WRAPPING:  # traces in two threads would restore each other's wrappers
        originals = {cls: cls.__dict__["forward"] for cls in _function_classes()}
        try:
            for cls, original in originals.items():
                cls.forward = watched(cls, original.__func__)
            yield
        finally:
            for cls, original in originals.items():
                cls.forward = original


_WRAPPING = threading.RLock()


def _function_classes() -> list[type]:
    """The subclasses of ``torch.autograd.Function`` defined outside torch with a static ``forward`` of their own."""
    found: dict[type, None] = {}
    todo = [torch.autograd.Function]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found[sub] = None
                todo.append(sub)
    return [
        cls
        for cls in found
        if not cls.__module__.startswith("torch.") and isinstance(cls.__dict__.get("forward"), staticmethod)
    ]


def _check_function(tracer: Tracer, name: str, inputs: Any, out: Any) -> None:
    unseen = [t for t in iter_tensors(out) if tracer.known(t) is None]
    if not unseen:
        return  # its forward ran traced torch ops: the trace saw through it
    reason = f"autograd.Function `{name}` in {tracer.path()}: its output is not made by a traced torch op"
    for t in iter_tensors(inputs):
        node = tracer.known(t)
        for space in node.spaces if node is not None else ():
            tracer.graph.freeze(space, reason)
    for t in unseen:
        tracer.fresh(t, reason)


def control_flow_message(sites: list[ControlFlowSite], strict: bool, limit: int = 3) -> str:
    """What ``make()`` says about the branches a trace took by tensor values (``strict``: as it refuses them)."""
    shown = "; ".join(map(str, sites[:limit])) + (f" (+{len(sites) - limit} more)" if len(sites) > limit else "")
    advice = (
        "Without strict=True, make() warns instead; then verify the export on inputs that take the other branches"
        if strict
        else "Verify the export on inputs that take the other branches"
    )
    return (
        f"the forward decides Python control flow by tensor values, so the trace saw only the branches the example "
        f"inputs take: {shown}. Channels that another branch uses otherwise may be pruned wrongly. {advice}: "
        "mask.generate_pruned_model(verify_inputs=[batch, ...])"
        + ("" if strict else "; Mask(..., strict=True) refuses such a model")
    )
