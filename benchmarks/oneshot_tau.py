"""Issue [J]'s ranking measure: does a supernet's score rank sub-plans as training them alone does?

    python -m benchmarks.oneshot_tau                       # the mini suite's two few-shot tasks, ~15 min on 2 cores
    python -m benchmarks.oneshot_tau --supernet-epochs 30 --label s30

Per task (the standard grid's protocol: `autopeft_tiny_vit`, 1 % budget, split seed 0, batch 32, 15-epoch runs):
train the supernet of the space (`autopeft.search.oneshot.train_supernet`), draw `--plans` random sub-plans with the
space's own sampler, score each as a slice of the supernet on val (accuracy, ties by loss) and train each alone for
the grid's epochs at the same hyper-parameters (`compare.run_job`, as a search trial trains); Kendall's τ between
the scores and the stand-alone final val accuracies, with a bootstrap interval over the plans.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import RESULTS
from benchmarks.compare import run_job
from benchmarks.standard import StandardConfig, derived_space


def _tau(x: list[float], y: list[float]) -> float:
    from scipy.stats import kendalltau

    value = kendalltau(x, y).statistic
    return 0.0 if value != value else float(value)  # NaN (a constant side): no ranking


def tau_interval(x: list[float], y: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95 % bootstrap interval of Kendall's τ over the (score, accuracy) pairs."""
    rng = random.Random(seed)
    n = len(x)
    values = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        values.append(_tau([x[i] for i in idx], [y[i] for i in idx]))
    values.sort()
    return values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]


def _cached(jobs: list[dict[str, Any]], pool: ProcessPoolExecutor) -> list[dict[str, Any]]:
    """`run_job` of each job, read from the grid's run cache when the same job ran before with the same training
    code (`standard.code_version`): a second supernet setting re-trains only the supernet."""
    from benchmarks.standard import CACHE_DIR, code_version

    version = code_version()
    keys = [hashlib.sha256(json.dumps({"job": j, "code": version}, sort_keys=True).encode()).hexdigest()[:24]
            for j in jobs]
    paths = [CACHE_DIR / f"tau-{k}.json" for k in keys]
    todo = [i for i, path in enumerate(paths) if not path.is_file()]
    for i, out in zip(todo, pool.map(run_job, [jobs[i] for i in todo]), strict=True):
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        paths[i].write_text(json.dumps(out))
    return [json.loads(path.read_text()) for path in paths]


def measure(task: str, space_path: Path, c: StandardConfig, supernet_epochs: int, plans: int, seed: int,
            pool: ProcessPoolExecutor, plan_rates: bool = False) -> dict[str, Any]:
    import torch

    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget
    from autopeft.search.oneshot import SubPlans, SupernetJob, supernet_hparams, train_supernet
    from autopeft.space import load_space
    from autopeft.train import evaluate

    space, spec = load_space(str(space_path)), backbone_spec(c.backbone)
    limit = parse_budget(c.budget, spec).limit
    job = SupernetJob(dataset=task, backbone=c.backbone, space=str(space_path), budget_limit=limit,
                      epochs=supernet_epochs, candidates=plans, finalists=1, seed=seed, weights=c.weights,
                      data_root=c.data_root, plan_rates=plan_rates)
    torch.set_num_threads(2)
    start = time.perf_counter()
    trained = train_supernet(job)
    supernet_seconds = time.perf_counter() - start
    draws = SubPlans(space, spec, limit, seed)
    drawn, keys, k = [], set(), 0
    while len(drawn) < plans:  # distinct plans, drawn by the space's sampler as the supernet's steps are
        plan = draws.draw(1_000_000 + k)
        k += 1
        if plan.to_json() not in keys:
            keys.add(plan.to_json())
            drawn.append(plan)
    scores = []
    for plan in drawn:
        trained.net.activate(plan)
        loss, acc = evaluate(trained.run.model, trained.run.eval_src, trained.eval_batch_size, trained.run.device,
                             trained.run.forward)
        scores.append((acc, loss))
    hparams = supernet_hparams(space)
    jobs = [dict(task=task, backbone=c.backbone, weights=c.weights, data_root=c.data_root, seed=seed,
                 epochs=c.epochs, plan=p.to_dict(), hparams=hparams) for p in drawn]
    start = time.perf_counter()
    outs = _cached(jobs, pool)
    alone_seconds = time.perf_counter() - start
    accs = [o["curve"][-1] if o["curve"] else 0.0 for o in outs]
    score = [a - 1e-6 * loss for a, loss in scores]  # accuracy, ties broken by the lower loss, as the search ranks
    low, high = tau_interval(score, accs)
    best = max(range(len(drawn)), key=lambda i: score[i])
    return {"task": task, "tau": _tau(score, accs), "tau_interval": [low, high], "plans": len(drawn),
            "supernet_epochs": supernet_epochs, "epochs": c.epochs, "supernet_seconds": supernet_seconds,
            "alone_seconds": alone_seconds, "supernet_pick_alone_acc": accs[best], "best_alone_acc": max(accs),
            "mean_alone_acc": sum(accs) / len(accs),
            "pairs": [{"plan": p.short(), "params": p.count(spec), "score": s[0], "score_loss": s[1], "alone": a}
                      for p, s, a in zip(drawn, scores, accs, strict=True)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="oneshot")
    p.add_argument("--supernet-epochs", type=int, default=15)
    p.add_argument("--plans", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="default")
    p.add_argument("--plan-rates", action="store_true",
                   help="train each step at its sub-plan's own learning rate (default: the cover plan's, every step)")
    p.add_argument("--out", type=Path, default=RESULTS / "oneshot_tau.json")
    args = p.parse_args(argv)
    c = StandardConfig(space=args.space)
    space_path = derived_space(c, RESULTS / "spaces", args.space)
    rows = []
    with ProcessPoolExecutor(max_workers=c.workers, initializer=_one_thread) as pool:
        for task in c.tasks:
            row = measure(task, space_path, c, args.supernet_epochs, args.plans, args.seed, pool,
                          plan_rates=args.plan_rates)
            print(f"{task}: tau {row['tau']:+.3f} [{row['tau_interval'][0]:+.3f}, {row['tau_interval'][1]:+.3f}] over "
                  f"{row['plans']} plans; supernet {row['supernet_seconds']:.0f} s, alone {row['alone_seconds']:.0f} s",
                  flush=True)
            rows.append(row)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    data["rows"] = [r for r in data["rows"] if r.get("label") != args.label]
    data["rows"].append({"label": args.label, "space": args.space, "seed": args.seed,
                         "plan_rates": args.plan_rates, "tasks": rows})
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


if __name__ == "__main__":
    raise SystemExit(main())
