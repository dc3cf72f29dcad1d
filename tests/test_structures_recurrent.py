"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells), grouped-query attention written with
``repeat_interleave`` and Falcon's fused attention: the counts an export sets, masked == exported on fresh inputs.

The exact groups of the tiny recurrent models are in ``test_structures_groups.py`` with every structure's.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _structures import (
    FRESH,
    RTOL,
    SEQUENCES,
    G,
    assert_soft_equals_hard,
    found,
    group_of,
    grouped,
    make,
    member,
    prune_every_group,
)
from maskprune.algorithms import GroupMagnitude, L1Norm
from torch import nn

import maskprune
from maskprune.testing import TINY_MODELS, TinyCellLoop, TinyRecurrent

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny model -> the path of its recurrent layer
RECURRENT = {
    "conv_lstm": "lstm",
    "gru_bidirectional": "rnn",
    "lstm_proj": "rnn",
    "rnn_batch_first": "rnn",
    "lstm_initial_state": "rnn",
}


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _flat_weights_are_the_parameters(rnn: nn.RNNBase) -> bool:
    return all(w is getattr(rnn, name) for w, name in zip(rnn._flat_weights, rnn._flat_weights_names, strict=True))


# ---- nn.LSTM, nn.GRU, nn.RNN -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RECURRENT))
def test_export_sets_input_hidden_and_proj_sizes(name: str) -> None:
    mask, model, inputs = make(name)
    path = RECURRENT[name]
    original = model.get_submodule(path)
    prune_every_group(mask)
    hidden = group_of(mask, f"{path}.weight_hh_l0", 0).kept
    inputs_kept = group_of(mask, f"{path}.weight_ih_l0", 1).kept
    proj = group_of(mask, f"{path}.weight_hr_l0", 0).kept if original.proj_size else 0
    assert hidden < original.hidden_size and inputs_kept < original.input_size
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH[name]())
    rnn = pruned.get_submodule(path)
    assert (rnn.input_size, rnn.hidden_size, rnn.proj_size) == (inputs_kept, hidden, proj)
    options = {"num_layers": original.num_layers, "bias": original.bias, "bidirectional": original.bidirectional}
    options.update(batch_first=original.batch_first, **({"proj_size": proj} if proj else {}))
    built = type(original)(inputs_kept, hidden, **options)
    assert _shapes(rnn) == _shapes(built)  # every layer and direction: the module's own layout of its sizes
    assert _flat_weights_are_the_parameters(rnn)


def test_a_removed_hidden_channel_is_removed_from_every_gate_layer_and_direction() -> None:
    mask, model, inputs = make("gru_bidirectional")
    group_of(mask, "rnn.weight_hh_l0", 0).prune([1, 4])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["gru_bidirectional"]())
    kept = [0, 2, 3, 5]
    rows = [gate * 6 + i for gate in range(3) for i in kept]  # GRU: reset, update, new gates
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        weight, bias = getattr(model.rnn, f"weight_hh{suffix}"), getattr(model.rnn, f"bias_ih{suffix}")
        # bit-exact: the export copies the kept rows and columns
        assert torch.equal(getattr(pruned.rnn, f"weight_hh{suffix}"), weight[rows][:, kept])
        assert torch.equal(getattr(pruned.rnn, f"bias_ih{suffix}"), bias[rows])  # bit-exact: a copy
    # layer 1 reads both directions of layer 0: columns i and 6 + i
    columns = kept + [6 + i for i in kept]
    # bit-exact: a copy
    assert torch.equal(pruned.rnn.weight_ih_l1, model.rnn.weight_ih_l1[rows][:, columns])


@pytest.mark.parametrize("path", ["rnn", "cell"])
def test_input_and_hidden_sizes_of_equal_value_get_their_own_counts(path: str, tmp_path) -> None:
    """``LSTM(6, 6)``, ``LSTMCell(6, 6)``: the layer sizes its zero initial states by ``hidden_size``; the export
    gives ``input_size`` the input's own count."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return TinyRecurrent(nn.LSTM(6, 6, num_layers=2)) if path == "rnn" else TinyCellLoop(nn.LSTMCell(6, 6))

    model, inputs = build(), torch.randn(7, 3, 5)
    mask = maskprune.Mask(model, inputs).make()
    suffix = "_l0" if path == "rnn" else ""
    group_of(mask, f"{path}.weight_ih{suffix}", 1).prune([2])
    group_of(mask, f"{path}.weight_hh{suffix}", 0).prune([0, 3, 5])
    pruned = assert_soft_equals_hard(mask, model, inputs, SEQUENCES())
    layer = pruned.get_submodule(path)
    assert (layer.input_size, layer.hidden_size) == (5, 3)
    maskprune.save_pruned(pruned, tmp_path / "saved")
    loaded = maskprune.load_pruned(build(), tmp_path / "saved")
    assert (loaded.get_submodule(path).input_size, loaded.get_submodule(path).hidden_size) == (5, 3)
    x = SEQUENCES()[0]
    torch.testing.assert_close(loaded.eval()(x), pruned.eval()(x), rtol=1e-6, atol=1e-6)


def test_removed_channels_of_a_non_zero_initial_state_change_nothing_kept() -> None:
    """The initial states are ``tanh(init(x)) + 1``: 1 in a removed channel of the masked model, which reads no
    column of them; the kept channels compute what the export computes."""
    mask, model, inputs = make("lstm_initial_state")
    removed = [1, 4]
    group_of(mask, "rnn.weight_hh_l0", 0).prune(removed)
    seen = []
    handle = model.rnn.register_forward_pre_hook(lambda m, args: seen.extend(t.detach().clone() for t in args[1]))
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        handle.remove()
    assert len(seen) == 2  # h0 and c0
    for state in seen:
        # bit-exact: tanh(0) + 1 is exactly 1
        assert torch.equal(state[..., removed], torch.ones_like(state[..., removed]))
    assert_soft_equals_hard(mask, model, inputs, FRESH["lstm_initial_state"]())


def test_an_initial_state_given_as_a_model_input_freezes_the_hidden_channels() -> None:
    class WithState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.gru, self.head = nn.Linear(5, 6), nn.GRU(6, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
            return self.head(self.gru(self.inp(x), h0)[0]).sum(0)

    model = WithState()
    mask = maskprune.Mask(model, (torch.randn(7, 3, 5), torch.randn(1, 3, 4))).make()
    assert found(mask) == {G(6, "inp.weight[0]", "inp.bias[0]", "gru.weight_ih_l0[1]")}
    assert "gru.weight_hh_l0[0]" not in grouped(mask)


def test_packed_sequences() -> None:
    """A packed sequence of unequal, unsorted lengths (the trace runs the model itself: the lengths are read)."""
    torch.manual_seed(0)
    model, inputs = TinyRecurrent(nn.LSTM(6, 4, num_layers=2), packed=True), torch.randn(7, 3, 5)
    mask = maskprune.Mask(model, inputs).make()
    gates = [f"rnn.{t}_l{k}[0]" for k in (0, 1) for t in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    hidden = G(4, *gates, "rnn.weight_hh_l0[1]", "rnn.weight_hh_l1[1]", "rnn.weight_ih_l1[1]", "head.weight[1]")
    assert found(mask) == {G(6, "inp.weight[0]", "inp.bias[0]", "rnn.weight_ih_l0[1]"), hidden}
    prune_every_group(mask)
    pruned = assert_soft_equals_hard(mask, model, inputs, [torch.randn(9, 4, 5), torch.randn(3, 1, 5)])
    assert (pruned.rnn.input_size, pruned.rnn.hidden_size) == (3, 2)
    mask.remove()
    by_ratio = maskprune.Mask(model, inputs, algorithm=L1Norm(), ratio=0.5).make()
    by_ratio.do_mask()
    assert sorted(group.kept for group in by_ratio.groups) == [2, 3]
    assert_soft_equals_hard(by_ratio, model, inputs, [torch.randn(9, 4, 5)])


@pytest.mark.parametrize("algorithm", [L1Norm, GroupMagnitude])
def test_do_mask_and_training_steps_on_a_recurrent_model(algorithm: type) -> None:
    model, inputs = TINY_MODELS["lstm_proj"]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mask = maskprune.Mask(model, inputs, algorithm=algorithm(), ratio=0.5).make()
    mask.do_mask()
    for _ in range(2):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
    assert sorted(group.kept for group in mask.groups) == [2, 3, 4]  # half of 4, 6 and 8
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["lstm_proj"]())
    assert (pruned.rnn.input_size, pruned.rnn.hidden_size, pruned.rnn.proj_size) == (3, 4, 2)


# ---- cells -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lstm_cell_loop", "gru_cell_loop"])
def test_cells_in_a_loop(name: str) -> None:
    mask, model, inputs = make(name)
    prune_every_group(mask)
    hidden, inputs_kept = group_of(mask, "cell.weight_hh", 1).kept, group_of(mask, "cell.weight_ih", 1).kept
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH[name]())
    cell = pruned.cell
    assert (
        (cell.input_size, cell.hidden_size) == (inputs_kept, hidden) < (model.cell.input_size, model.cell.hidden_size)
    )
    assert _shapes(cell) == _shapes(type(model.cell)(inputs_kept, hidden))


# ---- attention ---------------------------------------------------------------------------------
def test_repeat_interleave_grouped_query_attention_loses_whole_head_groups() -> None:
    mask, model, inputs = make("repeat_interleave_attention")
    group = group_of(mask, "k_proj.weight", 0)
    group.prune([0])  # key/value head 0 and query heads 0 and 1
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["repeat_interleave_attention"]())
    # bit-exact: the export copies the kept rows and columns
    assert torch.equal(pruned.q_proj.weight, model.q_proj.weight[6:])
    assert torch.equal(pruned.k_proj.weight, model.k_proj.weight[3:])  # bit-exact: a copy
    assert torch.equal(pruned.o_proj.weight, model.o_proj.weight[:, 6:])  # bit-exact: a copy


def test_repeat_interleave_of_one_key_head_by_a_held_count_loses_query_heads() -> None:
    """Multi-query attention: one key/value head, ``repeat_interleave(self.num_heads, dim=1)``; the export sets
    ``num_heads``."""

    class MultiQuery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head_dim, self.num_heads = 3, 4
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 12), nn.Linear(8, 3), nn.Linear(8, 3)
            self.o_proj, self.head = nn.Linear(12, 8), nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q = self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
            k, v = [
                p(x).view(b, n, -1, self.head_dim).transpose(1, 2).repeat_interleave(self.num_heads, dim=1)
                for p in (self.k_proj, self.v_proj)
            ]
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.head(x + self.o_proj(a.transpose(1, 2).reshape(b, n, -1)))

    torch.manual_seed(0)
    model, x = MultiQuery(), torch.randn(2, 5, 8)
    mask = maskprune.Mask(model, x).make()
    assert found(mask) == {G(4, "q_proj.weight[0]", "q_proj.bias[0]", "o_proj.weight[1]")}
    group_of(mask, "q_proj.weight", 0).prune([0, 2])
    pruned = assert_soft_equals_hard(mask, model, x, [torch.randn(3, 7, 8)])
    assert pruned.num_heads == 2 and pruned.q_proj.out_features == 6


def test_repeat_interleave_by_per_slice_counts_freezes() -> None:
    class PerSlice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).repeat_interleave(torch.tensor([1, 2, 3]), dim=1))

    with pytest.raises(maskprune.NothingToPruneError, match="repeat_interleave"):
        maskprune.Mask(PerSlice(), torch.randn(2, 4)).make()


@pytest.fixture(scope="module")
def falcon() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
    )
    return transformers.FalconForCausalLM(config).eval()


def test_falcon_multi_query_attention_loses_query_heads_exactly(falcon: nn.Module) -> None:
    """Falcon's fused multi-query attention: ``view(B, N, num_heads + 2, head_dim)``, the queries ``[..., :-2, :]``,
    the one key and value head ``[..., [-2], :]`` and ``[..., [-1], :]``; its linear layers compute
    ``input @ weight.T``. Query heads go (with their ``dense`` columns), the key and value rows stay."""
    ids = torch.randint(0, 50, (2, 6))
    mask = maskprune.Mask(falcon, ids).make()
    qkv = "transformer.h.{}.self_attention.query_key_value.weight"
    for layer in (0, 1):
        heads = group_of(mask, qkv.format(layer), 0)
        assert found(mask) >= {G(4, f"{qkv.format(layer)}[0]", f"transformer.h.{layer}.self_attention.dense.weight[1]")}
        assert heads.size == 4 and group_of(mask, f"transformer.h.{layer}.mlp.dense_h_to_4h.weight", 0).size == 128
    assert group_of(mask, "transformer.h.0.mlp.dense_h_to_4h.weight", 1).size == 32  # the hidden width
    assert len(mask.groups) == 5
    assert re.search(r"`getitem` in transformer\.h\.0\.self_attention: .*query_key_value\.weight\[0\]", str(mask))
    group_of(mask, qkv.format(0), 0).prune([0, 2])
    group_of(mask, qkv.format(1), 0).prune([3])
    group_of(mask, "transformer.h.0.mlp.dense_h_to_4h.weight", 1).prune(list(range(0, 32, 3)))
    pruned = mask.generate_pruned_model()
    attention = [block.self_attention for block in pruned.transformer.h]
    assert [a.num_heads for a in attention] == [2, 3] and [a.head_dim for a in attention] == [8, 8]
    rows = [*range(8, 16), *range(24, 32), *range(32, 48)]  # query heads 1 and 3, then the key and value heads
    hidden = [i for i in range(32) if i % 3]
    original = falcon.transformer.h[0].self_attention.query_key_value.weight
    # bit-exact: the export copies the kept rows and columns
    assert torch.equal(attention[0].query_key_value.weight, original[rows][:, hidden])
    for x in (ids, torch.randint(0, 50, (1, 9))):
        result = maskprune.verify(falcon, pruned, x)
        assert result.problem is None and result.max_rel <= RTOL, str(result)
    prompt = torch.randint(0, 50, (1, 5))
    greedy = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    # bit-exact: token ids, from logits equal within 1e-5
    assert torch.equal(falcon.generate(prompt, **greedy), pruned.generate(prompt, **greedy))


# ---- indexing the fused heads ----------------------------------------------------------------------
class Indexed(nn.Module):
    """``a``'s 8 outputs as 4 pairs; ``index`` takes some pairs, ``b`` reads them."""

    def __init__(self, index: object, width: int) -> None:
        super().__init__()
        self.index = index
        self.a, self.b = nn.Linear(4, 8), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).unflatten(-1, (-1, 2))[..., self.index, :].flatten(-2))


@pytest.mark.parametrize(
    ("index", "width", "prunable"),
    [
        (slice(None, -1), 6, [0, 1, 2]),  # the last pair stays
        (slice(1, None), 6, [1, 2, 3]),  # the first pair stays
        (slice(1, -1), 4, [1, 2]),
    ],
)
def test_slices_anchored_to_the_ends_keep_their_inside_prunable(index: slice, width: int, prunable: list[int]) -> None:
    torch.manual_seed(0)
    model, x = Indexed(index, width), torch.randn(2, 4)
    mask = maskprune.Mask(model, x).make()
    group = group_of(mask, "a.weight", 0)
    assert sorted({int(row) // 2 for row in member(group, "a.weight", 0).positions}) == prunable
    group.prune([0])
    assert_soft_equals_hard(mask, model, x, [torch.randn(5, 4)])


@pytest.mark.parametrize(
    ("index", "width"),
    [
        (slice(None, 2), 4),  # a stop counted from the front: the slice would take other pairs
        (slice(None, None, 2), 4),
        ([0, -1], 4),  # a list counting from both ends
    ],
)
def test_other_slices_and_lists_freeze_what_they_index(index: object, width: int) -> None:
    with pytest.raises(maskprune.NothingToPruneError, match="getitem"):
        maskprune.Mask(Indexed(index, width), torch.randn(2, 4)).make()


def test_a_slice_from_a_size_read_is_checked_by_the_trial_export() -> None:
    """``y[:, c // 2:]`` with ``c`` read from ``y``: its start moves with the count, so nothing inside is removed."""

    class SecondHalf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y[:, y.shape[1] // 2 :])

    with pytest.raises(maskprune.NothingToPruneError, match="a.weight"):
        maskprune.Mask(SecondHalf(), torch.randn(2, 4)).make()


def test_a_list_index_keeps_the_channels_it_picks() -> None:
    """``[..., [-1], :]`` takes the last pair, which stays; the other pairs are prunable, a pair at a time."""

    class PickLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y) + self.c(y.unflatten(-1, (-1, 2))[..., [-1], :].flatten(-2))

    torch.manual_seed(0)
    model, x = PickLast(), torch.randn(2, 4)
    mask = maskprune.Mask(model, x).make()
    group = group_of(mask, "a.weight", 0)
    assert member(group, "a.weight", 0).positions.tolist() == list(range(6)) and group.size == 3  # pairs 0 to 2
    group.prune([1])
    pruned = assert_soft_equals_hard(mask, model, x, [torch.randn(5, 4)])
    assert pruned.a.out_features == 6
