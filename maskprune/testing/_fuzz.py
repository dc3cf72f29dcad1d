""":func:`check_random_model`: one random architecture through ``make()``, random pruning, the export, and the
comparison of the masked and the exported model on fresh inputs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from maskprune._verify import verify
from maskprune.errors import ExportError, MaskpruneError, first_line
from maskprune.mask import Mask

from ._random import random_model

#: what became of one model
EXACT, REFUSED, MISMATCH, CRASH = "exact", "refused", "mismatch", "crash"


@dataclass
class FuzzResult:
    """One random model's verdict.

    ``verdict``: ``"exact"`` (the exported model computes what the masked one does, on the example inputs and on
    fresh ones), ``"refused"`` (a maskprune error said why: ``detail``), ``"mismatch"`` (they differ: ``detail``
    says where) or ``"crash"`` (an error that is not maskprune's: a bug). ``ops``: the model's blocks;
    ``channels``: how many channels the groups had, ``removed``: how many were pruned.
    """

    seed: int
    verdict: str
    detail: str = ""
    ops: list[str] = field(default_factory=list)
    channels: int = 0
    removed: int = 0

    @property
    def ok(self) -> bool:
        """Exact, or refused with a maskprune error."""
        return self.verdict in (EXACT, REFUSED)


def _fresh_inputs(example: torch.Tensor, seed: int, count: int) -> list[torch.Tensor]:
    """``count`` new inputs like ``example`` (the last with one more sample in the batch), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [example.shape] * (count - 1) + [(example.shape[0] + 1, *example.shape[1:])]
    return [torch.randn(shape, generator=generator, dtype=example.dtype) for shape in shapes[-count:]]


def check_random_model(seed: int, *, fresh: int = 2, dtype: torch.dtype = torch.float32) -> FuzzResult:
    """Build :func:`random_model` ``(seed)``, make its Mask, remove a random subset of every group's channels
    (each group keeps at least one), export with verification, and compare the masked and the exported model
    on ``fresh`` new inputs (the last with a larger batch) within the default tolerance of ``dtype``.

    Examples:
        >>> result = check_random_model(2)
        >>> result.verdict, result.removed > 0
        ('exact', True)
    """
    model, inputs = random_model(seed)
    model, inputs = model.to(dtype), inputs.to(dtype)
    result = FuzzResult(seed, EXACT, ops=model.ops)
    rng = random.Random(seed)
    try:
        mask = Mask(model, inputs).make()
        for group in mask.groups:
            result.channels += group.size
            removed = rng.sample(range(group.size), rng.randrange(group.size))
            group.prune(removed)
            result.removed += len(removed)
        pruned = mask.generate_pruned_model()
    except ExportError as error:
        differs = "differs from the masked model" in str(error)
        result.verdict, result.detail = (MISMATCH if differs else REFUSED), first_line(error, 1000)
        return result
    except MaskpruneError as error:
        result.verdict, result.detail = REFUSED, first_line(error, 1000)
        return result
    except Exception as error:  # noqa: BLE001 - any other error of the engine is a bug to report, not a refusal
        result.verdict, result.detail = CRASH, first_line(error, 1000)
        return result
    for i, x in enumerate(_fresh_inputs(inputs, seed, fresh)):
        check = verify(model, pruned, x, mask=mask)
        if not check:
            result.verdict, result.detail = MISMATCH, f"fresh input {i} {tuple(x.shape)}: {check}"
            return result
    return result
