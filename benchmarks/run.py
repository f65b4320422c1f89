"""Run the search-quality comparison and the concurrency figure on a suite; write JSON and Markdown tables.

    python -m benchmarks.run --quick                       # mini suite, ≤ 15 min on 2 CPU cores
    python -m benchmarks.run --full [--suite mini]         # 7 tasks × 3 budgets × 3 seeds (hours on a CPU)
    python -m benchmarks.run --full --suite vtab1k --data-root DIR [--weights FILE]   # ViT-B/16, GPUs
    python -m benchmarks.run --standard --label NAME       # issue [I]'s measuring stick (benchmarks/standard.py)

What each arm runs and how test accuracy is measured: see benchmarks/compare.py. Results go to
benchmarks/results/suite_<suite>_<mode>.json (and .md, the tables of BENCHMARKS.md); bad input prints one line and
exits 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from benchmarks import RESULTS, backbone_record, write_result


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"benchmarks.run: error: {message} (see --help)\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m benchmarks.run", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="the small grid (minutes)")
    mode.add_argument("--full", action="store_true", help="the whole grid: every task, 3 budgets, 3 seeds")
    mode.add_argument("--standard", action="store_true",
                      help="the standard grid of [I] (2 few-shot tasks × 4 seeds at 1 %%, equal compute per arm)")
    p.add_argument("--label", default=None, help="--standard: the row to write (e.g. before, or the change's name)")
    p.add_argument("--no-cache", action="store_true", help="--standard: run every arm again (cache not read)")
    p.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--standard: a search setting of the search arm instead of autopeft's default (repeatable), "
                        "e.g. objectives=acc")
    p.add_argument("--no-search-cap", action="store_true",
                   help="--standard: the search arm as rows before --max-epochs (trials estimated, records cut)")
    p.add_argument("--search-space", default=None, metavar="SPACE",
                   help="--standard: the search arm's space (the other arms stay in the grid's unified space)")
    p.add_argument("--search-space-set", action="append", default=[], metavar="KEY=YAML",
                   help="--standard: a change to the search arm's space (repeatable): a dotted key of the space file "
                        "and its YAML value, e.g. fill='[0.5, 1.0]'")
    p.add_argument("--select", default=None, metavar="val|cv:K",
                   help="--standard: how every arm picks its final (val, or cv:K over its --select-top best); the "
                        "row also keeps each arm's val pick")
    p.add_argument("--select-top", type=int, default=None, metavar="N", help="--standard: trials cv:K scores (3)")
    p.add_argument("--suite", default="mini", choices=("mini", "vtab1k"))
    p.add_argument("--data-root", default=None, help="data folder (required for vtab1k)")
    p.add_argument("--weights", default=None, help="a local weights file for the suite's backbone")
    p.add_argument("--tasks", default=None, help="comma-separated tasks of the suite (instead of the mode's)")
    p.add_argument("--workers", type=int, default=2, help="parallel in-process runs and search concurrency")
    p.add_argument("--no-speed", action="store_true", help="skip the concurrency 1 vs 2 measurement")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/suite_<suite>_<mode>.json)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace):
    """The Mode to run, validated against the arguments and the data; raises AutopeftError on bad input."""
    from dataclasses import replace

    from autopeft.errors import AutopeftError
    from benchmarks.suite import check_data, get_mode

    mode = get_mode(args.suite, args.quick)
    if (args.label or args.no_cache or args.search_set or args.no_search_cap or args.search_space
            or args.search_space_set or args.select or args.select_top is not None):
        raise AutopeftError("--label, --no-cache, --search-set, --search-space, --search-space-set, --no-search-cap, "
                            "--select and --select-top belong to --standard")
    if args.workers < 1:
        raise AutopeftError(f"--workers must be >= 1, got {args.workers}")
    if args.tasks:
        chosen = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        suite_tasks = get_mode(args.suite, quick=False).tasks  # any task of the suite, in either mode
        unknown = [t for t in chosen if t not in suite_tasks]
        if unknown or not chosen:
            raise AutopeftError(f"--tasks: {', '.join(unknown) or '(none)'} not in the {args.suite} suite; choose "
                                f"from {', '.join(suite_tasks)}")
        mode = replace(mode, tasks=chosen)
    if args.weights and not Path(args.weights).expanduser().is_file():
        raise AutopeftError(f"--weights {args.weights} is not a file")
    if args.out and Path(args.out).expanduser().is_dir():
        raise AutopeftError(f"--out {args.out} is a folder; give a .json file path")
    check_data(mode, args.data_root)
    return mode


def concurrency_figure(mode, weights: str | None, data_root: str | None, storage_dir: str, gpus: float = 0.0
                       ) -> list[dict[str, Any]]:
    """Wall time of the same small search (no early stopping, no baselines) at concurrency 1 and 2."""
    from autopeft.search import search, settings_from

    rows = []
    for conc in (1, 2):
        flags = dict(study=f"speed-c{conc}", dataset=mode.speed_task, budget=mode.budgets[0], backbone=mode.backbone,
                     weights=weights, data_root=data_root, trials=mode.speed_trials, epochs=mode.speed_epochs,
                     grace_epochs=mode.speed_epochs, concurrency=conc, cpus_per_trial=1, baselines=False, seed=0,
                     gpus_per_trial=gpus,
                     storage=f"sqlite:///{storage_dir}/speed-c{conc}.db")
        start = time.perf_counter()
        outcome = search(settings_from(None, flags))
        wall = time.perf_counter() - start
        rows.append({"concurrency": conc, "trials": len(outcome.records), "epochs": mode.speed_epochs,
                     "wall_s": wall, "sum_trial_s": sum(r.seconds for r in outcome.records),
                     "load_after": os.getloadavg()})
        print(f"speed: concurrency {conc}: {len(outcome.records)} trials in {wall:.0f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = parse(argv)
    if args.standard:
        from benchmarks.standard_cli import main_standard

        return main_standard(args, argv if argv is not None else sys.argv[1:])
    from autopeft.errors import AutopeftError
    from autopeft.runs import versions

    try:
        mode = resolve(args)
    except AutopeftError as exc:
        print(f"benchmarks.run: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().absolute() if args.out else RESULTS / f"suite_{mode.suite}_{mode.mode}.json"
    weights = str(Path(args.weights).expanduser().absolute()) if args.weights else None
    data_root = str(Path(args.data_root).expanduser().absolute()) if args.data_root else None
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "load_before": os.getloadavg(), "gpu": _gpu()},
            "versions": versions(("optuna", "ray", "mlxtend", "scikit-learn")),
            "backbone": backbone_record(mode.backbone, weights),
            "mode": {k: v for k, v in vars(mode).items()}, "workers": args.workers}
    result: dict[str, Any] = {"meta": meta, "cells": [], "speed": None}

    import torch

    # search trials see GPUs only when they ask for them; split the machine's among the concurrent trials
    gpus = min(1.0, torch.cuda.device_count() / args.workers) if torch.cuda.is_available() else 0.0

    from benchmarks.compare import CellConfig, compute_session, run_cell
    from benchmarks.report import aggregate, markdown

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autopeft-bench-") as tmp:
        os.environ.setdefault("AUTOPEFT_CACHE", str(Path(tmp) / "cache"))
        with compute_session(args.workers) as pool:
            for task in mode.tasks:
                for budget in mode.budgets:
                    for seed in mode.seeds:
                        cell = CellConfig(task=task, budget=budget, seed=seed, backbone=mode.backbone,
                                          epochs=mode.epochs, lrs=mode.lrs, weights=weights, data_root=data_root,
                                          grace_epochs=mode.grace_epochs, reduction_factor=mode.reduction_factor,
                                          concurrency=args.workers, references=mode.references,
                                          gpus_per_trial=gpus)
                        result["cells"].append(run_cell(cell, pool, tmp, log=lambda m: print(m, file=sys.stderr)))
                        write_result(out, result)  # after every cell: a long run that stops keeps what it measured
            if not args.no_speed:
                result["speed"] = concurrency_figure(mode, weights, data_root, tmp, gpus)
    meta.update(wall_s=time.perf_counter() - start, load_after=os.getloadavg(),
                finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    result["summary"] = aggregate(result["cells"], mode.budgets)
    write_result(out, result)
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None




if __name__ == "__main__":
    sys.exit(main())
