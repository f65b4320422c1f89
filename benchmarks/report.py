"""Aggregate comparison cells (mean ± std over seeds), check the two targets, and render Markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

ARMS = ("search", "random", "handpicked", "full", "linear")
TARGET_GAIN = 0.01  # search's test accuracy ≥ best hand-picked + 1 point at 0.5 %, averaged over the suite
TARGET_EPOCH_RATIO = 0.40  # search reaches random's final best val with ≤ 40 % of random's epochs


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def aggregate(cells: Sequence[dict[str, Any]], budgets: Sequence[str]) -> dict[str, Any]:
    """Per (task, budget, arm) means over seeds; per budget, suite means; the two targets."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["task"], c["budget"]), []).append(c)
    per_task = []
    for (task, budget), cs in groups.items():
        row: dict[str, Any] = {"task": task, "budget": budget, "seeds": [c["seed"] for c in cs],
                               "compute_epochs": cs[0]["compute_epochs"]}
        for arm in ARMS:
            if any(arm in c["arms"] for c in cs):
                row[arm] = {k: mean_std([c["arms"][arm][k] for c in cs if arm in c["arms"]])
                            for k in ("best_val", "test", "hypervolume", "epochs")}
        row["gain_vs_handpicked"] = mean_std([_diff(c, "search", "handpicked") for c in cs])
        row["gain_vs_random"] = mean_std([_diff(c, "search", "random") for c in cs])
        row["epoch_ratio"] = [c.get("search_epochs_to_random_best_ratio") for c in cs]
        per_task.append(row)
    suite = {}
    for budget in budgets:
        rows = [r for r in per_task if r["budget"] == budget]
        suite[budget] = {arm: mean_std([r[arm]["test"][0] for r in rows if arm in r]) for arm in ARMS}
        suite[budget]["gain_vs_handpicked"] = mean_std([r["gain_vs_handpicked"][0] for r in rows])
    ratios = [c.get("search_epochs_to_random_best_ratio") for c in cells]
    reached = [r for r in ratios if r is not None]
    first = budgets[0] if budgets else None
    gain = suite.get(first, {}).get("gain_vs_handpicked", (None, None, 0))[0] if first == "0.5%" else None
    targets = {
        "gain_at_0.5pct": gain,
        "gain_target": TARGET_GAIN,
        "gain_met": None if gain is None else gain >= TARGET_GAIN,
        "epoch_ratio_cells": len(ratios),
        "epoch_ratio_reached": len(reached),
        "epoch_ratio_mean_of_reached": statistics.fmean(reached) if reached else None,
        "epoch_ratio_target": TARGET_EPOCH_RATIO,
        "epoch_ratio_met": bool(ratios) and len(reached) == len(ratios)
        and statistics.fmean(reached) <= TARGET_EPOCH_RATIO,
    }
    return {"per_task": per_task, "suite": suite, "targets": targets}


def _diff(cell: dict, a: str, b: str) -> float | None:
    x, y = cell["arms"][a]["test"], cell["arms"][b]["test"]
    return None if x is None or y is None else x - y


def _fmt(ms: tuple | list | None, scale: float = 100.0, digits: int = 1) -> str:
    if not ms or ms[0] is None:
        return "–"
    m, s, n = ms
    return f"{scale * m:.{digits}f}" + (f" ± {scale * s:.{digits}f}" if n > 1 else "")


def markdown(result: dict[str, Any]) -> str:
    meta, summary = result["meta"], result["summary"]
    m, bb = meta["machine"], meta["backbone"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['started']} – {meta.get('finished', '?')} (UTC), wall {meta.get('wall_s', 0) / 60:.1f} min; "
        f"{m['machine']}, {m['cpus']} CPUs, GPU {m['gpu'] or 'none'}, load average before "
        f"{'/'.join(f'{v:.1f}' for v in m['load_before'])}, after "
        f"{'/'.join(f'{v:.1f}' for v in meta.get('load_after', []))}.  ",
        f"Backbone: {bb['name']} (weights sha256 {str(bb.get('weights_sha256'))[:16]}…"
        + (f", Fashion-MNIST test accuracy {bb['fashion_mnist_test_accuracy']}" if
           bb.get("fashion_mnist_test_accuracy") is not None else "") + "); versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "Accuracies in %, mean ± std over seeds (no ± with one seed). val = best under budget on the 200-image val "
        "split; test = that config retrained on train_full, tested once. HV = 2-D hypervolume (val acc, params) "
        "against (0, budget), ÷ budget, in %. ep = training epochs spent.",
        "",
        "| task | budget | R ep | search val / test / HV / ep | random val / test / HV / ep | "
        "hand-picked val / test / HV / ep | full FT val / test | linear val / test | search − hand-picked test |",
        "|---|---|---:|---|---|---|---|---|---:|",
    ]
    for r in summary["per_task"]:
        cells = []
        for arm in ("search", "random", "handpicked"):
            a = r[arm]
            cells.append(f"{_fmt(a['best_val'])} / {_fmt(a['test'])} / {_fmt(a['hypervolume'])} / "
                         f"{_fmt(a['epochs'], 1, 0)}")
        for arm in ("full", "linear"):
            cells.append(f"{_fmt(r[arm]['best_val'])} / {_fmt(r[arm]['test'])}" if arm in r else "–")
        lines.append(f"| {r['task']} | {r['budget']} | {r['compute_epochs']} | " + " | ".join(cells)
                     + f" | {_fmt(r['gain_vs_handpicked'])} |")
    lines += ["", "Suite means of test accuracy (%, mean over tasks of the seed means; ± = std across tasks):", "",
              "| budget | search | random | hand-picked | full FT | linear | search − hand-picked |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for budget, s in summary["suite"].items():
        lines.append(f"| {budget} | " + " | ".join(_fmt(s[a]) for a in ARMS)
                     + f" | {_fmt(s['gain_vs_handpicked'])} |")
    t = summary["targets"]
    gain = t["gain_at_0.5pct"]
    lines += ["", "Targets:", ""]
    lines.append("- search test ≥ best hand-picked + 1 point at 0.5 % (suite mean): "
                 + ("not measured" if gain is None else
                    f"{100 * gain:+.1f} points → **{'met' if t['gain_met'] else 'missed'}**"
                    + ("" if t["gain_met"] else f" (short by {100 * (TARGET_GAIN - gain):.1f} points)")))
    ratio = t["epoch_ratio_mean_of_reached"]
    lines.append(f"- search reaches random's final best val within ≤ 40 % of random's epochs: reached in "
                 f"{t['epoch_ratio_reached']} of {t['epoch_ratio_cells']} cells"
                 + ("" if ratio is None else f", at {100 * ratio:.0f} % of random's epochs on average where reached")
                 + f" → **{'met' if t['epoch_ratio_met'] else 'missed'}**")
    if result.get("speed"):
        lines += ["", "Search wall time against concurrency (same small search: "
                  f"{result['speed'][0]['trials']} trials × {result['speed'][0]['epochs']} epochs, no early stopping,"
                  " no baselines):", "", "| concurrency | trials | wall s | Σ trial s | speed-up |",
                  "|---:|---:|---:|---:|---:|"]
        base = result["speed"][0]["wall_s"]
        for row in result["speed"]:
            lines.append(f"| {row['concurrency']} | {row['trials']} | {row['wall_s']:.0f} | {row['sum_trial_s']:.0f} "
                         f"| {base / row['wall_s']:.2f}× |")
    return "\n".join(lines) + "\n"
