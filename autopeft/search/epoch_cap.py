"""`--max-epochs N`: the training epochs a study may spend, stopped and failed trials' epochs included.

Every trial that runs holds one epoch of the cap: the one it is training. Two parts keep the study at or under the
cap, each counting on its own from what it sees (Ray may copy either):

- the searcher proposes a new trial only while the epochs spent, plus one epoch for every trial still running and
  one for the new trial, fit under the cap (`room_for_another`); when no trial runs and none fits, it ends;
- the trial scheduler (`capped`, around ASHA or first-in first-out) lets a trial that reports an epoch go on only
  while the epochs spent, one epoch for every other live trial and one for its next epoch fit under the cap; else
  it stops the trial at that report (recorded as stopped, like ASHA's stops).

So no trial is ever cut inside an epoch by the cap: each epoch a trial starts is one the cap had room for, and the
study ends when its last trial reports. (Before, the cap ended the experiment at the report that reached it and the
trials still running were cut mid-epoch, their partial epoch trained and never counted.)

Spent epochs are the finished trials' trained epochs when the driver starts (so `--resume` continues the count)
plus the epochs each trial of this driver trained: each run of a trial (`attempt`, a token the trainable puts in
its reports) counts its last reported epoch less the checkpoint epoch it went on from, so a trial re-run after a
lost worker counts the epochs it trains again (all of them when no checkpoint was kept). The partial epoch a lost
worker was training when it was lost is not counted (no report of it exists).
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


def capped(scheduler: Any, cap: int, base: int) -> Any:
    """`scheduler` (a Ray Tune TrialScheduler: ASHA or first-in first-out) under the cap of `cap` epochs, counted
    from `base`: a trial whose report leaves no room for its next epoch beside one epoch of every other live trial
    stops there; every other decision is `scheduler`'s."""
    from ray.tune.schedulers import TrialScheduler

    class EpochCapped(TrialScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.cap, self.count = scheduler, cap, EpochCount(base)

        @property
        def metric(self) -> Any:
            return self.inner.metric

        @property
        def supports_buffered_results(self) -> bool:
            return bool(self.inner.supports_buffered_results)

        def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
            return bool(self.inner.set_search_properties(metric, mode, **spec))

        def on_trial_add(self, controller: Any, trial: Any) -> None:
            self.inner.on_trial_add(controller, trial)

        def on_trial_error(self, controller: Any, trial: Any) -> None:
            self.inner.on_trial_error(controller, trial)

        def on_trial_result(self, controller: Any, trial: Any, result: dict) -> str:
            self.count.see(trial.trial_id, result)
            others = sum(1 for t in controller.get_live_trials() if t.trial_id != trial.trial_id)
            if self.count.spent + others + 1 > self.cap:
                return TrialScheduler.STOP
            return str(self.inner.on_trial_result(controller, trial, result))

        def on_trial_complete(self, controller: Any, trial: Any, result: dict) -> None:
            self.count.see(trial.trial_id, result)
            self.inner.on_trial_complete(controller, trial, result)

        def on_trial_remove(self, controller: Any, trial: Any) -> None:
            self.inner.on_trial_remove(controller, trial)

        def choose_trial_to_run(self, controller: Any) -> Any:
            return self.inner.choose_trial_to_run(controller)

        def debug_string(self) -> str:
            return f"{self.inner.debug_string()} (epoch cap {self.count.spent}/{self.cap})"

        def save(self, checkpoint_path: str) -> None:
            self.inner.save(checkpoint_path)

        def restore(self, checkpoint_path: str) -> None:
            self.inner.restore(checkpoint_path)

    return EpochCapped()
