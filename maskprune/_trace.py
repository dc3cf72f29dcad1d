"""Trace a model by running it: every torch function call is seen, with real shapes.

A :class:`torch.overrides.TorchFunctionMode` records each call and applies the
op's channel rule (:mod:`maskprune._rules`) on the fly; global module hooks
attribute calls to module paths. Nothing is left behind: hooks, modes, the
training flags of every module, buffers and the random state are restored,
also when the forward raises.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _rules
from ._attributes import module_size_sites
from ._graph import ChannelGraph
from ._layers import LAST_DIM_NORMS, RMS_NORM_RULE, LayerRule, named_like_rms_norm, rms_norm_eps
from ._meta import FAST_KERNELS, FastMeta, first_is_meta, has_meta_tensors, meta_copy, to_meta
from ._reads import VALUE_READS, value_read, watched_functions
from ._records import (
    LAYER,
    MODEL_INPUT,
    MODEL_OUTPUT,
    WIDTH,
    ControlFlowSite,
    LayerNormSite,
    LeafCall,
    OwnedTensor,
    SizeSite,
    TensorNode,
    Trace,
    TracedSize,
    call_model,
    iter_tensors,
    preserved_state,
)
from ._rules._core import PRODUCER
from ._walk import ModelIndex, set_mode
from .errors import TraceError

_SIZE_READS = {"size", "shape", "numel", "len"}


def _rule_context() -> Any:
    """Rules and hooks read shapes without ``__torch_function__``: no mode below the recorder sees them."""
    return torch._C.DisableTorchFunction()


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if tracer.leaf_depth:
            return tracer.call(func, args, kwargs)
        return tracer.apply(func, args, kwargs)


class Tracer:
    """Runs the model and builds the channel graph. Used through :func:`trace`."""

    def __init__(
        self, index: ModelIndex, leaf_rules: Mapping[type, Any], fast: Mapping[Any, Any] | None = None
    ) -> None:
        self.model = index.model
        self.fast = fast or {}  # shape-only kernels to call directly (a trace on the meta device, see FastMeta)
        self.graph = ChannelGraph()
        modules = index.table
        self.owned = index.owned
        self.param_nodes: dict[int, TensorNode] = {}
        self.nodes: dict[int, TensorNode] = {}
        self.watched: dict[int, weakref.ref] = {}  # a freed tensor's id may be reused: forget its node then
        self.roles: dict[tuple[int, int], str] = {}
        self.module_paths = index.paths
        self.childless = {id(m) for _, m in modules if all(c is None for c in m._modules.values())}
        self.stack: list[nn.Module] = []
        self.ops_in_call: list[list[str]] = []
        self.pending_ln: list[list[tuple[int, int]]] = []
        self.module_outputs: dict[str, list[TensorNode]] = {}
        self.layer_norms: list[LayerNormSite] = []
        self.unknown_ops: dict[tuple[str, str], int] = {}
        self.leaf_rules = dict(leaf_rules)
        named = {kind for kind in {type(m) for _, m in modules} if named_like_rms_norm(kind)}  # most models: none
        for module in dict.fromkeys(m for _, m in modules if type(m) in named):
            if type(module) not in self.leaf_rules and rms_norm_eps(module) is not None:
                self.leaf_rules[type(module)] = RMS_NORM_RULE
        for kind, module_rule in _module_rules(modules).items():
            self.leaf_rules.setdefault(kind, module_rule)
        self.leaf_depth = 0
        self.size_reads: set[int] = set()
        self.size_sites: list[SizeSite] = []
        self.part_spaces: set[int] = set()  # the parts of splits by a written count (_rules.shapes._split_into_heads)
        self.tensorless: dict[int, int] = {}  # id of a norm layer without tensors -> the channel space it normalises
        # calls whose rule cannot prove that an export handles them (a trial export checks), besides the
        # size reads and size sites
        self.unproven: list[str] = []
        self.leaf_calls: list[LeafCall] = []
        self.control_flow: dict[tuple[str, str, str, int], ControlFlowSite] = {}  # see maskprune._reads
        self.functions: list[str] = []  # the autograd.Functions running (innermost last)
        self.first_pass = True
        self.calls: dict[str, int] = {}
        self.rules = _rules

    # ---- nodes -------------------------------------------------------------------------
    def path(self) -> str:
        for module in reversed(self.stack):
            path = self.module_paths.get(id(module))
            if path is not None:
                return path or "<root>"
        return "<root>"

    def running_module(self) -> tuple[str, nn.Module | None]:
        """The innermost module of the model that is running (its path, ``""`` for the root)."""
        for module in reversed(self.stack):
            path = self.module_paths.get(id(module))
            if path is not None:
                return path, module
        return "", None

    def size_site(self, value: int, space: int, kind: str = WIDTH, written: bool = True) -> None:
        """Record that the running module's code wrote ``value`` (or, ``written=False``, implied it), a
        count of ``space``'s channels."""
        self.size_sites.append(SizeSite(self.running_module()[0], value, space, kind, written))

    def tensorless_layer(self, path: str, module: nn.Module, width: int, space: int) -> None:
        """``module``, a torch norm layer without tensors to slice, normalises ``width`` channels of ``space``: an
        export sets its width attributes (``num_features`` …). Its calls share one space, as a weight would make
        them share it."""
        first = self.tensorless.setdefault(id(module), space)
        if first == space:
            self.size_sites.append(SizeSite(path, width, space, LAYER, written=False))
        else:
            self.graph.unite(first, space)

    def node(self, t: torch.Tensor) -> TensorNode:
        key = id(t)
        node = self.nodes.get(key)
        if node is not None and node.shape == t.shape:
            return node
        if key in self.owned:
            node = self.param_nodes.get(key)
            if node is None:
                spaces = tuple(self.graph.new_space(n) for n in t.shape)
                node = TensorNode(spaces, tuple(t.shape), tainted=self.owned[key].is_param)
                self.param_nodes[key] = node
            return node
        reason = f"a tensor made outside the traced torch ops (torch.from_numpy, an extension) in {self.path()}"
        self.unproven.append(reason)  # made by an op the trace did not see: what it read is unknown
        return self.fresh(t, reason)

    def known(self, t: torch.Tensor) -> TensorNode | None:
        """The node of ``t`` if a traced op made it (or it is the model's), else None; makes no node."""
        node = self.nodes.get(id(t))
        if node is not None and node.shape == t.shape:
            return node
        return self.node(t) if id(t) in self.owned else None

    def is_constant(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s values are the same for every input and weights (see :class:`TensorNode`)."""
        node = self.known(t)
        return node is not None and node.constant

    def fresh(self, t: torch.Tensor, reason: str, tainted: bool = True, constant: bool = False) -> TensorNode:
        node = TensorNode(tuple(self.graph.new_space(n, reason) for n in t.shape), tuple(t.shape), tainted, constant)
        self.bind(t, node)
        return node

    def bind(self, t: torch.Tensor, node: TensorNode) -> None:
        if id(t) in self.owned:
            return
        key = id(t)
        self.nodes[key] = node
        if key not in self.watched:
            self.watched[key] = weakref.ref(t, partial(self.forget, key))

    def forget(self, key: int, _: weakref.ref) -> None:
        """A traced tensor was freed: drop its node, so intermediate activations are not kept alive."""
        self.nodes.pop(key, None)
        self.watched.pop(key, None)

    # ---- ops ---------------------------------------------------------------------------
    def call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``func(*args, **kwargs)``, by its shape-only kernel when it has one (what FastMeta would do)."""
        fast = self.fast.get(func)
        if fast is not None:
            with _rule_context():
                out = fast(*args, **kwargs) if first_is_meta(args) else NotImplemented
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)

    def apply(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        name, inplace = self.rules.op_name(func)
        if name == "iter":
            out = list(func(*args, **kwargs))
            with _rule_context():
                self.rules.run_rule(self.rules.OpCall(self, "unbind", False, (args[0], 0), {}, out))
            return iter(out)
        out = self.call(func, args, kwargs)
        with _rule_context():
            if name in _SIZE_READS and args and isinstance(args[0], torch.Tensor):
                self.note_size_read(args[0], name, args[1:] or tuple(kwargs.values()))
                out = self.traced_size(args[0], out, args[1:] or tuple(kwargs.values()))
            elif name in VALUE_READS and not isinstance(out, torch.Tensor):
                out = value_read(self, name, args, out)
            if self.ops_in_call:
                self.ops_in_call[-1].append(name)
            self.rules.apply_rule(self, name, inplace, args, kwargs, out)
        return out

    def traced_size(self, t: torch.Tensor, out: Any, rest: tuple) -> Any:
        """Sizes read from a tensor remember the channel space they measured (see :class:`TracedSize`)."""
        node = self.nodes.get(id(t)) or self.param_nodes.get(id(t))
        if node is None:
            return out
        if isinstance(out, torch.Size) and len(out) == len(node.spaces):
            return torch.Size([TracedSize.of(n, space) for n, space in zip(out, node.spaces, strict=True)])
        if type(out) is int and rest and isinstance(rest[0], int) and node.spaces:
            return TracedSize.of(out, node.spaces[rest[0] % len(node.spaces)])
        return out

    def note_size_read(self, t: torch.Tensor, name: str, rest: tuple) -> None:
        """Remember spaces whose size the model's code read: a trial export checks them first."""
        node = self.nodes.get(id(t)) or self.param_nodes.get(id(t))
        if node is None:
            return
        if name == "size" and rest and isinstance(rest[0], int):
            self.size_reads.add(node.spaces[rest[0] % len(node.spaces)])
        elif name == "__len__" and node.spaces:
            self.size_reads.add(node.spaces[0])
        else:
            self.size_reads.update(node.spaces)

    # ---- module hooks ------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        self.stack.append(module)
        self.ops_in_call.append([])
        self.pending_ln.append([])
        if type(module) in self.leaf_rules:
            self.leaf_depth += 1

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        leaf = self.leaf_rules.get(type(module))
        if leaf is None and self.leaf_depth:  # inside a leaf module: nothing to record
            self.end_call()
            return
        with _rule_context():  # the shapes this hook reads are not the model's
            self._after_module(module, leaf, args, output)

    def _after_module(self, module: nn.Module, leaf: Any, args: tuple, output: Any) -> None:
        if leaf is not None:
            self.leaf_depth -= 1
            if self.leaf_depth == 0:
                if isinstance(leaf, LayerRule):
                    self.rules.run_leaf_rule(self, module, leaf, args, output)
                else:  # one of _module_rules()
                    leaf(self, module, args, output)
                if leaf is RMS_NORM_RULE:
                    self.record_rms_norm(module, args)
        ops, ln_sites = self.end_call()
        if self.leaf_depth:
            return
        path = self.module_paths.get(id(module))
        if path is not None:
            key = path or "<root>"
            is_leaf_call = self.first_pass and id(module) in self.childless
            if is_leaf_call or key not in self.module_outputs:
                outputs = self.output_nodes(output)
                self.module_outputs.setdefault(key, outputs)
                if is_leaf_call:
                    self.record_leaf_call(path, module, args, outputs)
            if leaf is None:
                inputs = [self.nodes[id(t)] for t in iter_tensors(args) if id(t) in self.nodes]
                self.size_sites += module_size_sites(path, module, inputs, self.output_nodes(output))
        for space, kind in ln_sites:
            self.resolve_layer_norm(module, path, ops, space, kind, args, output)

    def end_call(self) -> tuple[list[str], list[tuple[int, int]]]:
        """Leave the innermost module call (the reverse of :meth:`pre_hook`): its op names and pending layer norms."""
        self.stack.pop()
        return self.ops_in_call.pop(), self.pending_ln.pop()

    def output_nodes(self, output: Any) -> list[TensorNode]:
        """The nodes of a module's output tensors that the trace knows."""
        nodes = self.nodes
        if isinstance(output, torch.Tensor):
            node = nodes.get(id(output))
            return [] if node is None else [node]
        return [nodes[id(t)] for t in iter_tensors(output) if id(t) in nodes]

    def record_rms_norm(self, module: nn.Module, args: tuple) -> None:
        """A model's own RMS norm module: its statistic is rescaled to the kept channels when masked."""
        path = self.module_paths.get(id(module))
        x = next(iter_tensors(args), None)
        node = self.param_nodes.get(id(module.weight))
        if path is None or x is None or node is None:
            return
        eps = rms_norm_eps(module)
        self.layer_norms.append(LayerNormSite("rms_scale", module, path, node.spaces[0], x.dim() - 1, eps))

    def record_leaf_call(self, path: str, module: nn.Module, args: tuple, outputs: list[TensorNode]) -> None:
        calls = self.calls.get(path, 0)
        self.calls[path] = calls + 1
        inputs = [self.nodes[id(t)] for t in iter_tensors(args) if id(t) in self.nodes]
        self.leaf_calls.append(LeafCall(path, module, calls, inputs, outputs))

    def resolve_layer_norm(self, module, path, ops, space, kind, args, output) -> None:
        """Keep a layer norm over a channel space prunable only if its module can be hooked exactly."""
        inputs = list(iter_tensors(args))
        outputs = list(iter_tensors(output))
        plain = set(ops) <= {"permute", "contiguous", "layer_norm", "rms_norm", "transpose", "movedim"}
        ok = (
            isinstance(module, LAST_DIM_NORMS)
            and next(module.children(), None) is None  # the hook recomputes the norm alone: no act or drop after it
            and plain
            and ops.count("layer_norm") + ops.count("rms_norm") == 1
            and len(inputs) == 1
            and len(outputs) == 1
            and inputs[0].shape == outputs[0].shape
            and path is not None
        )
        if ok:
            in_node = self.nodes.get(id(inputs[0]))
            out_node = self.nodes.get(id(outputs[0]))
            find = self.graph.find
            in_dims = [d for d, s in enumerate(in_node.spaces) if find(s) == find(space)] if in_node else []
            out_dims = [d for d, s in enumerate(out_node.spaces) if find(s) == find(space)] if out_node else []
            ok = len(in_dims) == 1 and in_dims == out_dims
        if ok:
            if getattr(module, "weight", None) is None:
                self.tensorless_layer(path, module, inputs[0].shape[in_dims[0]], space)
            self.layer_norms.append(
                LayerNormSite(
                    kind=kind,
                    module=module,
                    path=path,
                    space=space,
                    in_dim=in_dims[0],
                    eps=module.eps if module.eps is not None else torch.finfo(inputs[0].dtype).eps,
                )
            )
        else:
            where = path if path else "an unnamed module"
            self.graph.freeze(space, f"layer norm in {where} cannot be masked exactly")

    # ---- running -----------------------------------------------------------------------
    def run(self, inputs: Any) -> None:
        for t in iter_tensors(inputs):
            if id(t) not in self.owned:
                self.fresh(t, MODEL_INPUT, tainted=False)
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self.pre_hook)
        post = torch.nn.modules.module.register_module_forward_hook(self.post_hook)
        # a meta trace enters FastMeta for the forward only: around it (preserved_state() reads every buffer's
        # ``is_meta``) each read of a tensor attribute would pass through its Python __torch_function__
        kernels = FastMeta() if self.fast else nullcontext()
        try:
            with torch.no_grad(), kernels, _Recorder(self), watched_functions(self, _rule_context):
                output = call_model(self.model, inputs)
        finally:
            pre.remove()
            post.remove()
            self.stack.clear()
            self.ops_in_call.clear()
            self.pending_ln.clear()
            self.leaf_depth = 0
            self.functions.clear()
        for t in iter_tensors(output):
            for space in self.node(t).spaces:
                self.graph.freeze(space, MODEL_OUTPUT)


def _module_rules(modules: list[tuple[str, nn.Module]]) -> dict[type, Callable]:
    """The module types traced as one layer by a rule of :mod:`maskprune._rules` (weight-standardised convs,
    EvoNorm layers): those whose layers all pass the rule's check."""
    checks = ((_rules.is_standardised_conv, _rules.standardised_conv), (_rules.is_evo_norm, _rules.evo_norm))
    found: dict[type, Callable | None] = {}
    for _, m in modules:
        kind = type(m)
        if kind.__module__.startswith("torch.") or found.get(kind, 0) is None:
            continue
        module_rule = next((module_rule for check, module_rule in checks if check(m)), None)
        found[kind] = module_rule if found.get(kind, module_rule) is module_rule else None
    return {kind: module_rule for kind, module_rule in found.items() if module_rule is not None}


def trace(
    model: nn.Module,
    inputs: Any,
    leaf_rules: Mapping[type, Any],
    frozen_modules: Mapping[str, nn.Module],
    on_meta: bool = True,
    ignored_modules: Mapping[str, nn.Module] | None = None,
) -> Trace:
    """Trace ``model`` on ``inputs`` in its current mode, then in the other mode if parameters were unreached.

    The trace runs on a weightless meta-device copy of the model (shapes only, no arithmetic) and
    is expressed in the model's own tensors and modules; a model whose forward reads tensor values
    (``.item()``, ``nonzero``, top-k and NMS, data-dependent branches) makes that copy fail, and is
    traced by running the model itself, as is a model that is already on the meta device
    (``on_meta=False`` always runs the model itself).

    ``frozen_modules`` keep every dimension of their tensors; ``ignored_modules`` keep their output channels
    (their weights' output rows; all of a module without such rows, as a norm layer), while their input
    channels follow the layers that produce them.

    Examples:
        >>> t = trace(torch.nn.Linear(4, 3), torch.randn(2, 4), {}, {})
        >>> sorted(o.qualname for o in t.owned.values())
        ['bias', 'weight']
    """
    index = ModelIndex(model)
    if on_meta and not has_meta_tensors(index):
        try:
            originals: dict[int, torch.Tensor] = {}
            shadow = meta_copy(index, originals)
            shadow_frozen = {path: shadow.get_submodule(path) for path in frozen_modules}
            shadow_ignored = {path: shadow.get_submodule(path) for path in ignored_modules or {}}
            shadow_trace = _trace_model(
                ModelIndex(shadow),
                to_meta(inputs),
                leaf_rules,
                shadow_frozen,
                strict=True,
                fast=FAST_KERNELS,
                ignored_modules=shadow_ignored,
            )
        except Exception:  # noqa: BLE001 - the forward needs values (or a kernel meta lacks): run it for real
            pass
        else:
            on_model = _on_model(shadow_trace, index, shadow, originals)
            if on_model is not None:
                return on_model
    return _trace_model(index, inputs, leaf_rules, frozen_modules, strict=False, ignored_modules=ignored_modules)


def _trace_model(
    index: ModelIndex,
    inputs: Any,
    leaf_rules: Mapping[type, Any],
    frozen_modules: Mapping[str, nn.Module],
    strict: bool,
    fast: Mapping[Any, Any] | None = None,
    ignored_modules: Mapping[str, nn.Module] | None = None,
) -> Trace:
    """Run the tracer on ``index``'s model; ``strict``: a failed second (other-mode) pass raises instead of
    freezing what it reached.

    ``fast``: shape-only kernels the tracer calls directly (on a meta copy; its forward then runs inside
    :class:`FastMeta`).
    """
    tracer = Tracer(index, leaf_rules, fast)
    model = index.model
    notes: list[str] = []
    modes = [model.training]
    with preserved_state(index):
        try:
            tracer.run(inputs)
        except TraceError:
            raise
        except Exception as error:  # the model's own error, shown to the user
            raise TraceError(f"the model rejected the example inputs: {type(error).__name__}: {error}") from error
        unreached = _unreached(tracer)
        tracer.first_pass = False
        if unreached:
            other = not model.training
            set_mode(model, other)
            reached_before = set(tracer.param_nodes)
            try:
                tracer.run(inputs)
                modes.append(other)
            except Exception as error:  # noqa: BLE001 - a best-effort second pass
                if strict:
                    raise
                mode = "train" if other else "eval"
                notes.append(f"the {mode}-mode trace failed ({type(error).__name__}: {error})")
                for key in set(tracer.param_nodes) - reached_before:  # half-traced: keep them whole
                    for space in tracer.param_nodes[key].spaces:
                        tracer.graph.freeze(space, f"reached only by the failed {mode}-mode trace")
            unreached = _unreached(tracer)
    for path, module in frozen_modules.items():
        _freeze_module(tracer, module, f"frozen by the user ({path})", outputs_only=False)
    for path, module in (ignored_modules or {}).items():
        _freeze_module(tracer, module, f"ignored by the user ({path})", outputs_only=True)
    tracer.watched.clear()  # the nodes are no longer looked up: stop following the tensors
    return Trace(
        graph=tracer.graph,
        owned=tracer.owned,
        param_nodes=tracer.param_nodes,
        roles=tracer.roles,
        module_outputs=tracer.module_outputs,
        layer_norms=tracer.layer_norms,
        unknown_ops=tracer.unknown_ops,
        unreached=unreached,
        modes=modes,
        size_reads=tracer.size_reads,
        leaf_calls=tracer.leaf_calls,
        size_sites=tracer.size_sites,
        notes=notes,
        unproven=tracer.unproven,
        control_flow=list(tracer.control_flow.values()),
    )


def _on_model(
    shadow_trace: Trace, index: ModelIndex, shadow: nn.Module, originals: dict[int, torch.Tensor]
) -> Trace | None:
    """The trace of ``shadow`` (a meta copy of the model) in the model's own tensors and modules.

    ``index``: the model's. ``originals``: each of the shadow's tensors' original in the
    model, by the shadow tensor's ``id``. None when the shadow holds a tensor that is not a copy of one of the
    model's (a module whose own ``__deepcopy__`` made new ones).
    """
    if any(key not in originals for key in shadow_trace.owned):
        return None
    keys = {key: id(originals[key]) for key in shadow_trace.owned}
    owned = {keys[key]: OwnedTensor(originals[key], o.is_param, o.names) for key, o in shadow_trace.owned.items()}
    modules = index.modules
    return dataclasses.replace(
        shadow_trace,
        owned=owned,
        param_nodes={keys[key]: node for key, node in shadow_trace.param_nodes.items()},
        roles={(keys[key], dim): role for (key, dim), role in shadow_trace.roles.items()},
        layer_norms=[dataclasses.replace(s, module=modules[s.path]) for s in shadow_trace.layer_norms],
        leaf_calls=[LeafCall(c.path, modules[c.path], c.call, c.inputs, c.outputs) for c in shadow_trace.leaf_calls],
        shadow=shadow,
    )


def _freeze_module(tracer: Tracer, module: nn.Module, reason: str, outputs_only: bool) -> None:
    """Freeze the channels of ``module``'s tensors: every dimension, or (``outputs_only``) the output rows of its
    weights, and every dimension of a module without output rows (a norm layer, a PReLU)."""
    tensors = [*module.parameters(), *module.buffers()]
    nodes = {id(t): tracer.param_nodes[id(t)] for t in tensors if id(t) in tracer.param_nodes}
    spaces = [(key, dim, space) for key, node in nodes.items() for dim, space in enumerate(node.spaces)]
    outputs = [space for key, dim, space in spaces if tracer.roles.get((key, dim)) == PRODUCER]
    for space in outputs if outputs_only and outputs else [space for _, _, space in spaces]:
        tracer.graph.freeze(space, reason)


def _unreached(tracer: Tracer) -> list[str]:
    return [o.qualname for key, o in tracer.owned.items() if o.is_param and key not in tracer.param_nodes]
