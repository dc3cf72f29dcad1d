"""Several processes pruning one model together (``torch.distributed``): sum statistics, decide once.

Under ``DistributedDataParallel`` every rank calls ``do_mask()`` at the same step. Criteria
that gather statistics on each rank's own batches (APoZ, Taylor) sum them over the ranks
with :func:`all_reduce_sum` before scoring, and the Mask takes the keep flags rank 0
decided (:func:`broadcast_flags`), so every rank ends every ``do_mask()`` with the same masks.
Outside a process group both functions do nothing, so criteria call them unconditionally.
These run once per ``do_mask()``, never per training step. Under FSDP2 the same holds, and the
criteria score full tensors gathered from the shards (:mod:`maskprune._fsdp`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running.

    Examples:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(fallback: torch.device) -> torch.device:
    """Where the backend takes tensors: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type == "cpu" else torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums of ``tensors`` over every rank (new tensors, on the inputs' devices).

    Every rank must call it with tensors of the same shapes and dtypes, in the same order.
    Without a process group it returns copies.

    Examples:
        >>> all_reduce_sum([torch.ones(2)])[0]        # one process: nothing to add
        tensor([1., 1.])
    """
    if not tensors:
        return []
    if not is_distributed():
        return [t.clone() for t in tensors]
    device = _collective_device(tensors[0].device)
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view(t.shape).to(t.device, t.dtype))
        offset += t.numel()
    return out


def broadcast_flags(flags: np.ndarray, src: int = 0) -> np.ndarray:
    """Rank ``src``'s boolean ``flags`` on every rank (the same array back without a process group).

    Examples:
        >>> broadcast_flags(np.array([True, False])).tolist()
        [True, False]
    """
    if not is_distributed():
        return flags
    device = _collective_device(torch.device("cpu"))
    tensor = torch.as_tensor(np.ascontiguousarray(flags, dtype=np.uint8)).to(device)
    dist.broadcast(tensor, src=src)
    return tensor.cpu().numpy().astype(bool)
