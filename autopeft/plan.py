"""PeftPlan: the whole adaptation of one backbone, the one config every room passes around.

A plan maps block indices to the methods applied to that block, plus global parts (VPT-shallow, partial-k, full,
linear). It builds from specs, (de)serialises to sorted YAML/JSON, counts its trainable parameters in closed form,
applies itself to a timm model through the method registry, and merges or saves the adapted model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from autopeft.backbones import BackboneSpec, is_head_param
from autopeft.errors import AutopeftError, UnsupportedBackbone
from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, spec_from_dict
from autopeft.yamlfile import read_yaml

PLAN_VERSION = 1


def parse_layers(text: str | None, num_blocks: int) -> tuple[int, ...]:
    """Parse `all`, `0-11`, `8,9,10,11` or mixes like `0-3,8` into sorted block indices."""
    if text is None or text.strip().lower() in ("", "all"):
        return tuple(range(num_blocks))
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise AutopeftError(f"--layers '{text}' is not valid; write 'all', a range '0-11' or a list '8,9,10,11'") \
            from None
    bad = sorted(i for i in out if not 0 <= i < num_blocks)
    if bad:
        raise AutopeftError(f"--layers names block(s) {bad} but the backbone has blocks 0-{num_blocks - 1}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class PeftPlan:
    """Per-block method lists plus global parts. Immutable; equal plans build the same model."""

    blocks: dict[int, tuple[MethodSpec, ...]] = field(default_factory=dict)
    global_parts: tuple[MethodSpec, ...] = ()

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def single(cls, spec: MethodSpec, layers: Iterable[int]) -> PeftPlan:
        """A plan of one method: at `layers` for a per-block method, once for a global one."""
        if spec.scope == "global":
            return cls(global_parts=(spec,))
        return cls(blocks={i: (spec,) for i in layers})

    def __post_init__(self) -> None:
        for i, specs in self.blocks.items():
            names = [s.to_dict() for s in specs]
            if any(names.count(n) > 1 for n in names):
                raise AutopeftError(f"block {i} lists the same method entry twice")
            for s in specs:
                if s.scope == "global":
                    raise AutopeftError(f"{s.name} applies to the whole model; put it under 'global', not block {i}")
        for s in self.global_parts:
            if s.scope != "global":
                raise AutopeftError(f"{s.name} is placed per block; put it under 'blocks', not 'global'")

    # -- structure ------------------------------------------------------------------------------------------------

    def groups(self) -> list[tuple[MethodSpec, tuple[int, ...]]]:
        """(spec, blocks) pairs in application order; a spec used on several blocks forms one group."""
        grouped: dict[MethodSpec, list[int]] = {}
        for i in sorted(self.blocks):
            for s in self.blocks[i]:
                grouped.setdefault(s, []).append(i)
        out = [(s, tuple(b)) for s, b in grouped.items()] + [(s, ()) for s in self.global_parts]
        return sorted(out, key=lambda g: (g[0].order, g[0].name, json.dumps(g[0].to_dict(), sort_keys=True)))

    def methods(self) -> list[MethodSpec]:
        return [s for s, _ in self.groups()]

    @property
    def mergeable(self) -> bool:
        return all(s.mergeable for s in self.methods())

    def non_mergeable(self) -> list[str]:
        return sorted({s.name for s in self.methods() if not s.mergeable})

    def merge_blockers(self, spec: BackboneSpec) -> list[str]:
        """Why the plan does not merge into `spec`'s weights (one reason per method group), empty where it does: what
        `--merge` and `export --mergeable` decide on before any training."""
        self.validate(spec)
        reasons = [s.merge_blocker(spec, blocks) for s, blocks in self.groups()]
        return sorted({r for r in reasons if r})

    def mergeable_on(self, spec: BackboneSpec) -> bool:
        return not self.merge_blockers(spec)

    def validate(self, spec: BackboneSpec) -> None:
        bad = sorted(i for i in self.blocks if not 0 <= i < spec.num_blocks)
        if bad:
            raise UnsupportedBackbone(
                f"the plan uses block(s) {bad} but {spec.name} has blocks 0-{spec.num_blocks - 1}; "
                "re-export the plan for this backbone"
            )
        for s, blocks in self.groups():
            s.check(spec, blocks)

    def count(self, spec: BackboneSpec) -> int:
        """Closed-form trainable parameters of the plan, head excluded."""
        self.validate(spec)
        added, unfrozen = 0, set()
        for s, blocks in self.groups():
            parts = s.unfrozen(spec, blocks)
            if parts:
                unfrozen |= parts  # unfreezing methods overlap (norm biases): count their union once
            else:
                added += s.count(spec, blocks)
        return added + spec.unfrozen_params(unfrozen)

    def frozen_prefix(self, spec: BackboneSpec) -> int:
        """How many leading blocks (with the embedding) the plan leaves exactly as pretrained."""
        firsts = [s.first_block(spec, blocks) for s, blocks in self.groups()]
        return max(0, min(firsts, default=spec.num_blocks))

    def short(self) -> str:
        """A compact description, e.g. `lora(rank=8)@0-5 + adaptformer@6-11 + vpt_shallow(length=5)`."""
        parts = []
        for s, blocks in self.groups():
            parts.append(s.short() + (f"@{_ranges(blocks)}" if blocks else ""))
        return " + ".join(parts) if parts else "linear"

    # -- application ----------------------------------------------------------------------------------------------

    def apply(self, model: nn.Module, spec: BackboneSpec,
              slices: dict[tuple[int | None, str], list[Sliceable]] | None = None,
              owners: dict[str, str] | None = None) -> nn.Module:
        """Freeze the backbone, insert every method, leave the head trainable. Changes `model` in place.

        `slices` (a one-shot supernet, `autopeft.supernet`): each method goes in one block at a time, and the
        Sliceable modules it inserts are recorded under (block, method name), (None, name) for a global method.
        `owners`: each parameter a method made trainable, by its final name, is recorded there with the method's
        name (the first method to train a parameter owns it; the head's are left out)."""
        self.validate(spec)
        model.requires_grad_(False)
        owned: dict[int, str] = {}
        for s, blocks in self.groups():
            if slices is None:
                s.apply(model, spec, blocks)
            else:
                for i in blocks or (None,):
                    before = {id(m) for m in model.modules()}
                    s.apply(model, spec, blocks if i is None else (i,))
                    slices[(i, s.name)] = [m for m in model.modules()
                                           if id(m) not in before and isinstance(m, Sliceable)]
            owned.update({id(p): s.name for p in model.parameters() if p.requires_grad and id(p) not in owned})
        for name, p in model.named_parameters():
            if is_head_param(name):
                p.requires_grad_(True)
            elif owners is not None and id(p) in owned:
                owners[name] = owned[id(p)]
        return model

    # -- serialisation --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "blocks": {str(i): [s.to_dict() for s in self.blocks[i]] for i in sorted(self.blocks) if self.blocks[i]},
            "global": [s.to_dict() for s in self.global_parts],
        }

    @classmethod
    def from_dict(cls, data: Any) -> PeftPlan:
        if not isinstance(data, dict):
            raise AutopeftError("a plan must be a mapping with 'version', 'blocks' and 'global' keys")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise AutopeftError(f"plan version {version!r} is not supported (this autopeft reads {PLAN_VERSION})")
        unknown = set(data) - {"version", "blocks", "global"}
        if unknown:
            raise AutopeftError(f"unknown plan key(s): {', '.join(sorted(unknown))}; valid: version, blocks, global")
        blocks: dict[int, tuple[MethodSpec, ...]] = {}
        for key, entries in (data.get("blocks") or {}).items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise AutopeftError(f"plan block key {key!r} is not a block index") from None
            if not isinstance(entries, list):
                raise AutopeftError(f"plan block {key} must hold a list of method entries")
            blocks[index] = tuple(spec_from_dict(e) for e in entries)
        global_parts = tuple(spec_from_dict(e) for e in (data.get("global") or []))
        return cls(blocks=blocks, global_parts=global_parts)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> PeftPlan:
        path = Path(path)
        data = read_yaml(path, "plan file")
        try:
            return cls.from_dict(data)
        except AutopeftError as exc:
            raise AutopeftError(f"{path}: {exc}") from None

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeftPlan) and self.to_json() == other.to_json()


def _ranges(blocks: Sequence[int]) -> str:
    """Block indices as runs: [0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    ordered = list(blocks)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


# -- adapted models ---------------------------------------------------------------------------------------------------


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plan parameters and head: every trainable parameter, detached and contiguous, by name."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file(trainable_state_dict(model), str(path), metadata=metadata)


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Load plan parameters + head saved by `save_adapter` into a model the same plan was applied to."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001  a damaged or foreign file; safetensors raises its own error types
        raise AutopeftError(f"adapter '{path}' is not a readable safetensors file ({' '.join(str(exc).split())[:160]});"
                            " restore it from the run directory it came from") from None
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise AutopeftError(
            f"adapter '{path}' does not match the plan: {len(missing)} missing and {len(unexpected)} unexpected "
            f"tensors (e.g. {sorted(missing or unexpected)[0]})"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise AutopeftError(f"adapter '{path}': {name} has shape {tuple(tensor.shape)}, "
                                    f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def merge_model(model: nn.Module) -> nn.Module:
    """Fold every wrapper into the backbone weights, leaving a plain timm model. Changes `model` in place."""
    wrappers = [m for m in model.modules() if isinstance(m, Wrapper)]
    blocking = sorted({m.method for m in wrappers if type(m).merged is Wrapper.merged})
    if blocking:
        raise AutopeftError(
            f"the plan cannot be merged: {', '.join(blocking)} add(s) modules at inference; "
            "merge needs a plan of mergeable methods only (see `autopeft methods`)"
        )
    with torch.no_grad():
        _merge_children(model)
    if hasattr(model, "autopeft_shared"):
        del model.autopeft_shared
    return model


def _merge_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, Wrapper):
            child = child.merged()
            setattr(module, name, child)
        _merge_children(child)
