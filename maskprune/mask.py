"""The user-facing lifecycle: Mask(...) -> make() -> do_mask() -> generate_pruned_model()."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _verify
from ._activations import strip_watch_hooks
from ._algorithm import Algorithm
from ._attributes import Attributes
from ._collector import collector_paused
from ._depth import block_containers, find_blocks
from ._experts import expert_layers, find_expert_layers
from ._export import Plan, apply_plan, sliced_copy
from ._flops import FlopsProbe
from ._fsdp import any_sharded, gathered, moved_parameters, rank, rebind, refuse_sharded
from ._fsdp_export import sharded_export
from ._groups import Group, build_layout, format_names, unit_index
from ._hf import export_attributes
from ._layers import leaf_rules
from ._masking import MaskRuntime, runtime_on
from ._probe import settled_layout
from ._progress import Stopwatch, logger
from ._pruning import Pruner
from ._reads import control_flow_message
from ._recalibrate import recalibrate_bn
from ._records import iter_tensors, model_device
from ._replay import keep_flags_of
from ._report import Sparsity, sparsity_report
from ._selection import Selection
from ._settings import Settings
from ._spec import PruneSpec, as_spec, attach_text
from ._state import mask_state, read_mask_state
from ._trace import trace
from ._walk import ModelIndex
from .distributed import broadcast_flags
from .errors import DataDependentError, DataDependentWarning, ExportError, NothingToPruneError, NotMadeError

DEFAULT_RATIO = 0.5
DEFAULT_MAX_RATIO = 0.9


class Mask:
    """Soft masks over a model's dependency groups, and their export to a smaller model.

    Each mixture-of-experts layer in Hugging Face's fused form (Mixtral, Qwen2-MoE, Qwen3-MoE …) also gets a
    group of ``kind == "experts"`` (an :class:`~maskprune.ExpertGroup`) whose units are its experts: a removed
    expert is never routed, and the export removes it.

    Args:
        model: the model to prune; it keeps its parameters' names and shapes while masked.
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments.
        input_shape: shorthand for ``example_inputs=torch.randn(input_shape)`` on the model's device.
        algorithm: scores channels (see :mod:`maskprune.algorithms`); needed by :meth:`do_mask`.
        ratio: fraction of the channels to remove, in [0, 1) (of each group, or of all of them with
            ``allocation="global"``); 0.5 when neither it nor ``target_flops`` is given.
        target_flops: instead of ``ratio`` (give one of them), the fraction of the model's FLOPs to
            remove, in (0, 1), met within 1% as counted on the exported model (``0.5`` halves the FLOPs).
        target_params: instead of ``ratio`` or ``target_flops``, a parameter budget: the fraction of the
            model's parameters to KEEP, in (0, 1), met within 1% of the exported count (``0.75`` removes a
            quarter). Every group the criterion scores (channels, and blocks with ``depth=True`` where the
            criterion scores them) loses the same ratio, found by bisection.
        ratios: per-module ratio overrides, ``{module or qualified name: ratio}``; a group takes the
            entry of the most specific module holding its first producer.
        allocation: ``"uniform"`` (every group loses ``ratio``) or ``"global"`` (channels ranked across
            groups by score, each group's scores divided by their mean unless the criterion's raw
            scores compare across groups).
        min_channels: channels every group keeps at least.
        max_ratio: the largest fraction any group loses (global ranking, random ratios, FLOPs search);
            0.9 by default, or ``ratio`` where that is larger.
        round_to: kept channels rounded up to a multiple of this (for fast kernels).
        steps: ``do_mask()`` calls to reach the target, each moving one step of ``ramp``.
        ramp: ``"linear"``, ``"exp"`` (the kept fraction shrinks by a constant factor) or ``"cubic"`` (AGP).
        pre_layer: layer-by-layer mode: each ``do_mask()`` prunes the next group to its target, until
            :attr:`finished`.
        semantics: ``"frozen"`` (a removed channel stays zero and gets no gradient) or ``"soft"``
            (soft filters, as SFP and FPGM: ``do_mask()`` zeroes the removed filters, which keep
            training, and every ``do_mask()`` re-selects from all channels).
        ignore: modules (or qualified names) whose output channels must never be pruned (their weights'
            output rows; all channels of a norm layer); their input channels follow the layers producing
            them, as Torch-Pruning's ``ignored_layers`` do (``ignore=[model.fc]`` keeps the classes).
        freeze: modules (or qualified names) none of whose channels is ever pruned, inputs included.
        depth: also make whole residual blocks prunable: each ``nn.ModuleList`` or ``nn.Sequential`` whose
            entries include residual blocks (output = input + something, of the input's shape) gets a group of
            ``kind == "block"`` whose units are those entries. A removed block computes the identity; the
            export deletes it from its container (and renumbers Hugging Face layer counts and ``layer_idx``).
        recalibrate: batches (a DataLoader, a list of tensors) on which :func:`~maskprune.recalibrate_bn`
            re-estimates the BatchNorm statistics after every ``do_mask()`` that changed the masks.
        strict: refuse a forward that decides Python control flow by tensor values (``if x.mean() > 0:``):
            :meth:`make` raises :class:`~maskprune.DataDependentError` naming the sites, where it
            otherwise warns (:class:`~maskprune.DataDependentWarning`) once.

    Examples:
        >>> model = torchvision.models.resnet18()
        >>> mask = Mask(model, input_shape=(1, 3, 64, 64), algorithm=L1Norm(), ratio=0.5)
        >>> mask.make().do_mask()
        True
        >>> pruned = mask.generate_pruned_model()  # verified: computes what the masked model computes
        >>> pruned.conv1.out_channels, pruned.layer4[1].conv1.out_channels
        (32, 256)
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        *,
        input_shape: Sequence[int] | None = None,
        algorithm: Algorithm | None = None,
        ratio: float | None = None,
        target_flops: float | None = None,
        target_params: float | None = None,
        ratios: Mapping[nn.Module | str, float] | None = None,
        allocation: str = "uniform",
        min_channels: int = 1,
        max_ratio: float | None = None,
        round_to: int = 1,
        steps: int = 1,
        ramp: str = "linear",
        pre_layer: bool = False,
        semantics: str = "frozen",
        ignore: Iterable[nn.Module | str] = (),
        freeze: Iterable[nn.Module | str] = (),
        depth: bool = False,
        recalibrate: Iterable[Any] | None = None,
        strict: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(algorithm, type):
            raise TypeError(
                f"algorithm must be an instance, got the class {algorithm.__name__}: "
                f"pass algorithm={algorithm.__name__}() (with its options)"
            )
        if algorithm is not None and not callable(getattr(algorithm, "score", None)):
            raise TypeError(
                f"algorithm must have a score(group) method (a maskprune.Algorithm), got {type(algorithm).__name__}"
            )
        if recalibrate is not None and not isinstance(recalibrate, Iterable):
            raise TypeError(f"recalibrate must be an iterable of batches, got {type(recalibrate).__name__}")
        if not isinstance(ratios, (Mapping, type(None))):
            raise TypeError(f"ratios must be a dict {{module or name: ratio}}, got {type(ratios).__name__}")
        if ratio is not None and target_flops is not None:
            raise ValueError(
                f"give ratio ({ratio}) or target_flops ({target_flops}), not both: ratio removes a share of the "
                "channels, target_flops a share of the FLOPs"
            )
        if target_params is not None and (ratio is not None or target_flops is not None):
            raise ValueError(
                f"give target_params ({target_params}) alone: it sets the ratio itself (ratio={ratio}, "
                f"target_flops={target_flops})"
            )
        ratio = DEFAULT_RATIO if ratio is None else ratio
        if max_ratio is None:
            max_ratio = max(DEFAULT_MAX_RATIO, ratio) if isinstance(ratio, (int, float)) else DEFAULT_MAX_RATIO
        named_ratios = {}
        for key, value in (ratios or {}).items():
            (name,) = _resolve_modules(model, [key], "ratios")
            named_ratios[name] = value
        self.settings = Settings(
            ratio=ratio,
            target_flops=target_flops,
            target_params=target_params,
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
        self.freeze = _resolve_modules(model, freeze, "freeze")
        self.depth = bool(depth)
        self.recalibrate = recalibrate
        self.strict = bool(strict)
        self._made = False
        self._selection: Selection | None = None
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
        refuse_sharded(self.model)
        if runtime_on(self.model) is not None:
            raise RuntimeError(
                f"the {type(self.model).__name__} is already masked by another Mask: call remove() on that Mask "
                "first (or export it), then make this one"
            )
        _check_inputs(self.model, self.example_inputs)
        watch = Stopwatch()
        tr = trace(self.model, self.example_inputs, leaf_rules(), self.freeze, ignored_modules=self.ignore)
        traced = watch.lap()
        if tr.control_flow:  # before any hook is installed: a refusal leaves the model as it was
            message = control_flow_message(tr.control_flow, self.strict)
            if self.strict:
                raise DataDependentError(f"Mask(strict=True): {message}")
            warnings.warn(message, DataDependentWarning, stacklevel=3)  # make()'s caller, past collector_paused
        res = tr.graph.resolve()
        layout = settled_layout(self.model, self.example_inputs, tr, res, build_layout(tr, res))
        if self.depth:
            found = find_blocks(self.model, self.example_inputs, {**self.ignore, **self.freeze})
            layout.blocks = block_containers(found, layout.n_units + 1)
        layout.experts = expert_layers(self._expert_layers(tr, res, layout), layout.n_flags)
        if not layout.groups and not layout.blocks and not layout.experts:
            reasons = "; ".join(f"{r}: {format_names(n, 3)}" for r, n in layout.frozen.items()) or "no parameters"
            raise NothingToPruneError(f"the model has no prunable channel ({reasons})")
        self._selection = Selection(
            tr, res, layout, on_change=self._keep_changed, device_keep=self._device_keep, leaves=self._leaves
        )
        try:
            self._runtime = self._new_runtime()
            self._made = True
            self._pruner = Pruner(self._selection, self.settings, self._count_flops)
            if self.algorithm is not None:
                self.algorithm.attach(self)
        except BaseException:
            self.remove()  # no hook of this make() stays on the model
            self._selection = self._pruner = None
            raise
        logger.info(
            "make(): traced %s in %.2f s (%d module calls), then %d groups of %d channels in %.2f s",
            type(self.model).__name__, traced, len(tr.leaf_calls), len(layout.groups), layout.n_units, watch.lap(),
        )  # fmt: skip
        return self

    @property
    def groups(self) -> list[Group]:
        """The prunable dependency groups (after :meth:`make`)."""
        self._require_made("groups")
        return self._selection.groups

    @property
    def selection(self) -> Selection:
        """What :meth:`make` found (trace, group layout, units) and the keep flags now (after :meth:`make`)."""
        self._require_made("selection")
        return self._selection

    @property
    def finished(self) -> bool:
        """Whether the schedule is done: every step taken (frozen semantics) or, with ``pre_layer=True``,
        every group visited. A layer-by-layer loop is ``while not mask.finished: mask.do_mask(); fine_tune()``.
        With soft semantics the schedule never finishes: every ``do_mask()`` re-selects."""
        self._require_made("finished")
        return self._pruner.finished()

    def do_mask(self) -> bool:
        """Move one step of the schedule: zero the lowest-scoring channels. Returns whether any flag changed.

        One shot (``steps=1``): the first call reaches the target. ``steps=N``: each call
        moves one step of the ramp. ``pre_layer=True``: each call prunes the next group;
        :attr:`finished` says when every group was visited. A call once the schedule is
        finished changes nothing. With soft semantics every call re-selects from all channels.
        Atomic: a criterion that fails on one group changes nothing. Under ``torch.distributed``
        call it on every rank at the same step: criteria sum their statistics over the ranks
        and every rank takes the keep flags rank 0 decided. Under FSDP2 the criterion scores
        full tensors, gathered from the shards for the call.
        """
        self._require_made("do_mask()")
        if self.algorithm is None:
            raise ValueError("do_mask() needs an algorithm: Mask(..., algorithm=maskprune.algorithms.L1Norm())")
        pruner, selection = self._pruner, self._selection
        if pruner.finished():
            return False
        self._follow_parameters()
        with gathered(selection.trace, self._members()):  # sharded: the criterion scores full tensors
            decision = pruner.decide(self.algorithm, lambda groups: self.algorithm.prepare(self, groups))
        decision.keep = broadcast_flags(decision.keep)
        pruner.advance()
        changed = not np.array_equal(decision.keep, selection.keep)
        self._requested.update(decision.requested)
        if changed:
            selection.keep = decision.keep
            self._runtime.refresh(selection.keep)
            if self.settings.semantics == "frozen":
                self._runtime.apply()
            else:
                self._runtime.apply_producers()
            if self.recalibrate is not None:
                recalibrate_bn(self.model, self.recalibrate)
        self.algorithm.finish(self)
        return changed

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> Mask:
        """Keep removed channels exactly zero through ``optimizer.step()`` (frozen semantics).

        A removed channel usually carries zeros, so its weights get a zero gradient and
        standard optimizers leave its zero weights and states alone. To hold whatever the
        optimizer or the loss does, every masked weight is zeroed again after every step,
        and at the optimizer's first step after each mask change the gradients (before it)
        and every optimizer state of the parameter's shape (momentum, Adam's moments; after
        it) are zeroed there too, so a removed channel never moves. Returns self.

        Examples:
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> mask = Mask(model, torch.randn(1, 3, 16, 16), algorithm=L1Norm()).make()
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> mask.track_optimizer(opt) is mask
            True
        """
        self._require_made("track_optimizer()")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"track_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._follow_parameters()
        self._runtime.hook_optimizer(optimizer)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The masks, the schedule's position, the ratios asked so far and the criterion's state (statistics,
        random stream), readable with ``torch.load(weights_only=True)``. The model's weights are not in it.

        Examples:
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> mask = Mask(model, torch.randn(1, 3, 16, 16), algorithm=L1Norm(), steps=2).make()
            >>> mask.do_mask()
            True
            >>> torch.save({"model": model.state_dict(), "mask": mask.state_dict()}, "ckpt.pt")
        """
        self._require_made("state_dict()")
        return mask_state(self._selection, self._pruner, self._requested, self.algorithm)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (on a Mask made on the same architecture and example inputs).

        Examples:
            >>> x = torch.randn(1, 3, 16, 16)
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> mask = Mask(model, x, algorithm=L1Norm(), steps=2).make()
            >>> mask.do_mask()
            True
            >>> torch.save({"model": model.state_dict(), "mask": mask.state_dict()}, "ckpt.pt")
            >>> ckpt = torch.load("ckpt.pt", weights_only=True)
            >>> again = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> again.load_state_dict(ckpt["model"])
            <All keys matched successfully>
            >>> resumed = Mask(again, x, algorithm=L1Norm(), steps=2).make()
            >>> resumed.load_state_dict(ckpt["mask"])
            >>> resumed.groups[0].kept, resumed.finished
            (6, False)
        """
        self._require_made("load_state_dict()")
        self._follow_parameters()
        loaded = read_mask_state(state, self._selection, self.settings, self.algorithm)
        if self.algorithm is not None:
            self.algorithm.load_state_dict(loaded.algorithm)
        pruner = self._pruner
        pruner.step, pruner.cursor, pruner.layer_counts = loaded.step, loaded.cursor, loaded.layer_counts
        self._requested = loaded.requested
        if loaded.semantics != self.settings.semantics:
            self.semantics = loaded.semantics
        self._selection.keep = loaded.keep
        self._runtime.refresh(loaded.keep)
        if self.settings.semantics == "frozen":
            self._runtime.apply()

    def sparsity(self) -> Sparsity:
        """Requested versus achieved ratio, parameters and FLOPs per group and for the model.

        FLOPs are counted on the shapes the export would have (eval mode, example inputs).

        Examples:
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> mask = Mask(model, torch.randn(1, 3, 16, 16), algorithm=L1Norm(), ratio=0.5).make()
            >>> mask.do_mask()
            True
            >>> report = mask.sparsity()
            >>> report.channels, round(report.flops_removed, 3)
            ((4, 8), 0.5)
        """
        self._require_made("sparsity()")
        return sparsity_report(self._selection, self._flops_probe(), self.settings, self._requested)

    @collector_paused()
    def generate_pruned_model(
        self,
        *,
        verify: bool = True,
        inplace: bool = False,
        inputs: Any = None,
        rtol: float | None = None,
        verify_inputs: list[Any] | None = None,
        rank0_only: bool = False,
    ) -> nn.Module | None:
        """A plain, smaller ``nn.Module`` without the removed channels.

        Verified against the masked model on ``inputs`` (the example inputs by
        default) and on each batch of ``verify_inputs`` (each what ``inputs`` is)
        unless ``verify=False``; raises :class:`ExportError` naming the first
        diverging module (and the batch). A forward that branches on tensor
        values needs batches taking every branch (:meth:`make` warns).
        ``rtol`` (max |soft - hard| / max |hard|) follows the outputs' dtype by default:
        1e-5 in float32 and float64, looser in bfloat16 and float16
        (:data:`maskprune._verify.TOLERANCES`). ``inplace=True`` slices the masked model
        itself (no copy; the Mask is then spent), giving each sliced tensor's memory back
        as it goes: the original parameter objects are left empty, and the export needs
        about no memory beyond the masked model's (a 7B model is pruned where it fits once).
        A failed export leaves the model as it was.

        Of a model sharded by FSDP2 (``fully_shard``), the export is a collective: call it on every
        rank. Each rank gets the same plain, unsharded model on the CPU; with ``rank0_only=True`` only
        rank 0 does (the others get None, and never hold the whole model). ``rank0_only=True`` under DDP
        or one process: rank 0 exports, the other ranks get None.
        """
        self._require_made("generate_pruned_model()")
        inputs = self.example_inputs if inputs is None else inputs
        batches = [inputs, *_verify.check_batches(verify_inputs)]
        for batch in batches[1:]:
            _check_inputs(self.model, batch)
        if verify and any(t.is_meta for t in iter_tensors(batches)):
            raise ExportError("cannot verify on the meta device (no values): pass verify=False")
        if self.settings.semantics == "soft":
            self.semantics = "frozen"  # the export is of the whole mask: norms and biases of removed channels too
            try:
                return self.generate_pruned_model(
                    verify=verify,
                    inplace=inplace,
                    inputs=inputs,
                    rtol=rtol,
                    verify_inputs=batches[1:],
                    rank0_only=rank0_only,
                )
            finally:
                if self._runtime is not None:
                    self.semantics = "soft"
        self._follow_parameters()
        if any_sharded(self._selection.trace):
            if inplace:
                raise ExportError(
                    "a sharded model cannot be sliced in place: call generate_pruned_model() without inplace=True"
                )
            keep = rank() == 0 or not rank0_only
            return sharded_export(self.model, self._selection, self._runtime, batches, verify, rtol, keep)
        if rank0_only and rank() != 0:
            return None
        # the slices leave out every masked position: only the verification's masked forward needs them zero,
        # and there they mostly are already (since the last do_mask() or tracked optimizer step)
        watch = Stopwatch()
        with self._runtime.zeroed(only_stale=not inplace) if verify else contextlib.nullcontext():
            index = ModelIndex(self.model)  # one walk of the model for the plan's attributes, spec and copy
            plan, attributes = self._selection.plan(), self._selection.attributes(index.modules)
            attributes, info = export_attributes(index, plan, attributes)  # a config's sizes; how to rebuild
            removed = self._selection.removed_entries()
            spec_text = PruneSpec.text_of_plan(index, plan, attributes, removed, info)  # the exported model carries it
            if inplace:
                pruned = self._export_inplace(plan, attributes, removed, batches, verify, rtol)
            else:  # the masked outputs first: the copy's tensors reuse the memory its activations freed
                soft = _verify.float32_outputs(self.model, inputs) if verify else None
                pruned = self._plain_copy(plan, attributes, removed, index)
                if verify:  # where outputs differ, a write past the version counters may be why: zero all, rerun
                    settle = self._runtime.apply
                    keeps = self._selection.output_keeps
                    result = _verify.verify_batches(
                        self.model, pruned, batches, rtol, settle=settle, soft=soft, keeps=keeps
                    )
                    if not result:
                        raise ExportError(f"the exported model differs from the masked model: {result}")
                    logger.info("generate_pruned_model(): verified against the masked model: %s", result)
        attach_text(pruned, spec_text)
        logger.info(
            "generate_pruned_model(): %s %s in %.2f s", "sliced in place" if inplace else "exported a sliced copy",
            "and verified" if verify else "without verification", watch.total(),
        )  # fmt: skip
        return pruned

    def apply_spec(self, spec: PruneSpec | str | os.PathLike | nn.Module) -> Mask:
        """Replay a saved pruning decision: mask exactly what ``spec`` removed. Returns self.

        ``spec`` is a :class:`PruneSpec`, a folder written by :func:`maskprune.save_pruned`, or a pruned
        model. Raises :class:`SpecError` when the spec does not fit this mask's groups.

        Examples:
            >>> x = torch.randn(1, 3, 16, 16)
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
            >>> mask.do_mask()
            True
            >>> folder = maskprune.save_pruned(mask.generate_pruned_model(), "pruned")
            >>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> replayed = Mask(fresh, x).make().apply_spec(folder)
            >>> replayed.groups[0].pruned == mask.groups[0].pruned
            True
        """
        self._require_made("apply_spec()")
        self._selection.replace(keep_flags_of(self._selection, self.model, as_spec(spec)))
        return self

    def remove(self) -> None:
        """Take every hook and mask buffer off; the model keeps its current (zeroed) weights."""
        if self._runtime is not None:
            self._runtime.release()
            self._runtime = None
        if self._made and self.algorithm is not None:
            self.algorithm.detach(self)
        self._made = False

    # ---- state -----------------------------------------------------------------------------
    def _keep_changed(self, keep: np.ndarray) -> None:
        """A group's flags were set by hand (``group.prune``, ``apply_spec``): mask and zero at once."""
        self._follow_parameters()
        self._runtime.refresh(keep)
        self._runtime.apply()

    def _follow_parameters(self) -> bool:
        """Where parameter objects were replaced (``fully_shard`` makes them ``DTensor`` shards), the trace, the
        groups and the masks follow the model's current ones, by name. Returns whether any had moved."""
        moved = moved_parameters(self.model, self._selection.trace)
        if not moved:
            return False
        rebind(self._selection.trace, self._members(), moved)
        optimizers = list(self._runtime.optimizers)
        self._runtime.release()
        self._runtime = self._new_runtime()
        for optimizer in optimizers:
            self._runtime.hook_optimizer(optimizer)
        self._runtime.refresh(self._selection.keep)
        if self.settings.semantics == "frozen":
            self._runtime.apply()
        return True

    def _members(self) -> list:
        return [m for g in self._selection.groups for m in g.members]

    def _device_keep(self) -> torch.Tensor:
        return self._runtime.keep

    def _leaves(self) -> set[str]:
        return {name for name, m in self.model.named_modules() if not any(True for _ in m.children())}

    def _flops_probe(self) -> FlopsProbe:
        """Counts FLOPs of would-be exports (a weightless copy on the meta device, made once)."""
        if self._probe is None:
            self._runtime.uninstall()
            try:
                self._probe = FlopsProbe(self.model, self.example_inputs, self._selection.trace.shadow)
            finally:
                self._runtime.install()
        return self._probe

    def _count_flops(self, plan: Plan, keep: np.ndarray | None = None) -> int:
        """FLOPs of the export of ``plan`` (made from the keep flags ``keep``: the current ones by default)."""
        probe = self._flops_probe()
        return probe.count(plan, self._selection.attributes(probe.index.modules, keep) if plan else None).total

    def _expert_layers(self, tr: Any, res: Any, layout: Any) -> list[tuple]:
        """The mixture-of-experts layers the trace reached whose expert dim (dim 0 of their router rows and fused
        tensors) no channel group holds."""
        found = find_expert_layers(self.model, self.ignore)
        if not found:
            return []
        wanted = {name for layer in found for name in layer[4]}
        first_dim = {
            name: node.spaces[0]
            for key, node in tr.param_nodes.items()
            for name in tr.owned[key].names
            if name in wanted and node.spaces
        }

        def free(tensors: tuple[tuple[str, str], ...]) -> bool:
            return all(
                name in first_dim and (unit_index(layout, first_dim[name]) == layout.n_units).all() for name in tensors
            )

        return [layer for layer in found if free(layer[4])]

    def _new_runtime(self) -> MaskRuntime:
        """Masks of every parameter dimension and layer norm holding a group's channel (all kept), installed."""
        selection = self._selection
        tr, units = selection.trace, selection.units
        prunable = selection.prunable_spaces().tolist()
        dims = []
        for key, node in tr.param_nodes.items():
            owned = tr.owned[key]
            if owned.is_param:
                dims += [
                    (owned.tensor, dim, units(space), tr.roles.get((key, dim)) == "producer")
                    for dim, space in enumerate(node.spaces)
                    if prunable[space]
                ]
        runtime = MaskRuntime(self.model, selection.layout.n_flags, model_device(self.model))
        runtime.add_dims(dims)
        runtime.add_blocks([(self.model.get_submodule(path), unit) for path, unit in selection.block_units()])
        runtime.add_routers([(self.model.get_submodule(e.router), e.start, e.count) for e in selection.layout.experts])
        runtime.add_norms([(site, units(site.space)) for site in tr.layer_norms if prunable[site.space]])
        runtime.enforce = self.settings.semantics == "frozen"
        runtime.install()  # every channel kept: the masks start at one, nothing to refresh or zero
        return runtime

    def _plain_copy(
        self, plan: Plan, attributes: Attributes, removed: dict[str, list[int]], index: ModelIndex
    ) -> nn.Module:
        """A deep copy of the model (``index``: its index) sliced by ``plan``, without hooks."""
        self._runtime.uninstall()
        try:
            plain = sliced_copy(index, plan, attributes, removed)
        finally:
            self._runtime.install()
        strip_watch_hooks(plain)  # a criterion's persistent watch() (Taylor) stays on the masked model only
        return plain

    def _export_inplace(
        self,
        plan: Plan,
        attributes: Attributes,
        removed: dict[str, list[int]],
        batches: list[Any],
        verify: bool,
        rtol: float | None,
    ) -> nn.Module:
        softs = [_verify.float32_outputs(self.model, batch) for batch in batches] if verify else []
        self._runtime.uninstall()
        log = apply_plan(ModelIndex(self.model), plan, attributes, removed, release=True) if plan or removed else None
        if verify:
            for batch, soft in zip(batches, softs, strict=True):
                try:
                    result = _verify.compare(soft, _verify.float32_outputs(self.model, batch), rtol)
                except Exception as error:  # noqa: BLE001 - the exported model crashed: put everything back
                    result = _verify.crashed(error)
                if not result:
                    break
            if not result:
                if log is not None:
                    log.undo()
                self._runtime.install()
                if _copy_fits(self.model):  # naming the module compares it with a pruned copy
                    self.generate_pruned_model(inputs=batches[0], rtol=rtol, verify_inputs=batches[1:])  # raises
                raise ExportError(
                    f"the exported model differs from the masked model: {result} (the diverging module is named "
                    "by an export that is not in place, where a second, pruned copy of the model fits in memory)"
                )
            logger.info("generate_pruned_model(): verified against the masked model: %s", result)
        self.remove()
        return self.model

    def _require_made(self, what: str) -> None:
        if not self._made:
            raise NotMadeError(f"call make() before {what}")

    # ---- reporting -------------------------------------------------------------------------
    def __repr__(self) -> str:
        if not self._made:
            return f"Mask({type(self.model).__name__}, {self.settings.target}, not made)"
        groups = self._selection.groups
        kept = sum(g.kept for g in groups)
        total = sum(g.size for g in groups)
        algo = type(self.algorithm).__name__ if self.algorithm is not None else "no algorithm"
        lines = [
            f"Mask({type(self.model).__name__}, {algo}, {self.settings.target}): "
            f"{len(groups)} groups, {kept}/{total} channels kept"
        ]
        lines.append(f"  {'group':>5}  {'kept/total':>11}  members")
        for g in groups:
            names = [f"{m.name}[{m.dim}]" for m in g.members]
            if g.kind == "block":
                names = [f"blocks {', '.join(g.paths)}"]
            elif g.kind == "experts":
                names = [f"experts of {g.experts} (router {g.router}, top {g.top_k})"]
            lines.append(f"  {g.index:>5}  {f'{g.kept}/{g.size}':>11}  {format_names(names)}")
        frozen = self._selection.layout.frozen
        if frozen:
            lines.append("Frozen (never pruned):")
            for reason, names in frozen.items():
                lines.append(f"  {reason}: {format_names(names)}")
        tr = self._selection.trace
        if tr.unknown_ops:
            ops = sorted({f"`{op}` in {path}" for op, path in tr.unknown_ops})
            lines.append(f"Unsupported ops (their channels are frozen): {format_names(ops, 6)}")
        if tr.unreached:
            lines.append(f"Parameters not reached by the trace: {format_names(tr.unreached)}")
        if tr.control_flow:
            sites = [str(site) for site in tr.control_flow]
            lines.append(
                "Branches decided by tensor values (the trace saw one; verify on inputs taking the others): "
                f"{format_names(sites, 3)}"
            )
        for note in tr.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)

    __str__ = __repr__


def _copy_fits(model: nn.Module) -> bool:
    """Whether a copy of ``model``'s CPU tensors fits, with room to spare, into the host memory free now."""
    tensors = (*model.parameters(), *model.buffers())
    on_cpu = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not Linux: no way to tell, so try
        return True
    return 2 * on_cpu < free


def _check_inputs(model: nn.Module, inputs: Any) -> None:
    """Floating example inputs must have the dtype of the model's floating parameters, on their device."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return
    for tensor in iter_tensors(inputs):
        if tensor.is_floating_point() and tensor.dtype != param.dtype:
            raise TypeError(
                f"an example input is {tensor.dtype} but the model's parameters are {param.dtype}: "
                f"pass inputs of the model's dtype (x.to({param.dtype}))"
            )
        if not tensor.is_meta and not param.is_meta and tensor.device != param.device:
            raise ValueError(
                f"an example input is on {tensor.device} but the model's parameters are on {param.device}: "
                f"pass inputs on the model's device (x.to({str(param.device)!r}))"
            )


def _example_inputs(model: nn.Module, example_inputs: Any, input_shape: Sequence[int] | None) -> Any:
    if example_inputs is not None and input_shape is not None:
        raise ValueError("give example_inputs or input_shape, not both")
    if input_shape is not None:
        if not all(isinstance(n, int) and n > 0 for n in input_shape):
            raise ValueError(f"input_shape must be positive integers, got {tuple(input_shape)!r}")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return torch.randn(tuple(input_shape), device=model_device(model), dtype=dtype)
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
