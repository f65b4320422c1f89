"""A trial that stops reporting: its worker restarted, as after a lost node.

Ray re-runs a trial whose worker or node died (FailureConfig, `--max-retries`), but a worker that hangs — a deadlocked
data loader, a stuck collective, a process stopped by the system — stays alive to Ray, and the search would wait for
it forever. The driver watches every running trial: one silent (no epoch reported) for longer than STALL_FACTOR × the
longest epoch any trial of this run has taken so far (its set-up included), and at least `--stall-floor` seconds, is
looked up in Ray (what Ray says of its worker goes in the line printed) and its worker is killed, so that Ray re-runs
the trial from its last checkpoint, like a lost node's, and counts a retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback
from rich.console import Console

STALL_FACTOR = 5.0  # silent for this many times the longest epoch seen: stalled


def worker_state(actor: Any) -> str:
    """What Ray's state API says of a trial's worker (ALIVE, DEAD, ...), or why it cannot say."""
    if actor is None:
        return "not started"
    try:
        from ray.util.state import get_actor

        info = get_actor(actor._actor_id.hex(), timeout=5)
    except Exception as exc:  # noqa: BLE001  the state API is optional (it needs Ray's dashboard)
        return f"unknown ({type(exc).__name__})"
    return "gone" if info is None else str(getattr(info, "state", "unknown"))


class StallWatch(Callback):
    """Restarts the worker of a trial silent for longer than its limit (see the module). `floor_s` 0: never."""

    def __init__(self, floor_s: float, console: Console | None = None, factor: float = STALL_FACTOR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.floor, self.factor, self.clock = float(floor_s), float(factor), clock
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.last: dict[str, float] = {}  # trial id -> when it last started or reported
        self.longest = 0.0  # the longest wait for a report of any trial so far

    def __getstate__(self) -> dict:  # Ray pickles callbacks with the tuner; a console holds locks
        return dict(self.__dict__, console=None, clock=None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, console=state.get("console") or Console(stderr=True, soft_wrap=True),
                             clock=state.get("clock") or time.monotonic)

    def limit(self) -> float:
        """Seconds a trial may go without a report."""
        return max(self.floor, self.factor * self.longest)

    def _fresh(self, trial: Any, **info: Any) -> None:
        self.last[trial.trial_id] = self.clock()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._fresh(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._fresh(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        now = self.clock()
        self.longest = max(self.longest, now - self.last.get(trial.trial_id, now))
        self.last[trial.trial_id] = now

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.last.pop(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.last.pop(trial.trial_id, None)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.floor <= 0:
            return
        now, limit = self.clock(), self.limit()
        for trial in trials:
            if trial.status != "RUNNING":
                continue
            silent = now - self.last.setdefault(trial.trial_id, now)
            if silent <= limit:
                continue
            actor = trial.temporary_state.ray_actor
            number = ((trial.config or {}).get("autopeft") or {}).get("number", "?")
            self.console.print(
                f"trial {number}: no report for {silent:.0f} s (limit {limit:.0f} s: {self.factor:g}× the longest "
                f"epoch so far, at least {self.floor:g} s, --stall-floor); Ray says its worker is "
                f"{worker_state(actor)}: restarting it, as after a lost node", highlight=False)
            self.last[trial.trial_id] = now  # its re-run gets a limit of its own
            if actor is not None:
                import ray

                ray.kill(actor, no_restart=True)  # the trial's task fails: Ray re-runs the trial (FailureConfig)
