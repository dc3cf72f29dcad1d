"""On a CUDA device: the per-batch work of pruning never waits for the GPU.

Counts CUDA synchronisations (``torch.cuda.set_sync_debug_mode("warn")``) of ``do_mask()`` with APoZ and
Taylor statistics over 2 and over 8 batches: the count must not grow with the batches (statistics stay
on the device; only the final decision is read on the host). Then runs masked training steps (forward,
backward, optimizer step with ``track_optimizer``) with synchronisations made errors.

Usage (needs a GPU; prints one line per check and exits non-zero on a failure):
    python benchmarks/gpu_sync_check.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from maskprune.algorithms import APoZ, Taylor

from maskprune import Mask
from maskprune.errors import first_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from fashion_mnist import SmallResNet  # noqa: E402


def synchronisations(algorithm_for, n_batches: int) -> int:
    """CUDA synchronisations during one do_mask() (and, for Taylor, the backward passes feeding it)."""
    torch.manual_seed(0)
    model = SmallResNet().cuda().eval()
    batches = [torch.randn(64, 1, 28, 28, device="cuda") for _ in range(n_batches)]
    algorithm = algorithm_for(batches)
    mask = Mask(model, batches[0], algorithm=algorithm, ratio=0.5).make()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            if isinstance(algorithm, Taylor):
                for x in batches:
                    model(x).logsumexp(1).sum().backward()
            mask.do_mask()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def masked_training_steps(steps: int = 5) -> None:
    """Forward, backward and optimizer step of a masked model, with any synchronisation an error."""
    torch.manual_seed(0)
    model = SmallResNet().cuda().train()
    x, y = torch.randn(64, 1, 28, 28, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    mask = Mask(model, x, algorithm=APoZ([x]), ratio=0.5).make()
    mask.do_mask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    mask.track_optimizer(optimizer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mask.generate_pruned_model()  # verified against the trained masked model (raises if it differs)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = False
    for name, make in (("APoZ", lambda data: APoZ(data)), ("Taylor", lambda data: Taylor())):
        counts = [synchronisations(make, n) for n in (2, 8)]
        ok = counts[1] <= counts[0]  # none per batch (the first run may include one-time work)
        failed |= not ok
        print(f"{name}: synchronisations of do_mask() with 2 and 8 batches: {counts} -> {'ok' if ok else 'FAIL'}")
    try:
        masked_training_steps()
        print("masked training steps (forward, backward, step with track_optimizer): no synchronisation -> ok")
    except RuntimeError as error:
        failed = True
        print(f"masked training steps: FAIL ({first_line(error)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
