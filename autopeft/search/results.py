"""A study's results as pandas tables: every trial, or the Pareto configs under the budget."""

from __future__ import annotations

from typing import Any

import pandas as pd

from autopeft.pareto import best_under_budget, pareto_front
from autopeft.plan import PeftPlan
from autopeft.records import TrialRecord
from autopeft.search.settings import OBJECTIVES


def plan_short(plan: dict) -> str:
    try:
        return PeftPlan.from_dict(plan).short() if plan else "-"
    except Exception:  # noqa: BLE001  a plan written by another version still gets a row
        return "?"


def objectives_of(settings: dict[str, Any]) -> list[str]:
    return [OBJECTIVES[o][0] for o in settings.get("objectives", ["acc", "params"])]


def pareto_records(settings: dict[str, Any], records: list[TrialRecord]) -> list[TrialRecord]:
    """Full-fidelity Pareto configs that fit the study's budget."""
    limit = int(settings.get("budget_limit", 2**62))
    return [r for r in pareto_front(records, objectives_of(settings)) if r.peft_params <= limit]


def frame(settings: dict[str, Any], records: list[TrialRecord], pareto: bool = False) -> pd.DataFrame:
    """One row per trial (or per Pareto config): number, status, val_acc, params, %, epochs, seconds, tags, plan."""
    rows = pareto_records(settings, records) if pareto else records
    total = max(int(settings.get("backbone_params", 0)), 1)
    limit = int(settings.get("budget_limit", 2**62))
    best = best_under_budget(records, limit)
    front = {r.number for r in pareto_records(settings, records)}
    data = [{
        "trial": r.number,
        "status": r.status if r.full_fidelity or r.status != "COMPLETE" else "PRUNED",
        "val_acc": r.val_acc,
        "peft_params": r.peft_params,
        "percent": 100.0 * r.peft_params / total,
        "overhead": r.overhead,
        "epochs": r.epochs,
        "seconds": round(r.seconds, 2),
        "pareto": r.number in front,
        "best": best is not None and r.number == best.number,
        "baseline": r.tags.get("baseline", ""),
        "fail_reason": r.tags.get("fail_reason", ""),
        "plan": plan_short(r.plan),
    } for r in rows]
    columns = ["trial", "status", "val_acc", "peft_params", "percent", "overhead", "epochs", "seconds", "pareto",
               "best", "baseline", "fail_reason", "plan"]
    return pd.DataFrame(data, columns=columns)


def summary(records: list[TrialRecord]) -> dict[str, int]:
    out = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0}
    for r in records:
        out[r.status if (r.status != "COMPLETE" or r.full_fidelity) else "PRUNED"] += 1
    out["epochs"] = sum(r.epochs for r in records)
    return out
