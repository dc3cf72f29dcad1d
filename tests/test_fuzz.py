"""Random architectures (:func:`maskprune.testing.random_model`): every one exported exactly or refused with
a maskprune error. ``benchmarks/fuzz.py`` runs thousands; this runs a few hundred tiny ones."""

from __future__ import annotations

import collections
import re

import pytest
import torch

from maskprune.testing import check_random_model, random_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = range(300)  # benchmarks/fuzz.py starts at seed 0 too; these are its first 300
FLOAT64 = range(1000, 1040)
#: each block the generator builds, by the first word of its name in ``model.ops``
BLOCKS = (
    "conv1x1", "conv3x3", "depthwise", "conv_transpose", "batch_norm", "group_norm", "instance_norm",
    "channels_last_layer_norm", "act", "residual_add", "residual_sub", "residual_mul", "concat", "chunk_each",
    "split_each", "chunk_gate", "slice", "max_pool_2x2", "avg_pool_3x3", "upsample_nearest", "upsample_bilinear",
    "squeeze_excite", "spatial_gate", "shuffle", "data_gate_where", "data_gate_positive", "data_gate_max",
    "conv3x3_dilated", "conv3x3_stride2", "flatten_head", "to_tokens", "linear", "layer_norm", "rms_norm",
    "attention", "multihead_attention", "token_mix",
    "self_similarity", "residual_mlp", "image_head", "token_head",
)  # fmt: skip


def _kind(op: str) -> str:
    return re.split(r"[/\[]", op)[0]


def test_random_models_are_exact_or_refused_with_a_reason() -> None:
    results = [check_random_model(seed) for seed in SEEDS]
    results += [check_random_model(seed, dtype=torch.float64) for seed in FLOAT64]
    failures = [f"seed {r.seed}: {r.verdict}: {r.detail} [{' '.join(r.ops)}]" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    verdicts = collections.Counter(r.verdict for r in results)
    assert verdicts["exact"] >= len(results) // 2, verdicts  # the fuzzer proves something only where it prunes
    assert all(r.detail.startswith(("NothingToPruneError", "TraceError")) for r in results if r.verdict == "refused")
    exact = [r for r in results if r.verdict == "exact"]
    assert sum(r.removed for r in exact) > 0
    covered = {_kind(op) for r in exact for op in r.ops}
    assert not set(BLOCKS) - covered, f"blocks in no exact model: {sorted(set(BLOCKS) - covered)}"


def test_a_seed_builds_the_same_model_and_leaves_the_global_random_state() -> None:
    state = torch.random.get_rng_state()
    (a, x), (b, y) = random_model(7), random_model(7)
    # bit-exact: one seed, one construction, the same weights
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.ops == b.ops and torch.equal(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert random_model(8)[0].ops != a.ops
