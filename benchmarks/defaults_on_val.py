"""Which split chose each default: the figures the defaults were set by, read again on validation only.

    python -m benchmarks.defaults_on_val [--write]

Reads the stored results (no training): benchmarks/results/lr_sweep_digits.json for the learning-rate rule, and
benchmarks/results/standard.json for the grid rows that chose the search defaults. For the rule: per method and run
length, the default rate's last-epoch val accuracy against the best grid rate's, beside the same on test. For the
grid rows: the search arm's best val minus the hand-picked arm's, per cell, mean with a 95 % bootstrap interval over
cells (as standard_stats does for test), beside the row's test figure. The best val of an arm is the maximum over the
plans it trained, so it is optimistic, the more so the more plans an arm trains (the search arm trains more than the
hand-picked one): a val gain is an upper bound of what val alone could tell.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks import RESULTS, write_result

LR_GRID_MAX = 0.031  # the judged grid: 1e-3 … 3e-2 (0.1 is outside it, as in BENCHMARKS.md)


def interval(values: list[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % bootstrap interval of `values`."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def lr_rule(path: Path) -> list[dict]:
    runs: dict[tuple[str, int], dict] = defaultdict(dict)
    for r in json.loads(path.read_text())["rows"]:
        runs[(r["name"], r["epochs"])][r["lr"]] = (r["val"][-1], r["test_acc"], r["lr_used"])
    rows = []
    for (name, epochs), by_lr in runs.items():
        grid = {lr: v for lr, v in by_lr.items() if lr is not None and lr <= LR_GRID_MAX}
        by_val = max(grid, key=lambda lr: grid[lr][0])
        by_test = max(grid, key=lambda lr: grid[lr][1])
        default = by_lr[None]
        rows.append({"method": name, "epochs": epochs, "default_lr": default[2],
                     "default_val": default[0], "default_test": default[1],
                     "best_grid_lr_by_val": by_val, "best_grid_lr_by_test": by_test,
                     "default_minus_best_val": default[0] - grid[by_val][0],
                     "default_minus_best_test": default[1] - grid[by_test][1]})
    return rows


def grid_rows(path: Path) -> list[dict]:
    out = []
    for label, row in json.loads(path.read_text())["rows"].items():
        cells = row["cells"]
        val = [c["arms"]["search"]["best_val"] - c["arms"]["handpicked"]["best_val"] for c in cells]
        test = row["summary"]["search_minus_handpicked"]
        mean, low, high = interval(val)
        out.append({"row": label, "cells": len(cells), "val_gain": mean, "val_ci95": [low, high],
                    "test_gain": test["mean"], "test_ci95": test["ci95"]})
    return out


def table(lr: list[dict], grid: list[dict]) -> str:
    lines = [f"Command: `python -m benchmarks.defaults_on_val {' '.join(sys.argv[1:])}`", "",
             "| method | epochs | default lr | default − best of grid, val | on test | best grid lr by val | by test |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in lr:
        lines.append(f"| {r['method']} | {r['epochs']} | {r['default_lr']:.3g} | "
                     f"{100 * r['default_minus_best_val']:+.1f} | {100 * r['default_minus_best_test']:+.1f} | "
                     f"{r['best_grid_lr_by_val']:g} | {r['best_grid_lr_by_test']:g} |")
    lines += ["", "| grid row | cells | search − hand-picked, best val | on test |", "|---|---:|---:|---:|"]
    for r in grid:
        lo, hi = r["val_ci95"]
        tlo, thi = r["test_ci95"]
        lines.append(f"| {r['row']} | {r['cells']} | {100 * r['val_gain']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                     f"{100 * r['test_gain']:+.1f} [{100 * tlo:+.1f}, {100 * thi:+.1f}] |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="write benchmarks/results/defaults_on_val.json")
    args = p.parse_args()
    lr = lr_rule(RESULTS / "lr_sweep_digits.json")
    grid = grid_rows(RESULTS / "standard.json")
    print(table(lr, grid))
    if args.write:
        write_result("defaults_on_val.json", {"lr_rule": lr, "grid_rows": grid})


if __name__ == "__main__":
    main()
