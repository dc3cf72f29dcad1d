"""Rules of elementwise ops (activations, arithmetic, comparisons, dropout, casts) and of tensor factories.

Broadcast inputs share the spaces of the dims they align on; ops that are not finite at 0 (a removed
channel's value in the masked model) keep masked values' channels frozen. Meta kernels of the commonest
ones (activations, ``+ - *``, dropout) are ``_meta.FAST_KERNELS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from maskprune._records import TensorNode, TracedSize

from ._core import RANDOM, OpCall, broadcast, only_tensors, rule, shortcut

if TYPE_CHECKING:
    from maskprune._trace import Tracer


_ELEMENTWISE = """
abs absolute acos arccos add addcdiv addcmul angle asin arcsin asinh atan arctan atan2 arctan2 atanh
bitwise_and bitwise_not bitwise_or bitwise_xor bitwise_left_shift bitwise_right_shift ceil celu
clamp clamp_min clamp_max clip clone conj contiguous copy copysign cos cosh deg2rad detach dropout
dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout feature_dropout elu eq erf erfc
erfinv exp exp2 expm1 fill fix floor fmax fmin frac ge gelu greater greater_equal gt hardshrink
hardsigmoid hardswish hardtanh heaviside hypot isfinite isinf isnan isneginf isposinf le leaky_relu
lerp less less_equal log1p logaddexp logical_and logical_not logical_or logical_xor logsigmoid lt
masked_fill maximum minimum mish mul multiply nan_to_num ne neg negative normal not_equal positive
rad2deg real imag relu relu6 requires_grad resolve_conj resolve_neg round rrelu rsub selu sgn
sigmoid sign signbit silu sin sinc sinh softplus softshrink softsign sqrt square sub subtract tan
tanh tanhshrink threshold trunc uniform where zero data bernoulli exponential to type float double
half bfloat16 int long bool short char byte cpu cuda clamp_ zeros_like ones_like empty_like
full_like rand_like randn_like randint_like
""".split()


@rule(*_ELEMENTWISE)
def elementwise(call: OpCall) -> None:
    for out in call.outputs:
        call.set_out(out, broadcast(call, out, call.inputs))


@shortcut(elementwise)
def _unary_elementwise(tracer: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    """An :func:`elementwise` op of one tensor whose output has its shape (activations, dropout): the output
    takes the input's spaces."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return False
    if only_tensors(args, kwargs, 0) is None:
        return False
    node = tracer.node(x)
    tracer.bind(out, TensorNode(node.spaces, tuple(out.shape), node.tainted, node.constant and name not in RANDOM))
    return True


@rule("div", "divide", "true_divide", "floor_divide", "remainder", "fmod", "rdiv", "rfloor_divide", "rremainder")
def division(call: OpCall) -> None:
    """A removed channel is zero in the masked model: as a divisor it would become inf or NaN. Freeze divisors."""
    elementwise(call)
    reflected = call.name.startswith("r") and call.name != "remainder"
    divisor = call.args[0] if reflected else call.arg(1, "other")
    if isinstance(divisor, torch.Tensor) and call.node(divisor).tainted:
        call.claimed -= {(id(divisor), d) for d in range(divisor.dim())}


@rule("pow", "float_power")
def power(call: OpCall) -> None:
    """x ** e is finite at 0 only for e >= 0: other exponents freeze the base's channels."""
    exponent = call.arg(1, "exponent")
    if (isinstance(exponent, (int, float)) and exponent >= 0) or not call.tainted():
        elementwise(call)


@rule("rsqrt", "reciprocal", "log", "log2", "log10", "logit", "lgamma", "acosh", "xlogy")
def not_finite_at_zero(call: OpCall) -> None:
    """Not finite at 0, the value of a removed channel in the masked model: frozen unless unmasked."""
    if not call.tainted():
        elementwise(call)


# ---- tensor factories ----------------------------------------------------------------------------
@rule("new_tensor")
def new_from(call: OpCall) -> None:
    """Only the dtype and device of the input are read; the result is a constant."""
    call.claim_all(call.args[0])


@rule("zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones", "new_empty", "new_full")
def factory(call: OpCall) -> None:
    """A dimension sized by a size read from a tensor (``torch.zeros(n, x.shape[1])``) shares its channels.

    A constant (zeros, ones, full) may take channels from what it meets: its size written in the
    code is recorded as a :class:`SizeSite`. Other dimensions are frozen. For ``new_*`` only the
    dtype and device of the tensor are read.
    """
    args = call.args
    if call.name.startswith("new_"):
        call.claim_all(args[0])
        args = args[1:]
    sizes = call.kwargs.get("size", args[0] if args and isinstance(args[0], (tuple, list)) else args)
    out = call.outputs[0] if call.outputs else None
    if out is None or len(sizes) < out.dim():
        return
    constant = call.name in _CONSTANT_FACTORIES
    spaces: list[int | None] = []
    for d, n in enumerate(list(sizes)[: out.dim()]):
        if isinstance(n, TracedSize) and n == out.shape[d]:
            spaces.append(n.space)
        elif constant and type(n) is int and n > 1 and call.held(n):
            # a constant of any size, its size held in an attribute the export sets: it takes what it meets
            spaces.append(call.graph.new_space(n))
            call.tracer.size_site(n, spaces[-1])
        else:
            spaces.append(None)
    call.set_out(out, spaces)


_CONSTANT_FACTORIES = {"zeros", "ones", "full", "new_zeros", "new_ones", "new_full"}
