"""Weight-standardised convolutions (timm's ``StdConv2d``, ``ScaledStdConv2d`` and their ``Same`` variants, used by
BiT, NF-ResNets and NFNets), traced as one layer.

Such a conv standardises each row of its weight (one output channel) over its input channels and kernel positions
before convolving. Its channels flow as a plain convolution's; a row's statistics are over its input channels, so
a pruned input channel leaves the exported row's mean and variance without it. The masked forward computes the
same: its hook (:func:`~maskprune._layers.kept_input_conv`) runs the layer's own ``forward`` on the kept input
channels only. Output channels are whole rows, exact either way. ``ScaledStdConv2d``'s ``scale`` (``gamma *
fan_in ** -0.5``, a number set when it was built) is kept by the export as it is, and the masked forward uses it
too: the exported layer computes what the masked one did, not what a layer built at the new width would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.modules.conv import _ConvNd

from maskprune._records import LayerNormSite, iter_tensors

from ._core import NORM, OpCall
from .linear import conv

if TYPE_CHECKING:
    from maskprune._trace import Tracer

STANDARDISED_PARAMETERS = {"weight", "bias", "gain"}


def is_standardised_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a weight-standardised convolution this rule knows: a conv layer (not transposed)
    named ``*StdConv*`` with an ``eps``, no children, and only a ``weight``, a ``bias`` and a per-output ``gain``.

    Examples:
        >>> from timm.layers import ScaledStdConv2d, StdConv2d
        >>> is_standardised_conv(StdConv2d(3, 8, 3)), is_standardised_conv(ScaledStdConv2d(3, 8, 3))
        (True, True)
        >>> is_standardised_conv(nn.Conv2d(3, 8, 3))
        False
    """
    if not isinstance(module, _ConvNd) or module.transposed or "stdconv" not in type(module).__name__.lower():
        return False
    if not isinstance(getattr(module, "eps", None), float) or next(module.children(), None) is not None:
        return False
    params = dict(module.named_parameters())
    gain = params.get("gain")
    if gain is not None and (gain.shape[0] != module.out_channels or gain.numel() != module.out_channels):
        return False
    return set(params) <= STANDARDISED_PARAMETERS


def standardised_conv(tracer: Tracer, module: nn.Module, args: tuple, output: Any) -> None:
    """One call of a weight-standardised conv: channels flow as through its ``conv`` (the :func:`conv` rule), its
    ``gain`` shares the output channels. With one conv group, its input channels are masked by its hook (a
    site of kind ``"std_conv"``)."""
    x = next(iter_tensors(args))
    name = f"conv{len(module.kernel_size)}d"
    conv_args = (x, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    call = OpCall(tracer, name, False, conv_args, {}, output)
    conv(call)
    tensors = list(call.inputs)
    gain = getattr(module, "gain", None)
    if gain is not None:
        call.unite(gain, 0, module.weight, 0)
        call.role(gain, 0, NORM)
        call.claim_all(gain)  # its other dims are of size one
        tensors.append(gain)
    call.finish(tensors)
    path = tracer.module_paths.get(id(module))
    if module.groups == 1 and path is not None:
        space = call.space(module.weight, 1)
        in_dim = x.dim() - module.weight.dim() + 1
        tracer.layer_norms.append(LayerNormSite("std_conv", module, path, space, in_dim, module.eps))
