"""One-shot search (`--strategy oneshot`): a weight-sharing supernet of the space ranks thousands of plans for the
cost of about one training run, and the best few then train alone as the study's ordinary trials.

1. Supernet (`train_supernet`): every method the space may place on a block, on that block, at the cover of the
   space's option values (`autopeft.supernet`). Each optimiser step trains one sub-plan the space's own sampler
   draws under the budget (Optuna's RandomSampler, seeded by the seed and the step, so a resumed run draws what a
   straight run draws). It runs as one Ray Tune trial (a GPU on a cluster, like any trial) and saves its state every
   epoch; `--resume` and a re-run after a lost worker go on from there.
2. Scoring (`score_candidates`): an in-process Optuna TPE study over the same space draws `candidates` sub-plans;
   each is scored by its val accuracy as a slice of the supernet (forward passes only; ties: the lower val loss).
3. Finalists: the `finalists` best distinct plans are enqueued into the study with their `supernet_score` and train
   alone on Ray Tune with early stopping, as the trials of a trial search do; results, export, report and dashboard
   read the study as any other.

Compute, in epochs of training (`--max-epochs` caps the whole study): the supernet's epochs plus the scoring passes
(a forward pass over val costs about a third of a training pass over as many images) plus the finalists' epochs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autopeft.errors import AutopeftError
from autopeft.plan import PeftPlan
from autopeft.records import ATTR_SUPERNET_SCORE

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY_ATTR = "oneshot"  # the study's record of its supernet phase (finalists, cost)
FORWARD_SHARE = 1.0 / 3.0  # a forward pass's share of a training step's compute (forward + backward ≈ 3 forwards)


@dataclass(frozen=True)
class SupernetJob:
    """What the supernet trial needs (plain values: Ray ships it to a worker)."""

    dataset: str
    backbone: str
    space: str
    budget_limit: int
    epochs: int
    candidates: int | None  # None: `candidates_for` one trial's compute
    finalists: int
    trial_epochs: int = 10  # a finalist's epochs (what `candidates_for` pays for)
    seed: int = 0
    weights: str | None = None
    data_root: str | None = None
    state_path: str | None = None  # where its state goes every epoch (None: nowhere, no resume)
    # each step at its sub-plan's own methods' learning rate relative to the cover's; off: every step at the cover
    # plan's rate. Measured off (BENCHMARKS.md "One-shot search": it lowered Kendall's tau on one task of two)
    plan_rates: bool = False
    precision: str = "auto"  # as the study's trials (autopeft.train.resolve_precision)
    device: str = "auto"  # as the study's trials (TrialSettings.device)
    num_workers: int = 0  # as the study's trials (TrialSettings.num_workers)
    img_size: int | None = None  # as the study's trials (TrialSettings.img_size)


def supernet_hparams(space: Any, searched_only: bool = False) -> dict[str, Any]:
    """The training hyper-parameters of the supernet and of its finalists: the space's fixed ones and the centre of
    its searched ones (the baselines' choice, `autopeft.search.baselines`); `searched_only`: the latter alone (the
    parameters a finalist is enqueued with)."""
    from autopeft.search.baselines import baseline_hparams

    fixed = {} if searched_only else {name: d.value for name, d in space.training if not d.searched}
    return {**fixed, **baseline_hparams(space, (1.0,))[0]}


class SubPlans:
    """Sub-plans of the space under the budget, drawn by its own define-by-run sampler: `draw(key)` asks a
    RandomSampler seeded by (seed, key), so the same key gives the same plan in any run."""

    def __init__(self, space: Any, spec: Any, limit: int, seed: int):
        from autopeft.space import bind

        self.space, self.spec, self.limit, self.seed = space, spec, limit, seed
        self.bound = bind(space, spec)
        self.study = optuna.create_study()

    def draw(self, key: int) -> PeftPlan:
        from autopeft.space import sample_parts

        self.study.sampler = optuna.samplers.RandomSampler(seed=(self.seed * 1_000_003 + key) % 2**32)
        trial = self.study.ask()
        plan = self.bound.plan(sample_parts(trial, self.space, self.spec, self.limit))
        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # nothing to learn from: a plain draw
        return plan


@dataclass
class TrainedSupernet:
    run: Any  # autopeft.train.TrainSetup: the model, its device and the val batches
    net: Any  # autopeft.supernet.Supernet
    history: list[dict]
    eval_batch_size: int
    bound: Any  # autopeft.space.BoundSpace: the space on the backbone, as the sub-plans were drawn from it


def train_supernet(job: SupernetJob, report: Any = None, resume: dict[str, Any] | None = None) -> TrainedSupernet:
    """Train the supernet of `job.space` for `job.epochs` epochs, one drawn sub-plan per step; `report` gets each
    epoch's metrics (with the run's state under `state`, but after the last epoch), val measured on one fixed draw."""
    from autopeft.backbones import backbone_spec
    from autopeft.data import data_config, load_dataset
    from autopeft.learning_rate import plan_lr
    from autopeft.search.trainable import trial_config
    from autopeft.space import check_feasible, load_space
    from autopeft.supernet import Supernet, cover_plan
    from autopeft.train import run_epochs, set_up

    space, spec = load_space(job.space), backbone_spec(job.backbone, job.img_size)
    bound = check_feasible(space, spec, job.budget_limit)
    cover = cover_plan(bound)
    config = trial_config(supernet_hparams(space), job.epochs, job.seed, job.precision, device=job.device,
                          num_workers=job.num_workers, img_size=job.img_size)
    data = load_dataset(job.dataset, job.data_root, augment=config.augment, seed=job.seed,
                        **data_config(job.backbone, job.img_size))
    slices: dict = {}
    run = set_up(job.backbone, cover, data, config, weights=job.weights, slices=slices)
    net = Supernet(cover, slices)
    draws = SubPlans(space, spec, job.budget_limit, job.seed)
    probe = draws.draw(-1)  # the sub-plan each epoch's val accuracy is measured on
    cover_lr = plan_lr(cover, spec)

    def step(i: int) -> float | None:
        plan = draws.draw(i)
        net.activate(plan)
        # each sub-plan at its own methods' rate relative to the cover's (autopeft.learning_rate), as alone
        return plan_lr(plan, spec) / cover_lr if job.plan_rates else None

    history = run_epochs(run, config, report, resume=resume, checkpoint_every=1, before_step=step,
                         before_eval=lambda: net.activate(probe))
    return TrainedSupernet(run=run, net=net, history=history, eval_batch_size=config.eval_batch_size, bound=bound)


def score_candidates(trained: TrainedSupernet, job: SupernetJob, progress: Any = None) -> dict[str, Any]:
    """Score `job.candidates` sub-plans drawn by TPE on val with the supernet's weights; the best `job.finalists`
    distinct plans (val accuracy, then the lower val loss) with their space parameters, score and count."""
    from autopeft.space import repaired_params, sample_parts
    from autopeft.train import evaluate

    bound = trained.bound
    space, spec = bound.space, bound.spec
    run, net = trained.run, trained.net
    seen: dict[str, tuple[float, float]] = {}

    def objective(trial: optuna.Trial) -> float:
        plan = bound.plan(sample_parts(trial, space, spec, job.budget_limit))
        key = plan.to_json()
        if key not in seen:
            net.activate(plan)
            loss, acc = evaluate(run.model, run.eval_src, trained.eval_batch_size, run.device, run.forward,
                                 run.precision)
            seen[key] = (acc, loss)
            if progress is not None:
                progress(len(seen))
        trial.set_user_attr("val_loss", seen[key][1])
        return seen[key][0]

    n = job.candidates or candidates_for(job.trial_epochs, len(run.train_src), len(run.eval_src), job.finalists)
    sampler = optuna.samplers.TPESampler(seed=job.seed, n_startup_trials=max(10, n // 10))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=n)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    done.sort(key=lambda t: (-float(t.value or 0.0), float(t.user_attrs["val_loss"]), int(t.user_attrs["peft_params"])))
    finalists, plans = [], set()
    for t in done:
        key = json.dumps(t.user_attrs["plan"], sort_keys=True)
        if key in plans:
            continue
        plans.add(key)
        finalists.append({"params": repaired_params(t), "score": float(t.value or 0.0),
                          "val_loss": float(t.user_attrs["val_loss"]), "plan": t.user_attrs["plan"],
                          "peft_params": int(t.user_attrs["peft_params"])})
        if len(finalists) == job.finalists:
            break
    return {"finalists": finalists, "scored": len(done), "distinct": len(seen)}


MAX_CANDIDATES = 2000  # TPE's draws slow down with the study's length: beyond this, scoring costs more in sampling


def candidates_for(trial_epochs: int, train_size: int, val_size: int, finalists: int) -> int:
    """The scoring passes that cost as much as one trial's training (`trial_epochs` epochs over `train_size` images),
    at least `finalists`, at most MAX_CANDIDATES: 45 for 15 epochs on as many val as train images, 1,200 for VTAB-1k's
    100 epochs on 800 train and 200 val images."""
    passes = trial_epochs * train_size / (FORWARD_SHARE * max(val_size, 1))
    return int(min(MAX_CANDIDATES, max(finalists, round(passes))))


def cost_epochs(supernet_epochs: int, passes: int, val_size: int, train_size: int) -> float:
    """The supernet phase in epochs of training: its epochs plus `passes` forward passes over val."""
    return supernet_epochs + passes * FORWARD_SHARE * val_size / max(train_size, 1)


# -- the Ray Tune trial ------------------------------------------------------------------------------------------------


def _load_state(path: str | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001  a damaged file: one line, not a traceback
        raise AutopeftError(f"the supernet state {path} cannot be read ({' '.join(str(exc).split())[:160]}); delete "
                            "it to train the supernet from its start") from None


def _save_state(path: str, state: dict[str, Any]) -> None:
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    part = f"{path}.part"
    torch.save(state, part)
    os.replace(part, path)  # whole or not at all


def run_supernet(config: dict, job: SupernetJob) -> None:
    """The supernet phase as a Ray Tune function trainable: train (from its saved state when there is one), report
    every epoch, score, and report the finalists; a failure is reported with its reason, not raised."""
    from ray import tune

    from autopeft.search.trainable import _failure, _node

    start = time.perf_counter()
    base: dict[str, Any] = {"phase": "supernet", "node": _node()}
    try:
        resume = _load_state(job.state_path)
        if resume is not None:
            base["resumed_from"] = int(resume["epoch"])

        def report(m: dict[str, Any]) -> None:
            if "state" in m and job.state_path:
                _save_state(job.state_path, m["state"])
            tune.report({**base, "epoch": m["epoch"], "val_acc": m["val_acc"], "train_loss": m["train_loss"],
                         "seconds": time.perf_counter() - start})

        trained = train_supernet(job, report, resume)
        scored = score_candidates(trained, job)
        train_size, val_size = len(trained.run.train_src), len(trained.run.eval_src)
        tune.report({**base, "phase": "scored", "epoch": job.epochs + 1, "finalists": json.dumps(scored["finalists"]),
                     "scored": scored["scored"], "distinct": scored["distinct"],
                     "cost_epochs": cost_epochs(job.epochs, scored["distinct"], val_size, train_size),
                     "seconds": time.perf_counter() - start})
    except Exception as exc:  # noqa: BLE001  reported to the driver, which stops with it
        tune.report({**base, "fail_reason": _failure(exc), "seconds": time.perf_counter() - start})


def state_path(s: Any, storage_url: str) -> str | None:
    """Where the supernet keeps its state: beside the study's SQLite file, or in `--checkpoint-storage` when that
    is a path; None (no resume) without checkpoints, for an object-store URI, or on a cluster without a shared path."""
    if not s.checkpoint_every:
        return None
    if s.checkpoint_storage:
        return None if "://" in s.checkpoint_storage else str(Path(s.checkpoint_storage) / f"{s.study}.supernet.pt")
    if s.on_cluster:
        return None
    from autopeft.search.cluster import beside_study

    return str(beside_study(storage_url, s.study, ".supernet.pt"))


def supernet_epochs(s: Any) -> int:
    return s.supernet_epochs or s.epochs


def check(prep: Any) -> None:
    """Before anything is created: the space's methods all slice (one line naming the others), and a --max-epochs
    leaves room for the supernet, its scoring passes (at most --candidates, each a forward pass over val, counted
    in epochs of training as `cost_epochs` counts them) and one finalist."""
    from autopeft.space import bind
    from autopeft.supernet import cover_specs

    cover_specs(bind(prep.space, prep.spec))
    s = prep.settings
    if s.max_epochs is None:
        return
    passes = s.candidates or candidates_for(s.epochs, prep.train_size, prep.val_size, s.finalists)
    phase = math.ceil(cost_epochs(supernet_epochs(s), passes, prep.val_size, prep.train_size))
    if s.max_epochs < phase + s.epochs:
        raise AutopeftError(f"--max-epochs {s.max_epochs} leaves no room for the supernet's {supernet_epochs(s)} "
                            f"epochs, its scoring of {passes} candidates ({phase - supernet_epochs(s)} epochs' "
                            f"compute) and one finalist's {s.epochs}; give at least {phase + s.epochs} (or fewer "
                            "--candidates)")


def run_phase(prep: Any, study: optuna.Study, console: Any) -> None:
    """Train and score the supernet on Ray Tune (unless the study already holds its finalists) and enqueue the
    finalists into the study."""
    from ray import tune

    from autopeft.search.progress import SupernetProgress

    s = prep.settings
    done = study.user_attrs.get(STUDY_ATTR)
    if done and done.get("enqueued"):
        return
    if not done:
        path = state_path(s, prep.storage_url)
        if path and not s.resume:  # a new study starts afresh: not from a state an earlier one of its name left
            Path(path).unlink(missing_ok=True)
        job = SupernetJob(dataset=s.dataset, backbone=s.backbone, space=s.space, budget_limit=prep.budget.limit,
                          epochs=supernet_epochs(s), candidates=s.candidates, finalists=s.finalists, seed=s.seed,
                          weights=s.weights, data_root=s.data_root, state_path=path, trial_epochs=s.epochs,
                          precision=s.precision, device="auto" if s.gpus_per_trial else "cpu",
                          num_workers=s.data_workers, img_size=s.img_size)
        n = job.candidates or "as many sub-plans as one trial's compute pays for"
        console.print(f"one-shot: a supernet of space {prep.space.name} trains {job.epochs} epochs (one sub-plan "
                      f"a step), then {n} are scored on val with its weights and the best "
                      f"{job.finalists} train alone as trials"
                      + ("" if path else "; its state is kept nowhere (no --resume of the supernet)"),
                      highlight=False)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        trainable = tune.with_resources(tune.with_parameters(run_supernet, job=job),
                                        {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial or 0.0})
        workdir = tempfile.mkdtemp(prefix=f"autopeft-{s.study}-supernet-")
        try:
            grid = tune.Tuner(trainable, tune_config=tune.TuneConfig(num_samples=1),
                              run_config=tune.RunConfig(name=f"{s.study}-supernet", storage_path=workdir, verbose=0,
                                                        callbacks=[SupernetProgress(console, job.epochs)],
                                                        failure_config=tune.FailureConfig(max_failures=s.max_retries),
                                                        log_to_file=True)).fit()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        result = grid[0]
        metrics = result.metrics or {}
        if "finalists" not in metrics:
            reason = metrics.get("fail_reason") or (str(result.error).splitlines()[0] if result.error else "no result")
            raise AutopeftError(f"the supernet failed: {reason}" + ("; --resume goes on from its last epoch"
                                                                    if path else ""))
        done = {"finalists": json.loads(metrics["finalists"]), "scored": int(metrics["scored"]),
                "distinct": int(metrics["distinct"]), "supernet_epochs": job.epochs,
                "cost_epochs": float(metrics["cost_epochs"]), "seconds": float(metrics["seconds"]),
                "enqueued": False}
        study.set_user_attr(STUDY_ATTR, done)
        if path:
            Path(path).unlink(missing_ok=True)
    hp = supernet_hparams(prep.space, searched_only=True)
    for f in done["finalists"]:
        study.enqueue_trial({**f["params"], **hp}, user_attrs={ATTR_SUPERNET_SCORE: f["score"]},
                            skip_if_exists=False)
    study.set_user_attr(STUDY_ATTR, {**done, "enqueued": True})
    best = done["finalists"][0] if done["finalists"] else None
    console.print(f"supernet: {done['distinct']} distinct sub-plans scored of {done['scored']} drawn, "
                  f"{math.ceil(done['cost_epochs'])} epochs of compute; finalists enqueued: {len(done['finalists'])}"
                  + (f", best {best['score']:.4f} on val as a slice ({PeftPlan.from_dict(best['plan']).short()})"
                     if best else ""), highlight=False)


def spent_epochs(study: optuna.Study) -> int:
    """The epochs of compute the study's supernet phase spent (0 for a trial search)."""
    done = study.user_attrs.get(STUDY_ATTR) or {}
    return math.ceil(float(done.get("cost_epochs", 0.0)))


