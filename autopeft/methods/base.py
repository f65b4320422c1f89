"""The method interface, the registry and the module-wrapping helpers every method builds on.

A method is one frozen dataclass (its MethodSpec) that registers itself under its name and owns everything about
the method: option validation, closed-form parameter count, insertion into a timm model, initialisation and merge.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from autopeft.backbones import BackboneSpec
from autopeft.errors import AutopeftError, UnsupportedBackbone

_REGISTRY: dict[str, type[MethodSpec]] = {}

TARGET_LAYERS = ("q", "k", "v", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Base of every method's options. Subclasses are frozen dataclasses registered with `@register`.

    Class attributes describe the method; instance fields are its options.
    """

    name: ClassVar[str] = ""
    category: ClassVar[str] = ""  # "partial" or "addition", as the survey sorts them
    families: ClassVar[tuple[str, ...]] = ("vit", "swin", "eva")
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    scope: ClassVar[str] = "block"  # "block": placed per block; "global": applies to the model as a whole
    order: ClassVar[int] = 50  # application order: lower first (unfreezing before inner wrappers before outer)
    # The integer option that sets the method's size (LoRA rank, adapter dim, prompt length, ...); None: unsized.
    size_option: ClassVar[str | None] = None
    # The AdamW peak learning rates the method wants on the reference schedule (autopeft.learning_rate: 100 epochs,
    # batch 64, ViT-B/16 on VTAB-1k), a decade wide around the rate its published tuning prefers. From
    # PETL_Vision's tuning of 14 methods on the 19 VTAB-1k tasks (lr {1e-3, 1e-2} × wd × size, 100 epochs): a
    # method most tasks tuned to 1e-2 is centred there (linear, VPT-shallow), one most tuned to 1e-3 at 1e-3 (LoRA,
    # SSF, LN-tune, FacT), one the tasks split on at 3e-3 (VPT-deep, BitFit, AdaptFormer, Convpass); see README.
    lr_range: ClassVar[tuple[float, float]] = (3e-4, 3e-3)
    # Whether its modules run inside a one-shot supernet (autopeft.supernet): built once at the `cover` of a space's
    # option values, each module (a `Sliceable`) runs at any smaller size or options, or not at all.
    sliceable: ClassVar[bool] = False

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        """Closed-form number of trainable parameters this method adds or unfreezes at `blocks`."""
        return spec.unfrozen_params(self.unfrozen(spec, blocks))

    def unfrozen(self, spec: BackboneSpec, blocks: Sequence[int]) -> set[tuple[str, int]]:
        """Existing backbone parameter groups this method makes trainable (see BackboneSpec.unfrozen_params).

        Methods that only add new parameters return the empty set and override `count`.
        """
        return set()

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        """Closed-form inference FLOPs (2 × multiply-adds per image) this method adds at `blocks` once merged.

        0 by default: methods that merge into the weights or only unfreeze them cost nothing at inference. Methods
        that keep modules or tokens at inference override it.
        """
        return 0

    def merge_blocker(self, spec: BackboneSpec, blocks: Sequence[int]) -> str | None:
        """Why this method at `blocks` does not merge into this backbone's weights, or None where it does.

        Mergeability depends on the backbone (a shift needs a bias to fold into): methods that merge on some
        backbones only override this; the class attribute `mergeable` says whether it can merge at all."""
        return None if self.mergeable else f"{self.name} adds modules at inference"

    def first_block(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        """The first block whose input or weights this method changes (-1: the embedding is trained too).

        Blocks before it compute the same features as the pretrained backbone, so training may cache them.
        """
        return min(blocks) if blocks else 0

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        """Insert the method into `model` (already frozen) at `blocks`; new parameters are trainable."""
        raise NotImplementedError

    @classmethod
    def cover(cls, values: Mapping[str, Sequence[Any]]) -> MethodSpec:
        """The spec whose modules can run the method at every combination of `values` (option -> the values a space
        may choose; an option left out keeps its default): its modules are built once at it and sliced.

        Raises AutopeftError for a method whose modules cannot be sliced or switched off."""
        if not cls.sliceable:
            raise AutopeftError(f"method '{cls.name}' cannot run inside a one-shot supernet: its modules cannot be "
                                "sliced or switched off per block")
        return make_spec(cls.name, {k: cls.cover_option(k, tuple(v)) for k, v in values.items() if len(v)})

    @classmethod
    def cover_option(cls, option: str, values: tuple[Any, ...]) -> Any:
        """The value of `option` in the cover of `values`: the largest size; for another option the first value (an
        option that shapes no weight: the active spec's own value is used when a slice runs). Methods with options
        that shape their modules (LoRA's targets, the adapter's position) override it."""
        return max(values) if option == cls.size_option else values[0]

    @property
    def size(self) -> int | None:
        """The value of the size option, None for a method without one."""
        return None if self.size_option is None else int(getattr(self, self.size_option))

    def check(self, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        """Raise UnsupportedBackbone when this method cannot go on this backbone (family, sizes)."""
        if spec.family not in self.families:
            raise UnsupportedBackbone(
                f"method '{self.name}' does not support {spec.family} backbones ({spec.name}); "
                f"it supports: {', '.join(self.families)}"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def short(self) -> str:
        """A compact label such as `lora(r=4,qv)` for tables and plots."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            if isinstance(value, tuple):  # q,v targets read `qv`; longer names keep a separator: `fc1+fc2`
                value = ("" if all(len(str(v)) == 1 for v in value) else "+").join(map(str, value))
            parts.append(f"{f.name}={value}")
        return f"{self.name}({','.join(parts)})" if parts else self.name


def register(cls: type[MethodSpec]) -> type[MethodSpec]:
    """Class decorator: register a MethodSpec subclass under its `name`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name missing or registered twice: {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[type[MethodSpec]]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_method(name: str) -> type[MethodSpec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AutopeftError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def size_of(entry: dict[str, Any]) -> int | None:
    """The size of a method entry (a plan's `{method: ..., options}` mapping): the value of its method's size option.

    None for a method without a size option, an unknown method or a size that is not an integer; a size option the
    entry leaves out takes the method's default.
    """
    cls = _REGISTRY.get(str(entry.get("method", "")))
    if cls is None or cls.size_option is None:
        return None
    if cls.size_option in entry:
        value = entry[cls.size_option]
    else:
        value = next(f.default for f in dataclasses.fields(cls) if f.name == cls.size_option)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _field_types(cls: type[MethodSpec]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(cls: type[MethodSpec], key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise AutopeftError(f"{cls.name}: option '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}") \
            from None


def make_spec(name: str, options: dict[str, Any] | None = None) -> MethodSpec:
    """Build a validated MethodSpec from a method name and options (strings from the CLI or YAML values)."""
    cls = get_method(name)
    types = _field_types(cls)
    options = dict(options or {})
    options.pop("method", None)
    unknown = sorted(set(options) - set(types))
    if unknown:
        valid = ", ".join(types) or "none"
        raise AutopeftError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    kwargs = {k: _coerce(cls, k, v, types[k]) for k, v in options.items()}
    return cls(**kwargs)


def spec_from_dict(data: dict[str, Any]) -> MethodSpec:
    if not isinstance(data, dict) or "method" not in data:
        raise AutopeftError(f"a method entry must be a mapping with a 'method' key, got {data!r}")
    return make_spec(str(data["method"]), {k: v for k, v in data.items() if k != "method"})


def require(cond: bool, method: str, message: str) -> None:
    """Validation helper for `__post_init__`: raise AutopeftError naming the method."""
    if not cond:
        raise AutopeftError(f"{method}: {message}")


def require_fits(cond: bool, method: str, message: str) -> None:
    """Validation helper for `check`: raise UnsupportedBackbone naming the method."""
    if not cond:
        raise UnsupportedBackbone(f"{method}: {message}")


def check_targets(method: str, targets: tuple[str, ...], allowed: tuple[str, ...] = TARGET_LAYERS) -> None:
    require(len(targets) > 0, method, f"targets must name at least one of {', '.join(allowed)}")
    bad = [t for t in targets if t not in allowed]
    require(not bad, method, f"unknown target(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
    require(len(set(targets)) == len(targets), method, "targets must not repeat")


# ----------------------------------------------------------------------------------------------------------------
# Wrapping: methods change a timm model by replacing a submodule with a wrapper that holds the original as `base`.


class Wrapper(nn.Module):
    """A module that adds behaviour around `base`. Mergeable wrappers override `merged()`."""

    method: ClassVar[str] = ""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def merged(self) -> nn.Module:
        """A plain module computing the same function with this wrapper's parameters folded in."""
        raise AutopeftError(f"{self.method} does not merge into the backbone weights")


class Sliceable:
    """A module a sliceable method inserts: built at the cover of a space's options, it runs as the module the same
    method would insert at a smaller spec (`set_active(spec)`: the first rows, columns or tokens of its weights) or
    not at all (`set_active(None)`: its inner module alone). Built outside a supernet it runs as built.

    `sliced_state()` gives the parameters (its own, not its inner module's) that the module built alone at the active
    spec holds, under that module's names: loaded there, it computes what the slice computes."""

    def set_active(self, spec: MethodSpec | None) -> None:
        raise NotImplementedError

    def sliced_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def fits(method: str, built: int, size: int) -> int:
    """`size`, checked against the size a Sliceable was `built` at."""
    if size > built:
        raise AutopeftError(f"{method}: a slice of size {size} is larger than the {built} its module was built at")
    return size


def unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, Wrapper):
        module = module.base
    return module


def merged_base(wrapper: Wrapper) -> nn.Module:
    """The wrapper's inner module with any inner wrappers already merged."""
    return wrapper.base.merged() if isinstance(wrapper.base, Wrapper) else wrapper.base


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def wrap(model: nn.Module, path: str, factory: Callable[..., nn.Module]) -> nn.Module:
    """Replace the module at `path` with `factory(current_module)` and return the new module.

    `factory` is called with the module alone; it is typed `Callable[..., ...]` because callers pass lambdas that
    bind loop values as default arguments (`lambda m, d=d: ...`), which mypy cannot match to a one-argument type.
    """
    new = factory(model.get_submodule(path))
    replace_submodule(model, path, new)
    return new
