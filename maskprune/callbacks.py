"""A pruning schedule for Lightning-style training loops, without depending on Lightning.

The plain loop (``do_mask()`` where you want it) stays the primary API; this callback only
calls it at a fixed interval of optimizer steps and puts the Mask's state into the trainer's
checkpoints.
"""

from __future__ import annotations

from typing import Any

from .mask import Mask


class PruningCallback:
    """Calls ``mask.do_mask()`` every ``every`` optimizer steps of a Lightning-style trainer.

    It has the hooks Lightning calls (``on_train_start``, ``on_train_batch_end``,
    ``state_dict``, ``load_state_dict``) and reads ``trainer.optimizers`` and
    ``trainer.global_step`` (optimizer steps, so gradient accumulation is counted right).
    At the start of training it tracks every optimizer (``mask.track_optimizer``). Its
    ``state_dict()`` is the Mask's, so a trainer that checkpoints callbacks resumes the
    schedule exactly. With Lightning installed, mix it into Lightning's base class:
    ``class Pruning(PruningCallback, lightning.pytorch.Callback): pass``.

    Args:
        mask: a made :class:`~maskprune.Mask` with an algorithm.
        every: optimizer steps between two ``do_mask()`` calls (the first at step ``start + every``).
        start: optimizer steps to train before the schedule begins.

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> mask = Mask(model, torch.randn(1, 3, 16, 16), algorithm=L1Norm(), steps=2).make()
        >>> callback = PruningCallback(mask, every=100)  # with Lightning installed:
        >>> trainer = lightning.Trainer(callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(self, mask: Mask, every: int, start: int = 0) -> None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be a maskprune.Mask, got {type(mask).__name__}")
        for name, value, least in (("every", every, 1), ("start", start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.mask = mask
        self.every = every
        self.start = start
        self.last_step = -1  # the optimizer step of the last do_mask()
        self._tracked: set[int] = set()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        for optimizer in trainer.optimizers:
            if id(optimizer) not in self._tracked:
                self.mask.track_optimizer(optimizer)
                self._tracked.add(id(optimizer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step > self.start and (step - self.start) % self.every == 0 and step != self.last_step:
            self.mask.do_mask()
            self.last_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"mask": self.mask.state_dict(), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mask.load_state_dict(state["mask"])
        self.last_step = int(state["last_step"])
