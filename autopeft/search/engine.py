"""The search engine: a Ray Tune Tuner with OptunaSearch over the define-by-run space, ASHA early stopping and an
Optuna RDB storage that holds the study.

The storage is the durable state of a study: every trial's plan, parameters, curve, cost, status and failure reason
are written there as the trial ends, so `--resume` continues from it after any crash (trials whose driver died are
marked FAIL and re-run, see `liveness`), and `results`, `export` and `report` read it without Ray. Several drivers
may share a study; each stops once the study holds the requested number of trials.

Early stopping: ASHA stops a trial after some epochs with its low-fidelity accuracy; OptunaSearch would tell Optuna
that trial as COMPLETE with those values, putting under-trained plans on the Pareto front. `FidelityAwareSearch`
tells such trials as PRUNED instead, so only full-fidelity trials carry objective values.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from autopeft.backbones import BackboneSpec
from autopeft.budget import Budget
from autopeft.errors import AutopeftError, UnsupportedBackbone
from autopeft.objectives import objectives_of
from autopeft.plan import PeftPlan
from autopeft.search import storage as st
from autopeft.search.baselines import baseline_hparams
from autopeft.search.cluster import check_resources, ray_log_path, ray_session  # noqa: F401  (check_resources: also here)
from autopeft.search.epoch_cap import EpochCount, capped, spent_epochs
from autopeft.search.liveness import ATTR_DRIVER, SETTLE_S, Heartbeat, interrupted, this_driver
from autopeft.search.recovery import (
    ATTR_INTERRUPTED,
    close_abandoned,
    close_uncounted,
    lost_reason,
    remove_run_folder,
    retry_recorder,
)
from autopeft.search.samplers import make_sampler
from autopeft.search.settings import SearchSettings
from autopeft.search.study_settings import StudySettings
from autopeft.search.trainable import DIVERGED, TrialSettings, run_trial
from autopeft.space import SearchSpace, plan_overhead, sample_hparams, sample_plan
from autopeft.space.bound import bind, is_plan_param
from autopeft.space.sampler import expressed_parts, fill_param

optuna.logging.set_verbosity(optuna.logging.WARNING)
logger = logging.getLogger(__name__)


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
        trial.set_user_attr(ATTR_DRIVER, this_driver())  # first: a RUNNING trial without it counts as orphaned
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




def _searcher_class() -> type:
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class FidelityAwareSearch(OptunaSearch):
        """OptunaSearch that records early-stopped trials as PRUNED and failures with their reason.

        With `target`, it stops proposing trials once the study holds that many finished or running trials, counted
        in the storage: several drivers sharing one study (`--resume` on a second machine) end at the requested
        count together. Every write is retried (`retry`), and no outcome is dropped silently.
        """

        def __init__(self, *args: Any, max_epochs: int, target: int | None = None, epoch_cap: int | None = None,
                     spent: int = 0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.max_epochs = max_epochs
            self.target = target
            self.epoch_cap, self.epochs = epoch_cap, EpochCount(spent)  # --max-epochs (see epoch_cap)
            self.lost: dict[str, list[str]] = {}  # Ray trial id -> the nodes its lost workers ran on (retried)

        @property
        def study(self) -> optuna.Study:
            """The Optuna study (set up by OptunaSearch's constructor; None only in a pickled copy)."""
            assert self._ot_study is not None, "a searcher restored from tuner.pkl cannot run a search"
            return self._ot_study

        def running_trial_ids(self) -> list[int]:
            """Storage ids of the trials this driver asked and has not told yet (the heartbeat's list)."""
            done = set(self._completed_trials)
            return [t._trial_id for tid, t in list(self._ot_trials.items()) if tid not in done]

        def suggest(self, trial_id: str) -> dict | None:
            if self.target is not None and trial_id not in self._ot_trials:
                finished, running = st.retry(lambda: tally(self.study.get_trials(deepcopy=False)))
                if finished + running >= self.target:
                    return Searcher.FINISHED  # type: ignore[return-value]  # Ray's documented end signal, a str
            if self.epoch_cap is not None and trial_id not in self._ot_trials:
                mine = len(self.running_trial_ids())
                if not self.epochs.room_for_another(self.epoch_cap, mine):
                    # no epoch left for another trial: wait for the running ones, end when none runs
                    return None if mine else Searcher.FINISHED  # type: ignore[return-value]
            asked = datetime.datetime.now()
            for attempt in range(3):
                try:
                    config = st.retry(lambda: super(FidelityAwareSearch, self).suggest(trial_id))
                    if st.outage.seen_since(asked):  # an ask the storage dropped may have left a trial behind
                        close_abandoned(self.study, asked, {t._trial_id for t in self._ot_trials.values()})
                    break
                except optuna.exceptions.UpdateFinishedTrialError:
                    # another driver took the trial for orphaned in the instant before it was stamped: ask anew
                    self._ot_trials.pop(trial_id, None)
                    if attempt == 2:
                        raise
            ot_trial = self._ot_trials.get(trial_id)
            storage = self.study._storage
            if ot_trial is not None and isinstance(storage, BaseHeartbeat):  # RDB storages (Optuna wraps them)
                st.retry(lambda: storage.record_heartbeat(ot_trial._trial_id))
            return config

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            """Each epoch's value to a single-objective study (a failing trial's last report carries none)."""
            self.epochs.see(trial_id, result)
            if isinstance(self.metric, str) and result.get(self.metric) is not None:
                st.retry(lambda: super(FidelityAwareSearch, self).on_trial_result(trial_id, result))

        def note_retry(self, trial_id: str, node: str) -> None:
            """Ray re-runs the trial (its worker or node was lost): keep the count and the node on the trial."""
            lost = self.lost.setdefault(trial_id, [])
            lost.append(node)
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None:
                storage = self.study._storage
                st.retry(lambda: storage.set_trial_user_attr(ot_trial._trial_id, st.ATTR_RETRIES, len(lost)))
                st.retry(lambda: storage.set_trial_user_attr(ot_trial._trial_id, st.ATTR_LOST_NODES, list(lost)))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            r = result or {}
            self.epochs.see(trial_id, r)
            epochs = int(r.get("epoch", 0) or 0)
            curve = [float(v) for v in r.get("curve") or []]
            attrs = {st.ATTR_CURVE: curve, st.ATTR_EPOCHS: epochs,
                     st.ATTR_SECONDS: float(r.get("seconds", 0.0) or 0.0), st.ATTR_NODE: str(r.get("node", "")),
                     st.ATTR_GPUS: [str(g) for g in r.get("gpus") or []]}
            if r.get("resumed_from"):
                attrs[st.ATTR_RESUMED_FROM] = int(r["resumed_from"])
            attrs[st.ATTR_TRAINED] = self.epochs.trained(trial_id)
            reason = r.get("fail_reason") or (lost_reason(len(self.lost.get(trial_id, []))) if error else None)
            values = None
            last = r.get(self.metric) if isinstance(self.metric, str) else None
            if reason and str(reason).startswith(DIVERGED) and curve:
                # a trial that diverged stopped early as ASHA's stops do, with its reason: the sampler learns from
                # it (Optuna's TPE ranks stopped trials by their last value and ignores failed ones)
                attrs[st.ATTR_REASON] = str(reason)
                state, last = TrialState.PRUNED, (curve[-1] if isinstance(self.metric, str) else None)
            elif reason:
                attrs[st.ATTR_REASON] = str(reason)
                state = TrialState.FAIL
            elif epochs < self.max_epochs or r.get("val_acc") is None:
                state = TrialState.PRUNED  # stopped early: low-fidelity values are not kept
            else:
                state = TrialState.COMPLETE
                values = [r.get(m) for m in self.metric] if isinstance(self.metric, list) else r.get(self.metric)


            def record() -> None:
                for key, value in attrs.items():
                    ot_trial.set_user_attr(key, value)
                if state == TrialState.PRUNED and last is not None and epochs:
                    # the value at the epoch ASHA stopped it: Ray hands that result to on_trial_complete only
                    reported = self.study._storage.get_trial(ot_trial._trial_id).intermediate_values
                    if epochs not in reported:
                        ot_trial.report(float(last), epochs)
                try:
                    self.study.tell(ot_trial, values, state=state)
                except (ValueError, TypeError) as exc:  # objective values Optuna refuses: keep the trial, as FAIL
                    ot_trial.set_user_attr(st.ATTR_REASON, f"invalid objective values {values}: {exc}"[:300])
                    self.study.tell(ot_trial, None, state=TrialState.FAIL)

            try:
                st.retry(record)
            except optuna.exceptions.UpdateFinishedTrialError:
                # another driver took this trial for interrupted (this one was frozen past the grace period)
                logger.warning("trial %s was already finished by another driver; its result here is dropped",
                               ot_trial.number)
            self._completed_trials.add(trial_id)

        def settle_unstarted(self) -> list[int]:
            """After the experiment: trials this driver asked that Ray ended without a single result (the epoch
            cap stopped the experiment before their first epoch) are FAIL with that reason and not counted
            (ATTR_INTERRUPTED), so no RUNNING trial is left behind; returns their numbers."""
            ids = set(self.running_trial_ids())
            reason = "ended with the experiment before it reported (the study reached its epoch cap, --max-epochs)"
            settled = []
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t._trial_id in ids and st.retry(functools.partial(close_uncounted, self.study._storage,
                                                                     t._trial_id, reason)):
                    settled.append(t.number)
            return settled

        # The Optuna storage is the durable state; Ray's searcher checkpoints are not needed to resume.
        def save(self, checkpoint_path: str) -> None:
            return None

        def __getstate__(self) -> dict:
            # Ray writes the tuner, this searcher included, to tuner.pkl in its work dir for Tuner.restore, which
            # autopeft never uses. The storage, the study and the trials (which hold it) stay out of that file, so a
            # database URL and its password never reach the disk; a copy made this way cannot run a search.
            state = self.__dict__.copy()
            state.update(_storage=None, _ot_study=None, _ot_trials={})
            return state

        def restore(self, checkpoint_path: str) -> None:
            return None

    return FidelityAwareSearch


def tally(trials: list[FrozenTrial]) -> tuple[int, int]:
    """(finished, running) trials: finished are COMPLETE, PRUNED and FAIL except the interrupted ones (re-run)."""
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or
                   (t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_INTERRUPTED)) for t in trials)
    return finished, sum(t.state == TrialState.RUNNING for t in trials)


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
    train_size: int = 0  # images of the train split the trials train on
    val_size: int = 0  # images of the val split they are scored on
    changes: dict[str, Any] = field(default_factory=dict)  # --resume: settings that change (study_settings.resumed)

    def fidelity_notes(self) -> list[str]:
        """Where the trials train otherwise than the space says (`autopeft.train.fitted_config`: a batch fitted to
        a small train split, drop-path off for a backbone pretrained without it)."""
        from autopeft.search.trainable import trial_config
        from autopeft.train import fitted_config

        fixed = {name: d.value for name, d in self.space.training if not d.searched}
        config = trial_config(fixed, self.settings.epochs, self.settings.seed)
        return fitted_config(config, self.settings.backbone, self.train_size)[1] if self.train_size else []

    @property
    def study_settings(self) -> StudySettings:
        """What the study stores about itself (written once, when it is created)."""
        return StudySettings.of(self.settings, self.spec, self.budget, self.num_classes)


def create_or_resume(prep: Prepared) -> tuple[optuna.Study, int]:
    """Create the study (new) or reopen it (resume); return it and how many trials remain to run."""
    s = prep.settings
    store = st.open_storage(prep.storage_url)
    objectives = objectives_of(s.objectives)
    metrics = [o.metric for o in objectives]
    directions = [o.study_direction for o in objectives]
    if s.resume:
        study = optuna.load_study(study_name=s.study, storage=store)
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:  # same objectives
            raise AutopeftError(f"study '{s.study}' was created with other objectives; resume with the same ones")
        # an unstamped trial that gets its stamp within SETTLE_S is another live driver's, caught an instant before
        # it stamped it (two drivers resuming at once); one still unstamped is a dead driver's
        requeue_interrupted(study, settle_s=SETTLE_S)
        if prep.changes:  # they hold from the next trial on; a later --resume keeps them
            st.record_changes(study, prep.study_settings, prep.changes)
    else:
        study = optuna.create_study(study_name=s.study, storage=store, directions=directions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metrics)
        st.write_settings(study, prep.study_settings)
        bound = bind(prep.space, prep.spec)
        grid = baseline_hparams(prep.space, s.baseline_lr_scales)
        queue = [(name, plan, hp) for name, plan in prep.baselines for hp in grid]
        for name, plan, hp in queue[: s.trials]:  # a short study runs only the first baselines
            parts = expressed_parts(bound, plan, prep.budget.limit)
            if parts is not None:  # as the space's own parameters: the sampler learns from it like any draw
                fill = fill_param(bound, parts, prep.budget.limit)  # a `fill` space: the whole plan's share
                if s.baseline_mix:  # its own method's decisions only: the sampler draws the other places
                    parts = [p for p in parts if not p.empty]
                study.enqueue_trial({**bound.params(parts), **fill, **hp}, user_attrs={st.ATTR_BASELINE: name})
            else:  # a plan the space cannot express (e.g. a linear probe): trained as it is
                study.enqueue_trial(hp, user_attrs={st.ATTR_PLAN: plan.to_dict(), st.ATTR_BASELINE: name})
        if s.warm_start:
            enqueue_warm_start(study, prep)
    finished, running = tally(study.get_trials(deepcopy=False))  # running: other live drivers' trials
    return study, max(0, s.trials - finished - running)


def requeue_interrupted(study: optuna.Study, unstamped_after_s: float = 0.0, settle_s: float = 0.0) -> list[int]:
    """Mark the trials whose driver died (see `liveness`) FAIL and enqueue the same trials again.

    Trials of drivers that still run are left alone. Marking is one state change per trial, so two drivers
    re-queueing at once re-run each trial once: the second one's change fails and it enqueues nothing. A running
    driver passes `unstamped_after_s` so that a trial asked an instant ago, not yet stamped (its own), is spared;
    a driver that resumes passes `settle_s` so that another driver's trial caught in that instant is spared too.
    """
    redo = []
    storage = study._storage
    for t in interrupted(study, unstamped_after_s=unstamped_after_s, settle_s=settle_s):
        if not close_uncounted(storage, t._trial_id, "interrupted (its driver stopped); re-run"):
            continue  # it finished, or another driver re-queued it, since we looked
        attrs = {k: t.user_attrs[k] for k in (st.ATTR_BASELINE, st.ATTR_WARM_START) if k in t.user_attrs}
        drawn = any(is_plan_param(name) for name in t.params)  # its parameters give its plan again
        if st.ATTR_PLAN in t.user_attrs and attrs and not drawn:  # a preset plan (warm start, a baseline the space
            attrs[st.ATTR_PLAN] = t.user_attrs[st.ATTR_PLAN]    # cannot express) is trained as it was
        study.enqueue_trial(dict(t.params), user_attrs={**attrs, st.ATTR_RERUN_OF: t.number}, skip_if_exists=False)
        redo.append(t.number)
    if redo:
        logger.warning("trials %s were left running by a driver that stopped; marked FAIL and queued again", redo)
    return redo


def enqueue_warm_start(study: optuna.Study, prep: Prepared) -> int:
    """Enqueue the Pareto plans of another study that fit this budget (over-budget ones are left out)."""
    from autopeft.pareto import pareto_front

    s = prep.settings
    if not s.warm_start:
        return 0
    _, records = st.load_records(s.warm_start, prep.storage_url if not s.warm_storage else s.warm_storage)
    n = 0
    for r in pareto_front(records):
        plan = r.peft_plan
        try:
            if plan.count(prep.spec) > prep.budget.limit:
                continue
        except UnsupportedBackbone:  # a plan of another backbone (family or depth)
            continue
        hp = {k: v for k, v in r.params.items() if k in dict(prep.space.training)}
        study.enqueue_trial(hp, user_attrs={st.ATTR_PLAN: plan.to_dict(),
                                            st.ATTR_WARM_START: f"{s.warm_start}#{r.number}"})
        n += 1
    return n


def epoch_cap(prep: Prepared, study: optuna.Study) -> tuple[int | None, int]:
    """The study's `--max-epochs` (on --resume the stored one unless another is given: `study_settings.resumed`)
    and the epochs its finished trials (and a one-shot supernet) spent (0 without a cap)."""
    from autopeft.search import oneshot

    cap = prep.settings.max_epochs
    if cap is None:
        return cap, 0
    return cap, spent_epochs(study.get_trials(deepcopy=False)) + oneshot.spent_epochs(study)


def make_scheduler(s: SearchSettings) -> Any:
    """ASHA on val_acc (stops weak trials after `grace_epochs`), or, with early stopping off, first-in first-out:
    every trial trains all `epochs`."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not s.early_stopping:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", metric="val_acc", mode="max", max_t=s.epochs,
                         grace_period=min(s.grace_epochs, s.epochs), reduction_factor=s.reduction_factor)


def trial_settings(s: SearchSettings, checkpoint_every: int = 0) -> TrialSettings:
    """What every trial of the study gets: a trial that asked for no GPU computes on the CPU (never on a GPU
    nobody reserved for it); the CPUs it reserves beyond its thread prepare its images."""
    return TrialSettings(dataset=s.dataset, backbone=s.backbone, epochs=s.epochs, weights=s.weights,
                         data_root=s.data_root, seed=s.seed, checkpoint_every=checkpoint_every,
                         precision=s.precision, device="auto" if s.gpus_per_trial else "cpu",
                         num_workers=s.data_workers, img_size=s.img_size,
                         # read here, on the driver, so that it holds on every node of a cluster
                         stop_diverged=s.early_stopping and os.environ.get("AUTOPEFT_STOP_DIVERGED", "1") != "0")


def trial_trainable(s: SearchSettings, checkpoint_every: int = 0) -> Any:
    """The Ray Tune trainable of a study's trials (and of its cross-validation fold runs), with their resources;
    `checkpoint_every` k > 0: each trial checkpoints every k epochs."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, settings=trial_settings(s, checkpoint_every)),
                               {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial or 0.0})


def run(prep: Prepared, study: optuna.Study, remaining: int, callbacks: list | None = None,
        epochs: tuple[int | None, int] | None = None) -> None:
    """Run up to `remaining` trials on Ray Tune, until the study holds `settings.trials` finished trials.

    While it runs, a heartbeat marks this driver's trials as alive in the storage and re-queues trials whose
    driver died meanwhile (another driver of the same study).
    """
    from ray import tune

    from autopeft.search.stall import StallWatch

    s = prep.settings
    cap, spent = epochs if epochs is not None else epoch_cap(prep, study)  # `epochs`: what the caller read
    if remaining <= 0 or (cap is not None and not EpochCount(spent).room_for_another(cap, running=0)):
        return
    # a failing trial's final report carries its reason and no accuracy; the scheduler must accept it
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Ray's new console output prints an experiment table even at verbose=0; progress is ours (SearchProgress)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with ray_session(s, ray_log_path(prep.storage_url, s.study)):
        storage = st.open_storage(prep.storage_url)  # a plain RDBStorage: Ray pickles the searcher
        objectives = objectives_of(s.objectives)
        # one objective goes to Ray as a plain metric, so every epoch's value reaches the Optuna trial (Ray passes no
        # intermediate values to a multi-objective study) and a trial ASHA stops tells TPE its last value
        metric: str | list[str] = objectives[0].metric if len(objectives) == 1 else [o.metric for o in objectives]
        mode: str | list[str] = objectives[0].direction if len(objectives) == 1 else [o.direction for o in objectives]
        searcher = _searcher_class()(
            space=SamplePlan(prep.space, prep.spec, prep.budget, s.epochs),
            metric=metric,
            mode=mode,
            sampler=make_sampler(s.sampler, s.seed, enqueued=sum(
                bool(t.user_attrs.get(st.ATTR_BASELINE) or t.user_attrs.get(st.ATTR_WARM_START))
                for t in study.get_trials(deepcopy=False))),
            study_name=s.study,
            storage=storage,
            max_epochs=s.epochs,
            target=s.trials,
            epoch_cap=cap,
            spent=spent,
        )
        scheduler = make_scheduler(s) if cap is None else capped(make_scheduler(s), cap, spent)
        heartbeat = Heartbeat(storage, searcher.running_trial_ids,
                              tick=lambda: requeue_interrupted(study, unstamped_after_s=60.0))
        workdir = tempfile.mkdtemp(prefix=f"autopeft-{s.study}-")
        checkpoints = s.checkpoints_to(workdir)
        trainable = trial_trainable(s, s.checkpoint_every if checkpoints else 0)
        # a storage of the user's may hold other runs: this driver's trials go in a folder of their own
        name = s.study if checkpoints in (None, workdir) else f"{s.study}-{uuid.uuid4().hex[:8]}"
        heartbeat.start()
        try:
            tuner = tune.Tuner(
                trainable,
                # reuse_actors: a worker process runs trial after trial, so torch/timm imports and CUDA set-up are
                # paid once per worker, not once per trial (a stopped trial ends at its report, nothing lingers)
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                                            max_concurrent_trials=s.concurrency, reuse_actors=True),
                # a trial raises nothing by itself (run_trial reports its failures), so what Ray retries is a lost
                # worker or node: the trial runs again, where there are resources, and is one trial of the study
                run_config=tune.RunConfig(name=name, storage_path=checkpoints or workdir, verbose=0,
                                          callbacks=[*(callbacks or []), retry_recorder(searcher),
                                                     StallWatch(s.stall_floor)],
                                          failure_config=tune.FailureConfig(max_failures=s.max_retries),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          log_to_file=True),
            )
            with warnings.catch_warnings():
                # Ray warns when drawing a trial takes over a second: SamplePlan fits the draw to the budget (the
                # plan's parameter counts), a second on a loaded machine against minutes of training; it told
                # users nothing they could act on
                warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument")
                tuner.fit()
            searcher.settle_unstarted()
        finally:
            heartbeat.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            if checkpoints not in (None, workdir):
                remove_run_folder(str(checkpoints), name)
