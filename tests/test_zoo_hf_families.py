"""More Hugging Face families from tiny configs: Gemma 2 and 3, Phi-3, GPT-NeoX, OPT, BLOOM, Whisper, CLIP, SigLIP,
DINOv2, DeBERTa-v2, RoBERTa and BART.

Each model (width 32, 4 heads of 8, 2 layers) is masked at ratio 0.5 (L1 norm) and exported: fewer parameters,
soft == hard on fresh inputs of another batch size and length, attention heads removed whole where the family's
attention can lose heads (the others are listed in docs/limitations.md), and for the models that generate the
same greedy ``generate()`` tokens from the masked and the exported model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from maskprune.algorithms import L1Norm
from torch import nn
from zoo import _randomize_zero_parameters

import maskprune
from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
VOCAB = 128
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2)
# Gemma: one sliding-window layer (window 4, shorter than the inputs) and one global layer
GEMMA = SMALL | dict(
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
)
SEQ2SEQ = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
)


def _config(cls: type, **kwargs: Any) -> Any:
    return cls(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)


def _tokens(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def _text(batch: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(batch, length, generator)}


def _pixels(batch: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}


def _text_and_pixels(batch: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return _text(batch, length, generator) | _pixels(batch, length, generator)


def _encoder_decoder(batch: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(batch, length, generator), "decoder_input_ids": _tokens(batch, length - 2, generator)}


def _speech(batch: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    features = torch.randn(batch, 8, 32, generator=generator)  # 8 mel bins, 32 frames (16 after the stride-2 conv)
    return {"input_features": features, "decoder_input_ids": _tokens(batch, length // 2, generator)}


@dataclass(frozen=True)
class Family:
    """A model built from a tiny config; ``query`` names its attention's query projections when they lose heads."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, torch.Generator], dict[str, torch.Tensor]]
    query: str | None = None  # name ending of each attention's query projection (or fused qkv); None: heads stay
    fused: int = 1  # projections packed in the query's weight (3 for GPT-NeoX's query_key_value)
    generates: bool = False
    prompt: str = "input_ids"  # the input generate() starts from (an encoder-decoder starts its own decoder)


FAMILIES = [
    Family(
        "gemma2",  # logit soft-capping in attention and at the output
        lambda: transformers.Gemma2ForCausalLM(
            _config(transformers.Gemma2Config, **GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        ),
        _text,
        "self_attn.q_proj",
        generates=True,
    ),
    Family(
        "gemma3",  # query and key RMS norms over head_dim, output soft-capping
        lambda: transformers.Gemma3ForCausalLM(
            _config(transformers.Gemma3TextConfig, **GEMMA, final_logit_softcapping=30.0)
        ),
        _text,
        "self_attn.q_proj",
        generates=True,
    ),
    Family(
        "phi3",  # fused qkv_proj sliced at offsets the code computes: heads stay (docs/limitations.md)
        lambda: transformers.Phi3ForCausalLM(
            _config(transformers.Phi3Config, **SMALL, num_key_value_heads=2, max_position_embeddings=64)
        ),
        _text,
        generates=True,
    ),
    Family(
        "gpt_neox",
        lambda: transformers.GPTNeoXForCausalLM(
            _config(transformers.GPTNeoXConfig, **SMALL, max_position_embeddings=64)
        ),
        _text,
        "attention.query_key_value",
        fused=3,
        generates=True,
    ),
    Family(
        "opt",
        lambda: transformers.OPTForCausalLM(
            _config(
                transformers.OPTConfig,
                hidden_size=32,
                num_attention_heads=4,
                ffn_dim=48,
                num_hidden_layers=2,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
            )
        ),
        _text,
        "self_attn.q_proj",
        generates=True,
    ),
    Family(
        "bloom",  # ALiBi slopes follow the head count: heads stay (docs/limitations.md)
        lambda: transformers.BloomForCausalLM(_config(transformers.BloomConfig, hidden_size=32, n_head=4, n_layer=2)),
        _text,
        generates=True,
    ),
    Family(
        "whisper",
        lambda: transformers.WhisperForConditionalGeneration(
            _config(
                transformers.WhisperConfig,
                **SEQ2SEQ,
                num_mel_bins=8,
                max_source_positions=16,
                max_target_positions=32,
                decoder_start_token_id=1,
            )
        ),
        _speech,
        "self_attn.q_proj",
        generates=True,
        prompt="input_features",
    ),
    Family(
        "clip",
        lambda: transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config=_config(transformers.CLIPTextConfig, **SMALL, max_position_embeddings=32).to_dict(),
                vision_config=dict(**SMALL, image_size=32, patch_size=8),
                projection_dim=16,
            )
        ),
        _text_and_pixels,
        "self_attn.q_proj",
    ),
    Family(
        "siglip",
        lambda: transformers.SiglipModel(
            transformers.SiglipConfig(
                text_config=_config(transformers.SiglipTextConfig, **SMALL, max_position_embeddings=32).to_dict(),
                vision_config=dict(**SMALL, image_size=32, patch_size=8),
            )
        ),
        _text_and_pixels,
        "self_attn.q_proj",
    ),
    Family(
        "dinov2",
        lambda: transformers.Dinov2ForImageClassification(
            transformers.Dinov2Config(
                hidden_size=32,
                num_attention_heads=4,
                mlp_ratio=2,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
                num_labels=5,
            )
        ),
        _pixels,
        "attention.q_proj",
    ),
    Family(
        "deberta_v2",  # heads merged with the batch for bmm and repeated over it: heads stay (docs/limitations.md)
        lambda: transformers.DebertaV2ForSequenceClassification(
            _config(
                transformers.DebertaV2Config,
                **SMALL,
                max_position_embeddings=64,
                num_labels=3,
                relative_attention=True,  # disentangled attention, as DeBERTa-v3 has it
                pos_att_type=["p2c", "c2p"],
                position_buckets=8,
                max_relative_positions=16,
            )
        ),
        _text,
    ),
    Family(
        "roberta",
        lambda: transformers.RobertaForSequenceClassification(
            _config(transformers.RobertaConfig, **SMALL, max_position_embeddings=64, num_labels=3)
        ),
        _text,
        "attention.self.query",
    ),
    Family(
        "bart",
        lambda: transformers.BartForConditionalGeneration(
            _config(transformers.BartConfig, **SEQ2SEQ, max_position_embeddings=64)
        ),
        _encoder_decoder,
        "self_attn.q_proj",
        generates=True,
    ),
]
BY_NAME = {family.name: family for family in FAMILIES}


def _inputs(family: Family, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    return family.inputs(batch, length, torch.Generator().manual_seed(seed))


@functools.cache
def _exported(name: str) -> tuple[nn.Module, nn.Module]:
    """(masked model, exported model), once per process: L1 norm at ratio 0.5."""
    family = BY_NAME[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = family.build().eval()
        _randomize_zero_parameters(model)
        mask = Mask(model, _inputs(family, 2, 12, seed=1), algorithm=L1Norm(), ratio=0.5).make()
        assert mask.do_mask()
        return model, mask.generate_pruned_model()  # verified on the example inputs


def _query_rows(model: nn.Module, family: Family) -> list[int]:
    rows = [m.weight.shape[0] // family.fused for n, m in model.named_modules() if n.endswith(family.query)]
    assert rows, f"no {family.query} in {family.name}"
    return rows


def _assert_whole_heads_removed(model: nn.Module, pruned: nn.Module, family: Family) -> None:
    head_dim = 8
    before, after = _query_rows(model, family), _query_rows(pruned, family)
    assert all(rows % head_dim == 0 for rows in after), f"{family.name}: {after} rows are not whole heads"
    assert sum(after) < sum(before), f"{family.name}: no head was removed: {before} -> {after}"
    for name, module in pruned.named_modules():  # each attention's own head count says how many heads it has now
        if name.endswith(family.query):
            owner = pruned.get_submodule(name.rpartition(".")[0])
            heads = module.weight.shape[0] // (family.fused * head_dim)
            for attr in ("num_heads", "num_attention_heads", "n_heads"):
                if isinstance(getattr(owner, attr, None), int):
                    assert getattr(owner, attr) == heads, f"{name}: {attr} is {getattr(owner, attr)}, not {heads}"


@pytest.mark.parametrize("name", list(BY_NAME))
def test_family_soft_equals_hard(name: str) -> None:
    family = BY_NAME[name]
    model, pruned = _exported(name)
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
    result = maskprune.verify(model, pruned, _inputs(family, 3, 7, seed=2))
    assert result.ok and result.scale > 0, f"{name}: {result}"
    if family.query is not None:
        _assert_whole_heads_removed(model, pruned, family)


def _greedy_tokens(model: nn.Module, inputs: dict[str, torch.Tensor], options: dict[str, Any]) -> torch.Tensor:
    """``model.generate(...)``'s tokens, checking that at every step the two best logits are at least ``10 * RTOL``
    of the largest apart, so that the exported model's logits (at most ``RTOL`` of it away) choose the same. A step
    whose token a logits processor forces (BART's first and last) has minus infinity as its second best."""
    out = model.generate(**inputs, **options, output_scores=True, return_dict_in_generate=True)
    best = torch.stack(out.scores).topk(2, dim=-1).values
    gap, scale = (best[..., 0] - best[..., 1]).min().item(), best[..., 0].abs().max().item()
    assert gap > 10 * RTOL * scale, f"a near tie between two tokens: {gap:.3g} apart, logits up to {scale:.3g}"
    return out.sequences


GENERATING = [family.name for family in FAMILIES if family.generates]


@pytest.mark.parametrize("name", GENERATING)
def test_family_generates_the_same_tokens(name: str) -> None:
    family = BY_NAME[name]
    model, pruned = _exported(name)
    prompt = {family.prompt: _inputs(family, 2, 6, seed=3)[family.prompt]}
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        masked_tokens = _greedy_tokens(model, prompt, options)
        pruned_tokens = _greedy_tokens(pruned, prompt, options)
    assert masked_tokens.shape[0] == 2 and masked_tokens.shape[1] >= 5
    # bit-exact: integer tokens; no greedy step is a near tie (`_greedy_tokens`), so rounding cannot flip one
    assert torch.equal(masked_tokens, pruned_tokens)
    if family.prompt == "input_ids":  # left padding: the attention masks (sliding windows, ALiBi) see it
        padded = dict(prompt, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
        with torch.no_grad():
            # bit-exact: integer tokens, no near tie (`_greedy_tokens`)
            assert torch.equal(_greedy_tokens(model, padded, options), _greedy_tokens(pruned, padded, options))
