"""First-order Taylor importance (Molchanov et al., CVPR 2019), measured on the activation after BatchNorm."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from maskprune import ActivationSite, Algorithm, Group, Mask, watch
from maskprune.distributed import all_reduce_sum, is_distributed


@dataclass
class _Tally:
    """Sum over mini-batches of s**2 per channel of one group at one site, and how many mini-batches."""

    site: ActivationSite
    size: int
    total: torch.Tensor | None = None
    batches: int = 0  # a host counter: incremented by Python, never read from a device
    index: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def add(self, per_position: torch.Tensor) -> None:
        device = per_position.device
        if self.index is None or self.index[0].device != device:  # once per device, not per step
            self.index = (
                torch.as_tensor(self.site.positions, device=device),
                torch.as_tensor(self.site.units, device=device),
            )
        positions, units = self.index
        s = torch.zeros(self.size, dtype=per_position.dtype, device=device)
        s.index_add_(0, units, per_position.index_select(0, positions))
        squared = s * s
        self.total = squared if self.total is None else self.total.to(device).add_(squared)
        self.batches += 1

    def reset(self) -> None:
        self.total, self.batches = None, 0


class Taylor(Algorithm):
    """First-order Taylor importance (Molchanov et al., CVPR 2019): ``(sum of a * dL/da)**2`` per mini-batch.

    :meth:`attach` (called by ``Mask.make()``) hooks the outputs of the BatchNorm layers of
    every group (the paper's Taylor-FO-BN); a group without one is measured at the outputs
    of its producers (the conv/linear layers that compute its channels) and listed in
    :attr:`fallback`; a group with neither is declined (:attr:`declined`). On every forward
    with gradients enabled, each hooked activation ``a`` gets a gradient hook: on backward,
    ``s = sum over the batch and every position of a * dL/da`` per channel (positions of
    one channel summed), and ``s**2`` is added on the device, with no host synchronisation.
    The score is the mean of ``s**2`` over the mini-batches seen since the last
    ``do_mask()``, averaged over the group's sites (a residual group has several BNs).
    Scores compare across groups (``comparable_across_groups``); ``finish()`` resets them.

    In-place ops after the BN (``ReLU(inplace=True)``, ResNet's ``out += identity``) would
    change the activation the hook holds, and ``+=`` makes ``a * dL/da`` wrong (an in-place
    ReLU alone would not: where it zeroes ``a``, the gradient at the BN output is zero
    too). So each hooked activation is copied in the forward (as the official code's gate
    layer keeps it): one extra activation per hooked BN lives until the backward.
    The gradient hook receives ``dL/da`` of the BN output itself even when later ops
    modify that tensor in place.

    Train as usual (forward and ``loss.backward()`` on a few mini-batches), then call
    ``do_mask()``. Zero the optimizer momentum of removed channels (``mask.track_optimizer``).
    Under ``torch.distributed`` the sums and mini-batch counts of every rank are added up
    before scoring (in :meth:`prepare`), so every rank scores with the same statistics.
    :meth:`state_dict` holds the sums accumulated since the last ``do_mask()``.

    Attributes:
        fallback: ``{group index: producer modules}`` for groups without a BatchNorm.
        declined: ``{group index: why}`` for groups with no activation to measure.

    Examples:
        >>> import torch
        >>> from maskprune import Mask
        >>> from maskprune.algorithms import Taylor
        >>> from maskprune.testing import TINY_MODELS
        >>> model, x = TINY_MODELS["batch_norm2d"]()
        >>> mask = Mask(model, x, algorithm=Taylor(), ratio=0.25).make()
        >>> model(x).square().mean().backward()
        >>> mask.do_mask()
        True
    """

    comparable_across_groups = True
    #: Module types whose output is measured; extend for your own normalisation layers.
    norm_types: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

    def __init__(self) -> None:
        self.fallback: dict[int, str] = {}
        self.declined: dict[int, str] = {}
        self._mask: Mask | None = None
        self._stack: ExitStack | None = None
        self._tallies: dict[Group, list[_Tally]] = {}
        self._summed: dict[int, tuple[torch.Tensor, int]] = {}  # id(tally) -> sums over the ranks

    def attach(self, mask: Mask) -> None:
        """Hook the BatchNorm outputs (or producer outputs) of every group of ``mask``."""
        if self._mask is mask:
            return
        if self._mask is not None:
            self.detach(self._mask)
        self.fallback, self.declined, self._tallies = {}, {}, {}
        by_key: dict[tuple, list[_Tally]] = {}
        watched: list[ActivationSite] = []
        for group in mask.groups:
            outputs = group.activations("output")
            sites = [s for s in outputs if isinstance(s.module, self.norm_types)]
            if not sites:
                producers = {id(mask.model.get_submodule(m.module)) for m in group.producers()}
                sites = [s for s in outputs if id(s.module) in producers]
                if sites:
                    self.fallback[group.index] = ", ".join(dict.fromkeys(s.path for s in sites))
            if not sites:
                self.declined[group.index] = "no BatchNorm or producer output carries its channels"
                continue
            self._tallies[group] = []
            for site in sites:
                tally = _Tally(site, group.size)
                self._tallies[group].append(tally)
                key = (id(site.module), site.call, site.index, site.dim)
                if key not in by_key:
                    by_key[key] = []
                    watched.append(site)
                by_key[key].append(tally)

        def on_forward(site: ActivationSite, tensor: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and tensor.requires_grad) or tensor.dim() <= site.dim:
                return
            tallies = by_key[(id(site.module), site.call, site.index, site.dim)]
            value = tensor.detach().clone()  # later in-place ops (out += identity) must not reach it
            dims = [d for d in range(tensor.dim()) if d != site.dim]

            def on_backward(grad: torch.Tensor) -> None:
                per_position = (value * grad).sum(dim=dims, dtype=torch.float32) if dims else (value * grad).float()
                for tally in tallies:
                    tally.add(per_position)

            tensor.register_hook(on_backward)

        stack = ExitStack()
        stack.enter_context(watch(mask.model, watched, on_forward))
        self._mask, self._stack = mask, stack

    def detach(self, mask: Mask) -> None:
        """Take off the hooks installed by :meth:`attach`."""
        if self._stack is not None:
            self._stack.close()
        self._mask, self._stack, self._tallies = None, None, {}

    def prepare(self, mask: Mask, groups: list[Group]) -> None:
        """Under ``torch.distributed``: add up every rank's sums and mini-batch counts (one all-reduce)."""
        self._summed = {}
        if not is_distributed():
            return
        tallies = [t for g in groups for t in self._tallies.get(g, [])]
        totals = [t.total if t.total is not None else torch.zeros(t.size) for t in tallies]
        counts = torch.tensor([float(t.batches) for t in tallies], dtype=torch.float64)
        *sums, batches = all_reduce_sum([*totals, counts])
        for tally, total, n in zip(tallies, sums, batches.tolist(), strict=True):
            self._summed[id(tally)] = (total, int(n))

    def score(self, group: Group) -> np.ndarray | None:
        """Mean over mini-batches of ``s**2`` per channel, averaged over the group's sites; None when declined."""
        if group.kind not in self.kinds:
            return None  # a block group: this criterion scores channels
        if group.index in self.declined:
            return None
        tallies = self._tallies.get(group)
        if tallies is None:
            raise RuntimeError(
                "Taylor is not attached to this group's Mask: pass it as Mask(..., algorithm=Taylor()) before make()"
            )
        sums = [self._summed.get(id(t), (t.total, t.batches)) for t in tallies]
        seen = [(total, n) for total, n in sums if n]
        if not seen:
            raise ValueError(
                f"Taylor has seen no gradient for group {group.index} since the last do_mask(): run forward and "
                "backward (loss.backward()) on training batches, with gradients enabled, before do_mask()"
            )
        means = [(total / n).double().cpu().numpy() for total, n in seen]
        return np.mean(means, axis=0)

    def finish(self, mask: Mask) -> None:
        """Forget the gradients seen so far: the next ``do_mask()`` scores the mini-batches after this one."""
        for tallies in self._tallies.values():
            for tally in tallies:
                tally.reset()
        self._summed = {}

    def state_dict(self) -> dict:
        """Per group index, per site: the sum of ``s**2`` (or None) and the mini-batches seen since ``do_mask()``."""
        return {"sums": {g.index: [[t.total, t.batches] for t in tallies] for g, tallies in self._tallies.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Take back :meth:`state_dict`'s sums (after ``make()``, which attaches the criterion to the groups)."""
        sums = state.get("sums", {})
        mine = {g.index: tallies for g, tallies in self._tallies.items()}
        if set(sums) != set(mine) or any(len(sums[i]) != len(mine[i]) for i in mine):
            raise ValueError(
                "the Taylor state does not fit this Mask's groups: load it into a Mask made on the same architecture"
            )
        for index, tallies in mine.items():
            for tally, (total, batches) in zip(tallies, sums[index], strict=True):
                tally.total = None if total is None else total.clone()  # moves to the device at the next batch
                tally.batches = int(batches)

    def __repr__(self) -> str:
        return "Taylor()"
