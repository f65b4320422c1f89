"""`--warm-start`: the Pareto plans of another study that fit this one's backbone and budget are enqueued first."""

from __future__ import annotations

import optuna
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
