"""What a search does when its infrastructure fails under a trial, so that no trial is lost or counted twice.

- A trial whose driver died (`liveness`) or that the epoch cap's stop ended unstarted is closed uncounted
  (`close_uncounted`: FAIL with its reason, `interrupted`), and the engine queues the former again.
- A trial whose Ray worker or node was lost is re-run by Ray (`--max-retries`); `retry_recorder` tells the searcher,
  and `lost_reason` is its reason when the retries run out.
- A run's checkpoint folder under `--checkpoint-storage` is deleted with the run (`remove_run_folder`).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState

from autopeft.search import storage as st

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

