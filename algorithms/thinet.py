"""ThiNet (Luo et al., ICCV 2017): remove the channels the next layer can best do without."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskprune import ActivationSite, Algorithm, Group, Mask, Member, evaluating, watch

from ._calibration import BatchInputs, check_batches, check_inputs, run_batches


@dataclass
class _Consumer:
    """A conv/linear layer reading the group's channels, and the statistics of its sampled outputs.

    ``gram[a, b]`` sums ``x_a * x_b`` over the samples, where ``x_c`` is channel ``c``'s
    contribution to a sampled output value; ``squares`` sums the squared output values.
    """

    module: nn.Module
    path: str
    member: Member
    sites: list[ActivationSite]
    gram: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    samples: int = 0  # host counter, from shapes
    index: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)


@dataclass
class _Stats:
    keep: np.ndarray  # the candidates when the calibration ran
    consumers: list[_Consumer]


class ThiNet(Algorithm):
    """ThiNet (Luo et al., ICCV 2017): greedy channel selection by the next layer's reconstruction error.

    At every ``do_mask()`` the calibration ``data`` runs through the model (eval mode, no
    gradients, training flags restored after) while the inputs of the group's consumers are
    watched: ``nn.Conv2d``/``nn.Conv1d`` with ``groups=1`` and ``nn.Linear`` layers whose weight
    reads the channels. For ``samples`` random output values per example (each a random output
    channel at a random position, seeded), the contribution ``x_c`` of every channel ``c`` is
    computed (conv: the sum over the kernel window of ``W[o, c] * X[c, window]``; linear:
    ``W[o, c] * X[c]``; positions of one channel summed). ThiNet's Algorithm 1 then grows
    the removed set ``T`` one channel at a time, each time adding the channel that minimises
    ``sum over samples of (sum_{c in T} x_c)**2``; a channel's score is its place in that order
    (removed first = lowest; channels already removed score -1). Only the sums
    ``sum x_a x_b`` are kept, so the memory is ``channels**2`` per consumer, not per sample.

    Several consumers (a residual group feeds many layers): each consumer's samples are scaled
    so that the mean square of its sampled output values (the full output, bias included) is 1,
    then all samples are pooled, so no layer dominates by its scale. A group without a
    conv/linear consumer is declined (left as it is) and listed in :attr:`declined`.

    ``rescale=True``: at the end of each ``do_mask()``, for every group that lost channels in it,
    the kept channels' input weights of each consumer are multiplied by the least-squares
    factors ``w = argmin ||y - X_kept w||**2`` (``y``: the sampled outputs before removal; a tiny
    ridge towards 1 keeps channels the data never activated unchanged). This changes the
    consumers' weights in place, so the masked and the exported models both carry it (an
    optimizer's momentum for those weights is not rescaled).

    Args:
        data: calibration batches (a DataLoader, a list: iterated again at every ``do_mask()``);
            a batch is a tensor, a dict of keyword arguments, or ``(inputs, targets, ...)``.
        samples: sampled output values per example and consumer, or None for every output value
            (exact, and memory-hungry: for small layers and tests).
        rescale: least-squares rescaling of the consumers' kept input weights (see above).
        max_batches: use at most this many batches per ``do_mask()``.
        inputs: ``inputs(batch)`` gives what to feed, when the default above does not fit.
        seed: seeds the sampled locations (the same at every ``do_mask()``).

    Attributes:
        declined: ``{group index: why}`` for groups left alone.

    Examples:
        >>> from maskprune import Mask
        >>> from maskprune.algorithms import ThiNet
        >>> from maskprune.testing import TINY_MODELS
        >>> model, x = TINY_MODELS["conv2d"]()
        >>> mask = Mask(model, x, algorithm=ThiNet([x], rescale=True), ratio=0.5).make()
        >>> mask.do_mask()
        True
    """

    def __init__(
        self,
        data: Iterable[Any],
        *,
        samples: int | None = 10,
        rescale: bool = False,
        max_batches: int | None = None,
        inputs: BatchInputs | None = None,
        seed: int = 0,
    ) -> None:
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise ValueError(f"samples must be a positive integer or None (every output value), got {samples!r}")
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be True or False, got {rescale!r}")
        self.data = data
        self.samples = samples
        self.rescale = rescale
        self.max_batches = check_batches(max_batches)
        self.inputs = check_inputs(inputs)
        self.seed = int(seed)
        self.declined: dict[int, str] = {}
        self._stats: dict[Group, _Stats | None] = {}

    # ---- calibration -----------------------------------------------------------------------
    def prepare(self, mask: Mask, groups: Sequence[Group]) -> None:
        """Run the calibration data once, gathering the contributions of each group's channels."""
        self._stats = {}
        per_key: dict[tuple[int, int], list[tuple[_Consumer, ActivationSite, int]]] = {}
        watched: list[ActivationSite] = []
        for group in groups:
            self.declined.pop(group.index, None)
            consumers = _consumers(mask, group)
            if not consumers:
                self.declined[group.index] = "no Conv1d/Conv2d (groups=1) or Linear layer reads its channels"
                self._stats[group] = None
                continue
            self._stats[group] = _Stats(group.keep, consumers)
            for consumer in consumers:
                for site in consumer.sites:
                    key = (id(site.module), site.call)
                    if key not in per_key:
                        per_key[key] = []
                        watched.append(site)
                    per_key[key].append((consumer, site, group.size))
        if not watched:
            return
        model = mask.model
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed(self.seed)

        def observe(site: ActivationSite, x: torch.Tensor) -> None:
            sampled = _sample(site.module, x, self.samples, generator)
            if sampled is None:
                return
            contributions, outputs = sampled
            for consumer, own, size in per_key[(id(site.module), site.call)]:
                if isinstance(own.module, nn.Linear) and own.dim != x.dim() - 1:
                    continue  # a Linear reads its last dimension only
                _accumulate(consumer, own, size, contributions, outputs)

        with evaluating(model), torch.no_grad(), watch(model, watched, observe):
            run_batches(model, self.data, inputs=self.inputs, max_batches=self.max_batches, desc="ThiNet")
        for group, stats in self._stats.items():
            if stats is None:
                continue
            stats.consumers = [c for c in stats.consumers if c.samples and c.squares is not None and c.squares > 0]
            if not stats.consumers:
                self.declined[group.index] = "the calibration batches gave its consumers no non-zero output"
                self._stats[group] = None

    # ---- scores ----------------------------------------------------------------------------
    def score(self, group: Group) -> np.ndarray | None:
        """Place of each channel in the greedy removal order (first removed = 0; removed already = -1)."""
        if group.kind not in self.kinds:
            return None  # a block group: this criterion scores channels
        if group not in self._stats:
            raise RuntimeError(
                f"ThiNet has no statistics for group {group.index}: it scores the groups given to prepare(), "
                "which Mask.do_mask() calls"
            )
        stats = self._stats[group]
        if stats is None:
            return None
        gram = sum(_gram(c) * (c.samples / float(c.squares)) for c in stats.consumers)
        candidates = np.flatnonzero(stats.keep)
        order = greedy_order(gram[np.ix_(candidates, candidates)])
        scores = np.full(group.size, -1.0)
        scores[candidates[order]] = np.arange(len(candidates), dtype=float)
        return scores

    def finish(self, mask: Mask) -> None:
        """With ``rescale=True``, rescale the consumers of the groups that just lost channels; then forget."""
        try:
            if self.rescale:
                for group, stats in self._stats.items():
                    if stats is not None and (stats.keep & ~group.keep).any():
                        for consumer in stats.consumers:
                            _rescale(consumer, stats.keep, group.keep)
        finally:
            self._stats = {}

    def __repr__(self) -> str:
        return f"ThiNet(samples={self.samples}, rescale={self.rescale}, max_batches={self.max_batches})"


def greedy_order(gram: np.ndarray) -> np.ndarray:
    """ThiNet's Algorithm 1: the order in which channels join the removed set ``T``.

    ``gram[a, b] = sum over samples of x_a * x_b``; adding ``c`` to ``T`` raises the error
    ``sum (sum_{t in T} x_t)**2`` by ``2 * sum_{t in T} gram[t, c] + gram[c, c]``, and each step
    adds the channel that raises it least (the lowest index on a tie).

    Examples:
        >>> greedy_order(np.array([[4.0, -1.0], [-1.0, 1.0]])).tolist()
        [1, 0]
    """
    gram = np.asarray(gram, dtype=float)
    size = len(gram)
    left = np.ones(size, dtype=bool)
    shared = np.zeros(size)  # sum over t in T of gram[t, c]
    order = np.empty(size, dtype=np.int64)
    for step in range(size):
        cost = np.where(left, 2 * shared + np.diag(gram), np.inf)
        chosen = int(np.argmin(cost))
        order[step] = chosen
        left[chosen] = False
        shared += gram[:, chosen]
    return order


# ---- consumers and samples ---------------------------------------------------------------------
def _consumers(mask: Mask, group: Group) -> list[_Consumer]:
    inputs = group.activations("input")
    found = []
    for member in group.members:
        if member.role != "consumer" or member.dim != 1:
            continue
        module = mask.model.get_submodule(member.module)
        if member.name.rpartition(".")[2] != "weight":  # by name: under FSDP2 the member holds a gathered copy
            continue
        is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
        if not (is_conv or isinstance(module, nn.Linear)):
            continue
        sites = [s for s in inputs if s.module is module and s.index == 0 and (s.dim == 1 or not is_conv)]
        if sites:
            found.append(_Consumer(module, member.module, member, sites))
    return found


def _sample(
    module: nn.Module, x: torch.Tensor, samples: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per sampled output value: every input feature's contribution (samples, features), and the output value."""
    if isinstance(module, nn.Linear):
        return _sample_linear(module, x, samples, generator)
    return _sample_conv(module, x, samples, generator)


def _sample_linear(
    module: nn.Linear, x: torch.Tensor, samples: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    weight = module.weight
    n_rows, n_out = rows.shape[0], weight.shape[0]
    if samples is None:
        row = torch.arange(n_rows, device=x.device).repeat_interleave(n_out)
        out = torch.arange(n_out, device=x.device).repeat(n_rows)
    else:
        count = (x.shape[0] if x.dim() > 1 else 1) * samples
        row = torch.randint(n_rows, (count,), device=x.device, generator=generator)
        out = torch.randint(n_out, (count,), device=x.device, generator=generator)
    contributions = rows[row] * weight[out]
    return contributions, _output(module, contributions, out)


def _sample_conv(
    module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, samples: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    spatial = x.dim() - 2
    if spatial not in (1, 2) or spatial != module.weight.dim() - 2:
        return None
    kernel, stride, dilation = (tuple(getattr(module, k)) for k in ("kernel_size", "stride", "dilation"))
    pads = []
    for i in range(spatial):
        if module.padding == "valid":
            pads.append((0, 0))
        elif module.padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((module.padding[i], module.padding[i]))
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dimension first
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(x, flat, mode=mode) if any(flat) else x
    weight = module.weight
    if spatial == 1:  # as a 2-d convolution of height 1
        padded, weight = padded.unsqueeze(2), weight.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    n, _, height, width = padded.shape
    n_out = weight.shape[0]
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        return None
    device = x.device
    if samples is None:
        grid = torch.meshgrid(*(torch.arange(s, device=device) for s in (n, n_out, out_h, out_w)), indexing="ij")
        image, out, i, j = (g.reshape(-1) for g in grid)
    else:
        count = n * samples
        image = torch.arange(n, device=device).repeat_interleave(samples)
        out = torch.randint(n_out, (count,), device=device, generator=generator)
        i = torch.randint(out_h, (count,), device=device, generator=generator)
        j = torch.randint(out_w, (count,), device=device, generator=generator)
    rows = i[:, None] * stride[0] + torch.arange(kernel[0], device=device) * dilation[0]
    cols = j[:, None] * stride[1] + torch.arange(kernel[1], device=device) * dilation[1]
    windows = padded[image[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (samples, kh, kw, channels)
    contributions = torch.einsum("shwc,schw->sc", windows, weight[out])
    return contributions, _output(module, contributions, out)


def _output(module: nn.Module, contributions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    total = contributions.sum(1)
    return total if module.bias is None else total + module.bias[out]


def _accumulate(
    consumer: _Consumer, site: ActivationSite, size: int, contributions: torch.Tensor, outputs: torch.Tensor
) -> None:
    """Sum the contributions of each channel's positions and add their products to the consumer's Gram matrix."""
    device = contributions.device
    if contributions.shape[1] <= int(site.positions.max()):
        return  # not the shape that was traced
    index = consumer.index.get(id(site))
    if index is None or index[0].device != device:  # once per site and device, not per batch
        index = consumer.index[id(site)] = (
            torch.as_tensor(site.positions, device=device),
            torch.as_tensor(site.units, device=device),
        )
    positions, units = index
    dtype = torch.float32 if device.type == "mps" else torch.float64
    per_channel = torch.zeros(contributions.shape[0], size, dtype=dtype, device=device)
    per_channel.index_add_(1, units, contributions.index_select(1, positions).to(dtype))
    gram = per_channel.T @ per_channel
    squares = outputs.to(dtype).square().sum()
    if consumer.gram is None:
        consumer.gram, consumer.squares = gram, squares
    else:
        consumer.gram += gram
        consumer.squares += squares
    consumer.samples += contributions.shape[0]


def _gram(consumer: _Consumer) -> np.ndarray:
    return consumer.gram.double().cpu().numpy()


def _rescale(consumer: _Consumer, before: np.ndarray, after: np.ndarray) -> None:
    """Multiply the consumer's kept input weights by the least-squares factors (ridge towards 1)."""
    kept = np.flatnonzero(after & before)
    if not len(kept):
        return
    gram = _gram(consumer)
    a = gram[np.ix_(kept, kept)]
    b = gram[kept] @ before.astype(float)  # X_kept^T y with y = the sum over the channels alive before
    ridge = 1e-6 * max(float(np.trace(a)) / len(kept), np.finfo(float).tiny)
    factors = np.linalg.solve(a + ridge * np.eye(len(kept)), b + ridge)
    per_unit = np.ones(len(before))
    per_unit[kept] = factors
    member = consumer.member
    weight = member.tensor
    scale = torch.ones(weight.shape[member.dim], dtype=weight.dtype, device=weight.device)
    scale[torch.as_tensor(member.positions, device=weight.device)] = torch.as_tensor(
        per_unit[member.units], dtype=weight.dtype, device=weight.device
    )
    shape = [1] * weight.dim()
    shape[member.dim] = -1
    with torch.no_grad():
        weight.mul_(scale.view(shape))
