"""Pareto functions against brute-force references (hypothesis property tests) and TrialRecord round trips."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopeft import pareto
from autopeft.errors import AutopeftError
from autopeft.records import TrialRecord

SETTINGS = settings(max_examples=150, deadline=None)

coords = st.integers(0, 6).map(float) | st.floats(0, 10, allow_nan=False, width=32)


@st.composite
def problems(draw, dims=(2, 3), max_points=9):
    """(points, directions): small coordinates so ties and duplicates are common."""
    d = draw(st.sampled_from(dims))
    directions = draw(st.lists(st.sampled_from(["max", "min"]), min_size=d, max_size=d))
    points = draw(st.lists(st.tuples(*[coords] * d), max_size=max_points))
    return points, directions


def bf_dominates(a, b, directions) -> bool:
    better_or_equal = all((x >= y) if d == "max" else (x <= y) for x, y, d in zip(a, b, directions, strict=True))
    return better_or_equal and tuple(a) != tuple(b)


def bf_fronts(points, directions) -> list[list[int]]:
    remaining, fronts = list(range(len(points))), []
    while remaining:
        front = [i for i in remaining if not any(bf_dominates(points[j], points[i], directions) for j in remaining)]
        fronts.append(front)
        remaining = [i for i in remaining if i not in front]
    return fronts


def bf_hypervolume(points, reference, directions) -> float:
    """Sum the cells of the grid all coordinates span that some point dominates within the reference box."""
    axes = [sorted({p[k] for p in points} | {reference[k]}) for k in range(len(reference))]
    total = 0.0
    for cell in itertools.product(*[list(zip(a, a[1:], strict=False)) for a in axes]):
        inside = all((lo >= reference[k]) if d == "max" else (hi <= reference[k])
                     for k, ((lo, hi), d) in enumerate(zip(cell, directions, strict=True)))
        covered = any(all((p[k] >= hi) if d == "max" else (p[k] <= lo)
                          for k, ((lo, hi), d) in enumerate(zip(cell, directions, strict=True))) for p in points)
        if inside and covered:
            total += math.prod(hi - lo for lo, hi in cell)
    return total


@SETTINGS
@given(problems())
def test_non_dominated_sort_matches_brute_force(problem) -> None:
    points, directions = problem
    assert pareto.non_dominated_sort(points, directions) == bf_fronts(points, directions)
    assert pareto.pareto_indices(points, directions) == (bf_fronts(points, directions) or [[]])[0]


@SETTINGS
@given(problems(), st.data())
def test_hypervolume_matches_brute_force(problem, data) -> None:
    points, directions = problem
    reference = tuple(data.draw(coords) for _ in directions)
    expected = bf_hypervolume(points, reference, directions)
    assert pareto.hypervolume(points, reference, directions) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@SETTINGS
@given(problems(dims=(3,), max_points=12))
def test_hypervolume_3d_matches_optuna(problem) -> None:
    hv = pytest.importorskip("optuna._hypervolume")
    points, directions = problem
    reference = tuple(-1.0 if d == "max" else 11.0 for d in directions)
    signs = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    if not points:
        return
    expected = hv.compute_hypervolume(np.array(points) * signs, np.array(reference) * signs)
    assert pareto.hypervolume(points, reference, directions) == pytest.approx(expected, rel=1e-9)


def _norm_front(points, directions, front):
    signs = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    pts = np.array([points[i] for i in front], dtype=float) * signs
    span = pts.max(axis=0) - pts.min(axis=0)
    return np.where(span > 0, (pts - pts.min(axis=0)) / np.where(span > 0, span, 1), 0.0)


@SETTINGS
@given(problems())
def test_knee_is_on_the_front_and_maximises_the_bulge(problem) -> None:
    points, directions = problem
    knee = pareto.knee_index(points, directions)
    front = bf_fronts(points, directions)[0] if points else []
    if not front:
        assert knee is None
        return
    assert knee in front
    norm = _norm_front(points, directions, front)
    k = front.index(knee)
    if len(directions) == 2 and len(front) >= 3:
        a, b = norm[np.lexsort((norm[:, 1], norm[:, 0]))[0]], norm[np.lexsort((norm[:, 0], norm[:, 1]))[0]]
        line = b - a
        if np.hypot(*line) > 0:
            rel = a - norm
            bulge = (line[0] * rel[:, 1] - line[1] * rel[:, 0]) / np.hypot(*line)  # > 0 towards the ideal point
            if bulge.max() > 1e-12:
                assert bulge[k] == pytest.approx(bulge.max(), abs=1e-9)
                return
    dist = (norm**2).sum(axis=1)
    assert dist[k] == pytest.approx(dist.min(), abs=1e-12)


@SETTINGS
@given(problems(dims=(2,)), st.sampled_from([0.25, 2.0, 1024.0]))
def test_knee_ignores_the_scale_of_an_objective(problem, factor) -> None:
    points, directions = problem
    scaled = [(x * factor, y) for x, y in points]
    assert pareto.knee_index(points, directions) == pareto.knee_index(scaled, directions)


def test_knee_of_a_convex_front() -> None:
    points = [(0.0, 10.0), (1.0, 4.0), (2.0, 2.0), (4.0, 1.0), (10.0, 0.0)]
    assert pareto.knee_index(points, ["min", "min"]) == 2
    assert pareto.knee_index([(1.0, 1.0)], ["min", "min"]) == 0
    assert pareto.knee_index([], ["min", "min"]) is None


def test_hypervolume_known_values_and_errors() -> None:
    assert pareto.hypervolume([(1.0, 1.0)], (3.0, 3.0), ["min", "min"]) == 4.0
    assert pareto.hypervolume([(0.9, 100.0), (0.8, 50.0)], (0.0, 200.0), ["max", "min"]) == pytest.approx(
        0.9 * 100 + 0.8 * 50)
    assert pareto.hypervolume([(1, 1, 1)], (2, 2, 2), ["min"] * 3) == 1.0
    with pytest.raises(AutopeftError, match="direction"):
        pareto.hypervolume([(1, 1)], (2, 2), ["up", "min"])
    with pytest.raises(AutopeftError, match="objectives"):
        pareto.non_dominated_sort([(1, 1, 1)], ["min", "min"])


# -- records ---------------------------------------------------------------------------------------------------------


def rec(number, acc, params, status="COMPLETE", epochs=10, max_epochs=10, overhead=0.0) -> TrialRecord:
    return TrialRecord(number=number, plan={"version": 1, "blocks": {}, "global": []}, peft_params=params,
                       val_acc=acc, curve=[acc] if acc is not None else [], epochs=epochs, max_epochs=max_epochs,
                       status=status, overhead=overhead)


records = st.builds(
    lambda n, acc, params, status, short: rec(n, acc, params, status, epochs=5 if short else 10),
    st.integers(0, 40), st.sampled_from([None, 0.5, 0.6, 0.7, 0.8, 0.9]), st.integers(0, 8).map(lambda v: v * 1000),
    st.sampled_from(["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "RUNNING"]), st.booleans(),
)


def bf_eligible(rs):
    return [r for r in rs if r.status == "COMPLETE" and r.epochs >= r.max_epochs and r.val_acc is not None]


@SETTINGS
@given(st.lists(records, max_size=12), st.integers(0, 9000))
def test_best_under_budget_matches_brute_force(rs, budget) -> None:
    fitting = sorted((r for r in bf_eligible(rs) if r.peft_params <= budget),
                     key=lambda r: (-r.val_acc, r.peft_params, r.number))
    assert pareto.best_under_budget(rs, budget) is (fitting[0] if fitting else None)


@SETTINGS
@given(st.lists(records, max_size=12))
def test_front_uses_full_fidelity_records_only(rs) -> None:
    pool = bf_eligible(rs)
    points = [(r.val_acc, r.peft_params) for r in pool]
    expected = [pool[i] for i in bf_fronts(points, ["max", "min"])[0]] if pool else []
    front = pareto.pareto_front(rs)
    assert sorted(map(id, front)) == sorted(map(id, expected))
    assert [r.peft_params for r in front] == sorted(r.peft_params for r in front)
    assert all(r.full_fidelity for r in front)
    knee = pareto.knee(rs)
    assert (knee is None) == (not pool) and (knee is None or knee in front)
    assert sum(len(f) for f in pareto.pareto_fronts(rs)) == len(pool)


def test_low_fidelity_trials_never_win() -> None:
    # ASHA-stopped trials are COMPLETE with low-fidelity values: they must not be selected.
    rs = [rec(0, 0.70, 1000), rec(1, 0.99, 10, epochs=3), rec(2, 0.99, 10, status="PRUNED")]
    assert pareto.best_under_budget(rs, 10_000).number == 0
    assert [r.number for r in pareto.pareto_front(rs)] == [0]


def test_three_objectives_with_overhead() -> None:
    rs = [rec(0, 0.8, 1000, overhead=0.0), rec(1, 0.8, 500, overhead=0.2), rec(2, 0.7, 2000, overhead=0.1)]
    front = pareto.pareto_front(rs, ("val_acc", "peft_params", "overhead"))
    assert [r.number for r in front] == [1, 0]
    assert pareto.record_hypervolume(rs, (0.0, 4000.0, 1.0), ("val_acc", "peft_params", "overhead")) > 0
    with pytest.raises(AutopeftError, match="unknown objective"):
        pareto.pareto_front(rs, ("val_acc", "latency"))


def test_record_round_trip_and_validation() -> None:
    r = TrialRecord(number=3, plan={"version": 1, "blocks": {"0": [{"method": "lora"}]}, "global": []},
                    peft_params=123, val_acc=0.5, curve=[0.4, 0.5], epochs=2, max_epochs=2, tags={"baseline": "lora"},
                    params={"block0.tune": "lora", "lr": 0.001}, test_acc=0.45, seconds=1.5)
    assert TrialRecord.from_dict(r.to_dict()) == r
    assert r.full_fidelity
    assert not rec(0, 0.5, 1, epochs=1).full_fidelity
    assert rec(0, float("nan"), 1).val_acc is None
    with pytest.raises(AutopeftError, match="status"):
        rec(0, 0.5, 1, status="DONE")
    with pytest.raises(AutopeftError, match="unknown trial record key"):
        TrialRecord.from_dict({**r.to_dict(), "bogus": 1})
    with pytest.raises(AutopeftError, match="lacks"):
        TrialRecord.from_dict({"number": 1})


def test_best_under_budget_prefers_cross_validation_when_the_study_has_it():
    """`--select cv:K` scored some trials: the pick is the best mean fold accuracy among them, even when another
    trial has a higher val accuracy; ties go to val. Without CV scores, the best val as before."""
    from autopeft.pareto import top_by_val

    def rec(n, val, params, cv=()):
        return TrialRecord(number=n, plan={}, peft_params=params, val_acc=val, epochs=3, max_epochs=3,
                           cv_accs=list(cv))

    plain = [rec(0, 0.90, 10), rec(1, 0.95, 10), rec(2, 0.93, 5), rec(3, 0.99, 500)]
    best_under_budget = pareto.best_under_budget
    assert best_under_budget(plain, 100).number == 1
    assert [r.number for r in top_by_val(plain, 100, 2)] == [1, 2]
    scored = [rec(0, 0.90, 10), rec(1, 0.95, 10, [0.80, 0.82]), rec(2, 0.93, 5, [0.86, 0.84]), rec(3, 0.99, 500)]
    assert best_under_budget(scored, 100).number == 2
    assert best_under_budget(scored, 100).cv_acc == pytest.approx(0.85)
    tie = [rec(1, 0.95, 10, [0.8, 0.9]), rec(2, 0.93, 5, [0.9, 0.8])]
    assert best_under_budget(tie, 100).number == 1
    assert TrialRecord.from_dict(scored[1].to_dict()).cv_accs == [0.80, 0.82]


def test_fewest_parts_within_one_standard_error_of_the_best_val() -> None:
    """[P] part 6: on 200 val images at p = 0.8 one standard error is 2.83 points; a one-part plan 2 points under
    a three-part best is picked, one 3 points under is not; equal parts go by val; nothing close: the best."""
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan

    def plan(*methods: str) -> dict:
        return PeftPlan(blocks={i: (make_spec(m),) for i, m in enumerate(methods)}).to_dict()

    def rec(number: int, val: float, p: dict, params: int = 10) -> TrialRecord:
        return TrialRecord(number=number, plan=p, peft_params=params, val_acc=val, epochs=3, max_epochs=3)

    three, one = plan("lora", "bitfit", "ssf"), plan("lora")
    assert pareto.parts_of(rec(0, 0.5, three)) == 3 and pareto.parts_of(rec(0, 0.5, PeftPlan().to_dict())) == 0
    records = [rec(0, 0.80, three), rec(1, 0.78, one), rec(2, 0.775, one), rec(3, 0.76, PeftPlan().to_dict())]
    assert pareto.fewest_parts_within_se(records, 100, 200).number == 1
    assert pareto.fewest_parts_within_se(records, 100, 10_000).number == 0  # 0.4 points: only the best is close
    far = [rec(0, 0.80, three), rec(1, 0.77, one)]
    assert pareto.fewest_parts_within_se(far, 100, 200).number == 0
    over = [rec(0, 0.80, three), rec(1, 0.79, one, params=500)]  # the one-part plan is over the budget
    assert pareto.fewest_parts_within_se(over, 100, 200).number == 0
    assert pareto.fewest_parts_within_se([], 100, 200) is None
    with pytest.raises(ValueError):
        pareto.fewest_parts_within_se(records, 100, 0)
