"""The greedy portfolio builder (autopeft/search/portfolio.py): a known answer, and leave-one-task-out."""

from __future__ import annotations

import random

import pytest

from autopeft.search.portfolio import greedy, leave_one_out, normalised

# w is nobody's best but within 1 point everywhere; z is C's best; y is B's best
TABLE = {
    "A": {"x": 90.0, "y": 80.0, "z": 70.0, "w": 89.0},
    "B": {"x": 50.0, "y": 70.0, "z": 60.0, "w": 69.0},
    "C": {"x": 40.0, "y": 45.0, "z": 80.0, "w": 79.0},
}


def test_greedy_known_answer() -> None:
    # step 1, regret gains from each task's worst: w 19+19+39=77, z 0+10+40=50, y 10+20+5=35, x 20
    # step 2: x, y, z each close A's, B's or C's last point (gain 1); tie to the best total regret: z (-30)
    # step 3: x and y gain 1 each; y's total (-45) beats x's (-60)
    assert greedy(TABLE, 1) == ["w"]
    assert greedy(TABLE, 3) == ["w", "z", "y"]
    assert greedy(TABLE, 10) == ["w", "z", "y", "x"]  # never more than the candidates
    assert greedy(TABLE, 0) == []


def test_the_portfolio_is_judged_by_its_best_member_per_task() -> None:
    # u is best on average but a second member adds nothing to it; v + t cover both tasks exactly
    table = {"A": {"u": 95.0, "v": 100.0, "t": 0.0}, "B": {"u": 95.0, "v": 0.0, "t": 100.0}}
    assert greedy(table, 1) == ["u"]
    assert sorted(greedy(table, 2)[1:]) in (["t"], ["v"])  # after u, t or v closes one task's 5 points
    # from v the best second member is t (gain 100 on B), not u (gain 95)
    assert greedy(table, 2, candidates=["v", "t"]) == ["v", "t"]


def test_normalisations() -> None:
    regret = normalised(TABLE, "regret")
    assert regret["A"] == {"x": 0.0, "y": -10.0, "z": -20.0, "w": -1.0}
    rank = normalised(TABLE, "rank")
    assert rank["C"] == {"x": 0.0, "y": 1 / 3, "z": 1.0, "w": 2 / 3}
    minmax = normalised(TABLE, "minmax")
    assert minmax["B"] == {"x": 0.0, "y": 1.0, "z": 0.5, "w": 0.95}
    # a wide spread weighs on regret, not on rank: one task's 50-point loss against two tasks' 1-point losses
    table = {"A": {"p": 100.0, "q": 50.0, "r": 40.0}, "B": {"p": 79.0, "q": 80.0, "r": 0.0},
             "C": {"p": 79.0, "q": 80.0, "r": 0.0}}
    assert greedy(table, 1, "regret") == ["p"]
    assert greedy(table, 1, "rank") == ["q"]
    with pytest.raises(ValueError, match="normalisation"):
        normalised(TABLE, "zscore")


def test_a_config_missing_on_a_task_adds_nothing_there() -> None:
    table = {"A": {"x": 90.0, "y": 80.0}, "B": {"y": 70.0, "z": 10.0}}
    assert greedy(table, 2) == ["y", "x"]
    # once both tasks are covered, a candidate measured nowhere (its regret sum would read 0, the best) never wins
    assert greedy(table, 5, candidates=["ghost", "x", "y", "z"]) == ["y", "x", "z"]
    held = leave_one_out({**table, "C": {"ghost": 99.0}}, 5, candidates=["ghost", "x", "y", "z"])
    assert held["C"] == ["y", "x", "z"]  # C alone measured ghost: held out, ghost is measured nowhere
    assert "ghost" in held["A"]  # with C among the tasks it covers C


def test_leave_one_out_never_uses_the_held_out_task() -> None:
    rng = random.Random(0)
    configs = [f"c{i}" for i in range(12)]
    table = {f"t{j}": {c: rng.uniform(0, 100) for c in configs} for j in range(5)}
    loo = leave_one_out(table, 3)
    for held in table:
        others = {t: row for t, row in table.items() if t != held}
        assert loo[held] == greedy(others, 3)
        # rewrite the held-out task's scores so that they alone decide the portfolio: a builder that read them
        # would change its answer, so the answer must stay
        for favourite in configs[:4]:
            poisoned = dict(table)
            poisoned[held] = {c: (1e6 if c == favourite else -1e6) for c in configs}
            assert greedy(poisoned, 3)[0] == favourite  # the poison would show if read
            assert leave_one_out(poisoned, 3)[held] == loo[held]
