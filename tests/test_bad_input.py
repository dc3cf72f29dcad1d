"""Bad input: every error has the right type, says what was wrong and what is valid, and changes nothing.

"Changes nothing" means: the same state_dict tensors, the same training flag on
every module, the same hooks (none, before make()), no global module hook and
no torch function mode left active, the same random state, the garbage collector
on or off as it was.
"""

from __future__ import annotations

import copy
import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from maskprune.algorithms import L1Norm, Random
from torch import nn

import maskprune
from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 16, 16)  # the TinyCNN's input


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    modes: dict[str, bool]
    hooks: dict[str, tuple[int, int, int, int]]
    rng: torch.Tensor


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modes={name: m.training for name, m in model.named_modules()},
        hooks={
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
            for name, m in model.named_modules()
        },
        rng=torch.get_rng_state(),
    )


@contextmanager
def leaves_unchanged(model: nn.Module, *, made: bool = False) -> Iterator[None]:
    """The block (which raises inside a ``pytest.raises``) leaves ``model`` as it found it.

    Before make() (``made=False``) that includes having no hook at all.
    """
    before, collector = snapshot(model), gc.isenabled()
    if not made:
        assert all(counts == (0, 0, 0, 0) for counts in before.hooks.values()), "the test model had hooks already"
    yield
    after = snapshot(model)
    assert list(after.state) == list(before.state), "state_dict keys changed"
    for key, value in before.state.items():
        # bit-exact: compared with a copy taken before, and nothing may write to it
        assert after.state[key].shape == value.shape and torch.equal(after.state[key], value), f"{key} changed"
    assert after.modes == before.modes, "training flags changed"
    assert after.hooks == before.hooks, "hooks changed"
    assert torch.equal(after.rng, before.rng), "the random state changed"
    module = torch.nn.modules.module
    assert not module._global_forward_hooks and not module._global_forward_pre_hooks, "a global module hook is left"
    assert not torch._C._is_torch_function_mode_enabled(), "a torch function mode is left active"
    assert gc.isenabled() == collector, "the garbage collector was left switched"


@contextmanager
def fails_cleanly(
    model: nn.Module, error: type[Exception], match: str, *, made: bool = False
) -> Iterator[pytest.ExceptionInfo]:
    """The block raises ``error`` with a message matching ``match``, and leaves ``model`` unchanged."""
    with leaves_unchanged(model, made=made), pytest.raises(error, match=match) as info:
        yield info


@pytest.fixture(params=[False, True], ids=["eval", "train"])
def model(request, tiny_cnn) -> nn.Module:
    """A TinyCNN in eval or in train mode (with one submodule in the other mode, so every flag is checked)."""
    m = tiny_cnn().train(request.param)
    m.bn2.train(not request.param)
    return m


@pytest.fixture
def made(tiny_cnn) -> tuple[nn.Module, Mask]:
    """A made Mask with a ratio of 0.5 and no algorithm, on a TinyCNN in eval mode."""
    m = tiny_cnn()
    return m, Mask(m, X, ratio=0.5).make()


# ---- constructor arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", True, float("nan")], ids=repr)
def test_ratio_outside_zero_one(ratio: object, model: nn.Module) -> None:
    with fails_cleanly(model, ValueError, re.escape(f"ratio must be a number in [0, 1), got {ratio!r}")):
        Mask(model, X, ratio=ratio)


def test_ignore_with_a_typo_suggests_the_close_name(model: nn.Module) -> None:
    with fails_cleanly(model, ValueError, r"ignore: 'layer_conv2' is not a module of the model; did you mean 'conv2'"):
        Mask(model, X, ignore=["layer_conv2"])


def test_ignore_with_a_module_of_another_model(model: nn.Module) -> None:
    with fails_cleanly(model, ValueError, r"ignore: the Conv2d given is not a module of the model"):
        Mask(model, X, ignore=[copy.deepcopy(model.conv2)])


def test_ignore_with_something_else(model: nn.Module) -> None:
    with fails_cleanly(model, TypeError, r"ignore takes modules or qualified module names, got int"):
        Mask(model, X, ignore=[3])


def test_neither_example_inputs_nor_input_shape(model: nn.Module) -> None:
    with fails_cleanly(model, ValueError, r"example_inputs is required .*or input_shape="):
        Mask(model)


def test_both_example_inputs_and_input_shape(model: nn.Module) -> None:
    with fails_cleanly(model, ValueError, r"give example_inputs or input_shape, not both"):
        Mask(model, X, input_shape=(2, 3, 16, 16))


@pytest.mark.parametrize("shape", [(2, 3, 0, 16), (2, 3, 16.0, 16)], ids=["zero", "float"])
def test_input_shape_not_positive_integers(shape: tuple, model: nn.Module) -> None:
    with fails_cleanly(model, ValueError, r"input_shape must be positive integers, got"):
        Mask(model, input_shape=shape)


def test_model_that_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        Mask(lambda x: x, X)


class NoScore:
    pass


class ScoreNotCallable:
    score = 3


@pytest.mark.parametrize("algorithm", [NoScore(), ScoreNotCallable()], ids=["missing", "not_callable"])
def test_algorithm_without_score(algorithm: object, model: nn.Module) -> None:
    name = type(algorithm).__name__
    with fails_cleanly(model, TypeError, rf"algorithm must have a score\(group\) method .*got {name}"):
        Mask(model, X, algorithm=algorithm)


# ---- example inputs the model rejects ---------------------------------------------------------------------
def test_example_inputs_the_model_rejects(model: nn.Module) -> None:
    wrong = torch.randn(2, 4, 16, 16)
    with pytest.raises(RuntimeError) as own:  # the model's own words, to be shown to the user
        copy.deepcopy(model)(wrong)
    mask = Mask(model, wrong)
    with fails_cleanly(model, maskprune.TraceError, "the model rejected the example inputs") as caught:
        mask.make()
    message = str(caught.value)
    assert str(own.value) in message and "expected input[2, 4, 16, 16] to have 3 channels" in message
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(maskprune.NotMadeError):  # the failed make() did not count as made
        _ = mask.groups


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in the middle of the forward")


class FailsMidway(nn.Module):
    """Batch norm statistics, dropout's random numbers and a nested module call happen before the error."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 1), Boom(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.drop(self.bn(self.conv(x))))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_that_raises_midway(train: bool) -> None:
    model = FailsMidway().train(train)
    model.inner.train(not train)
    with fails_cleanly(model, maskprune.TraceError, r"RuntimeError: boom in the middle of the forward"):
        Mask(model, X).make()


COLLECTOR_SEEN: list[bool] = []  # outside the module: its copies (the trace's, the export's) append here too


class CollectorWatch(nn.Module):
    """Notes whether Python's garbage collector is on each time its forward runs (or a copy's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        COLLECTOR_SEEN.append(gc.isenabled())
        return self.head(torch.relu(self.conv(x)))


@pytest.mark.parametrize("enabled", [True, False], ids=["collector-on", "collector-off"])
def test_make_and_export_pause_the_garbage_collector_and_put_it_back(enabled: bool) -> None:
    COLLECTOR_SEEN.clear()
    (gc.enable if enabled else gc.disable)()
    try:
        mask = Mask(CollectorWatch(), X, algorithm=L1Norm(), ratio=0.5).make()
        assert COLLECTOR_SEEN == [False] and gc.isenabled() == enabled  # paused for the trace
        mask.do_mask()
        pruned = mask.generate_pruned_model()
        assert COLLECTOR_SEEN == [False] * 3 and gc.isenabled() == enabled  # and for the verification's forwards
        pruned(X)
        assert COLLECTOR_SEEN[-1] == enabled
    finally:
        gc.enable()


# ---- lifecycle order -------------------------------------------------------------------------------------
BEFORE_MAKE = {
    "do_mask()": lambda mask: mask.do_mask(),
    "groups": lambda mask: mask.groups,
    "generate_pruned_model()": lambda mask: mask.generate_pruned_model(),
}


@pytest.mark.parametrize("what", list(BEFORE_MAKE))
def test_before_make(what: str, model: nn.Module) -> None:
    mask = Mask(model, X, algorithm=L1Norm())
    with fails_cleanly(model, maskprune.NotMadeError, re.escape(f"call make() before {what}")):
        BEFORE_MAKE[what](mask)


def test_do_mask_without_algorithm(made) -> None:
    model, mask = made
    with fails_cleanly(model, ValueError, r"do_mask\(\) needs an algorithm: Mask\(\.\.\., algorithm=", made=True):
        mask.do_mask()
    assert all(g.kept == g.size for g in mask.groups)


class WrongLength(maskprune.Algorithm):
    """One score too many for the groups listed (all groups when None)."""

    def __init__(self, wrong_groups: set[int] | None = None) -> None:
        self.wrong_groups = wrong_groups

    def score(self, group: maskprune.Group) -> torch.Tensor:
        wrong = self.wrong_groups is None or group.index in self.wrong_groups
        return torch.arange(group.size + wrong, dtype=torch.float64)


def test_algorithm_returning_the_wrong_number_of_scores(made) -> None:
    model, mask = made
    mask.algorithm = WrongLength()
    size = mask.groups[0].size
    expected = re.escape(f"WrongLength.score() returned shape ({size + 1},) for group 0; expected ({size},)")
    with fails_cleanly(model, ValueError, expected, made=True):
        mask.do_mask()
    assert all(g.kept == g.size for g in mask.groups)


def test_wrong_number_of_scores_in_a_later_group_changes_nothing(made) -> None:
    model, mask = made
    assert len(mask.groups) >= 2
    mask.algorithm = WrongLength({1})
    with pytest.raises(ValueError, match=r"for group 1; expected"):
        mask.do_mask()
    assert [g.kept for g in mask.groups] == [g.size for g in mask.groups]
    pruned = mask.generate_pruned_model()  # the masked model and its export agree
    assert maskprune.count_parameters(pruned) == maskprune.count_parameters(model)


# ---- nothing to prune ------------------------------------------------------------------------------------
def test_nothing_masked_exports_an_equal_copy(model: nn.Module, leftover_hooks) -> None:
    mask = Mask(model, X, algorithm=L1Norm(), ratio=0.0).make()
    assert mask.do_mask() is False
    assert all(g.kept == g.size for g in mask.groups)
    pruned = mask.generate_pruned_model()
    assert pruned is not model and type(pruned) is type(model)
    assert maskprune.count_parameters(pruned) == maskprune.count_parameters(model)
    assert all(p is not q for p, q in zip(pruned.parameters(), model.parameters(), strict=True))
    assert leftover_hooks(pruned) == []
    model.eval()
    pruned.eval()
    with torch.no_grad():
        # bit-exact: nothing is masked: the copy has the same shapes, so the same kernels run
        torch.testing.assert_close(pruned(X), model(X), rtol=0, atol=0)


def test_nothing_masked_by_hand_exports_an_equal_copy(made) -> None:
    model, mask = made
    pruned = mask.generate_pruned_model()
    assert pruned is not model and type(pruned) is type(model)
    assert maskprune.count_parameters(pruned) == maskprune.count_parameters(model)
    # bit-exact: nothing is masked: the copy has the same shapes, so the same kernels run
    assert maskprune.verify(model, pruned, torch.randn(5, 3, 16, 16)).max_rel == 0


class NoParameters(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2


@pytest.mark.parametrize(
    "build, inputs, reason",
    [
        (lambda: nn.Linear(4, 3), torch.randn(2, 4), r"reaches a model output: weight\[0\]"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), torch.randn(2, 3, 4), r"model output: 1\.weight\[0\]"),
        (NoParameters, torch.randn(2, 4), r"no parameters"),
    ],
    ids=["linear", "flatten_linear", "no_parameters"],
)
def test_model_without_prunable_channel(build, inputs: torch.Tensor, reason: str) -> None:
    model = build()
    with fails_cleanly(model, maskprune.NothingToPruneError, r"the model has no prunable channel \(.*" + reason):
        Mask(model, inputs, algorithm=L1Norm()).make()


# ---- Group.prune ---------------------------------------------------------------------------------------
def test_prune_every_channel_of_a_group(made) -> None:
    model, mask = made
    group = mask.groups[0]
    group.prune([1])
    keep = group.keep
    message = rf"group 0 would lose all {group.size} channels; keep at least one"
    with fails_cleanly(model, ValueError, message, made=True):
        group.prune(range(group.size))
    assert np.array_equal(group.keep, keep) and group.pruned == [1]
    # bit-exact: 0/1 flags
    assert torch.equal(group.mask, torch.as_tensor(keep, dtype=group.mask.dtype))


@pytest.mark.parametrize("channels", [[8], [0, -1], [0, 100]], ids=["size", "negative", "one_of_two"])
def test_prune_channels_out_of_range(channels: list[int], made) -> None:
    model, mask = made
    group = mask.groups[0]
    assert group.size == 8
    bad = [c for c in channels if not 0 <= c < 8]
    with fails_cleanly(model, IndexError, re.escape(f"group 0 has channels 0..7; got {bad}"), made=True):
        group.prune(channels)
    assert group.kept == 8


@pytest.mark.parametrize("channels", [[1.5], "3", [True]], ids=["float", "string", "bool"])
def test_prune_channels_that_are_not_integers(channels: object, made) -> None:
    model, mask = made
    group = mask.groups[0]
    with fails_cleanly(model, TypeError, r"channel", made=True):
        group.prune(channels)
    assert group.kept == group.size


def test_verified_export_on_the_meta_device(tiny_cnn) -> None:
    model = tiny_cnn().to("meta")
    mask = Mask(model, torch.randn(2, 3, 16, 16, device="meta"), algorithm=Random(seed=0)).make()
    mask.do_mask()
    with pytest.raises(maskprune.MaskpruneError, match=r"meta.*verify=False"):
        mask.generate_pruned_model()
