"""Every structure of :mod:`maskprune.testing`: its exact dependency groups, soft == hard after export, frozen
channels and how they are reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _structures import (
    FRESH,
    IMAGES_FIXED_SIZE,
    G,
    GroupKey,
    assert_soft_equals_hard,
    found,
    group_of,
    grouped,
    make,
    member,
    prune_every_group,
)
from torch import nn

import maskprune
from maskprune.testing import TINY_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the exact groups of every structure ------------------------------------------------------
TWO_CONVS = {
    G(8, "conv1.weight[0]", "conv1.bias[0]", "conv2.weight[1]"),
    G(6, "conv2.weight[0]", "conv2.bias[0]", "head.weight[1]"),
}
STEM_HEAD = {G(8, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")}
STEM_NORM_HEAD = {G(8, "stem.weight[0]", "stem.bias[0]", "body.0.weight[0]", "body.0.bias[0]", "head.weight[1]")}
RESIDUAL = {
    G(
        8,
        "stem.weight[0]",
        "stem.bias[0]",
        "branch1.weight[1]",
        "branch2.weight[0]",
        "branch2.bias[0]",
        "head.weight[1]",
    ),
    G(6, "branch1.weight[0]", "branch1.bias[0]", "branch2.weight[1]"),
}
STEM_ONLY = {G(6, "stem.weight[0]", "stem.bias[0]", "conv.weight[1]")}  # conv's output channels are frozen


def layers(prefix: str, count: int, bidirectional: bool, *tensors: str) -> list[str]:
    """``tensors`` (``"weight_ih[0]"``) of every layer and direction of a recurrent module (``_l0_reverse`` …)."""
    suffixes = [f"_l{k}{r}" for k in range(count) for r in ("", "_reverse")[: 1 + bidirectional]]
    return [f"{prefix}.{t.replace('[', s + '[')}" for s in suffixes for t in tensors]


GATE_ROWS = ("weight_ih[0]", "weight_hh[0]", "bias_ih[0]", "bias_hh[0]")  # a hidden channel's row in every gate
INPUT_6 = G(6, "inp.weight[0]", "inp.bias[0]", "rnn.weight_ih_l0[1]")  # TinyRecurrent's input width


EXPECTED: dict[str, set[GroupKey]] = {
    "conv1d": TWO_CONVS,
    "conv2d": TWO_CONVS,
    "conv3d": TWO_CONVS,
    "conv_transpose2d": {
        G(8, "conv.weight[0]", "conv.bias[0]", "up.weight[0]"),  # a transposed conv's weight is (in, out, ...)
        G(6, "up.weight[1]", "up.bias[0]", "head.weight[1]"),
    },
    "depthwise_conv": {
        G(
            8,
            "expand.weight[0]",
            "expand.bias[0]",
            "bn1.weight[0]",
            "bn1.bias[0]",
            "dw.weight[0]",
            "dw.bias[0]",
            "bn2.weight[0]",
            "bn2.bias[0]",
            "head.weight[1]",
        ),
    },
    "grouped_conv": {G(2, "expand.weight[0]", "expand.bias[0]", "gconv.weight[0]", "gconv.bias[0]", "head.weight[1]")},
    "linear_3d": {
        G(8, "fc1.weight[0]", "fc1.bias[0]", "fc2.weight[1]"),
        G(6, "fc2.weight[0]", "fc2.bias[0]", "head.weight[1]"),
    },
    "batch_norm2d": STEM_NORM_HEAD,
    "group_norm": {  # 4 norm groups of 2 channels: 4 units
        G(4, "stem.weight[0]", "stem.bias[0]", "body.0.weight[0]", "body.0.bias[0]", "head.weight[1]"),
    },
    "layer_norm": {G(8, "fc.weight[0]", "fc.bias[0]", "norm.weight[0]", "norm.bias[0]", "head.weight[1]")},
    "instance_norm2d": STEM_NORM_HEAD,
    "frozen_batch_norm2d": STEM_HEAD,  # its tensors are buffers: sliced, but not members
    "instance_norm2d_no_affine": STEM_HEAD,  # no tensors: the norm only passes its channels on
    "batch_norm2d_no_affine": STEM_HEAD,
    "group_norm_no_affine": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # 4 norm groups: 4 units
    "layer_norm_no_affine": {G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]")},
    "rms_norm_no_affine": {G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]")},
    "prelu": {G(8, "stem.weight[0]", "stem.bias[0]", "body.0.weight[0]", "head.weight[1]")},
    "embedding": {
        G(8, "emb.weight[1]", "fc.weight[1]"),
        G(6, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "bare_parameter": {
        G(
            8,
            "patch.weight[0]",
            "patch.bias[0]",
            "cls_token[2]",
            "pos_embed[2]",
            "fc1.weight[1]",
            "fc2.weight[0]",
            "fc2.bias[0]",
            "gamma[0]",
            "head.weight[1]",
        ),
        G(12, "fc1.weight[0]", "fc1.bias[0]", "fc2.weight[1]"),
    },
    "residual_add": RESIDUAL,
    "residual_sub": RESIDUAL,
    "residual_mul": RESIDUAL,
    "residual_div": {G(6, "branch1.weight[0]", "branch1.bias[0]", "branch2.weight[1]")},  # a / b: b frozen
    "squeeze_excitation": {
        G(
            8,
            "stem.weight[0]",
            "stem.bias[0]",
            "se.fc1.weight[1]",
            "se.fc2.weight[0]",
            "se.fc2.bias[0]",
            "head.weight[1]",
        ),
        G(4, "se.fc1.weight[0]", "se.fc1.bias[0]", "se.fc2.weight[1]"),
    },
    "cat": {
        G(4, "conv_a.weight[0]", "conv_a.bias[0]", "head.weight[1]"),
        G(6, "conv_b.weight[0]", "conv_b.bias[0]", "head.weight[1]"),
    },
    "chunk": {G(4, "conv.weight[0]", "conv.bias[0]", "head.weight[1]")},
    "split_unequal": STEM_ONLY,
    "slice": STEM_ONLY,
    "flatten_linear": {
        G(4, "conv.weight[0]", "conv.bias[0]", "fc.weight[1]"),
        G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "view_reshape": {G(8, "conv.weight[0]", "conv.bias[0]", "head.weight[1]")},
    "permute_transpose": {
        G(8, "conv.weight[0]", "conv.bias[0]", "fc.weight[1]"),
        G(6, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "channel_shuffle": {  # view-transpose-view in 2 groups written in the code: a unit is a position in both
        G(6, "stem.weight[0]", "stem.bias[0]", "conv.weight[1]"),
        G(4, "conv.weight[0]", "conv.bias[0]", "head.weight[1]"),
    },
    "channel_shuffle_layer": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: one per group
    "pixel_shuffle": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: 4 stem channels
    "pixel_unshuffle": {G(4, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: 4 head columns
    "glu": {G(8, "stem.weight[0]", "stem.bias[0]", "head.weight[1]")},  # a unit: a value and its gate
    "patch_merging": {  # the channels carry the merge, not the 2x2 parts of the spatial split
        G(8, "stem.weight[0]", "stem.bias[0]", "reduce.weight[1]"),
        G(6, "reduce.weight[0]", "reduce.bias[0]", "head.weight[1]"),
    },
    "pooling": {
        G(8, "conv1.weight[0]", "conv1.bias[0]", "conv2.weight[1]"),
        G(8, "conv2.weight[0]", "conv2.bias[0]", "conv3.weight[1]"),
        G(6, "conv3.weight[0]", "conv3.bias[0]", "conv4.weight[1]"),
        G(6, "conv4.weight[0]", "conv4.bias[0]", "head.weight[1]"),
    },
    "interpolate": TWO_CONVS,
    "relu": STEM_HEAD,
    "gelu": STEM_HEAD,
    "silu": STEM_HEAD,
    "hardswish": STEM_HEAD,
    "sigmoid": STEM_HEAD,
    "dropout": {
        G(8, "conv.weight[0]", "conv.bias[0]", "fc.weight[1]"),
        G(6, "fc.weight[0]", "fc.bias[0]", "head.weight[1]"),
    },
    "multihead_attention": {  # 2 heads of 4: each with the same 4 channels of the query (embed_dim)
        G(10, "pre1.weight[0]", "pre1.bias[0]", "pre2.weight[1]"),
        G(
            2,
            "pre2.weight[0]",
            "pre2.bias[0]",
            "attn.in_proj_weight[0]",
            "attn.in_proj_weight[1]",
            "attn.in_proj_bias[0]",
            "attn.out_proj.weight[0]",
            "attn.out_proj.weight[1]",
            "attn.out_proj.bias[0]",
            "post1.weight[1]",
        ),
        G(12, "post1.weight[0]", "post1.bias[0]", "post2.weight[1]"),
    },
    "fused_qkv_attention": {  # the residual width, and 3 heads: q, k and v rows of a head go together
        G(
            8,
            "embed.weight[0]",
            "embed.bias[0]",
            "norm.weight[0]",
            "norm.bias[0]",
            "qkv.weight[1]",
            "proj.weight[0]",
            "proj.bias[0]",
            "head.weight[1]",
        ),
        G(3, "qkv.weight[0]", "qkv.bias[0]", "proj.weight[1]"),
    },
    "grouped_query_attention": {  # 2 key/value heads, each with its 2 query heads (the input width is the model's)
        G(2, "q_proj.weight[0]", "k_proj.weight[0]", "v_proj.weight[0]", "o_proj.weight[1]"),
    },
    "repeat_interleave_attention": {  # k.repeat_interleave(2, dim=1): key/value head h serves query heads 2h, 2h+1
        G(2, "q_proj.weight[0]", "k_proj.weight[0]", "v_proj.weight[0]", "o_proj.weight[1]"),
    },
    "literal_heads_attention": {  # the residual width, and position i of both heads of the values
        G(
            8,
            "embed.weight[0]",
            "embed.bias[0]",
            "q.weight[1]",
            "k.weight[1]",
            "v.weight[1]",
            "proj.weight[0]",
            "proj.bias[0]",
            "head.weight[1]",
        ),
        G(4, "v.weight[0]", "v.bias[0]", "proj.weight[1]"),
    },
    "spatial_reduction_attention": {  # the residual width, a whole head at a time: the code sizes both by it
        G(
            2,
            "embed.weight[0]",
            "embed.bias[0]",
            "q.weight[0]",
            "q.weight[1]",
            "q.bias[0]",
            "sr.weight[0]",
            "sr.weight[1]",
            "sr.bias[0]",
            "kv.weight[0]",
            "kv.weight[1]",
            "kv.bias[0]",
            "proj.weight[0]",
            "proj.weight[1]",
            "proj.bias[0]",
            "head.weight[1]",
        ),
    },
    "rms_norm_hidden": {  # the hidden size through both RMS norms, and the gated MLP's width
        G(
            8,
            "embed.weight[1]",
            "norm1.weight[0]",
            "gate.weight[1]",
            "up.weight[1]",
            "down.weight[0]",
            "norm2.weight[0]",
            "head.weight[1]",
        ),
        G(12, "gate.weight[0]", "up.weight[0]", "down.weight[1]"),
    },
    "functional": {
        G(8, "stem.weight[0]", "stem.bias[0]", "proj.weight[1]"),
        G(6, "proj.weight[0]", "proj.bias[0]", "head.weight[1]"),
    },
    "shared_module": {
        G(8, "stem.weight[0]", "stem.bias[0]", "block.weight[0]", "block.weight[1]", "block.bias[0]", "head.weight[1]"),
    },
    "tied_parameters": {  # b.weight is a.weight: one tensor, named by its first owner
        G(8, "a.weight[1]", "mlp.0.weight[1]", "mlp.2.weight[0]", "mlp.2.bias[0]"),
        G(12, "mlp.0.weight[0]", "mlp.0.bias[0]", "mlp.2.weight[1]"),
    },
    "dict_io": {
        G(8, "conv.weight[0]", "conv.bias[0]", "head.weight[1]"),
        G(6, "aux.weight[0]", "aux.bias[0]", "head.weight[1]", "aux_head.weight[1]"),
    },
    "inplace": {
        G(8, "stem.weight[0]", "stem.bias[0]", "conv.weight[0]", "conv.weight[1]", "conv.bias[0]", "head.weight[1]"),
    },
    "no_grad": {
        G(8, "stem.weight[0]", "stem.bias[0]", "conv.weight[1]"),
        G(6, "conv.weight[0]", "conv.bias[0]", "head.weight[1]"),
    },
    # recurrent layers: hidden channel i of every layer and direction is one unit (one hidden_size attribute)
    "conv_lstm": {
        G(8, "conv.weight[0]", "conv.bias[0]", "lstm.weight_ih_l0[1]"),
        G(6, *layers("lstm", 1, False, *GATE_ROWS, "weight_hh[1]"), "head.weight[1]"),
    },
    "gru_bidirectional": {  # layer 1 reads both directions of layer 0: columns i and 6 + i
        G(6, "inp.weight[0]", "inp.bias[0]", "rnn.weight_ih_l0[1]", "rnn.weight_ih_l0_reverse[1]"),
        G(
            6,
            *layers("rnn", 2, True, *GATE_ROWS, "weight_hh[1]"),
            "rnn.weight_ih_l1[1]",
            "rnn.weight_ih_l1_reverse[1]",
            "head.weight[1]",
        ),
    },
    "lstm_proj": {  # the cell state's 8 channels; the hidden state's 4 (proj_size): what weight_hh and layer 1 read
        G(6, "inp.weight[0]", "inp.bias[0]", "rnn.weight_ih_l0[1]", "rnn.weight_ih_l0_reverse[1]"),
        G(8, *layers("rnn", 2, True, *GATE_ROWS, "weight_hr[1]")),
        G(
            4,
            *layers("rnn", 2, True, "weight_hr[0]", "weight_hh[1]"),
            "rnn.weight_ih_l1[1]",
            "rnn.weight_ih_l1_reverse[1]",
            "head.weight[1]",
        ),
    },
    "rnn_batch_first": {INPUT_6, G(4, *layers("rnn", 1, False, *GATE_ROWS, "weight_hh[1]"), "head.weight[1]")},
    "lstm_initial_state": {  # the initial state's producer loses the hidden channels too
        INPUT_6,
        G(
            6,
            *layers("rnn", 2, False, *GATE_ROWS, "weight_hh[1]"),
            "rnn.weight_ih_l1[1]",
            "head.weight[1]",
            "init.weight[0]",
            "init.bias[0]",
            "init_cell.weight[0]",
            "init_cell.bias[0]",
        ),
    },
    "lstm_cell_loop": {
        G(6, "inp.weight[0]", "inp.bias[0]", "cell.weight_ih[1]"),
        G(6, *(f"cell.{t}" for t in GATE_ROWS), "cell.weight_hh[1]", "head.weight[1]"),
    },
    "gru_cell_loop": {
        G(6, "inp.weight[0]", "inp.bias[0]", "cell.weight_ih[1]"),
        G(4, *(f"cell.{t}" for t in GATE_ROWS), "cell.weight_hh[1]", "head.weight[1]"),
    },
    "bool_mask": {G(8, "fc.weight[0]", "fc.bias[0]", "head.weight[1]")},
    "unsupported_op": STEM_ONLY,
}

# tensor dims computing the model's outputs: never in a group
OUTPUTS: dict[str, tuple[str, ...]] = {
    "multihead_attention": ("post2.weight[0]", "post2.bias[0]"),
    "tied_parameters": ("a.weight[0]",),
    "dict_io": ("head.weight[0]", "head.bias[0]", "aux_head.weight[0]", "aux_head.bias[0]"),
}


def test_every_structure_has_expectations() -> None:
    assert set(EXPECTED) == set(TINY_MODELS) == set(FRESH)


def test_factories_build_fresh_deterministic_models() -> None:
    state = torch.get_rng_state()
    (a, x), (b, y) = TINY_MODELS["conv2d"](), TINY_MODELS["conv2d"]()
    assert torch.equal(torch.get_rng_state(), state)
    # bit-exact: the same seed draws the same numbers
    assert a is not b and torch.equal(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_groups(name: str) -> None:
    mask, _, _ = make(name)
    assert found(mask) == EXPECTED[name]


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_outputs_never_pruned(name: str) -> None:
    mask, _, _ = make(name)
    assert not grouped(mask) & set(OUTPUTS.get(name, ("head.weight[0]", "head.bias[0]")))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_soft_equals_hard(name: str) -> None:
    mask, model, inputs = make(name)
    prune_every_group(mask)
    assert_soft_equals_hard(mask, model, inputs, FRESH[name]())


def test_bare_parameters_follow_the_channels() -> None:
    """Class token, position embedding and layer scale are sliced with the channels they carry."""
    mask, model, inputs = make("bare_parameter")
    assert found(mask) == EXPECTED["bare_parameter"]
    big = group_of(mask, "patch.weight", 0)
    for name, dim in (("cls_token", 2), ("pos_embed", 2), ("gamma", 0)):
        assert member(big, name, dim).positions.tolist() == list(range(8))
    assert not grouped(mask) & {"cls_token[1]", "pos_embed[1]"}  # the token dim is the model's
    big.prune([0, 3])
    pruned = assert_soft_equals_hard(mask, model, inputs, IMAGES_FIXED_SIZE())
    assert pruned.cls_token.shape == (1, 1, 6) and pruned.pos_embed.shape == (1, 5, 6)
    assert pruned.gamma.shape == (6,)


def test_no_group_for_size_one_parameter_dims() -> None:
    mask, _, _ = make("bare_parameter")
    assert all(g.size > 1 for g in mask.groups)
    assert not grouped(mask) & {"cls_token[0]", "pos_embed[0]"}


# ---- frozen channels ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "frozen", "op"),
    [
        ("split_unequal", {"conv.weight[0]", "conv.bias[0]", "head.weight[1]"}, "`split` in <root>"),
        ("slice", {"conv.weight[0]", "conv.bias[0]", "head.weight[1]"}, "`getitem` in <root>"),
        ("unsupported_op", {"conv.weight[0]", "conv.bias[0]", "mix.scale[0]", "head.weight[1]"}, "`tensordot` in mix"),
    ],
)
def test_frozen_channels(name: str, frozen: set[str], op: str) -> None:
    mask, model, inputs = make(name)
    assert not grouped(mask) & frozen
    assert op in str(mask)
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH[name]())
    for key in frozen:  # every frozen dimension keeps its size
        tensor, dim = key[:-3], int(key[-2])
        assert pruned.get_parameter(tensor).shape[dim] == model.get_parameter(tensor).shape[dim], key


def test_unsupported_op_is_reported() -> None:
    mask, _, _ = make("unsupported_op")
    text = str(mask)
    assert "Unsupported ops (their channels are frozen): `tensordot` in mix" in text
    assert "unsupported op `tensordot` in mix: conv.weight[0]" in text


# ---- engine checks the structures rely on ------------------------------------------------------
def test_verify_reports_nan_as_different() -> None:
    class Nan(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    result = maskprune.verify(Nan(), nn.Identity(), torch.ones(3))
    assert not result


# ---- grouping internals ------------------------------------------------------------------------
def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    """Which sequences got the same label, whatever the labels are."""
    return {frozenset(np.flatnonzero(labels == label).tolist()) for label in np.unique(labels)}


def test_sequence_labels_tell_sequences_apart_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from maskprune import _groups

    sequences = [[1, 2], [3], [1, 2], [2, 1], [1, 2, 3], [3], [1], [1, 2]]
    values = np.asarray([v for s in sequences for v in s], dtype=np.int64)
    starts = np.cumsum([0] + [len(s) for s in sequences[:-1]])
    expected = {frozenset(i for i, t in enumerate(sequences) if t == s) for s in sequences}
    assert _partition(_groups.sequence_labels(values, starts)) == expected
    zeros = np.zeros(8, dtype=np.uint64)  # every sequence hashes alike: the exact comparison must separate them
    monkeypatch.setattr(_groups, "_hash_keys", lambda n_values, n_offsets: (zeros, zeros))
    assert _partition(_groups.sequence_labels(values, starts)) == expected
