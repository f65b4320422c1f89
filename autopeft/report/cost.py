"""The report's views of how the search spent its effort: learning curves, epochs spent, hyper-parameter importance."""

from __future__ import annotations

import warnings

import optuna
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from autopeft.records import TrialRecord
from autopeft.report._common import (
    FIG_HEIGHT,
    STATE_COLORS,
    STATE_LABELS,
    acc_range,
    esc,
    hover,
    placeholder,
    ran,
    state_of,
)
from autopeft.search.study_settings import StudySettings


def _rungs(settings: StudySettings, max_epochs: int) -> list[int]:
    """Epochs at which ASHA compares trials: grace · reduction_factor^k below the full length."""
    if not settings.search.early_stopping:
        return []
    grace, factor = settings.search.grace_epochs, settings.search.reduction_factor
    out, t = [], grace
    while 0 < t < max_epochs and factor >= 2:
        out.append(t)
        t *= factor
    return out


def curves_figure(settings: StudySettings, records: list[TrialRecord]) -> go.Figure:
    """Val accuracy per epoch for every trial; ASHA's stops are marked and its rungs drawn."""
    title = "Learning curves: val accuracy per epoch (× marks where ASHA stopped a trial)"
    drawn = [r for r in ran(records) if r.curve]
    if not drawn:
        return placeholder(title, "no trial has reported an epoch yet")
    total = settings.backbone_params
    max_epochs = max([settings.search.epochs] + [r.max_epochs for r in drawn] + [len(r.curve)
                                                                                          for r in drawn])
    fig = go.Figure()
    shown: set[str] = set()
    for r in drawn:
        state = state_of(r)
        fig.add_trace(go.Scatter(
            x=list(range(1, len(r.curve) + 1)), y=r.curve, mode="lines+markers", legendgroup=state,
            name=STATE_LABELS[state], showlegend=state not in shown,
            line={"color": STATE_COLORS[state], "width": 2 if state == "COMPLETE" else 1,
                  "dash": "dot" if state == "FAIL" else "solid"},
            marker={"size": 4}, opacity=1.0 if state == "COMPLETE" else 0.8,
            hovertext=[f"epoch {e + 1}: {v:.4f}<br>{hover(r, total)}" for e, v in enumerate(r.curve)],
            hoverinfo="text",
        ))
        shown.add(state)
    stops = [r for r in drawn if state_of(r) == "PRUNED"]
    if stops:
        fig.add_trace(go.Scatter(
            x=[len(r.curve) for r in stops], y=[r.curve[-1] for r in stops], mode="markers",
            name=f"stopped by ASHA ({len(stops)})",
            marker={"symbol": "x", "size": 11, "color": "#d62728", "line": {"width": 1}},
            hovertext=[f"stopped after epoch {len(r.curve)}<br>{hover(r, total)}" for r in stops], hoverinfo="text",
        ))
    for t in _rungs(settings, max_epochs):
        fig.add_vline(x=t, line={"color": "#999", "dash": "dot", "width": 1},
                      annotation={"text": f"rung {t}", "font": {"size": 10, "color": "#777"}})
    fig.update_layout(title=title, height=FIG_HEIGHT, template="plotly_white", hovermode="closest",
                      xaxis={"title": "epoch", "dtick": 1, "range": [0.7, max_epochs + 0.3]},
                      yaxis={"title": "val accuracy", "range": acc_range([v for r in drawn for v in r.curve])})
    return fig


def compute_figure(settings: StudySettings, records: list[TrialRecord]) -> go.Figure:
    """Epochs spent per trial and in total, against training every trial to full length."""
    title = "Compute: epochs spent per trial and in total"
    done = ran(records)
    if not done:
        return placeholder(title, "no trial has finished yet")
    full = max([settings.search.epochs] + [r.max_epochs for r in done])
    spent = sum(r.epochs for r in done)
    budget = full * len(done)
    seconds = sum(r.seconds for r in done)
    saved = 100.0 * (1 - spent / budget) if budget else 0.0
    fig = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], horizontal_spacing=0.1,
                        subplot_titles=("epochs per trial", f"in total ({saved:.0f} % saved)"))
    total = settings.backbone_params
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        group = [r for r in done if state_of(r) == state]
        if group:
            fig.add_trace(go.Bar(
                x=[str(r.number) for r in group], y=[r.epochs for r in group], name=STATE_LABELS[state],
                marker_color=STATE_COLORS[state], marker_line={"width": 0.5, "color": "#444"},
                hovertext=[f"{r.epochs} epochs · {r.seconds:.1f} s<br>{hover(r, total)}" for r in group],
                hoverinfo="text",
            ), row=1, col=1)
    fig.add_hline(y=full, line={"color": "#d62728", "dash": "dash"}, row=1, col=1,
                  annotation={"text": f"full length ({full})", "font": {"size": 10}})
    fig.add_trace(go.Bar(
        x=["spent", "every trial at full length"], y=[spent, budget], marker_color=["#1f77b4", "#d0d0d0"],
        text=[f"{spent} epochs · {seconds:.0f} s", f"{budget} epochs"], textposition="auto", showlegend=False,
        hoverinfo="x+y",
    ), row=1, col=2)
    fig.update_xaxes(title_text="trial", type="category", categoryorder="array",
                     categoryarray=[str(r.number) for r in done], row=1, col=1)
    fig.update_yaxes(title_text="epochs", row=1, col=1)
    fig.update_layout(title=title, height=FIG_HEIGHT, template="plotly_white", barmode="overlay",
                      legend={"orientation": "h", "y": -0.2})
    return fig


def importances(study: optuna.Study | None, metric: str = "val_acc") -> tuple[dict[str, float], str]:
    """fANOVA importance of each hyper-parameter for `metric` over the complete trials, or ({}, why not)."""
    if study is None:
        return {}, "the report was built without its Optuna study"
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"needs at least 2 complete trials; the study has {len(complete)}"
    names = list(study.metric_names or [])
    index = names.index(metric) if metric in names else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = optuna.importance.get_param_importances(
                study, target=lambda t: t.values[index],
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as exc:
        return {}, f"optuna could not compute it: {str(exc).splitlines()[0][:200]}"
    if not result:
        return {}, "no hyper-parameter is shared by all complete trials"
    return {name: float(v) for name, v in result.items()}, ""


def importance_figure(study: optuna.Study | None, metric: str = "val_acc") -> go.Figure:
    """Horizontal bars of hyper-parameter importance for val accuracy (optuna.importance, fANOVA)."""
    title = "Hyper-parameter importance for val accuracy (optuna fANOVA over the complete trials)"
    values, why = importances(study, metric)
    if not values:
        return placeholder(title, f"importance not available: {esc(why)}")
    names = list(values)[::-1]  # largest on top
    fig = go.Figure(go.Bar(
        x=[values[n] for n in names], y=[esc(n) for n in names], orientation="h", marker_color="#1f77b4",
        text=[f"{values[n]:.2f}" for n in names], textposition="auto", hoverinfo="x+y",
    ))
    fig.update_layout(title=title, template="plotly_white", height=max(260, 120 + 28 * len(names)),
                      xaxis={"title": "importance (sums to 1)"}, margin={"l": 20})
    fig.update_yaxes(automargin=True)
    return fig


def rank_correlation(records: list[TrialRecord]) -> tuple[float | None, int]:
    """Kendall's τ between the supernet scores and the stand-alone val accuracies of a one-shot study's finalists
    trained to full length, and how many there are (τ is None below two, or when either side is constant)."""
    from scipy.stats import kendalltau

    pairs = [(r.supernet_score, r.val_acc) for r in records
             if r.supernet_score is not None and r.val_acc is not None and r.full_fidelity]
    if len(pairs) < 2:
        return None, len(pairs)
    tau = float(kendalltau([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
    return (None if tau != tau else tau), len(pairs)


def supernet_figure(settings: StudySettings, records: list[TrialRecord]) -> go.Figure:
    """A one-shot study's finalists: their score as a slice of the supernet against their val accuracy trained
    alone, with the rank correlation (finalists stopped early are drawn at their low-fidelity accuracy)."""
    title = "Supernet score against the finalists' stand-alone val accuracy"
    if settings.search.strategy != "oneshot":
        return placeholder(title, "a trial search (--strategy trials): no supernet ranked its plans")
    scored = [r for r in ran(records) if r.supernet_score is not None and r.val_acc is not None]
    if not scored:
        return placeholder(title, "no finalist has finished yet")
    tau, n = rank_correlation(records)
    fig = go.Figure()
    total = settings.backbone_params
    for state in ("COMPLETE", "PRUNED"):
        group = [r for r in scored if state_of(r) == state]
        if group:
            fig.add_trace(go.Scatter(
                x=[r.supernet_score for r in group], y=[r.val_acc for r in group], mode="markers+text",
                name=STATE_LABELS[state], text=[str(r.number) for r in group], textposition="top center",
                marker={"size": 10, "color": STATE_COLORS[state], "line": {"width": 0.5, "color": "#444"}},
                hovertext=[f"supernet {r.supernet_score:.4f} · alone {r.val_acc:.4f}<br>{hover(r, total)}"
                           for r in group], hoverinfo="text"))
    low = min(min(r.supernet_score or 0.0 for r in scored), min(r.val_acc or 0.0 for r in scored))
    high = max(max(r.supernet_score or 0.0 for r in scored), max(r.val_acc or 0.0 for r in scored))
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="equal",
                             line={"color": "#999", "dash": "dot"}, hoverinfo="skip"))
    corr = f"Kendall τ {tau:+.2f} over {n} finalists trained to full length" if tau is not None else \
        f"Kendall τ: needs two finalists trained to full length with different values ({n} so far)"
    fig.update_layout(title=f"{title}<br><sup>{esc(corr)}</sup>", height=FIG_HEIGHT, template="plotly_white",
                      xaxis_title="val accuracy as a slice of the supernet (shared weights)",
                      yaxis_title="val accuracy trained alone", legend={"orientation": "h", "y": -0.2},
                      yaxis_range=acc_range([r.val_acc for r in scored]))
    return fig
