"""FLAP (An et al. 2024): fluctuation of a channel's input times its weight, standardised, with bias compensation."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from maskprune import ActivationSite, Group, Mask

from ._calibrated import Calibrated
from ._calibration import BatchInputs
from ._combine import per_unit
from ._consumers import Reader, ReaderPlan, reader_plan
from ._moments import Moments, tokens


@dataclass
class _Compensation:
    """One consumer of one group: the group's input means and ``W @ means`` before the step, in float64."""

    group: int
    path: str
    layer: nn.Module
    dim: int  # the weight's input dimension
    means: torch.Tensor  # per input feature: the calibration mean at the group's positions, 0 elsewhere
    before: torch.Tensor | None  # W @ means with the weights as they were when scored; None: not a linear layer
    keep: np.ndarray  # the group's keep flags when scored


class FLAP(Calibrated):
    """FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models").

    **Score.** Input channel ``j`` of a consumer layer (an attention's ``o_proj``, the MLP's ``down_proj``:
    every layer whose weight reads the group's channels) scores the sample variance of its input ``X_j``
    over every calibration token times ``||W[:, j]||_2**2`` (the paper's WIFV metric). Within a layer the
    scores of the group's candidate channels are standardised (minus their mean, over their standard
    deviation), and a channel (a head: all its columns) scores the mean of its standardised scores,
    averaged over the consumers that read it. So that ``allocation="global"`` ranks every layer and module
    on one scale, as FLAP's adaptive structure search does, ``comparable_across_groups`` is True.
    Within a group this ranks channels as the sum of their raw scores when every channel has as many
    positions (FLAP's heads). FLAP's code squares the attention scores before standardising; the
    paper's formula does not, nor does this.

    **Bias compensation.** When ``do_mask()`` removes channels, each consumer linear layer that reads them
    (``nn.Linear``, transformers' ``Conv1D``) gets their mean contribution, ``W[:, removed] @ mean(X_removed)``
    (the means over the calibration tokens), added to its bias, in place (:meth:`finish`). The masked model
    carries it as the exported one does, so soft == hard holds and the verified export keeps it. Only layers
    that have a bias are compensated: a new parameter would change ``model.state_dict()``'s keys, which a
    Mask never does, and would not be masked or sliced with the model's other tensors. Give a Llama's
    ``o_proj`` and ``down_proj`` zero biases before ``Mask(...)`` with :func:`add_zero_biases`, as FLAP's
    code does, to have them compensated. Consumers left without compensation (no bias; a convolution, whose
    padding the mean does not pass through exactly) are listed in :attr:`uncompensated` and named in a
    warning. The compensation needs ``semantics="frozen"`` (removed channels stay removed);
    ``compensate=False`` scores only.

    Statistics are kept per input feature on the model's device (count, mean, sum of squared deviations),
    never the activations. Groups read by a layer whose weight does not pair with its input (a functional
    call, a grouped convolution) are declined (:attr:`declined`).

    Args:
        data: calibration batches: a DataLoader, a list, any iterable that can be iterated again at every
            ``do_mask()``. A batch is a tensor, a dict or ``BatchEncoding`` (keyword arguments) or a
            tuple/list ``(inputs, targets, ...)`` whose element 0 is fed.
        compensate: add the removed channels' mean contribution to the consumers' biases.
        max_batches: use at most this many batches per ``do_mask()``.
        inputs: ``inputs(batch)`` gives what to feed when the default above does not fit.

    Attributes:
        uncompensated: ``{layer: why}`` for the consumer layers that lost input channels at the last ``do_mask()``
            without compensation: no bias, or not a linear layer.

    Examples:
        >>> from maskprune import Mask
        >>> from maskprune.algorithms import FLAP
        >>> from maskprune.algorithms.flap import add_zero_biases
        >>> from maskprune.testing import TINY_MODELS
        >>> model, x = TINY_MODELS["grouped_query_attention"]()
        >>> add_zero_biases(model, ["o_proj"])
        ['o_proj']
        >>> mask = Mask(model, x, algorithm=FLAP([x, x]), ratio=0.5, allocation="global").make()
        >>> mask.do_mask()
        True
        >>> bool(model.o_proj.bias.abs().sum() > 0)     # the removed heads' mean output
        True
        >>> pruned = mask.generate_pruned_model()       # verified: soft == hard, compensation included
    """

    comparable_across_groups = True

    def __init__(
        self,
        data: Iterable[Any],
        *,
        compensate: bool = True,
        max_batches: int | None = None,
        inputs: BatchInputs | None = None,
    ) -> None:
        if not isinstance(compensate, bool):
            raise TypeError(f"compensate must be True or False, got {compensate!r}")
        super().__init__(data, max_batches=max_batches, inputs=inputs)
        self.compensate = compensate
        self.uncompensated: dict[str, str] = {}
        self._compensations: list[_Compensation] = []

    def prepare(self, mask: Mask, groups: list[Group]) -> None:
        """Check the semantics, then gather the statistics and score (see :class:`Calibrated`)."""
        if self.compensate and mask.semantics != "frozen":
            raise ValueError(
                "FLAP's bias compensation needs semantics='frozen' (removed channels stay removed); "
                "pass FLAP(..., compensate=False) to score only"
            )
        self._compensations = []
        super().prepare(mask, groups)

    def plan(self, mask: Mask, group: Group) -> ReaderPlan | str:
        return reader_plan(mask, group)

    def samples(self, site: ActivationSite, tensor: torch.Tensor) -> torch.Tensor:
        return tokens(site, tensor)

    def scores(self, group: Group, plan: ReaderPlan, moments: dict[tuple, Moments]) -> np.ndarray:
        candidates = group.keep  # under frozen semantics: the channels kept so far
        total = torch.zeros(group.size, dtype=torch.float64)
        for reader in plan.readers:
            stats = reader.statistics(moments)
            fluctuation = stats.variance(ddof=1) * reader.column_sums(2).to(stats.m2.device)
            summed = per_unit(reader.member, _standardised(fluctuation, reader, candidates), group.size).cpu()
            positions = np.bincount(reader.member.units, minlength=group.size)
            total += summed / torch.as_tensor(np.maximum(positions, 1))
            if self.compensate:
                self._plan_compensation(group, reader, stats.mean, candidates)
        return (total / len(plan.readers)).numpy()

    def finish(self, mask: Mask) -> None:
        """Add the mean contribution of the channels this ``do_mask()`` removed to their consumers' biases."""
        try:
            if self.compensate:
                self._apply(mask)
        finally:
            self._compensations = []
            super().finish(mask)

    def _plan_compensation(self, group: Group, reader: Reader, means: torch.Tensor, keep: np.ndarray) -> None:
        layer, dim = reader.module, reader.member.dim
        index = torch.as_tensor(reader.member.positions, device=means.device)
        full = torch.zeros(reader.member.tensor.shape[dim], dtype=torch.float64, device=means.device)
        full[index] = means.index_select(0, index)
        full = full.to(layer.weight.device)
        before = _matvec(layer.weight, full, dim) if _is_linear(layer, dim) else None
        self._compensations.append(_Compensation(group.index, reader.path, layer, dim, full, before, keep))

    def _apply(self, mask: Mask) -> None:
        self.uncompensated = {}
        masked_rows = _masked_positions(mask)
        for c in self._compensations:
            if not (c.keep & ~mask.groups[c.group].keep).any():
                continue
            if c.before is None:
                self.uncompensated[c.path] = "not a linear layer (nn.Linear, Conv1D)"
                continue
            if c.layer.bias is None:
                self.uncompensated[c.path] = "no bias"
                continue
            # the removed columns are zero now: what they contributed is the difference
            added = c.before - _matvec(c.layer.weight, c.means, c.dim)
            rows = masked_rows.get(id(c.layer.bias))
            if rows is not None:
                added[torch.as_tensor(rows, device=added.device)] = 0.0  # masked outputs stay zero
            with torch.no_grad():
                c.layer.bias.add_(added.to(c.layer.bias.dtype))
        if self.uncompensated:
            names = "; ".join(f"{path} ({why})" for path, why in self.uncompensated.items())
            warnings.warn(
                f"FLAP: no compensation for the channels removed from the inputs of {names}; give linear layers "
                "zero biases before Mask(...) (maskprune.algorithms.flap.add_zero_biases) to have them compensated",
                UserWarning,
                stacklevel=4,
            )

    def __repr__(self) -> str:
        return f"FLAP(compensate={self.compensate}, max_batches={self.max_batches})"


def add_zero_biases(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Give the ``nn.Linear`` layers whose path ends with one of ``names`` a zero bias where they have none.

    Call it before ``Mask(...)``: it adds parameters (``model.state_dict()`` gains their keys), which the
    model computes with as before, so that :class:`FLAP` can compensate them. Returns the layers changed.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.ReLU())
        >>> add_zero_biases(model, ["0"]), model[0].bias
        (['0'], Parameter containing:
        tensor([0., 0., 0.], requires_grad=True))
    """
    suffixes = tuple(names)
    changed = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None and path.endswith(suffixes):
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            changed.append(path)
    return changed


def _standardised(values: torch.Tensor, reader: Reader, candidates: np.ndarray) -> torch.Tensor:
    """``values`` (per position of the input) minus the mean, over the standard deviation, of the candidates'."""
    live = reader.member.positions[candidates[reader.member.units]]
    sample = values.index_select(0, torch.as_tensor(live, device=values.device))
    std = sample.std() if len(sample) > 1 else torch.zeros((), dtype=values.dtype, device=values.device)
    centred = values - sample.mean()
    return torch.where(std > 0, centred / std, torch.zeros_like(centred))


def _is_linear(layer: nn.Module, dim: int) -> bool:
    """A layer computing ``x @ W.T + b`` over the weight's input ``dim``: ``nn.Linear``, or transformers' ``Conv1D``
    (GPT-2's projections: ``x @ W + b``)."""
    if isinstance(layer, nn.Linear):
        return dim == 1
    return type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None and dim == 0


def _matvec(weight: torch.Tensor, vector: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight`` times ``vector`` along its input ``dim``, in float64, a slice of outputs at a time (no float64
    copy of the whole weight)."""
    w = weight.detach().movedim(dim, -1)
    return torch.cat([rows.double() @ vector for rows in w.split(1024)])


def _masked_positions(mask: Mask) -> dict[int, np.ndarray]:
    """Per tensor (by id), the positions of its dim 0 that a group has removed."""
    out: dict[int, list[np.ndarray]] = {}
    for group in mask.groups:
        keep = group.keep
        if keep.all():
            continue
        for member in group.members:
            if member.dim == 0:
                out.setdefault(id(member.tensor), []).append(member.positions[~keep[member.units]])
    return {k: np.concatenate(v) for k, v in out.items()}
