"""The machinery every op family's rules share: the registry, :class:`OpCall`, running a rule.

A rule sees one call (:class:`OpCall`): its tensors, arguments and outputs. It *claims* the dimensions it
understands, uniting or linking their spaces and giving each output dimension a space. Whatever it leaves
unclaimed is frozen (:func:`run_rule`). A family registers its rules with :func:`rule`, the shortcuts of its
commonest calls with :func:`shortcut` and its layers' size updaters with :func:`maskprune._layers.updater`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from maskprune._attributes import holds_count
from maskprune._reads import holds_read_number
from maskprune._records import NO_TENSORS, TensorNode, iter_tensors

if TYPE_CHECKING:
    from maskprune._trace import Tracer


RULES: dict[str, Callable[[OpCall], None]] = {}  # op name (as op_name() gives it) -> its rule

PRODUCER, CONSUMER, NORM, BIAS = "producer", "consumer", "norm", "bias"

RANDOM = frozenset(
    """rand randn randint randperm rand_like randn_like randint_like normal bernoulli multinomial poisson uniform
    exponential geometric cauchy log_normal random dropout dropout1d dropout2d dropout3d alpha_dropout
    feature_alpha_dropout feature_dropout rrelu gumbel_softmax""".split()
)  # ops whose results differ from call to call
CONSTANT_RESULTS = frozenset(
    "new_zeros new_ones new_full new_empty new_tensor zeros_like ones_like full_like empty_like".split()
)  # the input gives only a shape, dtype or device


def rule(*names: str) -> Callable:
    """Register the decorated function as the rule of every op in ``names`` (each name has one rule)."""

    def register(fn: Callable[[OpCall], None]) -> Callable[[OpCall], None]:
        for name in names:
            RULES[name] = fn
        return fn

    return register


Shortcut = Callable[["Tracer", str, tuple, dict, Any], bool]
SHORTCUTS: dict[Callable[[OpCall], None], Shortcut] = {}  # rule -> its shortcut (see shortcut())


def shortcut(of: Callable[[OpCall], None]) -> Callable[[Shortcut], Shortcut]:
    """Register a shortcut of the rule ``of``: ``fn(tracer, name, args, kwargs, out)`` rules the calls it knows and
    returns True, or returns False and leaves the call to the rule.

    A shortcut must give exactly what its rule gives (the same unions, links, roles, freeze reasons and taint, in
    the same order, so that spaces are numbered the same): ``tests/test_shortcuts.py`` compares the two.
    """

    def register(fn: Shortcut) -> Shortcut:
        SHORTCUTS[of] = fn
        return fn

    return register


_DUNDER = {
    "iadd": "add",
    "radd": "add",
    "isub": "sub",
    "rsub": "rsub",
    "imul": "mul",
    "rmul": "mul",
    "itruediv": "div",
    "truediv": "div",
    "rtruediv": "rdiv",
    "ifloordiv": "floor_divide",
    "floordiv": "floor_divide",
    "rfloordiv": "rfloor_divide",
    "mod": "remainder",
    "rmod": "rremainder",
    "imod": "remainder",
    "ipow": "pow",
    "rpow": "pow",
    "matmul": "matmul",
    "rmatmul": "rmatmul",
    "imatmul": "matmul",
    "iand": "bitwise_and",
    "and": "bitwise_and",
    "rand": "bitwise_and",
    "ior": "bitwise_or",
    "or": "bitwise_or",
    "ror": "bitwise_or",
    "ixor": "bitwise_xor",
    "xor": "bitwise_xor",
    "rxor": "bitwise_xor",
    "invert": "bitwise_not",
    "lshift": "bitwise_left_shift",
    "rshift": "bitwise_right_shift",
    "ilshift": "bitwise_left_shift",
    "irshift": "bitwise_right_shift",
    "rlshift": "bitwise_left_shift",
    "rrshift": "bitwise_right_shift",
}


_NAME_CACHE: dict[Any, tuple[str, bool]] = {}


def op_name(func: Any) -> tuple[str, bool]:
    """Normalised op name and whether the call writes into its first argument.

    Examples:
        >>> op_name(torch.Tensor.relu_), op_name(torch.Tensor.__iadd__)
        (('relu', True), ('add', True))
    """
    try:
        return _NAME_CACHE[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    inplace = False
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        inplace = core.startswith("i") and core != "invert" and core in _DUNDER
        name = _DUNDER.get(core, core)
    elif name.endswith("_") and not name.startswith("_"):
        name, inplace = name[:-1], True
    result = (name, inplace)
    try:
        _NAME_CACHE[func] = result
    except TypeError:
        pass
    return result


NUMPY_NAMES = {"dim": ("axis",), "keepdim": ("keepdims",), "input": ("x", "a", "x1"), "other": ("x2",)}
"""The other names torch's argument parser accepts for these keywords (``torch.cat(ts, axis=1)``)."""


def argument(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A call's argument ``index``, or its keyword ``name`` (or a NumPy-style name torch's parser takes for it).

    Examples:
        >>> argument((), {"axis": 1}, 1, "dim", 0), argument(([], 2), {}, 1, "dim", 0)
        (1, 2)
    """
    if len(args) > index:
        return args[index]
    if name in kwargs or not kwargs:
        return kwargs.get(name, default)
    for alias in NUMPY_NAMES.get(name, ()):
        if alias in kwargs:
            return kwargs[alias]
    return default


class OpCall:
    """One traced call, as its rule sees it."""

    __slots__ = (
        "tracer", "graph", "name", "inplace", "args", "kwargs", "out", "inputs", "outputs",
        "claimed", "done", "_tainted", "_constant", "_reason", "_nodes",
    )  # fmt: skip

    def __init__(self, tracer: Tracer, name: str, inplace: bool, args: tuple, kwargs: dict, out: Any):
        self.tracer = tracer
        self.graph = tracer.graph
        self.name = name
        self.inplace = inplace
        self.args = args
        self.kwargs = kwargs
        self.out = out
        self.inputs = _distinct_tensors(args, kwargs)
        self.outputs = [out] if isinstance(out, torch.Tensor) else list(iter_tensors(out))
        self.claimed: set[tuple[int, int]] = set()
        self.done: set[int] = set()
        self._tainted: bool | None = None
        self._constant: bool | None = None
        self._reason: str | None = None
        self._nodes: dict[int, TensorNode] = {}  # looked up once per call (the op has already run)

    def node(self, t: torch.Tensor) -> TensorNode:
        """The traced node of ``t``, as this call sees it (its own outputs once set)."""
        key = id(t)
        node = self._nodes.get(key)
        if node is None:
            node = self._nodes[key] = self.tracer.node(t)
        return node

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument ``index``, or the keyword ``name`` (see :func:`argument`)."""
        return argument(self.args, self.kwargs, index, name, default)

    def space(self, t: torch.Tensor, dim: int) -> int:
        """The space of ``t``'s dimension ``dim``, claimed by this rule."""
        key = id(t)
        dim %= t.dim()
        self.claimed.add((key, dim))
        node = self._nodes.get(key)  # self.node(t), inlined: the commonest call of every rule
        if node is None:
            node = self._nodes[key] = self.tracer.node(t)
        return node.spaces[dim]

    def claim_all(self, t: torch.Tensor) -> None:
        key = id(t)
        self.claimed.update([(key, dim) for dim in range(t.dim())])

    def spaces(self, t: torch.Tensor) -> list[int]:
        """The spaces of every dimension of ``t``, all claimed by this rule (``space(t, d)`` for each ``d``)."""
        self.claim_all(t)
        return list(self.node(t).spaces)

    def unite(self, a: torch.Tensor, da: int, b: torch.Tensor, db: int) -> int:
        sa = self.space(a, da)
        self.graph.unite(sa, self.space(b, db))
        return sa

    def link(self, a: int, ia: np.ndarray, b: int, ib: np.ndarray) -> None:
        self.graph.link(a, ia, b, ib)

    def set_out(self, t: torch.Tensor, spaces: list[int | None]) -> None:
        """Give output ``t`` its spaces; ``None`` means a fresh frozen space."""
        shape = tuple(t.shape)
        if len(spaces) != len(shape):
            raise ValueError(f"{len(spaces)} spaces for an output of {len(shape)} dims")
        if None in spaces:
            reason, new_space = self.reason(), self.graph.new_space
            spaces = [new_space(n, reason) if s is None else s for s, n in zip(spaces, shape, strict=True)]
        node = TensorNode(tuple(spaces), shape, self.tainted(), self.constant())
        self.tracer.bind(t, node)
        if not self.is_param(t):  # a parameter keeps its own node
            self._nodes[id(t)] = node
        self.done.add(id(t))

    def finish(self, tensors: list[torch.Tensor], reason: str | None = None) -> None:
        """Freeze every dimension of ``tensors`` the rule did not claim; unset outputs get frozen spaces.

        ``reason``: why, for what this freezes (the rule's :meth:`reason` by default).
        """
        node, claimed = self.node, self.claimed
        tainted = False
        for t in tensors:
            t_node, key = node(t), id(t)
            tainted = tainted or t_node.tainted
            for dim, space in enumerate(t_node.spaces):
                if (key, dim) not in claimed:
                    self.graph.freeze(space, reason or self.reason())
        for t in self.outputs:
            if id(t) not in self.done:
                self.tracer.fresh(t, reason or self.reason(), tainted, self.constant())

    def tainted(self) -> bool:
        """Whether any input derives from a masked parameter (computed once, before outputs are bound)."""
        if self._tainted is None:
            self._tainted = any(self.node(t).tainted for t in self.inputs)
        return self._tainted

    def constant(self) -> bool:
        """Whether the outputs are constants (see :class:`TensorNode`): a factory's that draws no random numbers,
        or an op's on constants only, and not made from a number ``item()`` read (computed once, before outputs
        are bound)."""
        if self._constant is None:
            name = self.name
            self._constant = (
                name in CONSTANT_RESULTS or (name not in RANDOM and all(self.node(t).constant for t in self.inputs))
            ) and not holds_read_number((*self.args, *self.kwargs.values()))
        return self._constant

    def held(self, value: int) -> bool:
        """Whether the running module keeps ``value`` in a count attribute the export can set."""
        return holds_count(self.tracer.running_module()[1], value)

    def is_param(self, t: torch.Tensor) -> bool:
        return id(t) in self.tracer.owned

    def role(self, t: torch.Tensor | None, dim: int, role: str) -> None:
        if t is not None and self.is_param(t):
            self.tracer.roles.setdefault((id(t), dim % t.dim()), role)

    def unproven(self, what: str) -> None:
        """This call may fix a channel count the rule cannot see: make() runs the trial export."""
        self.tracer.unproven.append(f"{what}: `{self.name}` in {self.tracer.path()}")

    def in_module(self, module_type: type | tuple[type, ...]) -> bool:
        """Whether the innermost running module of the model is a ``module_type`` (its own forward runs)."""
        return running_in(self.tracer, module_type)

    def reason(self) -> str:
        """What froze a dimension here: the op and the module running it."""
        if self._reason is None:
            self._reason = call_reason(self.tracer, self.name)
        return self._reason


def running_in(tracer: Tracer, module_type: type | tuple[type, ...]) -> bool:
    """Whether the innermost running module of the traced model is a ``module_type``."""
    return isinstance(tracer.running_module()[1], module_type)


def call_reason(tracer: Tracer, name: str) -> str:
    """Why a call of op ``name`` froze a dimension: the op and the module running it."""
    return f"`{name}` in {tracer.path()}"


def apply_rule(tracer: Tracer, name: str, inplace: bool, args: tuple, kwargs: dict, out: Any) -> None:
    """Run the rule of one traced call: :func:`run_rule` on an :class:`OpCall`, or the same without one.

    A call that returns no tensor needs nothing, and the commonest calls (activations, batch norms,
    convolutions, concatenations) have a shortcut that gives the same spaces as their rule (see :func:`shortcut`).
    """
    if isinstance(out, NO_TENSORS) and name != "setitem":
        return  # sizes, booleans: no channels flow through them (what run_rule does first)
    fast = SHORTCUTS.get(RULES.get(name))
    if fast is None or not fast(tracer, name, args, kwargs, out):
        run_rule(OpCall(tracer, name, inplace, args, kwargs, out))


def run_rule(call: OpCall) -> None:
    """Apply the op's rule, then freeze whatever it left unclaimed."""
    if not call.outputs and call.name != "setitem":
        return  # sizes, booleans, lists: no channels flow through them
    fn = RULES.get(call.name)
    if fn is None:
        if call.inputs:
            key = (call.name, call.tracer.path())
            call.tracer.unknown_ops[key] = call.tracer.unknown_ops.get(key, 0) + 1
        reason = f"unsupported op `{call.name}` in {call.tracer.path()}"
    else:
        fn(call)
        reason = None  # the rule's own (see OpCall.reason)
    call.finish(call.inputs, reason)


def run_leaf_rule(tracer: Tracer, module: torch.nn.Module, leaf: Any, args: tuple, output: Any) -> None:
    """Apply a user's :class:`~maskprune.LayerRule` to one call of a registered module."""
    call = OpCall(tracer, type(module).__name__, False, args, {}, output)
    call.unproven("a registered module's code is not traced")
    named: dict[str, int] = {}

    def bind(t: torch.Tensor, dims: dict[int, str]) -> None:
        for dim, label in dims.items():
            space = call.space(t, dim)
            if label in named:
                call.graph.unite(named[label], space)
            else:
                named[label] = space

    inputs = list(iter_tensors(args))
    outputs = list(iter_tensors(output))
    params = dict(module.named_parameters())
    for index, dims in leaf.inputs.items():
        bind(inputs[index], dims)
    for name, dims in leaf.params.items():
        bind(params[name], dims)
        for dim, label in dims.items():
            call.role(params[name], dim, leaf.roles.get(label, NORM))
    out_spaces: dict[int, list[int | None]] = {}
    for index, dims in leaf.outputs.items():
        t = outputs[index]
        spaces: list[int | None] = [None] * t.dim()
        for dim, label in dims.items():
            dim %= t.dim()
            if label in named:
                spaces[dim] = named[label]
            else:
                spaces[dim] = named[label] = call.graph.new_space(t.shape[dim])
        out_spaces[index] = spaces
    if inputs and outputs and inputs[0].dim() == outputs[0].dim():
        spaces = out_spaces.setdefault(0, [None] * outputs[0].dim())
        mentioned = {d % inputs[0].dim() for d in leaf.inputs.get(0, {})}
        for dim in range(outputs[0].dim()):
            if spaces[dim] is None and dim not in mentioned and inputs[0].shape[dim] == outputs[0].shape[dim]:
                spaces[dim] = call.space(inputs[0], dim)
    for index, spaces in out_spaces.items():
        call.set_out(outputs[index], spaces)
    call.finish(inputs + list(params.values()), f"registered module {type(module).__name__} in {tracer.path()}")


# ---- helpers -------------------------------------------------------------------------------------
def _distinct_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among a call's arguments (nested ones too), each once, in order."""
    found: list[torch.Tensor] = []
    for value in args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif not isinstance(value, NO_TENSORS):
            found.extend(iter_tensors(value))
    if kwargs:
        found.extend(iter_tensors(kwargs))
    if len(found) < 2:
        return found
    seen: set[int] = set()
    return [t for t in found if not (id(t) in seen or seen.add(id(t)))]


def dims_of(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value % ndim] if ndim else []
    return [int(d) % ndim for d in value]


def broadcast(call: OpCall, out: torch.Tensor, tensors: list[torch.Tensor]) -> list[int | None]:
    """Spaces of ``out`` for inputs broadcast together: equal-sized aligned dims are one space."""
    spaces: list[int | None] = []
    for j in range(out.dim()):
        from_right = j - out.dim()
        first = None
        for t in tensors:
            k = t.dim() + from_right
            if k >= 0 and t.shape[k] == out.shape[j]:
                if first is None:
                    first = call.space(t, k)
                else:
                    call.graph.unite(first, call.space(t, k))
            elif k >= 0 and t.shape[k] == 1:
                call.claimed.add((id(t), k))
        spaces.append(first)
    return spaces


def broadcast_prefix(call: OpCall, out: torch.Tensor, tensors: list[torch.Tensor]) -> list[int | None]:
    n = out.dim() - 2
    spaces: list[int | None] = []
    for j in range(n):
        first = None
        for t in tensors:
            k = j - (n - (t.dim() - 2))
            if k < 0:
                continue
            if t.shape[k] == out.shape[j]:
                first = call.space(t, k) if first is None else first
                call.graph.unite(first, call.space(t, k))
            elif t.shape[k] == 1:
                call.claimed.add((id(t), k))
        spaces.append(first)
    return spaces


def only_tensors(args: tuple, kwargs: dict, count: int) -> list[torch.Tensor] | None:
    """The tensors among ``args[1:]`` and ``kwargs`` when there are ``count`` of them and nothing else may
    hold one (each argument a tensor or a plain value); else None."""
    found: list[torch.Tensor] = []
    for value in (*args[1:], *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif not isinstance(value, NO_TENSORS):
            return None
    return found if len(found) == count else None
