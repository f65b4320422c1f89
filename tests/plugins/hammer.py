"""One of several processes writing to one SQLite study at once, as search drivers do (reliability tests).

    python hammer.py URL STUDY N  ->  prints JSON {"numbers": [...], "errors": [...]}

Asks N trials (taking enqueued WAITING trials first, as drivers take baselines), writes two user attributes and
tells each one, all through autopeft's storage. A trial taken by two processes, or a write that fails, shows.
"""

from __future__ import annotations

import json
import sys

import optuna

from autopeft.search import storage as st


def main(url: str, study_name: str, n: int) -> dict:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_name, storage=st.open_storage(url, create=False))
    numbers, errors = [], []
    for i in range(n):
        try:
            trial = study.ask()
            x = trial.suggest_float("x", 0.0, 1.0)
            trial.set_user_attr("curve", [x, float(i)])
            trial.set_user_attr("epochs", 2)
            study.tell(trial, [x, float(i)])
            numbers.append(trial.number)
        except Exception as exc:  # noqa: BLE001  counted: the test expects none
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"numbers": numbers, "errors": errors}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
