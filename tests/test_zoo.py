"""Every torchvision model: mask half of every group, export, prove soft == hard, train the export.

Marked ``zoo`` so CI can shard it (``-m zoo`` / ``-m "not zoo"``); CI runs it all.
"""

from __future__ import annotations

import pytest
import torch
from maskprune.algorithms import L1Norm, Random
from zoo import ZooCase, all_cases

import maskprune
from maskprune import Mask

# name -> reason; the target is none.
EXCLUDED: dict[str, str] = {}

CASES = [
    pytest.param(case, id=case.name, marks=[pytest.mark.xdist_group("heavy")] if case.heavy else [])
    for case in all_cases()
    if case.name not in EXCLUDED
]


def _check(case: ZooCase, model: torch.nn.Module, algorithm: maskprune.Algorithm) -> None:
    inputs = case.inputs(2, False)
    mask = Mask(model, inputs, algorithm=algorithm, ratio=0.5).make()
    assert mask.do_mask()
    pruned = mask.generate_pruned_model()  # verifies on the example inputs itself

    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
    fresh = case.inputs(1, case.other_size)  # another batch size (and spatial size where the model allows)
    result = maskprune.verify(model, pruned, fresh)
    assert result.ok, f"{case.name}: {result}"
    assert result.scale > 0, "outputs are all zero: the comparison would prove nothing"

    if case.float32_part is not None:  # what the float64 comparison above proved holds in float32 too
        model.float(), pruned.float()
        images = [image.float() for image in case.inputs(2, False)[0]]
        part = maskprune.verify(model, pruned, (images,), within=case.float32_part, mask=mask)
        assert part.ok and part.scale > 0, f"{case.name} in float32, every module of {case.float32_part}: {part}"
        model.to(case.dtype), pruned.to(case.dtype)

    for module in pruned.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks

    pruned.train()
    loss = case.loss(pruned, case.inputs(2, False))
    loss.backward()
    grads = [p.grad for p in pruned.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.zoo
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("algorithm", [L1Norm, lambda: Random(seed=0)], ids=["l1", "random"])
def test_zoo_soft_equals_hard(case: ZooCase, algorithm) -> None:
    _check(case, case.build(), algorithm())  # a fresh model each time: the largest ones take 2.6 GB
