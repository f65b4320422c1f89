"""benchmarks/rungs.py: the replay of early-stopping schedules on stored curves decides as Ray's ASHA does."""

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.rungs import Schedule, milestones, replay_asha, replay_cell, replay_top_k


@pytest.mark.parametrize("grace,rf", [(1, 2), (2, 2), (3, 3), (5, 2), (8, 2), (1, 4), (2, 4)])
def test_milestones_are_rays_rungs(grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket

    assert sorted(m for m, _ in _Bracket(grace, 15, rf, 0)._rungs) == milestones(grace, rf, 15)


@pytest.mark.parametrize("grace,rf", [(1, 2), (2, 2), (2, 3), (5, 2)])
def test_one_at_a_time_the_replay_stops_the_runs_rays_bracket_stops(grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    rng = np.random.default_rng(grace * 10 + rf)
    curves = rng.uniform(0, 1, (12, 15)).round(2).tolist()
    bracket = _Bracket(grace, 15, rf, 0)
    finished = []
    for run, cv in enumerate(curves):
        trial = SimpleNamespace(trial_id=str(run))
        for epoch, val in enumerate(cv, start=1):
            if epoch == 15:
                finished.append(run)
                break
            if bracket.on_result(trial, epoch, val) == TrialScheduler.STOP:
                break
    done, spent, started = replay_asha(curves, list(range(12)), grace, rf, cap=10_000, concurrency=1)
    assert done == finished and started == 12
    assert 0 < len(done) < 12  # the random curves made ASHA stop some runs and keep others


def test_the_cap_bounds_the_epochs_and_fifo_trains_whole_runs():
    curves = [[0.1 * (i + 1)] * 15 for i in range(10)]
    done, spent, started = replay_asha(curves, list(range(10)), None, 2, cap=60)
    assert spent <= 60 and done == [0, 1, 2, 3] and started == 4  # two at a time: 4 whole runs, none cut inside


def test_top_k_trains_k_runs_to_the_end_after_one_epoch_of_the_rest():
    curves = [[v] * 15 for v in (0.3, 0.9, 0.1, 0.8, 0.5)]
    best, spent, seen = replay_top_k(curves, [0, 1, 2, 3, 4], 2, cap=120)
    assert sorted(best) == [1, 3] and seen == 5 and spent == 5 + 2 * 14


def test_a_cell_reports_each_schedule_against_the_pools_best():
    cell = {"task": "t", "seed": 0, "epochs_per_run": 4, "horizon": 16,
            "arms": {"random": {"curves": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.9]]},
                     "handpicked": {"curves": [[0.2, 0.2, 0.2, 0.2], [0.1, 0.1]]}}}  # a short one is left out
    out = replay_cell(cell, [Schedule("fifo"), Schedule("g1", 1, 2)], orders=20, seed=0)
    assert out["pool"] == 3 and out["pool_best"] == 0.9
    assert out["fifo"]["shortfall"] == pytest.approx(0.0) and out["fifo"]["pick_is_best"] == 1.0
    assert out["g1"]["shortfall"] >= 0.0


def test_rows_pool_their_curves_cell_by_cell():
    from benchmarks.rungs import pooled_cells

    def cell(seed, value, horizon=16):
        return {"task": "t", "seed": seed, "epochs_per_run": 2, "horizon": horizon,
                "arms": {"random": {"curves": [[value, value]]}, "handpicked": {"curves": [[value, value]]}}}

    rows = {"a": {"cells": [cell(0, 0.1), cell(1, 0.2)]}, "b": {"cells": [cell(1, 0.3)]}}
    pooled = {c["seed"]: c for c in pooled_cells(rows, ["a", "b"])}
    assert [len(pooled[s]["arms"]["random"]["curves"]) for s in (0, 1)] == [1, 2]
    assert rows["a"]["cells"][1]["arms"]["random"]["curves"] == [[0.2, 0.2]]  # the rows are not changed
    with pytest.raises(SystemExit, match="cap of 8"):
        pooled_cells({"a": rows["a"], "c": {"cells": [cell(0, 0.5, horizon=8)]}}, ["a", "c"])
    with pytest.raises(SystemExit, match="no row 'x'"):
        pooled_cells(rows, ["x"])
