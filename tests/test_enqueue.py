"""`--warm-start`: the Pareto plans of another study that fit this one's backbone and budget are enqueued first."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

import autopeft.bundled  # noqa: F401  (registers the bundled backbone)
from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.search import prepare
from autopeft.search import storage as st
from autopeft.search.engine import create_or_resume
from autopeft.search.settings import SearchSettings
from autopeft.search.study_settings import StudySettings

VIT = "autopeft_tiny_vit"  # the bundled backbone (its weights ship): 6 blocks


def _source(url: str) -> dict[str, dict]:
    """A finished study whose front holds a plan that fits, one for a deeper backbone and one over the budget."""
    spec = backbone_spec(VIT)
    fits = PeftPlan.single(make_spec("lora", {"rank": 2}), range(6))
    deeper = PeftPlan.single(make_spec("lora", {"rank": 1}), [7])  # block 7: a 12-block backbone's plan
    big = PeftPlan.single(make_spec("adapter", {"dim": 64}), range(6))
    study = optuna.create_study(study_name="src", storage=st.open_storage(url), directions=["maximize", "minimize"])
    search = SearchSettings(study="src", dataset="digits", backbone=VIT, budget="50%")
    st.write_settings(study, StudySettings.of(search, spec, parse_budget("50%", spec), 10))
    plans = {"fits": fits, "deeper": deeper, "big": big}
    for plan, acc, params in zip(plans.values(), (0.6, 0.7, 0.9), (4608, 5000, 90000), strict=True):
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, values=[acc, params], params={"lr": 3e-3},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
            user_attrs={st.ATTR_PLAN: plan.to_dict(), st.ATTR_PARAMS: params, st.ATTR_CURVE: [acc, acc],
                        st.ATTR_EPOCHS: 2, st.ATTR_MAX_EPOCHS: 2}))
    return {name: plan.to_dict() for name, plan in plans.items()}


def test_warm_start_enqueues_only_the_plans_that_fit(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/studies.db"
    plans = _source(url)
    s = SearchSettings(study="dst", dataset="digits", backbone=VIT, budget="5%", storage=url, warm_start="src",
                       baselines=False, trials=4)
    study, remaining = create_or_resume(prepare(s))
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert remaining == 4
    assert [t.user_attrs[st.ATTR_PLAN] for t in waiting] == [plans["fits"]]  # deeper: skipped; big: over 5 %
    assert waiting[0].user_attrs[st.ATTR_WARM_START] == "src#0"


def test_baselines_take_the_centre_of_ranges_and_the_first_of_choices(tmp_path) -> None:
    space = tmp_path / "sgd.yaml"
    space.write_text(yaml.safe_dump({
        "version": 1, "name": "sgd", "insertion": {"mode": "group", "size": 3},
        "slots": {"method": ["none", "lora"]},
        "methods": {"lora": {"rank": [1, 2]}},
        "training": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "optimizer": ["sgd", "adamw"],
                     "batch_size": {"low": 16, "high": 33}, "epochs": 10},
    }))
    url = f"sqlite:///{tmp_path}/studies.db"
    s = SearchSettings(study="b", dataset="digits", backbone=VIT, budget="5%", storage=url, space=str(space),
                       trials=2)
    study, _ = create_or_resume(prepare(s))
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert len(waiting) == 2 and all(t.user_attrs.get(st.ATTR_BASELINE) for t in waiting)
    params = study._storage.get_trial_system_attrs(waiting[0]._trial_id)["fixed_params"]
    assert params["optimizer"] == "sgd" and params["batch_size"] == 24  # not 0.0 (a choice has no range)
    assert abs(params["lr"] - 1e-3) < 1e-12


@pytest.mark.parametrize("fill", [None, [0.25, 0.5, 1.0]])
def test_baselines_are_enqueued_as_the_spaces_own_parameters(tmp_path, fill) -> None:
    """A baseline the space can express is the sampler's own draw (TPE learns from its parameters); drawing it
    gives back exactly the baseline's plan, in a space that draws its share of the budget (`fill`) too. One it
    cannot express (the linear probe) keeps its plan attribute."""
    from autopeft.search.baselines import baseline_plans
    from autopeft.search.engine import SamplePlan

    space = "unified"
    if fill is not None:
        from autopeft.space.format import shipped_dir

        data = yaml.safe_load((shipped_dir() / "unified.yaml").read_text())
        data["fill"] = fill
        space = str(tmp_path / "filled.yaml")
        (tmp_path / "filled.yaml").write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path}/studies.db"
    s = SearchSettings(study="p", dataset="digits", backbone=VIT, budget="2%", storage=url, trials=8, space=space)
    prep = prepare(s)
    study, _ = create_or_resume(prep)
    expected = dict(baseline_plans(prep.spec, prep.budget.limit))
    sample = SamplePlan(prep.space, prep.spec, prep.budget, s.epochs)
    as_params = 0
    for _ in expected:
        trial = study.ask()
        name = trial.user_attrs[st.ATTR_BASELINE]
        config = sample(trial)["autopeft"]
        assert config["plan"] == expected[name].to_dict(), name
        if name == "linear":
            assert st.ATTR_PLAN in study._storage.get_trial(trial._trial_id).user_attrs
        else:
            assert ("budget.fill" in trial.params) == (fill is not None), (name, trial.params)
            assert f"block0.{'tokens' if name == 'vpt_deep' else 'tune' if name in ('lora', 'bitfit') else 'module'}" \
                in trial.params, (name, trial.params)
            as_params += 1
        study.tell(trial, [0.5, config["peft_params"]])
    assert as_params >= 4


@pytest.mark.parametrize("space", ["unified", "noah", "lora", "adapter", "vpt", "mergeable", "compact"])
def test_parts_of_gives_back_the_plan_or_none(space: str) -> None:
    """`BoundSpace.parts_of` inverts `plan`: for plans the space drew itself, and for each baseline it can express."""
    from autopeft.search.baselines import baseline_plans
    from autopeft.space import load_space, sample_plan
    from autopeft.space.bound import bind

    spec = backbone_spec(VIT)
    bound = bind(load_space(space), spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(15):
        plan = sample_plan(study.ask(), load_space(space), spec, None)
        parts = bound.parts_of(plan)
        assert parts is not None and bound.plan(parts) == plan, plan.short()
    for _name, plan in baseline_plans(spec, parse_budget("2%", spec).limit):
        parts = bound.parts_of(plan)
        assert parts is None or bound.plan(parts) == plan
    foreign = PeftPlan.single(make_spec("lora", {"rank": 3}), [0])  # rank 3 is offered by no shipped space
    assert bound.parts_of(foreign) is None


def test_baselines_are_enqueued_once_per_learning_rate_scale(tmp_path) -> None:
    """`--baseline-lr-scales 0.5,2`: every baseline twice, at half and twice the space's centre lr_scale (0.25 … 1.5:
    0.61), in baseline order; the study's trial count still caps what is enqueued."""
    url = f"sqlite:///{tmp_path}/studies.db"
    s = SearchSettings(study="g", dataset="digits", backbone=VIT, budget="2%", storage=url, trials=5,
                       baseline_lr_scales="0.5,2")
    assert s.baseline_lr_scales == (0.5, 2.0)
    study, _ = create_or_resume(prepare(s))
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    fixed = [study._storage.get_trial_system_attrs(t._trial_id)["fixed_params"] for t in waiting]
    names = [t.user_attrs[st.ATTR_BASELINE] for t in waiting]
    assert len(waiting) == 5 and names[:4] == ["lora", "lora", "adapter", "adapter"]
    centre = (0.25 * 1.5) ** 0.5
    assert [f["lr_scale"] for f in fixed] == pytest.approx([0.5 * centre, 2 * centre] * 2 + [0.5 * centre])


@pytest.mark.parametrize("scales,message", [
    ("8", r"lr_scale 4.89\d* is outside the space's range 0.25 … 1.5"),
    ("0,1", "must be numbers > 0"),
    ("fast", "is not valid; use numbers"),
])
def test_bad_baseline_lr_scales_are_refused_before_the_study_exists(tmp_path, scales, message) -> None:
    from autopeft.errors import AutopeftError

    url = f"sqlite:///{tmp_path}/studies.db"
    with pytest.raises(AutopeftError, match=message):
        prepare(SearchSettings(study="bad", dataset="digits", backbone=VIT, budget="2%", storage=url,
                               baseline_lr_scales=scales))
    assert not (tmp_path / "studies.db").exists()


@pytest.mark.parametrize("space", ["compact", "unified", "lora", "adapter", "vpt", "mergeable"])
def test_an_enqueued_baseline_fixes_every_decision_of_its_plan(space: str) -> None:
    """The parameters a baseline is enqueued with decide the whole plan: drawn as the sampler's own trial (every
    other decision left to a random sampler), they give exactly the baseline. In a depth space the components the
    baseline leaves out are fixed at depth 0 under their own names (`noah.adapter.depth`), not left to the sampler."""
    from autopeft.search.baselines import baseline_plans
    from autopeft.space import load_space
    from autopeft.space.bound import bind
    from autopeft.space.sampler import suggest_parts

    spec = backbone_spec(VIT)
    bound = bind(load_space(space), spec)
    expressed = 0
    for name, plan in baseline_plans(spec, parse_budget("1%", spec).limit):
        parts = bound.parts_of(plan)
        if parts is None:
            continue
        expressed += 1
        for seed in range(3):
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            study.enqueue_trial(bound.params(parts))
            drawn = bound.plan(suggest_parts(study.ask(), bound))
            assert drawn == plan, (space, name, drawn.short(), plan.short())
    assert expressed >= (3 if space in ("compact", "unified") else 1)


def test_the_sampler_models_each_trial_by_the_plan_it_trained() -> None:
    """A draw the budget repair changed (rank 16 drawn, rank 2 trained; a module switched off) reaches TPE's
    observations with the repaired values, through TPE's own path (`_get_internal_repr`)."""
    from autopeft.search.samplers import RepairedTPE, make_sampler
    from autopeft.space import load_space, repaired_params, sample_parts
    from autopeft.space.bound import bind

    sampler = make_sampler("tpe", seed=0)
    assert isinstance(sampler, RepairedTPE)
    study = optuna.create_study(sampler=sampler, directions=["maximize"])
    rank = optuna.distributions.CategoricalDistribution([1, 2, 4, 8, 16])
    module = optuna.distributions.CategoricalDistribution(["none", "adapter"])
    dim = optuna.distributions.CategoricalDistribution([8, 32])
    trial = create_trial(params={"block0.lora.rank": 16, "block0.module": "adapter", "block0.adapter.dim": 32},
                         distributions={"block0.lora.rank": rank, "block0.module": module, "block0.adapter.dim": dim},
                         value=0.9, user_attrs={"repaired": {"block0.lora.rank": 2, "block0.module": "none",
                                                             "block0.adapter.dim": None}})
    study.add_trial(trial)
    seen = sampler._get_internal_repr(study.trials, {"block0.lora.rank": rank, "block0.module": module}, study)
    assert seen["block0.lora.rank"].tolist() == [rank.to_internal_repr(2)]
    assert seen["block0.module"].tolist() == [module.to_internal_repr("none")]
    # the adapter's option is not part of the trained plan: the trial is no observation of it
    assert sampler._get_internal_repr(study.trials, {"block0.adapter.dim": dim}, study)["block0.adapter.dim"].size == 0

    # and the attribute the engine's draws carry is what repair did: every repaired value trains
    spec = backbone_spec(VIT)
    space = load_space("unified")
    budget = parse_budget("0.5%", spec)
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask()
    parts = sample_parts(draw, space, spec, budget)
    assert bind(space, spec).params(parts) == repaired_params(draw)


def test_the_ungrouped_tpe_models_the_shared_parameters_jointly_and_every_draw_fits() -> None:
    """`--sampler tpe-nogroup`: the engine's TPE (repaired values, multivariate) without grouping: one joint model
    over the parameters every trial has, so its relative space is what all trials share, not a method's options;
    the grouped default models each conditional sub-space too. Draws in the unified space fit the budget."""
    from autopeft.search.samplers import RepairedTPE, make_sampler
    from autopeft.space import load_space, sample_parts

    spec = backbone_spec(VIT)
    space = load_space("unified")
    budget = parse_budget("0.5%", spec)
    relative = {}
    for name in ("tpe", "tpe-nogroup"):
        sampler = make_sampler(name, seed=0)
        assert isinstance(sampler, RepairedTPE) and sampler._multivariate
        study = optuna.create_study(sampler=sampler, directions=["maximize"])
        for i in range(8):
            trial = study.ask()
            sample_parts(trial, space, spec, budget)
            assert trial.user_attrs["peft_params"] <= budget.limit
            study.tell(trial, i / 10)
        shared = set.intersection(*(set(t.params) for t in study.trials))
        relative[name] = set(sampler.infer_relative_search_space(study, study.trials[-1]))
        if name == "tpe-nogroup":
            assert not sampler._group and relative[name] == shared, (relative[name] ^ shared)
    assert relative["tpe"] > relative["tpe-nogroup"]  # the grouped one also models the conditional sub-spaces


def test_a_mixed_baseline_keeps_its_method_and_the_sampler_draws_the_rest(tmp_path) -> None:
    """`--baseline-mix`: an enqueued baseline fixes only its own method's decisions (LoRA's rank on every block in
    `compact`: its depth, side and rank), the other places are drawn, and the whole fits the budget."""
    from autopeft.search.engine import SamplePlan

    url = f"sqlite:///{tmp_path}/studies.db"
    s = SearchSettings(study="m", dataset="digits", backbone=VIT, budget="2%", storage=url, trials=8, space="compact",
                       baseline_mix=True, sampler="random")
    prep = prepare(s)
    study, _ = create_or_resume(prep)
    sample = SamplePlan(prep.space, prep.spec, prep.budget, s.epochs)
    seen = {}
    for _ in range(5):
        trial = study.ask()
        name = trial.user_attrs[st.ATTR_BASELINE]
        config = sample(trial)["autopeft"]
        plan = PeftPlan.from_dict(config["plan"])
        assert config["peft_params"] <= prep.budget.limit
        seen[name] = {spec.name for specs in plan.blocks.values() for spec in specs}
        study.tell(trial, [0.5, config["peft_params"]])
    assert "lora" in seen["lora"] and "adapter" in seen["adapter"]
    assert any(len(methods) > 1 for methods in seen.values()), seen  # combined with other methods
