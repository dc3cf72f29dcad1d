"""The language-model example on a tiny budget: corpus split, training, pruning to 75% of the parameters by
width, by depth and by both, verified export, perplexity before and after a fine-tune."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from maskprune import Mask

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import each other as plain modules, as when run as scripts

import prune_llm as job  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = job.ModelSize(hidden=64, layers=8, heads=4, kv_heads=2, intermediate=160, context=32)
BUDGET = job.Budget(train_steps=40, finetune_steps=3, batch=8, eval_windows=16, calib_sequences=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> job.Corpus:
    """A corpus of 20 files: the source of Python's json package, which is always there."""
    folder = tmp_path_factory.mktemp("corpus")
    sources = sorted(Path(json.__file__).parent.glob("*.py"))
    for i in range(20):
        (folder / "sub" if i % 2 else folder).mkdir(exist_ok=True)
        (folder / ("sub" if i % 2 else "") / f"f{i:02d}.txt").write_bytes(sources[i % len(sources)].read_bytes())
    return job.load_corpus(folder)


@pytest.fixture(scope="module")
def base(corpus: job.Corpus) -> torch.nn.Module:
    torch.set_num_threads(1)
    return job.base_model(corpus, SIZE, BUDGET, cache_dir=None)


def test_the_split_is_by_file_every_tenth_held_out(corpus: job.Corpus) -> None:
    assert (corpus.train_files, corpus.held_out_files) == (18, 2)
    assert corpus.train.dtype == torch.long and 0 <= int(corpus.train.min()) and int(corpus.train.max()) < 256
    with pytest.raises(FileNotFoundError, match="python3-doc"):
        job.load_corpus(Path(__file__).parent / "no such folder")


def test_training_beats_the_uniform_byte_model(corpus: job.Corpus, base: torch.nn.Module) -> None:
    ppl = job.perplexity(base, corpus.held_out, SIZE, BUDGET)
    assert math.isfinite(ppl) and ppl < 256 / 4  # far below the 256 of a uniform guess


@pytest.mark.parametrize(("mode", "criterion"), [("width", "l2norm"), ("both", "activation")])
def test_a_quarter_of_the_parameters_removed(
    corpus: job.Corpus, base: torch.nn.Module, mode: str, criterion: str
) -> None:
    run = job.prune_one(base, mode, criterion, corpus, SIZE, BUDGET)
    assert run.verified  # generate_pruned_model() verified the export against the masked model
    assert abs(run.kept_params - 0.75) <= 0.01, run
    assert math.isfinite(run.ppl_pruned) and math.isfinite(run.ppl_finetuned)
    assert run.ppl_pruned > job.perplexity(base, corpus.held_out, SIZE, BUDGET)  # pruning costs something
    assert run.layers == SIZE.layers or mode == "both"  # both: blocks lose the channels' ratio, here under 1/8
    assert run.criterion == ("l2norm" if mode == "width" else "activation+blockimportance")


@pytest.mark.parametrize("mode", ["width", "both"])
def test_the_export_computes_what_the_spec_masks(corpus: job.Corpus, base: torch.nn.Module, mode: str) -> None:
    calibration = job.calibration_batches(corpus, SIZE, BUDGET)
    pruned = job.pruned_copy(base, mode, "wandasp", calibration)
    masked = copy.deepcopy(base)
    Mask(masked, calibration[0], depth=mode == "both").make().apply_spec(pruned)  # the masks the export records
    fresh = {"input_ids": corpus.held_out[: 3 * 20].view(3, 20)}  # another batch size and length
    assert job.maskprune.verify(masked, pruned, fresh).ok
    assert job.maskprune.count_parameters(pruned) < 0.77 * job.maskprune.count_parameters(base)


def test_depth_only_removes_whole_layers_and_no_channel(corpus: job.Corpus, base: torch.nn.Module) -> None:
    run = job.prune_one(base, "depth", "random", corpus, SIZE, BUDGET)
    per_layer = sum(p.numel() for p in base.model.layers[0].parameters()) / job.maskprune.count_parameters(base)
    assert run.layers == SIZE.layers - 2  # a quarter of eight layers
    assert run.kept_params == pytest.approx(1 - 2 * per_layer, abs=1e-6)  # every channel kept


def test_the_control_is_the_dense_model_fine_tuned(corpus: job.Corpus, base: torch.nn.Module) -> None:
    run = job.prune_one(base, "none", "dense", corpus, SIZE, BUDGET)
    assert (run.kept_params, run.layers, run.verified) == (1.0, SIZE.layers, False)
    assert run.ppl_pruned == pytest.approx(job.perplexity(base, corpus.held_out, SIZE, BUDGET), rel=1e-6)


def test_the_grid_and_the_table() -> None:
    runs = job.grid(["l2norm", "random"], ["none", "width", "depth", "both"])
    assert runs == [
        ("none", "dense"),
        ("width", "l2norm"),
        ("width", "random"),
        ("depth", "blockimportance"),
        ("depth", "random"),
        ("both", "l2norm"),
        ("both", "random"),
    ]
    row = job.Run("depth", "random", 0.751, 6, 3.5, 3.1, 10.0, verified=True)
    info = dict(command="c", date="d", torch="t", transformers="x", cpu="cpu", threads=1, model="m", corpus="k")
    table = job.markdown([row], 2.5, info)
    assert "| depth | random | 0.751 | 6 | 3.500 | 3.100 | 10 |" in table and "**2.500**" in table
