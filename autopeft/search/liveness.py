"""Which search driver owns a RUNNING trial, and whether that driver still lives.

A driver stamps every trial it asks with its identity (machine, process id, process start time) and beats a
heartbeat for its running trials in the study's storage (Optuna's heartbeat table, stamped with the database's
clock). A RUNNING trial is *interrupted* when its driver is gone: the driver ran on this machine and its process no
longer exists (kill -9, a crash), or it ran on another machine and its heartbeat is older than GRACE_S (a lost
node). Only interrupted trials are marked FAIL and re-run, so a second driver that resumes a study while the first
still runs leaves the first one's trials alone, and either finishes the other's trials if it dies.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

ATTR_DRIVER = "driver"
HEARTBEAT_S = 15.0
# longer than SQLite's busy timeout: a driver that waits for a lock misses beats without being dead
GRACE_S = 150.0
# how long a resuming driver waits before it takes an unstamped trial for a dead driver's (a live one stamps its
# trials an instant after asking them, seconds on a loaded machine)
SETTLE_S = 5.0


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """This machine: host name and kernel boot id (a rebooted machine has no process of before)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (None: no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def this_driver() -> dict[str, Any]:
    """The identity this process stamps on the trials it asks (not cached: a forked child is another driver)."""
    pid = os.getpid()
    return {"machine": machine_id(), "pid": pid, "start": _start_time(pid) or ""}


def driver_alive(driver: dict[str, Any]) -> bool | None:
    """Whether the stamped driver process lives; None when it ran on another machine (ask its heartbeat)."""
    if driver.get("machine") != machine_id():
        return None
    pid = int(driver.get("pid", 0))
    if driver.get("start"):
        return _start_time(pid) == driver["start"]  # a reused pid has another start time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def heartbeat_ages(storage: optuna.storages.RDBStorage, study_id: int) -> dict[int, float]:
    """Seconds since the last heartbeat of each RUNNING trial that has one, by trial id (the database's clock)."""
    from optuna.storages._rdb import models  # the heartbeat table has no public reader

    session = storage.scoped_session()
    try:
        now: datetime | str = session.execute(sqlalchemy.func.now()).scalar_one()
        rows = (session.query(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
                .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING)
                .all())
        session.commit()
    finally:
        session.close()
    now = _naive(now)
    return {trial_id: (now - _naive(beat)).total_seconds() for trial_id, beat in rows}


def _naive(value: datetime | str) -> datetime:
    # SQLite returns CURRENT_TIMESTAMP as text; PostgreSQL's now() is zone-aware, its stored beats are not
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    return stamp.replace(tzinfo=None)


def interrupted(study: optuna.Study, grace_s: float = GRACE_S, unstamped_after_s: float = 0.0,
                settle_s: float = 0.0) -> list[FrozenTrial]:
    """The RUNNING trials of `study` whose driver is gone (see the module's docstring).

    A trial without a driver stamp was asked outside autopeft's engine, or by a driver killed between asking and
    stamping it: nobody will finish it, so it counts as interrupted once it is `unstamped_after_s` old (a driver
    stamps its trials an instant after asking them). With `settle_s`, unstamped trials are looked at again after
    that many seconds, and those stamped (or ended) meanwhile are another live driver's, caught in that instant:
    what a driver resuming beside another one must not take (both resuming at once).
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps an RDBStorage in a cache
    ages: dict[int, float] | None = None
    out = []
    for t in running:
        driver = t.user_attrs.get(ATTR_DRIVER)
        if not isinstance(driver, dict):
            started = t.datetime_start or datetime.now()  # Optuna stamps this with the asking process's clock
            if (datetime.now() - started).total_seconds() >= unstamped_after_s:
                out.append(t)
            continue
        alive = driver_alive(driver)
        if alive is None:
            if ages is None:
                study_id = storage.get_study_id_from_name(study.study_name)
                ages = heartbeat_ages(storage, study_id) if isinstance(storage, optuna.storages.RDBStorage) else {}
            alive = ages.get(t._trial_id, float("inf")) <= grace_s
        if not alive:
            out.append(t)
    unstamped = {t.number for t in out if not isinstance(t.user_attrs.get(ATTR_DRIVER), dict)}
    if settle_s > 0 and unstamped:
        time.sleep(settle_s)
        still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if not isinstance(t.user_attrs.get(ATTR_DRIVER), dict)}
        out = [t for t in out if t.number not in unstamped or t.number in still]
    return out


class Heartbeat(threading.Thread):
    """Beats every `interval` seconds for the trials `running()` names, then calls `tick()` (e.g. re-queueing the
    trials of drivers that died meanwhile). Errors are logged, never raised: a missed beat is not fatal."""

    def __init__(self, storage: optuna.storages.RDBStorage, running: Callable[[], Iterable[int]],
                 tick: Callable[[], Any] | None = None, interval: float = HEARTBEAT_S):
        super().__init__(name="autopeft-heartbeat", daemon=True)
        self.storage, self.running, self.tick, self.interval = storage, running, tick, interval
        self._stop_event = threading.Event()

    def beat(self) -> None:
        for trial_id in list(self.running()):
            self.storage.record_heartbeat(trial_id)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.beat()
                if self.tick is not None:
                    self.tick()
            except Exception as exc:  # noqa: BLE001  the storage may be briefly unreachable; try again next beat
                from autopeft.search.storage import outage

                # during an outage the driver has said so once (storage.retry); a missed beat adds nothing
                (logger.debug if outage.ongoing else logger.warning)("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 5)
