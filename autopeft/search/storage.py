"""The storage side of a study: Optuna RDB storages, their URLs, and reading a study back as TrialRecords.

export.py, report.py and `autopeft results` read studies through this module only, never through Ray.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autopeft.errors import AutopeftError
from autopeft.records import TrialRecord

# user attributes every trial carries (set by the sampler and by the engine when the trial ends)
ATTR_PLAN, ATTR_PARAMS, ATTR_PERCENT, ATTR_BASELINE = "plan", "peft_params", "percent", "baseline"
ATTR_CURVE, ATTR_EPOCHS, ATTR_MAX_EPOCHS, ATTR_SECONDS = "curve", "epochs", "max_epochs", "seconds"
ATTR_STATUS, ATTR_REASON, ATTR_OVERHEAD, ATTR_HPARAMS = "status", "fail_reason", "overhead", "hparams"
ATTR_NODE = "node"
# study attribute holding the search settings (dataset, backbone, budget, space, epochs, objectives, …)
STUDY_SETTINGS = "autopeft"

_STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAIL",
                TrialState.RUNNING: "RUNNING", TrialState.WAITING: "RUNNING"}


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and tables."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


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
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    elif "://" not in url:
        raise AutopeftError(f"storage '{mask_url(url)}' is not a database URL (e.g. sqlite:///studies/s.db, "
                            "postgresql+psycopg://user:pass@host/db)")
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # noqa: BLE001  drivers raise many types; the user needs the one line
        raise AutopeftError(f"cannot open storage {mask_url(url)}: {mask_url(str(exc).splitlines()[0])[:200]}") \
            from None


def load_study(study: str, storage: str) -> optuna.Study:
    """An existing study, or one line naming the studies that do exist."""
    store = open_storage(storage, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if study not in names:
        known = ", ".join(names) or "none"
        raise AutopeftError(f"no study '{study}' in {mask_url(storage)} (studies there: {known})")
    return optuna.load_study(study_name=study, storage=store)


def study_settings(study: optuna.Study) -> dict[str, Any]:
    return dict(study.user_attrs.get(STUDY_SETTINGS) or {})


def record_of(trial: FrozenTrial) -> TrialRecord:
    """A TrialRecord from an Optuna trial and the attributes autopeft stored on it."""
    a = trial.user_attrs
    state = _STATE_NAMES.get(trial.state, "FAIL")
    values = trial.values or []
    val_acc = a.get(ATTR_CURVE, [None])[-1] if a.get(ATTR_CURVE) else (values[0] if values else None)
    tags = {"baseline": a[ATTR_BASELINE]} if a.get(ATTR_BASELINE) else {}
    if a.get(ATTR_REASON):
        tags["fail_reason"] = str(a[ATTR_REASON])
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
    )


def load_records(study: str, storage: str) -> tuple[dict[str, Any], list[TrialRecord]]:
    """(search settings, TrialRecords in trial-number order) of a stored study."""
    st = load_study(study, storage)
    return study_settings(st), [record_of(t) for t in sorted(st.get_trials(deepcopy=False), key=lambda t: t.number)]
