"""Tracing on a weightless meta-device copy: the same groups as a real trace, a real trace when values are read,
nothing touched on the user's model, and shape-only kernels that check shapes as torch's do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import maskprune
from maskprune import Mask
from maskprune._groups import build_layout
from maskprune._layers import leaf_rules
from maskprune._meta import FastMeta
from maskprune._records import Trace
from maskprune._trace import trace
from maskprune.errors import DataDependentWarning
from maskprune.testing import TINY_MODELS


def _layout(tr: Trace) -> tuple[Any, ...]:
    """The groups of a trace as plain values: members by name, dimension, role, positions and units."""
    layout = build_layout(tr, tr.graph.resolve())
    groups = [
        (start, size, [(m.name, m.dim, m.role, m.positions.tolist(), np.asarray(m.units).tolist()) for m in members])
        for start, size, members in layout.groups
    ]
    frozen = {reason: sorted(names) for reason, names in layout.frozen.items()}
    return groups, frozen, sorted(tr.unknown_ops.items()), tr.modes, tr.unreached


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_meta_trace_finds_the_groups_of_a_real_trace(name: str) -> None:
    model, inputs = TINY_MODELS[name]()
    on_meta = trace(model, inputs, leaf_rules(), {})
    real = trace(model, inputs, leaf_rules(), {}, on_meta=False)
    assert on_meta.shadow is not None and real.shadow is None
    assert _layout(on_meta) == _layout(real)
    owned = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    assert set(on_meta.param_nodes) <= owned  # expressed in the model's own tensors
    assert all(site.module is model.get_submodule(site.path) for site in on_meta.layer_norms)
    assert all(call.module is model.get_submodule(call.path) for call in on_meta.leaf_calls)


class CopiesItself(nn.Module):
    """A layer with its own ``__deepcopy__``, which copies its parts through the memo and counts its copies."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.copies = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def __deepcopy__(self, memo: dict[int, Any]) -> CopiesItself:
        copied = CopiesItself.__new__(CopiesItself)
        nn.Module.__init__(copied)
        copied.conv = copy.deepcopy(self.conv, memo)
        copied.copies = self.copies + 1
        return copied


def test_meta_trace_of_a_self_copying_module_is_in_the_models_tensors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), CopiesItself(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 6, 6)
    on_meta = trace(model, x, leaf_rules(), {})
    real = trace(model, x, leaf_rules(), {}, on_meta=False)
    assert on_meta.shadow is not None and on_meta.shadow[1].copies == 1
    assert _layout(on_meta) == _layout(real)
    assert any(o.tensor is model[1].conv.weight for o in on_meta.owned.values())
    mask = Mask(model, x).make()
    mask.groups[0].prune([0, 1])
    pruned = mask.generate_pruned_model()
    assert pruned[1].conv.weight.shape == (8, 6, 3, 3)
    assert maskprune.verify(model, pruned, x).max_rel <= 1e-5


class CachesInEval(nn.Module):
    """Caches a derived per-channel bias in eval mode; ``train()``, in either mode, clears the cache (timm's LeViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 2, 1)
        self.channels = 8  # written in the view below: make() runs its trial export
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> CachesInEval:
        super().train(mode)
        self.cache = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            scale = self.scale * 2
        else:
            scale = self.cache.setdefault("scale", self.scale * 2)
        return self.head(self.conv(x) * scale.view(1, self.channels, 1, 1))


def test_a_cache_cleared_by_train_is_cleared_before_the_trial_export_and_the_verification() -> None:
    """The trace fills the cache of the meta copy with 8 channels; the trial export and the verification call
    ``train()``/``eval()`` as the model expects (even when already in that mode), so its cache is rebuilt."""
    torch.manual_seed(0)
    model, x = CachesInEval().eval(), torch.randn(2, 3, 5, 5)
    mask = Mask(model, x).make()
    assert [g.size for g in mask.groups] == [8]  # not frozen by the trial export
    with torch.no_grad():
        model(x)  # the masked model's cache now holds all 8 channels
    mask.groups[0].prune([1, 4])
    pruned = mask.generate_pruned_model()
    assert pruned.scale.shape == (6,) and pruned.channels == 6  # the trial export set it too
    assert maskprune.verify(model, pruned, x).max_rel <= 1e-5


class ReadsValues(nn.Module):
    """A forward that branches on a tensor value and selects rows by a boolean mask (no meta kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        if x.mean() > -1e9:  # always true, but only a real tensor can say so
            y = y * 2
        out = self.head(y)
        return out[out > -1e9].reshape(out.shape)  # boolean indexing: an output size only values decide


def test_a_forward_that_reads_values_is_traced_for_real() -> None:
    model, x = ReadsValues().eval(), torch.randn(2, 3, 6, 6)
    tr = trace(model, x, leaf_rules(), {})
    assert tr.shadow is None
    assert _layout(tr) == _layout(trace(model, x, leaf_rules(), {}, on_meta=False))
    with pytest.warns(DataDependentWarning, match=r"`__bool__` in <root> at test_meta_trace\.py:\d+ \(`if x\.mean"):
        mask = Mask(model, x).make()
    assert [g.size for g in mask.groups] == [8]
    mask.groups[0].prune([0, 3, 5])
    assert mask.generate_pruned_model().conv.out_channels == 5


def test_a_meta_trace_leaves_the_model_untouched() -> None:
    model, x = TINY_MODELS["batch_norm2d"]()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    rng = torch.get_rng_state()
    tr = trace(model, x, leaf_rules(), {})
    assert tr.shadow is not None
    assert model.training and all(m.training for m in model.modules())
    # bit-exact: compared with a copy taken before, and nothing may write to it
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running stats, batch counter
    assert [id(p) for p in model.parameters()] == params and not any(p.is_meta for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_tensor_attributes_and_ties_follow_the_copy() -> None:
    class WithAttributes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.embed.weight  # tied
            self.offset = torch.zeros(8)  # a plain tensor attribute, neither parameter nor buffer

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.mid(self.embed(ids) + self.offset)))

    model, ids = WithAttributes(), torch.randint(0, 10, (2, 5))
    on_meta = trace(model, ids, leaf_rules(), {})
    assert on_meta.shadow is not None
    assert on_meta.shadow.out.weight is on_meta.shadow.embed.weight
    assert _layout(on_meta) == _layout(trace(model, ids, leaf_rules(), {}, on_meta=False))


# ---- shape-only kernels against torch's ----------------------------------------------------------
def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


FAST_CASES: dict[str, tuple[Callable[..., torch.Tensor], tuple[Any, ...]]] = {
    "relu": (F.relu, (_t(2, 4, 3, 3),)),
    "relu_inplace": (lambda x: F.relu(x, inplace=True), (_t(2, 4, 3, 3),)),
    "hardtanh_inplace_positional": (lambda x: F.hardtanh(x, -1.0, 1.0, True), (_t(2, 4),)),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), (_t(2, 4),)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (_t(2, 4),)),
    "sigmoid": (torch.sigmoid, (_t(2, 4),)),
    "batch_norm": (lambda x, w: F.batch_norm(x, w, w, w, w), (_t(2, 4, 3, 3), _t(4))),
    "batch_norm_wrong_size": (lambda x, w: F.batch_norm(x, w, w, w, w), (_t(2, 4, 3, 3), _t(5))),
    "batch_norm_train_one_value": (lambda x, w: F.batch_norm(x, w, w, training=True), (_t(1, 4, 1, 1), _t(4))),
    "instance_norm": (lambda x, w: F.instance_norm(x, weight=w, bias=w), (_t(2, 4, 3, 3), _t(4))),
    "instance_norm_wrong_size": (lambda x, w: F.instance_norm(x, weight=w), (_t(2, 4, 3, 3), _t(3))),
    "group_norm": (lambda x, w: F.group_norm(x, 2, w, w), (_t(2, 4, 3, 3), _t(4))),
    "group_norm_indivisible": (lambda x, w: F.group_norm(x, 3, w, w), (_t(2, 4, 3, 3), _t(4))),
    "group_norm_wrong_weight": (lambda x, w: F.group_norm(x, 2, w), (_t(2, 4, 3, 3), _t(6))),
    "layer_norm": (lambda x, w: F.layer_norm(x, (6,), w, w), (_t(2, 5, 6), _t(6))),
    "layer_norm_int_shape": (lambda x, w: F.layer_norm(x, 6, w), (_t(2, 5, 6), _t(6))),
    "layer_norm_wrong_input": (lambda x, w: F.layer_norm(x, (6,), w), (_t(2, 5, 7), _t(6))),
    "layer_norm_wrong_weight": (lambda x, w: F.layer_norm(x, (6,), w), (_t(2, 5, 6), _t(5))),
    "rms_norm": (lambda x, w: F.rms_norm(x, (6,), w), (_t(2, 5, 6), _t(6))),
    "rms_norm_wrong_weight": (lambda x, w: F.rms_norm(x, (6,), w), (_t(2, 5, 6), _t(4))),
    "linear": (F.linear, (_t(2, 5, 6), _t(3, 6), _t(3))),
    "linear_no_bias": (F.linear, (_t(7, 6), _t(3, 6))),
    "linear_wrong_input": (F.linear, (_t(2, 5, 4), _t(3, 6), _t(3))),
    "linear_wrong_bias": (F.linear, (_t(2, 6), _t(3, 6), _t(4))),
    "add_broadcast": (lambda a, b: a + b, (_t(2, 4, 3, 3), _t(1, 4, 1, 1))),
    "add_left_broadcast": (lambda a, b: torch.add(a, b, alpha=2), (_t(4, 1, 1), _t(2, 4, 3, 3))),
    "add_mismatch": (lambda a, b: a + b, (_t(2, 4, 3, 3), _t(1, 5, 1, 1))),
    "mul_scalar": (lambda a: 2 * a, (_t(2, 4),)),
    "sub_scalar": (lambda a: a - 1, (_t(2, 4),)),
    "add_inplace": (lambda a, b: a.add_(b), (_t(2, 4, 3, 3), _t(4, 1, 1))),
    "iadd_inplace_wrong_shape": (lambda a, b: a.__iadd__(b), (_t(4, 1, 1), _t(2, 4, 3, 3))),
    "mul_integers": (lambda a, b: a * b, (torch.arange(6).view(2, 3), torch.arange(3))),
    "mul_mixed_dtypes": (lambda a, b: a * b, (_t(2, 3), torch.arange(3))),
    "sub_double_float": (lambda a, b: a - b, (_t(2, 3).double(), _t(3))),
    "conv2d": (F.conv2d, (_t(2, 4, 9, 9), _t(6, 4, 3, 3), _t(6))),
    "conv2d_grouped_strided": (lambda x, w: F.conv2d(x, w, None, 2, 1, 1, 2), (_t(2, 4, 9, 9), _t(6, 2, 3, 3))),
    "conv2d_dilated": (lambda x, w: F.conv2d(x, w, padding=(2, 1), dilation=(2, 1)), (_t(1, 4, 8, 9), _t(3, 4, 3, 3))),
    "conv2d_padding_same": (lambda x, w: F.conv2d(x, w, padding="same"), (_t(1, 4, 8, 9), _t(3, 4, 3, 3))),
    "conv2d_unbatched": (F.conv2d, (_t(4, 9, 9), _t(6, 4, 3, 3))),
    "conv2d_wrong_channels": (F.conv2d, (_t(2, 4, 9, 9), _t(6, 5, 3, 3))),
    "conv2d_kernel_too_large": (F.conv2d, (_t(1, 4, 2, 2), _t(6, 4, 3, 3))),
    "conv1d": (lambda x, w: F.conv1d(x, w, stride=2), (_t(2, 4, 10), _t(3, 4, 3))),
    "conv3d": (lambda x, w: F.conv3d(x, w, stride=(1, 2, 2), padding=1), (_t(1, 2, 4, 5, 6), _t(3, 2, 3, 3, 3))),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 1), (_t(2, 4, 7, 7),)),
    "adaptive_avg_pool2d_none": (lambda x: F.adaptive_avg_pool2d(x, (3, None)), (_t(2, 4, 7, 5),)),
    "adaptive_avg_pool2d_unbatched_larger": (lambda x: F.adaptive_avg_pool2d(x, 5), (_t(4, 3, 3),)),
    "adaptive_avg_pool2d_wrong_size": (lambda x: F.adaptive_avg_pool2d(x, (2, 2, 2)), (_t(2, 4, 5, 5),)),
    "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1), (_t(2, 4, 9, 9),)),
    "max_pool2d_ceil": (lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True), (_t(2, 4, 14, 13),)),
    "max_pool2d_ceil_last_window_in_padding": (lambda x: F.max_pool2d(x, 2, 2, 1, ceil_mode=True), (_t(1, 2, 5, 4),)),
    "max_pool2d_dilated_no_stride": (
        lambda x: F.max_pool2d(x, (3, 2), padding=(1, 0), dilation=(2, 1)),
        (_t(2, 4, 9, 8),),
    ),
    "max_pool2d_module": (nn.MaxPool2d(3, 2, ceil_mode=True), (_t(2, 4, 9, 9),)),
    "max_pool2d_with_indices": (lambda x: F.max_pool2d(x, 2, return_indices=True)[1], (_t(2, 4, 8, 8),)),
    "max_pool2d_too_much_padding": (lambda x: F.max_pool2d(x, 3, 1, 2), (_t(2, 4, 9, 9),)),
    "max_pool2d_too_small": (lambda x: F.max_pool2d(x, 5), (_t(2, 4, 3, 3),)),
    "max_pool2d_unbatched": (lambda x: F.max_pool2d(x, 2), (_t(4, 6, 6),)),
    "max_pool2d_channels_last": (
        lambda x: F.max_pool2d(x, 2),
        (_t(2, 4, 6, 6).to(memory_format=torch.channels_last),),
    ),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 2, 2), (_t(2, 4, 9, 9),)),
    "avg_pool2d_ceil_padded": (lambda x: F.avg_pool2d(x, 3, 2, 1, True, False), (_t(2, 4, 10, 7),)),
    "avg_pool2d_keywords": (
        lambda x: F.avg_pool2d(x, kernel_size=(3, 2), stride=(1, 2), divisor_override=3),
        (_t(2, 4, 9, 9),),
    ),
    "avg_pool2d_zero_divisor": (lambda x: F.avg_pool2d(x, 2, divisor_override=0), (_t(2, 4, 9, 9),)),
    "avg_pool2d_too_much_padding": (lambda x: F.avg_pool2d(x, 2, 2, 2), (_t(2, 4, 9, 9),)),
    "avg_pool2d_module": (nn.AvgPool2d(2, 2), (_t(2, 4, 9, 9),)),
    "dropout_training": (lambda x: F.dropout(x, 0.3, True), (_t(2, 4, 3),)),
    "dropout_training_inplace": (lambda x: F.dropout(x, 0.3, True, True), (_t(2, 4, 3),)),
    "dropout_module_training": (nn.Dropout(0.5).train(), (_t(2, 4),)),
    "dropout_eval": (lambda x: F.dropout(x, 0.3, False), (_t(2, 4, 3),)),
    "dropout_bad_probability": (lambda x: F.dropout(x, 1.5, True), (_t(2, 4),)),
    "dropout_integer_input": (lambda x: F.dropout(x, 0.3, True), (torch.arange(6),)),
    "add_inplace_counter": (lambda a: a.add_(1), (torch.tensor(3),)),
    "add_inplace_counter_float_step": (lambda a: a.add_(1.5), (torch.tensor(3),)),
    "add_inplace_int32_counter": (lambda a: a.add_(1), (torch.tensor(3, dtype=torch.int32),)),
    "add_inplace_counter_alpha": (lambda a: a.add_(1, alpha=2), (torch.tensor(3),)),
    "cat": (lambda a, b: torch.cat([a, b], 1), (_t(2, 4, 3, 3), _t(2, 5, 3, 3))),
    "cat_negative_dim": (lambda a, b, c: torch.cat((a, b, c), dim=-1), (_t(2, 3), _t(2, 1), _t(2, 4))),
    "cat_mismatch": (lambda a, b: torch.cat([a, b], 1), (_t(2, 4, 3, 3), _t(2, 5, 3, 4))),
    "cat_many_parts": (
        lambda a, b, c, d: torch.cat([a, b, c, d, b], 1),
        (_t(1, 4, 3), _t(1, 2, 3), _t(1, 1, 3), _t(1, 7, 3)),
    ),
    "cat_rank_mismatch": (lambda a, b: torch.cat([a, b], 1), (_t(2, 4, 3), _t(2, 5, 3, 1))),
    "cat_scalar_part": (lambda a: torch.cat([a, 1.0], 0), (_t(2, 3),)),
    "cat_legacy_empty": (lambda a, b: torch.cat([a, b]), (_t(2, 3), _t(0))),
    "cat_mixed_dtypes": (lambda a, b: torch.cat([a, b]), (_t(2, 3), _t(1, 3).double())),
    "cat_channels_last": (
        lambda a, b: torch.cat([a, b], 1),
        (_t(2, 4, 3, 3).to(memory_format=torch.channels_last), _t(2, 5, 3, 3)),
    ),
    "grouped_mm": (
        lambda a, b: torch._grouped_mm(a, b, offs=torch.tensor([3, 5, 8], dtype=torch.int32, device=a.device)),
        (_t(8, 4), _t(3, 4, 8)),
    ),
    "grouped_mm_wrong_width": (
        lambda a, b: torch._grouped_mm(a, b, offs=torch.tensor([3, 5, 8], dtype=torch.int32, device=a.device)),
        (_t(8, 4), _t(3, 8, 8)),
    ),
    "adaptive_avg_pool2d_channels_last": (
        lambda x: F.adaptive_avg_pool2d(x, 2),
        (_t(2, 4, 5, 5).to(memory_format=torch.channels_last),),
    ),
}


@pytest.mark.parametrize("name", list(FAST_CASES))
def test_fast_meta_kernels_match_torch(name: str) -> None:
    op, args = FAST_CASES[name]
    try:
        real = op(*[a.clone() for a in args])
        expected: Any = (real.shape, real.dtype)
    except (RuntimeError, ValueError, TypeError) as error:
        expected = type(error)
    meta_args = [a.to("meta") for a in args]
    with torch.no_grad(), FastMeta():
        if isinstance(expected, tuple):
            out = op(*meta_args)
            assert out.is_meta and (out.shape, out.dtype) == expected
            assert out.is_contiguous() == real.is_contiguous()
            if "inplace" in name:
                assert out is meta_args[0]
        else:
            with pytest.raises(expected):
                op(*meta_args)


def test_fast_meta_leaves_linear_and_convolutions_to_flop_counters() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.empty(4, 6, device="meta"), torch.empty(3, 6, device="meta")
    image, kernel = torch.empty(1, 2, 5, 5, device="meta"), torch.empty(3, 2, 3, 3, device="meta")
    with FlopCounterMode(display=False) as counter, FastMeta(products=False):
        F.linear(x, w)
        F.conv2d(image, kernel)
    assert counter.get_total_flops() == 2 * 4 * 6 * 3 + 2 * (3 * 3 * 3) * (2 * 3 * 3)

    rows, experts = torch.empty(8, 4, device="meta"), torch.empty(3, 4, 8, device="meta")
    with FlopCounterMode(display=False) as counter, FastMeta(products=False):
        out = torch._grouped_mm(rows, experts, offs=torch.tensor([3, 5, 8], dtype=torch.int32, device="meta"))
    assert out.shape == (8, 8) and counter.get_total_flops() == 2 * 8 * 4 * 8  # every row times its expert's slice


class InstanceNormByKeyword(nn.Module):
    """``torch.instance_norm`` with running statistics and affine tensors, its flag given by position or keyword."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.conv = nn.Conv2d(3, 8, 3)
        self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))
        self.register_buffer("running_mean", torch.zeros(8))
        self.register_buffer("running_var", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = (self.running_mean, self.running_var, self.weight, self.bias)
        y = self.conv(x)
        if self.keyword:
            return torch.instance_norm(y, *stats, use_input_stats=True, momentum=0.1, eps=1e-5, cudnn_enabled=False)
        return torch.instance_norm(y, *stats, True, 0.1, 1e-5, False)


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
def test_input_statistics_freeze_the_dims_they_average_over_however_the_flag_is_given(keyword: bool) -> None:
    tr = trace(InstanceNormByKeyword(keyword).eval(), torch.randn(2, 3, 10, 10), leaf_rules(), {})
    (conv_out,), (out,) = tr.module_outputs["conv"], tr.module_outputs["<root>"]
    find = tr.graph.find
    same = [find(a) == find(b) for a, b in zip(conv_out.spaces, out.spaces, strict=True)]
    assert same == [False, True, False, False]  # the channels pass; batch and positions are averaged over
