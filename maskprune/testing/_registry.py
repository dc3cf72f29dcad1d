""":data:`TINY_MODELS`: one factory per structure, and :func:`randomize_norms`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._channels import (
    TinyCat,
    TinyChannelsLast,
    TinyChunk,
    TinyDropout,
    TinyFlatten,
    TinyInterpolate,
    TinyPatchMerging,
    TinyPooling,
    TinyRearrange,
    TinyReshape,
    TinyShuffle,
    TinySlice,
    TinySplit,
)
from ._layers import (
    TinyBinary,
    TinyConv,
    TinyConvBlock,
    TinyConvTranspose,
    TinyDepthwise,
    TinyEmbedding,
    TinyGroupedConv,
    TinyLayerNorm,
    TinyMLP,
    TinySE,
    TinyViT,
    _frozen_batch_norm,
)
from ._parameters import (
    TinyDictIO,
    TinyFunctional,
    TinyInplace,
    TinyMaskedFill,
    TinyNoGrad,
    TinyShared,
    TinyTied,
    TinyUnsupported,
)
from ._recurrent import TinyCellLoop, TinyConvLSTM, TinyRecurrent
from ._transformers import (
    TinyAttention,
    TinyFusedAttention,
    TinyGroupedQueryAttention,
    TinyLiteralHeads,
    TinyRepeatInterleave,
    TinyRMSNormHidden,
    TinySpatialReduction,
)

TinyModelFactory = Callable[[], tuple[nn.Module, Any]]


# ---- registry ----------------------------------------------------------------------------------
def randomize_norms(model: nn.Module) -> nn.Module:
    """Give norm layers non-trivial affine tensors and running statistics (a random-init zoo model's outputs
    can be nearly zero otherwise, which proves nothing when comparing two models). Returns the model.

    Examples:
        >>> model = randomize_norms(torchvision.models.mobilenet_v3_small())
    """
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            if not (is_norm or type(module).__name__ == "FrozenBatchNorm2d"):
                continue
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue
                if name in ("weight", "running_var"):
                    tensor.copy_(torch.rand_like(tensor) + 0.5)
                else:
                    tensor.copy_(torch.randn_like(tensor) * 0.5)
    return model


def _seeded(build: Callable[[], tuple[nn.Module, Any]]) -> TinyModelFactory:
    def factory() -> tuple[nn.Module, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, inputs = build()
            randomize_norms(model)
        return model, inputs

    return factory


TINY_MODELS: dict[str, TinyModelFactory] = {
    # layers
    "conv1d": _seeded(lambda: (TinyConv(1), torch.randn(2, 3, 16))),
    "conv2d": _seeded(lambda: (TinyConv(2), torch.randn(2, 3, 8, 8))),
    "conv3d": _seeded(lambda: (TinyConv(3), torch.randn(2, 3, 4, 6, 6))),
    "conv_transpose2d": _seeded(lambda: (TinyConvTranspose(), torch.randn(2, 3, 8, 8))),
    "depthwise_conv": _seeded(lambda: (TinyDepthwise(), torch.randn(2, 3, 8, 8))),
    "grouped_conv": _seeded(lambda: (TinyGroupedConv(), torch.randn(2, 3, 8, 8))),
    "linear_3d": _seeded(lambda: (TinyMLP(), torch.randn(2, 5, 6))),
    "batch_norm2d": _seeded(lambda: (TinyConvBlock(nn.BatchNorm2d(8), nn.ReLU()), torch.randn(2, 3, 8, 8))),
    "group_norm": _seeded(lambda: (TinyConvBlock(nn.GroupNorm(4, 8), nn.ReLU()), torch.randn(2, 3, 8, 8))),
    "layer_norm": _seeded(lambda: (TinyLayerNorm(), torch.randn(2, 5, 6))),
    "instance_norm2d": _seeded(
        lambda: (TinyConvBlock(nn.InstanceNorm2d(8, affine=True), nn.ReLU()), torch.randn(2, 3, 8, 8))
    ),
    "frozen_batch_norm2d": _seeded(lambda: (TinyConvBlock(_frozen_batch_norm(8), nn.ReLU()), torch.randn(2, 3, 8, 8))),
    # norms without tensors (torch's default for InstanceNorm): only their width attributes change
    "instance_norm2d_no_affine": _seeded(
        lambda: (TinyConvBlock(nn.InstanceNorm2d(8), nn.ReLU()), torch.randn(2, 3, 8, 8))
    ),
    "batch_norm2d_no_affine": _seeded(
        lambda: (
            TinyConvBlock(nn.BatchNorm2d(8, affine=False, track_running_stats=False), nn.ReLU()),
            torch.randn(2, 3, 8, 8),
        )
    ),
    "group_norm_no_affine": _seeded(
        lambda: (TinyConvBlock(nn.GroupNorm(4, 8, affine=False), nn.ReLU()), torch.randn(2, 3, 8, 8))
    ),
    "layer_norm_no_affine": _seeded(
        lambda: (TinyLayerNorm(nn.LayerNorm(8, elementwise_affine=False)), torch.randn(2, 5, 6))
    ),
    "rms_norm_no_affine": _seeded(
        lambda: (TinyLayerNorm(nn.RMSNorm(8, elementwise_affine=False)), torch.randn(2, 5, 6))
    ),
    "prelu": _seeded(lambda: (TinyConvBlock(nn.PReLU(8)), torch.randn(2, 3, 8, 8))),
    "embedding": _seeded(lambda: (TinyEmbedding(), torch.randint(0, 10, (2, 6)))),
    "bare_parameter": _seeded(lambda: (TinyViT(), torch.randn(2, 3, 8, 8))),
    # elementwise and broadcasting
    "residual_add": _seeded(lambda: (TinyBinary("add"), torch.randn(2, 3, 8, 8))),
    "residual_sub": _seeded(lambda: (TinyBinary("sub"), torch.randn(2, 3, 8, 8))),
    "residual_mul": _seeded(lambda: (TinyBinary("mul"), torch.randn(2, 3, 8, 8))),
    "residual_div": _seeded(lambda: (TinyBinary("div"), torch.randn(2, 3, 8, 8))),
    "squeeze_excitation": _seeded(lambda: (TinySE(), torch.randn(2, 3, 8, 8))),
    # channel bookkeeping
    "cat": _seeded(lambda: (TinyCat(), torch.randn(2, 3, 8, 8))),
    "chunk": _seeded(lambda: (TinyChunk(), torch.randn(2, 3, 8, 8))),
    "split_unequal": _seeded(lambda: (TinySplit(), torch.randn(2, 3, 8, 8))),
    "slice": _seeded(lambda: (TinySlice(), torch.randn(2, 3, 8, 8))),
    "flatten_linear": _seeded(lambda: (TinyFlatten(), torch.randn(2, 3, 8, 8))),
    "view_reshape": _seeded(lambda: (TinyReshape(), torch.randn(2, 3, 8, 8))),
    "permute_transpose": _seeded(lambda: (TinyChannelsLast(), torch.randn(2, 3, 8, 8))),
    "channel_shuffle": _seeded(lambda: (TinyShuffle(), torch.randn(2, 3, 8, 8))),
    "channel_shuffle_layer": _seeded(lambda: (TinyRearrange(nn.ChannelShuffle(2), 8, 8), torch.randn(2, 3, 8, 8))),
    "pixel_shuffle": _seeded(lambda: (TinyRearrange(nn.PixelShuffle(2), 16, 4), torch.randn(2, 3, 4, 4))),
    "pixel_unshuffle": _seeded(lambda: (TinyRearrange(nn.PixelUnshuffle(2), 4, 16), torch.randn(2, 3, 8, 8))),
    "patch_merging": _seeded(lambda: (TinyPatchMerging(), torch.randn(2, 3, 8, 8))),
    "glu": _seeded(lambda: (TinyRearrange(nn.GLU(), 16, 8, tokens=True), torch.randn(2, 5, 6))),
    # spatial ops, activations, dropout
    "pooling": _seeded(lambda: (TinyPooling(), torch.randn(2, 3, 8, 8))),
    "interpolate": _seeded(lambda: (TinyInterpolate(), torch.randn(2, 3, 8, 8))),
    "relu": _seeded(lambda: (TinyConvBlock(nn.ReLU()), torch.randn(2, 3, 8, 8))),
    "gelu": _seeded(lambda: (TinyConvBlock(nn.GELU()), torch.randn(2, 3, 8, 8))),
    "silu": _seeded(lambda: (TinyConvBlock(nn.SiLU()), torch.randn(2, 3, 8, 8))),
    "hardswish": _seeded(lambda: (TinyConvBlock(nn.Hardswish()), torch.randn(2, 3, 8, 8))),
    "sigmoid": _seeded(lambda: (TinyConvBlock(nn.Sigmoid()), torch.randn(2, 3, 8, 8))),
    "dropout": _seeded(lambda: (TinyDropout(), torch.randn(2, 3, 8, 8))),
    # attention
    "multihead_attention": _seeded(lambda: (TinyAttention(), torch.randn(2, 5, 6))),
    "fused_qkv_attention": _seeded(lambda: (TinyFusedAttention(), torch.randn(2, 5, 6))),
    "grouped_query_attention": _seeded(lambda: (TinyGroupedQueryAttention(), torch.randn(2, 5, 8))),
    "repeat_interleave_attention": _seeded(lambda: (TinyRepeatInterleave(), torch.randn(2, 5, 8))),
    "literal_heads_attention": _seeded(lambda: (TinyLiteralHeads(), torch.randn(2, 5, 6))),
    "spatial_reduction_attention": _seeded(lambda: (TinySpatialReduction(), torch.randn(2, 3, 8, 8))),
    "rms_norm_hidden": _seeded(lambda: (TinyRMSNormHidden(), torch.randint(0, 10, (2, 6)))),
    # recurrent layers, on (time, batch, features) unless batch_first
    "conv_lstm": _seeded(lambda: (TinyConvLSTM(), torch.randn(2, 3, 7))),
    "gru_bidirectional": _seeded(
        lambda: (TinyRecurrent(nn.GRU(6, 6, num_layers=2, bidirectional=True)), torch.randn(7, 3, 5))
    ),
    "lstm_proj": _seeded(
        lambda: (TinyRecurrent(nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=4)), torch.randn(7, 3, 5))
    ),
    "rnn_batch_first": _seeded(
        lambda: (TinyRecurrent(nn.RNN(6, 4, nonlinearity="relu", batch_first=True)), torch.randn(3, 7, 5))
    ),
    "lstm_initial_state": _seeded(
        lambda: (TinyRecurrent(nn.LSTM(6, 6, num_layers=2), initial=True), torch.randn(7, 3, 5))
    ),
    "lstm_cell_loop": _seeded(lambda: (TinyCellLoop(nn.LSTMCell(6, 6)), torch.randn(7, 3, 5))),
    "gru_cell_loop": _seeded(lambda: (TinyCellLoop(nn.GRUCell(6, 4)), torch.randn(7, 3, 5))),
    # how parameters and inputs are reached
    "functional": _seeded(lambda: (TinyFunctional(), torch.randn(2, 3, 8, 8))),
    "shared_module": _seeded(lambda: (TinyShared(), torch.randn(2, 3, 8, 8))),
    "tied_parameters": _seeded(lambda: (TinyTied(), torch.randint(0, 10, (2, 6)))),
    "dict_io": _seeded(
        lambda: (TinyDictIO(), {"image": torch.randn(2, 3, 8, 8), "extra": torch.randn(2, 4), "scale": 0.5})
    ),
    "inplace": _seeded(lambda: (TinyInplace(), torch.randn(2, 3, 8, 8))),
    "no_grad": _seeded(lambda: (TinyNoGrad(), torch.randn(2, 3, 8, 8))),
    "bool_mask": _seeded(lambda: (TinyMaskedFill(), (torch.randn(2, 5, 6), torch.tensor([3, 5])))),
    "unsupported_op": _seeded(lambda: (TinyUnsupported(), torch.randn(2, 3, 8, 8))),
}
"""Structure name -> factory returning ``(model, example_inputs)``; every call builds a fresh pair."""
