"""Budget-share spaces ([I] item 4): sizes follow from share weights, every draw fits, nothing is repaired."""

from __future__ import annotations

import warnings

import optuna
import pytest
import timm

from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.errors import AutopeftError
from autopeft.plan import PeftPlan
from autopeft.search.baselines import baseline_plans
from autopeft.search.samplers import make_sampler
from autopeft.space import bind, check_feasible, describe, load_space, parse_space, sample_parts
from autopeft.space.sampler import expressed_parts, suggest_parts
from autopeft.space.shares import depth_caps

optuna.logging.set_verbosity(optuna.logging.WARNING)

BACKBONES = ["vit_base_patch16_224", "test_vit"] + (["autopeft_tiny_vit"] if timm.is_model("autopeft_tiny_vit") else [])
SIZES = {"lora": "rank", "adapter": "dim", "vpt_deep": "length"}


def share_space(depths: str = "[0, 3, 6, 9, 12]", shares: str = "[1, 2, 4]", extra: str = "") -> dict:
    import yaml

    return yaml.safe_load(f"""
insertion: {{mode: depth, depths: {depths}, side: [first, last], shares: {shares}}}
methods:
  lora: {{rank: [1, 2, 4, 8, 16, 32, 64], targets: [q, v]}}
  adapter: {{dim: [1, 2, 4, 8, 16, 32, 64]}}
  vpt_deep: {{length: [1, 5, 10, 20, 50, 100]}}
{extra}
training: {{lr_scale: {{low: 0.25, high: 4.0, log: true}}}}
""")


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_budget_share_space_never_repairs_and_every_draw_fits(backbone: str, sampler: str) -> None:
    """Every draw of the shipped `share` space, at every budget it accepts, fits with no repair; its parameters hold
    no size (a size is derived), and the same parameters asked again give the same plan."""
    spec = backbone_spec(backbone)
    space = load_space("share")
    bound = bind(space, spec)
    for text in ("0.1%", "0.5%", "1%", "2%"):
        budget = parse_budget(text, spec)
        try:
            check_feasible(space, spec, budget)
        except AutopeftError as exc:
            assert "cannot size its plans" in str(exc) or "smallest plan" in str(exc)
            continue
        study = optuna.create_study(sampler=make_sampler(sampler, seed=1), direction="maximize")
        fills = []
        for n in range(60):
            trial = study.ask()
            parts = sample_parts(trial, space, spec, budget)
            plan = PeftPlan.from_dict(trial.user_attrs["plan"])
            assert trial.user_attrs["repaired"] == {}, (text, trial.user_attrs["repaired"])
            assert trial.user_attrs["peft_params"] == plan.count(spec) == bound.total(parts) <= budget.limit
            assert not [k for k in trial.params if k.split(".")[-1] in SIZES.values()], trial.params
            assert bound.params(parts) == trial.params  # all the draw asked, none other
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                again = suggest_parts(optuna.trial.FixedTrial(dict(trial.params)), bound, budget.limit)
            assert bound.plan(again) == plan
            fills.append(plan.count(spec) / budget.limit)
            study.tell(trial, float(n % 7) / 7)
        assert max(fills) > 0.5, (text, max(fills))  # the budget is spent, not left over


def test_share_weights_decide_the_sizes() -> None:
    """Two components on every block: the one with the larger weight gets the larger part of the budget, and the
    sizes are the largest of their lists within each allowance (nothing more fits in what is left)."""
    spec = backbone_spec("vit_base_patch16_224")
    space = parse_space(share_space(), "share.yaml")
    bound = bind(space, spec)
    limit = parse_budget("1%", spec).limit

    def draw(lora: int, adapter: int) -> dict:
        params = {"noah.lora.depth": 12, "noah.lora.side": "first", "noah.adapter.depth": 12,
                  "noah.adapter.side": "first", "noah.vpt_deep.depth": 0, "noah.lora.share": lora,
                  "noah.adapter.share": adapter, "lr_scale": 1.0}
        parts = suggest_parts(optuna.trial.FixedTrial(params), bound, limit)
        return {p.method: (dict(p.values)[SIZES[p.method]], bound.count_part(p)) for p in parts if not p.empty}

    even, lora_heavy, adapter_heavy = draw(1, 1), draw(4, 1), draw(1, 4)
    assert lora_heavy["lora"][0] > even["lora"][0] >= adapter_heavy["lora"][0]
    assert adapter_heavy["adapter"][0] > even["adapter"][0] >= lora_heavy["adapter"][0]
    for sizes in (even, lora_heavy, adapter_heavy):
        total = sum(count for _, count in sizes.values())
        assert total <= limit
        assert total > 0.6 * limit


def test_depths_are_capped_so_that_every_draw_fits_and_a_hopeless_budget_is_one_error() -> None:
    """At a budget where all components on every block do not fit at their smallest sizes, the deepest depths of
    the largest ones leave their domains (and nothing drawn goes over); a space with no depth 0 that cannot fit at
    its smallest depths is refused with one message."""
    spec = backbone_spec("vit_base_patch16_224")
    space = parse_space(share_space(), "share.yaml")
    bound = bind(space, spec)
    limit = parse_budget("0.05%", spec).limit
    caps = depth_caps(bound, limit)
    assert any(max(depths) < 12 for depths in caps.values()) and all(0 in d for d in caps.values())
    assert depth_caps(bind(space, spec), parse_budget("1%", spec).limit) == {
        i: (0, 3, 6, 9, 12) for i in range(3)}  # 1 % holds every component on every block
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(100):
        trial = study.ask()
        sample_parts(trial, space, spec, limit)
        assert trial.user_attrs["peft_params"] <= limit and trial.user_attrs["repaired"] == {}
        study.tell(trial, 0.0)
    deep = parse_space(share_space(depths="[12]"), "deep.yaml")
    with pytest.raises(AutopeftError, match="the smallest plan of space 'space' needs 73,740 trainable parameters"):
        check_feasible(deep, spec, parse_budget("0.05%", spec))
    shown = describe(space, spec, parse_budget("0.05%", spec))["share_depths"]
    assert shown == {bound.templates[i].method: list(d) for i, d in caps.items()}
    assert describe(space, spec)["insertion"].endswith("sizes from each method's share of the budget, weights "
                                                       "[1, 2, 4]")


@pytest.mark.parametrize(("backbone", "expressed_at_1pc"), [
    ("vit_base_patch16_224", {"lora", "adapter", "vpt_deep"}),
    pytest.param("autopeft_tiny_vit", {"lora", "adapter"},  # VPT-deep's depth 6 is capped at 1 % there
                 marks=pytest.mark.skipif("autopeft_tiny_vit" not in BACKBONES, reason="bundled backbone")),
])
def test_baselines_are_the_share_space_s_own_draws(backbone: str, expressed_at_1pc: set) -> None:
    """A single-method baseline at the largest size that fits is a draw of the share space (its depth, side and
    no weight): enqueued as parameters, it trains exactly the baseline's plan."""
    spec = backbone_spec(backbone)
    space = load_space("share")
    bound = bind(space, spec)
    limit = parse_budget("1%", spec).limit
    expressed = []
    for name, plan in baseline_plans(spec, limit):
        parts = expressed_parts(bound, plan, limit)
        if parts is None:
            continue
        expressed.append(name)
        params = bound.params(parts)
        assert not any(k.endswith(".share") for k in params)  # one sized component: no weight to ask
        again = suggest_parts(optuna.trial.FixedTrial({**params, "lr_scale": 1.0}), bound, limit)
        assert bound.plan(again) == plan, (name, bound.plan(again).short(), plan.short())
    assert set(expressed) == expressed_at_1pc
    # a mix found by the space itself comes back with its weights
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    for _ in range(20):
        trial = study.ask()
        plan = PeftPlan.from_dict(sample_parts_plan(trial, space, spec, limit))
        parts = expressed_parts(bound, plan, limit)
        assert parts is not None and bound.plan(parts) == plan
        study.tell(trial, 0.0)


def sample_parts_plan(trial: optuna.Trial, space, spec, limit: int) -> dict:
    sample_parts(trial, space, spec, limit)
    return trial.user_attrs["plan"]


@pytest.mark.parametrize(("insertion", "message"), [
    ("{mode: block, shares: [1, 2]}", "insertion.shares: not valid for mode block"),
    ("{mode: depth, depths: [0, 6], shares: []}", "non-empty list of whole share weights"),
    ("{mode: depth, depths: [0, 6], shares: [0, 1]}", "distinct whole numbers >= 1"),
    ("{mode: depth, depths: [0, 6], shares: [2, 2]}", "distinct whole numbers >= 1"),
])
def test_bad_shares_are_one_error_naming_the_key(insertion: str, message: str) -> None:
    import yaml

    data = {"insertion": yaml.safe_load(insertion), "methods": {"lora": {"rank": [1, 2]}}}
    if data["insertion"]["mode"] == "block":
        data = {"insertion": data["insertion"], "slots": {"tune": ["none", "lora"]}}
    with pytest.raises(AutopeftError, match=message):
        parse_space(data, "bad.yaml")


def test_a_share_study_enqueues_its_baselines_as_draws_and_the_rest_as_plans(tmp_path) -> None:
    """`autopeft search --search-space share` at 1 % of the bundled backbone: LoRA and the adapter are enqueued as
    the space's parameters (depths and sides, no size), the plans it cannot draw (VPT-deep on all 6 blocks, the
    linear probe) as preset plans; drawn from those parameters, the sampler trains each baseline exactly."""
    from optuna.trial import TrialState

    import autopeft.bundled  # noqa: F401  (registers the bundled backbone)
    from autopeft.search import prepare
    from autopeft.search import storage as st
    from autopeft.search.engine import create_or_resume
    from autopeft.search.settings import SearchSettings

    url = f"sqlite:///{tmp_path}/studies.db"
    prep = prepare(SearchSettings(study="s", dataset="digits", backbone="autopeft_tiny_vit", budget="1%",
                                  storage=url, trials=20, space="share"))
    study, _ = create_or_resume(prep)
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    fixed = {t.user_attrs[st.ATTR_BASELINE]: study._storage.get_trial_system_attrs(t._trial_id)["fixed_params"]
             for t in waiting}
    preset = {t.user_attrs[st.ATTR_BASELINE] for t in waiting if st.ATTR_PLAN in t.user_attrs}
    assert preset == {"adaptformer", "vpt_deep", "linear"}
    assert fixed["lora"]["noah.lora.depth"] == 6 and fixed["lora"]["noah.adapter.depth"] == 0
    assert not [k for k in fixed["lora"] if k.endswith((".rank", ".dim", ".length", ".share"))]
    bound = bind(prep.space, prep.spec)
    for name, plan in prep.baselines:
        if name in ("lora", "adapter"):
            drawn = suggest_parts(optuna.trial.FixedTrial(fixed[name]), bound, prep.budget.limit)
            assert bound.plan(drawn) == plan
