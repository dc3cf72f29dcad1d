"""The layer table: what each module type needs after its tensors are sliced, and user registration.

How channels *flow* is decided by the op rules in :mod:`maskprune._rules`, which
see ``conv2d``, ``linear``, ``batch_norm`` … whether a module or a user's
function calls them. This table only covers what the slicing of parameters does
not: the attributes a module's ``forward`` reads (``in_channels``, ``groups``,
``normalized_shape`` …). The updaters that set them live beside their op family's
rules in :mod:`maskprune._rules` and register here with :func:`updater`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

Updater = Callable[[nn.Module], None]


@dataclass(frozen=True)
class LayerRule:
    """How a user's module moves channels, for modules the tracer should not look inside.

    Dimensions are labelled with channel-space names; the same name means the same
    channels. Dimensions not named are never pruned; other dimensions of the first
    input and the first output that have the same size pass through (batch, tokens).

    Args:
        inputs: positional input index -> {dim: space name}.
        outputs: output index (in flattening order) -> {dim: space name}.
        params: parameter name relative to the module -> {dim: space name}.
        roles: space name -> role of the parameter dims with that name for scoring
            ("producer", "consumer", "norm"); default "norm".
        update: called on the module after its parameters are sliced, to fix
            attributes its forward reads.

    Examples:
        >>> rule = LayerRule(
        ...     inputs={0: {-1: "in"}}, outputs={0: {-1: "out"}},
        ...     params={"inner.weight": {0: "out", 1: "in"}, "scale": {0: "out"}},
        ...     roles={"out": "producer"},
        ... )
    """

    inputs: dict[int, dict[int, str]] = field(default_factory=dict)
    outputs: dict[int, dict[int, str]] = field(default_factory=dict)
    params: dict[str, dict[int, str]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    update: Updater | None = None


_LEAF_RULES: dict[type, LayerRule] = {}


def register(module_type: type[nn.Module], layer_rule: LayerRule) -> None:
    """Teach maskprune a module type: its channels follow ``layer_rule`` and its inside is not traced.

    Examples:
        >>> class Scale(nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.gain = nn.Parameter(torch.ones(n))
        ...     def forward(self, x):
        ...         return x * self.gain
        >>> register(Scale, LayerRule(inputs={0: {-1: "c"}}, outputs={0: {-1: "c"}}, params={"gain": {0: "c"}}))
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register() needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(layer_rule, LayerRule):
        raise TypeError(f"register() needs a maskprune.LayerRule, got {type(layer_rule).__name__}")
    for where, table in (("inputs", layer_rule.inputs), ("outputs", layer_rule.outputs), ("params", layer_rule.params)):
        for key, dims in table.items():
            if not isinstance(dims, dict) or not all(
                isinstance(d, int) and isinstance(n, str) for d, n in dims.items()
            ):
                raise TypeError(f"LayerRule.{where}[{key!r}] must map int dims to str space names, got {dims!r}")
    _LEAF_RULES[module_type] = layer_rule


def unregister(module_type: type[nn.Module]) -> None:
    """Forget a registration made with :func:`register`."""
    _LEAF_RULES.pop(module_type, None)


def leaf_rules() -> dict[type, LayerRule]:
    return dict(_LEAF_RULES)


# ---- RMS norms written as modules -------------------------------------------------------------
LAST_DIM_NORMS = (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)  # torch's own
RMS_NORM_RULE = LayerRule(inputs={0: {-1: "c"}}, outputs={0: {-1: "c"}}, params={"weight": {0: "c"}})


def named_like_rms_norm(kind: type) -> bool:
    """Whether a module class is named like an RMS norm (``*RMSNorm``, ``T5LayerNorm``) and is not one of torch's
    norms (traced through their ``layer_norm`` / ``rms_norm`` op): its modules may be RMS norms of the model's own.

    Examples:
        >>> named_like_rms_norm(type("LlamaRMSNorm", (nn.Module,), {})), named_like_rms_norm(nn.LayerNorm)
        (True, False)
    """
    name = kind.__name__.lower()
    if "rmsnorm" not in name and name != "t5layernorm":
        return False
    return not issubclass(kind, LAST_DIM_NORMS)


def rms_norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a model's own RMS norm module (Llama's ``LlamaRMSNorm``, T5's ``T5LayerNorm`` …), else None.

    Such a module is traced as one layer (:data:`RMS_NORM_RULE`): its statistic is a mean over the
    channels, which the masked forward rescales to the kept channels (:func:`rms_rescale`).

    Examples:
        >>> class MyRMSNorm(nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.weight, self.variance_epsilon = nn.Parameter(torch.ones(n)), 1e-6
        >>> rms_norm_eps(MyRMSNorm(4)), rms_norm_eps(nn.LayerNorm(4))
        (1e-06, None)
    """
    if not named_like_rms_norm(type(module)):
        return None
    params = dict(module.named_parameters())
    if list(params) != ["weight"] or params["weight"].dim() != 1 or next(module.children(), None) is not None:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def rms_rescale(x: torch.Tensor, y: torch.Tensor, dim: int, keep: torch.Tensor, eps: float) -> torch.Tensor:
    """``y``, an RMS norm of ``x`` over all channels of ``dim``, as if over the kept channels only.

    ``y = f(weight) * x / rms(x)`` whatever ``f`` is (``weight``, ``1 + weight``): multiplying by
    ``rms_all / rms_kept`` gives the norm of the exported model, which no longer has the removed channels.

    Examples:
        >>> x = torch.randn(2, 4); keep = torch.tensor([1.0, 1.0, 0.0, 1.0]); x = x * keep
        >>> y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        >>> hard = x[:, [0, 1, 3]] * torch.rsqrt(x[:, [0, 1, 3]].pow(2).mean(-1, keepdim=True) + 1e-6)
        >>> torch.allclose(rms_rescale(x, y, 1, keep, 1e-6)[:, [0, 1, 3]], hard, atol=1e-6)
        True
    """
    shape = [1] * x.dim()
    shape[dim] = -1
    squares = x.float().pow(2)
    total = squares.sum(dim, keepdim=True)
    kept = (squares * keep.view(shape).float()).sum(dim, keepdim=True)
    scale = torch.rsqrt(kept / keep.sum().float() + eps) * torch.rsqrt(total / x.shape[dim] + eps).reciprocal()
    return (y.float() * scale).to(y.dtype)


# ---- attribute updates after slicing -----------------------------------------------------------
_UPDATERS: list[tuple[type, Updater]] = []  # in registration order: a module takes the first whose type it is


def updater(*module_types: type) -> Callable[[Updater], Updater]:
    """Register the size updater of ``module_types``: after slicing, it sets the attributes their forward reads.

    The rules of each op family (:mod:`maskprune._rules`) register their layers' updaters beside them, e.g.
    ``@updater(nn.Linear)`` on a function that sets ``in_features`` and ``out_features`` from the sliced weight.
    """

    def register(fn: Updater) -> Updater:
        _UPDATERS.extend((module_type, fn) for module_type in module_types)
        return fn

    return register


def norm_widths(module: nn.Module, width: int) -> dict[str, int | tuple[int, ...]]:
    """The attributes that give a torch norm layer the width ``width``: read from its sliced tensors, or from the
    trace for a layer without tensors (``affine=False``).

    Examples:
        >>> norm_widths(nn.GroupNorm(4, 8, affine=False), 4)
        {'num_channels': 4, 'num_groups': 2}
    """
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return {"num_features": width}
    if isinstance(module, nn.GroupNorm):
        return {"num_channels": width, "num_groups": module.num_groups * width // module.num_channels}
    if isinstance(module, LAST_DIM_NORMS):
        return {"normalized_shape": (width,)}
    return {}


def update_module(module: nn.Module) -> None:
    """Bring a module's attributes in line with its (sliced) tensors: a registered module's own ``update``, else the
    updater of its type (:func:`updater`; the rules of :mod:`maskprune._rules` register them)."""
    registered = _LEAF_RULES.get(type(module))
    if registered is not None and registered.update is not None:
        registered.update(module)
        return
    for module_type, update in _UPDATERS:
        if isinstance(module, module_type):
            update(module)
            return


def has_updater(module: nn.Module) -> bool:
    """Whether :func:`update_module` sets ``module``'s attributes from its tensors (torch's layers, their
    subclasses, a registered module with its own ``update``).

    Examples:
        >>> has_updater(nn.Conv2d(3, 8, 1)), has_updater(nn.Sequential())
        (True, False)
    """
    registered = _LEAF_RULES.get(type(module))
    if registered is not None and registered.update is not None:
        return True
    return any(isinstance(module, module_type) for module_type, _ in _UPDATERS)


# ---- masked statistics -------------------------------------------------------------------------
def masked_norm(
    x: torch.Tensor,
    dim: int,
    keep: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
) -> torch.Tensor:
    """Layer norm (or RMS norm) along ``dim`` with statistics over the kept channels only.

    Equal to the norm of the exported model, which no longer has the removed channels.

    Examples:
        >>> x = torch.randn(2, 4)
        >>> keep = torch.tensor([1.0, 1.0, 0.0, 1.0])
        >>> y = masked_norm(x, 1, keep, None, None, 1e-5, "layer_norm")
        >>> torch.allclose(y[:, [0, 1, 3]], torch.nn.functional.layer_norm(x[:, [0, 1, 3]], (3,)), atol=1e-6)
        True
    """
    shape = [1] * x.dim()
    shape[dim] = -1
    m = keep.view(shape).to(x.dtype)
    count = keep.sum().to(x.dtype)
    if kind == "rms_norm":
        kept = x * m
        y = kept * torch.rsqrt((kept * kept).sum(dim, keepdim=True) / count + eps)
    else:
        mean = (x * m).sum(dim, keepdim=True) / count
        centered = (x - mean) * m
        y = centered * torch.rsqrt((centered * centered).sum(dim, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def kept_input_conv(module: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A weight-standardised conv's output (timm's ``StdConv2d`` …) on the kept input channels ``index`` only.

    The layer's own ``forward`` runs on a shallow copy holding the kept columns of its weight, with the kept
    channels of ``x``: each row is standardised over kept positions, as the exported layer standardises it.

    Examples:
        >>> from timm.layers import StdConv2d
        >>> conv, x, kept = StdConv2d(4, 2, 3), torch.randn(1, 4, 8, 8), torch.tensor([0, 2, 3])
        >>> small = StdConv2d(3, 2, 3)
        >>> small.weight.data = conv.weight.data[:, kept]
        >>> torch.allclose(kept_input_conv(conv, x, kept), small(x[:, kept]), atol=1e-6)
        True
    """
    channel_dim = x.dim() - module.weight.dim() + 1
    shadow = object.__new__(type(module))
    shadow.__dict__.update(module.__dict__)
    shadow.__dict__["_parameters"] = {**module._parameters, "weight": module.weight.index_select(1, index)}
    shadow.__dict__["in_channels"] = len(index)
    return type(module).forward(shadow, x.index_select(channel_dim, index))
