"""The user-facing lifecycle: Mask(...) -> make() -> do_mask() -> generate_pruned_model()."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _verify
from ._activations import strip_watch_hooks
from ._algorithm import Algorithm
from ._attributes import Attributes, attribute_updates
from ._collector import collector_paused
from ._export import Plan, TensorDims, apply_plan, sliced_copy
from ._flops import FlopsProbe
from ._groups import (
    Group,
    GroupLayout,
    build_layout,
    format_names,
    groups_by_module,
    groups_of_spaces,
    prunable_spaces,
    unit_index,
    unit_views,
)
from ._layers import leaf_rules
from ._masking import MaskRuntime
from ._probe import fixed_size_groups, needs_trial_export
from ._pruning import Pruner
from ._recalibrate import recalibrate_bn
from ._replay import keep_flags_of
from ._report import Sparsity, sparsity_report
from ._settings import Settings
from ._spec import PruneSpec, as_spec, attach_text
from ._state import load_mask_state, mask_state
from ._trace import Trace, iter_tensors, trace
from ._walk import module_table
from .distributed import broadcast_flags
from .errors import ExportError, NothingToPruneError, NotMadeError


class Mask:
    """Soft masks over a model's dependency groups, and their export to a smaller model.

    Args:
        model: the model to prune; it keeps its parameters' names and shapes while masked.
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments.
        input_shape: shorthand for ``example_inputs=torch.randn(input_shape)`` on the model's device.
        algorithm: scores channels (see :mod:`maskprune.algorithms`); needed by :meth:`do_mask`.
        ratio: fraction of the channels to remove, in [0, 1) (of each group, or of all of them with
            ``allocation="global"``).
        target_flops: instead of ``ratio``, the fraction of the model's FLOPs to remove, in (0, 1),
            met within 1% as counted on the exported model (``0.5`` halves the FLOPs).
        ratios: per-module ratio overrides, ``{module or qualified name: ratio}``; a group takes the
            entry of the most specific module holding its first producer.
        allocation: ``"uniform"`` (every group loses ``ratio``) or ``"global"`` (channels ranked across
            groups by score, each group's scores divided by their mean unless the criterion's raw
            scores compare across groups).
        min_channels: channels every group keeps at least.
        max_ratio: the largest fraction any group loses (global ranking, random ratios, FLOPs search).
        round_to: kept channels rounded up to a multiple of this (for fast kernels).
        steps: ``do_mask()`` calls to reach the target, each moving one step of ``ramp``.
        ramp: ``"linear"``, ``"exp"`` (the kept fraction shrinks by a constant factor) or ``"cubic"`` (AGP).
        pre_layer: layer-by-layer mode: each ``do_mask()`` prunes the next group to its target and
            returns True while groups remain.
        semantics: ``"frozen"`` (a removed channel stays zero and gets no gradient) or ``"soft"``
            (soft filters, as SFP and FPGM: ``do_mask()`` zeroes the removed filters, which keep
            training, and every ``do_mask()`` re-selects from all channels).
        ignore: modules (or qualified names) whose channels must never be pruned.
        recalibrate: batches (a DataLoader, a list of tensors) on which :func:`~maskprune.recalibrate_bn`
            re-estimates the BatchNorm statistics after every ``do_mask()`` that changed the masks.

    Example:
        >>> model = torchvision.models.resnet18()                               # doctest: +SKIP
        >>> mask = Mask(model, input_shape=(1, 3, 224, 224), algorithm=L1Norm(), ratio=0.5)  # doctest: +SKIP
        >>> mask.make().do_mask()                                               # doctest: +SKIP
        >>> pruned = mask.generate_pruned_model()                               # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        *,
        input_shape: Sequence[int] | None = None,
        algorithm: Algorithm | None = None,
        ratio: float = 0.5,
        target_flops: float | None = None,
        ratios: Mapping[nn.Module | str, float] | None = None,
        allocation: str = "uniform",
        min_channels: int = 1,
        max_ratio: float = 0.9,
        round_to: int = 1,
        steps: int = 1,
        ramp: str = "linear",
        pre_layer: bool = False,
        semantics: str = "frozen",
        ignore: Iterable[nn.Module | str] = (),
        recalibrate: Iterable[Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if algorithm is not None and not callable(getattr(algorithm, "score", None)):
            raise TypeError(
                f"algorithm must have a score(group) method (a maskprune.Algorithm), got {type(algorithm).__name__}"
            )
        if recalibrate is not None and not isinstance(recalibrate, Iterable):
            raise TypeError(f"recalibrate must be an iterable of batches, got {type(recalibrate).__name__}")
        if not isinstance(ratios, (Mapping, type(None))):
            raise TypeError(f"ratios must be a dict {{module or name: ratio}}, got {type(ratios).__name__}")
        named_ratios = {}
        for key, value in (ratios or {}).items():
            (name,) = _resolve_modules(model, [key], "ratios")
            named_ratios[name] = value
        self.settings = Settings(
            ratio=ratio,
            target_flops=target_flops,
            ratios=named_ratios,
            allocation=allocation,
            min_channels=min_channels,
            max_ratio=max_ratio,
            round_to=round_to,
            steps=steps,
            ramp=ramp,
            pre_layer=pre_layer,
            semantics=semantics,
        )
        self.model = model
        self.algorithm = algorithm
        self.example_inputs = _example_inputs(model, example_inputs, input_shape)
        self.ignore = _resolve_modules(model, ignore, "ignore")
        self.recalibrate = recalibrate
        self._made = False
        self._trace: Trace | None = None
        self._layout: GroupLayout | None = None
        self._tensor_dims: TensorDims | None = None
        self._groups: list[Group] = []
        self._keep = np.ones(0, dtype=bool)
        self._runtime: MaskRuntime | None = None
        self._pruner: Pruner | None = None
        self._requested: dict[int, float] = {}
        self._probe: FlopsProbe | None = None

    @property
    def ratio(self) -> float:
        return self.settings.ratio

    @property
    def semantics(self) -> str:
        """``"frozen"`` or ``"soft"``; switching to frozen zeroes every removed channel's slices at once."""
        return self.settings.semantics

    @semantics.setter
    def semantics(self, value: str) -> None:
        self.settings = dataclasses.replace(self.settings, semantics=value)
        if self._pruner is not None:
            self._pruner.settings = self.settings
        if self._runtime is not None:
            self._runtime.uninstall()
            self._runtime.enforce = value == "frozen"
            self._runtime.install()
            if value == "frozen":
                self._runtime.apply()

    # ---- lifecycle -------------------------------------------------------------------------
    @collector_paused()
    def make(self) -> Mask:
        """Trace the model, build the dependency groups, install the mask hooks. Returns self."""
        if self._made:
            return self
        tr = trace(self.model, self.example_inputs, leaf_rules(), self.ignore)
        res = tr.graph.resolve()
        layout = build_layout(tr, res)
        self._trace, self._res = tr, res
        self._use_layout(layout)
        suspects = groups_of_spaces(layout, tr.size_reads)
        fixed, note = {}, None
        if needs_trial_export(tr, layout, suspects):
            fixed, note = fixed_size_groups(
                self.model,
                self.example_inputs,
                tr.modes,
                len(layout.groups),
                self._probe_plan,
                suspects,
                groups_by_module(layout),
                tr.shadow,
            )
        if note:
            tr.notes.append(note)
        if fixed:
            for index, error in fixed.items():
                start, size, _ = layout.groups[index]
                comps = np.flatnonzero((layout.component_unit >= start) & (layout.component_unit < start + size))
                res.freeze_components(comps, f"the model's code fixes this size (trial export: {error})")
            layout = build_layout(tr, res)
        if not layout.groups:
            reasons = "; ".join(f"{r}: {format_names(n, 3)}" for r, n in layout.frozen.items()) or "no parameters"
            raise NothingToPruneError(f"the model has no prunable channel ({reasons})")
        self._use_layout(layout)
        self._keep = np.ones(layout.n_units + 1, dtype=bool)
        self._groups = [Group(self, i, start, size, members) for i, (start, size, members) in enumerate(layout.groups)]
        self._runtime = self._new_runtime()
        self._made = True
        _verify._KEEP_LOOKUP[self.model] = weakref.WeakMethod(self._output_keeps)
        self._pruner = Pruner(self)
        if self.algorithm is not None:
            self.algorithm.attach(self)
        return self

    @property
    def groups(self) -> list[Group]:
        """The prunable dependency groups (after :meth:`make`)."""
        self._require_made("groups")
        return self._groups

    def do_mask(self) -> bool:
        """Move one step of the schedule: zero the lowest-scoring channels. Returns whether anything changed.

        One shot (``steps=1``): the first call reaches the target. ``steps=N``: each call
        moves one step of the ramp. ``pre_layer=True``: each call prunes the next group and
        returns True while groups remain (False once every group was visited). With soft
        semantics every call re-selects from all channels. Atomic: a criterion that fails
        on one group changes nothing. Under ``torch.distributed`` call it on every rank at the
        same step: criteria sum their statistics over the ranks and every rank takes the keep
        flags rank 0 decided.
        """
        self._require_made("do_mask()")
        if self.algorithm is None:
            raise ValueError("do_mask() needs an algorithm: Mask(..., algorithm=maskprune.algorithms.L1Norm())")
        pruner = self._pruner
        if pruner.finished():
            return False
        decision = pruner.decide()
        decision.keep = broadcast_flags(decision.keep)
        pruner.advance()
        changed = not np.array_equal(decision.keep, self._keep)
        self._requested.update(decision.requested)
        if changed:
            self._keep = decision.keep
            self._runtime.refresh(self._keep)
            if self.settings.semantics == "frozen":
                self._runtime.apply()
            else:
                self._runtime.apply_producers()
            if self.recalibrate is not None:
                recalibrate_bn(self.model, self.recalibrate)
        self.algorithm.finish(self)
        return changed or self.settings.pre_layer

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> Mask:
        """Keep removed channels exactly zero through ``optimizer.step()`` (frozen semantics).

        A removed channel usually carries zeros, so its weights get a zero gradient and
        standard optimizers leave its zero weights and states alone. To hold whatever the
        optimizer or the loss does, every masked weight is zeroed again after every step,
        and at the optimizer's first step after each mask change the gradients (before it)
        and every optimizer state of the parameter's shape (momentum, Adam's moments; after
        it) are zeroed there too, so a removed channel never moves. Returns self.

        Example:
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # doctest: +SKIP
            >>> mask.track_optimizer(opt)                                           # doctest: +SKIP
        """
        self._require_made("track_optimizer()")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"track_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._runtime.hook_optimizer(optimizer)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The masks, the schedule's position, the ratios asked so far and the criterion's state (statistics,
        random stream), readable with ``torch.load(weights_only=True)``. The model's weights are not in it.

        Example:
            >>> torch.save({"model": model.state_dict(), "mask": mask.state_dict()}, "ckpt.pt")  # doctest: +SKIP
        """
        self._require_made("state_dict()")
        return mask_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (on a Mask made on the same architecture and example inputs).

        Example:
            >>> ckpt = torch.load("ckpt.pt", weights_only=True)                 # doctest: +SKIP
            >>> model.load_state_dict(ckpt["model"])                            # doctest: +SKIP
            >>> mask = Mask(model, x, algorithm=Taylor(), steps=4).make()       # doctest: +SKIP
            >>> mask.load_state_dict(ckpt["mask"])                              # doctest: +SKIP
        """
        self._require_made("load_state_dict()")
        load_mask_state(self, state)

    def sparsity(self) -> Sparsity:
        """Requested versus achieved ratio, parameters and FLOPs per group and for the model.

        FLOPs are counted on the shapes the export would have (eval mode, example inputs).

        Example:
            >>> print(mask.sparsity())                                   # doctest: +SKIP
        """
        self._require_made("sparsity()")
        return sparsity_report(self)

    @collector_paused()
    def generate_pruned_model(
        self, *, verify: bool = True, inplace: bool = False, inputs: Any = None, rtol: float = 1e-5
    ) -> nn.Module:
        """A plain, smaller ``nn.Module`` without the removed channels.

        Verified against the masked model on ``inputs`` (the example inputs by
        default) unless ``verify=False``; raises :class:`ExportError` naming the
        first diverging module. ``inplace=True`` slices the masked model itself
        (no copy; the Mask is then spent); a failed export leaves it as it was.
        """
        self._require_made("generate_pruned_model()")
        inputs = self.example_inputs if inputs is None else inputs
        if verify and any(t.is_meta for t in iter_tensors(inputs)):
            raise ExportError("cannot verify on the meta device (no values): pass verify=False")
        if self.settings.semantics == "soft":
            self.semantics = "frozen"  # the export is of the whole mask: norms and biases of removed channels too
            try:
                return self.generate_pruned_model(verify=verify, inplace=inplace, inputs=inputs, rtol=rtol)
            finally:
                if self._runtime is not None:
                    self.semantics = "soft"
        # the slices leave out every masked position: only the verification's masked forward needs them zero,
        # and there they mostly are already (since the last do_mask() or tracked optimizer step)
        with self._runtime.zeroed(only_stale=not inplace) if verify else contextlib.nullcontext():
            table = module_table(self.model)  # one walk of the model for the plan's attributes, spec and copy
            plan, attributes = self._plan(), self._attributes(table=table)
            spec_text = PruneSpec.text_of_plan(self.model, plan, attributes, table)  # the exported model carries it
            if inplace:
                pruned = self._export_inplace(plan, attributes, inputs, verify, rtol)
            else:  # the masked outputs first: the copy's tensors reuse the memory its activations freed
                soft = _verify.float32_outputs(self.model, inputs) if verify else None
                pruned = self._plain_copy(plan, attributes, table)
                if verify:  # where outputs differ, a write past the version counters may be why: zero all, rerun
                    settle = self._runtime.apply
                    result = _verify.verify_outputs(self.model, pruned, inputs, rtol, settle=settle, soft=soft)
                    if not result:
                        raise ExportError(f"the exported model differs from the masked model: {result}")
        attach_text(pruned, spec_text)
        return pruned

    def apply_spec(self, spec: PruneSpec | str | os.PathLike | nn.Module) -> Mask:
        """Replay a saved pruning decision: mask exactly what ``spec`` removed. Returns self.

        ``spec`` is a :class:`PruneSpec`, a folder written by :func:`maskprune.save_pruned`, or a pruned
        model. Raises :class:`SpecError` when the spec does not fit this mask's groups.

        Example:
            >>> mask = Mask(torchvision.models.resnet18(), input_shape=(1, 3, 64, 64)).make()   # doctest: +SKIP
            >>> pruned = mask.apply_spec("resnet18-pruned").generate_pruned_model()              # doctest: +SKIP
        """
        self._require_made("apply_spec()")
        self._set_keep(0, keep_flags_of(self, as_spec(spec)))
        return self

    def remove(self) -> None:
        """Take every hook and mask buffer off; the model keeps its current (zeroed) weights."""
        if self._runtime is not None:
            self._runtime.uninstall()
            self._runtime.unhook_optimizers()
            self._runtime = None
        if self._made and self.algorithm is not None:
            self.algorithm.detach(self)
        _verify._KEEP_LOOKUP.pop(self.model, None)
        self._made = False
        self._groups = []

    # ---- state -----------------------------------------------------------------------------
    def _set_keep(self, start: int, keep: np.ndarray) -> None:
        self._keep[start : start + len(keep)] = keep
        self._runtime.refresh(self._keep)
        self._runtime.apply()

    def _flops_probe(self) -> FlopsProbe:
        """Counts FLOPs of would-be exports (a weightless copy on the meta device, made once)."""
        if self._probe is None:
            self._runtime.uninstall()
            try:
                self._probe = FlopsProbe(self.model, self.example_inputs, self._trace.shadow)
            finally:
                self._runtime.install()
        return self._probe

    def _new_runtime(self) -> MaskRuntime:
        """Masks of every parameter dimension and layer norm holding a group's channel (all kept), installed."""
        tr, layout = self._trace, self._layout
        prunable = prunable_spaces(layout, self._res).tolist()
        dims = []
        for key, node in tr.param_nodes.items():
            owned = tr.owned[key]
            if owned.is_param:
                dims += [
                    (owned.tensor, dim, self._units(space), tr.roles.get((key, dim)) == "producer")
                    for dim, space in enumerate(node.spaces)
                    if prunable[space]
                ]
        runtime = MaskRuntime(self.model, layout.n_units, _device(self.model))
        runtime.add_dims(dims)
        runtime.add_norms([(site, self._units(site.space)) for site in tr.layer_norms if prunable[site.space]])
        runtime.enforce = self.settings.semantics == "frozen"
        runtime.install()  # every channel kept: the masks start at one, nothing to refresh or zero
        return runtime

    def _use_layout(self, layout: GroupLayout) -> None:
        self._layout = layout
        self._tensor_dims = None  # made at the first plan of the layout

    def _units(self, space: int) -> np.ndarray:
        """Flat unit of each channel of ``space`` (a view: read it, do not write to it)."""
        return unit_index(self._layout, space)

    def _probe_plan(self, groups: list[int]) -> tuple[Plan, Attributes]:
        """The export that removes the last channel of each of ``groups`` (for the trial export)."""
        keep = np.ones(self._layout.n_units + 1, dtype=bool)
        for index in groups:
            start, size, _ = self._layout.groups[index]
            if size > 1:
                keep[start + size - 1] = False
        return self._plan(keep), self._attributes(keep)

    def _attributes(
        self, keep_flags: np.ndarray | None = None, table: list[tuple[str, nn.Module]] | None = None
    ) -> Attributes:
        """The counts held in module attributes (``num_heads`` …) that the export changes.

        ``table``: the model's :func:`module_table`, when the caller has it.
        """
        keep_flags = self._keep if keep_flags is None else keep_flags
        sites = self._trace.size_sites
        if not sites:  # no size written in the model's code: no count to update
            return {}
        modules = dict(module_table(self.model) if table is None else table)
        return attribute_updates(modules, sites, lambda space: int(keep_flags[self._units(space)].sum()))

    def _plan(self, keep_flags: np.ndarray | None = None) -> Plan:
        """Kept positions per pruned dimension of every parameter and buffer, by first name."""
        keep_flags = self._keep if keep_flags is None else keep_flags
        if self._tensor_dims is None:
            self._tensor_dims = self._dims_table()
        return self._tensor_dims.plan(keep_flags)

    def _dims_table(self) -> TensorDims:
        """Every dimension of the traced parameters and buffers with its units (made at the layout's first plan)."""
        tr = self._trace
        names, spaces = [], []
        for key, node in tr.param_nodes.items():
            name = tr.owned[key].names[0]
            names += [(name, dim) for dim in range(len(node.spaces))]
            spaces += node.spaces
        units = unit_views(self._layout, spaces)  # spaces over one stretch of units share an array: compared once
        return TensorDims.of((name, dim, view) for (name, dim), view in zip(names, units, strict=True))

    def _output_keeps(self, path: str, ndim: int) -> list[torch.Tensor | None] | None:
        nodes = self._trace.module_outputs.get(path) if self._trace else None
        if not nodes or len(nodes[0].spaces) != ndim:
            return None
        keeps: list[torch.Tensor | None] = []
        for space in nodes[0].spaces:
            keep = self._keep[self._units(space)]
            keeps.append(None if keep.all() else torch.as_tensor(np.flatnonzero(keep)))
        return keeps

    def _plain_copy(self, plan: Plan, attributes: Attributes, table: list[tuple[str, nn.Module]]) -> nn.Module:
        """A deep copy of the model (whose :func:`module_table` is ``table``) sliced by ``plan``, without hooks."""
        self._runtime.uninstall()
        try:
            plain = sliced_copy(self.model, plan, attributes, table)
        finally:
            self._runtime.install()
        strip_watch_hooks(plain)  # a criterion's persistent watch() (Taylor) stays on the masked model only
        return plain

    def _export_inplace(self, plan: Plan, attributes: Attributes, inputs: Any, verify: bool, rtol: float) -> nn.Module:
        soft = _verify.float32_outputs(self.model, inputs) if verify else None
        self._runtime.uninstall()
        log = apply_plan(self.model, plan, attributes) if plan else None
        if verify:
            try:
                result = _verify.compare(soft, _verify.float32_outputs(self.model, inputs), rtol)
            except Exception as error:  # noqa: BLE001 - the exported model crashed: put everything back
                result = _verify.crashed(error)
            if not result:
                if log is not None:
                    log.undo()
                self._runtime.install()
                self.generate_pruned_model(inputs=inputs, rtol=rtol)  # raises, naming the module
                raise ExportError(f"the exported model differs from the masked model: {result}")
        self.remove()
        return self.model

    def _require_made(self, what: str) -> None:
        if not self._made:
            raise NotMadeError(f"call make() before {what}")

    # ---- reporting -------------------------------------------------------------------------
    def _activation_members(self, group: Group) -> list[tuple[str, int, str]]:
        """Leaf-module outputs whose channels belong to ``group``: (module path, dim, mapping)."""
        rows = []
        leaves = {name for name, m in self.model.named_modules() if not any(True for _ in m.children())}
        lo, hi = group.start, group.start + group.size
        for path, nodes in self._trace.module_outputs.items():
            if path not in leaves or not nodes:
                continue
            for dim, space in enumerate(nodes[0].spaces):
                units = self._units(space)
                inside = (units >= lo) & (units < hi)
                if inside.any():
                    positions = np.flatnonzero(inside)
                    span = f"[{positions.min()}:{positions.max() + 1}]"
                    if positions.max() + 1 - positions.min() != len(positions):
                        span = f"{len(positions)} of {len(units)}"
                    rows.append((path, dim, span))
        return rows

    def __repr__(self) -> str:
        if not self._made:
            return f"Mask({type(self.model).__name__}, ratio={self.ratio}, not made)"
        kept = sum(g.kept for g in self._groups)
        total = sum(g.size for g in self._groups)
        algo = type(self.algorithm).__name__ if self.algorithm is not None else "no algorithm"
        lines = [
            f"Mask({type(self.model).__name__}, {algo}, ratio={self.ratio}): "
            f"{len(self._groups)} groups, {kept}/{total} channels kept"
        ]
        lines.append(f"  {'group':>5}  {'kept/total':>11}  members")
        for g in self._groups:
            names = [f"{m.name}[{m.dim}]" for m in g.members]
            lines.append(f"  {g.index:>5}  {f'{g.kept}/{g.size}':>11}  {format_names(names)}")
        frozen = self._layout.frozen
        if frozen:
            lines.append("Frozen (never pruned):")
            for reason, names in frozen.items():
                lines.append(f"  {reason}: {format_names(names)}")
        tr = self._trace
        if tr.unknown_ops:
            ops = sorted({f"`{op}` in {path}" for op, path in tr.unknown_ops})
            lines.append(f"Unsupported ops (their channels are frozen): {format_names(ops, 6)}")
        if tr.unreached:
            lines.append(f"Parameters not reached by the trace: {format_names(tr.unreached)}")
        for note in tr.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)

    __str__ = __repr__


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _example_inputs(model: nn.Module, example_inputs: Any, input_shape: Sequence[int] | None) -> Any:
    if example_inputs is not None and input_shape is not None:
        raise ValueError("give example_inputs or input_shape, not both")
    if input_shape is not None:
        if not all(isinstance(n, int) and n > 0 for n in input_shape):
            raise ValueError(f"input_shape must be positive integers, got {tuple(input_shape)!r}")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return torch.randn(tuple(input_shape), device=_device(model), dtype=dtype)
    if example_inputs is None:
        raise ValueError("example_inputs is required (a tensor, a tuple of arguments or a dict), or input_shape=")
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return example_inputs


def _resolve_modules(model: nn.Module, items: Iterable[nn.Module | str], option: str) -> dict[str, nn.Module]:
    """Qualified name -> module for each module or name in ``items``; clear errors name ``option``."""
    if isinstance(items, (nn.Module, str)):
        items = [items]
    items = list(items)
    if not items:
        return {}  # the usual case: no walk over the model
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    resolved: dict[str, nn.Module] = {}
    for item in items:
        if isinstance(item, str):
            if item not in named:
                close = difflib.get_close_matches(item, list(named), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"{option}: {item!r} is not a module of the model{hint}")
            resolved[item] = named[item]
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"{option}: the {type(item).__name__} given is not a module of the model")
            resolved[by_id[id(item)] or "<root>"] = item
        else:
            raise TypeError(f"{option} takes modules or qualified module names, got {type(item).__name__}")
    return resolved
