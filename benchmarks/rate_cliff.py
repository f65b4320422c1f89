"""Rate cliff ([P] part 2): how much of random search's compute goes to runs that collapse to chance.

    python -m benchmarks.rate_cliff --label before --write     # trains (about 10 min on 2 quiet cores)
    python -m benchmarks.rate_cliff --summarise before after   # reads the stored runs, trains nothing

Protocol: the standard grid's random arm (`benchmarks/standard.py`): its tasks × split seeds, its 1 % budget, the
shipped `unified` space with the grid's batch 32 (`derived_space`), `--runs` plans and hyper-parameters per cell
drawn by Optuna's RandomSampler seeded with the cell's seed (`compare.random_jobs`, the draw the grid's arm makes),
each trained for the grid's 15 epochs as a search trial trains it (`trial_config`, `autopeft.train.train`) with its
curve and its per-epoch train loss kept. The stored runs are `results/rate_cliff_<label>.json`.

The summary of a label: the share of its epochs spent on chance-level runs (last val ≤ 0.15, the grid's 10-class
tasks), with a 95 % bootstrap interval over the cells; the distribution of last val; and the same share had each
run been stopped by the `diverged` rule as a search trial is (`autopeft.search.trainable.diverged`, after the first
epoch but the last at which it fires), with the sane runs (last val > 0.15) that rule would have stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import RESULTS, write_result

CHANCE = 0.15  # the chance level on the grid's 10-class tasks


def jobs(runs: int, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """The random arm's jobs of every cell, as `standard.run_cell` builds them."""
    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget
    from autopeft.search.settings import SearchSettings
    from autopeft.space import load_space
    from benchmarks.compare import CellConfig, random_jobs
    from benchmarks.standard import CACHE_DIR, STANDARD, derived_space

    c = replace(STANDARD, seeds=seeds)
    space_path = derived_space(c, CACHE_DIR)
    spec = backbone_spec(c.backbone)
    budget = parse_budget(c.budget, spec)
    space = load_space(str(space_path))
    out = []
    for task in c.tasks:
        for seed in c.seeds:
            base = dict(task=task, backbone=c.backbone, weights=c.weights, data_root=c.data_root, data_seed=seed,
                        seed=seed, epochs=c.epochs)
            cell = CellConfig(task=task, budget=c.budget, seed=seed, backbone=c.backbone, epochs=c.epochs, lrs=(),
                              weights=c.weights, data_root=c.data_root, space=str(space_path),
                              grace_epochs=SearchSettings().grace_epochs, reduction_factor=2, concurrency=2,
                              references=())
            for j in random_jobs(cell, spec, budget, space, runs):
                out.append(dict(base, plan=j["plan"], hparams={**j["hparams"], "batch_size": c.batch_size}))
    return out


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One run with its per-epoch val accuracy and train loss, its classes and val size, and the rate it trained at."""
    import torch

    from autopeft.data import data_config, load_dataset
    from autopeft.plan import PeftPlan
    from autopeft.search.trainable import trial_config
    from autopeft.train import train

    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_dataset(job["task"], job.get("data_root"), seed=job["data_seed"], **data_config(job["backbone"]))
    cfg = trial_config(job["hparams"], job["epochs"], job["seed"])
    out: dict[str, Any] = {"task": job["task"], "seed": job["seed"], "hparams": job["hparams"],
                           "classes": data.num_classes, "val_size": len(data.split("val"))}  # type: ignore[arg-type]
    try:
        result = train(job["backbone"], PeftPlan.from_dict(job["plan"]), data, cfg, weights=job.get("weights"))
    except Exception as exc:  # noqa: BLE001  a NaN loss is a result here
        return {**out, "status": "FAIL", "reason": f"{type(exc).__name__}: {exc}"[:300], "curve": [],
                "train_loss": [], "seconds": time.perf_counter() - start}
    return {**out, "status": "COMPLETE", "curve": [h["val_acc"] for h in result.history],
            "train_loss": [h["train_loss"] for h in result.history], "lr": result.lr,
            "peft_params": result.peft_params, "seconds": time.perf_counter() - start}


def _interval(per_cell: list[list[tuple[int, int]]], resamples: int = 10_000) -> tuple:
    """Share of epochs (sum of chance epochs / sum of epochs) with a bootstrap interval over the cells."""
    rng = random.Random(0)

    def share(cells: list[list[tuple[int, int]]]) -> float:
        bad = sum(b for c in cells for b, _ in c)
        total = sum(t for c in cells for _, t in c)
        return bad / total if total else 0.0

    draws = sorted(share([rng.choice(per_cell) for _ in per_cell]) for _ in range(resamples))
    return share(per_cell), draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]


def summarise(label: str, max_scale: float | None = None) -> dict[str, Any]:
    """The label's figures; `max_scale`: only its runs that drew lr_scale ≤ it (what a narrower range keeps of
    the same draws: a subset, not a new sample)."""
    from autopeft.search.trainable import diverged

    rows = json.loads((RESULTS / f"rate_cliff_{label}.json").read_text())["runs"]
    if max_scale is not None:
        rows = [r for r in rows if r["hparams"]["lr_scale"] <= max_scale]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["seed"]), []).append(r)
    plain, stopped, false_stops, stopped_vals = [], [], 0, []
    for runs in cells.values():
        p, s = [], []
        for r in runs:
            epochs = 15 if r["status"] == "FAIL" else len(r["curve"])
            last = r["curve"][-1] if r["curve"] else 0.0
            bad = r["status"] == "FAIL" or last <= CHANCE
            p.append((epochs if bad else 0, epochs))
            # as a search trial stops: at the first epoch but the last after which the rule fires
            stop = next((i + 1 for i in range(len(r["curve"]) - 1)
                         if diverged(r["curve"][: i + 1], r["train_loss"][i], r["classes"], r["val_size"])), None)
            false_stops += stop is not None and not bad
            if stop is not None and not bad:
                stopped_vals.append(r["curve"][-1])
            e = 1 if r["status"] == "FAIL" else stop or epochs  # a NaN loss ends a trial at once too
            s.append((e if bad else 0, e))
        plain.append(p)
        stopped.append(s)
    lasts = sorted(r["curve"][-1] if r["curve"] else 0.0 for r in rows)
    q = [lasts[min(len(lasts) - 1, int(f * len(lasts)))] for f in (0.1, 0.25, 0.5, 0.75, 0.9)]
    chance = [r for r in rows if not r["curve"] or r["curve"][-1] <= CHANCE]
    return {"label": label, "max_scale": max_scale, "runs": len(rows), "chance_runs": len(chance),
            "share": _interval(plain), "share_with_stop": _interval(stopped), "false_stops": false_stops,
            "false_stop_last_vals": sorted(stopped_vals), "val_quantiles": q, "mean_val": sum(lasts) / len(lasts),
            "chance_scales": sorted(round(r["hparams"].get("lr_scale", math.nan), 2) for r in chance)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rate_cliff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="run")
    p.add_argument("--runs", type=int, default=8, help="random plans per cell (the grid's N)")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write results/rate_cliff_<label>.json")
    p.add_argument("--summarise", nargs="+", metavar="LABEL", help="summarise stored labels instead of training")
    p.add_argument("--max-scale", type=float, help="summarise only the runs that drew lr_scale ≤ this")
    args = p.parse_args(argv)
    if args.summarise:
        for label in args.summarise:
            print(json.dumps(summarise(label, args.max_scale)))
        return
    todo = jobs(args.runs, tuple(int(s) for s in args.seeds.split(",")))
    start = time.perf_counter()
    folder = RESULTS / "cache" / f"rate_cliff_{args.label}"  # one file per finished run: a stopped run goes on
    folder.mkdir(parents=True, exist_ok=True)
    names = [folder / (hashlib.sha256(json.dumps(j, sort_keys=True).encode()).hexdigest()[:16] + ".json")
             for j in todo]
    with ProcessPoolExecutor(args.workers) as pool:
        for name, out in zip([n for n in names if not n.is_file()],
                             pool.map(run, [j for j, n in zip(todo, names, strict=True) if not n.is_file()]),
                             strict=True):
            name.write_text(json.dumps(out))
    outs = [json.loads(n.read_text()) for n in names]
    record = {"command": "python -m benchmarks.rate_cliff " + " ".join(argv or []), "wall_s":
              time.perf_counter() - start, "runs": outs}
    if args.write:
        print(write_result(Path(RESULTS / f"rate_cliff_{args.label}.json"), record))
    print(f"{len(outs)} runs in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
