"""How channels flow through each torch op: the channel rules, one module per op family.

A rule sees one call (:class:`OpCall`): its tensors, arguments and outputs. It *claims* the dimensions it
understands, uniting or linking their spaces and giving each output dimension a space. Whatever it leaves
unclaimed is frozen: an input dimension a rule did not claim is never pruned, an output dimension it did not set
gets a fresh frozen space. An op with no rule freezes every dimension it touches and is reported by name. Safety
is the default; a rule only ever makes more channels prunable.

Each family's module holds its rules, the shortcuts of their commonest calls and the size updaters of its layers:

* :mod:`~maskprune._rules.elementwise`: activations, arithmetic, comparisons, casts; tensor factories;
* :mod:`~maskprune._rules.shapes`: reshapes and heads, permutes, expand, cat, stack, splits, indexing, pad;
* :mod:`~maskprune._rules.mixing`: reductions, softmax and sorts; pooling, resampling, pixel shuffles;
* :mod:`~maskprune._rules.linear`: convolutions, ``linear``, ``addmm``, ``einsum``, matrix products, embeddings;
* :mod:`~maskprune._rules.norms`: batch, instance, group, layer and RMS norms, ``prelu``, EvoNorm layers;
* :mod:`~maskprune._rules.standardised`: weight-standardised convolutions (timm's ``StdConv2d`` …), one layer each;
* :mod:`~maskprune._rules.attention`: ``nn.MultiheadAttention`` and ``scaled_dot_product_attention``;
* :mod:`~maskprune._rules.recurrent`: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, their cells, packed sequences.

:mod:`~maskprune._rules._core` holds what they share: the registries, :class:`OpCall` and running a rule.
"""

from maskprune._layers import update_module

from . import attention, elementwise, linear, mixing, norms, recurrent, shapes  # noqa: F401 - each registers its rules
from ._core import RULES, SHORTCUTS, OpCall, apply_rule, op_name, run_leaf_rule, run_rule
from .norms import evo_norm, is_evo_norm
from .standardised import is_standardised_conv, standardised_conv

__all__ = [
    "RULES",
    "SHORTCUTS",
    "OpCall",
    "apply_rule",
    "evo_norm",
    "is_evo_norm",
    "is_standardised_conv",
    "op_name",
    "run_leaf_rule",
    "run_rule",
    "standardised_conv",
    "update_module",
]
