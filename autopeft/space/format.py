"""Search-space files: YAML read with `yaml.safe_load`, validated against the method registry on load.

A space names methods only as registry names and options only as fields of their MethodSpec, so it cannot name code
to import. Every error names the file, the key and the problem. See `autopeft/search_spaces/unified.yaml` for a
commented example of the format.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from autopeft.errors import AutopeftError, UnknownKey
from autopeft.methods import MethodSpec, get_method, make_spec
from autopeft.space.domain import Domain, Fail, number, parse_range
from autopeft.yamlfile import read_yaml

FORMAT_VERSION = 1
NONE = "none"
MODES = ("block", "group", "depth")
SIDES = ("first", "last")
TOP_KEYS = ("version", "name", "description", "insertion", "slots", "global", "methods", "training", "mergeable_only",
            "fill")
FILL_PARAM = "budget.fill"  # the share of the budget a plan spends, asked before the plan's own decisions
_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodSpace:
    """One method of a space and the domain of each option it declares (undeclared options keep their default)."""

    name: str
    options: tuple[tuple[str, Domain], ...] = ()

    @property
    def cls(self) -> type[MethodSpec]:
        return get_method(self.name)

    def searched(self) -> tuple[tuple[str, Domain], ...]:
        return tuple((k, d) for k, d in self.options if d.searched)

    def fixed(self) -> dict[str, Any]:
        return {k: d.value for k, d in self.options if not d.searched}

    def domain(self, option: str) -> Domain:
        return dict(self.options)[option]


@dataclass(frozen=True)
class Slot:
    """A per-block (or per-group) choice among methods; `none` among the choices lets the slot stay empty."""

    name: str
    choices: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, validated search space (independent of any backbone; see `bind` for one backbone)."""

    name: str
    source: str
    description: str
    mode: str
    group_size: int
    depths: tuple[int, ...]
    sides: tuple[str, ...]
    slots: tuple[Slot, ...]
    global_choices: tuple[str, ...]
    methods: tuple[MethodSpace, ...]
    training: tuple[tuple[str, Domain], ...]
    mergeable_only: bool
    # budget-share sizing (depth insertion only): each chosen sized component's share weight; its size follows
    # from its share of the budget (autopeft.space.shares); empty: sizes are drawn and repaired
    shares: tuple[int, ...] = ()
    # the share of the budget a plan spends, one decision asked before the plan's (`FILL_PARAM`): a fixed value,
    # choices or a range within (0, 1]; None: no fill, the budget is a cap only (autopeft.space.sampler)
    fill: Domain | None = None

    def lowest_fill(self) -> float:
        """The smallest share of the budget a plan of this space may be fitted to (1 without `fill`)."""
        if self.fill is None:
            return 1.0
        return float(self.fill.low if self.fill.kind == "float" else min(self.fill.values))

    def fill_of(self, count: int, limit: int) -> float | None:
        """The fill under which a plan of `count` parameters trains unshrunk: its share `count / limit` snapped to
        the fill domain (choices: the smallest one at least the share, else the largest; a range: the share
        clipped to it; fixed: its value); None without `fill`."""
        if self.fill is None:
            return None
        share = count / limit
        if self.fill.kind == "float":
            return min(max(share, float(self.fill.low)), float(self.fill.high))
        values = sorted(self.fill.values)
        return next((v for v in values if v >= share), values[-1])

    def method(self, name: str) -> MethodSpace:
        for m in self.methods:
            if m.name == name:
                return m
        return MethodSpace(name)

    def method_names(self) -> list[str]:
        names = [c for s in self.slots for c in s.choices] + list(self.global_choices) + self.components()
        return list(dict.fromkeys(n for n in names if n != NONE))

    def components(self) -> list[str]:
        """Depth mode: the block-scope methods, each placed on its own first/last d blocks."""
        if self.mode != "depth":
            return []
        return [m.name for m in self.methods if m.cls.scope == "block"]


def fill_target(fill: float, limit: int) -> int:
    """The parameters a plan is fitted to under `fill` of a budget of `limit`: floor(fill × limit) (a count whose
    share is `fill` gets itself back despite rounding)."""
    return min(limit, math.floor(fill * limit + 1e-6))


# -- loading -------------------------------------------------------------------------------------------------------


def shipped_dir() -> Path:
    return Path(str(resources.files("autopeft") / "search_spaces"))


def list_spaces() -> list[str]:
    """Names of the search spaces shipped with autopeft."""
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def load_space(ref: str | Path) -> SearchSpace:
    """Load a shipped space by name (`unified`) or a space file by path."""
    text = str(ref)
    path = Path(text).expanduser()
    if not path.is_file():
        if "/" in text or text.endswith((".yaml", ".yml")):
            raise AutopeftError(f"search space file '{text}' does not exist")
        path = shipped_dir() / f"{text}.yaml"
        if not path.is_file():
            raise AutopeftError(f"unknown search space '{text}'; shipped spaces: {', '.join(list_spaces())}, "
                                "or pass a YAML file")
    data = read_yaml(path, "search space file")
    return parse_space(data, str(path), default_name=path.stem)


def parse_space(data: Any, source: str, default_name: str = "space") -> SearchSpace:
    """Validate the content of a space file. `source` names the file in error messages."""

    def fail(key: str, problem: str) -> typing.NoReturn:
        raise AutopeftError(f"{source}: {key}: {problem}")

    if not isinstance(data, dict):
        fail("(top level)", "a search space must be a mapping with 'slots' or 'methods'")
    unknown = sorted(map(str, set(data) - set(TOP_KEYS)))
    if unknown:
        fail(unknown[0], f"unknown key; valid keys: {', '.join(TOP_KEYS)}")
    if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        fail("version", f"{data['version']!r} is not supported (this autopeft reads version {FORMAT_VERSION})")
    name = data.get("name", default_name)
    description = data.get("description", "")
    if not isinstance(name, str) or not name.strip() or not isinstance(description, str):
        fail("name", "name and description must be text")
    mode, group_size, depths, sides, shares = _insertion(data.get("insertion", "block"), fail)

    methods = []
    raw_methods = data.get("methods") or {}
    if not isinstance(raw_methods, dict):
        fail("methods", "must map method names to their options")
    for mname, raw in raw_methods.items():
        methods.append(_method_space(str(mname), raw, f"methods.{mname}", fail))

    slots = []
    raw_slots = data.get("slots")
    if mode == "depth":
        if raw_slots:
            fail("slots", "depth insertion places every method of 'methods' on its own depth; remove 'slots'")
    else:
        if not isinstance(raw_slots, dict) or not raw_slots:
            fail("slots", "must map slot names to lists of methods (e.g. tune: [none, lora, ssf])")
        for sname, choices in raw_slots.items():
            if not isinstance(sname, str) or not _IDENT.match(sname):
                fail(f"slots.{sname}", "slot names are lower-case identifiers")
            slots.append(Slot(sname, _choices(choices, f"slots.{sname}", "block", fail)))
    global_choices = _choices(data["global"], "global", "global", fail) if data.get("global") else ()

    used = [c for s in slots for c in s.choices if c != NONE]
    for c in set(used):
        if used.count(c) > 1:
            fail("slots", f"method '{c}' appears in more than one slot; a method belongs to one slot")
    declared = {m.name for m in methods}
    for m in methods:
        if mode != "depth" and m.name not in used and m.name not in global_choices:
            fail(f"methods.{m.name}", "is declared but no slot or 'global' offers it; add it to one or remove it")
        if mode == "depth" and m.cls.scope == "global" and m.name not in global_choices:
            fail(f"methods.{m.name}", "applies to the whole model; offer it under 'global'")
    methods += [MethodSpace(n) for n in dict.fromkeys(used + list(global_choices)) if n != NONE and n not in declared]

    mergeable_only = data.get("mergeable_only", False)
    if not isinstance(mergeable_only, bool):
        fail("mergeable_only", f"must be true or false, got {mergeable_only!r}")
    space = SearchSpace(
        name=name.strip(), source=source, description=" ".join(description.split()), mode=mode,
        group_size=group_size, depths=depths, sides=sides, slots=tuple(slots), global_choices=global_choices,
        methods=tuple(methods), training=_training(data.get("training") or {}, source, fail),
        mergeable_only=mergeable_only, shares=shares, fill=_fill(data["fill"], fail) if "fill" in data else None,
    )
    if not space.method_names():
        fail("methods" if mode == "depth" else "slots", "the space offers no method")
    if mergeable_only:
        bad = [n for n in space.method_names() if not get_method(n).mergeable]
        if bad:
            fail("mergeable_only", f"{', '.join(bad)} do(es) not merge into the backbone; remove them from the space")
    return space


def _insertion(raw: Any, fail: Fail) -> tuple[str, int, tuple[int, ...], tuple[str, ...], tuple[int, ...]]:
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, dict):
        fail("insertion", f"must be one of {', '.join(MODES)} or a mapping with 'mode'")
    mode = raw.get("mode", "block")
    allowed = {"block": {"mode"}, "group": {"mode", "size"}, "depth": {"mode", "depths", "side", "shares"}}.get(mode)
    if allowed is None:
        fail("insertion.mode", f"{mode!r} is not one of {', '.join(MODES)}")
    extra = sorted(map(str, set(raw) - allowed))
    if extra:
        fail(f"insertion.{extra[0]}", f"not valid for mode {mode}; valid keys: {', '.join(sorted(allowed))}")
    size, sides = 1, ("first",)
    depths: tuple[int, ...] = ()
    shares: tuple[int, ...] = ()
    if mode == "group":
        raw_size = raw.get("size")
        if isinstance(raw_size, bool) or not isinstance(raw_size, int) or raw_size < 1:
            fail("insertion.size", f"group insertion needs a positive whole 'size' (blocks per group), got "
                                   f"{raw_size!r}")
        size = raw_size
    if mode == "depth":
        values = raw.get("depths")
        if not isinstance(values, list) or not values:
            fail("insertion.depths", "depth insertion needs a non-empty list of depths (numbers of blocks)")
        depths = tuple(int(number(v, "insertion.depths", True, fail)) for v in values)
        if any(d < 0 for d in depths) or len(set(depths)) != len(depths):
            fail("insertion.depths", f"depths must be distinct and >= 0, got {list(depths)}")
        side = raw.get("side", "first")
        sides = tuple(side) if isinstance(side, list) else (side,)
        if not sides or any(s not in SIDES for s in sides) or len(set(sides)) != len(sides):
            fail("insertion.side", f"must be first, last or [first, last], got {side!r}")
        if "shares" in raw:
            values = raw["shares"]
            if not isinstance(values, list) or not values:
                fail("insertion.shares", "must be a non-empty list of whole share weights, e.g. [1, 2, 4]")
            shares = tuple(int(number(v, "insertion.shares", True, fail)) for v in values)
            if any(w < 1 for w in shares) or len(set(shares)) != len(shares):
                fail("insertion.shares", f"share weights must be distinct whole numbers >= 1, got {list(shares)}")
    return mode, size, depths, sides, shares


def _fill(raw: Any, fail: Fail) -> Domain:
    """`fill`: a share of the budget in (0, 1], a list of such shares or a range {low, high, log?}."""

    def share(value: Any, where: str) -> float:
        value = float(number(value, where, False, fail))
        if not 0 < value <= 1:
            fail(where, f"a share of the budget must be in (0, 1], got {value:g}")
        return value

    if isinstance(raw, dict):
        if "step" in raw:
            fail("fill.step", "a fill range takes low, high and log; list the shares instead of a step")
        domain = parse_range(raw, "fill", False, fail)
        low, high = share(domain.low, "fill.low"), share(domain.high, "fill.high")
        return replace(domain, low=low, high=high) if low < high else Domain("fixed", (low,))
    if isinstance(raw, list):
        return _choice_domain([share(v, "fill") for v in raw], "fill", fail)
    if raw is None:
        fail("fill", "must be a share of the budget in (0, 1], a list of shares or a range {low, high}")
    return Domain("fixed", (share(raw, "fill"),))


def _choices(raw: Any, key: str, scope: str, fail: Fail) -> tuple[str, ...]:
    """A list of method names (and `none`) of the given scope, validated against the registry."""
    if not isinstance(raw, list) or not raw:
        fail(key, "must be a non-empty list of method names (none allowed)")
    out = []
    for item in raw:
        name = NONE if item is None else str(item)
        if name in out:
            fail(key, f"'{name}' is listed twice")
        if name != NONE:
            cls = _registered(name, key, fail)
            if cls.scope != scope:
                where = "under 'global'" if cls.scope == "global" else "in a per-block slot"
                fail(key, f"'{name}' applies {'to the whole model' if cls.scope == 'global' else 'per block'}; "
                          f"offer it {where}")
        out.append(name)
    if out == [NONE]:
        fail(key, "offers only 'none'; add a method or remove it")
    return tuple(out)


def _registered(name: str, key: str, fail: Fail) -> type[MethodSpec]:
    try:
        return get_method(name)
    except AutopeftError as exc:
        fail(key, str(exc))


def _method_space(name: str, raw: Any, key: str, fail: Fail) -> MethodSpace:
    cls = _registered(name, key, fail)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail(key, "must map option names to a value, a list of choices or a range {low, high}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    options = []
    for opt, value in raw.items():
        where = f"{key}.{opt}"
        if opt not in fields:
            fail(where, f"{name} has no option '{opt}'; its options: {', '.join(fields) or 'none'}")
        domain = _option_domain(value, fields[opt], where, fail)
        for v in domain.values or (domain.low, domain.high):
            try:
                make_spec(name, {opt: v})
            except AutopeftError as exc:
                fail(where, f"value {v!r} is not valid: {exc}")
        options.append((str(opt), domain))
    return MethodSpace(name, tuple(options))


def _option_domain(raw: Any, hint: Any, where: str, fail: Fail) -> Domain:
    is_tuple = typing.get_origin(hint) is tuple
    if isinstance(raw, dict):
        if set(raw) == {"choices"}:
            raw = raw["choices"]
            if not isinstance(raw, list):
                fail(where, "choices must be a list")
            values = [_canon(v, hint, where, fail) for v in raw]
            return _choice_domain(values, where, fail)
        if hint not in (int, float):
            fail(where, "a range {low, high} needs a numeric option; list the choices instead")
        return parse_range(raw, where, hint is int, fail)
    if isinstance(raw, list) and not (is_tuple and not any(isinstance(v, list) for v in raw)):
        # A list is a list of choices, except that a flat list for a tuple option (targets: [q, v]) is one value.
        return _choice_domain([_canon(v, hint, where, fail) for v in raw], where, fail)
    return Domain("fixed", (_canon(raw, hint, where, fail),))


def _choice_domain(values: list, where: str, fail: Fail) -> Domain:
    if not values:
        fail(where, "a list of choices must not be empty")
    if len(set(values)) != len(values):
        fail(where, f"choices repeat: {values}")
    return Domain("fixed", tuple(values)) if len(values) == 1 else Domain("choice", tuple(values))


def _canon(value: Any, hint: Any, where: str, fail: Fail) -> Any:
    """One option value in the form optuna can store: tuples become comma-joined strings."""
    if typing.get_origin(hint) is tuple:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
        if items is None or not all(isinstance(v, str) for v in items):
            fail(where, f"expected a list of names such as [q, v], got {value!r}")
        return ",".join(v.strip() for v in items if v.strip())
    if hint is int:
        return int(number(value, where, True, fail))
    if hint is float:
        return float(number(value, where, False, fail))
    if hint is bool:
        if not isinstance(value, bool):
            fail(where, f"expected true or false, got {value!r}")
        return value
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        fail(where, f"expected a single value, got {value!r}")
    return str(value)


def _training(raw: Any, source: str, fail: Fail) -> tuple[tuple[str, Domain], ...]:
    """Training hyper-parameters: a scalar is fixed, a list is choices, {low, high, log?, step?} is a range.

    Keys are what training accepts (autopeft.train.SPACE_TRAINING_KEYS), every fixed value, choice and range end
    is typed and validated by TrainConfig, so a typo or a bad value (`optimizr: sgd`, `optimizer: adam`) stops the
    search here, before any trial trains with a setting other than the one written.
    """
    from autopeft.train_config import SPACE_TRAINING_KEYS, check_training, value_kind

    if not isinstance(raw, dict):
        fail("training", "must map hyper-parameter names (lr, weight_decay, epochs, ...) to values")
    out = []
    for key, value in raw.items():
        where = f"training.{key}"
        if not isinstance(key, str) or not _IDENT.match(key):
            fail(where, "hyper-parameter names are lower-case identifiers such as lr or weight_decay")
        if key not in SPACE_TRAINING_KEYS:
            raise UnknownKey(f"{source}: {where}: unknown training key '{key}'; valid keys: "
                             f"{', '.join(SPACE_TRAINING_KEYS)}")
        kind = value_kind(key)
        if isinstance(value, dict):
            if kind not in (int, float):
                fail(where, f"{key} takes a value or a list of choices, not a range")
            integer = kind is int or all(isinstance(value.get(k), int) and not isinstance(value.get(k), bool)
                                         for k in ("low", "high"))
            domain = parse_range(value, where, integer, fail)
            values: tuple[Any, ...] = (domain.low, domain.high)
        elif isinstance(value, list):
            domain = _choice_domain([_scalar(v, where, fail) for v in value], where, fail)
            values = domain.values
        else:
            domain = Domain("fixed", (_scalar(value, where, fail),))
            values = domain.values
        for v in values:
            try:
                check_training({key: v}, SPACE_TRAINING_KEYS)
            except AutopeftError as exc:
                fail(where, str(exc))
        out.append((key, domain))
    return tuple(out)


def _scalar(value: Any, where: str, fail: Fail) -> Any:
    if isinstance(value, str):
        try:
            parsed = float(value)  # PyYAML reads 1e-4 (no dot) as text
        except ValueError:
            return value
        return parsed if math.isfinite(parsed) else value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    fail(where, f"expected a number, text or true/false, got {value!r}")
