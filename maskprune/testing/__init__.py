"""Tiny models, one per structure maskprune has to handle: for tests, examples and bug reports.

Each entry of :data:`TINY_MODELS` builds a fresh model with deterministic weights (norm
statistics and affine tensors randomised too, so that no layer is an identity) and example
inputs small enough that tracing, masking and exporting take milliseconds. Building an entry
does not touch the global random state.

Examples:
    >>> from maskprune import Mask, verify
    >>> from maskprune.testing import TINY_MODELS
    >>> model, inputs = TINY_MODELS["cat"]()
    >>> mask = Mask(model, inputs).make()
    >>> sorted(group.size for group in mask.groups)
    [4, 6]
    >>> for group in mask.groups:
    ...     group.prune([0])
    >>> pruned = mask.generate_pruned_model()   # verified against the masked model
    >>> verify(model, pruned, inputs).max_rel <= 1e-5
    True

:func:`random_model` builds a random architecture from a seed, and :func:`check_random_model` takes it through
``make()``, random pruning and the verified export (the fuzzer of ``tests/test_fuzz.py`` and
``benchmarks/fuzz.py``):

    >>> check_random_model(2).verdict
    'exact'
"""

from __future__ import annotations

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
from ._fuzz import FuzzResult, check_random_model
from ._layers import (
    SqueezeExcitation,
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
)
from ._parameters import (
    TensordotScale,
    TinyDictIO,
    TinyFunctional,
    TinyInplace,
    TinyMaskedFill,
    TinyNoGrad,
    TinyShared,
    TinyTied,
    TinyUnsupported,
)
from ._random import RandomModel, random_model
from ._recurrent import TinyCellLoop, TinyConvLSTM, TinyRecurrent
from ._registry import TINY_MODELS, TinyModelFactory, randomize_norms
from ._transformers import (
    TinyAttention,
    TinyFusedAttention,
    TinyGroupedQueryAttention,
    TinyLiteralHeads,
    TinyRepeatInterleave,
    TinyRMSNorm,
    TinyRMSNormHidden,
    TinySpatialReduction,
)

__all__ = [
    "TINY_MODELS",
    "TinyModelFactory",
    "randomize_norms",
    "FuzzResult",
    "RandomModel",
    "check_random_model",
    "random_model",
    "SqueezeExcitation",
    "TensordotScale",
    "TinyAttention",
    "TinyBinary",
    "TinyCat",
    "TinyCellLoop",
    "TinyChannelsLast",
    "TinyChunk",
    "TinyConv",
    "TinyConvBlock",
    "TinyConvLSTM",
    "TinyConvTranspose",
    "TinyDepthwise",
    "TinyDictIO",
    "TinyDropout",
    "TinyEmbedding",
    "TinyFlatten",
    "TinyFunctional",
    "TinyFusedAttention",
    "TinyGroupedConv",
    "TinyGroupedQueryAttention",
    "TinyInplace",
    "TinyInterpolate",
    "TinyLayerNorm",
    "TinyLiteralHeads",
    "TinyMLP",
    "TinyMaskedFill",
    "TinyNoGrad",
    "TinyPatchMerging",
    "TinyPooling",
    "TinyRMSNorm",
    "TinyRMSNormHidden",
    "TinyRearrange",
    "TinyRecurrent",
    "TinyRepeatInterleave",
    "TinyReshape",
    "TinySE",
    "TinyShared",
    "TinyShuffle",
    "TinySlice",
    "TinySpatialReduction",
    "TinySplit",
    "TinyTied",
    "TinyUnsupported",
    "TinyViT",
]

# The tiny models are named as users import them (a spec or an error names maskprune.testing.TinyCNN),
# not after the private file that defines them.
for _name in __all__:
    _value = globals()[_name]
    if isinstance(_value, type) and _value.__module__.startswith(__name__ + "._"):
        _value.__module__ = __name__
del _name, _value
