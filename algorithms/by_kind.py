"""One criterion per kind of group: channels, blocks (depth) and experts ranked in one Mask."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from maskprune import Algorithm, Group, Mask

KINDS = ("channels", "block", "experts")


class ByKind(Algorithm):
    """Scores each kind of group with its own criterion; a kind given no criterion is not pruned.

    ``Mask(..., depth=True)`` adds groups of ``kind == "block"`` (whole residual blocks) and mixture-of-experts
    layers add groups of ``kind == "experts"``; a channel criterion such as :class:`Activation` declines both.
    ``ByKind`` hands every group to the criterion of its kind, so that width, depth and experts are pruned
    together, to one ``ratio`` or ``target_params``, as Minitron prunes width and depth to a parameter budget.

    Args:
        channels: the criterion of channel groups (heads, neurons, hidden size), or None.
        block: the criterion of block groups, e.g. :class:`BlockImportance`, or None.
        experts: the criterion of expert groups, e.g. :class:`RouterUsage`, or None.

    Examples:
        >>> from maskprune.algorithms import BlockImportance, L2Norm
        >>> model = torchvision.models.resnet18()
        >>> data = [torch.randn(2, 3, 64, 64)]
        >>> algorithm = ByKind(channels=L2Norm(), block=BlockImportance(data))
        >>> algorithm.kinds
        ('channels', 'block')
        >>> mask = Mask(model, data[0], algorithm=algorithm, ratio=0.5, depth=True).make()
        >>> mask.do_mask()
        True
        >>> sorted({g.kind for g in mask.groups if g.pruned})
        ['block', 'channels']
    """

    def __init__(
        self, channels: Algorithm | None = None, block: Algorithm | None = None, experts: Algorithm | None = None
    ) -> None:
        self.parts = {"channels": channels, "block": block, "experts": experts}
        for kind, part in self.parts.items():
            if part is not None and not isinstance(part, Algorithm):
                raise TypeError(f"ByKind({kind}=...) takes an Algorithm instance, got {part!r}")
            if part is not None and kind not in part.kinds:
                raise ValueError(f"{part!r} scores groups of kinds {part.kinds}, not {kind!r}")
        if not any(self.parts.values()):
            raise ValueError(f"ByKind needs a criterion for at least one of {KINDS}")
        self.kinds = tuple(kind for kind, part in self.parts.items() if part is not None)

    def _each(self) -> list[Algorithm]:
        return [part for part in self.parts.values() if part is not None]

    def attach(self, mask: Mask) -> None:
        """Attach every criterion given."""
        for part in self._each():
            part.attach(mask)

    def detach(self, mask: Mask) -> None:
        """Detach every criterion given."""
        for part in self._each():
            part.detach(mask)

    def prepare(self, mask: Mask, groups: Sequence[Group]) -> None:
        """Prepare each criterion with the groups of its kind."""
        for kind, part in self.parts.items():
            if part is not None:
                part.prepare(mask, [g for g in groups if g.kind == kind])

    def finish(self, mask: Mask) -> None:
        """Finish every criterion given."""
        for part in self._each():
            part.finish(mask)

    def score(self, group: Group) -> torch.Tensor:
        """The score of ``group`` by the criterion of its kind."""
        return self.parts[group.kind].score(group)

    def state_dict(self) -> dict:
        """Each criterion's state, by kind."""
        return {kind: part.state_dict() for kind, part in self.parts.items() if part is not None}

    def load_state_dict(self, state: dict) -> None:
        """Give each criterion its state back."""
        for kind, part in self.parts.items():
            if part is not None and kind in state:
                part.load_state_dict(state[kind])

    def group_weights(self, sizes: np.ndarray) -> np.ndarray | None:
        """The channel criterion's relative ratios (a random baseline's draw), if it has any."""
        channels = self.parts["channels"]
        return None if channels is None else channels.group_weights(sizes)

    def __repr__(self) -> str:
        given = ", ".join(f"{kind}={part!r}" for kind, part in self.parts.items() if part is not None)
        return f"ByKind({given})"
