"""What a trace records, and the helpers that call a model: below the tracer and the rules.

The tracer (:mod:`maskprune._trace`) and the op rules (:mod:`maskprune._rules`) build these records;
the layout, the export, the probes and the criteria read them. This module imports neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._graph import ChannelGraph
from ._walk import ModelIndex, OwnedTensor, module_table, restore_training, set_mode, tensors_of, training_flags

MODEL_INPUT = "model input"
MODEL_OUTPUT = "model output"


@dataclass
class TensorNode:
    """A traced tensor: one channel space per dimension.

    ``tainted``: derived from a masked parameter, so its removed channels may be
    zero in the masked model (where the original had other values).
    ``constant``: computed from constants only (tensor factories that draw no random numbers, and ops on
    their results): its values are the same whatever the inputs and the weights.
    """

    spaces: tuple[int, ...]
    shape: tuple[int, ...]
    tainted: bool = True
    constant: bool = False


@dataclass
class LayerNormSite:
    """A module whose output is a layer norm over a channel space (masked statistics needed)."""

    kind: str  # "layer_norm", "rms_norm" (torch's ops), "rms_scale" (a model's own RMS norm module) or "std_conv"
    # (a weight-standardised conv, its input channels in ``space``: see maskprune._rules.standardised)
    module: nn.Module
    path: str
    space: int
    in_dim: int
    eps: float


HEADS, WIDTH, LAYER = "heads", "width", "layer"


@dataclass(frozen=True)
class SizeSite:
    """A size the model's code may hold in an attribute: ``value`` counted the channels of ``space`` in ``path``.

    A reshape into attention heads (``view(B, N, self.num_heads, self.head_dim)``) or a split by a
    width (``split(self.split_size)``) records one; an export that changes the count updates the
    module's attributes of that name and value (see :mod:`maskprune._attributes`). A module's size
    attribute (``in_chs``, ``dim`` …) that equals a dimension of its inputs or outputs records one
    naming that ``attribute``: only it is updated.
    """

    path: str
    value: int
    space: int
    kind: str = WIDTH  # HEADS: a count of heads; WIDTH: a count of channels; LAYER: a tensorless norm layer's width
    written: bool = True  # False: implied, not written (``flatten(1)``, ``view(B, -1)`` merging channels)
    attribute: str | None = None  # the one attribute holding the size (a module's ``in_chs`` …), else any that holds it


class TracedSize(int):
    """An ``int`` read from a tensor's shape during the trace, that remembers the channel space it measured.

    ``torch.zeros(len(rois), maps.shape[1])`` then shares ``maps``' channels in its second
    dimension (a plain int could not say where it came from). Arithmetic gives plain ints.

    Examples:
        >>> n = TracedSize.of(17, space=4); (n, n.space, type(n + 1).__name__)
        (17, 4, 'int')
    """

    space: int

    @classmethod
    def of(cls, value: int, space: int) -> TracedSize:
        size = cls(value)
        size.space = space
        return size


@dataclass(frozen=True)
class ControlFlowSite:
    """Where the forward decided Python control flow by a tensor's value: the trace saw one branch.

    ``op`` read the value (``__bool__`` of an ``if tensor:``, a comparison of an ``item()``, ``equal``);
    ``path`` is the running module (``""`` for the root); ``location`` (``file.py:14``) and ``code`` the
    line of the model's code that decided.
    """

    path: str
    op: str
    location: str
    code: str = ""

    def __str__(self) -> str:
        where = f" at {self.location}" if self.location else ""
        code = f" (`{self.code}`)" if self.code else ""
        return f"`{self.op}` in {self.path or '<root>'}{where}{code}"


@dataclass
class LeafCall:
    """One call of a leaf module during the first trace pass: its input and output tensors' channel spaces."""

    path: str
    module: nn.Module
    call: int  # 0 for the module's first call in a forward, 1 for its second, ...
    inputs: list[TensorNode]
    outputs: list[TensorNode]


@dataclass
class Trace:
    """What running the model taught us."""

    graph: ChannelGraph
    owned: dict[int, OwnedTensor]
    param_nodes: dict[int, TensorNode]
    roles: dict[tuple[int, int], str]
    module_outputs: dict[str, list[TensorNode]]
    layer_norms: list[LayerNormSite]
    unknown_ops: dict[tuple[str, str], int]
    unreached: list[str]
    modes: list[bool]
    size_reads: set[int]
    leaf_calls: list[LeafCall] = field(default_factory=list)
    size_sites: list[SizeSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unproven: list[str] = field(default_factory=list)  # see Tracer.unproven
    control_flow: list[ControlFlowSite] = field(default_factory=list)  # data-dependent branches the trace took
    shadow: nn.Module | None = None  # the meta copy that was traced, if any (shapes only: reused by the probes)


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested tuples, lists, dicts, namedtuples and dataclasses, in order.

    Examples:
        >>> a, b = torch.zeros(1), torch.ones(2)
        >>> [t.shape[0] for t in iter_tensors({"x": (a, [b, 3]), "y": None})]
        [1, 2]
    """
    found: list[torch.Tensor] = []
    _collect_tensors(obj, found)
    return iter(found)


NO_TENSORS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _collect_tensors(obj: Any, found: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, NO_TENSORS):
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif not isinstance(item, NO_TENSORS):
                _collect_tensors(item, found)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            _collect_tensors(item, found)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _collect_tensors(getattr(obj, f.name), found)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call the model on a tensor, a tuple of positional arguments or a dict of keyword arguments.

    This is how :class:`~maskprune.Mask` feeds its example inputs (and how criteria may feed theirs):
    ``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple, ``model(inputs)`` otherwise.

    Examples:
        >>> call_model(torch.nn.Bilinear(2, 2, 1), (torch.ones(3, 2), torch.ones(3, 2))).shape
        torch.Size([3, 1])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without tensors.

    Examples:
        >>> model_device(torch.nn.Linear(2, 2)), model_device(torch.nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def batch_input(batch: Any) -> Any:
    """What a batch feeds the model: a tensor or a dict as it is; a tuple or list is ``(inputs, targets, ...)``,
    whose element 0 is the input (a DataLoader's ``(images, labels)``).

    Examples:
        >>> batch_input((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("a batch is an empty tuple or list; pass inputs=... to say what to feed the model")
        return batch[0]
    return batch


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside ``value`` (nested tuples, lists, dicts) moved to ``device`` without blocking.

    Examples:
        >>> to_device({"ids": (torch.ones(2),)}, torch.device("cpu"))["ids"][0].device
        device(type='cpu')
    """
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, Mapping):  # a dict, or a UserDict such as transformers' BatchEncoding
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every module's ``training`` flag restored after, also on error.

    Examples:
        >>> m = torch.nn.Dropout().train()
        >>> with evaluating(m):
        ...     m.training
        False
        >>> m.training
        True
    """
    flags = training_flags(module_table(model))
    if type(model).eval is nn.Module.eval:
        set_mode(model, False)  # also when already in eval mode: an override may clear caches (timm's LeViT)
    else:
        model.eval()
    try:
        yield
    finally:
        restore_training(flags)


@contextmanager
def preserved_state(index: ModelIndex) -> Iterator[None]:
    """Restore the training flags, buffers and random state of ``index``'s model after the block, whatever happens.

    Buffers on the meta device hold no values: there is nothing of theirs to restore.
    """
    table = index.table
    flags = training_flags(table)
    buffers = [(b, b.detach().clone()) for b, is_param in tensors_of(table) if not is_param and not b.is_meta]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        restore_training(flags)
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
