"""Helpers shared by the report's figures: escaping, trial states, plan entries, placeholders and colours."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator, Sequence
from typing import Any

import plotly.graph_objects as go

from autopeft.records import ATTR_BASELINE, ATTR_REASON, TrialRecord
from autopeft.search.results import plan_short

# The state a trial is drawn with. COMPLETE means trained to full length; a trial told COMPLETE with fewer epochs
# (ASHA stopped it) carries low-fidelity values and is drawn as stopped early, as `autopeft results` counts it.
STATE_LABELS = {"COMPLETE": "complete", "PRUNED": "stopped early (ASHA)", "FAIL": "failed", "RUNNING": "running"}
STATE_COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#b8b8b8", "FAIL": "#7a7a7a", "RUNNING": "#d0d0d0"}
FRONT_COLOR, BEST_COLOR, BUDGET_COLOR = "#d62728", "#ff9f1c", "#2ca02c"
FIG_HEIGHT = 460


def esc(text: Any) -> str:
    """Text from the study, escaped for plotly's pseudo-HTML labels and for the page.

    Quotes stay as they are: plotly decodes `&lt;`, `&gt;` and `&amp;` back to characters it draws as text, but
    would show `&quot;` literally.
    """
    return html.escape(str(text), quote=False)


def state_of(r: TrialRecord) -> str:
    """COMPLETE (full fidelity), PRUNED (stopped early), FAIL or RUNNING (also queued)."""
    if r.status == "COMPLETE" and not r.full_fidelity:
        return "PRUNED"
    return r.status


def ran(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Trials that have finished one way or another (queued and running ones have nothing to draw yet)."""
    return [r for r in records if r.status != "RUNNING"]


def plan_lines(record: TrialRecord, width: int = 70) -> str:
    """The record's plan in short form, escaped, broken into lines of about `width` characters at its ' + ' joints."""
    lines, line = [], ""
    for part in plan_short(record).split(" + "):
        if line and len(line) + 3 + len(part) > width:
            lines.append(line)
            line = part
        else:
            line = f"{line} + {part}" if line else part
    lines.append(line)
    return "<br>".join(esc(x) for x in lines)


def hover(r: TrialRecord, total_params: int) -> str:
    """Hover text of one trial: number, state, accuracy, parameters, plan, baseline name or failure reason."""
    acc = "-" if r.val_acc is None else f"{r.val_acc:.4f}"
    pct = 100.0 * r.peft_params / max(total_params, 1)
    out = (f"<b>trial {r.number}</b> · {STATE_LABELS[state_of(r)]} · {r.epochs}/{r.max_epochs} epochs<br>"
           f"val acc {acc} · {r.peft_params:,} params ({pct:.3g} %)<br>{plan_lines(r)}")
    if r.tags.get(ATTR_BASELINE):
        out += f"<br>baseline: {esc(r.tags[ATTR_BASELINE])}"
    if r.tags.get(ATTR_REASON):
        out += f"<br>failed: {esc(r.tags[ATTR_REASON][:300])}"
    return out


def entries(plan: dict) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """(block index or None for a global part, method entry) for every entry of a plan dict."""
    for key, items in sorted((plan.get("blocks") or {}).items(), key=lambda kv: _as_int(kv[0])):
        for e in items or []:
            if isinstance(e, dict):
                yield _as_int(key), e
    for e in plan.get("global") or []:
        if isinstance(e, dict):
            yield None, e


def _as_int(key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        return -1


def method_names(plan: dict) -> list[str]:
    """The distinct method names of a plan in order of appearance; a plan without entries trains the head only."""
    names = list(dict.fromkeys(str(e.get("method", "?")) for _, e in entries(plan)))
    return names or ["(head only)"]


def size_of(entry: dict[str, Any]) -> float | None:
    """The size of a method entry (LoRA/FacT rank, adapter dim, prompt length, k): its method's declared size option.

    The method says which option is its size (`MethodSpec.size_option`), so no method is named here.
    """
    from autopeft.methods import size_of as method_size_of

    size = method_size_of(entry)
    return None if size is None else float(size)


def category_of(method: str) -> str:
    """The method's category in the survey's taxonomy (partial / addition) from the registry; `other` if unknown."""
    from autopeft.errors import AutopeftError
    from autopeft.methods import get_method

    try:
        return get_method(method).category or "other"
    except AutopeftError:
        return "other"


def log_x(params: Sequence[int]) -> tuple[list[float], float]:
    """x positions for a log axis: parameter counts, with 0 (head only) drawn a third of the smallest count left."""
    positive = [p for p in params if p > 0]
    zero = min(positive) / 3.0 if positive else 1.0
    return [float(p) if p > 0 else zero for p in params], zero


def zero_note(fig: go.Figure, params: Sequence[int], zero: float) -> None:
    """Say where trials with 0 parameters (the head only) are drawn, when there are any."""
    if any(p == 0 for p in params):
        # annotations on a log axis take log10 of the position (traces and shapes take the value itself)
        fig.add_annotation(x=math.log10(zero), y=0, xref="x", yref="paper", yanchor="bottom", showarrow=False,
                           text="0 (head only)", font={"size": 10, "color": "#666"})


def placeholder(title: str, note: str) -> go.Figure:
    """A figure that says why a view is empty, so every report has the same figures."""
    fig = go.Figure()
    fig.add_annotation(text=note, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 15})
    fig.update_layout(title=title, height=260, xaxis={"visible": False}, yaxis={"visible": False},
                      template="plotly_white")
    return fig


def finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def acc_range(values: Sequence[float | None]) -> list[float]:
    """A y range around the accuracies with some room (plotly's own pads a single point to ±1)."""
    ys = finite(values) or [0.0, 1.0]
    low, high = min(ys), max(ys)
    pad = max(0.02, 0.08 * (high - low))
    return [max(0.0, low - pad) if low >= 0 else low - pad, high + pad]


def budget_trace(limit: int, y_range: Sequence[float], name: str) -> go.Scatter:
    """The budget as a vertical dashed line; a trace rather than a shape, so it has a legend entry on a log axis."""
    x = max(limit, 1)
    return go.Scatter(x=[x, x], y=list(y_range), mode="lines", name=name, hoverinfo="name",
                      line={"color": BUDGET_COLOR, "dash": "dash", "width": 2})
