"""The report's views of what the trials found: the Pareto front, accuracy per method family, the layer map."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from autopeft.pareto import DEFAULT_OBJECTIVES, accuracy_order, best_under_budget, eligible, pareto_front
from autopeft.records import ATTR_BASELINE, TrialRecord
from autopeft.report._common import (
    BEST_COLOR,
    FIG_HEIGHT,
    FRONT_COLOR,
    STATE_COLORS,
    STATE_LABELS,
    acc_range,
    budget_trace,
    category_of,
    entries,
    esc,
    hover,
    log_x,
    method_names,
    placeholder,
    ran,
    size_of,
    state_of,
    zero_note,
)
from autopeft.search.study_settings import StudySettings

X_TITLE = "trainable parameters, head excluded (log scale)"
# marker per category of the survey's taxonomy (a category is a registry attribute, not a method name)
CATEGORY_SYMBOLS = {"partial": "circle", "addition": "diamond"}


def _budget(settings: StudySettings) -> tuple[int, str]:
    return settings.budget_limit, f"budget {esc(settings.search.budget)} = {settings.budget_limit:,} params"


def pareto_figure(settings: StudySettings, records: list[TrialRecord]) -> go.Figure:
    """Val accuracy against trainable parameters for every trial, the front, the budget line, baselines by name.

    Trials stopped early are drawn at their last (low-fidelity) accuracy, failed ones at their last accuracy or 0;
    both in grey: only full-length trials can be on the front.
    """
    title = "Pareto front: val accuracy against trainable parameters"
    done = ran(records)
    if not done:
        return placeholder(title, "no trial has finished yet")
    total = settings.backbone_params
    limit, budget_text = _budget(settings)
    xs, zero = log_x([r.peft_params for r in done])
    x_of = {r.number: x for r, x in zip(done, xs, strict=True)}
    fig = go.Figure()
    for state in ("FAIL", "PRUNED", "COMPLETE"):
        group = [r for r in done if state_of(r) == state]
        if not group:
            continue
        fig.add_trace(go.Scatter(
            x=[x_of[r.number] for r in group], y=[r.val_acc if r.val_acc is not None else 0.0 for r in group],
            mode="markers", name=f"{STATE_LABELS[state]} ({len(group)})",
            marker={"color": STATE_COLORS[state], "size": 9 if state == "COMPLETE" else 8,
                    "symbol": "x" if state == "FAIL" else "circle", "line": {"width": 0.5, "color": "#444"}},
            hovertext=[hover(r, total) for r in group], hoverinfo="text",
        ))
    front = pareto_front(done, DEFAULT_OBJECTIVES)
    if front:
        fig.add_trace(go.Scatter(
            x=[x_of[r.number] for r in front], y=[r.val_acc for r in front], mode="lines+markers",
            name=f"Pareto front ({len(front)})", line={"color": FRONT_COLOR, "shape": "hv", "width": 2},
            marker={"color": FRONT_COLOR, "size": 11, "line": {"width": 1, "color": "white"}},
            hovertext=[hover(r, total) for r in front], hoverinfo="text",
        ))
    best = best_under_budget(done, limit)
    if best is not None:
        fig.add_trace(go.Scatter(
            x=[x_of[best.number]], y=[best.val_acc], mode="markers", name=f"best under budget (trial {best.number})",
            marker={"color": BEST_COLOR, "size": 18, "symbol": "star", "line": {"width": 1, "color": "#333"}},
            hovertext=[hover(best, total)], hoverinfo="text",
        ))
    named = [r for r in done if r.tags.get(ATTR_BASELINE)]
    if named:
        fig.add_trace(go.Scatter(
            x=[x_of[r.number] for r in named], y=[r.val_acc if r.val_acc is not None else 0.0 for r in named],
            mode="text", text=[esc(r.tags[ATTR_BASELINE]) for r in named], textposition="top center",
            textfont={"size": 11, "color": "#333"}, name="baselines", hoverinfo="skip",
        ))
    y_range = acc_range([r.val_acc if r.val_acc is not None else 0.0 for r in done])
    fig.add_trace(budget_trace(limit, y_range, budget_text))
    zero_note(fig, [r.peft_params for r in done], zero)
    fig.update_layout(title=title, height=FIG_HEIGHT + 60, template="plotly_white", hovermode="closest",
                      xaxis={"type": "log", "title": X_TITLE}, yaxis={"title": "val accuracy", "range": y_range},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def family_figure(settings: StudySettings, records: list[TrialRecord]) -> go.Figure:
    """Val accuracy against parameters of the full-length trials, one series per method.

    A plan that mixes methods appears in the series of each method it uses, so a legend entry shows every plan
    with that method; legend groups are the survey's categories (partial / addition) read from the registry.
    """
    title = "Accuracy against parameters per method family (full-length trials)"
    pool = eligible(records)
    if not pool:
        return placeholder(title, "no trial has been trained to full length yet")
    total = settings.backbone_params
    xs, zero = log_x([r.peft_params for r in pool])
    series: dict[str, list[tuple[TrialRecord, float]]] = {}
    for r, x in zip(pool, xs, strict=True):
        for name in method_names(r.plan):
            series.setdefault(name, []).append((r, x))
    fig = go.Figure()
    for name in sorted(series, key=lambda n: (category_of(n), n)):
        cat = category_of(name)
        points = series[name]
        fig.add_trace(go.Scatter(
            x=[x for _, x in points], y=[r.val_acc for r, _ in points], mode="markers",
            name=f"{esc(name)} ({len(points)})", legendgroup=cat, legendgrouptitle_text=esc(cat),
            marker={"size": 10, "symbol": CATEGORY_SYMBOLS.get(cat, "square"), "opacity": 0.8,
                    "line": {"width": 0.5, "color": "#333"}},
            hovertext=[hover(r, total) for r, _ in points], hoverinfo="text",
        ))
    zero_note(fig, [r.peft_params for r in pool], zero)
    limit, budget_text = _budget(settings)
    y_range = acc_range([r.val_acc for r in pool])
    fig.add_trace(budget_trace(limit, y_range, budget_text))
    fig.update_layout(title=title, height=FIG_HEIGHT, template="plotly_white", hovermode="closest",
                      xaxis={"type": "log", "title": X_TITLE}, yaxis={"title": "val accuracy", "range": y_range},
                      legend={"groupclick": "toggleitem"})
    return fig


def _num_blocks(settings: StudySettings, plans: list[dict]) -> int:
    """Blocks of the study's backbone (as the study stores it), or more if a plan names a later block."""
    seen = [i for p in plans for i, _ in entries(p) if i is not None]
    return max(settings.num_blocks, max(seen, default=-1) + 1)


def top_records(records: list[TrialRecord], k: int) -> list[TrialRecord]:
    """The k best full-length trials: highest val accuracy, then fewer parameters, then lower trial number."""
    return sorted(eligible(records), key=accuracy_order)[:k]


def layer_map_figure(settings: StudySettings, records: list[TrialRecord], k: int = 8) -> go.Figure:
    """Block index × method for the top-k plans, coloured by each entry's size (rank, dim or length).

    One row per (plan, method); columns are the backbone's blocks plus `global` for whole-model parts. Entries
    without a size option (BitFit, LN-tune, SSF) take the colour of 0.
    """
    title = f"Layer map of the top {k} plans: where each method goes, coloured by rank / dim / length"
    top = top_records(records, k)
    if not top:
        return placeholder(title, "no trial has been trained to full length yet")
    n_blocks = _num_blocks(settings, [r.plan for r in top])
    columns = ["global"] + [str(i) for i in range(n_blocks)]
    rows: list[str] = []
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for rank, r in enumerate(top, start=1):
        by_method: dict[str, dict[int | None, dict[str, Any]]] = {}
        for block, entry in entries(r.plan):
            by_method.setdefault(str(entry.get("method", "?")), {})[block] = entry
        if not by_method:
            by_method["(head only)"] = {}
        for name, placed in by_method.items():
            rows.append(f"#{rank} trial {r.number} ({r.val_acc:.3f}) · {esc(name)}")
            z_row: list[float | None] = []
            t_row: list[str] = []
            for col in [None, *range(n_blocks)]:
                placed_entry = placed.get(col)
                size = None if placed_entry is None else (size_of(placed_entry) or 0.0)
                z_row.append(size)
                options = "" if entry is None else ", ".join(f"{esc(k_)}={esc(v)}" for k_, v in entry.items()
                                                             if k_ != "method") or "no options"
                where = "global" if col is None else f"block {col}"
                t_row.append(f"trial {r.number} · {esc(name)} at {where}<br>{options}" if entry else "")
            z.append(z_row)
            text.append(t_row)
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=list(range(len(rows))), text=text, hoverinfo="text", colorscale="Viridis", xgap=2, ygap=2,
        colorbar={"title": {"text": "rank / dim / length"}}, hoverongaps=False,
    ))
    fig.update_layout(
        title=title, template="plotly_white", height=max(300, 130 + 26 * len(rows)),
        xaxis={"title": "block index", "type": "category", "side": "top"},
        yaxis={"tickmode": "array", "tickvals": list(range(len(rows))), "ticktext": rows, "autorange": "reversed"},
        margin={"l": 20, "t": 110},
    )
    return fig
