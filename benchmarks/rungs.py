"""[P] part 3: where early stopping's rungs inform, replayed on a grid row's stored val curves (no training).

    python -m benchmarks.rungs [--label fair-before [--label rates]] [--orders 200] [--write]

Per cell of the row, the pool is every full-length run of the arms trained without early stopping (random and
hand-picked: 16 runs of `epochs_per_run` epochs; their per-epoch val curves are in the row). A schedule replays the
search arm's situation on that pool: the runs arrive in a random order (`--orders` orders per cell), two at a time
(the grid's concurrency), epoch by epoch, under the arm's epoch cap (`horizon`: a run starts an epoch only while the
cap has room for it beside the epochs the other live run holds, as `autopeft.search.epoch_cap` does). ASHA decides
as Ray's asynchronous successive halving does: rungs at grace × rf^k below the run length; a run reaching a rung
stops when its val is below the (1 − 1/rf) quantile of the vals recorded at that rung before it (the first run at a
rung always goes on). "one-epoch-top-k" trains every run for one epoch, then the k best to the end. Several
`--label`s pool their curves cell by cell (more draws of each cell; fewer orders run out of runs before the cap).

A schedule's pick is the run with the best final val among those that trained every epoch (the engine's choice);
reported per schedule, over cells and orders: the pick's final val, its shortfall from the pool's best final val
(mean, 95 % bootstrap interval over cells), how often it is the pool's best, the runs it saw and the epochs it spent.
The same val picks and scores, so a schedule that brings more runs to the end gains a little from the maximum of
noisier values (winner's curse): the replay proposes candidates; a grid row decides (its finals score on test).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_result
from benchmarks.defaults_on_val import interval

ROOT = Path(__file__).resolve().parents[1]
ROW_FILE = ROOT / "benchmarks" / "results" / "standard.json"
OUT = ROOT / "benchmarks" / "results" / "rungs.json"
POOL_ARMS = ("random", "handpicked")


@dataclass(frozen=True)
class Schedule:
    """ASHA (grace, rf), first-in first-out (grace None), or one epoch for all then the best `top_k` to the end."""

    name: str
    grace: int | None = None
    rf: int = 2
    top_k: int | None = None


def milestones(grace: int, rf: int, max_t: int) -> list[int]:
    """Ray's ASHA rungs for one bracket: grace × rf^k, k = 0 … int(log(max_t / grace) / log(rf)), below max_t."""
    count = int(math.log(max_t / grace) / math.log(rf) + 1) if max_t > grace else 0
    return [m for k in range(count) if (m := grace * rf ** k) < max_t]


def replay_asha(curves: Sequence[Sequence[float]], order: Sequence[int], grace: int | None, rf: int, cap: int,
                concurrency: int = 2) -> tuple[list[int], int, int]:
    """(runs that trained every epoch, epochs spent, runs started) of one order of the pool under ASHA or FIFO."""
    max_t = len(curves[0])
    rungs: dict[int, list[float]] = {m: [] for m in milestones(grace, rf, max_t)} if grace is not None else {}
    live: dict[int, int] = {}  # run -> epochs trained
    queue, done, spent, started = list(order), [], 0, 0
    while queue or live:
        while len(live) < concurrency and queue and spent + len(live) + 1 <= cap:
            live[queue.pop(0)] = 0
            started += 1
        if not live:
            break
        for run in list(live):  # every live run trains one epoch, then reports
            live[run] += 1
            spent += 1
            epoch, val = live[run], curves[run][live[run] - 1]
            stop = False
            if epoch in rungs:
                recorded = rungs[epoch]
                if recorded and val < float(np.percentile(recorded, (1 - 1 / rf) * 100)):
                    stop = True
                recorded.append(val)
            if epoch == max_t:
                done.append(run)
                stop = True
            others = len(live) - 1
            if not stop and spent + others + 1 > cap:  # no room for its next epoch: the cap stops it here
                stop = True
            if stop:
                del live[run]
    return done, spent, started


def replay_top_k(curves: Sequence[Sequence[float]], order: Sequence[int], k: int, cap: int) -> tuple[list[int], int,
                                                                                                    int]:
    """One epoch for as many runs as the cap allows beside k full runs, then the k best of them to the end."""
    max_t = len(curves[0])
    n = min(len(order), max(k, cap - k * (max_t - 1)))
    first = list(order[:n])
    best = sorted(first, key=lambda r: -curves[r][0])[:k]
    return best, n + len(best) * (max_t - 1), n


def replay_cell(cell: dict[str, Any], schedules: Sequence[Schedule], orders: int, seed: int) -> dict[str, Any]:
    curves = [cv for a in POOL_ARMS for cv in cell["arms"][a].get("curves") or []]
    length = cell["epochs_per_run"]
    curves = [cv for cv in curves if len(cv) == length]
    cap = int(cell["horizon"])
    finals = np.array([cv[-1] for cv in curves])
    best = float(finals.max())
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(curves)).tolist() for _ in range(orders)]
    out: dict[str, Any] = {"task": cell["task"], "seed": cell["seed"], "pool": len(curves), "pool_best": best}
    for s in schedules:
        picks, spent, seen = [], [], []
        for order in perms:
            if s.top_k is not None:
                done, used, started = replay_top_k(curves, order, s.top_k, cap)
            else:
                done, used, started = replay_asha(curves, order, s.grace, s.rf, cap)
            picks.append(float(finals[done].max()) if done else math.nan)
            spent.append(used)
            seen.append(started)
        arr = np.array(picks)
        out[s.name] = {"pick": float(np.nanmean(arr)), "shortfall": best - float(np.nanmean(arr)),
                       "pick_is_best": float(np.mean(arr == best)), "no_pick": float(np.mean(np.isnan(arr))),
                       "epochs": float(np.mean(spent)), "runs": float(np.mean(seen))}
    return out


SCHEDULES = (
    Schedule("fifo"),
    *(Schedule(f"asha g{g} rf{rf}", g, rf) for g in (1, 2, 3, 5, 8) for rf in (2, 3, 4)),
    *(Schedule(f"top{k} after 1", top_k=k) for k in (4, 6)),
)


def pooled_cells(rows: dict[str, Any], labels: Sequence[str]) -> list[dict[str, Any]]:
    """The cells of the first label with the curves of every label's same cell (task, seed) pooled: runs of other
    rows on the same split are more draws of that cell's pool (rows must share epochs and horizon)."""
    for label in labels:
        if label not in rows:
            raise SystemExit(f"no row '{label}'; rows: {', '.join(rows)}")
    by_cell: dict[tuple[str, int], dict[str, Any]] = {}
    for label in labels:
        for c in rows[label]["cells"]:
            if not all(c["arms"].get(a, {}).get("curves") for a in POOL_ARMS):
                continue
            key = (c["task"], c["seed"])
            if key not in by_cell:
                by_cell[key] = {**c, "arms": {a: {"curves": list(c["arms"][a]["curves"])} for a in POOL_ARMS}}
            elif (c["epochs_per_run"], c["horizon"]) != (by_cell[key]["epochs_per_run"], by_cell[key]["horizon"]):
                raise SystemExit(f"row '{label}' runs {c['epochs_per_run']} epochs under a cap of {c['horizon']}, "
                                 "unlike the first row's: its curves are another pool")
            else:
                for a in POOL_ARMS:
                    by_cell[key]["arms"][a]["curves"] += c["arms"][a]["curves"]
    return list(by_cell.values())


def run(labels: Sequence[str], orders: int = 200, seed: int = 0, path: Path = ROW_FILE,
        schedules: Sequence[Schedule] = SCHEDULES) -> dict[str, Any]:
    cells = pooled_cells(json.loads(path.read_text())["rows"], labels)
    label = "+".join(labels)
    if not cells:
        raise SystemExit(f"row '{label}' stores no curves of {' and '.join(POOL_ARMS)} (rows before [P] part 1)")
    per_cell = [replay_cell(c, schedules, orders, seed + i) for i, c in enumerate(cells)]
    summary = {}
    for s in schedules:
        short = [c[s.name]["shortfall"] for c in per_cell]
        mean, lo, hi = interval(short, seed=seed)
        summary[s.name] = {"shortfall": [mean, lo, hi],
                           "pick_is_best": float(np.mean([c[s.name]["pick_is_best"] for c in per_cell])),
                           "epochs": float(np.mean([c[s.name]["epochs"] for c in per_cell])),
                           "runs": float(np.mean([c[s.name]["runs"] for c in per_cell])),
                           "no_pick": float(np.mean([c[s.name]["no_pick"] for c in per_cell]))}
    return {"label": label, "orders": orders, "cells": per_cell, "summary": summary}


def table(result: dict[str, Any]) -> str:
    lines = [f"row `{result['label']}`, {len(result['cells'])} cells × {result['orders']} orders",
             "| schedule | shortfall of the pick's final val from the pool's best, pts [95 % CI] | pick is the best "
             "| runs started | epochs spent |", "|---|---|---:|---:|---:|"]
    for name, s in sorted(result["summary"].items(), key=lambda kv: kv[1]["shortfall"][0]):
        m, lo, hi = (100 * x for x in s["shortfall"])
        lines.append(f"| {name} | {m:.2f} [{lo:.2f}, {hi:.2f}] | {100 * s['pick_is_best']:.0f} % "
                     f"| {s['runs']:.1f} | {s['epochs']:.0f} |")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rungs", description=__doc__.splitlines()[0])
    p.add_argument("--label", action="append", default=None,
                   help="the grid row whose curves to replay (repeat: the rows' curves of each cell pooled; "
                        "default fair-before)")
    p.add_argument("--orders", type=int, default=200, help="random arrival orders per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"add the result to {OUT.relative_to(ROOT)}")
    args = p.parse_args(list(argv) if argv is not None else None)
    result = run(args.label or ["fair-before"], args.orders, args.seed)
    print(table(result))
    if args.write:
        doc = json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}
        doc["rows"][result["label"]] = result
        write_result(OUT, doc)


if __name__ == "__main__":
    main()
