"""The standard grid of issue [I]: the measuring stick that search changes are judged by.

    python -m benchmarks.run --standard --label before        # about 1.5 hours on 2 CPU cores (first run)
    python -m benchmarks.run --standard --label my-change     # later: only the search arm re-runs (cache)

Protocol (STANDARD below): the mini suite's bundled `autopeft_tiny_vit`, the few-shot tasks `mnist5k_fs` and
`fmnist_count_fs` (200 train, 200 val, their own 4,000 / 2,000-image test sets) × split seeds 0-5 = 12 cells at a
1 % budget (so LoRA fits). Every arm gets the same compute, N full-run equivalents of E epochs (N × E epochs), the
same space and training settings (the unified space with batch 32, derived at run time from the shipped file so
changes to it carry over) and so the same learning-rate prior (the space's log-uniform range) and weight decay:

- hand-picked: each baseline method at the largest configuration that fits the budget (size, LoRA's targets, the
  adapter's position, on every block: `autopeft.search.baselines.filled_plans`; rows before [P] took the search's
  own baselines, `baseline_plans`, whose powers-of-two sizes left much of the budget unspent), exactly N runs
  spread over methods in baseline order (see `allocate_handpicked`), each at 0.5 and 2 × its method's own rate
  (`hand_rate_range`: points of 0.25 … 4, whatever lr_scale range the space searches; an absolute lr: points of
  the space's range), weight decay 1e-4 (TrainConfig's default, one of the space's choices: the fixed value a
  user would take);
- random: N plans and hyper-parameters from Optuna's RandomSampler over the space (`compare.random_jobs`);
- search: autopeft's engine as shipped (`compare.search_arm`), its records cut to N × E epochs in trial order.

Every run's per-epoch val curve is kept in the row (`curves`), with the epochs spent on runs at chance (best val
≤ 1.5 / classes) and the number of parts of each pick: [P]'s targets read them.

Each arm's best-under-budget record by val is retrained on train_full with final seeds (cell seed + 100, + 200),
tested once per seed, and the test accuracies averaged. Hand-picked and random runs and every final run are
cached by everything that determines them (`RunCache`), so a search change re-runs only the search and its finals.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import RESULTS, backbone_record, write_result
from benchmarks.compare import RECORDED_HPARAMS, Job, run_job

CACHE_DIR = RESULTS / "cache"
CODE_FILES = ("train.py", "train_config.py", "learning_rate.py", "optim.py", "plan.py", "backbones.py", "features.py",
              "methods/*.py", "data/*.py")


@dataclass(frozen=True)
class StandardConfig:
    """The grid and the fidelity of every run; the defaults are the issue's standard grid."""

    tasks: tuple[str, ...] = ("mnist5k_fs", "fmnist_count_fs")
    # 12 cells ([P] part 1): a 1-point difference clears the interval (the rows before it had seeds 0-3, 8 cells)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    budget: str = "1%"
    backbone: str = "autopeft_tiny_vit"
    epochs: int = 15
    batch_size: int = 32  # 200 train images: 6 full batches + one of 8 (train.py keeps the partial batch)
    runs: int = 8  # N: full-run equivalents of compute per arm
    final_seed_offsets: tuple[int, ...] = (100, 200)
    weight_decay: float = 1e-4  # hand-picked arm's fixed weight decay
    # the hand-picked arm's plans: `filled`, each method at the largest configuration that fits the budget
    # (`autopeft.search.baselines.filled_plans`, [P] part 1); `ladder`, the search's own baselines (powers-of-two
    # sizes, the rows before [P]: they left 37-50 % of the budget unspent)
    handpicked: str = "filled"
    # the hand-picked arm's rates as multiples of each method's own rate (a space that searches lr_scale): the
    # scale points of this range (k = 2: 0.5 and 2; k = 1: 1), whatever range the space searches, so that a change
    # of the search's range does not move the yardstick (rows before `filled-start` took the space's range: at
    # 0.25 … 1.5, 0.391 and 0.958, which cost the hand-picked arm 2.6 points of test on `rates`)
    hand_scale_range: tuple[float, float] | None = (0.25, 4.0)
    space: str = "unified"
    workers: int = 2
    resamples: int = 10_000
    weights: str | None = None
    data_root: str | None = None
    # search settings the search arm runs with instead of autopeft's defaults (`--search-set objectives=acc`)
    search_settings: tuple[tuple[str, str], ...] = ()
    # the search arm spends the arm's compute through the engine's own cap (`--max-epochs N × E`, trials enough never
    # to bind); False: as rows before [I] item 7 (trials estimated by `search_trials_for`, records cut after the run)
    search_cap: bool = True
    # the search arm's own space (`--search-space compact`); None: the grid's `space`, which the other arms train in
    search_space: str | None = None
    # changes to the search arm's space, each a dotted key of the space file and a YAML value
    # (`--search-space-set training.lr_scale='{low: 0.25, high: 4.0, log: true}'`, `--search-space-set fill=[0.5, 1]`):
    # a row that measures one change of a shipped space, without a copy of it
    search_space_set: tuple[tuple[str, str], ...] = ()
    # how every arm picks its final: `val`, or `cv:K`: its `select_top` best by val are trained in K folds of
    # train+val (as `autopeft search --select cv:K` does) and the best mean fold accuracy is the pick; the row
    # keeps each arm's val pick and its test too (`val_pick`), so one row compares the two ways of picking
    select: str = "val"
    select_top: int = 3

    @property
    def cv_folds(self) -> int | None:
        from autopeft.search.settings import SearchSettings

        return SearchSettings(select=self.select).cv_folds

    @property
    def compute(self) -> int:
        return self.runs * self.epochs


STANDARD = StandardConfig()


def lr_points(k: int, low: float, high: float) -> list[float]:
    """`k` absolute learning rates a decade apart from the top of the range down, never below `low`: one is `high`,
    two are high/10 and high (for a space's 1e-4 … 1e-2: {1e-3, 1e-2}, PETL_Vision's grid), three add high/100.
    From the top because at E = 15 epochs the largest rates of such a range train best (what [G] saw, and the best
    random and search picks of a first run sat at 6e-3 … 7e-3); a measuring stick must not flatter the search with
    a weak hand-picked arm. (A first try with quantile points of the log range, 3.2e-4 / 3.2e-3 and 1e-3, left
    hand-picked 20 points of val behind random search on the first cell.)"""
    decades = int(math.floor(math.log10(high / low) + 1e-9)) + 1  # how many fit a decade apart
    if k <= decades:
        points = [high / 10**i for i in range(k)]
    else:  # more than that: k log-even points over the whole range, ends included
        a, b = math.log10(low), math.log10(high)
        points = [10 ** (a + (b - a) * i / (k - 1)) for i in range(k)]
    return sorted(float(f"{p:.3g}") for p in points)


def scale_points(k: int, low: float, high: float) -> list[float]:
    """`k` multipliers of the method's own rate (a space that searches `lr_scale`): the centres of k equal parts of
    the log range, so one is its centre (1 for 0.25 … 4: the rate `autopeft train` uses by default, what a user
    picking a method by hand takes) and two are 0.5 and 2."""
    a, b = math.log(low), math.log(high)
    return [float(f"{math.exp(a + (b - a) * (i + 0.5) / k):.3g}") for i in range(k)]


def allocate_handpicked(names: Sequence[str], runs: int, low: float, high: float,
                        points: Callable[[int, float, float], list[float]] = lr_points) -> list[tuple[str, float]]:
    """Exactly `runs` (method, rate) pairs: every method gets runs // M rates and the first runs % M methods
    (baseline order: LoRA first) one more, each method's rates being `points` of its count (`lr_points` for an
    absolute range, `scale_points` for `lr_scale`). With fewer runs than methods, the first `runs` methods."""
    m = len(names)
    if m == 0 or runs < 1:
        return []
    out = []
    for i, name in enumerate(names):
        k = runs // m + (1 if i < runs % m else 0)
        out.extend((name, lr) for lr in (points(k, low, high) if k else []))
    return out


def hand_rate_range(c: StandardConfig, key: str, domain: Any) -> tuple[float, float]:
    """The range the hand-picked arm's rate points come from: the grid's own `hand_scale_range` for `lr_scale`
    (the yardstick stays put when the search's range changes), the space's range for an absolute `lr`."""
    if key == "lr_scale" and c.hand_scale_range is not None:
        return c.hand_scale_range
    return float(domain.low), float(domain.high)


def set_key(data: dict[str, Any], dotted: str, text: str) -> None:
    """`data` with the value at the dotted key (`training.lr_scale`) set to `text` read as YAML; AutopeftError
    for an empty key or a path through something that is not a mapping."""
    import yaml

    from autopeft.errors import AutopeftError

    keys = dotted.split(".")
    if not all(keys):
        raise AutopeftError(f"--search-space-set '{dotted}={text}': give KEY=VALUE with a dotted KEY of the space file")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise AutopeftError(f"--search-space-set '{dotted}': '{key}' is not a section of the space file")
    try:
        node[keys[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AutopeftError(f"--search-space-set '{dotted}={text}': not YAML ({str(exc).splitlines()[0]})") from None


def derived_space(c: StandardConfig, folder: Path, name: str | None = None,
                  changes: Sequence[tuple[str, str]] = ()) -> Path:
    """The shipped space with the grid's batch size and `changes` (dotted key, YAML value), written to `folder`
    (named by its content). The unified space fixes batch 64 (4 steps per epoch on 200 images); the grid needs ≥ 6,
    and every arm must train alike. Raises AutopeftError when the changed space is not a valid space."""
    import yaml

    from autopeft.space import load_space, parse_space
    from autopeft.yamlfile import read_yaml

    name = name or c.space
    source = Path(load_space(name).source)
    data = read_yaml(source, "search space file")
    for key, text in changes:
        set_key(data, key, text)
    data.setdefault("training", {})["batch_size"] = c.batch_size
    data["name"] = f"{data.get('name', name)}-b{c.batch_size}"
    if changes:
        data["name"] += "-" + hashlib.sha256(repr(tuple(changes)).encode()).hexdigest()[:6]
        parse_space(data, f"{name} with --search-space-set")  # one line for a change the space refuses
    text = yaml.safe_dump(data, sort_keys=True)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"space-{data['name']}-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"
    if not path.is_file():
        path.write_text(text)
    return path


def code_version() -> str:
    """Hash of the autopeft code that determines a training run (training loop, plans, methods, data) and of the
    hyper-parameters → TrainConfig step (`trial_config`); the search code is left out on purpose, so a search
    change keeps the cache."""
    import autopeft
    from autopeft.search.trainable import trial_config

    root = Path(autopeft.__file__).parent
    h = hashlib.sha256()
    for pattern in CODE_FILES:
        for p in sorted(root.glob(pattern)):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    h.update(inspect.getsource(trial_config).encode())
    return h.hexdigest()[:16]


class RunCache:
    """One JSON file per run under `folder`, named by the hash of everything that determines the run."""

    def __init__(self, folder: Path | None, context: dict[str, Any]):
        self.folder, self.context = folder, dict(context)
        self.hits = self.misses = 0

    def key(self, job: Job) -> str:
        what = {k: v for k, v in job.items() if k != "weights"}  # the file's sha is in the context, not its path
        text = json.dumps({"job": what, **self.context}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, job: Job) -> dict[str, Any] | None:
        if self.folder is None:
            return None
        path = self.folder / f"{self.key(job)}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["out"]
        except (ValueError, KeyError):
            return None  # a damaged entry is a miss

    def put(self, job: Job, out: dict[str, Any]) -> None:
        if self.folder is None or out.get("status") != "COMPLETE":
            return  # a failure may be the machine's (memory): run it again next time
        write_result(self.folder / f"{self.key(job)}.json", {"job": job, "context": self.context, "out": out})


def run_cached(jobs: Sequence[Job], pool: ProcessPoolExecutor | None, cache: RunCache) -> list[dict[str, Any]]:
    """The jobs' results, from the cache where present; the rest run (in the pool), once per distinct job."""
    outs: list[dict[str, Any] | None] = [cache.get(j) for j in jobs]
    todo: dict[str, Job] = {}
    for j, o in zip(jobs, outs, strict=True):
        if o is None:
            todo.setdefault(cache.key(j), j)
    cache.hits += sum(o is not None for o in outs)
    cache.misses += len(todo)
    ran = list(pool.map(run_job, todo.values())) if pool is not None else [run_job(j) for j in todo.values()]
    fresh = dict(zip(todo, ran, strict=True))
    for k, j in todo.items():
        cache.put(j, fresh[k])
    return [o if o is not None else fresh[cache.key(j)] for j, o in zip(jobs, outs, strict=True)]


@dataclass
class CellArm:
    """One arm's records in a cell, with the hyper-parameters each trial trained with (for its final runs)."""

    records: list = field(default_factory=list)  # TrialRecord, trial order
    hparams: dict[int, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0


def _records(jobs: Sequence[Job], outs: Sequence[dict[str, Any]], epochs: int, spec, tags: Sequence[dict]) -> list:
    from autopeft.plan import PeftPlan
    from autopeft.records import TrialRecord

    records = []
    for i, (job, out, tag) in enumerate(zip(jobs, outs, tags, strict=True)):
        ok = out["status"] == "COMPLETE" and len(out["curve"]) == epochs
        records.append(TrialRecord(
            number=i, plan=job["plan"], peft_params=PeftPlan.from_dict(job["plan"]).count(spec),
            val_acc=out["curve"][-1] if ok else None, curve=out["curve"], epochs=epochs,
            max_epochs=epochs, status="COMPLETE" if ok else "FAIL", seconds=out["seconds"], tags=dict(tag),
            params={k: v for k, v in job["hparams"].items() if k in RECORDED_HPARAMS}))
    return records  # a failed run spent its compute too: it keeps its epochs in the trace


def _trace(records: Sequence, limit: int) -> list[tuple[int, float | None]]:
    """(epochs, val) per record in trial order, val only where the record could be selected (the curves' input)."""
    return [(r.epochs, r.val_acc if r.full_fidelity and r.val_acc is not None and r.peft_params <= limit else None)
            for r in sorted(records, key=lambda r: r.number)]


CHANCE_FACTOR = 1.5  # a run is at chance when its best val is at most 1.5 / classes (0.15 on 10 classes)


def at_chance(curve: Sequence[float], chance: float) -> bool:
    """Whether a run never rose above `chance` (an empty curve, a run that failed before its first epoch, is not
    counted: it spent nothing)."""
    return bool(curve) and max(curve) <= chance


def _arm_row(arm: CellArm, limit: int, chance: float = 0.0) -> tuple[dict[str, Any], Any]:
    from autopeft.pareto import best_under_budget, parts_of

    best = best_under_budget(arm.records, limit)
    ordered = sorted(arm.records, key=lambda r: r.number)
    row: dict[str, Any] = {"trials": len(arm.records), "epochs": sum(r.epochs for r in arm.records),
                           "full_fidelity_trials": sum(r.full_fidelity for r in arm.records),
                           "trace": _trace(arm.records, limit), "wall_s": arm.wall_s,
                           # every run's per-epoch val (the rung questions of [P] part 3 read them)
                           "curves": [list(r.curve) for r in ordered],
                           "chance": chance,
                           "chance_epochs": sum(len(r.curve) for r in ordered if at_chance(r.curve, chance)),
                           "best_val": None, "best": None, "test": None, "tests": []}
    if best is not None:
        hp = arm.hparams.get(best.number, {})
        row.update(best_val=best.val_acc, best={
            "number": best.number, "peft_params": best.peft_params, "tags": best.tags, "plan": best.plan,
            "parts": parts_of(best),
            "hparams": {k: hp.get(k) for k in (*RECORDED_HPARAMS, "batch_size") if k in hp}})
    return row, best


def run_cell(c: StandardConfig, task: str, seed: int, space_path: Path, pool: ProcessPoolExecutor | None,
             cache: RunCache, storage_dir: str, log: Callable[[str], None] = print,
             search_space_path: Path | None = None) -> dict[str, Any]:
    """The three arms of one (task, seed) cell at equal compute, the selection by val, the averaged finals (the
    search arm in `search_space_path` when given, the others always in `space_path`)."""
    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget
    from autopeft.data import data_config, load_dataset
    from autopeft.pareto import best_under_budget, fewest_parts_within_se, parts_of
    from autopeft.search.baselines import baseline_plans, filled_plans, rate_key
    from autopeft.search.settings import SearchSettings
    from autopeft.space import load_space
    from benchmarks.compare import CellConfig, random_jobs, search_arm, search_trials_for, within_epochs

    spec = backbone_spec(c.backbone)
    budget = parse_budget(c.budget, spec)
    space = load_space(str(space_path))
    limit, e = budget.limit, c.epochs
    key = rate_key(space)
    if key is None:
        raise ValueError(f"space {space.name} searches no learning-rate range (lr_scale or lr)")
    lr = dict(space.training)[key]
    fixed = {name: d.value for name, d in space.training if not d.searched}
    base: Job = dict(task=task, backbone=c.backbone, weights=c.weights, data_root=c.data_root, data_seed=seed,
                     seed=seed, epochs=e)
    plans = dict((filled_plans if c.handpicked == "filled" else baseline_plans)(spec, limit))
    data = load_dataset(task, c.data_root, download=False, seed=seed, **data_config(c.backbone))
    chance, val_size = CHANCE_FACTOR / data.num_classes, len(data.val)  # type: ignore[arg-type]
    alloc = allocate_handpicked(list(plans), c.runs, *hand_rate_range(c, key, lr),
                                scale_points if key == "lr_scale" else lr_points)
    hand_jobs = [dict(base, plan=plans[name].to_dict(), hparams={**fixed, "batch_size": c.batch_size, key: rate,
                                                                  "weight_decay": c.weight_decay})
                 for name, rate in alloc]
    defaults = SearchSettings()
    cell = CellConfig(task=task, budget=c.budget, seed=seed, backbone=c.backbone, epochs=e, lrs=(),
                      weights=c.weights, data_root=c.data_root, space=str(space_path),
                      grace_epochs=defaults.grace_epochs, reduction_factor=defaults.reduction_factor,
                      concurrency=c.workers, references=())
    rnd_jobs = [dict(base, plan=j["plan"], hparams={**j["hparams"], "batch_size": c.batch_size})
                for j in random_jobs(cell, spec, budget, space, c.runs)]
    log(f"[{task} seed {seed}] budget {limit:,} params; {c.runs} runs × {e} epochs = {c.compute} epochs per arm; "
        f"hand-picked {', '.join(f'{n}@{r:g}' for n, r in alloc)}")

    t = time.perf_counter()
    outs = run_cached(hand_jobs + rnd_jobs, pool, cache)
    in_process_s = time.perf_counter() - t
    arms = {"handpicked": CellArm(_records(hand_jobs, outs[: len(hand_jobs)], e, spec, [{"method": n} for n, _ in
                                                                                          alloc])),
            "random": CellArm(_records(rnd_jobs, outs[len(hand_jobs):], e, spec, [{}] * len(rnd_jobs)))}
    for name, jobs in (("handpicked", hand_jobs), ("random", rnd_jobs)):
        arms[name].hparams = {i: j["hparams"] for i, j in enumerate(jobs)}
        arms[name].wall_s = in_process_s * len(jobs) / max(1, len(outs))
    log(f"  hand-picked + random: {len(outs)} runs in {in_process_s:.0f} s (cache {cache.hits} hits so far)")

    settings = dict(c.search_settings)
    if c.search_cap:  # the engine stops at the compute itself; every trial stopped at its grace would be the most
        trials = c.compute // cell.grace_epochs + 1
        settings["max_epochs"] = c.compute
    else:
        trials = search_trials_for(c.compute, e, cell.grace_epochs, cell.reduction_factor)
    search_cell = replace(cell, space=str(search_space_path)) if search_space_path else cell
    found = search_arm(search_cell, trials, storage_dir, settings)
    # a one-shot study's supernet spent part of the compute (the engine's cap counts it): its finalists get the rest
    arms["search"] = CellArm(within_epochs(found.records, c.compute - found.extra_epochs), found.hparams,
                             found.wall_s)
    log(f"  search: {trials} trials asked, {len(arms['search'].records)} within {c.compute} epochs, "
        f"{found.wall_s:.0f} s")

    rows: dict[str, dict[str, Any]] = {}
    finals: dict[tuple[str, str], list[Job]] = {}
    cv_s = 0.0
    for name in ("search", "random", "handpicked"):
        val_best = best_under_budget(arms[name].records, limit)
        if c.cv_folds and val_best is not None:
            t = time.perf_counter()
            arms[name].records, cv_epochs = cross_validated(c, arms[name], base, limit, pool, cache)
            cv_s += time.perf_counter() - t
        rows[name], best = _arm_row(arms[name], limit, chance)
        if name == "search" and found.extra_epochs:
            rows[name]["supernet_epochs"] = found.extra_epochs
            rows[name]["epochs"] += found.extra_epochs
        # [P] part 6: the plan with the fewest parts within one standard error of the best val (its own finals
        # only where it is another trial than the pick)
        fewest = fewest_parts_within_se(arms[name].records, limit, val_size) if not c.cv_folds else None
        rows[name]["fewest_pick"] = None if fewest is None else {
            "number": fewest.number, "parts": parts_of(fewest), "best_val": fewest.val_acc,
            "peft_params": fewest.peft_params}
        picks = {"pick": best, "val_pick": val_best if c.cv_folds else None,
                 "fewest_pick": fewest if fewest is not None and best is not None and fewest.number != best.number
                 else None}
        if c.cv_folds and val_best is not None:
            rows[name].update(cv_epochs=cv_epochs, cv={r.number: r.cv_accs for r in arms[name].records if r.cv_accs},
                              val_pick={"number": val_best.number, "best_val": val_best.val_acc})
        for role, record in picks.items():
            if record is not None:
                chosen = dict(base, plan=record.plan, final=True,
                              hparams={"batch_size": c.batch_size, **arms[name].hparams.get(record.number, {})})
                finals[(name, role)] = [dict(chosen, seed=seed + off) for off in c.final_seed_offsets]
    t = time.perf_counter()
    flat = [j for jobs in finals.values() for j in jobs]
    results = iter(run_cached(flat, pool, cache))
    for (name, role), jobs in finals.items():
        tests = [next(results).get("test_acc") for _ in jobs]
        into = rows[name] if role == "pick" else rows[name][role]
        into["tests"] = tests
        into["final_seeds"] = [j["seed"] for j in jobs]
        into["test"] = sum(tests) / len(tests) if all(x is not None for x in tests) else None
    finals_s = time.perf_counter() - t
    for row in rows.values():  # the same trial as the pick: the same finals
        if row.get("fewest_pick") is not None and "test" not in row["fewest_pick"]:
            row["fewest_pick"].update(tests=row["tests"], test=row["test"])
    if c.cv_folds:
        log(f"  cross-validation ({c.select}, top {c.select_top} per arm): {cv_s:.0f} s")
    log(f"  finals: {len(flat)} ({len(finals)} picks × {len(c.final_seed_offsets)} seeds) in {finals_s:.0f} s; test "
        + ", ".join(f"{n} {rows[n]['test']:.3f}" for n in rows if rows[n]["test"] is not None))
    return {"task": task, "seed": seed, "budget": c.budget, "budget_params": limit, "epochs_per_run": e,
            "horizon": c.compute, "search_trials_asked": trials, "arms": rows,
            "wall_s": {"in_process": in_process_s, "search": found.wall_s, "finals": finals_s, "cv": cv_s}}


def cross_validated(c: StandardConfig, arm: CellArm, base: Job, limit: int, pool: ProcessPoolExecutor | None,
                    cache: RunCache) -> tuple[list, int]:
    """The arm's records, its `select_top` best by val carrying their fold accuracies (the fold runs of
    `autopeft search --select cv:K`, here as cached in-process jobs), and the epochs the fold runs took."""
    from autopeft.pareto import top_by_val

    folds = c.cv_folds
    assert folds is not None
    top = top_by_val(arm.records, limit, c.select_top)
    jobs = [dict(base, plan=r.plan, hparams={"batch_size": c.batch_size, **arm.hparams.get(r.number, {})},
                 cv={"folds": folds, "fold": fold, "seed": base["data_seed"]})
            for r in top for fold in range(folds)]
    outs = iter(run_cached(jobs, pool, cache))
    accs: dict[int, list[float]] = {}
    for r in top:
        runs = [next(outs) for _ in range(folds)]
        if all(o["status"] == "COMPLETE" and len(o["curve"]) == c.epochs for o in runs):
            accs[r.number] = [o["curve"][-1] for o in runs]  # a fold that failed leaves its trial unscored
    return [replace(r, cv_accs=accs.get(r.number, [])) for r in arm.records], len(jobs) * c.epochs


def run_grid(c: StandardConfig, label: str, out: Path, cache_dir: Path | None, meta: dict[str, Any],
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every cell (seed-major, so a run cut short holds every task), writing the label's row after each cell."""
    import os
    import tempfile

    import torch

    from benchmarks.compare import compute_session
    from benchmarks.standard_stats import markdown, summarise, targets

    backbone = backbone_record(c.backbone, c.weights)
    context = {"backbone": c.backbone, "weights_sha256": backbone["weights_sha256"], "code": code_version(),
               "torch": torch.__version__}
    cache = RunCache(cache_dir, context)
    doc = _load(out)
    row: dict[str, Any] = {"meta": {**meta, "backbone": backbone, "config": asdict(c), "cache_context": context},
                           "cells": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autopeft-standard-") as tmp:
        os.environ.setdefault("AUTOPEFT_CACHE", str(Path(tmp) / "features"))
        space_path = derived_space(c, (cache_dir or Path(tmp)) / "spaces")
        row["meta"]["space_file"] = space_path.name
        search_path = (derived_space(c, (cache_dir or Path(tmp)) / "spaces", c.search_space, c.search_space_set)
                       if c.search_space or c.search_space_set else None)
        row["meta"]["search_space_file"] = search_path.name if search_path else space_path.name
        with compute_session(c.workers) as pool:
            for seed in c.seeds:
                for task in c.tasks:
                    row["cells"].append(run_cell(c, task, seed, space_path, pool, cache, tmp, log, search_path))
                    row["summary"] = summarise(row["cells"], c.resamples)
                    row["targets"] = targets(row["summary"])
                    row["meta"].update(wall_s=time.perf_counter() - start, cache_hits=cache.hits,
                                       cache_misses=cache.misses, complete=False)
                    doc["rows"][label] = row
                    write_result(out, doc)  # after every cell: a run that stops keeps what it measured
                    out.with_suffix(".md").write_text(markdown(doc))
    row["meta"].update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_result(out, doc)
    out.with_suffix(".md").write_text(markdown(doc))
    return doc


def _load(out: Path) -> dict[str, Any]:
    """The results file's rows so far (other labels are kept); a missing or unreadable file starts empty."""
    try:
        doc = json.loads(out.read_text())
        if isinstance(doc, dict) and isinstance(doc.get("rows"), dict):
            return doc
    except (OSError, ValueError):
        pass
    return {"about": "benchmarks/standard.py: one row per label (the engine or change measured)", "rows": {}}
