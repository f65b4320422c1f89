"""`python -m benchmarks.run --standard`: argument checks (one line, exit 2, nothing written), then the grid."""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import types
import typing
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import RESULTS, write_result
from benchmarks.standard import CACHE_DIR, STANDARD, StandardConfig

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


# what the grid itself decides for every arm: the search arm may not change these
GRID_KEYS = ("study", "dataset", "budget", "backbone", "weights", "data_root", "space", "trials", "epochs", "storage",
             "seed", "resume", "address", "concurrency", "cpus_per_trial", "gpus_per_trial", "max_epochs", "select",
             "select_top")  # select: the grid's --select, the same for every arm


def search_settings(pairs: list[str]) -> tuple[tuple[str, Any], ...]:
    """`KEY=VALUE` strings as typed search settings of the search arm, checked against SearchSettings now (one
    line), not an hour into the grid."""
    from dataclasses import fields

    from autopeft.errors import AutopeftError
    from autopeft.search.settings import SearchSettings

    hints = typing.get_type_hints(SearchSettings)
    defaults = {f.name: f.default for f in fields(SearchSettings) if f.name not in GRID_KEYS}
    out = []
    for pair in pairs:
        key, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or key not in defaults:
            raise AutopeftError(f"--search-set '{pair}': give KEY=VALUE with KEY one of {', '.join(sorted(defaults))}")
        hint = hints[key]  # `int | None` -> {int, NoneType}; `tuple[float, ...]` stays itself (text, parsed later)
        kinds = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
        try:
            value: Any = (text.lower() in ("1", "true", "yes", "on") if bool in kinds else
                          int(text) if int in kinds else float(text) if float in kinds else text)
        except ValueError:
            kind = "a whole number" if int in kinds else "a number"
            raise AutopeftError(f"--search-set '{pair}': {key} takes {kind}") from None
        out.append((key, value))
    SearchSettings(**dict(out))
    return tuple(out)


def space_changes(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    """`KEY=YAML` strings of --search-space-set as (dotted key, YAML text) pairs; AutopeftError without a `=`."""
    from autopeft.errors import AutopeftError

    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise AutopeftError(f"--search-space-set '{pair}': give KEY=VALUE, a dotted key of the space file and a "
                                "YAML value (training.lr_scale='{low: 0.25, high: 4.0, log: true}')")
        out.append((key.strip(), text.strip()))
    return tuple(out)


def resolve_standard(args: argparse.Namespace) -> tuple[StandardConfig, Path]:
    """The grid to run and the results file; raises AutopeftError on bad input."""
    from autopeft.data import data_config, load_dataset
    from autopeft.errors import AutopeftError
    from benchmarks.suite import MINI_TASKS

    if not args.label:
        raise AutopeftError("--standard needs --label NAME (the row to write: 'before' for today's engine)")
    if not LABEL.match(args.label):
        raise AutopeftError(f"--label '{args.label}' must be letters, digits and _.+- (at most 64, no spaces)")
    if args.suite != "mini":
        raise AutopeftError("--standard runs on the mini suite only (the bundled backbone); drop --suite")
    if args.workers < 1:
        raise AutopeftError(f"--workers must be >= 1, got {args.workers}")
    c = replace(STANDARD, workers=args.workers, search_settings=search_settings(args.search_set),
                search_cap=not args.no_search_cap, search_space=args.search_space,
                search_space_set=space_changes(args.search_space_set))
    if args.select is not None or args.select_top is not None:
        from autopeft.search.settings import SearchSettings

        c = replace(c, select=args.select or c.select, select_top=c.select_top if args.select_top is None
                    else args.select_top)
        SearchSettings(select=c.select, select_top=c.select_top)  # one line for a bad value
    if args.search_space or c.search_space_set:
        import tempfile

        from benchmarks.standard import derived_space

        with tempfile.TemporaryDirectory() as tmp:  # one line now for a space that is not there or not valid
            derived_space(c, Path(tmp), c.search_space, c.search_space_set)
    if args.tasks:
        chosen = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        unknown = [t for t in chosen if t not in MINI_TASKS]
        if unknown or not chosen:
            raise AutopeftError(f"--tasks: {', '.join(unknown) or '(none)'} not in the mini suite; choose from "
                                f"{', '.join(MINI_TASKS)}")
        c = replace(c, tasks=chosen)
    if args.weights:
        if not Path(args.weights).expanduser().is_file():
            raise AutopeftError(f"--weights {args.weights} is not a file")
        c = replace(c, weights=str(Path(args.weights).expanduser().absolute()))
    if args.data_root:
        root = Path(args.data_root).expanduser()
        if not root.is_dir():
            raise AutopeftError(f"--data-root {root} is not a folder")
        c = replace(c, data_root=str(root.absolute()))
    out = Path(args.out).expanduser().absolute() if args.out else RESULTS / "standard.json"
    if out.is_dir():
        raise AutopeftError(f"--out {args.out} is a folder; give a .json file path")
    for task in c.tasks:  # in-memory tasks: cheap, and proves files and packages are there
        load_dataset(task, c.data_root, download=False, **data_config(c.backbone))
    return c, out


def main_standard(args: argparse.Namespace, argv: list[str]) -> int:
    from autopeft.errors import AutopeftError
    from autopeft.runs import versions
    from benchmarks.standard import run_grid
    from benchmarks.standard_stats import markdown

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        c, out = resolve_standard(args)
    except AutopeftError as exc:
        print(f"benchmarks.run: error: {exc}", file=sys.stderr)
        return 2
    meta = {"command": "python -m benchmarks.run " + " ".join(argv),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "load_before": os.getloadavg()},
            "versions": versions(("optuna", "ray", "mlxtend")), "cache": not args.no_cache}
    doc = run_grid(c, args.label, out, None if args.no_cache else CACHE_DIR, meta,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    doc["rows"][args.label]["meta"]["load_after"] = os.getloadavg()
    write_result(out, doc)
    text = markdown(doc)
    print(text)
    return 0
