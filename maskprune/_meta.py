"""Weightless copies of a model on the meta device, for shape-only runs.

Tracing, the trial export (:mod:`maskprune._probe`) and FLOPs counting only
need shapes. A meta copy holds no data, so running it costs Python overhead
only, never arithmetic: a ResNet-50 trace takes milliseconds instead of a
real forward pass.
"""

from __future__ import annotations

import copy
import itertools
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ._fsdp import plain_class, without_fsdp
from ._walk import ModelIndex, tensors_of


def meta_copy(index: ModelIndex, originals: dict[int, torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of ``index``'s model whose parameters, buffers and tensor attributes live on the meta device
    (ties stay tied).

    ``originals``, when given, is filled with each meta tensor's original, by the meta tensor's ``id``.

    Examples:
        >>> meta_copy(ModelIndex(torch.nn.Linear(4, 3))).weight.device
        device(type='meta')
    """
    memo: dict[int, Any] = {}
    table = index.table
    tensors = itertools.chain(
        (t for t, _ in tensors_of(table)),
        (v for _, m in table for v in vars(m).values() if type(v) not in _PLAIN and isinstance(v, torch.Tensor)),
    )
    for t in tensors:
        if id(t) in memo:
            continue
        meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")  # empty_like is slow
        if _is_parameter(t):
            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
        if originals is not None:
            originals[id(meta)] = t
    return copy_modules(index.model, memo)


def _is_parameter(t: torch.Tensor) -> bool:
    """``isinstance(t, nn.Parameter)``, without its Python ``__instancecheck__`` for the commonest types."""
    kind = type(t)
    return kind is nn.Parameter or (kind is not torch.Tensor and isinstance(t, nn.Parameter))


def copy_modules(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, with the module attributes copied directly (the generic path is slow).

    ``memo`` must map every parameter and buffer (by ``id``) to its copy; other attributes are deep-copied.
    A module ``fully_shard`` made an ``FSDP<Class>`` is copied as a plain ``Class``, without FSDP's hooks and state.
    """
    copies_itself: dict[type, bool] = {}  # by class: has its own __deepcopy__ (or is a ScriptModule)
    classes: dict[type, type] = {}  # by class: the class of its copies

    def copy_one(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        cls = classes.get(type(module))
        if cls is None:
            cls = classes[type(module)] = plain_class(type(module))
        custom = copies_itself.get(cls)
        if custom is None:
            custom = copies_itself[cls] = getattr(cls, "__deepcopy__", None) is not None or isinstance(
                module, torch.jit.ScriptModule
            )
        if custom:
            return copy.deepcopy(module, memo)  # a module that copies itself its own way
        new = cls.__new__(cls)
        memo[id(module)] = new
        state = module.__dict__.copy()  # then each value that is not shared is replaced by its copy
        if "_is_fsdp_managed_module" in state:
            state = without_fsdp(state)
        for key, value in state.items():
            kind = type(value)
            if kind in _EXACT_ATOMS:  # most attributes: flags, sizes, names
                continue
            if kind in _CONTAINERS and not value:  # empty hook dicts, stores and sets
                state[key] = kind()
            elif key in _TENSOR_STORES:
                state[key] = {name: None if t is None else memo[id(t)] for name, t in value.items()}
            elif key == "_modules":
                state[key] = {name: None if m is None else copy_one(m) for name, m in value.items()}
            elif kind is not tuple or not _EXACT_ATOMS.issuperset(map(type, value)):  # a tuple of sizes stays shared
                state[key] = _copy_value(value, memo)
        attributes = vars(new)
        if attributes:  # set by the class's __new__
            attributes.update(state)
        else:
            object.__setattr__(new, "__dict__", state)
        return new

    return copy_one(module)


_ATOMS = (int, float, str, bytes, type(None), torch.dtype, torch.device, type, types.FunctionType)
_EXACT_ATOMS = frozenset((*_ATOMS, bool))  # the same, looked up by exact type first (most attributes are these)
_CONTAINERS = frozenset((dict, OrderedDict, set, list))
_TENSOR_STORES = frozenset(("_parameters", "_buffers"))
_PLAIN = _EXACT_ATOMS | _CONTAINERS | {tuple}  # types of module attributes that are never tensors


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(value, memo)``, short-cut for what most module attributes are: numbers, names, empty hooks."""
    kind = type(value)
    if kind in _EXACT_ATOMS or isinstance(value, _ATOMS):
        return value
    if kind is tuple and all(isinstance(item, _ATOMS) for item in value):
        return value
    if kind in _CONTAINERS and not value:
        return kind()
    return copy.deepcopy(value, memo)


def to_meta(inputs: Any) -> Any:
    """The same nested inputs with every tensor on the meta device."""
    if isinstance(inputs, torch.Tensor):
        return torch.empty_like(inputs, device="meta") if inputs.is_floating_point() else inputs.to("meta")
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        return type(inputs)(*(to_meta(v) for v in inputs))
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_meta(v) for v in inputs)
    if isinstance(inputs, dict):
        return type(inputs)((k, to_meta(v)) for k, v in inputs.items())
    return inputs


def has_meta_tensors(index: ModelIndex) -> bool:
    """Whether a parameter or buffer of ``index``'s model is on the meta device."""
    return any(t.is_meta for t, _ in tensors_of(index.table))


class FastMeta(TorchFunctionMode):
    """Shape-only kernels for the slowest meta ops: the same shape checks, none of the Python decompositions.

    Meta kernels of activations, norms and ``linear`` are Python decompositions (0.5 to 3 ms a call), so
    a weightless forward would spend most of its time there. Only shapes matter here: an activation
    returns an empty tensor like its input (the input itself when in place), a norm or ``linear`` checks
    its parameters' shapes as the real kernel does and returns an empty tensor of the output's shape.
    Convolutions, pooling and ``cat`` compute their output's shape where every argument is plain, training-mode
    dropout returns an empty tensor like its input, an int64 counter stepped in place (``num_batches_tracked``)
    returns itself; anything unusual (and so every error) is left to the real kernel. Everything else, and every
    call on real tensors, runs as usual. ``products=False`` leaves ``linear`` and convolutions to their
    kernels, for a FLOPs counter that must see their products.

    Examples:
        >>> with FastMeta():
        ...     torch.nn.functional.gelu(torch.empty(2, 8, device="meta")).shape
        torch.Size([2, 8])
    """

    def __init__(self, products: bool = True) -> None:
        super().__init__()
        self.fast = FAST_KERNELS if products else {f: k for f, k in FAST_KERNELS.items() if f not in _PRODUCTS}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fast = self.fast.get(func)
        if fast is None or not first_is_meta(args):
            return func(*args, **kwargs)
        out = fast(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


def first_is_meta(args: tuple) -> bool:
    """Whether the first argument, or the first tensor of a first argument that is a list (``cat``), is on meta."""
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    return isinstance(first, torch.Tensor) and first.is_meta


def _like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` on the meta device (whose own is a slow Python decomposition)."""
    if x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _elementwise(inplace: bool) -> Any:
    """``a + b``, ``a * b``, ``a - b`` and their in-place forms, for floating tensors of one dtype and plain numbers.

    Anything else (integer or mixed dtypes, complex numbers, ``out=``) returns NotImplemented: the real kernel runs.
    """

    def run(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        if inplace and _long_step(a, b, args, kwargs):
            return a
        if "out" in kwargs or not _plain_operand(a) or not _plain_operand(b):
            return NotImplemented
        tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
        if any(t.dtype != tensors[0].dtype or not t.is_floating_point() for t in tensors):
            return NotImplemented
        shape = tensors[0].shape if len(tensors) == 1 else _broadcast(tensors[0].shape, tensors[1].shape)
        if inplace:
            if shape != a.shape:
                raise RuntimeError(f"output with shape {list(a.shape)} doesn't match the broadcast shape {list(shape)}")
            return a
        same = next((t for t in tensors if t.shape == shape), None)
        return _like(same) if same is not None else torch.empty(shape, dtype=tensors[0].dtype, device="meta")

    return run


def _long_step(a: Any, b: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``a.add_(b)`` (or ``sub_``, ``mul_``) is an int64 tensor stepped by a small int (a batch norm's
    ``num_batches_tracked.add_(1)``): the result is ``a`` itself."""
    if args or kwargs or type(b) is not int or not -(2**31) < b < 2**31:
        return False
    return isinstance(a, torch.Tensor) and a.dtype == torch.int64 and _plain_operand(a)


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size:
    if a == b:
        return a
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(x != y and x != 1 and y != 1 for x, y in zip(a, b, strict=True)):
        raise RuntimeError(f"The size of tensor a ({list(a)}) must match the size of tensor b ({list(b)})")
    return torch.Size(y if x == 1 else x for x, y in zip(a, b, strict=True))


def _plain_operand(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_meta and (type(x) is torch.Tensor or _is_parameter(x))
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _activation(inplace_at: int | None) -> Any:
    """An activation whose ``inplace`` flag is positional argument ``inplace_at`` (None: never in place)."""

    def run(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        inplace = False
        if inplace_at is not None:
            inplace = kwargs.get("inplace", args[inplace_at - 1] if len(args) >= inplace_at else False)
        return input if inplace else _like(input)

    return run


def _check_numel(name: str, t: torch.Tensor | None, expected: int) -> None:
    if t is not None and t.numel() != expected:
        raise RuntimeError(f"{name} should contain {expected} elements not {t.numel()}")


def _channels(input: torch.Tensor) -> int:
    return input.shape[1] if input.dim() > 1 else 0


def _batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
) -> torch.Tensor:
    channels = _channels(input)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_numel(name, t, channels)
    if training and input.numel() == channels:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    return _like(input)


def _instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5
) -> torch.Tensor:
    channels = _channels(input)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_numel(name, t, channels)
    return _like(input)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    channels = _channels(input)
    if num_groups <= 0 or channels % num_groups:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, "
            f"but got input of shape {tuple(input.shape)} and num_groups={num_groups}"
        )
    _check_numel("weight", weight, channels)
    _check_numel("bias", bias, channels)
    return _like(input)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=None) -> torch.Tensor:
    if isinstance(normalized_shape, int):
        raise TypeError("layer_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, not int")
    shape = tuple(normalized_shape)
    if len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, {', '.join(map(str, shape))}], "
            f"but got input of size{list(input.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, "
                f"but got {name} of shape {list(t.shape)} and normalized_shape = {list(shape)}"
            )
    return _like(input)


def _rms_norm(input, normalized_shape, weight=None, eps=None) -> torch.Tensor:
    return _layer_norm(input, normalized_shape, weight)


def _linear(input, weight, bias=None) -> torch.Tensor:
    if weight.dim() != 2 or input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({input.numel() // max(input.shape[-1], 1)}x{input.shape[-1]} "
            f"and {'x'.join(map(str, weight.shape[::-1]))})"
        )
    if bias is not None and bias.numel() not in (1, weight.shape[0]):
        raise RuntimeError(f"bias should contain {weight.shape[0]} elements not {bias.numel()}")
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _per_dim(value: Any, n: int) -> list[int] | None:
    """A convolution argument (an int, or one or ``n`` ints) as ``n`` ints; None for anything else."""
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, (tuple, list)) or len(values) not in (1, n):
        return None
    if not all(type(v) is int for v in values):
        return None
    return list(values) * n if len(values) == 1 else list(values)


def _conv_shape(input, weight, bias, stride, padding, dilation, groups) -> tuple[int, ...] | None:
    """The output shape of a plain batched convolution; None where the real kernel must check or decide."""
    n = weight.dim() - 2
    operands = (input, weight) if bias is None else (input, weight, bias)
    if not all(_plain_operand(t) and t.dtype == input.dtype for t in operands) or not input.is_floating_point():
        return None
    stride, padding, dilation = _per_dim(stride, n), _per_dim(padding, n), _per_dim(dilation, n)
    if stride is None or padding is None or dilation is None or type(groups) is not int or groups < 1:
        return None
    out_channels = weight.shape[0]
    if input.dim() != n + 2 or out_channels % groups or weight.shape[1] * groups != input.shape[1] or not input.numel():
        return None
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        return None
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        return None
    sizes = []
    for size, k, s, p, d in zip(input.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True):
        span = size + 2 * p - d * (k - 1) - 1
        if span < 0:
            return None
        sizes.append(span // s + 1)
    return (input.shape[0], out_channels, *sizes)


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Any:
    """``conv1d``/``conv2d``/``conv3d``: a contiguous output of the computed shape, as the meta kernel gives."""
    shape = _conv_shape(input, weight, bias, stride, padding, dilation, groups)
    return NotImplemented if shape is None else torch.empty(shape, dtype=input.dtype, device="meta")


def _adaptive_avg_pool2d(input, output_size) -> Any:
    """A contiguous output for a contiguous 3-d or 4-d input with no empty dimension; else NotImplemented."""
    sizes = [output_size] * 2 if isinstance(output_size, int) else output_size
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 2 or not all(s is None or type(s) is int for s in sizes):
        return NotImplemented
    if not _plain_operand(input) or input.dim() not in (3, 4) or not input.numel() or not input.is_contiguous():
        return NotImplemented
    if any(s is not None and s < 0 for s in sizes):
        return NotImplemented
    spatial = [n if s is None else s for s, n in zip(sizes, input.shape[-2:], strict=True)]
    return torch.empty((*input.shape[:-2], *spatial), dtype=input.dtype, device="meta")


def _pool2d_shape(input, kernel_size, stride, padding, dilation, ceil_mode) -> tuple[int, ...] | None:
    """The output shape of a 2-d max or average pooling of a plain 4-d input whose layout is unambiguously
    contiguous; None where the real kernel must check, decide the layout or raise."""
    if not _plain_operand(input) or input.dim() != 4 or not input.is_floating_point() or not input.numel():
        return None
    if not input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last):
        return None  # a channels-last (or both) layout gives a channels-last output: the real kernel decides
    kernel = _per_dim(kernel_size, 2)
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else _per_dim(stride, 2)
    padding, dilation = _per_dim(padding, 2), _per_dim(dilation, 2)
    if kernel is None or stride is None or padding is None or dilation is None or type(ceil_mode) is not bool:
        return None
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        return None
    sizes = []
    for size, k, s, p, d in zip(input.shape[2:], kernel, stride, padding, dilation, strict=True):
        if p > k // 2:
            return None
        out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        if out < 1:
            return None
        sizes.append(out)
    return (*input.shape[:2], *sizes)


def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False) -> Any:
    """``F.max_pool2d`` without indices (its meta kernel is a Python decomposition); else NotImplemented."""
    if return_indices is not False:
        return NotImplemented
    shape = _pool2d_shape(input, kernel_size, stride, padding, dilation, ceil_mode)
    return NotImplemented if shape is None else torch.empty(shape, dtype=input.dtype, device="meta")


def _avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
) -> Any:
    """``F.avg_pool2d`` with a plain (or no) divisor; else NotImplemented."""
    if type(count_include_pad) is not bool or not (divisor_override is None or type(divisor_override) is int):
        return NotImplemented
    if divisor_override == 0:
        return NotImplemented
    shape = _pool2d_shape(input, kernel_size, stride, padding, 1, ceil_mode)
    return NotImplemented if shape is None else torch.empty(shape, dtype=input.dtype, device="meta")


def _dropout(input, p=0.5, training=True, inplace=False) -> Any:
    """``F.dropout`` in training with ``0 < p < 1`` on a non-empty floating input (the meta kernel draws its noise
    in Python); else NotImplemented (in eval mode the real call returns at once)."""
    if training is not True or type(inplace) is not bool or type(p) not in (int, float) or not 0 < p < 1:
        return NotImplemented
    if not _plain_operand(input) or not input.is_floating_point() or not input.numel():
        return NotImplemented
    return input if inplace else _like(input)


def _cat(tensors: Any, dim: int = 0, **kwargs: Any) -> Any:
    """Contiguous tensors of one dtype and one shape but along ``dim``: a contiguous output; else NotImplemented.

    One pass over the parts (DenseNet concatenates up to 32 of them per call).
    """
    if kwargs or not isinstance(tensors, (tuple, list)) or not tensors or type(dim) is not int:
        return NotImplemented
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return NotImplemented
    ndim, dtype, shape = first.dim(), first.dtype, first.shape
    if ndim == 0 or not -ndim <= dim < ndim:
        return NotImplemented
    dim %= ndim
    head, tail = shape[:dim], shape[dim + 1 :]
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not _plain_operand(t) or t.dtype != dtype or not t.is_contiguous():
            return NotImplemented
        size = t.shape
        if len(size) != ndim or size[:dim] != head or size[dim + 1 :] != tail:
            return NotImplemented
        total += size[dim]
    return torch.empty((*head, total, *tail), dtype=dtype, device="meta")


def _grouped_mm(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch._grouped_mm`` of a 2-D input and a 3-D weight (fused experts), whose own meta kernel takes only
    16-bit floats: ``a @ b[0]``, of the output's shape and of the products of every row with its expert's slice
    (what a FLOPs counter counts). Anything else returns NotImplemented."""
    extra = {k: v for k, v in kwargs.items() if k != "offs" and v is not None}  # no bias, no out_dtype
    plain = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not args and not extra
    if not plain or a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[1] or a.dtype != b.dtype:
        return NotImplemented
    if not a.is_floating_point():
        return NotImplemented
    return torch.mm(a, b[0])


# activation -> position of its ``inplace`` argument (None: it has none)
_ACTIVATIONS = {
    F.relu: 1, F.relu6: 1, F.selu: 1, F.silu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.mish: 1,
    F.leaky_relu: 2, F.elu: 2, F.celu: 2, F.hardtanh: 3,
    F.gelu: None, F.softplus: None, F.sigmoid: None, F.tanh: None, torch.sigmoid: None, torch.tanh: None,
    torch.relu: None,
}  # fmt: skip
FAST_KERNELS: dict[Any, Any] = {f: _activation(at) for f, at in _ACTIVATIONS.items()}
FAST_KERNELS.update(
    {
        F.batch_norm: _batch_norm,
        F.instance_norm: _instance_norm,
        F.group_norm: _group_norm,
        F.layer_norm: _layer_norm,
        F.linear: _linear,
        F.adaptive_avg_pool2d: _adaptive_avg_pool2d,
        torch.cat: _cat,
        F.max_pool2d: _max_pool2d,
        F.avg_pool2d: _avg_pool2d,
        F.dropout: _dropout,
        torch.conv1d: _conv,
        torch.conv2d: _conv,
        torch.conv3d: _conv,
    }
)
_PRODUCTS = {F.linear, torch.conv1d, torch.conv2d, torch.conv3d}  # what a FLOPs counter counts
_BINARY = ("add", "mul", "sub")
FAST_KERNELS.update({getattr(torch, name): _elementwise(False) for name in _BINARY})
FAST_KERNELS.update({getattr(torch.Tensor, name): _elementwise(False) for name in _BINARY})
FAST_KERNELS.update({getattr(torch.Tensor, f"__{name}__"): _elementwise(False) for name in _BINARY})
FAST_KERNELS.update({getattr(torch.Tensor, f"__r{name}__"): _elementwise(False) for name in ("add", "mul")})
FAST_KERNELS.update({getattr(torch.Tensor, f"{name}_"): _elementwise(True) for name in _BINARY})
FAST_KERNELS.update({getattr(torch.Tensor, f"__i{name}__"): _elementwise(True) for name in _BINARY})
if hasattr(torch, "_grouped_mm"):
    FAST_KERNELS[torch._grouped_mm] = _grouped_mm
if hasattr(F, "rms_norm"):
    FAST_KERNELS[F.rms_norm] = _rms_norm
