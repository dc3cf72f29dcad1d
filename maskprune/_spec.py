"""The pruning spec: which positions of which tensors an export kept, and their original shapes.

A spec is the structure of a pruned model without its weights: small, JSON, versioned. The exported
model carries its own as a plain string attribute (no hook, no buffer: ``torch.jit.script`` keeps it as
a ``str`` constant), which :func:`maskprune.save_pruned` writes next to the weights.

Examples:
    >>> mask = Mask(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), algorithm=L1Norm()).make()
    >>> mask.do_mask(); spec = PruneSpec.of(mask.generate_pruned_model())
    True
    >>> [(t.name, t.shape, [(d, len(k)) for d, k in t.kept]) for t in spec.tensors if t.name == "conv1.weight"]
    [('conv1.weight', (64, 3, 7, 7), [(0, 32)])]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ._attributes import EXPERT_COUNTS, SIZE_ATTRIBUTES, Attributes, is_count_name
from ._export import Plan
from ._hf import CONFIG_FIELDS, DERIVED
from ._layers import norm_widths
from ._walk import ModelIndex
from .errors import SpecError, SpecNotFoundError, first_line

FORMAT = "maskprune-pruned"
FORMAT_VERSION = 3  # 2 added ``attributes`` (module counts set at export), 3 ``removed`` (container entries)
READABLE_VERSIONS = (1, 2, 3)
SPEC_ATTRIBUTE = "maskprune_spec"
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class TensorCut:
    """One parameter or buffer (by its first name): original shape and the kept positions of each pruned dim."""

    module: str
    attr: str
    shape: tuple[int, ...]
    kept: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}" if self.module else self.attr

    @property
    def pruned_shape(self) -> tuple[int, ...]:
        shape = list(self.shape)
        for dim, keep in self.kept:
            shape[dim] = len(keep)
        return tuple(shape)


@dataclass
class PruneSpec:
    """What an export removed, replayable on a fresh copy of the original architecture.

    ``attributes`` holds the counts the export set on modules (``{"blocks.0.attn": {"num_heads": 2}}``,
    ``config.<field>`` for a module's config); ``removed`` the container entries the export deleted
    (``{"model.layers": (3, 5)}``: positions in the original container, depth pruning); ``info`` holds
    free JSON metadata (the CLI records the model name and input shape there).
    """

    architecture: str
    tensors: list[TensorCut]
    attributes: Attributes = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    removed: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_plan(
        cls,
        index: ModelIndex,
        plan: Plan,
        attributes: Attributes | None = None,
        removed: Removed | None = None,
        info: dict[str, Any] | None = None,
    ) -> PruneSpec:
        """The spec of exporting ``index``'s model (still at its original shapes) by ``plan`` (and deleting the
        ``removed`` container entries); ``info``: metadata kept in the spec."""
        model = index.model
        positions: dict[int, tuple[int, ...]] = {}  # an array of kept positions shared by tensors is converted once
        tensors = [
            TensorCut(path, attr, shape, tuple([(int(dim), _positions(keep, positions)) for dim, keep in dims]))
            for path, attr, shape, dims in _planned_tensors(index, plan)
        ]
        spec = cls(
            architecture=architecture_of(model),
            tensors=tensors,
            attributes=dict(attributes or {}),
            info=dict(info or {}),
            removed=_removed(removed),
        )
        earlier = getattr(model, SPEC_ATTRIBUTE, None)  # pruning a pruned model: relative to the first original
        return cls.from_json(earlier).then(spec) if isinstance(earlier, str) else spec

    @classmethod
    def text_of_plan(
        cls,
        index: ModelIndex,
        plan: Plan,
        attributes: Attributes | None = None,
        removed: Removed | None = None,
        info: dict[str, Any] | None = None,
    ) -> str:
        """``from_plan(...).to_json()``, written straight from the plan where ``index``'s model is an original.

        Examples:
            >>> keep, index = [(0, np.array([0, 2]))], ModelIndex(nn.Linear(4, 3))
            >>> text = PruneSpec.text_of_plan(index, {("", "weight"): keep, ("", "bias"): keep})
            >>> text == PruneSpec.from_plan(index, {("", "weight"): keep, ("", "bias"): keep}).to_json()
            True
        """
        model = index.model
        if isinstance(getattr(model, SPEC_ATTRIBUTE, None), str):  # relative to the first original: the long way
            return cls.from_plan(index, plan, attributes, removed, info).to_json()
        rows = _planned_tensors(index, plan)
        attributes, info = dict(attributes or {}), dict(info or {})
        return _json_text(architecture_of(model), rows, attributes, info, FORMAT_VERSION, _removed(removed))

    def then(self, later: PruneSpec) -> PruneSpec:
        """This spec followed by ``later`` (made on the model this one produced), as one spec of the original."""
        if self.removed and (later.tensors or later.removed):
            raise SpecError(
                "pruning again a model whose blocks were removed is not supported: save it with "
                "maskprune.save_pruned and prune the loaded model as a new original"
            )
        cuts = {(t.module, t.attr): t for t in self.tensors}
        for cut in later.tensors:
            key, first = (cut.module, cut.attr), cuts.get((cut.module, cut.attr))
            if first is None:
                cuts[key] = cut
                continue
            kept = dict(first.kept)
            for dim, keep in cut.kept:
                kept[dim] = tuple(kept[dim][i] for i in keep) if dim in kept else keep
            cuts[key] = TensorCut(cut.module, cut.attr, first.shape, tuple(sorted(kept.items())))
        attributes = {path: dict(values) for path, values in self.attributes.items()}
        for path, values in later.attributes.items():
            attributes.setdefault(path, {}).update(values)
        removed = dict(self.removed or later.removed)
        info = dict(self.info)  # how to build the first original; whether the config says the last export's sizes
        if "uniform" in later.info:
            info["uniform"] = later.info["uniform"]
        return PruneSpec(self.architecture, [cuts[key] for key in sorted(cuts)], attributes, info, removed=removed)

    @classmethod
    def of(cls, pruned: nn.Module) -> PruneSpec:
        """The spec an exported (or loaded) model carries."""
        text = getattr(pruned, SPEC_ATTRIBUTE, None)
        if not isinstance(text, str):
            raise SpecError(
                f"this {type(pruned).__name__} carries no pruning spec: pass a model returned by "
                "Mask.generate_pruned_model() or maskprune.load_pruned()"
            )
        return cls.from_json(text)

    def attach(self, pruned: nn.Module) -> None:
        """Record this spec on ``pruned`` (a plain ``str`` attribute)."""
        attach_text(pruned, self.to_json())

    def plan(self) -> Plan:
        return {
            (t.module, t.attr): [(dim, np.asarray(keep, dtype=np.int64)) for dim, keep in t.kept] for t in self.tensors
        }

    def to_json(self) -> str:
        """The spec as compact JSON, as ``json.dumps(..., separators=(",", ":"))`` writes it.

        Shapes and kept positions that several tensors share (a convolution's output channels, its
        batch norm's weight, bias and statistics) are encoded once.
        """
        rows = [(t.module, t.attr, t.shape, t.kept) for t in self.tensors]
        return _json_text(self.architecture, rows, self.attributes, self.info, self.version, self.removed)

    @classmethod
    def from_json(cls, text: str) -> PruneSpec:
        """Parse and check a spec; unknown formats and versions fail with what this maskprune reads."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"the pruning spec is not valid JSON: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SpecError(f"not a maskprune pruning spec (expected a JSON object with format {FORMAT!r})")
        if data.get("version") not in READABLE_VERSIONS:
            raise SpecError(
                f"unknown pruning spec format version {data.get('version')!r}: this maskprune reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade maskprune to load newer files)"
            )
        try:
            tensors = [
                TensorCut(
                    str(t["module"]),
                    str(t["attr"]),
                    tuple(map(int, t["shape"])),
                    tuple((int(d), tuple(map(int, keep))) for d, keep in t["kept"]),
                )
                for t in data["tensors"]
            ]
            attributes = {
                str(path): {str(name): _attribute_value(value) for name, value in values.items()}
                for path, values in data.get("attributes", {}).items()
            }
            removed = {str(path): tuple(map(int, gone)) for path, gone in data.get("removed", {}).items()}
            return cls(str(data["architecture"]), tensors, attributes, dict(data.get("info", {})), removed=removed)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SpecError(f"malformed pruning spec ({type(error).__name__}: {error})") from error


def _attribute_value(value: Any) -> int | tuple[int, ...]:
    """An attribute's value read from JSON: a count, or a shape (``normalized_shape``)."""
    return tuple(map(int, value)) if isinstance(value, list) else int(value)


def attach_text(pruned: nn.Module, text: str) -> None:
    """Record a spec's JSON ``text`` on ``pruned``, where :meth:`PruneSpec.of` reads it (the export writes the text
    straight from its plan, :meth:`PruneSpec.text_of_plan`)."""
    setattr(pruned, SPEC_ATTRIBUTE, text)


_encode = json.JSONEncoder(separators=(",", ":")).encode  # what json.dumps(value, separators=(",", ":")) writes

Row = tuple[str, str, tuple[int, ...], Any]  # module path, attribute, original shape, [(dim, kept positions)]
Removed = Mapping[str, Sequence[int]]  # container path -> positions of the deleted entries


def _removed(removed: Removed | None) -> dict[str, tuple[int, ...]]:
    return {path: tuple(int(i) for i in sorted(gone)) for path, gone in sorted((removed or {}).items())}


def _planned_tensors(index: ModelIndex, plan: Plan) -> list[Row]:
    """The plan's tensors in spec order, with their original shapes; kept positions as the plan holds them."""
    modules = index.modules
    planned = sorted(plan.items())
    return [(path, attr, tuple(getattr(modules[path], attr).shape), dims) for (path, attr), dims in planned]


def _json_text(
    architecture: str,
    rows: list[Row],
    attributes: Attributes,
    info: dict[str, Any],
    version: int,
    removed: Removed | None = None,
) -> str:
    """A spec's JSON from its rows; each shape and each object of kept positions (tuple or array) encoded once."""
    shapes: dict[tuple[int, ...], str] = {}
    positions: dict[int, str] = {}  # by id: one object of kept positions serves the dims of many tensors
    texts = []
    for module, attr, shape, dims in rows:
        shape_text = shapes.get(shape)
        if shape_text is None:
            shape_text = shapes[shape] = _encode(list(shape))
        kept = []
        for dim, keep in dims:
            text = positions.get(id(keep))
            if text is None:
                text = positions[id(keep)] = _encode(keep.tolist() if isinstance(keep, np.ndarray) else keep)
            kept.append(f"[{_encode_atom(int(dim))},{text}]")  # what _encode((dim, keep)) writes
        texts.append(
            f'{{"module":{_encode_atom(module)},"attr":{_encode_atom(attr)},"shape":{shape_text},'
            f'"kept":[{",".join(kept)}]}}'
        )
    return (
        f'{{"format":{_encode(FORMAT)},"version":{_encode(version)},'
        f'"architecture":{_encode(architecture)},"tensors":[{",".join(texts)}],'
        f'"attributes":{_encode(attributes)},"removed":{_encode(_removed(removed))},"info":{_encode(info)}}}'
    )


def _encode_atom(value: Any) -> str:
    """``_encode(value)``, sooner for a ``str`` or an ``int``: what ``_encode`` itself calls for them."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    return int.__repr__(value) if kind is int else _encode(value)


def _positions(keep: Any, converted: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
    """``keep`` (an array or sequence of positions) as a tuple of ints, converted once per object."""
    positions = converted.get(id(keep))
    if positions is None:
        positions = converted[id(keep)] = tuple(np.asarray(keep).tolist())
    return positions


def architecture_of(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_fits(spec: PruneSpec, model: nn.Module) -> None:
    """Raise :class:`SpecError` naming the module when ``model`` is not the architecture ``spec`` was made on, or
    when the spec sets an attribute that an export does not set (:func:`check_attributes`)."""
    if spec.architecture != architecture_of(model):
        raise SpecError(f"the spec was saved from a {spec.architecture}, got a {architecture_of(model)}")
    modules = dict(model.named_modules(remove_duplicate=False))
    check_attributes(spec.attributes, modules)
    for cut in spec.tensors:
        module = modules.get(cut.module)
        if module is None:
            raise SpecError(f"module {cut.module!r} named by the spec is not in the {type(model).__name__} given")
        tensor = module._parameters.get(cut.attr, module._buffers.get(cut.attr))
        if tensor is None:
            raise SpecError(
                f"module {cut.module!r} ({type(module).__name__}) has no parameter or buffer {cut.attr!r}; "
                f"the spec expects one of shape {cut.shape}"
            )
        if tuple(tensor.shape) != cut.shape:
            raise SpecError(
                f"module {cut.module!r}: {cut.attr} has shape {tuple(tensor.shape)}, the spec expects the original "
                f"shape {cut.shape} (build the model with the arguments it was pruned from)"
            )
        if len({dim for dim, _ in cut.kept}) != len(cut.kept):
            raise SpecError(f"module {cut.module!r}: {cut.attr} has a pruned dimension listed twice")
        for dim, keep in cut.kept:
            if not 0 <= dim < len(cut.shape):
                raise SpecError(f"module {cut.module!r}: {cut.attr} has no dimension {dim} (shape {cut.shape})")
            size = cut.shape[dim]
            if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= size:
                raise SpecError(
                    f"module {cut.module!r}: the kept positions of {cut.attr}[dim {dim}] must be increasing, "
                    f"distinct and in [0, {size}), got {len(keep)} positions"
                )
    for path, gone in spec.removed.items():
        container = modules.get(path)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise SpecError(f"the spec removes entries of {path!r}, which is not a ModuleList or Sequential here")
        if not gone or list(gone) != sorted(set(gone)) or gone[0] < 0 or gone[-1] >= len(container):
            raise SpecError(
                f"the spec's removed entries of {path!r} must be increasing, distinct and in [0, {len(container)})"
            )
        if len(gone) == len(container):
            raise SpecError(f"the spec removes every entry of {path!r}")


def check_attributes(attributes: Attributes, modules: Mapping[str, nn.Module]) -> None:
    """Raise :class:`SpecError` unless every attribute is a count an export sets, on a module that has it, no
    larger than the module's.

    Allowed: a count attribute (``num_heads``, ``attn_dim``, ``in_channels`` …: :func:`is_count_name`) of a
    model's own module, a size it keeps for its other methods (``in_chs``, ``out_chs``, ``groups``:
    :data:`~maskprune._attributes.SIZE_ATTRIBUTES`), its expert count (``num_experts``), the width attributes
    of a torch norm layer (``num_features``, ``num_channels``/``num_groups``, ``normalized_shape``), and
    ``config.<field>`` for the config fields an export sets (:data:`~maskprune._hf.CONFIG_FIELDS`) on a module
    with a config. Values are positive integers (a tuple of them for ``normalized_shape``) no larger than what the
    module holds; a config field it leaves out or as None (set from its default) takes any positive integer.

    Examples:
        >>> check_attributes({"0": {"num_features": 4}}, {"0": nn.BatchNorm2d(8)})
        >>> check_attributes({"0": {"eps": 0}}, {"0": nn.BatchNorm2d(8)})
        Traceback (most recent call last):
        ...
        maskprune.errors.SpecError: attributes of module '0' (BatchNorm2d): an export never sets 'eps' ...
    """
    for path, values in attributes.items():
        module = modules.get(path)
        if module is None:
            raise SpecError(f"attributes: module {path!r} named by the spec is not in the model")
        for name, value in values.items():
            where = f"attributes of module {path!r} ({type(module).__name__})"
            if name.startswith("config."):
                _check_config_field(module, name[len("config.") :], value, where)
                continue
            if not _settable(module, name):
                raise SpecError(
                    f"{where}: an export never sets {name!r} (only counts such as num_heads, the widths of norm "
                    "layers and config.<size field>)"
                )
            _check_count(getattr(module, name), value, f"{where}: {name}")


def _settable(module: nn.Module, name: str) -> bool:
    if not name.isidentifier() or name.startswith("_") or not hasattr(module, name):
        return False
    if name in norm_widths(module, 1):
        return True
    own = not type(module).__module__.startswith("torch.")  # torch's layers: their tensors say their sizes
    return own and (is_count_name(name) or name in EXPERT_COUNTS or name in SIZE_ATTRIBUTES)


def _check_count(held: Any, value: Any, where: str) -> None:
    """``value`` is a positive count no larger than ``held`` (element by element for a shape)."""
    if type(held) is int:
        ok = type(value) is int and 1 <= value <= held
    elif isinstance(held, (tuple, list)) and all(type(h) is int for h in held):
        ok = isinstance(value, tuple) and len(value) == len(held)
        ok = ok and all(type(v) is int and 1 <= v <= h for v, h in zip(value, held, strict=False))
    else:
        raise SpecError(f"{where} is a {type(held).__name__}, not a count an export sets")
    if not ok:
        raise SpecError(f"{where}: {value!r} is not a positive count no larger than the model's {held!r}")


def _check_config_field(module: nn.Module, field: str, value: Any, where: str) -> None:
    config = getattr(module, "config", None)
    if config is None or isinstance(config, nn.Module) or not hasattr(config, "__dict__"):
        raise SpecError(f"{where}: config.{field} is set, but the module has no config")
    if field not in CONFIG_FIELDS:
        raise SpecError(
            f"{where}: an export never sets config.{field} (only size fields: {', '.join(sorted(CONFIG_FIELDS))})"
        )
    held = getattr(config, field, None)
    if held is None and (field in DERIVED or hasattr(config, field)):  # a default written out: any count
        if type(value) is not int or value < 1:
            raise SpecError(f"{where}: config.{field}: {value!r} is not a positive count")
        return
    _check_count(held, value, f"{where}: config.{field}")


def as_spec(source: PruneSpec | str | os.PathLike | nn.Module) -> PruneSpec:
    """A spec given as itself, a saved folder (or its ``spec.json``), or a model that carries one."""
    if isinstance(source, PruneSpec):
        return source
    if isinstance(source, nn.Module):
        return PruneSpec.of(source)
    if isinstance(source, (str, os.PathLike)):
        file = Path(source)
        if file.is_dir():
            file = file / SPEC_FILE
        if not file.is_file():
            raise SpecNotFoundError(
                f"no pruning spec at {file} (a folder written by maskprune.save_pruned holds {SPEC_FILE})"
            )
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SpecError(f"cannot read the pruning spec {file}: {first_line(error)}") from error
        return PruneSpec.from_json(text)
    raise TypeError(f"a spec is a PruneSpec, a saved folder or a pruned model, got {type(source).__name__}")
