"""The statistics of the standard grid ([I]): paired bootstrap intervals, best-so-far curves, the epochs ratio.

Pure functions on plain lists, so they are tested on hand-made numbers (tests/test_benchmarks.py) without training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

# one record of an arm, in trial order: (epochs it trained, its val accuracy if it counts for selection, else None)
Trace = Sequence[tuple[int, float | None]]


def bootstrap_ci(values: Sequence[float], resamples: int = 10_000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile bootstrap interval of it (cells resampled with
    replacement). Cells are the unit because they are what is independent (a task × seed split); runs within a
    cell are not."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def best_so_far(trace: Trace, horizon: int) -> list[float | None]:
    """Best val accuracy seen after each cumulative epoch 0..horizon (index = epochs spent, trial order).

    A record's value counts once all its epochs are spent; records past `horizon` are not seen (equal compute).
    None until the first record that counts.
    """
    curve: list[float | None] = [None] * (horizon + 1)
    used, best, events = 0, None, []
    for epochs, val in trace:
        used += epochs
        if used > horizon:
            break
        if val is not None and (best is None or val > best):
            best = val
        events.append((used, best))
    current, k = None, 0
    for x in range(horizon + 1):
        while k < len(events) and events[k][0] <= x:
            current = events[k][1]
            k += 1
        curve[x] = current
    return curve


def mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Pointwise mean over cells; None where any cell has no value yet (a mean over a changing set of cells would
    jump when a cell joins)."""
    if not curves:
        return []
    n = min(len(c) for c in curves)
    out: list[float | None] = []
    for x in range(n):
        vals = [c[x] for c in curves]
        out.append(None if any(v is None for v in vals) else sum(vals) / len(vals))  # type: ignore[arg-type]
    return out


def epochs_to_reach(curve: Sequence[float | None], target: float | None) -> int | None:
    """First cumulative epoch at which `curve` reaches `target` (1e-9 tolerance); None if it never does."""
    if target is None:
        return None
    for x, v in enumerate(curve):
        if v is not None and v >= target - 1e-9:
            return x
    return None


def reach_ratio(search: Sequence[float | None], random: Sequence[float | None]) -> dict[str, Any]:
    """Epochs the search's averaged curve needs to reach random's final averaged best, as a fraction of random's
    epochs (the whole horizon: random trains every run to the end)."""
    target = random[-1] if random else None
    reach = epochs_to_reach(search, target)
    horizon = len(random) - 1
    return {"random_final_best_val": target, "search_epochs": reach, "random_epochs": horizon,
            "ratio": reach / horizon if reach is not None and horizon > 0 else None}


def epoch_rank_correlation(cells: Sequence[dict[str, Any]], arms: Sequence[str] = ("random", "handpicked")
                           ) -> list[float | None]:
    """[P] part 3's question, from the stored curves: per epoch k, Spearman's rho between the runs' val after epoch
    k and their final val, over the full-length runs of `arms` (trained without early stopping) within each cell,
    averaged over the cells that have at least 4 such runs with distinct finals. None where no cell qualifies."""
    from scipy.stats import spearmanr

    per_epoch: dict[int, list[float]] = {}
    for c in cells:
        curves = [cv for a in arms for cv in c["arms"].get(a, {}).get("curves") or []]
        if not curves:
            continue
        length = max(len(cv) for cv in curves)
        full = [cv for cv in curves if len(cv) == length]
        if len(full) < 4 or len({cv[-1] for cv in full}) < 2:
            continue
        finals = [cv[-1] for cv in full]
        for k in range(length):
            at_k = [cv[k] for cv in full]
            if len(set(at_k)) > 1:
                rho = spearmanr(at_k, finals).statistic
                if math.isfinite(rho):
                    per_epoch.setdefault(k, []).append(float(rho))
    if not per_epoch:
        return []
    return [sum(v) / len(v) if (v := per_epoch.get(k)) else None for k in range(max(per_epoch) + 1)]


FEW_PARTS = 3  # [P]'s target: the search's picks have at most this many parts in >= 75 % of cells


def summarise(cells: Sequence[dict[str, Any]], resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """The row of one label: paired differences (bootstrap over cells), per-task means, arm means, curves."""
    done = [c for c in cells if all(c["arms"][a].get("test") is not None for a in ("search", "random", "handpicked"))]
    out: dict[str, Any] = {"cells": len(done)}
    if not done:
        return out
    for other in ("search", "random"):
        diffs = [c["arms"][other]["test"] - c["arms"]["handpicked"]["test"] for c in done]
        mean, lo, hi = bootstrap_ci(diffs, resamples, seed)
        tasks: dict[str, list[float]] = {}
        for c, d in zip(done, diffs, strict=True):
            tasks.setdefault(c["task"], []).append(d)
        out[f"{other}_minus_handpicked"] = {"mean": mean, "ci95": [lo, hi], "per_cell": diffs,
                                            "per_task": {t: sum(v) / len(v) for t, v in tasks.items()}}
    out["test_mean"] = {a: sum(c["arms"][a]["test"] for c in done) / len(done) for a in ("search", "random",
                                                                                       "handpicked")}
    out["val_mean"] = {a: sum(c["arms"][a]["best_val"] for c in done) / len(done) for a in ("search", "random",
                                                                                          "handpicked")}
    out["epochs_mean"] = {a: sum(c["arms"][a].get("epochs", 0) for c in done) / len(done)
                          for a in ("search", "random", "handpicked")}
    arms = ("search", "random", "handpicked")
    if all(c["arms"][a].get("val_pick", {}).get("test") is not None for c in done for a in arms):
        # a `--select cv:K` row: every arm picked by CV (above) and by val; what picking by CV is worth per arm
        by_val = {a: [c["arms"][a]["val_pick"]["test"] for c in done] for a in arms}
        out["cv_minus_val"] = {a: _interval([c["arms"][a]["test"] for c in done], by_val[a], resamples, seed)
                               for a in arms}
        out["val_pick_search_minus_handpicked"] = _interval(by_val["search"], by_val["handpicked"], resamples, seed)
        out["cv_epochs_mean"] = {a: sum(c["arms"][a].get("cv_epochs", 0) for c in done) / len(done) for a in arms}
    # [P]'s targets: the share of each arm's epochs spent on runs at chance, how many parts the search's picks have
    out["chance_share"] = {a: sum(c["arms"][a].get("chance_epochs", 0) for c in done)
                           / max(1, sum(c["arms"][a].get("epochs", 0) for c in done)) for a in arms
                           } if all("chance_epochs" in c["arms"][a] for c in done for a in arms) else None
    parts = [(c["arms"]["search"].get("best") or {}).get("parts") for c in done]
    out["search_picks_few_parts"] = (sum(p <= FEW_PARTS for p in parts) / len(parts)
                                     if all(p is not None for p in parts) else None)
    if all((c["arms"][a].get("fewest_pick") or {}).get("test") is not None for c in done for a in arms):
        # [P] part 6: the fewest-parts pick within one standard error of the best val, against the val pick
        out["fewest_minus_pick"] = {a: _interval([c["arms"][a]["fewest_pick"]["test"] for c in done],
                                                 [c["arms"][a]["test"] for c in done], resamples, seed)
                                    for a in arms}
        out["fewest_parts_share"] = sum(c["arms"]["search"]["fewest_pick"]["parts"] <= FEW_PARTS for c in done
                                        ) / len(done)
    out["epoch_rank_rho"] = epoch_rank_correlation(done) or None
    horizon = min(c["horizon"] for c in done)
    curves = {a: mean_curve([best_so_far(c["arms"][a]["trace"], horizon) for c in done])
              for a in ("search", "random", "handpicked")}
    out["curves"] = curves
    out["reach"] = reach_ratio(curves["search"], curves["random"])
    return out


def _interval(a: Sequence[float], b: Sequence[float], resamples: int, seed: int) -> dict[str, Any]:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, lo, hi = bootstrap_ci(diffs, resamples, seed)
    return {"mean": mean, "ci95": [lo, hi], "per_cell": diffs}


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's three targets, each met or missed, with its figure."""
    d = summary.get("search_minus_handpicked")
    if not d:
        return {}
    worst_task = min(d["per_task"].values())
    ratio = summary["reach"]["ratio"]
    return {"gain": d["mean"], "gain_ci_low": d["ci95"][0], "gain_met": d["mean"] >= 0.01 - 1e-9 and d["ci95"][0] > 0,
            "worst_task": worst_task, "worst_task_met": worst_task >= -0.01 - 1e-9,
            "epoch_ratio": ratio, "epoch_ratio_met": ratio is not None and ratio <= 0.40}


def _pts(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f}"


def _ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{_pts(d['mean'])} [{_pts(d['ci95'][0])}, {_pts(d['ci95'][1])}]"


def markdown(doc: dict[str, Any]) -> str:
    """The ablation table: one row per label, differences in test points with their bootstrap 95 % intervals."""
    lines = ["Standard grid ([I]): differences in test accuracy points, mean over cells [bootstrap 95 % interval]; "
             "epochs ratio = epochs the search's averaged best-so-far val curve needs to reach random search's final "
             "averaged best val, ÷ random's epochs (target ≤ 0.40).", "",
             "| label | started | cells | search − hand-picked | per task | random − hand-picked | "
             "search epochs to random's best | search epochs used | wall min | "
             "test % search / random / hand-picked | epochs at chance % s / r / h | search picks ≤ 3 parts | "
             "hand-picked | targets |",
             "|---|---|---:|---|---|---|---:|---:|---:|---|---|---:|---|---|"]
    for label, row in doc.get("rows", {}).items():
        s = row.get("summary") or {}
        t = row.get("targets") or {}
        meta = row.get("meta", {})
        d = s.get("search_minus_handpicked")
        per_task = ", ".join(f"{k} {_pts(v)}" for k, v in (d or {}).get("per_task", {}).items()) or "–"
        reach = s.get("reach") or {}
        ratio = reach.get("ratio")
        ratio_s = f"{reach.get('search_epochs')} / {reach.get('random_epochs')} = {ratio:.2f}" if ratio is not None \
            else ("not reached" if reach else "–")
        tm = s.get("test_mean") or {}
        tests = " / ".join(f"{100 * tm[a]:.1f}" for a in ("search", "random", "handpicked")) if tm else "–"
        flags = ", ".join(f"{name} {'met' if t.get(key) else 'missed'}" for name, key in
                          (("gain", "gain_met"), ("worst task", "worst_task_met"), ("epochs", "epoch_ratio_met"))
                          ) if t else "–"
        cells = f"{s.get('cells', 0)}{'' if meta.get('complete') else ' (partial)'}"
        wall = f"{meta.get('wall_s', 0) / 60:.0f}"
        used = s.get("epochs_mean", {})
        used_s = f"{used['search']:.0f} of {s['reach']['random_epochs']}" if used and s.get("reach") else "–"
        share = s.get("chance_share")
        chance_s = " / ".join(f"{100 * share[a]:.0f}" for a in ("search", "random", "handpicked")) if share else "–"
        few = s.get("search_picks_few_parts")
        few_s = f"{100 * few:.0f} %" if few is not None else "–"
        yardstick = meta.get("config", {}).get("handpicked", "ladder")  # rows before [P] had the ladder's sizes
        lines.append(f"| {label} | {meta.get('started', '')[:16]} | {cells} | {_ci(d)} | {per_task} | "
                     f"{_ci(s.get('random_minus_handpicked'))} | {ratio_s} | {used_s} | {wall} | {tests} | "
                     f"{chance_s} | {few_s} | {yardstick} | {flags} |")
    cv_rows = [(label, row["summary"]) for label, row in doc.get("rows", {}).items()
               if (row.get("summary") or {}).get("cv_minus_val")]
    if cv_rows:
        lines += ["", "Picking by cross-validation (`--select cv:K`): each arm's test with its CV pick − with its val "
                  "pick, in points [bootstrap 95 %]; search − hand-picked when both pick by val; fold-run epochs per "
                  "arm and cell.", "",
                  "| label | search: cv − val | random: cv − val | hand-picked: cv − val | "
                  "search − hand-picked, val picks | fold-run epochs |", "|---|---|---|---|---|---:|"]
        for label, s in cv_rows:
            d = s["cv_minus_val"]
            lines.append(f"| {label} | {_ci(d['search'])} | {_ci(d['random'])} | {_ci(d['handpicked'])} | "
                         f"{_ci(s['val_pick_search_minus_handpicked'])} | {s['cv_epochs_mean']['search']:.0f} |")
    fewest_rows = [(label, row["summary"]) for label, row in doc.get("rows", {}).items()
                   if (row.get("summary") or {}).get("fewest_minus_pick")]
    if fewest_rows:
        lines += ["", "Fewer parts at no cost ([P] part 6): each arm's test with the fewest-parts plan within one "
                  "standard error of its best val − with its best-val pick, in points [bootstrap 95 %] (the rule "
                  "stays the default only if the search's difference is within 0.5 points); the share of cells "
                  "whose search pick by the rule has ≤ 3 parts.", "",
                  "| label | search | random | hand-picked | search picks ≤ 3 parts |", "|---|---|---|---|---:|"]
        for label, s in fewest_rows:
            d = s["fewest_minus_pick"]
            lines.append(f"| {label} | {_ci(d['search'])} | {_ci(d['random'])} | {_ci(d['handpicked'])} | "
                         f"{100 * s['fewest_parts_share']:.0f} % |")
    rho_rows = [(label, row["summary"]["epoch_rank_rho"]) for label, row in doc.get("rows", {}).items()
                if (row.get("summary") or {}).get("epoch_rank_rho")]
    if rho_rows:
        lines += ["", "Do early epochs rank runs as their end does ([P] part 3)? Spearman's ρ between each epoch's val "
                  "and the final val over the full-length runs of the random and hand-picked arms, within each cell, "
                  "averaged over cells.", "",
                  "| label | " + " | ".join(f"ep {k + 1}" for k in range(max(len(r) for _, r in rho_rows))) + " |",
                  "|---|" + "---:|" * max(len(r) for _, r in rho_rows)]
        for label, rho in rho_rows:
            lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in rho) + " |")
    return "\n".join(lines) + "\n"


def render(path: str | None = None) -> str:
    """Re-summarise every row of a results file with this code and rewrite its Markdown table next to it."""
    from pathlib import Path

    from benchmarks import RESULTS, write_result

    out = Path(path) if path else RESULTS / "standard.json"
    doc = json.loads(out.read_text())
    for row in doc["rows"].values():
        resamples = row.get("meta", {}).get("config", {}).get("resamples", 10_000)
        row["summary"] = summarise(row["cells"], resamples)
        row["targets"] = targets(row["summary"])
    write_result(out, doc)
    text = markdown(doc)
    out.with_suffix(".md").write_text(text)
    return text


def paired_rows(doc: dict[str, Any], a: str, b: str, arm_a: str = "search", arm_b: str | None = None,
                resamples: int = 10_000) -> dict[str, Any]:
    """Test of `arm_a` in row `a` minus test of `arm_b` (default: the same arm) in row `b`, paired by cell (task,
    seed) over the cells both rows finished: what one change did to one arm, or one row's arm against another row's
    yardstick (an arm whose runs do not depend on the change, such as hand-picked at fixed rates). A side may name
    several rows joined by commas (`rates,shipped-rerun`: the same engine run twice): its test is their mean per
    cell, over the cells all of them finished, so that one run's luck is not the baseline."""
    rows = doc["rows"]
    for label in (*a.split(","), *b.split(",")):
        if label not in rows:
            raise SystemExit(f"no row '{label}'; rows: {', '.join(rows)}")

    def one(label: str, arm: str) -> dict[tuple[str, int], float]:
        return {(c["task"], c["seed"]): c["arms"][arm]["test"] for c in rows[label]["cells"]
                if c["arms"].get(arm, {}).get("test") is not None}

    def tests(labels: str, arm: str) -> dict[tuple[str, int], float]:
        each = [one(label, arm) for label in labels.split(",")]
        common = set.intersection(*(set(t) for t in each))
        return {k: sum(t[k] for t in each) / len(each) for k in common}

    left, right = tests(a, arm_a), tests(b, arm_b or arm_a)
    cells = sorted(set(left) & set(right))
    if not cells:
        raise SystemExit(f"rows '{a}' and '{b}' finished no cell in common")
    diffs = [left[k] - right[k] for k in cells]
    mean, low, high = bootstrap_ci(diffs, resamples)
    return {"cells": len(cells), "mean": mean, "ci95": [low, high],
            "per_cell": {f"{task} {seed}": d for (task, seed), d in zip(cells, diffs, strict=True)}}


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.standard_stats",
                                description="the grid's table again, from its results file; or two rows paired")
    p.add_argument("results", nargs="?", default=None, help="results JSON (default benchmarks/results/standard.json)")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"),
                   help="test of an arm in row A minus row B, by cell (a side of rows L1,L2: their mean by cell)")
    p.add_argument("--arm", default="search", help="--paired: the arm of row A (search, random, handpicked)")
    p.add_argument("--against", default=None, help="--paired: the arm of row B (default: --arm)")
    args = p.parse_args(argv)
    if not args.paired:
        print(render(args.results))
        return
    from pathlib import Path

    from benchmarks import RESULTS

    doc = json.loads(Path(args.results or RESULTS / "standard.json").read_text())
    a, b = args.paired
    r = paired_rows(doc, a, b, args.arm, args.against)
    print(f"{args.arm} of {args.paired[0]} − {args.against or args.arm} of {args.paired[1]}, {r['cells']} cells: "
          f"{100 * r['mean']:+.1f} [{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] points of test")


if __name__ == "__main__":  # python -m benchmarks.standard_stats [results.json] [--paired A B --arm ARM]
    main()
