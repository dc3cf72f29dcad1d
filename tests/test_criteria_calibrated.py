"""Calibrated criteria for language models (Activation, WandaSP, FLAP) against computations written out here
from activations captured by plain forward hooks on a tiny Hugging Face Llama (2 layers, hidden 32, 4 query
heads of 8 over 2 key/value heads, MLP 48)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from maskprune.algorithms import FLAP, Activation, WandaSP
from maskprune.algorithms._moments import Moments, collect
from maskprune.algorithms.flap import add_zero_biases
from torch import nn
from torch.overrides import TorchFunctionMode

from maskprune import Group, Mask
from maskprune.testing import TINY_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ("model.layers.0", "model.layers.1")
HEAD_DIM, QUERY_PER_KV = 8, 2
NORMS = [f"{p}.{n}" for p in LAYERS for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
HIDDEN_READERS = (
    [f"{p}.{n}" for p in LAYERS for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    + [f"{p}.mlp.{n}" for p in LAYERS for n in ("gate_proj", "up_proj")]
    + ["lm_head"]
)


def llama(seed: int = 0) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (2, 7), generator=generator)} for _ in range(count)]


def captured(model: nn.Module, batches: list[dict], inputs_of: list[str], outputs_of: list[str]) -> dict:
    """Per module path, the (batch, sequence, channels) tensors it read (``inputs_of``) or wrote, in float64."""
    seen: dict[str, list[np.ndarray]] = {}
    handles = []
    for path in inputs_of + outputs_of:

        def hook(module, args, output, path=path):  # noqa: ANN001, ANN202
            tensor = args[0] if path in inputs_of else output
            seen.setdefault(path, []).append(tensor.detach().double().numpy())

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {path: np.concatenate(arrays) for path, arrays in seen.items()}


def group_read_by(mask: Mask, consumer: str) -> Group:
    for group in mask.groups:
        if any(m.module == consumer and m.role == "consumer" for m in group.members):
            return group
    raise AssertionError(f"no group read by {consumer}")


def head_units(columns: np.ndarray) -> np.ndarray:
    """Key/value group of each o_proj column: head h holds columns 8h..8h+7 and shares key/value head h // 2."""
    return columns // HEAD_DIM // QUERY_PER_KV


def unit_sums(per_column: np.ndarray, units: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(units, weights=per_column, minlength=size)


def weight(model: nn.Module, path: str) -> np.ndarray:
    return model.get_submodule(path).weight.detach().double().numpy()


def scored(algorithm, mask: Mask, groups: list[Group]) -> list[np.ndarray]:  # noqa: ANN001
    algorithm.prepare(mask, groups)
    scores = [algorithm.score(g) for g in groups]
    algorithm.finish(mask)
    return scores


# ---- Activation ------------------------------------------------------------------------------------------
def aggregate(x: np.ndarray, batch_agg: str, seq_agg: str) -> np.ndarray:
    """(batch, sequence, channels) -> per channel, as Minitron aggregates over the sequence, then the batch."""
    per_sample = {
        "mean": lambda: np.abs(x).mean(1),
        "l2": lambda: np.sqrt((x**2).sum(1)),
        "var": lambda: x.var(1),
    }[seq_agg]()
    return {
        "l2": lambda: np.sqrt((per_sample**2).sum(0)),
        "mean": lambda: per_sample.mean(0),
        "var": lambda: per_sample.var(0),
    }[batch_agg]()


@pytest.mark.parametrize(("batch_agg", "seq_agg"), [("l2", "mean"), ("mean", "l2"), ("var", "var"), ("l2", "var")])
def test_activation_scores_heads_neurons_and_hidden_channels_where_minitron_measures_them(
    batch_agg: str, seq_agg: str
) -> None:
    model, batches = llama(), token_batches(3)
    algorithm = Activation(batches, batch_agg=batch_agg, seq_agg=seq_agg)
    mask = Mask(model, batches[0]).make()
    heads = group_read_by(mask, "model.layers.1.self_attn.o_proj")
    mlp = group_read_by(mask, "model.layers.0.mlp.down_proj")
    hidden = group_read_by(mask, "lm_head")
    got = scored(algorithm, mask, [heads, mlp, hidden])
    seen = captured(model, batches, ["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"], NORMS)
    # a head (a key/value group of 2 query heads): the norm of its attention output columns' scores
    per_column = aggregate(seen["model.layers.1.self_attn.o_proj"], batch_agg, seq_agg)
    expected_heads = np.sqrt(unit_sums(per_column**2, head_units(np.arange(32)), 2))
    # a neuron: act(gate) * up, the input of down_proj
    expected_mlp = aggregate(seen["model.layers.0.mlp.down_proj"], batch_agg, seq_agg)
    # a hidden channel: the output of every norm feeding a block (and the final norm), summed
    expected_hidden = sum(aggregate(seen[n], batch_agg, seq_agg) for n in NORMS)
    for g, e in zip(got, [expected_heads, expected_mlp, expected_hidden], strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-9)
    assert algorithm.declined == {}


def test_activation_defaults_and_choices() -> None:
    assert repr(Activation([])) == "Activation(batch_agg='l2', seq_agg='mean', max_batches=None)"
    with pytest.raises(ValueError, match="batch_agg must be one of"):
        Activation([], batch_agg="max")
    with pytest.raises(ValueError, match="seq_agg must be one of"):
        Activation([], seq_agg="L2")


# ---- WandaSP ---------------------------------------------------------------------------------------------
def wanda_reference(model: nn.Module, seen: dict, readers: list[str], units: np.ndarray, size: int) -> np.ndarray:
    """sum over readers and rows i of |W_ij| * ||X_j||_2 (X_j over every token), summed per unit."""
    total = np.zeros(size)
    for path in readers:
        x = seen[path].reshape(-1, seen[path].shape[-1])
        elements = np.abs(weight(model, path)) * np.sqrt((x**2).sum(0))
        total += unit_sums(elements.sum(0), units, size)
    return total


def test_wanda_sp_sums_weight_times_input_norm_over_a_channels_elements_and_readers() -> None:
    model, batches = llama(), token_batches(3)
    algorithm = WandaSP(batches, max_batches=2)
    mask = Mask(model, batches[0]).make()
    heads = group_read_by(mask, "model.layers.0.self_attn.o_proj")
    mlp = group_read_by(mask, "model.layers.1.mlp.down_proj")
    hidden = group_read_by(mask, "lm_head")
    got = scored(algorithm, mask, [heads, mlp, hidden])
    paths = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj", *HIDDEN_READERS]
    seen = captured(model, batches[:2], paths, [])  # max_batches=2: the third batch is not used
    expected = [
        wanda_reference(model, seen, ["model.layers.0.self_attn.o_proj"], head_units(np.arange(32)), 2),
        wanda_reference(model, seen, ["model.layers.1.mlp.down_proj"], np.arange(48), 48),
        wanda_reference(model, seen, HIDDEN_READERS, np.arange(32), 32),
    ]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5)


class SharedReader(nn.Module):
    """``shared`` reads the channels of ``pre`` twice in one forward: once as they are, once after a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.shared = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return self.shared(h) + self.shared(torch.relu(h))


def test_a_layer_called_twice_counts_the_inputs_of_both_calls() -> None:
    torch.manual_seed(0)
    model, batches = SharedReader(), [torch.randn(3, 4), torch.randn(5, 4)]
    mask = Mask(model, batches[0]).make()
    group = group_read_by(mask, "shared")
    (wanda,) = scored(WandaSP(batches), mask, [group])
    (flap,) = scored(FLAP(batches), mask, [group])
    with torch.no_grad():
        h = torch.cat([model.pre(b) for b in batches]).double().numpy()
    x = np.concatenate([h, np.maximum(h, 0)])  # every token of both calls
    np.testing.assert_allclose(wanda, np.abs(weight(model, "shared")).sum(0) * np.sqrt((x**2).sum(0)), rtol=1e-5)
    fluctuation = x.var(0, ddof=1) * (weight(model, "shared") ** 2).sum(0)
    z = (fluctuation - fluctuation.mean()) / fluctuation.std(ddof=1)
    np.testing.assert_allclose(flap, z, rtol=1e-5, atol=1e-6)


# ---- FLAP ------------------------------------------------------------------------------------------------
def flap_reference(model: nn.Module, seen: dict, readers: list[str], units: np.ndarray, size: int) -> np.ndarray:
    """Per reader: var(X_j) (sample variance over tokens) * ||W[:, j]||^2, standardised over the layer's channels,
    averaged per unit; then averaged over the readers."""
    total = np.zeros(size)
    for path in readers:
        x = seen[path].reshape(-1, seen[path].shape[-1])
        fluctuation = x.var(0, ddof=1) * (weight(model, path) ** 2).sum(0)
        z = (fluctuation - fluctuation.mean()) / fluctuation.std(ddof=1)
        total += unit_sums(z, units, size) / np.bincount(units, minlength=size)
    return total / len(readers)


def test_flap_scores_are_standardised_fluctuations() -> None:
    model, batches = llama(), token_batches(3)
    algorithm = FLAP(batches)
    mask = Mask(model, batches[0], algorithm=algorithm).make()
    heads = group_read_by(mask, "model.layers.1.self_attn.o_proj")
    mlp = group_read_by(mask, "model.layers.0.mlp.down_proj")
    hidden = group_read_by(mask, "lm_head")
    got = scored(algorithm, mask, [heads, mlp, hidden])
    paths = ["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj", *HIDDEN_READERS]
    seen = captured(model, batches, paths, [])
    expected = [
        flap_reference(model, seen, ["model.layers.1.self_attn.o_proj"], head_units(np.arange(32)), 2),
        flap_reference(model, seen, ["model.layers.0.mlp.down_proj"], np.arange(48), 48),
        flap_reference(model, seen, HIDDEN_READERS, np.arange(32), 32),
    ]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)  # standardised: of order 1
    assert FLAP.comparable_across_groups


def test_flap_compensates_the_removed_channels_mean_in_the_bias_and_the_export_keeps_it() -> None:
    model, batches = llama(), token_batches(3)
    assert add_zero_biases(model, ["o_proj", "down_proj"]) == [
        f"{p}.{n}" for p in LAYERS for n in ("self_attn.o_proj", "mlp.down_proj")
    ]
    with torch.no_grad():
        for p in LAYERS:
            model.get_submodule(f"{p}.mlp.down_proj").bias.normal_()  # compensation adds to what is there
    consumers = [f"{p}.{n}" for p in LAYERS for n in ("self_attn.o_proj", "mlp.down_proj")]
    before = {c: (weight(model, c), model.get_submodule(c).bias.detach().double().numpy().copy()) for c in consumers}
    seen = captured(model, batches, consumers, [])
    algorithm = FLAP(batches)
    mask = Mask(model, batches[0], algorithm=algorithm, ratio=0.5).make()
    with pytest.warns(UserWarning, match=r"no compensation .* model\.layers\.0\.self_attn\.q_proj \(no bias\)"):
        assert mask.do_mask()
    assert "lm_head" in algorithm.uncompensated and "model.layers.0.mlp.down_proj" not in algorithm.uncompensated
    hidden_kept = group_read_by(mask, "lm_head").keep
    assert not hidden_kept.all()
    for path in consumers:
        group = group_read_by(mask, path)
        units = head_units(np.arange(32)) if "o_proj" in path else np.arange(48)
        removed = ~group.keep[units]  # per input column
        assert removed.any()
        w, bias = before[path]
        mean = seen[path].reshape(-1, w.shape[1]).mean(0)
        expected = bias + w[:, removed] @ mean[removed]
        got = model.get_submodule(path).bias.detach().double().numpy()
        np.testing.assert_allclose(got[hidden_kept], expected[hidden_kept], rtol=1e-5, atol=1e-6)
        # bit-exact: the outputs of removed hidden channels are masked to zero
        assert (got[~hidden_kept] == 0).all()
    pruned = mask.generate_pruned_model()  # verifies soft == hard on the example inputs
    fresh = {"input_ids": torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(9))}
    with torch.no_grad():
        torch.testing.assert_close(pruned(**fresh).logits, model(**fresh).logits, rtol=1e-5, atol=1e-5)
    assert pruned.model.layers[0].self_attn.o_proj.bias.shape == (int(hidden_kept.sum()),)


def test_flap_compensates_each_step_for_the_channels_it_removes() -> None:
    model, batches = llama(), token_batches(2)
    add_zero_biases(model, ["down_proj"])
    path = "model.layers.1.mlp.down_proj"
    mask = Mask(model, batches[0], algorithm=FLAP(batches), ratio=0.5, steps=2).make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers without a bias
        mask.do_mask()
        keep, bias, w = (
            group_read_by(mask, path).keep,
            model.get_submodule(path).bias.detach().double().numpy(),
            weight(model, path),
        )
        mean = captured(model, batches, [path], [])[path].reshape(-1, 48).mean(0)  # on the masked model
        mask.do_mask()
    removed = keep & ~group_read_by(mask, path).keep
    assert removed.any() and not (~keep & group_read_by(mask, path).keep).any()
    hidden_kept = group_read_by(mask, "lm_head").keep
    expected = bias + w[:, removed] @ mean[removed]  # only the channels removed at this step
    got = model.get_submodule(path).bias.detach().double().numpy()
    np.testing.assert_allclose(got[hidden_kept], expected[hidden_kept], rtol=1e-5, atol=1e-6)
    mask.generate_pruned_model()


def test_flap_without_biases_warns_naming_the_layers_and_stays_exact() -> None:
    model, batches = llama(), token_batches(2)
    algorithm = FLAP(batches)
    mask = Mask(model, batches[0], algorithm=algorithm, ratio=0.5, allocation="global").make()
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.o_proj \(no bias\).*add_zero_biases"):
        mask.do_mask()
    assert {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"} <= set(algorithm.uncompensated)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    mask.generate_pruned_model()


def test_flap_compensates_gpt2_conv1d_projections_in_their_own_biases() -> None:
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model, batches = transformers.GPT2LMHeadModel(config).eval(), token_batches(2)
    path = "transformer.h.0.mlp.c_proj"  # Conv1D: x @ W + b, W of (128 inputs, 32 outputs)
    w, bias = weight(model, path), model.get_submodule(path).bias.detach().double().numpy().copy()
    mean = captured(model, batches, [path], [])[path].reshape(-1, 128).mean(0)
    algorithm = FLAP(batches)
    mask = Mask(model, batches[0], algorithm=algorithm, ratio=0.5, ratios={"transformer.wte": 0.0}).make()
    mask.do_mask()  # the hidden size is kept: no warning, every projection reading a pruned group has a bias
    removed = ~group_read_by(mask, path).keep
    assert removed.any() and algorithm.uncompensated == {}
    got = model.get_submodule(path).bias.detach().double().numpy()
    np.testing.assert_allclose(got, bias + mean[removed] @ w[removed], rtol=1e-5, atol=1e-6)
    mask.generate_pruned_model()


def test_flap_compensation_needs_frozen_semantics() -> None:
    model, batches = llama(), token_batches(1)
    mask = Mask(model, batches[0], algorithm=FLAP(batches), ratio=0.5, semantics="soft").make()
    with pytest.raises(ValueError, match="semantics='frozen'"):
        mask.do_mask()
    assert all(g.keep.all() for g in mask.groups)
    mask.algorithm = FLAP(batches, compensate=False)  # scores only: soft semantics are fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mask.do_mask()
    with pytest.raises(TypeError, match="compensate must be True or False"):
        FLAP([], compensate="yes")


# ---- loaders ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", [Activation, WandaSP, FLAP])
def test_loaders_of_dicts_batch_encodings_tuples_and_tensors_give_the_same_scores(criterion: Callable) -> None:
    model, batches = llama(), token_batches(2)
    mask = Mask(model, batches[0]).make()
    groups = list(mask.groups)
    reference = scored(criterion(batches), mask, groups)
    forms = [
        [transformers.BatchEncoding(b) for b in batches],
        [(b["input_ids"], torch.zeros(2)) for b in batches],  # (inputs, targets): element 0 is fed
        [b["input_ids"] for b in batches],
        [{"ids": b["input_ids"]} for b in batches],
    ]
    for data, inputs in zip(forms, [None, None, None, lambda batch: {"input_ids": batch["ids"]}], strict=True):
        for g, e in zip(scored(criterion(data, inputs=inputs), mask, groups), reference, strict=True):
            # bit-exact: the same batches through the same kernels
            np.testing.assert_array_equal(g, e)


# ---- statistics ------------------------------------------------------------------------------------------
def test_moments_equal_numpy_on_batches_of_any_size_far_from_zero() -> None:
    generator = torch.Generator().manual_seed(3)
    chunks = [1e4 + torch.randn(n, 5, generator=generator) for n in (1, 7, 300, 2)]
    moments = Moments()
    for chunk in chunks:
        moments.add(chunk)
    x = torch.cat(chunks).double().numpy()
    assert moments.count == len(x)
    np.testing.assert_allclose(moments.mean.numpy(), x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(moments.variance(ddof=1).numpy(), x.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(moments.sum_squares().numpy(), (x**2).sum(0), rtol=1e-9)


class NoHostReads(TorchFunctionMode):
    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if getattr(func, "__name__", "") in self.READS:
            raise AssertionError(f"host read during calibration: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("criterion", [Activation, WandaSP, FLAP])
def test_calibration_batches_read_no_value_to_the_host(criterion: Callable) -> None:
    data = token_batches(2)

    class Strict:
        """Batches whose forward passes (and the statistics gathered in them) run under NoHostReads."""

        def __iter__(self):  # noqa: ANN204
            for batch in data:
                with NoHostReads():
                    yield batch

    mask = Mask(llama(), data[0], algorithm=criterion(Strict()), ratio=0.5).make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FLAP: the layers without a bias
        assert mask.do_mask()


def test_calibration_reads_no_value_to_the_host_and_measures_a_shared_input_once() -> None:
    attention, x = TINY_MODELS["grouped_query_attention"]()
    model = nn.Sequential(nn.Linear(8, 8), attention)
    mask = Mask(model, x).make()
    hidden = group_read_by(mask, "1.q_proj")
    sites = [s for s in hidden.activations("input") if s.path in ("1.q_proj", "1.k_proj", "1.v_proj")]
    assert len(sites) == 3
    with NoHostReads():
        moments = collect(mask, sites, lambda s, t: t.reshape(-1, t.shape[-1]), [x, x, x], inputs=None,
                          max_batches=None, desc="test")  # fmt: skip
    assert len({id(m) for m in moments.values()}) == 1  # q, k and v read one tensor: one set of statistics
    assert next(iter(moments.values())).count == 3 * x.shape[0] * x.shape[1]


def rank_batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(50 + rank)
    return [3 + torch.randn(n, 4, generator=generator) for n in (2 + rank, 5)]


def merge_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
        mask = Mask(model, torch.randn(1, 4)).make()
        sites = [s for s in group_read_by(mask, "1").activations("input") if s.path == "1"]
        data = rank_batches(rank)
        moments = collect(mask, sites, lambda s, t: t, data, inputs=None, max_batches=None, desc="test")
        (stats,) = moments.values()
        algorithm = FLAP(data, compensate=False)
        algorithm.prepare(mask, mask.groups)
        scores = [algorithm.score(g).tolist() for g in mask.groups]
        torch.save({"count": stats.count, "mean": stats.mean, "m2": stats.m2, "scores": scores}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_merge_their_statistics_into_those_of_all_the_batches(tmp_path) -> None:
    mp.spawn(merge_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))[0]
    with torch.no_grad():
        x = torch.cat([first(b) for r in range(2) for b in rank_batches(r)]).double().numpy()
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for result in results:
        assert result["count"] == len(x)
        np.testing.assert_allclose(result["mean"].numpy(), x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(result["m2"].numpy(), ((x - x.mean(0)) ** 2).sum(0), rtol=1e-6)
    assert results[0]["scores"] == results[1]["scores"]  # every rank scores the merged statistics


# ---- bad input -------------------------------------------------------------------------------------------
def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("criterion", [Activation, WandaSP, FLAP])
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "gave no batch"),
        (iter([]), "gave no batch"),
        ([{"input_ids": torch.ones(1, 4, dtype=torch.long)}, {"input_ids": torch.full((1, 4), 999)}], "batch 1"),
    ],
)
def test_bad_loaders_fail_clearly_and_leave_the_model_untouched(criterion: Callable, data: list, message: str) -> None:
    model = llama()
    mask = Mask(model.train(), {"input_ids": torch.ones(1, 4, dtype=torch.long)}, algorithm=criterion(data)).make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    with pytest.raises(ValueError, match=message) as caught:
        mask.do_mask()
    if "batch 1" in message:  # which batch, and the model's own error
        assert "rejected calibration batch 1" in str(caught.value) and "IndexError" in str(caught.value)
    assert model.training and hook_count(model) == hooks
    assert all(g.keep.all() for g in mask.groups)
    for key, value in model.state_dict().items():
        # bit-exact: nothing was written
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("criterion", [Activation, WandaSP, FLAP])
@pytest.mark.parametrize("max_batches", [0, -1, True, 1.5])
def test_max_batches_must_be_a_positive_integer(criterion: Callable, max_batches: object) -> None:
    with pytest.raises(ValueError, match="max_batches must be a positive integer"):
        criterion([], max_batches=max_batches)
