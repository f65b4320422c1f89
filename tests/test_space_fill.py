"""`fill`: the share of the budget a plan spends as one decision (`budget.fill`), the plan repaired down and grown up
to floor(fill × budget); absent, sampling is exactly as before."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from typing import Any

import optuna
import pytest
import yaml

from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.defaults import BUNDLED_BACKBONE
from autopeft.errors import AutopeftError
from autopeft.methods import get_method, make_spec
from autopeft.plan import PeftPlan
from autopeft.records import ATTR_BASELINE
from autopeft.search.samplers import make_sampler
from autopeft.space import bind, check_feasible, describe, load_space, parse_space, repaired_params, sample_parts
from autopeft.space.format import FILL_PARAM, TOP_KEYS, fill_target, shipped_dir
from autopeft.space.repair import fill_up, grow, repair
from autopeft.space.sampler import expressed_parts, fill_param, suggest_parts
from autopeft.space.shares import depth_caps

optuna.logging.set_verbosity(optuna.logging.WARNING)

VIT_B = "vit_base_patch16_224"  # counted from its config, no weights


def with_fill(name: str, fill: Any) -> Any:
    """The shipped space `name` with a `fill` key."""
    data = yaml.safe_load((shipped_dir() / f"{name}.yaml").read_text())
    return parse_space({**data, "fill": fill}, f"{name}-fill.yaml")


class Scripted:
    """A trial whose answers come from Python's own seeded generator (not Optuna's), recording the order asked."""

    def __init__(self, seed: int, user_attrs: dict | None = None):
        self.rng, self.params, self.user_attrs = random.Random(seed), {}, dict(user_attrs or {})

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self.params.setdefault(name, self.rng.choice(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self.params.setdefault(name, self.rng.randrange(low, high + 1, step))

    def suggest_float(self, name: str, low: float, high: float, step: Any = None, log: bool = False) -> float:
        return self.params.setdefault(name, self.rng.uniform(low, high))

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


# -- format -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fill", "kind", "described"), [
    (0.5, "fixed", "= 0.5"), (1, "fixed", "= 1.0"), ("5e-1", "fixed", "= 0.5"), ([0.75], "fixed", "= 0.75"),
    ([0.25, 0.5, 1], "choice", "∈ {0.25, 0.5, 1.0}"), ({"low": 0.3, "high": 0.3}, "fixed", "= 0.3"),
    ({"low": 0.1, "high": 1.0, "log": True}, "float", "log-uniform"),
])
def test_valid_fill_values(fill: Any, kind: str, described: str) -> None:
    space = with_fill("unified", fill)
    assert "fill" in TOP_KEYS and space.fill is not None and space.fill.kind == kind
    info = describe(space, backbone_spec("test_vit"))
    assert described in info["fill"] and FILL_PARAM in info["insertion"]
    assert load_space("unified").fill is None and describe(load_space("unified"), backbone_spec("test_vit"))["fill"] \
        is None


@pytest.mark.parametrize(("fill", "key", "problem"), [
    (0, "fill", "must be in (0, 1], got 0"), (1.5, "fill", "in (0, 1], got 1.5"), (-0.1, "fill", "in (0, 1]"),
    ("half", "fill", "expected a number"), (True, "fill", "expected a number"), (None, "fill", "must be a share"),
    ([], "fill", "must not be empty"), ([0.5, 0.5], "fill", "choices repeat"), ([0.5, 2], "fill", "in (0, 1]"),
    ({"low": 0, "high": 1}, "fill.low", "in (0, 1]"), ({"low": 0.5, "high": 2}, "fill.high", "in (0, 1]"),
    ({"low": 0.8, "high": 0.2}, "fill", "greater than high"), ({"low": 0.1}, "fill", "both 'low' and 'high'"),
    ({"low": 0.1, "high": 1, "step": 0.1}, "fill.step", "list the shares instead"),
    ({"low": 0.1, "high": 1, "log": "yes"}, "fill.log", "true or false"),
])
def test_invalid_fill_is_one_line_naming_file_key_and_problem(fill: Any, key: str, problem: str) -> None:
    with pytest.raises(AutopeftError) as err:
        with_fill("unified", fill)
    text = str(err.value)
    assert text.startswith(f"unified-fill.yaml: {key}: ") and problem in text and "\n" not in text, text


# -- no fill: unchanged -------------------------------------------------------------------------------------------


# Digests of 80 scripted draws per space (test_vit, 1 % and 2 %): every asked parameter and the recorded plan,
# count and repair, taken before `fill` existed.
BEFORE_FILL = {"unified": "4dd0a11e6bfa88ee", "lora": "49f863a162189ffa", "noah": "0f9737e5bba64d38",
               "share": "f279efa7c23028e5", "compact": "74bbd959b02ddd1f"}


@pytest.mark.parametrize("name", sorted(BEFORE_FILL))
def test_a_space_without_fill_draws_the_same_plans_as_before(name: str) -> None:
    spec, space = backbone_spec("test_vit"), load_space(name)
    digest = hashlib.sha256()
    for text in ("1%", "2%"):
        budget = parse_budget(text, spec)
        for seed in range(40):
            trial = Scripted(seed)
            sample_parts(trial, space, spec, budget)
            assert FILL_PARAM not in trial.params
            digest.update(json.dumps([trial.params, trial.user_attrs], sort_keys=True, default=str).encode())
    assert digest.hexdigest()[:16] == BEFORE_FILL[name]


# -- the count ----------------------------------------------------------------------------------------------------


def check_fitted(bound: Any, parts: list, target: int) -> None:
    """Within the target and, where any part can still grow, less than each such part's step below it."""
    count = bound.total(parts)
    assert count <= target
    for i, part in enumerate(parts):
        bigger = grow(bound, part)
        if bigger is not None:
            assert bound.total(parts[:i] + [bigger] + parts[i + 1:]) > target, (i, part, count, target)


@pytest.mark.parametrize("backbone", [BUNDLED_BACKBONE, VIT_B])
@pytest.mark.parametrize(("name", "fill"), [
    ("unified", {"low": 0.05, "high": 1.0}), ("lora", [0.25, 0.5, 1.0]), ("noah", [0.6, 0.8, 1.0]),
    ("compact", {"low": 0.1, "high": 1.0, "log": True}),
])
def test_every_draw_ends_within_one_growth_step_of_its_fill(backbone: str, name: str, fill: Any) -> None:
    spec, space = backbone_spec(backbone), with_fill(name, fill)
    bound = bind(space, spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=len(name)))
    for text in ("1%", "2%"):
        budget = parse_budget(text, spec)
        grew = 0
        for n in range(60):
            trial = study.ask()
            parts = sample_parts(trial, space, spec, budget)
            target = fill_target(trial.params[FILL_PARAM], budget.limit)
            check_fitted(bound, parts, target)
            assert trial.user_attrs["peft_params"] == bound.total(parts)
            if n % 20 == 0:
                assert PeftPlan.from_dict(trial.user_attrs["plan"]).count(spec) == bound.total(parts)
            # growth changes sizes only: the same methods, depths and sides as the repaired draw, no size smaller
            drawn = suggest_parts(optuna.trial.FixedTrial(dict(trial.params)), bound, budget.limit)
            shrunk = repair(bound, drawn, target)
            for before, after in zip(shrunk, parts, strict=True):
                assert replace(after, values=()) == replace(before, values=())
                size = None if after.empty else get_method(after.method).size_option
                old, new = dict(before.values), dict(after.values)
                assert {k: v for k, v in old.items() if k != size} == {k: v for k, v in new.items() if k != size}
                if size in new:
                    assert new[size] >= old[size] and bound.methods[after.method].domain(size).contains(new[size])
                    grew += new[size] > old[size]
        assert grew, (name, text)  # growth happened


def test_fill_is_asked_first_and_a_fixed_fill_asks_nothing() -> None:
    spec = backbone_spec("test_vit")
    budget = parse_budget("2%", spec)
    trial = Scripted(1)
    sample_parts(trial, with_fill("unified", [0.5, 1.0]), spec, budget)
    assert next(iter(trial.params)) == FILL_PARAM
    space = with_fill("unified", 0.5)
    bound = bind(space, spec)
    for seed in range(10):
        trial = Scripted(seed)
        parts = sample_parts(trial, space, spec, budget)
        assert FILL_PARAM not in trial.params
        check_fitted(bound, parts, budget.limit // 2)
    trial = Scripted(0)
    sample_parts(trial, with_fill("unified", [0.5, 1.0]), spec, None)  # no budget: no fill
    assert FILL_PARAM not in trial.params


def test_growth_is_deterministic_and_a_grown_plan_is_its_own_draw() -> None:
    spec, space = backbone_spec(VIT_B), with_fill("unified", {"low": 0.05, "high": 1.0})
    bound = bind(space, spec)
    budget = parse_budget("1%", spec)

    def run(seed: int) -> list:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        out = []
        for _ in range(15):
            trial = study.ask()
            sample_parts(trial, space, spec, budget)
            out.append((trial.params, trial.user_attrs["plan"], trial.user_attrs["repaired"]))
        return out

    first = run(7)
    assert first == run(7)
    for params, plan, repaired in first:
        trained = {k: v for k, v in {**params, **repaired}.items() if repaired.get(k, v) is not None}
        again = optuna.trial.FixedTrial(trained)
        parts = sample_parts(again, space, spec, budget)
        assert bound.plan(parts).to_dict() == plan and again.user_attrs["repaired"] == {}
        assert fill_up(bound, parts, fill_target(params[FILL_PARAM], budget.limit)) == parts


# -- share spaces ---------------------------------------------------------------------------------------------------


def test_a_share_space_sizes_its_plans_to_the_fill() -> None:
    spec = backbone_spec(VIT_B)
    space = with_fill("share", [0.1, 0.5, 1.0])
    bound = bind(space, spec)
    budget = parse_budget("1%", spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    counts: dict[float, list[float]] = {}
    for _ in range(60):
        trial = study.ask()  # a depth's choices are the same whatever the fill (else Optuna would refuse them)
        parts = sample_parts(trial, space, spec, budget)
        fill = trial.params[FILL_PARAM]
        assert trial.user_attrs["repaired"] == {} and next(iter(trial.params)) == FILL_PARAM
        assert bound.total(parts) <= fill_target(fill, budget.limit)
        assert {**bound.params(parts), FILL_PARAM: fill} == trial.params
        again = suggest_parts(optuna.trial.FixedTrial(dict(trial.params)), bound, budget.limit)
        assert bound.plan(again) == bound.plan(parts)
        counts.setdefault(fill, []).append(bound.total(parts) / budget.limit)
        # the same decisions at a larger fill: sizes at least as large
        for other in (0.5, 1.0):
            if other > fill:
                more = suggest_parts(optuna.trial.FixedTrial({**trial.params, FILL_PARAM: other}), bound,
                                     budget.limit)
                assert bound.total(more) >= bound.total(parts)
    assert max(counts[0.1]) <= 0.1 < max(counts[1.0]) and max(counts[0.5]) <= 0.5 < max(counts[1.0])


# -- feasibility ----------------------------------------------------------------------------------------------------


def test_the_smallest_plan_must_fit_the_smallest_fill() -> None:
    spec = backbone_spec("test_vit")
    bound = bind(load_space("noah"), spec)
    need = bound.total(bound.smallest_parts())
    limit = 2 * need
    check_feasible(with_fill("noah", [0.5, 1.0]), spec, limit)
    with pytest.raises(AutopeftError) as err:
        check_feasible(with_fill("noah", [0.25, 1.0]), spec, limit)
    text = str(err.value)
    assert "\n" not in text and text.startswith("noah-fill.yaml: ") and "space 'noah'" in text, text
    assert f"needs {need:,}" in text and "fill 0.25" in text and f"allows {fill_target(0.25, limit):,}" in text
    assert f"at least {4 * need:,}" in text, text
    # a share space whose worst smallest draw (all-linear LoRA) passes the smallest fill: refused up front
    lora = {"rank": [1, 2, 4], "targets": [["q", "v"], ["q", "k", "v", "proj", "fc1", "fc2"]]}
    space = parse_space({"name": "deep", "insertion": {"mode": "depth", "depths": [6], "shares": [1, 2]},
                         "fill": [0.5, 1.0], "methods": {"lora": lora, "adapter": {"dim": [1, 2, 4]}}}, "deep.yaml")
    need = bind(space, spec).total(bind(space, spec).smallest_parts())
    with pytest.raises(AutopeftError, match=rf"^deep.yaml: share space 'deep' cannot size its plans within "
                                            rf"{need:,} parameters \(fill 0.5 of {2 * need:,}\) on test_vit"):
        check_feasible(space, spec, 2 * need)
    # a share space caps its depths once, at its smallest fill, so every trial is offered the same depths
    spec = backbone_spec(BUNDLED_BACKBONE)
    limit = parse_budget("1%", spec).limit
    caps = depth_caps(bind(with_fill("share", [0.1, 1.0]), spec), limit)
    assert caps == depth_caps(bind(load_space("share"), spec), fill_target(0.1, limit)) != \
        depth_caps(bind(load_space("share"), spec), limit)


# -- baselines --------------------------------------------------------------------------------------------------------


def lora_space(fill: Any) -> Any:
    return parse_space({"insertion": "block", "slots": {"tune": ["none", "lora"]},
                        "methods": {"lora": {"rank": [1, 2, 4, 8, 16, 32, 64], "targets": "q,v"}},
                        "fill": fill}, "lora-fill.yaml")


@pytest.mark.parametrize(("fill", "expected"), [
    ([0.25, 0.5, 1.0], 1.0),                          # share 0.69: the smallest choice above it
    ([0.25, 0.5], 0.5),                               # above every choice: the largest (shrunk, as over a budget)
    ({"low": 0.1, "high": 1.0}, 589824 / 857986),     # a range: the share itself
    ({"low": 0.8, "high": 1.0}, 0.8),                 # clipped to the range
])
def test_an_enqueued_baseline_carries_its_fill_and_trains_unchanged(fill: Any, expected: float) -> None:
    spec = backbone_spec(VIT_B)
    space = lora_space(fill)
    bound = bind(space, spec)
    limit = parse_budget("1%", spec).limit
    assert limit == 857986
    plan = PeftPlan.single(make_spec("lora", {"rank": 16, "targets": "q,v"}), range(spec.num_blocks))
    parts = expressed_parts(bound, plan, limit)
    assert parts is not None and bound.total(parts) == 589824
    param = fill_param(bound, parts, limit)
    assert param == {FILL_PARAM: pytest.approx(expected)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for attrs in ({ATTR_BASELINE: "lora"}, {}):
        study.enqueue_trial({**bound.params(parts), **param}, user_attrs=attrs)
        trial = study.ask()
        got = bound.plan(sample_parts(trial, space, spec, limit))
        if fill_target(expected, limit) < 589824:  # above every fill: repaired down, as over a budget today
            assert got.count(spec) <= fill_target(expected, limit) < plan.count(spec)
        elif attrs:  # a baseline trains its own plan
            assert got == plan and trial.user_attrs["repaired"] == {}
        elif fill_target(expected, limit) > 589824 + 49152:  # a draw of the same parameters grows into the gap
            assert got.count(spec) > plan.count(spec)
        else:
            assert got == plan
    assert fill_param(bound, parts, None) == {} and fill_param(bind(lora_space(0.5), spec), parts, limit) == {}


def test_a_share_space_baseline_is_expressed_under_its_fill() -> None:
    spec = backbone_spec(VIT_B)
    space = with_fill("share", {"low": 0.05, "high": 1.0})
    bound = bind(space, spec)
    limit = parse_budget("1%", spec).limit
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    for _ in range(15):
        trial = study.ask()
        plan = bound.plan(sample_parts(trial, space, spec, limit))
        parts = expressed_parts(bound, plan, limit)
        assert parts is not None and bound.plan(parts) == plan
        params = {**bound.params(parts), **fill_param(bound, parts, limit)}
        again = suggest_parts(optuna.trial.FixedTrial(params), bound, limit)
        assert bound.plan(again) == plan


# -- learning ---------------------------------------------------------------------------------------------------------


def test_repaired_tpe_learns_the_fill_and_the_grown_sizes() -> None:
    spec = backbone_spec(VIT_B)
    space = lora_space([0.25, 0.5, 1.0])
    budget = parse_budget("1%", spec)
    study = optuna.create_study(sampler=make_sampler("tpe", seed=0), direction="maximize")
    grown = 0
    for n in range(10):
        trial = study.ask()
        sample_parts(trial, space, spec, budget)
        study.tell(trial, float(n % 3))
    for t in study.trials:
        seen = study.sampler._get_params(t, study)
        assert seen == repaired_params(t) and seen[FILL_PARAM] == t.params[FILL_PARAM]
        grown += sum(1 for k, v in t.user_attrs["repaired"].items() if v is not None and k in t.params and
                     k.endswith(".rank") and v > t.params[k] and seen[k] == v)
    assert grown
