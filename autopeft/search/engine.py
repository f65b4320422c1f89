"""The search engine: a Ray Tune Tuner with OptunaSearch over the define-by-run space, ASHA early stopping and an
Optuna RDB storage that holds the study.

The storage is the durable state of a study: every trial's plan, parameters, curve, cost, status and failure reason
are written there as the trial ends, so `--resume` continues from it after any crash (trials left RUNNING are marked
FAIL and re-run), and `results`, `export` and `report` read it without Ray.

Early stopping: ASHA stops a trial after some epochs with its low-fidelity accuracy; OptunaSearch would tell Optuna
that trial as COMPLETE with those values, putting under-trained plans on the Pareto front. `FidelityAwareSearch`
tells such trials as PRUNED instead, so only full-fidelity trials carry objective values.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from autopeft.backbones import BackboneSpec
from autopeft.budget import Budget
from autopeft.errors import AutopeftError
from autopeft.plan import PeftPlan
from autopeft.search import storage as st
from autopeft.search.settings import OBJECTIVES, SearchSettings
from autopeft.search.trainable import TrialSettings, run_trial
from autopeft.space import SearchSpace, plan_overhead, sample_hparams, sample_plan

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class SamplePlan:
    """The define-by-run function: an Optuna trial -> the trial's plan and hyper-parameters (no heavy work).

    A trial enqueued with a `plan` user attribute (baselines, warm start) trains that plan as it is.
    """

    space: SearchSpace
    spec: BackboneSpec
    budget: Budget
    epochs: int

    def __call__(self, trial: Any) -> dict[str, Any]:
        preset = trial.user_attrs.get(st.ATTR_PLAN)
        if preset is not None:
            plan = PeftPlan.from_dict(preset)
            trial.set_user_attr(st.ATTR_PARAMS, plan.count(self.spec))
        else:
            plan = sample_plan(trial, self.space, self.spec, self.budget)
        params = plan.count(self.spec)
        hparams = sample_hparams(trial, self.space)
        overhead = plan_overhead(plan, self.spec)
        trial.set_user_attr(st.ATTR_PERCENT, 100.0 * params / self.spec.backbone_params)
        trial.set_user_attr(st.ATTR_MAX_EPOCHS, self.epochs)
        trial.set_user_attr(st.ATTR_OVERHEAD, overhead)
        trial.set_user_attr(st.ATTR_HPARAMS, hparams)
        return {"autopeft": {"plan": plan.to_dict(), "peft_params": params, "overhead": overhead,
                             "hparams": hparams, "number": trial.number}}


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class FidelityAwareSearch(OptunaSearch):
        """OptunaSearch that records early-stopped trials as PRUNED and failures with their reason."""

        def __init__(self, *args, max_epochs: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.max_epochs = max_epochs

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            r = result or {}
            epochs = int(r.get("epoch", 0) or 0)
            ot_trial.set_user_attr(st.ATTR_CURVE, list(r.get("curve") or []))
            ot_trial.set_user_attr(st.ATTR_EPOCHS, epochs)
            ot_trial.set_user_attr(st.ATTR_SECONDS, float(r.get("seconds", 0.0) or 0.0))
            ot_trial.set_user_attr(st.ATTR_NODE, str(r.get("node", "")))
            reason = r.get("fail_reason") or ("the trial's worker process failed; see the Ray logs" if error else None)
            if reason:
                ot_trial.set_user_attr(st.ATTR_REASON, str(reason))
                self._tell(trial_id, ot_trial, TrialState.FAIL)
            elif epochs < self.max_epochs or r.get("val_acc") is None:
                self._tell(trial_id, ot_trial, TrialState.PRUNED)  # stopped early: low-fidelity values are not kept
            else:
                super().on_trial_complete(trial_id, result, error)

        def _tell(self, trial_id: str, ot_trial: Any, state: TrialState) -> None:
            self._ot_study.tell(ot_trial, None, state=state)
            self._completed_trials.add(trial_id)

        # The Optuna storage is the durable state; Ray's searcher checkpoints are not needed to resume.
        def save(self, checkpoint_path: str) -> None:
            return None

        def restore(self, checkpoint_path: str) -> None:
            return None

    return FidelityAwareSearch


def _quiet(factory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return factory(**kwargs)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    factories = {
        # group=True: TPE models each conditional sub-space (a method's options) on the trials that used it
        "tpe": lambda: _quiet(optuna.samplers.TPESampler,seed=seed, multivariate=True, group=True, constant_liar=True,
                                                  n_startup_trials=4),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    if name not in factories:
        raise AutopeftError(f"unknown sampler '{name}'; choose one of: {', '.join(factories)}")
    return factories[name]()


@dataclass
class Prepared:
    """Everything validated before anything is created on disk or started."""

    settings: SearchSettings
    spec: BackboneSpec
    budget: Budget
    space: SearchSpace
    storage_url: str
    num_classes: int
    baselines: list[tuple[str, PeftPlan]] = field(default_factory=list)


def create_or_resume(prep: Prepared) -> tuple[optuna.Study, int]:
    """Create the study (new) or reopen it (resume); return it and how many trials remain to run."""
    s = prep.settings
    store = st.open_storage(prep.storage_url)
    metrics = [OBJECTIVES[o][0] for o in s.objectives]
    directions = ["maximize" if OBJECTIVES[o][1] == "max" else "minimize" for o in s.objectives]
    if s.resume:
        study = optuna.load_study(study_name=s.study, storage=store)
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            raise AutopeftError(f"study '{s.study}' was created with other objectives; resume with the same ones")
        requeue_interrupted(study)
    else:
        study = optuna.create_study(study_name=s.study, storage=store, directions=directions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metrics)
        study.set_user_attr(st.STUDY_SETTINGS, prep.settings.stored(prep))
        for name, plan in prep.baselines[: s.trials]:  # a short study runs only the first baselines
            study.enqueue_trial(_baseline_params(prep), user_attrs={st.ATTR_PLAN: plan.to_dict(),
                                                                    st.ATTR_BASELINE: name})
        if s.warm_start:
            enqueue_warm_start(study, prep)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and
                   not t.user_attrs.get("interrupted")) for t in study.get_trials(deepcopy=False))
    return study, max(0, s.trials - finished)


def _baseline_params(prep: Prepared) -> dict[str, Any]:
    """Baselines train at the centre of each searched hyper-parameter range (geometric for log ranges)."""
    out = {}
    for name, domain in prep.space.training:
        if domain.searched and getattr(domain, "low", None) is not None:
            lo, hi = float(domain.low), float(domain.high)
            out[name] = math.sqrt(lo * hi) if getattr(domain, "log", False) and lo > 0 else (lo + hi) / 2
    return out


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a dead driver as FAIL and enqueue the same trials again."""
    redo = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(t._trial_id, st.ATTR_REASON, "interrupted; re-run on resume")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        attrs = {k: t.user_attrs[k] for k in (st.ATTR_BASELINE,) if k in t.user_attrs}
        if st.ATTR_BASELINE in attrs:
            attrs[st.ATTR_PLAN] = t.user_attrs[st.ATTR_PLAN]
        study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
        redo.append(t.number)
    return redo


def enqueue_warm_start(study: optuna.Study, prep: Prepared) -> int:
    """Enqueue the Pareto plans of another study that fit this budget (over-budget ones are left out)."""
    from autopeft.pareto import pareto_front

    s = prep.settings
    _, records = st.load_records(s.warm_start, prep.storage_url if not s.warm_storage else s.warm_storage)
    n = 0
    for r in pareto_front(records):
        plan = PeftPlan.from_dict(r.plan)
        try:
            if plan.count(prep.spec) > prep.budget.limit:
                continue
        except AutopeftError:
            continue
        hp = {k: v for k, v in r.params.items() if k in dict(prep.space.training)}
        study.enqueue_trial(hp, user_attrs={st.ATTR_PLAN: plan.to_dict(), "warm_start": f"{s.warm_start}#{r.number}"})
        n += 1
    return n


def run(prep: Prepared, study: optuna.Study, remaining: int, callbacks: list | None = None) -> None:
    """Run `remaining` trials on Ray Tune (a local instance, or the cluster at `settings.address`)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = prep.settings
    if remaining <= 0:
        return
    # a failing trial's final report carries its reason and no accuracy; the scheduler must accept it
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if s.address:
            ray.init(address=s.address, **kwargs)
        else:
            ray.init(num_cpus=s.local_cpus(), num_gpus=None, **kwargs)
        started = True
    try:
        check_resources(s, ray.cluster_resources())
        trial_settings = TrialSettings(dataset=s.dataset, backbone=s.backbone, epochs=s.epochs, weights=s.weights,
                                       data_root=s.data_root, seed=s.seed)
        searcher = _searcher_class()(
            space=SamplePlan(prep.space, prep.spec, prep.budget, s.epochs),
            metric=[OBJECTIVES[o][0] for o in s.objectives],
            mode=[OBJECTIVES[o][1] for o in s.objectives],
            sampler=make_sampler(s.sampler, s.seed),
            study_name=s.study,
            storage=st.open_storage(prep.storage_url),  # a plain RDBStorage: Ray pickles the searcher
            max_epochs=s.epochs,
        )
        scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_acc", mode="max", max_t=s.epochs,
                                  grace_period=min(s.grace_epochs, s.epochs), reduction_factor=s.reduction_factor)
        trainable = tune.with_resources(tune.with_parameters(run_trial, settings=trial_settings),
                                        {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
        workdir = tempfile.mkdtemp(prefix=f"autopeft-{s.study}-")
        try:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                                            max_concurrent_trials=s.concurrency),
                run_config=tune.RunConfig(name=s.study, storage_path=workdir, verbose=0, callbacks=callbacks or [],
                                          log_to_file=True),
            )
            tuner.fit()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if started:
            ray.shutdown()


def check_resources(s: SearchSettings, resources: dict[str, float]) -> None:
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if s.gpus_per_trial > gpus:
        raise AutopeftError(f"--gpus-per-trial {s.gpus_per_trial:g} is more than the {gpus:g} GPU(s) the Ray "
                            "cluster has; lower it (fractions like 0.5 share a GPU) or add GPU nodes")
    if s.cpus_per_trial > cpus:
        raise AutopeftError(f"--cpus-per-trial {s.cpus_per_trial:g} is more than the {cpus:g} CPU(s) the Ray "
                            "cluster has; lower it")
