"""What a search does when its infrastructure fails under a trial, so that no trial is lost or counted twice.

- A trial whose driver died (`liveness`) or that the epoch cap's stop ended unstarted is closed uncounted
  (`close_uncounted`: FAIL with its reason, `interrupted`), and the engine queues the former again.
- A trial whose Ray worker or node was lost is re-run by Ray (`--max-retries`); `retry_recorder` tells the searcher,
  and `lost_reason` is its reason when the retries run out.
- An ask the storage dropped after it had created the trial leaves a RUNNING trial nobody runs: `close_abandoned`
  closes it uncounted once the storage is back.
- A run's checkpoint folder under `--checkpoint-storage` is deleted with the run (`remove_run_folder`).
"""

from __future__ import annotations

import datetime
import functools
import logging
from typing import Any

import optuna
from optuna.trial import TrialState

from autopeft.search import storage as st
from autopeft.search.liveness import ATTR_DRIVER

logger = logging.getLogger(__name__)
# set on a trial whose driver died: it is FAIL (kept for the record) and not counted, and a copy is re-run
ATTR_INTERRUPTED = "interrupted"


def close_uncounted(storage: Any, trial_id: int, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with `reason`, as interrupted (not counted: `tally`); False when it had finished
    meanwhile (attributes first: a finished trial takes none, so nothing is half-written)."""
    try:
        storage.set_trial_user_attr(trial_id, ATTR_INTERRUPTED, True)
        storage.set_trial_user_attr(trial_id, st.ATTR_REASON, reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def remove_run_folder(storage: str, name: str) -> None:
    """Delete this driver's trial folder (checkpoints, Ray's per-trial logs) under `--checkpoint-storage`, a path or
    an object-store URI; what cannot be deleted is left with a warning (the study itself is not in it)."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else f"file://{storage}")
        fs.delete_dir(f"{root.rstrip('/')}/{name}")
    except (OSError, ValueError) as exc:
        logger.warning("could not delete the trial checkpoints in %s/%s: %s", storage, name, exc)


def lost_reason(retries: int) -> str:
    """Why a trial whose worker Ray lost is FAIL: it was lost once more than `--max-retries` allows."""
    again = f" and in each of its {retries} re-runs (--max-retries {retries})" if retries else " (--max-retries 0)"
    return f"its worker process or node was lost{again}; see the Ray log"


def retry_recorder(searcher: Any) -> Any:
    """A Ray Tune callback telling `searcher` each re-run of a trial whose worker or node was lost."""
    from ray.tune import Callback

    class RetryRecorder(Callback):
        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            searcher.note_retry(trial.trial_id, str((trial.last_result or {}).get("node", "")))

    return RetryRecorder()


def close_abandoned(study: optuna.Study, since: datetime.datetime, held: set[int]) -> list[int]:
    """Close, uncounted, the RUNNING trials created since `since` that no driver stamped and this one does not hold:
    an ask whose trial the storage created before the connection dropped (the searcher then asked again). A trial
    another driver creates in the same instant is stamped within milliseconds; if it is closed first, that driver
    asks anew (UpdateFinishedTrialError), as for a trial taken for orphaned. Returns the closed trials' numbers."""
    reason = "created while the storage was unreachable and never run (its driver asked again)"
    closed = []
    for t in st.retry(lambda: study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        if t._trial_id in held or ATTR_DRIVER in t.user_attrs or t.datetime_start is None or t.datetime_start < since:
            continue
        if st.retry(functools.partial(close_uncounted, study._storage, t._trial_id, reason)):
            closed.append(t.number)
    if closed:
        logger.warning("trials %s were created by asks the storage dropped; closed, not counted", closed)
    return closed
