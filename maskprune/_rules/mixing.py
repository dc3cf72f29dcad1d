"""Rules of ops that mix values along dims (reductions, softmax, sorts) and of spatial ops (pooling, resampling,
pixel shuffles, grid sampling, RoI pooling).

A mixed dim stays unclaimed, so it freezes; the other dims pass through. Meta kernels of 2-d pooling are
``_meta._max_pool2d``, ``_meta._avg_pool2d`` and ``_meta._adaptive_avg_pool2d``.
"""

from __future__ import annotations

import numpy as np
import torch

from ._core import OpCall, dims_of, rule
from .elementwise import elementwise

_REDUCTIONS = """
sum mean nansum nanmean prod amax amin max min std var std_mean var_mean norm logsumexp argmax argmin
all any count_nonzero median nanmedian mode aminmax kthvalue
""".split()


@rule(*_REDUCTIONS)
def reduction(call: OpCall) -> None:
    x = call.args[0]
    other = call.arg(1, "other")
    if call.name in ("max", "min") and isinstance(other, torch.Tensor):
        return elementwise(call)
    dim_pos = {"norm": 2, "kthvalue": 2}.get(call.name, 1)
    dims = dims_of(call.arg(dim_pos, "dim"), x.dim()) if x.dim() else []
    if call.name == "norm" and not isinstance(call.arg(2, "dim"), (int, list, tuple)):
        dims = None
    if dims is None:
        dims = list(range(x.dim()))
    keep = [d for d in range(x.dim()) if d not in dims]
    for out in call.outputs:
        if out.dim() == len(keep):
            call.set_out(out, [call.space(x, d) for d in keep])
        elif out.dim() == x.dim():
            call.set_out(out, [None if d in dims else call.space(x, d) for d in range(x.dim())])


_MIXING = {
    "softmax": (1, "dim", None),
    "log_softmax": (1, "dim", None),
    "softmin": (1, "dim", None),
    "cumsum": (1, "dim", None),
    "cumprod": (1, "dim", None),
    "cummax": (1, "dim", None),
    "cummin": (1, "dim", None),
    "logcumsumexp": (1, "dim", None),
    "sort": (1, "dim", -1),
    "argsort": (1, "dim", -1),
    "normalize": (2, "dim", 1),
    "topk": (2, "dim", -1),
    "flip": (1, "dims", None),
    "roll": (2, "dims", None),
    "local_response_norm": (99, "", 1),
    "gumbel_softmax": (4, "dim", -1),
    "index_select": (1, "dim", None),
    "msort": (99, "", 0),
}


@rule(*_MIXING)
def mixing(call: OpCall) -> None:
    """Shape-preserving ops that mix values along some dims: those dims freeze, the rest pass."""
    x = call.args[0]
    pos, key, default = _MIXING[call.name]
    dims = dims_of(call.arg(pos, key, default) if key else default, x.dim())
    if dims is None:
        return
    for out in call.outputs:
        if out.dim() == x.dim():
            call.set_out(out, [None if d in dims else call.space(x, d) for d in range(x.dim())])


@rule("histc", "bincount", "histogram")
def histogram(call: OpCall) -> None:
    """Counts of the input's values in bins (the tokens of each expert of a fused MoE layer): every input dim is
    mixed, the bins are new."""
    for out in call.outputs:
        call.set_out(out, [None] * out.dim())


# ---- spatial ops ---------------------------------------------------------------------------------
_SPATIAL = [
    f"{kind}{n}d{suffix}"
    for n in (1, 2, 3)
    for kind, suffix in (
        ("max_pool", ""),
        ("avg_pool", ""),
        ("adaptive_avg_pool", ""),
        ("adaptive_max_pool", ""),
        ("lp_pool", ""),
        ("fractional_max_pool", ""),
        ("max_unpool", ""),
        ("max_pool", "_with_indices"),
        ("adaptive_max_pool", "_with_indices"),
    )
]


@rule(*_SPATIAL, "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
def spatial(call: OpCall) -> None:
    """Pooling and resampling: channels pass, spatial dims are new (frozen) spaces."""
    x = call.args[0]
    digits = [c for c in call.name if c.isdigit()]
    k = int(digits[0]) if digits else x.dim() - 2
    for out in call.outputs:
        if out.dim() == x.dim():
            call.set_out(out, [call.space(x, d) if d < x.dim() - k else None for d in range(x.dim())])
    for extra in call.inputs[1:]:
        call.claim_all(extra)


@rule("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle(call: OpCall) -> None:
    """Channel ``c`` of a pixel shuffle's output is made of the input's channels ``c * r² … c * r² + r² - 1``
    (an unshuffle's output channel ``j`` comes from input channel ``j // r²``): those are one unit. The spatial
    dims are new (frozen) spaces."""
    x, out = call.args[0], call.outputs[0]
    few, many = (out, x) if call.name == "pixel_shuffle" else (x, out)
    block = many.shape[-3] // few.shape[-3]
    idx = np.arange(many.shape[-3])
    space = call.graph.new_space(out.shape[-3])
    if call.name == "pixel_shuffle":
        call.link(space, idx // block, call.space(x, -3), idx)
    else:
        call.link(space, idx, call.space(x, -3), idx // block)
    call.set_out(out, [call.space(x, d) for d in range(x.dim() - 3)] + [space, None, None])


@rule("grid_sample")
def grid_sample(call: OpCall) -> None:
    x, grid = call.args[0], call.arg(1, "grid")
    out = call.outputs[0]
    call.unite(x, 0, grid, 0)
    call.set_out(out, [call.space(x, 0), call.space(x, 1)] + [None] * (out.dim() - 2))


@rule("roi_align", "roi_pool")
def roi_align(call: OpCall) -> None:
    x = call.args[0]
    for out in call.outputs:
        if out.dim() == x.dim():
            call.set_out(out, [None, call.space(x, 1)] + [None] * (out.dim() - 2))
