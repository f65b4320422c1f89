"""A small portfolio of configurations chosen greedily to cover the tasks they were measured on.

Input: per task, the score (higher is better, e.g. val accuracy in %) of each candidate configuration measured on
it; configurations are any hashable keys. `greedy` picks k of them one at a time, each time the one that most
raises the sum over tasks of the best normalised score the portfolio reaches on each task (a facility-location
objective: the portfolio is judged by its best member per task, not by its average). `leave_one_out` builds, for
each task, the portfolio from the other tasks only, as a search on an unseen task would receive it.

Normalisations (`how`):

- ``"regret"`` (the default): score − the task's best score, in the score's own units (points of accuracy); the sum
  of the portfolio's best regrets is the distance, in points, that the portfolio leaves on the table. It keeps the
  scale that a target such as "within 0.5 points of the best" is stated in, so a task where the portfolio misses by
  10 points weighs 10 times one where it misses by 1.
- ``"rank"``: the share of the task's configurations scoring strictly lower (1 at the task's best, 0 at its worst);
  insensitive to a task's spread, so a hard task with a wide spread cannot dominate, but a rank of 0.99 may still be
  several points short on a task with many near-equal configurations.
- ``"minmax"``: (score − worst) / (best − worst), the task's range mapped to [0, 1].

`benchmarks/replay.py` measures the three leave-one-task-out on a real tuning table (BENCHMARKS.md, "Replay on
PETL_Vision's VTAB-1k tuning table"). No torch import: this module is plain Python.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
Scores = Mapping[str, Mapping[K, float]]

NORMALISATIONS = ("regret", "rank", "minmax")


def normalised(scores: Mapping[str, Mapping[K, float]], how: str = "regret") -> dict[str, dict[K, float]]:
    """Per task, each configuration's normalised score (higher is better; the task's best is 0 for regret, 1 else)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")
    out: dict[str, dict[K, float]] = {}
    for task, by_config in scores.items():
        values = [float(v) for v in by_config.values() if not math.isnan(v)]
        if not values:
            continue
        best, worst = max(values), min(values)
        row: dict[K, float] = {}
        for config, v in by_config.items():
            if math.isnan(v):
                continue
            if how == "regret":
                row[config] = float(v) - best
            elif how == "rank":
                below = sum(1 for w in values if w < v)
                row[config] = below / (len(values) - 1) if len(values) > 1 else 1.0
            else:
                row[config] = (float(v) - worst) / (best - worst) if best > worst else 1.0
        out[task] = row
    return out


def greedy(scores: Mapping[str, Mapping[K, float]], k: int, how: str = "regret",
           candidates: Sequence[K] | None = None) -> list[K]:
    """k configurations chosen greedily: each step adds the candidate that most raises the sum over tasks of the
    portfolio's best normalised score (an empty portfolio stands at each task's worst). A candidate not measured on
    a task adds nothing there, and one measured on none of them is never chosen. Ties (e.g. once every task is
    covered) go to the larger sum of normalised scores (the task's worst where it was not measured), then to the
    earlier candidate (`candidates`' order, else first seen in `scores`); fewer than k come back only when fewer
    candidates were measured."""
    norm = normalised(scores, how)
    if candidates is None:
        seen: dict[K, None] = {}
        for by_config in scores.values():
            seen.update(dict.fromkeys(by_config))
        candidates = list(seen)
    level = {task: min(row.values()) for task, row in norm.items()}
    # a candidate measured on none of these tasks has nothing to stand on (and must not win a tie for it)
    order = {c: i for i, c in enumerate(dict.fromkeys(candidates)) if any(c in row for row in norm.values())}
    # where a candidate was not measured it counts as the task's worst, for the tie-break as for the gain
    total = {c: sum(row.get(c, level[task]) for task, row in norm.items()) for c in order}
    chosen: list[K] = []
    left = set(order)
    for _ in range(min(k, len(left))):
        def gain(c: K) -> float:
            return sum(max(0.0, row[c] - level[task]) for task, row in norm.items() if c in row)

        best = max(left, key=lambda c: (round(gain(c), 9), round(total[c], 9), -order[c]))
        chosen.append(best)
        left.remove(best)
        for task, row in norm.items():
            if best in row:
                level[task] = max(level[task], row[best])
    return chosen


def leave_one_out(scores: Mapping[str, Mapping[K, float]], k: int, how: str = "regret",
                  candidates: Sequence[K] | None = None) -> dict[str, list[K]]:
    """For each task, the greedy portfolio built from the other tasks' scores only (the held-out task's row is
    not passed on, so it can neither choose nor rank a candidate)."""
    return {task: greedy({t: row for t, row in scores.items() if t != task}, k, how, candidates)
            for task in scores}
