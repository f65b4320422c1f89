"""`--max-epochs N`: the training epochs a study may spend, stopped and failed trials' epochs included.

Two parts keep a study at or under the cap, each counting on its own from what it sees (Ray may copy either):

- the searcher proposes a new trial only while the epochs spent, plus one epoch for every trial still running and
  one for the new trial, fit under the cap (`room_for_another`); when no trial runs and none fits, it ends;
- a Ray Tune stopper (`epoch_stopper`) stops the trial whose report reaches the cap and then ends the experiment,
  so trials still running stop before they report another epoch. They are recorded with the epochs they
  reported (as stopped trials, like ASHA's).

Spent epochs are the finished trials' trained epochs when the driver starts (so `--resume` continues the count)
plus the epochs each trial of this driver trained: each run of a trial (`attempt`, a token the trainable puts in
its reports) counts its last reported epoch less the checkpoint epoch it went on from, so a trial re-run after a
lost worker counts the epochs it trains again (all of them when no checkpoint was kept).
With several drivers on one study, each counts the others'
trials once they finish: the cap holds for each driver's view, and the study overshoots at most by the epochs the
others' running trials report meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from autopeft.records import ATTR_EPOCHS, ATTR_TRAINED

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trained_epochs(trial: FrozenTrial) -> int:
    """The epochs a finished trial trained, re-runs included (its recorded length where a study predates the
    count)."""
    a = trial.user_attrs
    return int(a.get(ATTR_TRAINED, a.get(ATTR_EPOCHS, 0)) or 0)


def spent_epochs(trials: Iterable[FrozenTrial]) -> int:
    """The training epochs the study's finished trials spent."""
    return sum(trained_epochs(t) for t in trials if t.state in FINISHED_STATES)


class EpochCount:
    """Epochs spent: `base` (the finished trials' when the driver started) plus what each run of each trial of this
    driver trained (its last reported epoch less the epoch it resumed from)."""

    def __init__(self, base: int) -> None:
        self.base = int(base)
        self.latest: dict[tuple[str, str], int] = {}  # (trial id, attempt) -> epochs that run trained

    def see(self, trial_id: str, result: dict[str, Any] | None) -> None:
        r = result or {}
        key = (trial_id, str(r.get("attempt", "")))
        trained = int(r.get("epoch", 0) or 0) - int(r.get("resumed_from", 0) or 0)
        if trained > self.latest.get(key, 0):
            self.latest[key] = trained

    def trained(self, trial_id: str) -> int:
        """The epochs every run of `trial_id` trained."""
        return sum(n for (tid, _), n in self.latest.items() if tid == trial_id)

    @property
    def spent(self) -> int:
        return self.base + sum(self.latest.values())

    def room_for_another(self, cap: int, running: int) -> bool:
        """Whether a new trial may start: one epoch of it, and one more of every running trial, fit under `cap`."""
        return self.spent + running + 1 <= cap


def epoch_stopper(cap: int, base: int) -> Any:
    """A Ray Tune Stopper that ends the study once `cap` epochs are spent (counted from `base`)."""
    from ray.tune import Stopper

    class EpochCap(Stopper):
        def __init__(self) -> None:
            self.cap, self.count = cap, EpochCount(base)

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            self.count.see(trial_id, result)
            return self.count.spent >= self.cap

        def stop_all(self) -> bool:
            return self.count.spent >= self.cap

    return EpochCap()
