"""Pareto selection over trial records: non-dominated sorting, hypervolume, knee point, best under a budget.

Pure functions. The point-level functions take plain sequences of objective vectors and a direction per objective
("max"/"maximize" or "min"/"minimize"); the record-level ones read the objectives off TrialRecords by metric name
(autopeft.objectives: val_acc up, peft_params down, overhead down) and consider only *eligible* records: full
fidelity (COMPLETE and trained for every epoch; early-stopped trials report low-fidelity accuracies) with a val
accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autopeft.budget import Budget
from autopeft.errors import AutopeftError
from autopeft.objectives import BY_METRIC
from autopeft.records import TrialRecord

DEFAULT_OBJECTIVES = ("val_acc", "peft_params")

Point = Sequence[float]


def _signs(directions: Sequence[str]) -> list[float]:
    """+1 for objectives to minimise, -1 for those to maximise: multiplying turns every objective into a minimum."""
    out = []
    for d in directions:
        key = str(d).lower()
        if key in ("min", "minimize", "minimise"):
            out.append(1.0)
        elif key in ("max", "maximize", "maximise"):
            out.append(-1.0)
        else:
            raise AutopeftError(f"objective direction {d!r} is not valid; use 'max' or 'min'")
    return out


def _as_min(points: Sequence[Point], directions: Sequence[str]) -> list[tuple[float, ...]]:
    signs = _signs(directions)
    out = []
    for p in points:
        if len(p) != len(signs):
            raise AutopeftError(f"point {tuple(p)} has {len(p)} objectives but {len(signs)} directions were given")
        out.append(tuple(s * float(v) for s, v in zip(signs, p, strict=True)))
    return out


def _dominates_min(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def dominates(a: Point, b: Point, directions: Sequence[str]) -> bool:
    """True when `a` is at least as good as `b` in every objective and better in one."""
    ma, mb = _as_min([a, b], directions)
    return _dominates_min(ma, mb)


def non_dominated_sort(points: Sequence[Point], directions: Sequence[str]) -> list[list[int]]:
    """Fronts of point indices: front 0 is non-dominated, front k is non-dominated once fronts < k are removed.

    Equal points share a front. Indices within a front are ascending.
    """
    pts = _as_min(points, directions)
    n = len(pts)
    dominated_by = [0] * n
    dominating: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if _dominates_min(pts[i], pts[j]):
                dominating[i].append(j)
                dominated_by[j] += 1
            elif _dominates_min(pts[j], pts[i]):
                dominating[j].append(i)
                dominated_by[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in range(n) if dominated_by[i] == 0]
    while current:
        fronts.append(sorted(current))
        nxt = []
        for i in current:
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        current = nxt
    return fronts


def pareto_indices(points: Sequence[Point], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (ascending)."""
    fronts = non_dominated_sort(points, directions)
    return fronts[0] if fronts else []


def _hv_min(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Exact hypervolume dominated by `points` (minimisation) and bounded by `ref`."""
    pts = [p for p in points if all(x < r for x, r in zip(p, ref, strict=True))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in pts)
    if len(ref) == 2:
        # Sweep by the first objective: each point adds the strip below the best second objective seen so far.
        volume, best = 0.0, ref[1]
        for x, y in sorted(pts):
            if y < best:
                volume += (ref[0] - x) * (best - y)
                best = y
        return volume
    # More objectives: slice along the last one; each slab's cross-section is a lower-dimensional hypervolume.
    pts.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, p in enumerate(pts):
        upper = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if upper > p[-1]:
            volume += (upper - p[-1]) * _hv_min([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return volume


def hypervolume(points: Sequence[Point], reference: Point, directions: Sequence[str]) -> float:
    """Exact hypervolume of the region dominated by `points` and bounded by `reference`.

    Exact for any number of objectives (a sweep in 2-D, slicing above); points not strictly better than the
    reference in every objective add nothing.
    """
    if len(reference) != len(directions):
        raise AutopeftError(f"reference {tuple(reference)} has {len(reference)} objectives, not {len(directions)}")
    pts = _as_min(points, directions)
    (ref,) = _as_min([reference], directions)
    return _hv_min(pts, ref)


def knee_index(points: Sequence[Point], directions: Sequence[str]) -> int | None:
    """Index of the knee of the non-dominated points, or None for no points.

    Objectives are scaled to [0, 1] over the front (0 = best). With two objectives the knee is the front point
    farthest beyond the line through the two extreme points (towards the ideal point), the usual
    "maximum bulge" knee; when no point lies beyond that line, and for other numbers of objectives, it is the point
    nearest the ideal point. Ties go to the lower index. The choice does not change when an objective is rescaled.
    """
    front = pareto_indices(points, directions)
    if not front:
        return None
    pts = _as_min([points[i] for i in front], directions)
    lows = [min(p[k] for p in pts) for k in range(len(directions))]
    spans = [max(p[k] for p in pts) - lows[k] for k in range(len(directions))]
    norm = [tuple((p[k] - lows[k]) / spans[k] if spans[k] > 0 else 0.0 for k in range(len(p))) for p in pts]
    if len(directions) == 2 and len(norm) >= 3:
        a = min(range(len(norm)), key=lambda i: (norm[i][0], norm[i][1]))
        b = min(range(len(norm)), key=lambda i: (norm[i][1], norm[i][0]))
        (ax, ay), (bx, by) = norm[a], norm[b]
        length = math.hypot(bx - ax, by - ay)
        if length > 0:
            # Signed distance from the extremes' line, positive on the ideal point's side.
            bulge = [((bx - ax) * (ay - y) - (ax - x) * (by - ay)) / length for x, y in norm]
            best = max(range(len(norm)), key=lambda i: (bulge[i], -i))
            if bulge[best] > 1e-12:
                return front[best]
    dist = [math.fsum(v * v for v in p) for p in norm]
    return front[min(range(len(norm)), key=lambda i: (dist[i], i))]


# -- trial records -------------------------------------------------------------------------------------------------


def eligible(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Records that may be selected: full fidelity and with a val accuracy."""
    return [r for r in records if r.full_fidelity and r.val_acc is not None]


def objective_values(records: Sequence[TrialRecord], objectives: Sequence[str]) -> list[tuple[float, ...]]:
    for name in objectives:
        if name not in BY_METRIC:
            raise AutopeftError(f"unknown objective metric '{name}'; choose from {', '.join(BY_METRIC)}")
    return [tuple(float(getattr(r, name)) for name in objectives) for r in records]


def directions_of(objectives: Sequence[str]) -> list[str]:
    objective_values([], objectives)
    return [BY_METRIC[name].direction for name in objectives]


def pareto_front(records: Sequence[TrialRecord], objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> list[TrialRecord]:
    """The non-dominated eligible records, by ascending parameters then trial number."""
    pool = eligible(records)
    front = [pool[i] for i in pareto_indices(objective_values(pool, objectives), directions_of(objectives))]
    return sorted(front, key=lambda r: (r.peft_params, r.number))


def pareto_fronts(
    records: Sequence[TrialRecord], objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> list[list[TrialRecord]]:
    """All non-dominated fronts of the eligible records (front 0 first)."""
    pool = eligible(records)
    fronts = non_dominated_sort(objective_values(pool, objectives), directions_of(objectives))
    return [[pool[i] for i in front] for front in fronts]


def knee(records: Sequence[TrialRecord], objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> TrialRecord | None:
    """The knee of the eligible records' Pareto front (see `knee_index`), or None when none is eligible."""
    pool = sorted(eligible(records), key=lambda r: r.number)
    index = knee_index(objective_values(pool, objectives), directions_of(objectives))
    return None if index is None else pool[index]


def record_hypervolume(
    records: Sequence[TrialRecord], reference: Point, objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> float:
    """Hypervolume of the eligible records' objectives against `reference` (e.g. (0.0, budget) for acc/params)."""
    pool = eligible(records)
    return hypervolume(objective_values(pool, objectives), reference, directions_of(objectives))


def best_under_budget(records: Sequence[TrialRecord], budget: int | Budget) -> TrialRecord | None:
    """The eligible record within `budget` parameters that the study selects: the highest cross-validation accuracy
    among the cross-validated ones when any is (`--select cv:K` scores a study's top trials), else the highest val
    accuracy.

    Ties go to the higher val accuracy, fewer parameters, then the lower trial number. None when no eligible record
    fits.
    """
    limit = budget.limit if isinstance(budget, Budget) else int(budget)
    fitting = [r for r in eligible(records) if r.peft_params <= limit]
    scored = [r for r in fitting if r.cv_acc is not None]
    if scored:
        return min(scored, key=lambda r: (-(r.cv_acc or 0.0), *accuracy_order(r)))
    if not fitting:
        return None
    return min(fitting, key=accuracy_order)


def parts_of(record: TrialRecord) -> int:
    """How many parts the record's plan has (a method with its options on a set of blocks, or a global method: what
    `PeftPlan.short` joins with ' + '); the linear probe has none."""
    from autopeft.plan import PeftPlan

    return len(PeftPlan.from_dict(record.plan).groups())


def fewest_parts_within_se(records: Sequence[TrialRecord], budget: int | Budget, val_size: int
                           ) -> TrialRecord | None:
    """[P] part 6's rule: among the eligible records within `budget` whose val accuracy is within one standard
    error of the best's (binomial: sqrt(p (1 - p) / val_size) at the best's accuracy p), the one whose plan has the
    fewest parts; ties go by `accuracy_order`. The plain best-val pick when no other is that close."""
    if val_size < 1:
        raise ValueError(f"val_size must be >= 1, got {val_size}")
    limit = budget.limit if isinstance(budget, Budget) else int(budget)
    fitting = [r for r in eligible(records) if r.peft_params <= limit]
    if not fitting:
        return None
    p = float(min(fitting, key=accuracy_order).val_acc or 0.0)
    se = math.sqrt(max(p * (1.0 - p), 0.0) / val_size)
    close = [r for r in fitting if (r.val_acc or 0.0) >= p - se - 1e-12]
    return min(close, key=lambda r: (parts_of(r), *accuracy_order(r)))


def top_by_val(records: Sequence[TrialRecord], budget: int | Budget, k: int) -> list[TrialRecord]:
    """The `k` eligible records within `budget` with the highest val accuracy (`accuracy_order`): what
    cross-validation scores."""
    limit = budget.limit if isinstance(budget, Budget) else int(budget)
    return sorted((r for r in eligible(records) if r.peft_params <= limit), key=accuracy_order)[:k]


def accuracy_order(record: TrialRecord) -> tuple[float, int, int]:
    """Sort key of records ranked by accuracy: highest val accuracy, then fewer parameters, then lower number."""
    acc = record.val_acc if record.val_acc is not None else -math.inf
    return (-acc, record.peft_params, record.number)
