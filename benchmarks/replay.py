"""Replay samplers and the portfolio over a measured tuning table (no training: every evaluation is a table look-up).

    python -m benchmarks.replay --table DIR [--seeds 10] [--k 5] [--normalise regret] [--arms A,B,...]
        [--write | --write-json]

DIR holds `tuning.csv` (one row per task, method, configuration: `task`, `method`, `config` as JSON, `val_top1`)
and optionally `final.csv` (per task and method: `inserted_parameters`, `best_tune`), the format of
`../shared/data/petl_vision_vtab1k/` (PETL_Vision's VTAB-1k grid for ViT-B/16). Any such table runs.

Per task the search space is the table's configurations under the budget (`--budget` of the backbone's parameters,
0.5 % by default, each configuration's count from the closed forms below), treated as a finite categorical space:
the sampler suggests `method` then each of that method's knobs from the values present for that task and method
(a knob whose value set is the same for every method that has it, such as `lr`, is one shared parameter). A
suggested combination that the table lacks is snapped to the nearest present configuration of the method (fewest
knobs differing, then the smallest sum of |log ratio| over numeric knobs); PETL_Vision's grids are complete, so no
snap happens there. An evaluation is a trial: a configuration suggested again counts again (the engine would train
it again); the distinct configurations evaluated by the time each seed got there are in the JSON.

Arms, each over `--seeds` seeds: `random` (optuna's RandomSampler), `tpe` (the engine's TPE from `make_sampler`:
multivariate, grouped, constant liar, 4 random trials of its own), and `portfolio+tpe`: the greedy portfolio
(`autopeft/search/portfolio.py`, `--k` members) built leave-one-task-out from the other tasks' in-budget scores,
enqueued first (each member snapped to the task's space; the enqueued trials are not part of TPE's random start),
then the same TPE. Reported per task and arm: the mean best val after n evaluations, and the evaluations each needs
to come within `--tol` (0.5) points of the task's best in-budget val, mean with a 95 % bootstrap interval over seeds;
a seed that does not get there within `--max-evals` (TPE arms) or `--random-max` (random) counts as that cap + 1 (a
lower bound, flagged). The portfolio's own leave-one-task-out regret is reported for each normalisation and k, the
measurement behind `--normalise`; the portfolio built from every task (what would ship) is `portfolio_all_tasks`.

`--arms` picks other arms (comma-separated; default random, tpe, baselines+tpe, portfolio+tpe, whose output it
leaves as it was), to compare samplers after the same start: each arm is SAMPLER or START+SAMPLER, START `baselines`
(`baseline_members`) or `portfolio` (the leave-one-task-out portfolio), enqueued first exactly as for baselines+tpe /
portfolio+tpe; SAMPLER one of (built by `sampler`, here, not in autopeft/; every TPE and GP variant has 4 random
trials of its own after the enqueued ones, as the engine's TPE):

- `random`: optuna's RandomSampler (capped at `--random-max`; every other sampler at `--max-evals`);
- `tpe`: the engine's TPE (`make_sampler("tpe")`);
- `tpe-indep`: the engine's TPE with multivariate=False, group=False: a univariate Parzen estimator per parameter;
- `tpe-nogroup`: multivariate=True, group=False: one joint estimator over the parameters every trial has (`method`,
  `lr`, `wd` here) and, in optuna 5, a univariate TPE for each conditional knob (not random draws);
- `tpe-gamma`: the engine's TPE with gamma(n) = ceil(0.25 n) (a quarter of the trials form the good density)
  instead of optuna's default min(ceil(0.1 n), 25), which is already a fixed 10 % (its cap binds only past 250
  trials, more than `--max-evals`' 200), so a "fixed 10 %" arm would repeat `tpe`;
- `gp`: optuna's GPSampler (n_startup_trials = 4 + the enqueued trials). It models only the relative search space
  optuna's IntersectionSearchSpace gives: the parameters present, with the same distribution, in every completed
  trial (single-valued ones dropped). In this space that is `method`, `lr` and `wd` (shared by every method; on
  PETL_Vision's table 15 methods in budget, or 10 of autopeft's, and 2 values each of lr and wd); each
  method's own knobs (rank, scaler, prompt length, FacT dim, ...) go to its independent sampler, a RandomSampler
  with the same seed, so GP never learns them. Every parameter here is categorical, which its Matern kernel treats
  as a 0/1 (Hamming) distance per parameter with its own length scale: `lr` values are categories, not an ordered
  scale; the acquisition is log expected improvement.

With any set of arms but the default the summary has, per arm (`per_arm`), the total over tasks of the mean evaluations
with a 95 % bootstrap interval (each arm's seeds resampled within each task), the censored seeds, and the ratio of
totals to `random` and to `baselines+tpe` where those arms ran, with an interval from the same resamples.
`--write-json` writes `--out` without touching BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopeft.errors import AutopeftError
from autopeft.search.portfolio import NORMALISATIONS, greedy, leave_one_out
from benchmarks import write_result
from benchmarks.defaults_on_val import interval

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Replay on PETL_Vision's VTAB-1k tuning table"
TARGET_RATIO = 0.40  # portfolio-then-sampler reaches the tolerance with <= 40 % of random search's evaluations
ARMS = ("random", "tpe", "baselines+tpe", "portfolio+tpe")

# ViT-B/16: width D, blocks L, MLP width M, tokens (196 patches + class token), patch 16 x 16 x 3
D, L, M, TOKENS, PATCH_IN = 768, 12, 3072, 197, 3 * 16 * 16
# inserted (trainable, head excluded) parameters per method, closed forms for ViT-B/16; `c` is the config
BLOCK_MATRICES = 12  # D x D matrices per block as FacT counts them: q, k, v, o, fc1 (4 x D x D), fc2 (4 x D x D)


def _adapter(r: int) -> int:  # a bottleneck adapter: down D x r + bias, up r x D + bias
    return 2 * D * r + r + D


CLOSED_FORMS: dict[str, Callable[[dict[str, Any]], int]] = {
    "linear": lambda c: 0,
    # every bias: per block qkv 3D, proj D, fc1 M, fc2 D, two LayerNorms 2D; the patch embedding and the last norm
    "bitfit": lambda c: L * (7 * D + M) + 2 * D,
    # every LayerNorm's weight and bias: two per block and the last one
    "ln": lambda c: (2 * L + 1) * 2 * D,
    # BitFit's biases, the LayerNorms' weights and two D-wide scale vectors per block
    "difffit": lambda c: L * (7 * D + M) + 2 * D + (2 * L + 1) * D + 2 * L * D,
    # a scale and a shift after qkv, proj, fc1, fc2 and both LayerNorms in every block, the patch embedding, last norm
    "ssf": lambda c: 2 * (L * (7 * D + M) + 2 * D),
    "full": lambda c: (PATCH_IN * D + D) + D + TOKENS * D + L * (4 * D * D + 2 * D * M + 9 * D + M) + 2 * D,
    "vpt_shallow": lambda c: c["vpt_num"] * D,
    "vpt_deep": lambda c: L * c["vpt_num"] * D,
    "lora": lambda c: L * 2 * 2 * D * c["lora_bottleneck"],  # rank r on q and v
    "adaptformer": lambda c: L * _adapter(c["adapter_bottleneck"]),  # one parallel adapter per block (MLP)
    "lora_p_adapter": lambda c: L * _adapter(c["adapter_bottleneck"]),  # one adapter per block
    "rand_h_adapter": lambda c: 2 * L * _adapter(c["adapter_bottleneck"]),  # Houlsby: after attention and MLP
    # two per block: down D x r + bias, 3 x 3 conv r x r + bias, up r x D + bias
    "convpass": lambda c: 2 * L * (2 * D * c["convpass_bottleneck"] + 9 * c["convpass_bottleneck"] ** 2
                                   + 2 * c["convpass_bottleneck"] + D),
    # two per block: down D x r + bias, up as a 2-group 1x1 conv (r/2 x D) + bias
    "repadapter": lambda c: 2 * L * (D * c["repadapter_bottleneck"] + c["repadapter_bottleneck"]
                                     + c["repadapter_bottleneck"] // 2 * D + D),
    # U, V (D x r) shared, per-matrix factor P (12 L x r), core r x r x r
    "fact_tk": lambda c: 2 * D * c["fact_dim"] + BLOCK_MATRICES * L * c["fact_dim"] + c["fact_dim"] ** 3,
    # U, V (D x r) shared, per-matrix core (12 L x r x r)
    "fact_tt": lambda c: 2 * D * c["fact_dim"] + BLOCK_MATRICES * L * c["fact_dim"] ** 2,
}
BACKBONE_PARAMS = CLOSED_FORMS["full"]({})  # 85,798,656: ViT-B/16 without its head (final.csv's `full` row)


def inserted_parameters(method: str, config: dict[str, Any]) -> int | None:
    """The trainable parameters `method` inserts into ViT-B/16 at `config` (head excluded); None if unknown."""
    form = CLOSED_FORMS.get(method)
    if form is None:
        return None
    try:
        return int(form(config))
    except (KeyError, TypeError):
        return None


def config_key(method: str, config: dict[str, Any]) -> str:
    return json.dumps({"method": method, **config}, sort_keys=True)


def check_closed_forms(final: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """Per method, the closed form against final.csv's inserted_parameters at each chosen configuration."""
    out: dict[str, dict[str, Any]] = {}
    if final is None:
        return out
    for row in final.itertuples():
        method = str(row.method)
        got = inserted_parameters(method, json.loads(str(row.best_tune)))
        entry = out.setdefault(method, {"rows": 0, "matched": 0, "mismatches": []})
        entry["rows"] += 1
        if got == int(row.inserted_parameters):
            entry["matched"] += 1
        elif len(entry["mismatches"]) < 3:
            entry["mismatches"].append({"config": row.best_tune, "table": int(row.inserted_parameters),
                                        "formula": got})
    return out


def load(table: Path, budget_share: float | None, methods: Sequence[str] | None = None
         ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """tuning.csv with `key`, `params` and `in_budget` columns (only `methods`' rows when given); the closed-form
    check and the methods left out."""
    tuning = pd.read_csv(table / "tuning.csv")
    if methods is not None:
        unknown = sorted(set(methods) - set(tuning["method"]))
        if unknown:
            raise ValueError(f"--methods: {', '.join(unknown)} not in {table / 'tuning.csv'}")
        tuning = tuning[tuning["method"].isin(list(methods))].reset_index(drop=True)
    final = pd.read_csv(table / "final.csv") if (table / "final.csv").is_file() else None
    configs = [json.loads(c) for c in tuning["config"]]
    tuning["cfg"] = configs
    tuning["key"] = [config_key(m, c) for m, c in zip(tuning["method"], configs, strict=True)]
    tuning["params"] = [inserted_parameters(m, c) for m, c in zip(tuning["method"], configs, strict=True)]
    tuning = tuning.dropna(subset=["val_top1"]).drop_duplicates(subset=["task", "key"], keep="first")
    checks = check_closed_forms(final)
    excluded: dict[str, str] = {}
    for method in sorted(set(tuning["method"])):
        if method not in CLOSED_FORMS:
            excluded[method] = "no closed form for its parameter count"
        elif tuning.loc[tuning["method"] == method, "params"].isna().any():
            excluded[method] = "a configuration lacks the knob its closed form needs"
        elif method in checks and checks[method]["matched"] < checks[method]["rows"]:
            excluded[method] = "closed form does not match final.csv's inserted_parameters"
    budget = None if budget_share is None else budget_share * BACKBONE_PARAMS
    ok = ~tuning["method"].isin(list(excluded))
    if budget is not None:
        ok &= tuning["params"].fillna(math.inf) <= budget
    tuning["in_budget"] = ok
    implied = None
    if final is not None and (final["method"] == "full").any():
        implied = int(final.loc[final["method"] == "full", "inserted_parameters"].iloc[0])
    return tuning, {"closed_forms": checks, "excluded_methods": excluded, "budget_params": budget,
                    "backbone_params": BACKBONE_PARAMS, "backbone_params_final_csv": implied}


def _sort_key(v: Any) -> tuple[str, Any]:
    return (type(v).__name__, v if isinstance(v, (int, float, str, bool)) else json.dumps(v, sort_keys=True))


def _choice(v: Any) -> Any:  # optuna's categorical choices are None, bool, int, float or str
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)


@dataclass
class Space:
    """One task's in-budget configurations as a categorical space: method, then the method's knobs."""

    values: dict[str, float]  # key -> val
    configs: dict[str, tuple[str, dict[str, Any]]]  # key -> (method, config)
    counts: dict[str, int] = field(default_factory=dict)  # key -> inserted parameters
    knobs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # method -> knob -> present values
    names: dict[tuple[str, str], str] = field(default_factory=dict)  # (method, knob) -> optuna parameter name
    by_method: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: pd.DataFrame) -> Space:
        space = cls(values=dict(zip(rows["key"], rows["val_top1"].astype(float), strict=True)),
                    configs={k: (m, c) for k, m, c in zip(rows["key"], rows["method"], rows["cfg"], strict=True)},
                    counts={k: int(n) for k, n in zip(rows["key"], rows["params"], strict=True)})
        for key, (method, config) in space.configs.items():
            space.by_method.setdefault(method, []).append(key)
            for knob, v in config.items():
                seen = space.knobs.setdefault(method, {}).setdefault(knob, [])
                if _choice(v) not in seen:
                    seen.append(_choice(v))
        sets: dict[str, set[tuple]] = {}
        for knobs in space.knobs.values():
            for knob, vals in knobs.items():
                vals.sort(key=_sort_key)
                sets.setdefault(knob, set()).add(tuple(vals))
        for method, knobs in space.knobs.items():
            for knob in knobs:
                space.names[(method, knob)] = knob if len(sets[knob]) == 1 and knob != "method" else f"{method}.{knob}"
        return space

    @property
    def methods(self) -> list[str]:
        return sorted(self.by_method)

    @property
    def best(self) -> float:
        return max(self.values.values())

    def params(self, key: str) -> dict[str, Any]:
        """The optuna parameters that suggest configuration `key`."""
        method, config = self.configs[key]
        return {"method": method, **{self.names[(method, k)]: _choice(v) for k, v in config.items()}}

    def snap(self, method: str, knobs: dict[str, Any]) -> str:
        """The present configuration of `method` nearest `knobs`: fewest knobs differing, then the smallest sum of
        |log ratio| over positive numeric knobs; the table's order breaks ties."""
        def distance(key: str) -> tuple[int, float]:
            config = self.configs[key][1]
            differ, gap = 0, 0.0
            for knob in set(knobs) | set(config):
                a, b = knobs.get(knob), _choice(config.get(knob))
                if a == b:
                    continue
                differ += 1
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0 \
                        and not isinstance(a, bool) and not isinstance(b, bool):
                    gap += abs(math.log(a / b))
            return differ, gap

        return min(self.by_method[method], key=distance)

    def nearest(self, method: str, config: dict[str, Any]) -> str | None:
        """A portfolio member as this task's configuration: itself if present, else snapped; None if the task lacks
        the method."""
        key = config_key(method, config)
        if key in self.configs:
            return key
        if method not in self.by_method:
            return None
        return self.snap(method, {k: _choice(v) for k, v in config.items()})


# autopeft's baseline methods as such a table names them, and its names of the options a baseline fixes; autopeft's
# `adapter` (sequential, after the MLP) has no counterpart there
TABLE_NAMES: dict[str, tuple[str, dict[str, str]]] = {
    "lora": ("lora", {}), "adaptformer": ("adaptformer", {"scale": "adapter_scaler"}), "vpt_deep": ("vpt_deep", {}),
    "ssf": ("ssf", {}), "bitfit": ("bitfit", {}), "linear": ("linear", {})}
BASELINE_WEIGHT_DECAY = 1e-4  # TrainConfig's default (the unified space's first choice, 0, is not in such grids)


def baseline_members(space: Space) -> list[str]:
    """autopeft's start today, as this task's configurations: per baseline method the in-budget configuration with
    the most parameters (a baseline takes the largest size that fits), its fixed options, the rate nearest
    autopeft's own for the method on this run (the centre of its `lr_range`: the table's runs are the reference run
    of `autopeft.learning_rate`) and the weight decay nearest BASELINE_WEIGHT_DECAY."""
    from autopeft.learning_rate import centre
    from autopeft.methods import get_method
    from autopeft.search.baselines import BASELINES

    out = []
    for b in BASELINES:  # in their order
        if b.method not in TABLE_NAMES:
            continue
        theirs, knobs = TABLE_NAMES[b.method]
        fixed = {knobs[k]: float(v) for k, v in b.options.items() if k in knobs}
        keys = space.by_method.get(theirs, [])
        if not keys:
            continue
        rate = centre(get_method(b.method).lr_range)

        def miss(key: str, rate: float = rate, fixed: dict[str, float] = fixed) -> tuple[float, ...]:
            config = space.configs[key][1]
            return (-space.counts[key], abs(math.log(float(config["lr"]) / rate)),
                    abs(math.log(float(config["wd"]) / BASELINE_WEIGHT_DECAY)) if float(config["wd"]) > 0 else 99.0,
                    sum(abs(math.log(float(config[k]) / v)) for k, v in fixed.items() if k in config))

        out.append(min(keys, key=miss))
    return out


def run_arm(space: Space, sampler: Any, max_evals: int, enqueue: Sequence[str] = (), target: float = math.inf,
            horizon: int = 0, trace: list[str] | None = None) -> tuple[list[float], list[int]]:
    """One study over `space`, `enqueue`d configurations first, for `max_evals` trials or until it has run
    `horizon` trials and reached `target`: the best val after each trial, and the distinct configurations evaluated
    by then. `trace`, when given, gets each evaluated configuration's key in turn."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for key in enqueue:
        study.enqueue_trial(space.params(key))
    seen: set[str] = set()
    curve: list[float] = []
    distinct: list[int] = []
    while len(curve) < max_evals and not (len(curve) >= horizon and curve and curve[-1] >= target - 1e-9):
        trial = study.ask()
        method = trial.suggest_categorical("method", space.methods)
        knobs = {k: trial.suggest_categorical(space.names[(method, k)], vals)
                 for k, vals in space.knobs[method].items()}
        key = space.snap(method, knobs)
        value = space.values[key]
        study.tell(trial, value)
        seen.add(key)
        if trace is not None:
            trace.append(key)
        curve.append(max(curve[-1], value) if curve else value)
        distinct.append(len(seen))
    return curve, distinct


def evals_to(curve: list[float], target: float) -> int | None:
    """1-based count of evaluations after which the best reaches `target`; None if it never does."""
    for i, v in enumerate(curve):
        if v >= target - 1e-9:
            return i + 1
    return None


def portfolio_regret(spaces: dict[str, Space], portfolios: dict[str, list[str]], configs: dict[str, tuple],
                     tol: float) -> dict[str, Any]:
    """Per k, the held-out tasks' regret of the portfolio's best member among its first k (mean over tasks) and
    the tasks it brings within `tol`."""
    ks = max(len(p) for p in portfolios.values())
    out = {}
    for k in range(1, ks + 1):
        regrets = []
        for task, space in spaces.items():
            keys = [space.nearest(*configs[c]) for c in portfolios[task][:k]]
            vals = [space.values[key] for key in keys if key is not None]
            regrets.append(space.best - max(vals) if vals else math.inf)
        out[str(k)] = {"mean_regret": float(np.mean(regrets)),
                       "within_tol": int(sum(r <= tol + 1e-9 for r in regrets)),
                       "per_task": {task: float(r) for task, r in zip(spaces, regrets, strict=True)}}
    return out


def make(name: str, seed: int, enqueued: int) -> Any:
    from autopeft.search.samplers import make_sampler

    return make_sampler(name, seed, enqueued=enqueued)


STARTS = ("baselines", "portfolio")
SAMPLERS = ("random", "tpe", "tpe-indep", "tpe-nogroup", "tpe-gamma", "gp")


def quarter_gamma(n: int) -> int:
    """tpe-gamma's split: the best quarter of the trials form TPE's good density."""
    return math.ceil(0.25 * n)


def sampler(name: str, seed: int, enqueued: int) -> Any:
    """The replay's sampler `name` (one of SAMPLERS); `enqueued` trials come first and are not part of its random
    start. `random`, `tpe` and `tpe-nogroup` are autopeft's own (`make`); the other variants change one setting of
    the engine's TPE."""
    import warnings

    import optuna

    from autopeft.search.samplers import TPE_OPTIONS, TPE_STARTUP, RepairedTPE

    if name in ("random", "tpe", "tpe-nogroup"):
        return make(name, seed, enqueued)
    engine = TPE_OPTIONS
    options: dict[str, dict[str, Any]] = {
        "tpe-indep": {**engine, "multivariate": False, "group": False},
        "tpe-gamma": {**engine, "gamma": quarter_gamma},
    }
    with warnings.catch_warnings():  # gamma is deprecated (FutureWarning), GPSampler's options experimental
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name in options:
            return RepairedTPE(seed=seed, n_startup_trials=TPE_STARTUP + enqueued, **options[name])
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=TPE_STARTUP + enqueued,
                                             warn_independent_sampling=False)
    raise AutopeftError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")


def parse_arm(arm: str) -> tuple[str | None, str]:
    """'START+SAMPLER' or 'SAMPLER' as (START or None, SAMPLER); an unknown name is an AutopeftError."""
    start, plus, name = arm.rpartition("+")
    if (plus and start not in STARTS) or name not in SAMPLERS:
        raise AutopeftError(f"unknown arm '{arm}': an arm is SAMPLER or START+SAMPLER, START one of "
                            f"{', '.join(STARTS)}, SAMPLER one of {', '.join(SAMPLERS)}")
    return start or None, name


def replay(table: Path, seeds: int = 10, k: int = 5, normalise: str = "regret", tol: float = 0.5,
           budget_share: float | None = 0.005, max_evals: int = 200, random_max: int = 1000,
           ns: Sequence[int] = (1, 5, 10, 20, 40, 60),
           portfolio_ks: int = 10, log: Callable[[str], None] | None = None,
           methods: Sequence[str] | None = None, arms: Sequence[str] = ARMS) -> dict[str, Any]:
    start = time.perf_counter()
    arms = tuple(dict.fromkeys(arms))  # each arm once, in the order given
    parsed = {arm: parse_arm(arm) for arm in arms}
    tuning, meta = load(table, budget_share, methods)
    rows = tuning[tuning["in_budget"]]
    spaces = {task: Space.of(g) for task, g in rows.groupby("task", sort=True)}
    configs = {key: (m, c) for key, m, c in zip(rows["key"], rows["method"], rows["cfg"], strict=True)}
    scores = {task: dict(space.values) for task, space in spaces.items()}
    candidates = list(dict.fromkeys(rows["key"]))
    loo = {how: leave_one_out(scores, max(k, portfolio_ks), how, candidates) for how in NORMALISATIONS}
    portfolio_eval = {how: portfolio_regret(spaces, p, configs, tol) for how, p in loo.items()}
    horizon = max(ns)
    tasks: dict[str, Any] = {}
    for task, space in spaces.items():
        target = space.best - tol
        everything = tuning[tuning["task"] == task]["val_top1"].max()
        close = sum(v >= target - 1e-9 for v in space.values.values())
        members = [key for key in (space.nearest(*configs[c]) for c in loo[normalise][task][:k]) if key is not None]
        members = list(dict.fromkeys(members))
        entry: dict[str, Any] = {
            "configs": len(space.values), "best_val": space.best, "best_val_any_budget": float(everything),
            "configs_within_tol": int(close),
            "uniform_random_expected": (len(space.values) + 1) / (close + 1),
            "portfolio": members, "arms": {}}
        baselines = baseline_members(space)
        entry["baselines"] = baselines
        starts: dict[str | None, list[str]] = {None: [], "baselines": baselines, "portfolio": members}
        for arm, (first, name) in parsed.items():
            enqueue = starts[first]
            cap = random_max if name == "random" else max_evals
            curves, needs, distinct = [], [], []
            for seed in range(seeds):
                curve, seen = run_arm(space, sampler(name, seed, len(enqueue)), cap, enqueue, target, horizon)
                curves.append(curve)
                need = evals_to(curve, target)
                needs.append(need)
                distinct.append(None if need is None else seen[need - 1])
            filled: list[float] = [n if n is not None else cap + 1 for n in needs]
            mean, low, high = interval(filled)
            entry["arms"][arm] = {
                "best_after": {str(n): float(np.mean([c[min(n, len(c)) - 1] for c in curves])) for n in ns},
                "evals_to_tol": {"mean": mean, "ci95": [low, high], "per_seed": needs, "cap": cap,
                                 "censored": sum(n is None for n in needs)},
                "distinct_configs_at_tol": distinct}
        tasks[task] = entry
        if log:
            log(f"{task}: " + ", ".join(f"{a} {v['evals_to_tol']['mean']:.1f}" for a, v in entry["arms"].items())
                + f" (uniform random {entry['uniform_random_expected']:.1f}; {time.perf_counter() - start:.0f} s)")
    totals = {arm: float(sum(e["arms"][arm]["evals_to_tol"]["mean"] for e in tasks.values())) for arm in arms}
    summary: dict[str, Any] = {}
    if set(ARMS) <= set(arms):  # the portfolio's measurement, as before
        ratios = {t: e["arms"]["portfolio+tpe"]["evals_to_tol"]["mean"]
                  / e["arms"]["random"]["evals_to_tol"]["mean"] for t, e in tasks.items()}
        to_baselines = {t: e["arms"]["portfolio+tpe"]["evals_to_tol"]["mean"]
                        / e["arms"]["baselines+tpe"]["evals_to_tol"]["mean"] for t, e in tasks.items()}
        mean_ratio = float(np.mean(list(ratios.values())))
        bound = {t: _bound(e).strip() for t, e in tasks.items() if _bound(e)}
        summary = {"ratio_per_task": ratios, "mean_ratio": mean_ratio, "ratio_bound": bound,
                   "ratio_to_baselines_per_task": to_baselines,
                   "mean_ratio_to_baselines": float(np.mean(list(to_baselines.values()))),
                   "ratio_of_totals_to_baselines": totals["portfolio+tpe"] / totals["baselines+tpe"],
                   "tasks_within_target": int(sum(r <= TARGET_RATIO for r in ratios.values())),
                   "ratio_of_totals": totals["portfolio+tpe"] / totals["random"], "totals": totals,
                   "censored": {arm: int(sum(e["arms"][arm]["evals_to_tol"]["censored"] for e in tasks.values()))
                                for arm in totals},
                   "target_ratio": TARGET_RATIO, "target_met": mean_ratio <= TARGET_RATIO}
    else:
        summary = {"totals": totals,
                   "censored": {arm: int(sum(e["arms"][arm]["evals_to_tol"]["censored"] for e in tasks.values()))
                                for arm in totals}}
    if tuple(arms) != ARMS:
        summary["per_arm"] = per_arm(tasks, list(arms), ns)
    return {"command": "python -m benchmarks.replay " + " ".join(sys.argv[1:]), "table": str(table),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "settings": {"seeds": seeds, "k": k, "normalise": normalise, "tol": tol, "budget_share": budget_share,
                         "max_evals": max_evals, "random_max": random_max, "ns": list(ns),
                         "methods": None if methods is None else list(methods),
                         "evaluation": "a trial (a repeated configuration counts again)",
                         **({} if tuple(arms) == ARMS else {"arms": list(arms)})},
            **meta, "portfolio_leave_one_out": portfolio_eval, "portfolios": {h: p for h, p in loo.items()},
            "portfolio_all_tasks": greedy(scores, k, normalise, candidates),
            "tasks": tasks, "summary": summary, "wall_s": time.perf_counter() - start}


REFERENCES = ("random", "baselines+tpe")  # the arms per_arm's ratios of totals are taken to


def per_arm(tasks: dict[str, Any], arms: list[str], ns: Sequence[int], resamples: int = 10000,
            seed: int = 0) -> dict[str, Any]:
    """Per arm, over the tasks: the total of the per-task mean evaluations to the tolerance (censored seeds at the
    cap + 1) with a 95 % bootstrap interval (each arm's seeds resampled within each task, independently per arm),
    the censored seeds, the ratio of totals to each of REFERENCES that ran (interval from the same resamples), and
    the mean over tasks of the best val and of the regret (task's best in-budget val - best val) after n."""
    rng = np.random.default_rng(seed)
    boot: dict[str, np.ndarray] = {}
    for arm in arms:
        sums = np.zeros(resamples)
        for e in tasks.values():
            v = e["arms"][arm]["evals_to_tol"]
            x = np.array([n if n is not None else v["cap"] + 1 for n in v["per_seed"]], dtype=float)
            sums += x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
        boot[arm] = sums
    out: dict[str, Any] = {}
    for arm in arms:
        total = float(sum(e["arms"][arm]["evals_to_tol"]["mean"] for e in tasks.values()))
        entry: dict[str, Any] = {
            "total": total, "total_ci95": [float(q) for q in np.quantile(boot[arm], [0.025, 0.975])],
            "censored": int(sum(e["arms"][arm]["evals_to_tol"]["censored"] for e in tasks.values())),
            "seeds": int(sum(len(e["arms"][arm]["evals_to_tol"]["per_seed"]) for e in tasks.values()))}
        for ref in REFERENCES:
            if ref in arms:
                ref_total = sum(e["arms"][ref]["evals_to_tol"]["mean"] for e in tasks.values())
                entry[f"ratio_of_totals_to_{ref}"] = total / ref_total
                entry[f"ratio_of_totals_to_{ref}_ci95"] = [
                    float(q) for q in np.quantile(boot[arm] / boot[ref], [0.025, 0.975])]
        entry["best_after_mean"] = {str(n): float(np.mean([e["arms"][arm]["best_after"][str(n)]
                                                           for e in tasks.values()])) for n in ns}
        entry["regret_after_mean"] = {str(n): float(np.mean([e["best_val"] - e["arms"][arm]["best_after"][str(n)]
                                                             for e in tasks.values()])) for n in ns}
        out[arm] = entry
    return out


def _evals_cell(v: dict[str, Any]) -> str:
    """A table cell of an arm's evaluations to the tolerance: mean [interval] (censored seeds)."""
    return (f"{v['mean']:.1f} [{v['ci95'][0]:.1f}, {v['ci95'][1]:.1f}]"
            + (f" ({v['censored']} cens.)" if v["censored"] else ""))


def _short(key: str) -> str:
    c = json.loads(key)
    method = c.pop("method")
    return f"{method}(" + ", ".join(f"{k.split('_')[-1] if k not in ('lr', 'wd') else k}={v}"
                                    for k, v in c.items()) + ")"


def markdown(result: dict[str, Any]) -> str:
    if "per_arm" in result["summary"]:
        return markdown_arms(result)
    s, st = result["summary"], result["settings"]
    ns = st["ns"]
    budget = result["budget_params"]
    lines = [
        f"Command: `{result['command']}` ({result['date']}, {result['wall_s'] / 60:.1f} min on this project's "
        f"shared 2-core machine; results/replay.json). Table: `{result['table']}`.",
        "",
        ("Space per task: every configuration of a method with a closed form (no budget filter), the counts from "
         if budget is None else
         f"Space per task: the configurations within {100 * st['budget_share']:g} % of ViT-B/16's "
         f"{result['backbone_params']:,} backbone parameters ({budget:,.0f}"
         + (f"; the `full` row of final.csv says {result['backbone_params_final_csv']:,}"
            if result["backbone_params_final_csv"] is not None else "")
         + "), each configuration's count from ")
        + "the closed forms in "
        "`benchmarks/replay.py`; an evaluation is a trial (a configuration suggested again counts again). "
        f"{st['seeds']} seeds per task and arm; portfolio: k = {st['k']}, `{st['normalise']}`-normalised, built "
        f"from the other {len(result['tasks']) - 1} tasks only, then TPE. Evals = evaluations until the best val is "
        f"within {st['tol']} points of the task's best in-budget val: mean [95 % bootstrap interval over seeds]"
        + (f"; a seed that never got there counts as the arm's cap + 1 (TPE arms {st['max_evals']}, random "
           f"{st['random_max']}), marked cens" if any(s["censored"].values()) else "")
        + ".",
        "",
        f"| task | configs (≤ budget) | best val | configs within {st['tol']} | uniform random, expected "
        "| random evals | TPE evals | baselines+TPE evals | portfolio+TPE evals | ratio to random | "
        "ratio to baselines+TPE | "
        + " | ".join(f"best after {n}: random / TPE / baselines+TPE / portfolio+TPE" for n in ns if n in (1, 10, 40))
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---|" * sum(n in (1, 10, 40) for n in ns),
    ]
    for task, e in result["tasks"].items():
        cells = []
        for arm in ARMS:
            cells.append(_evals_cell(e["arms"][arm]["evals_to_tol"]))
        after = [" / ".join(f"{e['arms'][a]['best_after'][str(n)]:.1f}" for a in ARMS)
                 for n in ns if n in (1, 10, 40)]
        lines.append(f"| {task} | {e['configs']} | {e['best_val']:.1f} | {e['configs_within_tol']} | "
                     f"{e['uniform_random_expected']:.1f} | " + " | ".join(cells)
                     + f" | {_bound(e)}{s['ratio_per_task'][task]:.2f} | "
                     + f"{s['ratio_to_baselines_per_task'][task]:.2f} | "
                     + " | ".join(after) + " |")
    t = s["totals"]
    lines += ["", f"Sum over tasks of the mean evals: random {t['random']:.0f}, TPE {t['tpe']:.0f}, baselines+TPE "
              f"{t['baselines+tpe']:.0f}, portfolio+TPE {t['portfolio+tpe']:.0f} (ratio to random "
              f"{s['ratio_of_totals']:.2f}, to baselines+TPE {s['ratio_of_totals_to_baselines']:.2f}; mean of the "
              f"per-task ratios to baselines+TPE {s['mean_ratio_to_baselines']:.2f}). Baselines+TPE is autopeft's "
              "start before the portfolio: its hand-picked baselines as the table's configurations "
              "(`baseline_members`), then the same TPE.", ""]
    lines.append("Portfolio alone, leave-one-task-out (held-out task's regret of the best of the first k members, "
                 "mean over the tasks, in points; tasks within 0.5 in brackets):")
    lines += ["", "| normalisation | " + " | ".join(f"k={k}" for k in (1, 2, 3, 5, 8, 10)) + " |",
              "|---|" + "---:|" * 6]
    for how, per_k in result["portfolio_leave_one_out"].items():
        lines.append(f"| {how} | " + " | ".join(f"{per_k[str(k)]['mean_regret']:.2f} ({per_k[str(k)]['within_tol']})"
                                                  if str(k) in per_k else "–" for k in (1, 2, 3, 5, 8, 10)) + " |")
    whole = result["portfolio_all_tasks"]
    if whole:
        lines += ["", f"Portfolio from all {len(result['tasks'])} tasks (k = {st['k']}, for shipping): "
                  + "; ".join(f"`{_short(c)}`" for c in whole) + "."]
    excluded = result["excluded_methods"]
    checked = result["closed_forms"]
    lines += ["", "Closed forms against final.csv's inserted_parameters (each method's chosen configuration per "
              "task): " + ", ".join(f"{m} {c['matched']}/{c['rows']}" for m, c in sorted(checked.items()))
              + (". Excluded: " + "; ".join(f"{m} ({r})" for m, r in excluded.items()) if excluded else
                 ". Every method's closed form matches; none excluded") + "."]
    met = s["target_met"]
    lines += ["", f"Target (portfolio-then-sampler within 0.5 points of the table's best val with ≤ 40 % of the "
              f"evaluations random search needs; judged on the mean over tasks of the per-task ratio): mean ratio "
              f"{s['mean_ratio']:.2f}, {s['tasks_within_target']} of {len(result['tasks'])} tasks ≤ 0.40 → "
              f"**{'met' if met else 'missed'}**."]
    return "\n".join(lines)


def markdown_arms(result: dict[str, Any]) -> str:
    """The comparison of any set of arms (`--arms`): per task each arm's evaluations to the tolerance, then per arm
    the totals, their ratios and the mean best val after n."""
    s, st = result["summary"], result["settings"]
    arms = list(s["per_arm"])
    ns = st["ns"]
    lines = [
        f"Command: `{result['command']}` ({result['date']}, {result['wall_s'] / 60:.1f} min). Table: "
        f"`{result['table']}`" + (f", methods {', '.join(st['methods'])}" if st["methods"] else "")
        + (f"; budget {100 * st['budget_share']:g} % of the backbone's parameters" if st["budget_share"] else "")
        + f". {st['seeds']} seeds per task and arm; caps: random {st['random_max']}, other samplers "
        f"{st['max_evals']} (a seed that never got there counts as its cap + 1). Evals = evaluations until the best "
        f"val is within {st['tol']} points of the task's best in-budget val: mean [95 % bootstrap interval over "
        "seeds].",
        "",
        "| task | configs | best val | " + " | ".join(arms) + " |",
        "|---|---:|---:|" + "---:|" * len(arms),
    ]
    for task, e in result["tasks"].items():
        cells = []
        for arm in arms:
            cells.append(_evals_cell(e["arms"][arm]["evals_to_tol"]))
        lines.append(f"| {task} | {e['configs']} | {e['best_val']:.1f} | " + " | ".join(cells) + " |")
    refs = [r for r in REFERENCES if r in arms]
    lines += ["", "| arm | total evals [95 %] | censored seeds | "
              + "".join(f"ratio to {r} [95 %] | " for r in refs)
              + " | ".join(f"best val after {n} (regret)" for n in ns) + " |",
              "|---|---:|---:|" + "---:|" * (len(refs) + len(ns))]
    for arm, a in s["per_arm"].items():
        ratios = "".join(f"{a[f'ratio_of_totals_to_{r}']:.2f} [{a[f'ratio_of_totals_to_{r}_ci95'][0]:.2f}, "
                         f"{a[f'ratio_of_totals_to_{r}_ci95'][1]:.2f}] | " for r in refs)
        lines.append(f"| {arm} | {a['total']:.0f} [{a['total_ci95'][0]:.0f}, {a['total_ci95'][1]:.0f}] | "
                     f"{a['censored']}/{a['seeds']} | " + ratios
                     + " | ".join(f"{a['best_after_mean'][str(n)]:.2f} ({a['regret_after_mean'][str(n)]:.2f})"
                                  for n in ns) + " |")
    return "\n".join(lines)


def _bound(entry: dict[str, Any]) -> str:
    """'≥ ' where censored portfolio+TPE seeds make the ratio a lower bound, '≤ ' where censored random seeds make
    it an upper bound, '~ ' where both."""
    ours = entry["arms"]["portfolio+tpe"]["evals_to_tol"]["censored"]
    theirs = entry["arms"]["random"]["evals_to_tol"]["censored"]
    return "~ " if ours and theirs else "≥ " if ours else "≤ " if theirs else ""


def write_section(text: str, path: Path = ROOT / "BENCHMARKS.md", title: str = SECTION) -> None:
    """Replace the `## title` section of BENCHMARKS.md by `text` (up to the next `## `), or append it."""
    lines = path.read_text().splitlines()
    head = f"## {title}"
    block = [head, "", *text.splitlines()]
    if head in lines:
        start = lines.index(head)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = block + ([""] if end < len(lines) else [])
    else:
        lines += ["", *block]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, required=True, help="folder with tuning.csv (and final.csv)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--k", type=int, default=5, help="portfolio size enqueued before TPE")
    p.add_argument("--normalise", default="regret", choices=NORMALISATIONS)
    p.add_argument("--tol", type=float, default=0.5, help="points of val below the task's best that count as there")
    p.add_argument("--budget", type=float, default=0.005,
                   help="share of the backbone's parameters a configuration may insert (0: no budget filter)")
    p.add_argument("--max-evals", type=int, default=200, help="evaluations at most per TPE study")
    p.add_argument("--random-max", type=int, default=1000, help="evaluations at most per random study (cheap)")
    p.add_argument("--ns", type=int, nargs="+", default=[1, 5, 10, 20, 40, 60])
    p.add_argument("--out", default="replay.json", help="results file (a bare name goes to benchmarks/results/)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods of the table to replay (space and portfolio); default: all")
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated arms, each SAMPLER or START+SAMPLER (START: " + ", ".join(STARTS)
                   + "; SAMPLER: " + ", ".join(SAMPLERS) + "); default: %(default)s")
    p.add_argument("--section", default=SECTION, help="the BENCHMARKS.md section --write replaces")
    p.add_argument("--write", action="store_true", help=f"write --out and BENCHMARKS.md's section (--section, "
                   f"default '{SECTION}')")
    p.add_argument("--write-json", action="store_true", help="write --out only (BENCHMARKS.md untouched)")
    args = p.parse_args(None if argv is None else list(argv))
    if not (args.table / "tuning.csv").is_file():
        p.error(f"{args.table / 'tuning.csv'} not found")
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    arms = list(dict.fromkeys(a.strip() for a in args.arms.split(",") if a.strip()))
    try:
        for arm in arms:
            parse_arm(arm)
        if not arms:
            raise AutopeftError("--arms names no arm")
        result = replay(args.table, args.seeds, args.k, args.normalise, args.tol, args.budget or None,
                        args.max_evals, args.random_max, args.ns, log=lambda m: print(m, file=sys.stderr),
                        methods=methods, arms=tuple(arms))
    except (ValueError, AutopeftError) as exc:
        p.error(str(exc))
    text = markdown(result)
    print(text)
    if args.write or args.write_json:
        write_result(args.out, result)
    if args.write:
        write_section(text, title=args.section)


if __name__ == "__main__":
    main()
