"""Prove that a masked model and its exported model compute the same thing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._records import call_model, evaluating, iter_tensors
from .errors import first_line

if TYPE_CHECKING:
    from .mask import Mask

#: For a module path and its output's number of dims: the kept positions of each dim (None: all kept).
KeepLookup = Callable[[str, int], "list[torch.Tensor | None] | None"]


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: truthy when the two models agree.

    ``max_rel`` is max |soft - hard| / max |hard| over all floating outputs; ``scale`` is max |hard|
    (a comparison of all-zero outputs proves nothing); over several batches, the largest of each.
    ``batch`` names the batch where the models differ, when it is one of ``verify_inputs``.
    """

    max_abs: float
    max_rel: float
    rtol: float
    first_divergence: str | None = None
    problem: str | None = None
    scale: float = 0.0
    batch: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.max_rel <= self.rtol

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        verdict = "equal" if self.ok else "DIFFERENT"
        text = (
            f"{verdict}: max |soft - hard| = {self.max_abs:.3g}, relative {self.max_rel:.3g} (tolerance {self.rtol:g})"
        )
        if self.problem:
            text += f"; {self.problem}"
        if self.first_divergence:
            text += f"; first diverging module: {self.first_divergence}"
        if self.batch:
            text += f"; on {self.batch}"
        return text


def _precision_flags() -> list[object]:
    """The backends whose float32 work may run in reduced precision (TF32 on GPUs, bf16 in oneDNN)."""
    cuda, cudnn, mkldnn = torch.backends.cuda, torch.backends.cudnn, torch.backends.mkldnn
    candidates = [cuda.matmul, getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)]
    candidates += [getattr(mkldnn, name, None) for name in ("matmul", "conv", "rnn")]
    return [backend for backend in candidates if hasattr(backend, "fp32_precision")]


@contextmanager
def full_float32():
    """float32 computed as float32 inside the block: TF32 and oneDNN's bf16 shortcuts off, restored after.

    TF32 (on by default for cuDNN convolutions on Ampere and later GPUs) rounds the inputs of every
    product to 10 bits, so two exact computations of one result differ by 1e-4: a verification in
    float32 must not compare TF32 results. Uses PyTorch's ``fp32_precision`` settings (2.9 and later).
    """
    backends = _precision_flags()
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value


#: The default tolerance of a comparison, by the dtype the outputs are computed in: a few units of the
#: dtype's rounding (bfloat16 keeps 8 bits of mantissa, float16 11) where kernels of other shapes add in
#: another order; float32 and float64 are held to 1e-5 (DESIGN's "soft is hard").
TOLERANCES = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
DEFAULT_RTOL = 1e-5


def tolerance(outputs: list[torch.Tensor]) -> float:
    """The default ``rtol`` for ``outputs``: that of their least precise floating dtype (see :data:`TOLERANCES`).

    Examples:
        >>> tolerance([torch.ones(2), torch.ones(2, dtype=torch.bfloat16)])
        0.03
    """
    found = [TOLERANCES.get(t.dtype, DEFAULT_RTOL) for t in outputs if t.is_floating_point()]
    return max(found, default=DEFAULT_RTOL)


def compare(soft: list[torch.Tensor], hard: list[torch.Tensor], rtol: float | None = None) -> VerifyResult:
    """Max |soft - hard| over all floating outputs, relative to max |hard|; integer outputs must be equal.

    ``rtol``: the tolerance; by default :func:`tolerance` of the outputs' dtypes.
    """
    rtol = tolerance(hard) if rtol is None else rtol

    def failed(problem: str) -> VerifyResult:
        return VerifyResult(float("inf"), float("inf"), rtol, problem=problem)

    if len(soft) != len(hard):
        return failed(f"{len(soft)} outputs vs {len(hard)}")
    max_abs, scale = 0.0, 0.0
    for i, (s, h) in enumerate(zip(soft, hard, strict=True)):
        if s.shape != h.shape:
            return failed(f"output {i} has shape {tuple(s.shape)} vs {tuple(h.shape)}")
        if not (s.is_floating_point() or s.is_complex()):
            if not torch.equal(s, h):
                return failed(f"integer output {i} differs")
            continue
        if s.isnan().any() or h.isnan().any():
            return failed(f"output {i} contains NaN")
        if s.numel():
            hard_double = h.double()
            max_abs = max(max_abs, (s.double() - hard_double).abs().max().item())
            scale = max(scale, hard_double.abs().max().item())
    rel = max_abs / scale if scale > 0 else max_abs
    return VerifyResult(max_abs, rel, rtol, scale=scale)


def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Every output tensor of ``model`` on ``inputs``, in eval mode, without gradients."""
    with torch.no_grad(), evaluating(model):
        return list(iter_tensors(call_model(model, inputs)))


def crashed(error: Exception, rtol: float | None = None) -> VerifyResult:
    """The result for a pruned model that raised instead of returning outputs."""
    problem = f"the pruned model raised {type(error).__name__}: {error}"
    return VerifyResult(float("inf"), float("inf"), DEFAULT_RTOL if rtol is None else rtol, problem=problem)


def verify(
    masked_model: nn.Module,
    pruned_model: nn.Module,
    inputs: Any,
    *,
    rtol: float | None = None,
    within: str | None = None,
    mask: Mask | None = None,
    verify_inputs: list[Any] | None = None,
) -> VerifyResult:
    """Run both models in eval mode on ``inputs`` (and on each batch of ``verify_inputs``) and compare every output.

    When they differ, the result names the first module (in call order) whose
    output differs. Both run in full float32 (TF32 off, see :func:`full_float32`);
    the settings are restored. ``mask``: the :class:`~maskprune.Mask` on
    ``masked_model``, so that a module's masked output is compared with the
    pruned one on the kept channels (without it, only outputs of equal shapes compare).
    ``rtol``: the largest max |soft - hard| / max |hard| accepted; by default it follows the outputs'
    dtype (1e-5 in float32 and float64, see :data:`TOLERANCES`).

    ``within="backbone"`` compares instead the output of every module inside that
    submodule (the masked ones on their kept channels: give ``mask``): the exactness
    of one part of a model whose outputs pass through discrete steps (top-k, NMS),
    where a rounding difference between two near-equal scores may pick another box.

    ``verify_inputs``: more batches, each what ``inputs`` is (a tensor, a tuple of arguments or a dict); a
    forward that branches on tensor values needs batches that take every branch. The result is the first
    batch's that differs (its ``batch`` names it), else the largest differences over all batches.

    Examples:
        >>> model, x = torchvision.models.resnet18(), torch.randn(2, 3, 64, 64)
        >>> mask = Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()
        >>> mask.do_mask(); pruned = mask.generate_pruned_model()
        True
        >>> maskprune.verify(model, pruned, torch.randn(3, 3, 64, 64)).max_rel < 1e-5
        True
        >>> maskprune.verify(model, pruned, x, within="layer1", mask=mask).ok
        True
        >>> maskprune.verify(model, pruned, x, verify_inputs=[torch.randn(1, 3, 32, 32)]).ok
        True
    """
    keeps = mask.selection.output_keeps if mask is not None else None
    batches = [inputs, *check_batches(verify_inputs)]
    if within is None:
        return verify_batches(masked_model, pruned_model, batches, rtol, keeps=keeps)
    results = []
    with full_float32():
        for batch in batches:
            results.append(_verify_within(masked_model, pruned_model, batch, rtol, within, keeps))
            if not results[-1].ok:
                break
    return merged(results)


def check_batches(batches: Any) -> list[Any]:
    """``verify_inputs`` as a list (empty for None): a list or tuple of batches, each what ``inputs`` takes.

    Examples:
        >>> check_batches(None), len(check_batches((torch.ones(1), torch.ones(2))))
        ([], 2)
    """
    if batches is None:
        return []
    if not isinstance(batches, (list, tuple)):
        raise TypeError(
            "verify_inputs takes a list of batches, each what inputs= takes (a tensor, a tuple of arguments or a "
            f"dict); got a {type(batches).__name__}: pass [batch]"
        )
    return list(batches)


def merged(results: list[VerifyResult]) -> VerifyResult:
    """One result for the batches (the inputs, then ``verify_inputs[0]`` …) compared in order, up to the first that
    failed: that one, naming its batch; else the largest differences of all."""
    last = results[-1]
    if not last.ok:
        if len(results) > 1:
            last.batch = f"verify_inputs[{len(results) - 2}]"
        return last
    return VerifyResult(
        max(r.max_abs for r in results),
        max(r.max_rel for r in results),
        max(r.rtol for r in results),
        scale=max(r.scale for r in results),
    )


def verify_batches(
    masked_model: nn.Module,
    pruned_model: nn.Module,
    batches: list[Any],
    rtol: float | None,
    settle: Callable[[], None] | None = None,
    soft: list[torch.Tensor] | None = None,
    keeps: KeepLookup | None = None,
) -> VerifyResult:
    """:func:`verify_outputs` on each batch in turn, up to the first that differs (see :func:`merged`); ``soft``
    is the first batch's masked outputs, where the caller computed them."""
    results = []
    for k, batch in enumerate(batches):
        results.append(verify_outputs(masked_model, pruned_model, batch, rtol, settle, soft if k == 0 else None, keeps))
        if not results[-1].ok:
            break
    return merged(results)


def float32_outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """``model``'s outputs as a verification computes them: :func:`outputs` in full float32 (no TF32)."""
    with full_float32():
        return outputs(model, inputs)


def verify_outputs(
    masked_model: nn.Module,
    pruned_model: nn.Module,
    inputs: Any,
    rtol: float | None,
    settle: Callable[[], None] | None = None,
    soft: list[torch.Tensor] | None = None,
    keeps: KeepLookup | None = None,
) -> VerifyResult:
    """:func:`verify` on the models' outputs; ``settle``, when given, is called where they differ, and the masked
    model runs again before the verdict (the export's masked weights zeroed only where written to, then all).

    ``soft``: the masked model's :func:`float32_outputs`, where the caller computed them first. The export
    does, before it makes the pruned copy: the copy's tensors then take memory that the masked forward's
    activations freed, rather than fresh memory, which costs a page fault per page on a CPU.
    ``keeps``: where the masked model's channels are kept (to name the first diverging module).

    Examples:
        >>> model = torch.nn.Linear(3, 2)
        >>> verify_outputs(model, model, torch.randn(4, 3), 1e-5).max_abs
        0.0
    """
    with full_float32():
        if soft is None:
            soft = outputs(masked_model, inputs)
        try:
            hard = outputs(pruned_model, inputs)
        except Exception as error:  # noqa: BLE001 - a pruned model that crashes differs
            result = crashed(error, rtol)
        else:
            result = compare(soft, hard, rtol)
            if not result.ok and settle is not None:
                settle()
                result = compare(outputs(masked_model, inputs), hard, rtol)
        if not result.ok:
            result.first_divergence = _first_divergence(masked_model, pruned_model, inputs, rtol, keeps)
        return result


def _record(model: nn.Module, inputs: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    """First output of every module, in completion order; and the module that raised, if one did.

    A module held under several paths (Ultralytics' one ``nn.SiLU`` for every ``Conv``) is left out: its calls
    see different channel spaces, none of them its own, and each call's output is its caller's output too.
    """
    outputs: dict[str, torch.Tensor] = {}
    paths = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {id(m): n for n, m in model.named_modules() if paths[id(m)] == 1}
    running: list[str] = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        running.append(names.get(id(module), ""))

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        running.pop()
        name = names.get(id(module))
        first = next(iter_tensors(output), None)
        if name and first is not None and name not in outputs:
            outputs[name] = first.detach().clone()

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
        torch.nn.modules.module.register_module_forward_hook(hook),
    ]
    try:
        with torch.no_grad(), evaluating(model):
            call_model(model, inputs)
    except Exception as error:  # noqa: BLE001 - name the module that raised
        failing = next((n for n in reversed(running) if n), "<root>")
        return outputs, f"{failing} (raised {first_line(error)})"
    finally:
        for handle in handles:
            handle.remove()
    return outputs, None


def _kept(lookup: KeepLookup | None, name: str, soft: torch.Tensor) -> torch.Tensor:
    """The masked module's output on the channels the pruned module kept."""
    keeps = lookup(name, soft.dim()) if lookup else None
    for dim, keep in enumerate(keeps or ()):
        if keep is not None:
            soft = soft.index_select(dim, keep.to(soft.device))
    return soft


def _differs(rtol: float | None, module: str, problem: str) -> VerifyResult:
    rtol = DEFAULT_RTOL if rtol is None else rtol
    return VerifyResult(float("inf"), float("inf"), rtol, first_divergence=module, problem=problem)


def _verify_within(
    masked: nn.Module, pruned: nn.Module, inputs: Any, rtol: float | None, within: str, lookup: KeepLookup | None
) -> VerifyResult:
    if not within or within not in dict(masked.named_modules()):
        children = ", ".join(repr(name) for name, _ in masked.named_children())
        raise ValueError(f"verify(within={within!r}): not a submodule of the masked model (its children: {children})")
    soft, _ = _record(masked, inputs)
    hard, raised = _record(pruned, inputs)
    if raised:
        return _differs(rtol, raised, "the pruned model raised")
    result = VerifyResult(0.0, 0.0, DEFAULT_RTOL if rtol is None else rtol)
    for name in (n for n in soft if n == within or n.startswith(within + ".")):
        s, h = _kept(lookup, name, soft[name]), hard.get(name)
        if h is None or s.shape != h.shape:
            got = "no output" if h is None else f"output shape {tuple(h.shape)}"
            return _differs(rtol, name, f"{got}, expected {tuple(s.shape)}")
        one = compare([s], [h], rtol)
        if one.problem:
            return _differs(rtol, name, one.problem)
        result.max_abs, result.max_rel = max(result.max_abs, one.max_abs), max(result.max_rel, one.max_rel)
        result.scale = max(result.scale, one.scale)
        result.rtol = max(result.rtol, one.rtol)  # one module's dtype may be less precise than another's
        if not one.ok and result.first_divergence is None:
            result.first_divergence = f"{name} (relative difference {one.max_rel:.3g})"
    return result


def _first_divergence(
    masked: nn.Module, pruned: nn.Module, inputs: Any, rtol: float | None, lookup: KeepLookup | None
) -> str | None:
    soft, _ = _record(masked, inputs)
    hard, raised = _record(pruned, inputs)
    for name, s in soft.items():
        h = hard.get(name)
        if h is None:
            continue
        s = _kept(lookup, name, s)
        if s.shape != h.shape:
            if lookup:
                return f"{name} (output shape {tuple(h.shape)}, expected {tuple(s.shape)})"
            continue
        result = compare([s], [h], rtol)
        if not result.ok:
            return f"{name} (relative difference {result.max_rel:.3g})"
    return raised
