"""Per-trial overhead of the search engine (Ray Tune + OptunaSearch + SQLite storage) around the training itself.

    python -m benchmarks.engine_overhead [--trials 4] [--long-trials 2] [--long-epochs 30] [--write]

Two searches run one trial at a time (concurrency 1, no early stopping, no baselines): one with trivial trials
(`autopeft_test_vit`, 1 epoch) and one with trials of about a minute (the bundled backbone on digits,
`--long-epochs` epochs). A trial's own time is measured inside the trainable (data, model, training, evaluation);
the overhead per trial is (search wall time − Ray start-up − Σ trial times) / trials: scheduling, worker processes
and their imports, sampling, storage writes. Ray's start-up is measured once and reported apart.

The engine reuses trial workers (Ray's `reuse_actors`); the trivial case also runs with fresh workers per trial
(the engine's TuneConfig patched here, in the driver, for that one search) so the table shows what reuse saves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks import write_result


@contextlib.contextmanager
def fresh_workers():
    """Within: every trial gets a new worker process (the engine's reuse_actors=True turned off)."""
    from ray import tune

    original = tune.TuneConfig

    def config(*args, **kwargs):
        return original(*args, **{**kwargs, "reuse_actors": False})

    tune.TuneConfig = config
    try:
        yield
    finally:
        tune.TuneConfig = original


def one(label: str, flags: dict, workdir: Path, reuse: bool = True) -> dict:
    import ray

    from autopeft.search import search, settings_from

    os.chdir(workdir)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        with contextlib.nullcontext() if reuse else fresh_workers():
            outcome = search(settings_from(None, flags))
        wall = time.perf_counter() - t1
    finally:
        ray.shutdown()
    trial_s = [r.seconds for r in outcome.records]
    n = len(trial_s)
    overhead = (wall - sum(trial_s)) / n
    row = {"case": label, "reuse": reuse, "trials": n, "ray_init_s": init_s, "search_wall_s": wall,
           "mean_trial_s": sum(trial_s) / n, "overhead_per_trial_s": overhead,
           "overhead_ratio": overhead / (sum(trial_s) / n)}
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--long-trials", type=int, default=2)
    p.add_argument("--long-epochs", type=int, default=30)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from autopeft.backbones import create_backbone

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        os.environ["AUTOPEFT_CACHE"] = str(tmp_path / "cache")
        torch.manual_seed(0)
        weights = tmp_path / "w.safetensors"
        save_file(create_backbone("autopeft_test_vit").state_dict(), str(weights))
        common = dict(dataset="digits", budget="5%", concurrency=1, cpus_per_trial=1, baselines=False, seed=0)
        trivial = dict(common, backbone="autopeft_test_vit", weights=str(weights), trials=args.trials, epochs=1,
                       grace_epochs=1)
        rows = [
            one("trivial trial (test ViT, 1 epoch)", dict(trivial, study="trivial"), tmp_path),
            one("trivial trial, a fresh worker per trial", dict(trivial, study="fresh"), tmp_path, reuse=False),
            one(f"~1-minute trial (bundled ViT, digits, {args.long_epochs} epochs)",
                dict(common, study="long", budget="2%", trials=args.long_trials, epochs=args.long_epochs,
                     grace_epochs=args.long_epochs), tmp_path),
        ]
    lines = [
        f"Command: `python -m benchmarks.engine_overhead {' '.join(sys.argv[1:])}`  ",
        f"Date: {date.today()}, {platform.machine()}, {os.cpu_count()} CPUs; local Ray (2 CPUs), concurrency 1, "
        "SQLite storage.",
        "",
        "| case | trials | Ray start s | search wall s | mean trial s | overhead / trial s | overhead ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['trials']} | {r['ray_init_s']:.1f} | {r['search_wall_s']:.1f} | "
                     f"{r['mean_trial_s']:.1f} | {r['overhead_per_trial_s']:.2f} | {100 * r['overhead_ratio']:.1f} % |")
    fresh, reused = rows[1]["overhead_per_trial_s"], rows[0]["overhead_per_trial_s"]
    lines += ["", f"Worker reuse cuts the overhead per trivial trial {fresh / reused:.1f}× "
                  f"({fresh:.2f} → {reused:.2f} s)."]
    print("\n".join(lines))
    if args.write:
        write_result("engine_overhead.json", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
