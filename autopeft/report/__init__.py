"""`autopeft report`: a study as one self-contained HTML page of plotly figures and pandas tables.

    path = write_report("digits", "sqlite:///studies/digits.db")        # dashboards/digits.html

The page names the study, dataset, backbone, budget and date, and holds seven figures, always in this order (a view
with nothing to show yet is a figure that says why, so the page keeps its shape): the Pareto front, the layer map of
the top plans, the learning curves, accuracy per method family, hyper-parameter importance, compute and, for a
one-shot study, the finalists' supernet scores against their stand-alone accuracy (with Kendall's τ); then the
table of Pareto configs (and of failed trials, when there are any).

Method family: the report draws one accuracy-against-parameters series per method name, grouped in the legend by
the method's category in the survey's taxonomy (partial / addition, from the method registry). Categories alone
would leave two series that hide which method worked; a plan that mixes methods (the unified space's usual case)
appears in the series of every method it uses, so clicking a legend entry shows all plans with that method.

Everything is computed from the TrialRecords and the study's settings (`build_report`), which the storage module
reads without Ray; only the importance view needs the Optuna study itself.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go

from autopeft.pareto import best_under_budget, record_hypervolume
from autopeft.records import ATTR_REASON, TrialRecord
from autopeft.report.cost import compute_figure, curves_figure, importance_figure, supernet_figure
from autopeft.report.figures import family_figure, layer_map_figure, pareto_figure
from autopeft.report.page import page, table_html
from autopeft.search.results import frame, plan_short, summary
from autopeft.search.study_settings import StudySettings

__all__ = ["FIGURES", "build_report", "report_figures", "write_report"]

# (anchor, heading) of each figure, in page order
FIGURES = [
    ("pareto", "Pareto front"),
    ("layers", "Layer map of the top plans"),
    ("curves", "Learning curves"),
    ("families", "Accuracy per method family"),
    ("importance", "Hyper-parameter importance"),
    ("compute", "Compute"),
    ("supernet", "Supernet ranking (one-shot studies)"),
]


def report_figures(settings: StudySettings, records: list[TrialRecord], study: optuna.Study | None = None,
                   top_k: int = 8) -> dict[str, go.Figure]:
    """The report's figures by anchor (see FIGURES)."""
    return {
        "pareto": pareto_figure(settings, records),
        "layers": layer_map_figure(settings, records, top_k),
        "curves": curves_figure(settings, records),
        "families": family_figure(settings, records),
        "importance": importance_figure(study),
        "compute": compute_figure(settings, records),
        "supernet": supernet_figure(settings, records),
    }


def _summary_table(name: str, settings: StudySettings, records: list[TrialRecord], date: str) -> pd.DataFrame:
    counts = summary(records)
    limit, search = settings.budget_limit, settings.search
    best = best_under_budget(records, limit)
    facts = [
        ("study", name),
        ("dataset", search.dataset),
        ("backbone", f"{search.backbone} ({settings.backbone_params:,} params without head)"),
        ("budget", f"{search.budget} = {limit:,} trainable params"),
        ("search", f"space {search.space} · sampler {search.sampler} · objectives {', '.join(search.objectives)} · "
                   f"{search.epochs} epochs per trial"),
        ("trials", f"{len(records)}: {counts['COMPLETE']} complete · {counts['PRUNED']} stopped early · "
                   f"{counts['FAIL']} failed · {counts['RUNNING']} queued or running"),
        ("epochs spent", f"{counts['epochs']} ({sum(r.seconds for r in records):.0f} s of training)"),
        ("best under budget", "none yet" if best is None else
         f"trial {best.number}: val acc {best.val_acc:.4f} with {best.peft_params:,} params — {plan_short(best)}"),
    ]
    hv = record_hypervolume(records, (0.0, float(limit)))
    facts.append(("hypervolume", f"{hv:,.1f} (val acc × params saved below the budget, full-length trials)"))
    facts.append(("generated", date))
    return pd.DataFrame(facts, columns=["", "value"])


def _pareto_table(settings: StudySettings, records: list[TrialRecord]) -> pd.DataFrame:
    table = frame(settings, records, pareto=True)
    if table.empty:
        return table
    out = pd.DataFrame({
        "trial": table["trial"],
        "val acc": table["val_acc"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}"),
        "params": table["peft_params"].map(lambda v: f"{int(v):,}"),
        "% of backbone": table["percent"].map(lambda v: f"{v:.3f}"),
        "overhead": table["overhead"].map(lambda v: f"{v:.3f}"),
        "epochs": table["epochs"],
        "best": table["best"].map(lambda b: "★" if b else ""),
        "baseline": table["baseline"],
        "plan": table["plan"],
    })
    return out


def _failed_table(records: list[TrialRecord]) -> pd.DataFrame:
    rows = [{"trial": r.number, "epochs": r.epochs, "reason": r.tags.get(ATTR_REASON, ""), "plan": plan_short(r)}
            for r in records if r.status == "FAIL"]
    return pd.DataFrame(rows, columns=["trial", "epochs", "reason", "plan"])


def build_report(settings: StudySettings, records: list[TrialRecord], study: optuna.Study | None = None,
                 name: str | None = None, top_k: int = 8, now: datetime | None = None) -> str:
    """The report of one study as an HTML document (a string).

    Args:
        settings: the study's settings (`storage.read_settings`).
        records: its TrialRecords.
        study: the Optuna study, for hyper-parameter importance (a placeholder says so when it is None).
        name: the study's name (default: the settings' study name).
        top_k: plans shown in the layer map.
        now: the date written on the page (default: now, UTC).
    """
    name = name or settings.study
    date = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    figures = report_figures(settings, records, study, top_k)
    sections: list[tuple[str, str, go.Figure | str]] = [(key, heading, figures[key]) for key, heading in FIGURES]
    sections.append(("configs", "Pareto configs within the budget",
                     table_html(_pareto_table(settings, records), "no trial trained to full length fits the budget "
                                                                   "yet")))
    failed = _failed_table(records)
    if not failed.empty:
        sections.append(("failed", "Failed trials", table_html(failed, "")))
    search = settings.search
    title = f"autopeft report · {name} · {search.dataset} · {search.backbone} · budget {search.budget} · {date}"
    subtitle = (f"study {name}: {search.dataset} on {search.backbone}, budget {search.budget}, {len(records)} trials "
                f"— generated {date}")
    footer = ("Hover a point for its plan; click legend entries to hide series. Only trials trained to full length "
              "enter the front; trials stopped early are drawn at their low-fidelity accuracy. "
              "Generated by autopeft report.")
    return page(title, subtitle, _summary_table(name, settings, records, date), sections, footer)


def default_output(study: str) -> Path:
    """dashboards/<study>.html (characters that do not belong in a file name become '_')."""
    return Path("dashboards") / (re.sub(r"[^A-Za-z0-9_.-]", "_", study) + ".html")


def write_report(study: str, storage: str, out: str | Path | None = None, top_k: int = 8,
                 now: datetime | None = None) -> tuple[Path, int]:
    """Build the report of a stored study and write it; returns (path, number of trials)."""
    from autopeft.search import storage as st

    loaded = st.load_study(study, storage)
    records = st.records_of(loaded)
    html = build_report(st.read_settings(loaded), records, loaded, name=study, top_k=top_k, now=now)
    path = Path(out) if out is not None else default_output(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path, len(records)
