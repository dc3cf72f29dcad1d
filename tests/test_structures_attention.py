"""Attention: whole heads pruned, head counts and head sizes that follow them or stay."""

from __future__ import annotations

import pytest
import torch
from _structures import FRESH, TOKENS, assert_soft_equals_hard, group_of, grouped, make, member, prune_every_group
from torch import nn

from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- heads --------------------------------------------------------------------------------------------
def test_attention_loses_whole_heads() -> None:
    mask, model, inputs = make("multihead_attention")
    (heads,) = [g for g in mask.groups if any(m.name.startswith("attn.") for m in g.members)]
    assert heads.size == 2
    heads.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, TOKENS())
    attn = pruned.attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.kdim) == (1, 4, 4, 4)
    assert attn.in_proj_weight.shape == (12, 4) and attn.out_proj.weight.shape == (4, 4)
    assert (pruned.pre2.out_features, pruned.post1.in_features) == (4, 4)  # the query's channels of head 1
    kept = torch.arange(4, 8)
    rows = torch.cat([kept, kept + 8, kept + 16])
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(attn.in_proj_weight, model.attn.in_proj_weight[rows][:, kept])


def test_fused_qkv_loses_whole_heads_and_its_attributes_follow() -> None:
    mask, model, inputs = make("fused_qkv_attention")
    heads = group_of(mask, "qkv.weight", 0)
    assert heads.size == 3 and member(heads, "qkv.weight", 0).mapping() == "[0:18], 6 per channel"
    heads.prune([1])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["fused_qkv_attention"]())
    assert (pruned.num_heads, pruned.head_dim, pruned.attn_dim) == (2, 2, 4)
    rows = [r for part in range(3) for r in (6 * part + 0, 6 * part + 1, 6 * part + 4, 6 * part + 5)]
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.qkv.weight, model.qkv.weight[rows])
    assert torch.equal(pruned.proj.weight, model.proj.weight[:, [0, 1, 4, 5]])
    assert (model.num_heads, model.attn_dim) == (3, 6)  # the masked model keeps its own


def test_grouped_query_heads_go_with_their_key_value_head() -> None:
    mask, model, inputs = make("grouped_query_attention")
    (kv_heads,) = mask.groups
    kv_heads.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["grouped_query_attention"]())
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.k_proj.weight, model.k_proj.weight[3:])
    assert torch.equal(pruned.q_proj.weight, model.q_proj.weight[6:])  # query heads 2 and 3 read key head 1
    assert torch.equal(pruned.o_proj.weight, model.o_proj.weight[:, 6:])
    assert pruned.num_key_value_groups == 2


def test_a_head_count_written_in_the_code_stays_and_the_heads_lose_the_same_positions() -> None:
    mask, model, inputs = make("literal_heads_attention")
    group_of(mask, "v.weight", 0).prune([1])  # position 1 of each head of 4: value rows 1 and 5
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["literal_heads_attention"]())
    rows = [0, 2, 3, 4, 6, 7]
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.v.weight, model.v.weight[rows]) and torch.equal(
        pruned.proj.weight, model.proj.weight[:, rows]
    )
    assert pruned.q.weight.shape == model.q.weight.shape and pruned.k.weight.shape == model.k.weight.shape


def test_sizes_read_from_the_input_keep_the_reduction_and_the_heads_at_its_width() -> None:
    """PVT sizes ``sr(...).reshape(B, C, -1)`` and the heads' ``reshape(B, N, C)`` by the width ``C`` it read
    from its input: the reduction's channels and the heads lose the residual's channels, a head at a time."""
    mask, model, inputs = make("spatial_reduction_attention")
    (heads,) = mask.groups
    heads.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, FRESH["spatial_reduction_attention"]())
    kept = [4, 5, 6, 7]
    assert (pruned.num_heads, pruned.head_dim) == (1, 4) and (model.num_heads, model.head_dim) == (2, 4)
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.sr.weight, model.sr.weight[kept][:, kept])
    assert torch.equal(pruned.kv.weight, model.kv.weight[kept + [8 + k for k in kept]][:, kept])
    assert torch.equal(pruned.proj.weight, model.proj.weight[kept][:, kept])
    assert torch.equal(pruned.head.weight, model.head.weight[:, kept])


class _HeadDimEqualsHeads(nn.Module):
    """Two heads of two: separate q, k, v split by ``view(B, N, -1, self.head_dim)``, ``num_heads`` never read."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 2, 2
        self.embed = nn.Linear(6, 8)
        self.q, self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
        self.proj = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        q, k, v = (layer(x).view(b, n, -1, self.head_dim).transpose(1, 2) for layer in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(x + self.proj(a))


def test_a_head_count_leaves_a_head_size_of_the_same_value_alone() -> None:
    """Found by the random-model fuzzer: ``head_dim == num_heads``; the export set both to the new head count,
    which ran (``view(B, N, -1, 1)``) and computed something else."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, inputs = _HeadDimEqualsHeads().eval(), torch.randn(2, 5, 6)
    mask = Mask(model, inputs).make()
    heads = group_of(mask, "q.weight", 0)
    assert heads.size == 2 and member(heads, "q.weight", 0).mapping() == "[0:4], 2 per channel"
    heads.prune([0])
    pruned = assert_soft_equals_hard(mask, model, inputs, TOKENS())
    assert (pruned.num_heads, pruned.head_dim) == (1, 2)
    # bit-exact: exported tensors are copies of the kept slices
    assert torch.equal(pruned.v.weight, model.v.weight[2:]) and torch.equal(
        pruned.proj.weight, model.proj.weight[:, 2:]
    )


class _MixedTokensIntoAttention(nn.Module):
    """A linear layer across the tokens (MLP-Mixer), self-attention (``nn.MultiheadAttention`` or SDPA), a linear
    layer across the tokens again, a head: each token is a channel of the layers around the attention."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 2, 4
        self.embed, self.mix, self.out = nn.Linear(6, 8), nn.Linear(5, 5), nn.Linear(5, 2)
        self.head = nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True) if fused else None
        self.qkv = None if fused else nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.embed(x).transpose(1, 2)).transpose(1, 2)
        b, n, _ = x.shape
        if self.attn is not None:
            a = self.attn(x, x, x, need_weights=False)[0]
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(self.out((x + a).transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("fused", [True, False], ids=["multihead_attention", "sdpa"])
def test_the_keys_tokens_stay_whole(fused: bool) -> None:
    """Found by the random-model fuzzer: the tokens a token-mixing layer makes went through self-attention as if
    each stood alone, but a removed key token, zero in the masked model, still took its share of the softmax."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, inputs = _MixedTokensIntoAttention(fused).eval(), torch.randn(2, 5, 6)
        fresh = [torch.randn(3, 5, 6)]
    mask = Mask(model, inputs).make()
    assert "mix.weight[0]" not in grouped(mask) and "out.weight[1]" not in grouped(mask)
    attention = "multi_head_attention_forward" if fused else "scaled_dot_product_attention"
    assert any(attention in reason for reason in mask.selection.layout.frozen), mask.selection.layout.frozen
    assert "embed.weight[0]" in grouped(mask)
    prune_every_group(mask)
    assert_soft_equals_hard(mask, model, inputs, fresh)
