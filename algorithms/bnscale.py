"""Network slimming: BatchNorm scale factors as channel importance, after L1 sparsity training on them."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from maskprune import Algorithm, Group

from ._combine import per_unit


class BNScale(Algorithm):
    """|gamma| of the BatchNorm that normalises each channel (Liu et al., ICCV 2017).

    The group's BatchNorm members are found through ``group.activations()``: the
    BatchNorm modules (``torch.nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d,
    SyncBatchNorm) that wrote the group's channels during the trace and whose ``weight``
    is a member of the group. With several of them (the branches of a residual sum),
    a channel's score is their mean |gamma|; a channel owning several positions of one
    BatchNorm takes the mean over them. Raw |gamma| compare across layers, so a global
    allocation ranks them as they are (``comparable_across_groups``).

    A group without such a BatchNorm weight (no BatchNorm, ``affine=False``,
    LayerNorm/GroupNorm, FrozenBatchNorm2d whose weight is a buffer) is *declined*:
    :meth:`score` returns None and the engine leaves the group alone.

    Train with the sparsity penalty ``strength * sum |gamma|`` by calling
    :meth:`regularize` after each ``loss.backward()``.

    Examples:
        >>> criterion = BNScale(strength=1e-4)
        >>> criterion
        BNScale(strength=0.0001)
        >>> # loss.backward(); criterion.regularize(model); optimizer.step()
    """

    comparable_across_groups = True

    def __init__(self, *, strength: float = 1e-4) -> None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength < float("inf"):
            raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
        self.strength = float(strength)

    def score(self, group: Group) -> torch.Tensor | None:
        if group.kind not in self.kinds:
            return None  # a block group: this criterion scores channels
        gammas = [
            site.module.weight
            for site in group.activations()
            if isinstance(site.module, _BatchNorm) and site.module.weight is not None
        ]
        members = [m for m in group.members if any(m.tensor is gamma for gamma in gammas)]
        if not members:
            return None
        scores = []
        for member in members:
            total = per_unit(member, member.tensor.detach().abs(), group.size)
            count = per_unit(member, torch.ones_like(member.tensor, dtype=torch.float64), group.size)
            scores.append((total / count.clamp(min=1)).cpu())
        return torch.stack(scores).mean(0)

    def regularize(self, model: nn.Module) -> None:
        """Add the L1 subgradient ``strength * sign(gamma)`` to the grad of every BatchNorm weight that has one.

        Call it between ``loss.backward()`` and ``optimizer.step()``; it stays on the
        device (no host synchronisation).
        """
        seen: set[int] = set()  # a weight shared by two BatchNorms gets one penalty
        with torch.no_grad():
            for module in model.modules():
                gamma = module.weight if isinstance(module, _BatchNorm) else None
                if gamma is None or gamma.grad is None or id(gamma) in seen:
                    continue
                seen.add(id(gamma))
                gamma.grad.add_(gamma.sign(), alpha=self.strength)

    def __repr__(self) -> str:
        return f"BNScale(strength={self.strength:g})"
