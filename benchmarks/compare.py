"""Search against random search and hand-picked methods on one (task, budget, seed), at equal compute.

Compute is counted in training epochs (one epoch = one pass over the 800 (or 200) train images). The hand-picked
arm defines the compute R of a cell: every baseline that fits the budget (autopeft.search.baselines, the plans the
search itself enqueues) × a small learning-rate sweep × E epochs. Then, on the same unified space:

- search: `autopeft.search.search` as shipped (TPE + ASHA, the baselines enqueued first at the centre of the
  learning-rate range, Ray Tune trials); it gets enough trials to spend about R epochs, and only its trials whose
  cumulative epochs, in trial-number order, stay within R count (the rest are cut);
- random: R / E plans drawn by Optuna's RandomSampler from the same space (plan and hyper-parameters, with the
  same budget repair), each trained for all E epochs (no early stopping), in-process;
- references (not compute-matched): full fine-tuning and linear probing with the same learning-rate sweep.

Selection and test, identical for every arm: the arm's best full-fidelity trial under the budget by val accuracy
(`pareto.best_under_budget`); that plan is retrained with its hyper-parameters on train_full (train + val) for E
epochs, and its test accuracy is measured once. Hypervolume: 2-D (val accuracy up, PEFT parameters down) against
the reference (0, budget), divided by the budget (so it is in accuracy units, 1.0 at most).

In-process runs use `autopeft.train.train`, the function every search trial calls, with the hyper-parameters built
as the trainable builds them (`autopeft.search.trainable.trial_config`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from autopeft.records import TrialRecord

Job = dict[str, Any]
RECORDED_HPARAMS = ("lr", "lr_scale", "weight_decay")  # the hyper-parameters a benchmark record keeps


@dataclass(frozen=True)
class CellConfig:
    """What one comparison cell runs: a task at a budget and seed, at E epochs per full-fidelity run."""

    task: str
    budget: str
    seed: int
    backbone: str
    epochs: int
    lrs: tuple[float, ...]
    weights: str | None = None
    data_root: str | None = None
    space: str = "unified"
    grace_epochs: int = 2
    reduction_factor: int = 2
    concurrency: int = 2
    references: tuple[str, ...] = ("full", "linear")
    search_trials: int | None = None  # None: enough for the cell's compute (see run_cell)
    gpus_per_trial: float = 0.0  # of the search's Ray trials (in-process runs use the device train() picks)


@dataclass
class Arm:
    name: str
    records: list[TrialRecord] = field(default_factory=list)
    hparams: dict[int, dict[str, Any]] = field(default_factory=dict)  # trial number -> hyper-parameters
    wall_s: float = 0.0
    extra_epochs: int = 0  # compute outside its records: a one-shot study's supernet and scoring, in epochs


def run_job(job: Job) -> dict[str, Any]:
    """One in-process training run (a search-phase trial on train/val, or a final run on train_full with test).

    The data split is drawn with `data_seed` when the job has one (a final retrained with another training seed
    keeps its cell's split), else with `seed`. A job with `cv` ({folds, fold, seed}) is a cross-validation fold
    run, as `autopeft search --select cv:K` trains it: train on the other folds of train+val, its curve is the
    held-out fold's accuracy.
    """
    from autopeft.data import data_config, load_dataset
    from autopeft.plan import PeftPlan
    from autopeft.search.trainable import trial_config
    from autopeft.train import train

    start = time.perf_counter()
    data = load_dataset(job["task"], job.get("data_root"), seed=job.get("data_seed", job["seed"]),
                        **data_config(job["backbone"]))
    if job.get("cv"):
        from autopeft.data.folds import cv_splits

        data = cv_splits(data, int(job["cv"]["folds"]), int(job["cv"]["fold"]), int(job["cv"]["seed"]))
    # exactly as a search trial builds it (TrainConfig's defaults, the space's settings, the sampled ones)
    cfg = trial_config(job["hparams"], job["epochs"], job["seed"])
    final = bool(job.get("final"))
    try:
        result = train(job["backbone"], PeftPlan.from_dict(job["plan"]), data, cfg, weights=job.get("weights"),
                       train_split="train_full" if final else "train", eval_split=None if final else "val",
                       test=final)
    except Exception as exc:  # noqa: BLE001  a diverging run is a result (FAIL), not the end of the benchmark
        return {"status": "FAIL", "reason": f"{type(exc).__name__}: {exc}"[:300], "curve": [], "test_acc": None,
                "seconds": time.perf_counter() - start}
    return {"status": "COMPLETE", "curve": [float(h["val_acc"]) for h in result.history if "val_acc" in h],
            "test_acc": result.test_acc, "peft_params": result.peft_params, "seconds": time.perf_counter() - start}


def _init_worker() -> None:
    """A pool worker: one thread, as a search trial with one CPU (the workers share the machine's cores)."""
    import torch

    torch.set_num_threads(1)


def make_pool(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)


@contextmanager
def compute_session(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A local Ray instance for the search arm and a pool of `workers` in-process runners (None for one), both
    stopped on the way out."""
    import ray
    import torch

    ray.init(num_cpus=max(2, workers), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    pool = make_pool(workers) if workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()


def run_jobs(jobs: Sequence[Job], pool: ProcessPoolExecutor | None) -> list[dict[str, Any]]:
    if pool is None:
        return [run_job(j) for j in jobs]
    return list(pool.map(run_job, jobs))


def _fixed_training(space) -> dict[str, Any]:
    return {name: d.value for name, d in space.training if not d.searched}


def _base_job(c: CellConfig) -> Job:
    return dict(task=c.task, backbone=c.backbone, weights=c.weights, data_root=c.data_root, seed=c.seed,
                epochs=c.epochs)


def _records(jobs: Sequence[Job], outs: Sequence[dict[str, Any]], epochs: int, spec, tags: Sequence[dict]
             ) -> list[TrialRecord]:
    from autopeft.plan import PeftPlan

    records = []
    for i, (job, out, tag) in enumerate(zip(jobs, outs, tags, strict=True)):
        ok = out["status"] == "COMPLETE" and len(out["curve"]) == epochs
        records.append(TrialRecord(
            number=i, plan=job["plan"], peft_params=PeftPlan.from_dict(job["plan"]).count(spec),
            val_acc=out["curve"][-1] if ok else None, curve=out["curve"], epochs=len(out["curve"]) if ok else 0,
            max_epochs=epochs, status="COMPLETE" if ok else "FAIL", seconds=out["seconds"], tags=dict(tag),
            params={k: v for k, v in job["hparams"].items() if k in RECORDED_HPARAMS}))
    return records


def handpicked_jobs(c: CellConfig, spec, limit: int, space) -> tuple[list[Job], list[dict]]:
    """Every baseline fitting the budget × the learning-rate sweep (weight decay: TrainConfig's default)."""
    from autopeft.search.baselines import baseline_plans

    jobs, tags = [], []
    for name, plan in baseline_plans(spec, limit):
        for lr in c.lrs:
            jobs.append(dict(_base_job(c), plan=plan.to_dict(), hparams={**_fixed_training(space), "lr": lr}))
            tags.append({"method": name})
    return jobs, tags


def reference_jobs(c: CellConfig, spec, space) -> tuple[list[Job], list[dict]]:
    """Full fine-tuning and linear probing, each with the learning-rate sweep (not budget-limited)."""
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan

    jobs, tags = [], []
    for name in c.references:
        plan = PeftPlan.single(make_spec(name, {}), range(spec.num_blocks))
        for lr in c.lrs:
            jobs.append(dict(_base_job(c), plan=plan.to_dict(), hparams={**_fixed_training(space), "lr": lr}))
            tags.append({"method": name})
    return jobs, tags


def random_jobs(c: CellConfig, spec, budget, space, n: int) -> list[Job]:
    """`n` plans and hyper-parameters drawn by Optuna's RandomSampler from the space, as a search trial draws them."""
    import optuna

    from autopeft.space import sample_hparams, sample_plan

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=c.seed))
    jobs = []
    for _ in range(n):
        trial = study.ask()
        plan = sample_plan(trial, space, spec, budget)
        jobs.append(dict(_base_job(c), plan=plan.to_dict(), hparams=sample_hparams(trial, space)))
        study.tell(trial, 0.0)
    return jobs


def search_arm(c: CellConfig, trials: int, storage_dir: str, settings: dict[str, Any] | None = None) -> Arm:
    """autopeft's own search (TPE + ASHA, baselines first), through the engine, as `autopeft search` runs it;
    `settings` are search settings that replace autopeft's defaults (e.g. {"objectives": "acc"})."""
    import optuna

    from autopeft.search import search, settings_from
    from autopeft.search import storage as st

    study = f"bench-{c.task.replace('/', '-')}-{c.budget.replace('%', 'pct')}-s{c.seed}"
    url = f"sqlite:///{storage_dir}/{study}.db"
    flags = dict(study=study, dataset=c.task, budget=c.budget, backbone=c.backbone, weights=c.weights,
                 data_root=c.data_root, space=c.space, trials=trials, epochs=c.epochs, grace_epochs=c.grace_epochs,
                 reduction_factor=c.reduction_factor, sampler="tpe", concurrency=c.concurrency, cpus_per_trial=1,
                 gpus_per_trial=c.gpus_per_trial,
                 storage=url, seed=c.seed, baselines=True)
    flags.update(settings or {})
    if flags.get("strategy") == "oneshot":  # its trials are its finalists, and it enqueues no baselines
        flags.pop("trials")
        flags.pop("baselines")
    start = time.perf_counter()
    outcome = search(settings_from(None, flags))
    arm = Arm("search", outcome.records, wall_s=time.perf_counter() - start)
    from autopeft.search import oneshot

    arm.extra_epochs = oneshot.spent_epochs(st.load_study(study, url))
    for t in st.load_study(study, url).get_trials(deepcopy=False):
        arm.hparams[t.number] = dict(t.user_attrs.get(st.ATTR_HPARAMS) or {})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return arm


def within_epochs(records: Sequence[TrialRecord], limit: int) -> list[TrialRecord]:
    """The records, in trial-number order, whose cumulative epochs stay within `limit` (equal compute)."""
    out, used = [], 0
    for r in sorted(records, key=lambda r: r.number):
        if used + r.epochs > limit:
            break
        used += r.epochs
        out.append(r)
    return out


def epochs_to_reach(records: Sequence[TrialRecord], target: float, limit: int) -> int | None:
    """Cumulative epochs (trial-number order) at which a full-fidelity record under `limit` params first has val
    accuracy >= `target`; None when none does."""
    used = 0
    for r in sorted(records, key=lambda r: r.number):
        used += r.epochs
        if r.full_fidelity and r.val_acc is not None and r.peft_params <= limit and r.val_acc >= target - 1e-9:
            return used
    return None


def summarise(arm: Arm, limit: int | None) -> tuple[dict[str, Any], TrialRecord | None]:
    """Best-under-budget val, normalised hypervolume and epochs used, and the selected record (tested later).

    `limit` None: no budget (the references); no hypervolume then.
    """
    from autopeft.pareto import best_under_budget, record_hypervolume

    best = best_under_budget(arm.records, 10**15 if limit is None else limit)
    out: dict[str, Any] = {
        "trials": len(arm.records),
        "full_fidelity_trials": sum(r.full_fidelity for r in arm.records),
        "epochs": sum(r.epochs for r in arm.records),
        "hypervolume": None if limit is None else
        record_hypervolume([r for r in arm.records if r.peft_params <= limit], (0.0, float(limit))) / max(limit, 1),
        "wall_s": arm.wall_s,
        "best_val": None, "test": None, "best": None,
    }
    if best is not None:
        out.update(best_val=best.val_acc,
                   best={"number": best.number, "peft_params": best.peft_params, "tags": best.tags,
                         "hparams": {k: v for k, v in arm.hparams.get(best.number, {}).items()
                                     if k in RECORDED_HPARAMS}, "plan": best.plan})
    return out, best


def run_cell(c: CellConfig, pool: ProcessPoolExecutor | None, storage_dir: str, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """All arms of one cell, then the selection, the final runs and the two target figures."""
    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget
    from autopeft.space import load_space

    spec = backbone_spec(c.backbone)
    budget = parse_budget(c.budget, spec)
    space = load_space(c.space)
    limit = budget.limit
    e = c.epochs

    hp_jobs, hp_tags = handpicked_jobs(c, spec, limit, space)
    compute = len(hp_jobs) * e  # R: the hand-picked arm's epochs; every compared arm gets the same
    log(f"[{c.task} {c.budget} seed {c.seed}] budget {limit:,} params; hand-picked: {len(hp_jobs)} runs × {e} "
        f"epochs = {compute} epochs (the compute of every arm)")
    arms: dict[str, Arm] = {}

    t = time.perf_counter()
    rnd_jobs = random_jobs(c, spec, budget, space, max(1, compute // e))
    ref_jobs, ref_tags = reference_jobs(c, spec, space)
    outs = run_jobs(hp_jobs + rnd_jobs + ref_jobs, pool)  # one batch keeps both workers busy
    wall = time.perf_counter() - t
    n1, n2 = len(hp_jobs), len(hp_jobs) + len(rnd_jobs)
    for name, jobs, o, tags in (("handpicked", hp_jobs, outs[:n1], hp_tags),
                                ("random", rnd_jobs, outs[n1:n2], [{}] * len(rnd_jobs)),
                                ("references", ref_jobs, outs[n2:], ref_tags)):
        arm = Arm(name, _records(jobs, o, e, spec, tags), wall_s=wall * len(jobs) / max(len(outs), 1))
        arm.hparams = {i: j["hparams"] for i, j in enumerate(jobs)}
        arms[name] = arm
    log(f"  hand-picked, random, references: {len(outs)} runs in {wall:.0f} s")

    trials = c.search_trials or search_trials_for(compute, e, c.grace_epochs, c.reduction_factor)
    arm = search_arm(c, trials, storage_dir)
    arm.records = within_epochs(arm.records, compute)
    arms["search"] = arm
    log(f"  search: {trials} trials asked, {len(arm.records)} within {compute} epochs, {arm.wall_s:.0f} s")

    rows: dict[str, dict] = {}
    chosen: dict[str, Job] = {}
    refs = arms["references"]
    for method in c.references:
        arms[method] = Arm(method, [r for r in refs.records if r.tags.get("method") == method],
                           {r.number: refs.hparams[r.number] for r in refs.records if r.tags.get("method") == method})
    for name in ("search", "random", "handpicked", *c.references):
        rows[name], best = summarise(arms[name], limit if name not in c.references else None)
        if best is not None:
            chosen[name] = dict(_base_job(c), plan=best.plan, hparams=arms[name].hparams.get(best.number, {}),
                                final=True)
    # the final runs (train_full, test once), in one batch; the same job chosen by two arms runs once
    unique = list({json.dumps(j, sort_keys=True, default=str): j for j in chosen.values()}.items())
    t = time.perf_counter()
    results = dict(zip([k for k, _ in unique], run_jobs([j for _, j in unique], pool), strict=True))
    for name, job in chosen.items():
        result = results[json.dumps(job, sort_keys=True, default=str)]
        rows[name]["test"] = result.get("test_acc")
        rows[name]["best"]["final_seconds"] = result.get("seconds")
    log(f"  final runs: {len(unique)} in {time.perf_counter() - t:.0f} s")
    finals: dict[str, Any] = {}
    rnd_best = rows["random"]["best_val"]
    reach = epochs_to_reach(arms["search"].records, rnd_best, limit) if rnd_best is not None else None
    finals["search_epochs_to_random_best"] = reach
    finals["search_epochs_to_random_best_ratio"] = (reach / rows["random"]["epochs"]
                                                    if reach is not None and rows["random"]["epochs"] else None)
    return {"task": c.task, "budget": c.budget, "budget_params": limit, "seed": c.seed, "epochs_per_run": e,
            "compute_epochs": compute, "lrs": list(c.lrs), "search_trials_asked": trials, "arms": rows, **finals}


def search_trials_for(compute: int, epochs: int, grace: int, factor: int) -> int:
    """Trials to ask of the search so that it spends about `compute` epochs (10 % margin; the excess is cut).

    With many trials ASHA spends `_asha_mean_epochs` per trial; with few (under 16 full-length runs' worth) the
    rungs hardly fill and asynchronous halving lets most trials go on: measured 0.8 × E per trial (10 trials of 6
    epochs spent 48 epochs on mnist5k_fs), so that is the estimate there.
    """
    per_trial = _asha_mean_epochs(epochs, grace, factor) if compute >= 16 * epochs else 0.8 * epochs
    return max(2, math.ceil(1.1 * compute / max(1.0, per_trial)))


def _asha_mean_epochs(epochs: int, grace: int, factor: int) -> float:
    """Expected epochs per trial under ASHA when each rung promotes 1/factor of the trials."""
    rungs, r = [], grace
    while r < epochs:
        rungs.append(r)
        r *= factor
    rungs.append(epochs)
    mean, share, prev = 0.0, 1.0, 0
    for i, rung in enumerate(rungs):
        stop_here = share * (1 - 1 / factor) if i < len(rungs) - 1 else share
        mean += stop_here * rung
        share -= stop_here
        prev = rung
    return mean if prev else float(epochs)
