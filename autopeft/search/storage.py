"""The storage side of a study: Optuna RDB storages, their URLs, and reading a study back as TrialRecords.

export.py, report.py and `autopeft results` read studies through this module only, never through Ray.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from autopeft.errors import AutopeftError
from autopeft.records import (  # noqa: F401  (the trial attribute names, also here for the storage's users)
    ATTR_BASELINE,
    ATTR_CURVE,
    ATTR_EPOCHS,
    ATTR_GPUS,
    ATTR_HPARAMS,
    ATTR_LOST_NODES,
    ATTR_MAX_EPOCHS,
    ATTR_NODE,
    ATTR_OVERHEAD,
    ATTR_PARAMS,
    ATTR_PERCENT,
    ATTR_PLAN,
    ATTR_REASON,
    ATTR_RERUN_OF,
    ATTR_RESUMED_FROM,
    ATTR_RETRIES,
    ATTR_SECONDS,
    ATTR_STATUS,
    ATTR_SUPERNET_SCORE,
    ATTR_TRAINED,
    ATTR_WARM_START,
    TrialRecord,
    cv_accuracies,
    cv_attr,
    cv_results,
)
from autopeft.search.study_settings import StudySettings

# study attribute holding the StudySettings (search settings, budget, backbone facts, classes)
STUDY_SETTINGS = "autopeft"
SETTINGS_CHANGES = "autopeft_settings_changes"  # what each --resume changed: [{"from_trial": n, setting: value}]

_STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAIL",
                TrialState.RUNNING: "RUNNING", TrialState.WAITING: "RUNNING"}


logger = logging.getLogger(__name__)
T = TypeVar("T")
# SQLite waits this long for another writer's lock before giving up with "database is locked"
SQLITE_BUSY_TIMEOUT_S = 120


def mask_url(url: str) -> str:
    """`url` (or a message holding URLs) with every password replaced by ***, for logs and tables.

    The password runs to the last `@` of the URL (passwords may hold `@`, `:` and `/`); a `password=` query
    parameter is masked too.
    """
    text = re.sub(r"(://[^\s:/@]*:)\S*@", r"\1***@", str(url))
    return re.sub(r"(?i)(\bpassword=)[^&\s]*", r"\1***", text)


class SQLiteStorage(optuna.storages.RDBStorage):
    """An RDBStorage on SQLite whose transactions begin with BEGIN IMMEDIATE (after Optuna's own set-up).

    pysqlite opens a transaction only at the first write, so a read-check-write sequence (Optuna popping an
    enqueued trial, marking a trial finished) reads outside any lock: two drivers sharing a study then both take
    the same WAITING trial, and the second one's tell fails (measured: 4 of 300 trials). BEGIN IMMEDIATE takes
    the write lock first, so such sequences run one after another, waiting up to the busy timeout. Optuna's set-up
    (table creation, schema check) holds two connections at once, so it runs before the switch.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._serialise()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._serialise()

    def _serialise(self) -> None:
        path = self.engine.url.database
        if path and Path(path).is_file() and not os.access(path, os.W_OK):
            return  # a read-only copy of a study: nothing writes, and BEGIN IMMEDIATE would be refused
        sqlalchemy.event.listen(self.engine, "connect", _driver_autocommit)
        sqlalchemy.event.listen(self.engine, "begin", _begin_immediate)
        self.engine.dispose()  # the connections made during set-up lack the switch


def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite leaves BEGIN to `_begin_immediate`


def _begin_immediate(conn: sqlalchemy.engine.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def default_storage(study: str, directory: str | Path = "studies") -> str:
    """`sqlite:///studies/<study>.db` (absolute, so Ray workers resolve it the same way)."""
    check_study_name(study)
    path = Path(directory).expanduser().absolute() / f"{study}.db"
    return f"sqlite:///{path}"


def check_study_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name or ""):
        raise AutopeftError(f"study name {name!r} is not valid; use letters, digits, '-', '_' and '.'")


def open_storage(url: str, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage for `url`; SQLite gets a long busy timeout so concurrent writers wait instead of failing.

    With `create=False` a SQLite file must already exist (reading a study never creates files).
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if not create and not path.is_file():
            raise AutopeftError(f"no study database at {path}; run `autopeft search` first or pass --storage")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    elif "://" not in url:
        raise AutopeftError(f"storage '{mask_url(url)}' is not a database URL (e.g. sqlite:///studies/s.db, "
                            "postgresql+psycopg://user:pass@host/db)")
    else:
        # a server's idle connections may be dropped during a long search: test each before use
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
        if url.startswith("postgresql") and "connect_timeout" not in url:
            kwargs["engine_kwargs"]["connect_args"] = {"connect_timeout": 10}  # not the TCP default of minutes
    sqlite = url.startswith("sqlite:")
    # Two processes creating one new SQLite file race in Optuna's table set-up ("table studies already exists");
    # the loser finds the tables on its next try.
    attempts = 5 if sqlite else 1
    for attempt in range(attempts):
        try:
            return (SQLiteStorage if sqlite else optuna.storages.RDBStorage)(url, **kwargs)
        except Exception as exc:  # noqa: BLE001  drivers raise many types; the user needs the one line
            error = exc
            if attempt < attempts - 1:
                time.sleep(0.2 * (attempt + 1))
    raise AutopeftError(f"cannot open storage {mask_url(url)}: {mask_url(_first_line(error))[:200]}; check the URL, "
                        "that the database server runs and that its driver is installed (e.g. psycopg for "
                        "postgresql+psycopg://)")


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message, or of its cause's (Optuna wraps driver errors in a vague one)."""
    inner = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ else exc
    lines = str(inner).strip().splitlines()
    return lines[0] if lines else type(inner).__name__


def load_study(study: str, storage: str) -> optuna.Study:
    """An existing study, or one line naming the studies that do exist."""
    store = open_storage(storage, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if study not in names:
        known = ", ".join(names) or "none"
        raise AutopeftError(f"no study '{study}' in {mask_url(storage)} (studies there: {known})")
    return optuna.load_study(study_name=study, storage=store)


def write_settings(study: optuna.Study, settings: StudySettings) -> None:
    """Keep `settings` in the study (once, when the engine creates it)."""
    study.set_user_attr(STUDY_SETTINGS, settings.to_stored())


def record_changes(study: optuna.Study, settings: StudySettings, changes: dict[str, Any]) -> None:
    """Keep the settings a resume changed (`study_settings.resumed`), each with the number of the first trial it
    holds for, in SETTINGS_CHANGES, and store `settings` (with them) as the study's settings."""
    history = list(study.user_attrs.get(SETTINGS_CHANGES, []))
    history.append({"from_trial": len(study.get_trials(deepcopy=False)), **changes})
    study.set_user_attr(SETTINGS_CHANGES, history)
    write_settings(study, settings)


def settings_changes(study: optuna.Study) -> list[dict[str, Any]]:
    """The changes `--resume` made to the study's settings, oldest first (`record_changes`)."""
    return list(study.user_attrs.get(SETTINGS_CHANGES, []))


def read_settings(study: optuna.Study) -> StudySettings:
    """The study's StudySettings, from any stored format (one line when it holds none)."""
    return StudySettings.from_stored(study.user_attrs.get(STUDY_SETTINGS), study.study_name)


def record_of(trial: FrozenTrial, cv: dict[int, dict[int, dict[str, Any]]] | None = None) -> TrialRecord:
    """A TrialRecord from an Optuna trial and the attributes autopeft stored on it (`cv`: its fold runs, from the
    study's attributes, see `cv_results`)."""
    a = trial.user_attrs
    state = _STATE_NAMES.get(trial.state, "FAIL")
    values = trial.values or []
    val_acc = a.get(ATTR_CURVE, [None])[-1] if a.get(ATTR_CURVE) else (values[0] if values else None)
    tags = {ATTR_BASELINE: str(a[ATTR_BASELINE])} if a.get(ATTR_BASELINE) else {}
    if a.get(ATTR_REASON):
        tags[ATTR_REASON] = str(a[ATTR_REASON])
    return TrialRecord(
        number=trial.number,
        plan=a.get(ATTR_PLAN) or {},
        peft_params=int(a.get(ATTR_PARAMS, values[1] if len(values) > 1 else 0)),
        val_acc=None if val_acc is None else float(val_acc),
        curve=[float(v) for v in a.get(ATTR_CURVE, [])],
        epochs=int(a.get(ATTR_EPOCHS, 0)),
        max_epochs=int(a.get(ATTR_MAX_EPOCHS, 0)),
        status=state,
        seconds=float(a.get(ATTR_SECONDS, 0.0)),
        overhead=float(a.get(ATTR_OVERHEAD, 0.0)),
        tags=tags,
        params=dict(trial.params),
        cv_accs=cv_accuracies(cv or {}),
        supernet_score=None if a.get(ATTR_SUPERNET_SCORE) is None else float(a[ATTR_SUPERNET_SCORE]),
    )


def records_of(study: optuna.Study) -> list[TrialRecord]:
    """The study's TrialRecords in trial-number order, with their cross-validation folds."""
    cv = cv_results(study.user_attrs)
    return [record_of(t, cv.get(t.number)) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


def load_records(study: str, storage: str) -> tuple[StudySettings, list[TrialRecord]]:
    """(settings, TrialRecords in trial-number order) of a stored study."""
    st = load_study(study, storage)
    return read_settings(st), records_of(st)


# How long the driver waits out an unreachable storage (a database restarting) before it stops (--storage-patience)
STORAGE_PATIENCE_S = 600.0
TRANSIENT = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


class StorageUnavailable(AutopeftError):
    """The storage stayed unreachable past the patience: the search stops; its finished trials are kept."""


class _Outage:
    """One line when the storage becomes unreachable and one when it is back, however many threads wait."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.last_failure: datetime.datetime | None = None  # the latest transient failure any retry met

    def begin(self, exc: BaseException, patience: float) -> None:
        with self.lock:
            self.last_failure = datetime.datetime.now()
            if self.since is None:
                self.since = time.monotonic()
                logger.warning("the study's storage is unreachable (%s); waiting up to %.0f s for it "
                               "(--storage-patience)", mask_url(_first_line(exc))[:200], patience)

    def end(self) -> None:
        with self.lock:
            if self.since is not None:
                logger.warning("the study's storage is back after %.0f s; going on", time.monotonic() - self.since)
                self.since = None

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def seen_since(self, moment: datetime.datetime) -> bool:
        """Whether a retry met a transient failure at or after `moment`."""
        return self.last_failure is not None and self.last_failure >= moment


outage = _Outage()


def storage_unavailable(exc: BaseException) -> StorageUnavailable | None:
    """The StorageUnavailable behind `exc` (Ray Tune may wrap what its searcher raised), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, StorageUnavailable):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def set_patience(seconds: float) -> None:
    """The driver's patience with an unreachable storage (`--storage-patience`)."""
    global STORAGE_PATIENCE_S
    STORAGE_PATIENCE_S = float(seconds)


def retry(fn: Callable[[], T], patience_s: float | None = None, first_wait_s: float = 1.0) -> T:
    """`fn()`, tried again while the storage fails transiently (a lock held past the busy timeout, a dropped
    connection, a database restarting), with waits doubling up to 30 s, for up to `patience_s` seconds (default
    `STORAGE_PATIENCE_S`); then StorageUnavailable. A retried write either did not commit or is idempotent (a tell
    that did commit raises UpdateFinishedTrialError, which callers treat as done)."""
    patience = STORAGE_PATIENCE_S if patience_s is None else float(patience_s)
    started: float | None = None
    pause = first_wait_s
    while True:
        try:
            out = fn()
        except TRANSIENT as exc:
            now = time.monotonic()
            if started is None:
                started = now
                outage.begin(exc, patience)
            if now - started >= patience:
                raise StorageUnavailable(
                    f"the study's storage has been unreachable for {now - started:.0f} s (--storage-patience "
                    f"{patience:g}): {mask_url(_first_line(exc))[:200]}; the finished trials are kept: run "
                    "the same command with --resume once it is back") from None
            time.sleep(min(pause, max(patience - (now - started), 0.0)))
            pause = min(pause * 2, 30.0)
        else:
            if started is not None:
                outage.end()
            return out
