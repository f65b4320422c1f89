"""A study's results as pandas tables: every trial, or the Pareto configs under the budget."""

from __future__ import annotations

import pandas as pd

from autopeft.errors import AutopeftError
from autopeft.pareto import best_under_budget, pareto_front
from autopeft.records import ATTR_BASELINE, ATTR_REASON, TrialRecord
from autopeft.search.study_settings import StudySettings


def plan_short(record: TrialRecord) -> str:
    """The record's plan on one line; '-' for none, '?' for a plan this version cannot read (it still gets a row)."""
    if not record.plan:
        return "-"
    try:
        return record.peft_plan.short()
    except AutopeftError:
        return "?"


def pareto_records(settings: StudySettings, records: list[TrialRecord]) -> list[TrialRecord]:
    """Full-fidelity Pareto configs that fit the study's budget."""
    return [r for r in pareto_front(records, settings.front_metrics) if r.peft_params <= settings.budget_limit]


def frame(settings: StudySettings, records: list[TrialRecord], pareto: bool = False) -> pd.DataFrame:
    """One row per trial (or per Pareto config): number, status, val_acc, cv_acc (the mean fold accuracy of a
    cross-validated trial, else None), supernet_score (a one-shot finalist's val accuracy as a slice of the
    supernet, else None), params, %, epochs, seconds, tags, plan."""
    rows = pareto_records(settings, records) if pareto else records
    best = best_under_budget(records, settings.budget_limit)
    front = {r.number for r in pareto_records(settings, records)}
    data = [{
        "trial": r.number,
        "status": r.status if r.full_fidelity or r.status != "COMPLETE" else "PRUNED",
        "val_acc": r.val_acc,
        "cv_acc": r.cv_acc,
        "supernet_score": r.supernet_score,
        "peft_params": r.peft_params,
        "percent": settings.percent(r.peft_params),
        "overhead": r.overhead,
        "epochs": r.epochs,
        "seconds": round(r.seconds, 2),
        "pareto": r.number in front,
        "best": best is not None and r.number == best.number,
        "baseline": r.tags.get(ATTR_BASELINE, ""),
        "fail_reason": r.tags.get(ATTR_REASON, ""),
        "plan": plan_short(r),
    } for r in rows]
    columns = ["trial", "status", "val_acc", "cv_acc", "supernet_score", "peft_params", "percent", "overhead", "epochs",
               "seconds", "pareto", "best", "baseline", "fail_reason", "plan"]
    return pd.DataFrame(data, columns=columns)


def summary(records: list[TrialRecord]) -> dict[str, int]:
    out = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0}
    for r in records:
        out[r.status if (r.status != "COMPLETE" or r.full_fidelity) else "PRUNED"] += 1
    out["epochs"] = sum(r.epochs for r in records)
    return out
