"""The tracer's shortcuts (``_rules.SHORTCUTS``, each registered beside its rule) give exactly what their rules
give: the same spaces, unions, links, freeze reasons, roles and taint, numbered the same, for the common calls
they take and the unusual ones they must leave to the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from maskprune._layers import leaf_rules
from maskprune._records import Trace
from maskprune._rules import _core, shapes
from maskprune._trace import trace
from maskprune.testing import TINY_MODELS


def _fingerprint(tr: Trace) -> tuple[Any, ...]:
    """Everything a trace decided, as plain values (spaces by number, tensors by name)."""
    graph = tr.graph
    res = graph.resolve()
    name = {key: owned.qualname for key, owned in tr.owned.items()}
    nodes = sorted((name[key], node.spaces, node.shape, node.tainted) for key, node in tr.param_nodes.items())
    outputs = {path: [(n.spaces, n.shape, n.tainted) for n in ns] for path, ns in tr.module_outputs.items()}
    return (
        graph._size,
        [graph.find(s) for s in range(len(graph._size))],
        list(graph._reason.items()),
        [(a, ia.tolist(), b, ib.tolist()) for a, ia, b, ib in graph._links],
        res.labels.tolist(),
        res.comp_reason.tolist(),
        res.reasons,
        nodes,
        sorted((name[key], dim, role) for (key, dim), role in tr.roles.items()),
        outputs,
        sorted(tr.size_reads),
        tr.unproven,
        sorted(tr.unknown_ops.items()),
    )


def _same_with_and_without_shortcuts(
    model: nn.Module, inputs: Any, monkeypatch: pytest.MonkeyPatch, on_meta: bool = True
) -> None:
    fast = _fingerprint(trace(model, inputs, leaf_rules(), {}, on_meta=on_meta))
    with monkeypatch.context() as patch:
        patch.setattr(_core, "SHORTCUTS", {})
        ruled = _fingerprint(trace(model, inputs, leaf_rules(), {}, on_meta=on_meta))
    assert fast == ruled


class Concatenation(nn.Module):
    """Two convolutions' outputs (and the model's parameters) concatenated in the way ``join`` says."""

    def __init__(self, join: Callable[[Concatenation, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.join = join
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.w1, self.w2 = nn.Parameter(torch.randn(2, 6)), nn.Parameter(torch.randn(3, 6))
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.join(self, self.a(x), self.b(x))
        return (
            y.flatten(1).sum(1, keepdim=True)
            + F.linear(torch.ones(1, 6, device=x.device), torch.cat([self.w1, self.w2]))[:, :1]
        )


CAT_CASES: dict[str, Callable[[Concatenation, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "list_positional_dim": lambda m, a, b: torch.cat([a, b], 1),
    "tuple_keyword_dim": lambda m, a, b: torch.cat((a, b), dim=1),
    "negative_dim": lambda m, a, b: torch.cat([a, b], -3),
    "last_dim": lambda m, a, b: torch.cat([a, b, a], 3),
    "batch_dim": lambda m, a, b: torch.cat([a, b], 0),
    "repeated_part": lambda m, a, b: torch.cat([a, b, a, a], 1),
    "three_parts_of_three_sizes": lambda m, a, b: torch.cat([a, b[:, :1], b[:, 1:]], 1),
    "one_part": lambda m, a, b: torch.cat([a], 1) + b,
    "parameters": lambda m, a, b: (
        torch.cat([a, b], 1) * torch.cat([m.bn.weight, m.bn.bias, m.bn.bias[:2]])[:, None, None]
    ),
    "unknown_part": lambda m, a, b: torch.cat([a, b, torch.zeros_like(a).detach()], 1),
    "not_contiguous": lambda m, a, b: torch.cat([a.transpose(2, 3), b.transpose(2, 3)], 1),
    "concat_alias": lambda m, a, b: torch.concat([a, b], dim=1),
    "concatenate_axis": lambda m, a, b: torch.concatenate([a, b], axis=1),
    "out_keyword": lambda m, a, b: torch.cat([a, b], 1, out=torch.empty(a.shape[0], 8, *a.shape[2:])),
    "legacy_empty_part": lambda m, a, b: torch.cat([a.flatten(1), torch.empty(0)], 1),
    "method_after_norm": lambda m, a, b: torch.cat([m.bn(a[:, :3]), b], 1),
}


@pytest.mark.parametrize("on_meta", [True, False], ids=["meta", "real"])
@pytest.mark.parametrize("case", list(CAT_CASES))
def test_concatenation_shortcut_gives_what_the_cat_rule_gives(
    case: str, on_meta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = Concatenation(CAT_CASES[case]).eval()
    _same_with_and_without_shortcuts(model, torch.randn(2, 3, 5, 5), monkeypatch, on_meta)


class Convolutions(nn.Module):
    """Convolution layers, and the functional calls ``convolve`` makes with their weights."""

    def __init__(self, convolve: Callable[[Convolutions, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.convolve = convolve
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.line = nn.Conv1d(4, 5, 3)
        self.volume = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(self, self.stem(x)).flatten(1).sum(1, keepdim=True)


CONV_CASES: dict[str, Callable[[Convolutions, torch.Tensor], torch.Tensor]] = {
    "layers": lambda m, y: m.grouped(m.depthwise(y)) + 1,
    "padding_mode": lambda m, y: m.reflect(m.reflect(y)),
    "conv1d": lambda m, y: m.line(y.flatten(2)),
    "conv3d": lambda m, y: m.volume(y[:, :1, None]),
    "strided_tuple_arguments": lambda m, y: F.conv2d(y, m.reflect.weight, None, (2, 1), [1, 0], (1, 1), 1),
    "keyword_arguments": lambda m, y: F.conv2d(y, m.reflect.weight, padding=1, groups=1),
    "padding_same": lambda m, y: F.conv2d(y, m.reflect.weight, None, 1, "same"),
    "depthwise_outside_a_layer": lambda m, y: F.conv2d(y, m.depthwise.weight, m.depthwise.bias, 1, 1, 1, 4),
    "grouped_functional": lambda m, y: F.conv2d(y, m.grouped.weight, None, 1, 0, 1, 2),
    "unbatched": lambda m, y: F.conv2d(y[0], m.reflect.weight, None, 1, 1),
    "weight_from_an_op": lambda m, y: F.conv2d(y, m.reflect.weight * 2, m.stem.bias[:4] + 1, 1, 1),
    "input_as_weight": lambda m, y: F.conv2d(m.reflect.weight, m.reflect.weight, None, 1, 1),
    "shared_weight": lambda m, y: m.reflect(y) + F.conv2d(y, m.reflect.weight, None, 1, 1),
}


@pytest.mark.parametrize("on_meta", [True, False], ids=["meta", "real"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_convolution_shortcut_gives_what_the_conv_rule_gives(
    case: str, on_meta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = Convolutions(CONV_CASES[case]).eval()
    _same_with_and_without_shortcuts(model, torch.randn(2, 3, 6, 6), monkeypatch, on_meta)


NORM_CASES: dict[str, Callable[[nn.BatchNorm2d, torch.Tensor], torch.Tensor]] = {
    "module_eval": lambda bn, y: bn.eval()(y),
    "module_training": lambda bn, y: bn.train()(y),
    "training_by_keyword": lambda bn, y: F.batch_norm(
        y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True, momentum=0.0
    ),
    "statistics_by_keyword": lambda bn, y: F.batch_norm(
        y, running_mean=bn.running_mean, running_var=bn.running_var, weight=bn.weight, bias=bn.bias
    ),
    "no_running_statistics": lambda bn, y: F.batch_norm(y, None, None, bn.weight, bn.bias, True),
    "shared_tensor": lambda bn, y: F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.weight, True),
    "instance_norm_with_statistics": lambda bn, y: torch.instance_norm(
        y, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, 0.0, 1e-5, False
    ),
    "instance_norm_running": lambda bn, y: torch.instance_norm(
        y,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        use_input_stats=False,
        momentum=0.0,
        eps=1e-5,
        cudnn_enabled=False,
    ),
    "weight_from_an_op": lambda bn, y: F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight * 2, bn.bias, True),
    "parameter_input": lambda bn, y: (
        y
        + F.batch_norm(bn.extra, bn.running_mean, bn.running_var, bn.weight, bn.bias, True).sum((0, 2))[
            None, :, None, None
        ]
    ),
}


class Normalised(nn.Module):
    """A convolution's output normalised the way ``norm`` says."""

    def __init__(self, norm: Callable[[nn.BatchNorm2d, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.norm = norm
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.bn.extra = nn.Parameter(torch.randn(5, 4, 3))  # dims no other op freezes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.bn, self.conv(x)).mean((2, 3))


@pytest.mark.parametrize("on_meta", [True, False], ids=["meta", "real"])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_batch_norm_shortcut_gives_what_the_batch_norm_rule_gives(
    case: str, on_meta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    _same_with_and_without_shortcuts(Normalised(NORM_CASES[case]), torch.randn(2, 3, 6, 6), monkeypatch, on_meta)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_shortcuts_give_what_the_rules_give_on_the_tiny_models(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = TINY_MODELS[name]()
    _same_with_and_without_shortcuts(model, inputs, monkeypatch)


def test_the_fingerprint_sees_a_wrong_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shortcut that forgets to link the parts is caught (the comparison is not vacuous)."""

    def forgetful(tracer: Any, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
        links = list(tracer.graph._links)
        done = shapes._concatenation(tracer, name, args, kwargs, out)
        tracer.graph._links[:] = links
        return done

    monkeypatch.setitem(_core.SHORTCUTS, shapes.cat, forgetful)
    with pytest.raises(AssertionError):
        _same_with_and_without_shortcuts(
            Concatenation(CAT_CASES["list_positional_dim"]).eval(), torch.randn(2, 3, 5, 5), monkeypatch
        )
