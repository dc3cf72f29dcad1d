"""How much to prune and when: the Mask's options, checked when the Mask is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._allocate import ALLOCATIONS, RAMPS

SEMANTICS = ("frozen", "soft")


@dataclass(frozen=True)
class Settings:
    """Targets, allocation and schedule of a :class:`~maskprune.Mask` (see its docstring for each option)."""

    ratio: float = 0.5
    target_flops: float | None = None
    target_params: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    allocation: str = "uniform"
    min_channels: int = 1
    max_ratio: float = 0.9
    round_to: int = 1
    steps: int = 1
    ramp: str = "linear"
    pre_layer: bool = False
    semantics: str = "frozen"

    @property
    def target(self) -> str:
        """The target in use, as the constructor's argument: ``"ratio=0.3"``, ``"target_flops=0.5"`` or
        ``"target_params=0.75"``."""
        if self.target_params is not None:
            return f"target_params={self.target_params}"
        return f"target_flops={self.target_flops}" if self.target_flops is not None else f"ratio={self.ratio}"

    def __post_init__(self) -> None:
        _fraction("ratio", self.ratio, low_open=False)
        if self.target_flops is not None:
            _fraction("target_flops", self.target_flops, low_open=True)
        if self.target_params is not None:
            _fraction("target_params", self.target_params, low_open=True)
        for name, value in self.ratios.items():
            _fraction(f"ratios[{name!r}]", value, low_open=False)
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("ramp", self.ramp, RAMPS)
        _choice("semantics", self.semantics, SEMANTICS)
        _positive_int("min_channels", self.min_channels)
        _positive_int("round_to", self.round_to)
        _positive_int("steps", self.steps)
        _fraction("max_ratio", self.max_ratio, low_open=True)
        if self.max_ratio < self.ratio:
            raise ValueError(f"max_ratio ({self.max_ratio}) must be at least ratio ({self.ratio})")
        if self.pre_layer and self.steps != 1:
            raise ValueError("pre_layer prunes each group once, in turn: use steps=1 with it")
        if not isinstance(self.pre_layer, bool):
            raise TypeError(f"pre_layer must be True or False, got {self.pre_layer!r}")


def _fraction(name: str, value: object, *, low_open: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not (0 < value < 1 if low_open else 0 <= value < 1):
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
