"""How channels flow through each torch op: the one table of channel rules.

A rule sees one call (:class:`OpCall`): its tensors, arguments and outputs. It
*claims* the dimensions it understands, uniting or linking their spaces and
giving each output dimension a space. Whatever it leaves unclaimed is frozen:
an input dimension a rule did not claim is never pruned, an output dimension
it did not set gets a fresh frozen space. An op with no rule freezes every
dimension it touches and is reported by name. Safety is the default; a rule
only ever makes more channels prunable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ._attributes import holds_count
from ._records import HEADS, NO_TENSORS, TensorNode, TracedSize, iter_tensors

if TYPE_CHECKING:
    from ._trace import Tracer

RULES: dict[str, Callable[[OpCall], None]] = {}

PRODUCER, CONSUMER, NORM, BIAS = "producer", "consumer", "norm", "bias"


def rule(*names: str) -> Callable:
    def register(fn: Callable[[OpCall], None]) -> Callable[[OpCall], None]:
        for name in names:
            RULES[name] = fn
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

    Example:
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

    Example:
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
        "claimed", "done", "_tainted", "_reason", "_nodes",
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
        node = TensorNode(tuple(spaces), shape, self.tainted())
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
                self.tracer.fresh(t, reason or self.reason(), tainted)

    def tainted(self) -> bool:
        """Whether any input derives from a masked parameter (computed once, before outputs are bound)."""
        if self._tainted is None:
            self._tainted = any(self.node(t).tainted for t in self.inputs)
        return self._tainted

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
    convolutions, concatenations) have a shortcut that gives the same spaces as their rule (see :data:`_SHORTCUTS`).
    """
    if isinstance(out, NO_TENSORS) and name != "setitem":
        return  # sizes, booleans: no channels flow through them (what run_rule does first)
    shortcut = _SHORTCUTS.get(RULES.get(name))
    if shortcut is None or not shortcut(tracer, name, args, kwargs, out):
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


# ---- helpers ------------------------------------------------------------------------------
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


def _dims(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value % ndim] if ndim else []
    return [int(d) % ndim for d in value]


def _broadcast(call: OpCall, out: torch.Tensor, tensors: list[torch.Tensor]) -> list[int | None]:
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


# ---- elementwise ----------------------------------------------------------------------------
_ELEMENTWISE = """
abs absolute acos arccos add addcdiv addcmul angle asin arcsin asinh atan arctan atan2 arctan2 atanh
bitwise_and bitwise_not bitwise_or bitwise_xor bitwise_left_shift bitwise_right_shift ceil celu
clamp clamp_min clamp_max clip clone conj contiguous copy copysign cos cosh deg2rad detach dropout
dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout feature_dropout elu eq erf erfc
erfinv exp exp2 expm1 fill fix floor fmax fmin frac ge gelu greater greater_equal gt hardshrink
hardsigmoid hardswish hardtanh heaviside hypot isfinite isinf isnan isneginf isposinf le leaky_relu
lerp less less_equal log1p logaddexp logical_and logical_not logical_or logical_xor logsigmoid lt
masked_fill maximum minimum mish mul multiply nan_to_num ne neg negative normal not_equal positive
rad2deg real imag relu relu6 requires_grad resolve_conj resolve_neg round rrelu rsub selu sgn
sigmoid sign signbit silu sin sinc sinh softplus softshrink softsign sqrt square sub subtract tan
tanh tanhshrink threshold trunc uniform where zero data bernoulli exponential to type float double
half bfloat16 int long bool short char byte cpu cuda clamp_ zeros_like ones_like empty_like
full_like rand_like randn_like randint_like
""".split()


@rule(*_ELEMENTWISE)
def elementwise(call: OpCall) -> None:
    for out in call.outputs:
        call.set_out(out, _broadcast(call, out, call.inputs))


@rule("div", "divide", "true_divide", "floor_divide", "remainder", "fmod", "rdiv", "rfloor_divide", "rremainder")
def division(call: OpCall) -> None:
    """A removed channel is zero in the masked model: as a divisor it would become inf or NaN. Freeze divisors."""
    elementwise(call)
    reflected = call.name.startswith("r") and call.name != "remainder"
    divisor = call.args[0] if reflected else call.arg(1, "other")
    if isinstance(divisor, torch.Tensor) and call.node(divisor).tainted:
        call.claimed -= {(id(divisor), d) for d in range(divisor.dim())}


@rule("pow", "float_power")
def power(call: OpCall) -> None:
    """x ** e is finite at 0 only for e >= 0: other exponents freeze the base's channels."""
    exponent = call.arg(1, "exponent")
    if (isinstance(exponent, (int, float)) and exponent >= 0) or not call.tainted():
        elementwise(call)


@rule("rsqrt", "reciprocal", "log", "log2", "log10", "logit", "lgamma", "acosh", "xlogy")
def not_finite_at_zero(call: OpCall) -> None:
    """Not finite at 0, the value of a removed channel in the masked model: frozen unless unmasked."""
    if not call.tainted():
        elementwise(call)


@rule("type_as", "view_as", "reshape_as", "expand_as")
def shape_from_other(call: OpCall) -> None:
    x = call.args[0]
    for other in call.inputs[1:]:
        call.claim_all(other)
    if call.name != "type_as":
        call.unproven("a shape taken from another tensor")
    if call.name == "type_as":
        call.set_out(call.outputs[0], call.spaces(x))
    elif call.name == "expand_as":
        expand(call)
    else:
        reshape(call)


@rule("new_tensor")
def new_from(call: OpCall) -> None:
    """Only the dtype and device of the input are read; the result is a constant."""
    call.claim_all(call.args[0])


@rule("zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones", "new_empty", "new_full")
def factory(call: OpCall) -> None:
    """A dimension sized by a size read from a tensor (``torch.zeros(n, x.shape[1])``) shares its channels.

    A constant (zeros, ones, full) may take channels from what it meets: its size written in the
    code is recorded as a :class:`SizeSite`. Other dimensions are frozen. For ``new_*`` only the
    dtype and device of the tensor are read.
    """
    args = call.args
    if call.name.startswith("new_"):
        call.claim_all(args[0])
        args = args[1:]
    sizes = call.kwargs.get("size", args[0] if args and isinstance(args[0], (tuple, list)) else args)
    out = call.outputs[0] if call.outputs else None
    if out is None or len(sizes) < out.dim():
        return
    constant = call.name in _CONSTANT_FACTORIES
    spaces: list[int | None] = []
    for d, n in enumerate(list(sizes)[: out.dim()]):
        if isinstance(n, TracedSize) and n == out.shape[d]:
            spaces.append(n.space)
        elif constant and type(n) is int and n > 1 and call.held(n):
            # a constant of any size, its size held in an attribute the export sets: it takes what it meets
            spaces.append(call.graph.new_space(n))
            call.tracer.size_site(n, spaces[-1])
        else:
            spaces.append(None)
    call.set_out(out, spaces)


_CONSTANT_FACTORIES = {"zeros", "ones", "full", "new_zeros", "new_ones", "new_full"}


# ---- shapes ------------------------------------------------------------------------------------
@rule("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "ravel")
def reshape(call: OpCall) -> None:
    """Dims that keep their size pass through; merged dims follow their major factor; a split gives heads.

    Sizes written in the call (``view(B, N, self.num_heads, self.head_dim)``) are recorded as
    :class:`SizeSite` where they count channels, so that an export can update the attributes that
    hold them; the trial export freezes whatever the code still fixes.
    """
    x, out = call.args[0], call.outputs[0]
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.numel() != out.numel():
        return
    literals = _literal_sizes(call.args[1:])
    spaces: list[int | None] = [None] * out.dim()
    for d, n in enumerate(x.shape):
        if n == 1:
            call.claimed.add((id(x), d))
    a = [(d, n) for d, n in enumerate(x.shape) if n != 1]
    b = [(d, n) for d, n in enumerate(out.shape) if n != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        block_in, block_out = [a[i]], [b[j]]
        pa, pb = a[i][1], b[j][1]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                block_in.append(a[i])
                pa *= a[i][1]
                i += 1
            else:
                block_out.append(b[j])
                pb *= b[j][1]
                j += 1
        if len(block_out) != 1:
            if len(block_in) == 1:
                heads_dim, spaces[heads_dim] = _split_into_heads(call, x, block_in[0][0], block_out)
            continue
        out_dim = block_out[0][0]
        if len(block_in) == 1:
            spaces[out_dim] = call.space(x, block_in[0][0])
            written = _written_size(call, out_dim)
            if pb in literals:
                call.tracer.size_site(pb, spaces[out_dim])
            elif _fixes_count(written, spaces[out_dim]):
                _keep_count_of(call, written, spaces[out_dim], [spaces[out_dim]])
                call.unproven("a size read from another tensor")
            continue
        carrier, size, stride = _merge_carrier(call, x, block_in)
        merged = call.graph.new_space(pb)
        idx = np.arange(pb)
        call.link(merged, idx, call.space(x, carrier), (idx // stride) % size)
        spaces[out_dim] = merged
        given = _written_size(call, out_dim)
        written = pb in literals or _fixes_count(given, merged)
        if written:
            _keep_count_of(call, given, merged, [call.space(x, d) for d, _ in block_in])
        call.tracer.size_site(pb, merged, written=written)
    call.set_out(out, spaces)


def _merge_carrier(call: OpCall, x: torch.Tensor, block_in: list[tuple[int, int]]) -> tuple[int, int, int]:
    """The factor of a merge that carries channels: the first one not frozen (``C`` of a conv's
    ``(C, H, W)``, ``heads`` of ``(heads, head_dim)``, ``C`` of Swin's ``(2, 2, C)``), else the first. The
    parts of a split by a written count (:func:`_split_into_heads`) come last: Swin's ``2`` of a spatial
    ``(H / 2, 2)`` is one, and its ``C`` carries the channels.

    Returns (its dim in ``x``, its size, the product of the factors after it).
    """
    graph, parts = call.graph, call.tracer.part_spaces
    nodes = call.node(x).spaces
    free = [k for k, (d, _) in enumerate(block_in) if not graph.is_frozen(nodes[d])]
    chosen = next((k for k in free if nodes[block_in[k][0]] not in parts), free[0] if free else 0)
    stride = int(np.prod([n for _, n in block_in[chosen + 1 :]], dtype=np.int64))
    return block_in[chosen][0], block_in[chosen][1], stride


def _keep_count_of(call: OpCall, written: Any, space: int, sources: list[int]) -> None:
    """A size read from another tensor's dim fixes ``space``'s count to that dim's (PVT's ``reshape(B, N, C)`` of
    its heads, ``C`` read from its input; an ``expand`` to it): the two lose the same channels, where nothing
    relates them yet. A dim the reshaped channels come from (``sources``) may already decide that count: a
    channel shuffle's ``view(B, C, H, W)`` with the ``C`` it split. The trial export still checks the size, and
    freezes (naming the model's error) where either is frozen already (a count read from a model input)."""
    if not isinstance(written, TracedSize):
        return
    graph = call.graph
    if not graph.is_frozen(written.space) and not graph.is_frozen(space) and not graph.joined(written.space, sources):
        graph.unite(written.space, space)


def _fixes_count(written: Any, space: int) -> bool:
    """Whether a size given for a dim of ``space`` stays as it is when ``space`` loses channels: an
    integer written in the code, or a size read from another space (``-1`` and absent sizes follow)."""
    if isinstance(written, TracedSize):
        return written.space != space
    return type(written) is int and written > 1


def _literal_sizes(args: tuple) -> set[int]:
    """The sizes written in a reshape's arguments (not read from a tensor, not -1)."""
    found: set[int] = set()
    for arg in args:
        items = arg if isinstance(arg, (tuple, list)) else (arg,)
        found.update(n for n in items if type(n) is int and n > 1)
    return found


def _split_into_heads(call: OpCall, x: torch.Tensor, in_dim: int, block_out: list[tuple[int, int]]) -> tuple[int, int]:
    """Split ``x``'s dim ``in_dim`` into ``block_out``; the second-to-last factor carries the channels.

    ``C -> (heads, head_dim)`` and ``3C -> (3, heads, head_dim)`` keep their channels prunable a whole
    head at a time (the other factors keep their size). A head count written in the code and not held
    in an attribute the export can set (``self.num_heads``) stays as it is: the last factor carries the
    channels then, every part losing the same positions, as ``chunk`` would make them (a channel shuffle's
    ``view(B, groups, -1, H, W)``). Returns (output dim, its space).
    """
    heads_dim, heads = block_out[-2]
    per_head_dim, per_head = block_out[-1]
    idx = np.arange(x.shape[in_dim])
    written = _written_size(call, heads_dim)
    if type(written) is int and written > 0 and not call.held(written):
        space = call.graph.new_space(per_head)
        call.tracer.part_spaces.add(space)
        call.link(space, idx % per_head, call.space(x, in_dim), idx)
        if _fixes_count(_written_size(call, per_head_dim), space):  # ``view(B, 2, 4, H, W)``: the trial export checks
            call.tracer.size_site(per_head, space)
        return per_head_dim, space
    space = call.graph.new_space(heads)
    call.link(space, (idx // per_head) % heads, call.space(x, in_dim), idx)
    call.tracer.size_site(heads, space, HEADS)
    return heads_dim, space


def _written_size(call: OpCall, out_dim: int) -> Any:
    """What the call wrote for output dim ``out_dim``: an int, -1, a traced size, or None when not written."""
    out = call.outputs[0]
    if call.name in ("view", "reshape", "expand", "broadcast_to"):
        shape = call.args[1:] or (call.kwargs.get("size" if call.name in ("expand", "broadcast_to") else "shape"),)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        return shape[out_dim] if len(shape) == out.dim() else None
    if call.name == "unflatten":
        start, sizes = int(call.arg(1, "dim")) % call.args[0].dim(), call.arg(2, "sizes")
        return sizes[out_dim - start] if start <= out_dim < start + len(sizes) else None
    return None


def _permutation(call: OpCall, ndim: int) -> list[int] | None:
    name = call.name
    if name == "permute":
        rest = call.args[1:]
        dims = rest[0] if len(rest) == 1 and not isinstance(rest[0], int) else rest
        return [int(d) % ndim for d in (dims or call.kwargs["dims"])]
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = int(call.arg(1, "dim0")) % ndim, int(call.arg(2, "dim1")) % ndim
        perm = list(range(ndim))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if name == "t" or name == "T":
        return list(reversed(range(ndim)))
    if name in ("mT", "mH", "adjoint"):
        return list(range(ndim - 2)) + [ndim - 1, ndim - 2]
    if name in ("movedim", "moveaxis"):
        src = _dims(call.arg(1, "source"), ndim)
        dst = _dims(call.arg(2, "destination"), ndim)
        perm = [None] * ndim
        for s, d in zip(src, dst, strict=True):
            perm[d] = s
        rest = iter(d for d in range(ndim) if d not in src)
        return [p if p is not None else next(rest) for p in perm]
    return None


@rule("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(call: OpCall) -> None:
    """Channel ``a * n + b`` (group ``a`` of ``groups``, ``n`` channels each) moves to ``b * groups + a``. The
    exported model shuffles in as many groups, so every group must lose the same positions: a unit is one
    position ``b`` in every group."""
    x, out = call.args[0], call.outputs[0]
    groups = int(call.arg(1, "groups"))
    channels = x.shape[1]
    per_group = channels // groups
    idx = np.arange(channels)
    units = call.graph.new_space(per_group)
    call.link(units, idx % per_group, call.space(x, 1), idx)
    shuffled = call.graph.new_space(channels)
    call.link(units, idx // groups, shuffled, idx)
    call.set_out(out, [shuffled if d == 1 else call.space(x, d) for d in range(x.dim())])


@rule("permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT", "mH", "adjoint", "movedim", "moveaxis")
def permute(call: OpCall) -> None:
    x, out = call.args[0], call.outputs[0]
    perm = _permutation(call, x.dim())
    if perm is not None and len(perm) == out.dim():
        call.set_out(out, [call.space(x, p) for p in perm])


@rule("expand", "broadcast_to", "repeat", "tile")
def expand(call: OpCall) -> None:
    """Dims that keep their size pass through; broadcast or repeated dims become new (frozen) spaces."""
    x, out = call.args[0], call.outputs[0]
    lead = out.dim() - x.dim()
    spaces: list[int | None] = [None] * out.dim()
    for k in range(x.dim()):
        if x.shape[k] == out.shape[k + lead]:
            spaces[k + lead] = call.space(x, k)
            written = _written_size(call, k + lead)
            if _fixes_count(written, spaces[k + lead]):
                _keep_count_of(call, written, spaces[k + lead], [spaces[k + lead]])
                call.unproven("a size written in the code")
        elif x.shape[k] == 1:
            call.claimed.add((id(x), k))
    call.set_out(out, spaces)


@rule("cat", "concat", "concatenate")
def cat(call: OpCall) -> None:
    tensors = list(call.arg(0, "tensors"))
    out = call.outputs[0]
    d = int(call.arg(1, "dim", 0)) % out.dim()
    parts = []
    for t in tensors:
        if t.dim() == 1 and t.shape[0] == 0 and out.dim() > 1:
            call.claim_all(t)  # legacy empty tensor, ignored by cat
        else:
            parts.append(t)
    graph = call.graph
    # the concatenated dim's space is made before the parts' spaces are looked up (a parameter's are made then)
    merged = graph.new_space(out.shape[d]) if d == 0 and len(parts) > 1 else None
    part_spaces = [call.spaces(t) for t in parts]  # every dim of every part is claimed
    spaces: list[int | None] = []
    for j in range(out.dim()):
        if j != d:
            first = part_spaces[0][j]
            for other in part_spaces[1:]:
                graph.unite(first, other[j])
            spaces.append(first)
        elif len(parts) == 1:
            spaces.append(part_spaces[0][d])
        else:
            merged = graph.new_space(out.shape[d]) if merged is None else merged
            graph.concat(merged, [t_spaces[d] for t_spaces in part_spaces], [t.shape[d] for t in parts])
            spaces.append(merged)
    call.set_out(out, spaces)


@rule("stack")
def stack(call: OpCall) -> None:
    tensors = list(call.arg(0, "tensors"))
    out = call.outputs[0]
    d = int(call.arg(1, "dim", 0)) % out.dim()
    spaces: list[int | None] = []
    for j in range(tensors[0].dim()):
        first = call.space(tensors[0], j)
        for t in tensors[1:]:
            call.graph.unite(first, call.space(t, j))
        spaces.append(first)
    spaces.insert(d, None)
    call.set_out(out, spaces)


@rule("chunk", "split", "split_with_sizes", "tensor_split", "unbind", "hsplit", "vsplit", "dsplit")
def split(call: OpCall) -> None:
    """Equal chunks stay prunable (every chunk loses the same channels); unequal sizes freeze."""
    x = call.args[0]
    default = {"hsplit": 1 if x.dim() > 1 else 0, "vsplit": 0, "dsplit": 2}.get(call.name, 0)
    dim_pos = 1 if call.name == "unbind" else 2
    d = int(call.arg(dim_pos, "dim", default)) % x.dim()
    outs = call.outputs
    if call.name == "unbind":
        for out in outs:
            call.set_out(out, [call.space(x, k) for k in range(x.dim()) if k != d])
        return
    size = x.shape[d]
    equal = len({o.shape[d] for o in outs}) == 1 and outs[0].shape[d] * len(outs) == size
    by_size = call.name in ("split", "split_with_sizes")
    shared = None
    held = by_size and call.held(outs[0].shape[d])
    if equal and (call.name == "chunk" or held):
        n = outs[0].shape[d]
        shared = call.graph.new_space(n)
        for k in range(len(outs)):
            call.link(shared, np.arange(n), call.space(x, d), np.arange(k * n, (k + 1) * n))
        if by_size:  # ``split(self.split_size)``: the size is written in the code
            call.tracer.size_site(n, shared)
    for out in outs:
        spaces: list[int | None] = [call.space(x, k) if k != d else shared for k in range(x.dim())]
        call.set_out(out, spaces)


@rule("glu")
def glu(call: OpCall) -> None:
    """``glu`` halves a dim: output channel ``i`` is input channel ``i`` gated by channel ``i + n``, one unit (as
    ``a, b = x.chunk(2); a * sigmoid(b)`` makes them)."""
    x, out = call.args[0], call.outputs[0]
    d = int(call.arg(1, "dim", -1)) % x.dim()
    n = out.shape[d]
    halves = call.graph.new_space(n)
    idx = np.arange(n)
    for k in range(2):
        call.link(halves, idx, call.space(x, d), idx + k * n)
    call.set_out(out, [call.space(x, k) if k != d else halves for k in range(x.dim())])


def _index_plan(shape: tuple[int, ...], index: Any) -> list[tuple[int | None, str]] | None:
    """For basic indexing: (input dim, kind) per output dim, kinds 'full', 'part', 'new'; None if advanced."""
    items = index if isinstance(index, tuple) else (index,)
    consuming = 0
    for item in items:
        if item is None or item is Ellipsis:
            continue
        if (
            isinstance(item, torch.Tensor)
            and item.dim() == 0
            and not item.dtype.is_floating_point
            and item.dtype != torch.bool
        ):
            consuming += 1
        elif isinstance(item, (int, slice)) and not isinstance(item, bool):
            consuming += 1
        else:
            return None
    plan: list[tuple[int | None, str]] = []
    dim = 0
    for item in items:
        if item is None:
            plan.append((None, "new"))
        elif item is Ellipsis:
            for _ in range(len(shape) - consuming):
                plan.append((dim, "full"))
                dim += 1
        elif isinstance(item, slice):
            start, stop, step = item.start, item.stop, item.step
            n = shape[dim]
            full = start in (None, 0) and (stop is None or (isinstance(stop, int) and stop >= n)) and step in (None, 1)
            plan.append((dim, "full" if full else "part"))
            dim += 1
        else:
            plan.append((dim, "int"))
            dim += 1
    while dim < len(shape):
        plan.append((dim, "full"))
        dim += 1
    return plan


@rule("getitem")
def getitem(call: OpCall) -> None:
    x, out = call.args[0], call.outputs[0]
    index = call.args[1]
    if _gather_rows(call, x, out, index):
        return
    plan = _index_plan(tuple(x.shape), index)
    if plan is None:
        return
    spaces: list[int | None] = []
    for dim, kind in plan:
        if kind == "full":
            spaces.append(call.space(x, dim))
        elif kind in ("part", "new"):
            spaces.append(None)
        elif x.shape[dim] == 1:
            call.claimed.add((id(x), dim))
    if len(spaces) == out.dim():
        call.set_out(out, spaces)


def _gather_rows(call: OpCall, x: torch.Tensor, out: torch.Tensor, index: Any) -> bool:
    """``table[idx]`` or ``table[:, idx]`` with one integer tensor (relative position biases): the
    indexed dim is replaced by the index's dims (frozen), the others pass through."""
    items = index if isinstance(index, tuple) else (index,)
    tensors = [k for k, item in enumerate(items) if isinstance(item, torch.Tensor)]
    if len(tensors) != 1 or any(item != slice(None) for k, item in enumerate(items) if k != tensors[0]):
        return False
    at, idx = tensors[0], items[tensors[0]]
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or out.dim() != idx.dim() + x.dim() - 1:
        return False
    call.claim_all(idx)
    before = [call.space(x, d) for d in range(at)]
    call.set_out(out, before + [None] * idx.dim() + [call.space(x, d) for d in range(at + 1, x.dim())])
    return True


@rule("gather", "take_along_dim")
def gather(call: OpCall) -> None:
    """Values picked along ``dim`` by an index of the output's shape: the other dims pass through."""
    x, out = call.args[0], call.outputs[0]
    index = call.arg(2, "index") if call.name == "gather" else call.arg(1, "indices")
    dim = call.arg(1, "dim") if call.name == "gather" else call.arg(2, "dim")
    if not isinstance(index, torch.Tensor) or dim is None or index.dim() != x.dim() or out.shape != index.shape:
        return
    dim = int(dim) % x.dim()
    call.claim_all(index)
    call.unproven("an index of the output's shape")
    spaces: list[int | None] = []
    for d in range(x.dim()):
        same = d != dim and x.shape[d] == out.shape[d]
        spaces.append(call.space(x, d) if same else None)
    call.set_out(out, spaces)


@rule("setitem")
def setitem(call: OpCall) -> None:
    x, value = call.args[0], call.args[2]
    plan = _index_plan(tuple(x.shape), call.args[1])
    if plan is None:
        return
    view = [(dim, kind) for dim, kind in plan if kind != "int"]
    for dim, kind in plan:
        if kind == "int" and x.shape[dim] == 1:
            call.claimed.add((id(x), dim))
    if not isinstance(value, torch.Tensor):
        for dim, kind in view:
            if kind == "full":
                call.claimed.add((id(x), dim))
        return
    lead = len(view) - value.dim()
    for j, (dim, kind) in enumerate(view):
        k = j - lead
        if kind != "full":
            continue
        if k >= 0 and value.shape[k] == x.shape[dim]:
            call.unite(x, dim, value, k)
        elif k < 0 or value.shape[k] == 1:
            call.claimed.add((id(x), dim))
            if k >= 0:
                call.claimed.add((id(value), k))


@rule("pad")
def pad(call: OpCall) -> None:
    x, out = call.args[0], call.outputs[0]
    widths = list(call.arg(1, "pad"))
    padded = {x.dim() - 1 - i // 2 for i, w in enumerate(widths) if w != 0}
    call.set_out(out, [None if d in padded else call.space(x, d) for d in range(x.dim())])


# ---- reductions and ops that mix along a dimension ------------------------------------------
_REDUCTIONS = """
sum mean nansum nanmean prod amax amin max min std var std_mean var_mean norm logsumexp argmax argmin
all any count_nonzero median nanmedian mode aminmax kthvalue
""".split()


@rule(*_REDUCTIONS)
def reduction(call: OpCall) -> None:
    x = call.args[0]
    other = call.arg(1, "other")
    if call.name in ("max", "min") and isinstance(other, torch.Tensor):
        return elementwise(call)
    dim_pos = {"norm": 2, "kthvalue": 2}.get(call.name, 1)
    dims = _dims(call.arg(dim_pos, "dim"), x.dim()) if x.dim() else []
    if call.name == "norm" and not isinstance(call.arg(2, "dim"), (int, list, tuple)):
        dims = None
    if dims is None:
        dims = list(range(x.dim()))
    keep = [d for d in range(x.dim()) if d not in dims]
    for out in call.outputs:
        if out.dim() == len(keep):
            call.set_out(out, [call.space(x, d) for d in keep])
        elif out.dim() == x.dim():
            call.set_out(out, [None if d in dims else call.space(x, d) for d in range(x.dim())])


_MIXING = {
    "softmax": (1, "dim", None),
    "log_softmax": (1, "dim", None),
    "softmin": (1, "dim", None),
    "cumsum": (1, "dim", None),
    "cumprod": (1, "dim", None),
    "cummax": (1, "dim", None),
    "cummin": (1, "dim", None),
    "logcumsumexp": (1, "dim", None),
    "sort": (1, "dim", -1),
    "argsort": (1, "dim", -1),
    "normalize": (2, "dim", 1),
    "topk": (2, "dim", -1),
    "flip": (1, "dims", None),
    "roll": (2, "dims", None),
    "local_response_norm": (99, "", 1),
    "gumbel_softmax": (4, "dim", -1),
    "index_select": (1, "dim", None),
    "msort": (99, "", 0),
}


@rule(*_MIXING)
def mixing(call: OpCall) -> None:
    """Shape-preserving ops that mix values along some dims: those dims freeze, the rest pass."""
    x = call.args[0]
    pos, key, default = _MIXING[call.name]
    dims = _dims(call.arg(pos, key, default) if key else default, x.dim())
    if dims is None:
        return
    for out in call.outputs:
        if out.dim() == x.dim():
            call.set_out(out, [None if d in dims else call.space(x, d) for d in range(x.dim())])


# ---- spatial ops -------------------------------------------------------------------------------
_SPATIAL = [
    f"{kind}{n}d{suffix}"
    for n in (1, 2, 3)
    for kind, suffix in (
        ("max_pool", ""),
        ("avg_pool", ""),
        ("adaptive_avg_pool", ""),
        ("adaptive_max_pool", ""),
        ("lp_pool", ""),
        ("fractional_max_pool", ""),
        ("max_unpool", ""),
        ("max_pool", "_with_indices"),
        ("adaptive_max_pool", "_with_indices"),
    )
]


@rule(*_SPATIAL, "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
def spatial(call: OpCall) -> None:
    """Pooling and resampling: channels pass, spatial dims are new (frozen) spaces."""
    x = call.args[0]
    digits = [c for c in call.name if c.isdigit()]
    k = int(digits[0]) if digits else x.dim() - 2
    for out in call.outputs:
        if out.dim() == x.dim():
            call.set_out(out, [call.space(x, d) if d < x.dim() - k else None for d in range(x.dim())])
    for extra in call.inputs[1:]:
        call.claim_all(extra)


@rule("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle(call: OpCall) -> None:
    """Channel ``c`` of a pixel shuffle's output is made of the input's channels ``c * r² … c * r² + r² - 1``
    (an unshuffle's output channel ``j`` comes from input channel ``j // r²``): those are one unit. The spatial
    dims are new (frozen) spaces."""
    x, out = call.args[0], call.outputs[0]
    few, many = (out, x) if call.name == "pixel_shuffle" else (x, out)
    block = many.shape[-3] // few.shape[-3]
    idx = np.arange(many.shape[-3])
    space = call.graph.new_space(out.shape[-3])
    if call.name == "pixel_shuffle":
        call.link(space, idx // block, call.space(x, -3), idx)
    else:
        call.link(space, idx, call.space(x, -3), idx // block)
    call.set_out(out, [call.space(x, d) for d in range(x.dim() - 3)] + [space, None, None])


@rule("grid_sample")
def grid_sample(call: OpCall) -> None:
    x, grid = call.args[0], call.arg(1, "grid")
    out = call.outputs[0]
    call.unite(x, 0, grid, 0)
    call.set_out(out, [call.space(x, 0), call.space(x, 1)] + [None] * (out.dim() - 2))


@rule("roi_align", "roi_pool")
def roi_align(call: OpCall) -> None:
    x = call.args[0]
    for out in call.outputs:
        if out.dim() == x.dim():
            call.set_out(out, [None, call.space(x, 1)] + [None] * (out.dim() - 2))


# ---- layers ------------------------------------------------------------------------------------
def _conv_args(call: OpCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int, int]:
    """(input, weight, bias, output, groups, channel dim of the input) of a convolution call."""
    x = call.args[0]
    spatial = int(call.name[-2])
    groups = int(call.arg(6, "groups", 1))  # the same position for conv and conv_transpose
    return x, call.arg(1, "weight"), call.arg(2, "bias"), call.outputs[0], groups, x.dim() - spatial - 1


@rule("conv1d", "conv2d", "conv3d")
def conv(call: OpCall) -> None:
    x, w, b, out, groups, c = _conv_args(call)
    if groups > 1 and not call.in_module(torch.nn.modules.conv._ConvNd):
        call.unproven("a group count outside a conv layer")
    out_ch, in_per_group = w.shape[0], w.shape[1]
    if groups == 1:
        call.unite(x, c, w, 1)
        call.role(w, 1, CONSUMER)
    elif in_per_group == 1 and out_ch == groups:
        call.unite(x, c, w, 0)
    else:  # grouped: a whole conv group (its inputs and outputs) is one unit
        _group_units(call, call.space(x, c), in_per_group, call.space(w, 0), out_ch // groups)
    call.role(w, 0, PRODUCER)
    if b is not None:
        call.unite(b, 0, w, 0)
        call.role(b, 0, BIAS)
    spaces: list[int | None] = [None] * out.dim()
    if c == 1:
        spaces[0] = call.space(x, 0)
    spaces[c] = call.space(w, 0)
    call.set_out(out, spaces)


def _group_units(call: OpCall, in_space: int, in_per_group: int, out_space: int, out_per_group: int) -> None:
    g = call.graph
    n_in, n_out = g.size(in_space), g.size(out_space)
    call.link(in_space, np.arange(n_in), out_space, (np.arange(n_in) // in_per_group) * out_per_group)
    call.link(out_space, np.arange(n_out), out_space, (np.arange(n_out) // out_per_group) * out_per_group)


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(call: OpCall) -> None:
    x, w, b, out, groups, c = _conv_args(call)
    if groups > 1 and not call.in_module(torch.nn.modules.conv._ConvNd):
        call.unproven("a group count outside a conv layer")
    in_ch, out_per_group = w.shape[0], w.shape[1]
    call.unite(x, c, w, 0)
    call.role(w, 0, CONSUMER)
    if groups == 1:
        out_space = call.space(w, 1)
        call.role(w, 1, PRODUCER)
    else:
        out_space = call.graph.new_space(out_per_group * groups)
        _group_units(call, call.space(w, 0), in_ch // groups, out_space, out_per_group)
    if b is not None:
        call.graph.unite(call.space(b, 0), out_space)
        call.role(b, 0, BIAS)
    spaces: list[int | None] = [None] * out.dim()
    if c == 1:
        spaces[0] = call.space(x, 0)
    spaces[c] = out_space
    call.set_out(out, spaces)


@rule("linear")
def linear(call: OpCall) -> None:
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    out = call.outputs[0]
    if w.dim() != 2:
        return
    if call.is_param(w):  # the weight's masked columns make the contraction exact
        call.unite(x, -1, w, 1)
        call.role(w, 1, CONSUMER)
    call.role(w, 0, PRODUCER)
    if b is not None:
        call.unite(b, -1, w, 0)
        call.role(b, -1, BIAS)
    call.set_out(out, [call.space(x, d) for d in range(x.dim() - 1)] + [call.space(w, 0)])


@rule("addmm")
def addmm(call: OpCall) -> None:
    """``bias + x @ weight`` with a ``(in, out)`` weight: Hugging Face's ``Conv1D`` (GPT-2)."""
    bias, x, w = call.args[0], call.args[1], call.args[2]
    out = call.outputs[0]
    if x.dim() != 2 or w.dim() != 2 or not call.is_param(w):
        return
    call.unite(x, 1, w, 0)
    call.role(w, 0, CONSUMER)
    call.role(w, 1, PRODUCER)
    if isinstance(bias, torch.Tensor) and bias.dim() >= 1 and bias.shape[-1] == w.shape[1]:
        call.unite(bias, -1, w, 1)
        call.role(bias, -1, BIAS)
        for dim in range(bias.dim() - 1):
            call.claimed.add((id(bias), dim))
    call.set_out(out, [call.space(x, 0), call.space(w, 1)])


@rule("einsum")
def einsum(call: OpCall) -> None:
    """Letters kept in the output pass through (united across operands); contracted letters are united
    when a parameter takes part (like ``linear``), else frozen (like an activation matmul)."""
    equation = call.args[0]
    operands = list(call.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    out = call.outputs[0]
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return
    lhs, rhs = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or any(len(t) != o.dim() for t, o in zip(terms, operands, strict=True)):
        return
    has_param = any(call.is_param(o) for o in operands)
    first: dict[str, int] = {}
    for term, operand in zip(terms, operands, strict=True):
        for dim, letter in enumerate(term):
            if operand.shape[dim] == 1 and letter in rhs and out.shape[rhs.index(letter)] != 1:
                call.claimed.add((id(operand), dim))  # broadcast
            elif letter in rhs or has_param:
                space = call.space(operand, dim)
                call.graph.unite(first.setdefault(letter, space), space)
                if letter not in rhs:
                    call.role(operand, dim, CONSUMER)
    call.set_out(out, [first.get(letter) for letter in rhs])


@rule("matmul", "rmatmul", "mm", "bmm")
def matmul(call: OpCall) -> None:
    a, b = call.inputs[0], call.inputs[-1]
    if call.name == "rmatmul":
        a, b = b, a
    out = call.outputs[0]
    if a.dim() < 2 or b.dim() < 2 or len(call.inputs) != 2:
        return
    batch = _broadcast_prefix(call, out, [a, b])
    if call.is_param(a) or call.is_param(b):
        call.unite(a, -1, b, -2)
        call.role(a, -1, CONSUMER)
        call.role(b, -2, CONSUMER)
    call.set_out(out, batch + [call.space(a, -2), call.space(b, -1)])


def _broadcast_prefix(call: OpCall, out: torch.Tensor, tensors: list[torch.Tensor]) -> list[int | None]:
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


@rule("batch_norm", "instance_norm")
def batch_norm(call: OpCall) -> None:
    """Channels (dim 1) pass through. Statistics taken from the input mix it along the other dims, which
    are then frozen: a weight standardisation (``F.batch_norm(w.reshape(1, out, -1), training=True)``)
    averages over a weight's input channels there."""
    x, out = call.args[0], call.outputs[0]
    if x.dim() < 2:
        return
    channels = x.shape[1]
    tensorless = True
    for t in call.inputs[1:]:
        if t.dim() == 1 and t.shape[0] == channels:
            call.unite(x, 1, t, 0)
            call.role(t, 0, NORM)
            tensorless = False
    if tensorless and call.in_module((_BatchNorm, _InstanceNorm)):
        call.tracer.tensorless_layer(*call.tracer.running_module(), channels, call.space(x, 1))
    if _statistics_from_input(call.name, call.args, call.kwargs):
        call.set_out(out, [call.space(x, d) if d == 1 else None for d in range(x.dim())])
    else:
        call.set_out(out, call.spaces(x))


def _statistics_from_input(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a ``batch_norm`` or ``instance_norm`` call normalises by the input's own statistics."""
    if name == "batch_norm":
        return bool(argument(args, kwargs, 5, "training", False)) or argument(args, kwargs, 1, "running_mean") is None
    return bool(argument(args, kwargs, 5, "use_input_stats", True))


@rule("group_norm")
def group_norm(call: OpCall) -> None:
    """Channels of one norm group are one unit: removing whole groups keeps the statistics exact."""
    x, out = call.args[0], call.outputs[0]
    tensorless = call.arg(2, "weight") is None
    if not call.in_module(torch.nn.GroupNorm):
        if tensorless:
            return  # no tensor and no layer to hold the new group count: keep it whole
        call.unproven("a group count outside a GroupNorm")
    groups = int(call.arg(1, "num_groups"))
    channels = x.shape[1]
    per_group = channels // groups
    space = call.space(x, 1)
    if per_group > 1:
        idx = np.arange(channels)
        call.link(space, idx, space, (idx // per_group) * per_group)
    for t in call.inputs[1:]:
        if t.dim() == 1 and t.shape[0] == channels:
            call.unite(x, 1, t, 0)
            call.role(t, 0, NORM)
    if tensorless:
        call.tracer.tensorless_layer(*call.tracer.running_module(), channels, space)
    call.set_out(out, call.spaces(x))


@rule("layer_norm", "rms_norm")
def layer_norm(call: OpCall) -> None:
    """A norm over the last dim stays prunable when its module can compute statistics over kept channels."""
    x, out = call.args[0], call.outputs[0]
    shape = call.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    if k != 1:
        call.set_out(out, [call.space(x, d) if d < x.dim() - k else None for d in range(x.dim())])
        return
    for t in call.inputs[1:]:
        if t.dim() == 1:
            call.unite(x, -1, t, 0)
            call.role(t, 0, NORM)
    call.set_out(out, call.spaces(x))
    pending = call.tracer.pending_ln
    if pending:
        pending[-1].append((call.space(x, -1), call.name))
    else:
        call.graph.freeze(call.space(x, -1), "layer norm outside any module")


@rule("prelu")
def prelu(call: OpCall) -> None:
    x, w = call.args[0], call.arg(1, "weight")
    out = call.outputs[0]
    if w.numel() > 1 and x.dim() >= 2:
        call.unite(x, 1, w, 0)
        call.role(w, 0, NORM)
    else:
        call.claim_all(w)
    call.set_out(out, call.spaces(x))


@rule("embedding")
def embedding(call: OpCall) -> None:
    ids, w = call.args[0], call.arg(1, "weight")
    out = call.outputs[0]
    call.role(w, 1, PRODUCER)
    call.set_out(out, [call.space(ids, d) for d in range(ids.dim())] + [call.space(w, 1)])


@rule("multi_head_attention_forward")
def multi_head_attention(call: OpCall) -> None:
    """``nn.MultiheadAttention`` loses whole heads, each with the same channels of its query.

    Its code ties the inner width to the query's (``embed_dim``): inner channel ``r`` goes with query
    channel ``r``, and a head's ``head_dim`` channels go together, so the export keeps ``head_dim``
    (and the attention scale) and sets ``num_heads`` and ``embed_dim``.
    """
    query, key, value = call.args[0], call.arg(1, "key"), call.arg(2, "value")
    heads = int(call.arg(4, "num_heads"))
    if not call.in_module(torch.nn.MultiheadAttention):
        call.unproven("a head count outside a MultiheadAttention")
    out = call.outputs[0]
    width = query.shape[-1]
    if width % heads or out.shape[-1] != width:
        return
    idx = np.arange(width)
    inner = call.space(query, -1)
    call.link(inner, idx, inner, idx - idx % (width // heads))  # a head's channels are one unit
    separate = call.arg(17, "use_separate_proj_weight", False)
    if separate:
        projections = [(call.arg(18, "q_proj_weight"), query), (call.arg(19, "k_proj_weight"), key)]
        projections.append((call.arg(20, "v_proj_weight"), value))
    else:
        projections = [(call.arg(5, "in_proj_weight"), t) for t in (query, key, value)]
    for weight, source in projections:
        _rows_to_heads(call, weight, 0, inner, width, PRODUCER)
        call.unite(source, -1, weight, 1)
        call.role(weight, 1, CONSUMER)
    for index, name in ((6, "in_proj_bias"), (7, "bias_k"), (8, "bias_v")):
        bias = call.arg(index, name)
        if isinstance(bias, torch.Tensor):
            _rows_to_heads(call, bias, -1, inner, width, BIAS)
            for dim in range(bias.dim() - 1):
                call.claimed.add((id(bias), dim))
    out_weight, out_bias = call.arg(11, "out_proj_weight"), call.arg(12, "out_proj_bias")
    call.unite(out_weight, 1, query, -1)
    call.role(out_weight, 1, CONSUMER)
    call.role(out_weight, 0, PRODUCER)
    if isinstance(out_bias, torch.Tensor):
        call.unite(out_bias, 0, out_weight, 0)
        call.role(out_bias, 0, BIAS)
    for name, index in (("key_padding_mask", 14), ("attn_mask", 16)):
        if isinstance(mask := call.arg(index, name), torch.Tensor):
            call.claim_all(mask)
    call.set_out(out, [call.space(query, d) for d in range(query.dim() - 1)] + [call.space(out_weight, 0)])


def _rows_to_heads(call: OpCall, t: torch.Tensor, dim: int, inner: int, width: int, role: str) -> None:
    """Row ``r`` of a (possibly packed q/k/v) projection is inner channel ``r % width``."""
    rows = np.arange(t.shape[dim])
    call.link(call.space(t, dim), rows, inner, rows % width)
    call.role(t, dim, role)


@rule("scaled_dot_product_attention")
def scaled_dot_product_attention(call: OpCall) -> None:
    """Heads (and batch dims) pass through; a mask or bias shares them; grouped-query keys serve head groups."""
    q, k, v = call.args[0], call.arg(1, "key"), call.arg(2, "value")
    mask = call.arg(3, "attn_mask")
    out = call.outputs[0]
    tensors = [q, k, v] + ([mask] if isinstance(mask, torch.Tensor) and mask.dim() >= 2 else [])
    batch = _broadcast_prefix(call, out, tensors)
    if call.arg(7, "enable_gqa", False) and q.dim() >= 3 and k.shape[-3] not in (q.shape[-3], 1):
        heads, kv_heads = q.shape[-3], k.shape[-3]  # query head h reads key/value head h // (heads // kv_heads)
        idx = np.arange(heads)
        call.link(call.space(q, -3), idx, call.space(k, -3), idx // (heads // kv_heads))
        call.unite(k, -3, v, -3)
    call.unite(k, -2, v, -2)
    if len(tensors) == 4:
        for dim, other in ((-2, q), (-1, k)):
            if mask.shape[dim] == other.shape[-2]:
                call.unite(mask, dim, other, -2)
            elif mask.shape[dim] == 1:
                call.claimed.add((id(mask), mask.dim() + dim))
    call.set_out(out, batch + [call.space(q, -2), call.space(v, -1)])


# ---- shortcuts: the commonest calls, ruled without an OpCall ----------------------------------------
def _only_tensors(args: tuple, kwargs: dict, count: int) -> list[torch.Tensor] | None:
    """The tensors among ``args[1:]`` and ``kwargs`` when there are ``count`` of them and nothing else may
    hold one (each argument a tensor or a plain value); else None."""
    found: list[torch.Tensor] = []
    for value in (*args[1:], *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif not isinstance(value, NO_TENSORS):
            return None
    return found if len(found) == count else None


def _unary_elementwise(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """An :func:`elementwise` op of one tensor whose output has its shape (activations, dropout): the output
    takes the input's spaces."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return False
    if _only_tensors(args, kwargs, 0) is None:
        return False
    node = tracer.node(x)
    tracer.bind(out, TensorNode(node.spaces, tuple(out.shape), node.tainted))
    return True


def _full_batch_norm(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """:func:`batch_norm` with running statistics and affine tensors (four distinct 1-D tensors of the channel
    count): the four tensors share the input's channels, which pass to the output. Normalised by the running
    statistics, every other dim passes too; by the input's own (training), the others freeze."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.dim() < 2 or out.shape != x.shape:
        return False
    stats = _only_tensors(args, kwargs, 4)
    if stats is None or len({id(t) for t in (x, *stats)}) != 5:
        return False
    channels = x.shape[1]
    if any(t.dim() != 1 or t.shape[0] != channels for t in stats):
        return False
    node = tracer.node(x)
    tainted = node.tainted
    for t in stats:  # in the order run_rule looks them up: their nodes are made in that order
        t_node = tracer.node(t)
        tracer.graph.unite(node.spaces[1], t_node.spaces[0])
        if id(t) in tracer.owned:
            tracer.roles.setdefault((id(t), 0), NORM)
        tainted = tainted or t_node.tainted
    if not _statistics_from_input(name, args, kwargs):
        tracer.bind(out, TensorNode(node.spaces, tuple(out.shape), tainted))
        return True
    graph, reason = tracer.graph, call_reason(tracer, name)
    spaces = [
        space if d == 1 else graph.new_space(n, reason)
        for d, (space, n) in enumerate(zip(node.spaces, out.shape, strict=True))
    ]
    tracer.bind(out, TensorNode(tuple(spaces), tuple(out.shape), tainted))
    for d, space in enumerate(node.spaces):  # averaged over: what the rule leaves unclaimed
        if d != 1:
            graph.freeze(space, reason)
    return True


def _concatenation(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """:func:`cat` of two or more tensors of the output's rank (no legacy empty tensor), its ``dim`` an int given by
    position or keyword: the other dims are united across the parts, the parts' channels are linked into a new
    space along ``dim``; every dim of every part is claimed, so nothing is frozen."""
    tensors = args[0] if args else None
    if not isinstance(out, torch.Tensor) or type(tensors) not in (list, tuple) or len(tensors) < 2:
        return False
    if len(args) > 2 or (kwargs and (len(args) == 2 or kwargs.keys() != {"dim"})):
        return False
    dim = args[1] if len(args) == 2 else kwargs.get("dim", 0)
    ndim = out.dim()
    if type(dim) is not int or not ndim or not all(isinstance(t, torch.Tensor) and t.dim() == ndim for t in tensors):
        return False
    d = dim % ndim
    graph = tracer.graph
    merged = graph.new_space(out.shape[d]) if d == 0 else None  # made first, as the rule does
    nodes = [tracer.node(t) for t in tensors]
    spaces = list(nodes[0].spaces)
    for j, first in enumerate(spaces):
        if j != d:
            for node in nodes[1:]:
                graph.unite(first, node.spaces[j])
    spaces[d] = merged = graph.new_space(out.shape[d]) if merged is None else merged
    graph.concat(merged, [node.spaces[d] for node in nodes], [t.shape[d] for t in tensors])
    tracer.bind(out, TensorNode(tuple(spaces), tuple(out.shape), any(node.tainted for node in nodes)))
    return True


def _convolution(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """:func:`conv` of a batched input by an ungrouped weight, or a depthwise one in a conv layer, every argument
    given by position (as ``nn.Conv2d`` calls it): channels flow from the input to the weight's columns (its rows,
    depthwise) and from the weight's rows to the output; the positions and the kernel's dims freeze."""
    if kwargs or not 2 <= len(args) <= 7 or not isinstance(out, torch.Tensor):
        return False
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    groups = args[6] if len(args) > 6 else 1
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and (b is None or isinstance(b, torch.Tensor))):
        return False
    if type(groups) is not int or groups < 1 or not all(_holds_no_tensor(a) for a in args[3:6]):
        return False
    ndim = int(name[-2]) + 2
    if x.dim() != ndim or w.dim() != ndim or out.dim() != ndim or (b is not None and b.dim() != 1):
        return False
    if x is w or b is x or b is w:
        return False
    depthwise = groups > 1
    if depthwise and (w.shape[1] != 1 or w.shape[0] != groups or not running_in(tracer, torch.nn.modules.conv._ConvNd)):
        return False
    graph, roles, owned = tracer.graph, tracer.roles, tracer.owned
    x_node, w_node = tracer.node(x), tracer.node(w)
    graph.unite(x_node.spaces[1], w_node.spaces[0 if depthwise else 1])
    if id(w) in owned:
        if not depthwise:
            roles.setdefault((id(w), 1), CONSUMER)
        roles.setdefault((id(w), 0), PRODUCER)
    tainted = x_node.tainted or w_node.tainted
    if b is not None:
        b_node = tracer.node(b)
        graph.unite(b_node.spaces[0], w_node.spaces[0])
        if id(b) in owned:
            roles.setdefault((id(b), 0), BIAS)
        tainted = tainted or b_node.tainted
    reason = call_reason(tracer, name)
    positions = [graph.new_space(n, reason) for n in out.shape[2:]]
    tracer.bind(out, TensorNode((x_node.spaces[0], w_node.spaces[0], *positions), tuple(out.shape), tainted))
    for space in (*x_node.spaces[2:], *w_node.spaces[1 + (not depthwise) :]):  # what the rule leaves unclaimed
        graph.freeze(space, reason)
    return True


def _holds_no_tensor(value: Any) -> bool:
    """Whether ``value`` is a plain argument: a number, string or the like, or a tuple or list of ints."""
    if isinstance(value, (tuple, list)):
        return all(type(v) is int for v in value)
    return isinstance(value, NO_TENSORS)


_SHORTCUTS: dict[Any, Callable[[Tracer, str, tuple, dict, Any], bool]] = {
    elementwise: _unary_elementwise,
    batch_norm: _full_batch_norm,
    cat: _concatenation,
    conv: _convolution,
}
