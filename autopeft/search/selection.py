"""Selection by cross-validation (`autopeft search --select cv:K`).

One val split of a few hundred images ranks a study's best trials with several points of noise, and the trial that
tops it is often the luckiest, not the best. After the trials, the `select_top` best full-fidelity trials under the
budget (by val) are trained again in K stratified, seeded folds over train+val (`autopeft.data.folds`; the test
split is never read), each fold run a Ray Tune trial placed like any other (one machine or a cluster). Each fold's
held-out accuracy is written to the study as the run ends, so `--resume` runs only the folds still missing; the
study's pick (`best_under_budget`, `autopeft export --pick best`) is then the best mean fold accuracy.

The fold runs train at the study's fidelity (`--epochs`) and are not part of `--max-epochs`: they cost
`select_top × K × epochs` more epochs, printed before they start.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from rich.console import Console

from autopeft.pareto import best_under_budget, top_by_val
from autopeft.records import TrialRecord, cv_attr, cv_results
from autopeft.search import storage as st

if TYPE_CHECKING:
    import optuna

    from autopeft.search.engine import Prepared


def fold_runs(prep: Prepared, study: optuna.Study) -> tuple[list[TrialRecord], list[dict[str, Any]]]:
    """(the trials cross-validation scores, the fold runs still to do as trial configs' `autopeft` entries)."""
    s = prep.settings
    folds = s.cv_folds
    if folds is None:
        return [], []
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    chosen = top_by_val(st.records_of(study), prep.budget.limit, s.select_top)
    stored = cv_results(study.user_attrs)
    todo = []
    for r in chosen:
        done = stored.get(r.number, {}).get(folds, {})
        hparams = dict(trials[r.number].user_attrs.get(st.ATTR_HPARAMS) or {})
        for fold in range(folds):
            if isinstance(done.get(fold, {}).get("acc"), (int, float)):
                continue  # ran before this --resume
            todo.append({"plan": r.plan, "peft_params": r.peft_params, "overhead": r.overhead, "hparams": hparams,
                         "number": r.number, "cv": {"folds": folds, "fold": fold, "seed": s.seed}})
    return chosen, todo


def _recorder_class() -> type:
    from ray.tune import Callback

    class FoldRecorder(Callback):
        """Writes each fold run's held-out accuracy (or its failure) to the study as the run ends."""

        def __init__(self, study: optuna.Study, epochs: int, total: int, console: Console) -> None:
            self.study, self.epochs, self.total, self.console = study, epochs, total, console
            self.done = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.record(trial.config["autopeft"], trial.last_result or {})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.record(trial.config["autopeft"], {"fail_reason": "its worker process or node was lost, and in "
                                                                  "every re-run (--max-retries); see the Ray log"})

        def record(self, info: dict[str, Any], r: dict[str, Any]) -> None:
            cv = info["cv"]
            if r.get("fail_reason") or r.get("val_acc") is None or int(r.get("epoch", 0) or 0) < self.epochs:
                value: dict[str, Any] = {"fail": str(r.get("fail_reason") or "ended before its last epoch")}
                text = f"failed: {value['fail']}"
            else:
                value = {"acc": float(r["val_acc"]), "loss": float(r.get("val_loss") or math.nan),
                         "seconds": float(r.get("seconds", 0.0) or 0.0), "node": str(r.get("node", ""))}
                text = f"held-out accuracy {value['acc']:.4f}"
            key = cv_attr(int(cv["folds"]), int(info["number"]), int(cv["fold"]))
            st.retry(lambda: self.study.set_user_attr(key, value))
            self.done += 1
            self.console.print(f"  cv [{self.done}/{self.total}] trial {info['number']} fold {int(cv['fold']) + 1}/"
                               f"{cv['folds']}: {text}", highlight=False)

        def __getstate__(self) -> dict:
            # Ray writes its callbacks to tuner.pkl: the study (its storage URL may hold a password) stays out
            return {**self.__dict__, "study": None, "console": None}

    return FoldRecorder


def cross_validate(prep: Prepared, study: optuna.Study, console: Console) -> TrialRecord | None:
    """Run the missing fold runs of the study's top trials on Ray Tune, print the scores, return the pick (None
    when `select` is `val` or no trial is eligible)."""
    from ray import tune

    from autopeft.search.engine import trial_trainable

    s = prep.settings
    folds = s.cv_folds
    if folds is None:
        return None
    chosen, todo = fold_runs(prep, study)
    if not chosen:
        console.print("cross-validation: no full-fidelity trial within the budget to score", highlight=False)
        return None
    console.print(f"cross-validation (--select cv:{folds}): the top {len(chosen)} trials by val "
                  f"({', '.join(str(r.number) for r in chosen)}) × {folds} folds of train+val: {len(todo)} fold runs "
                  f"× {s.epochs} epochs = {len(todo) * s.epochs:,} epochs"
                  + (f" ({len(chosen) * folds - len(todo)} ran before)" if len(todo) < len(chosen) * folds else ""),
                  highlight=False)
    if todo:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        workdir = tempfile.mkdtemp(prefix=f"autopeft-{s.study}-cv-")
        try:
            tuner = tune.Tuner(
                trial_trainable(s),
                param_space={"autopeft": tune.grid_search(todo)},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=s.concurrency, reuse_actors=True),
                run_config=tune.RunConfig(name=f"{s.study}-cv", storage_path=workdir, verbose=0, log_to_file=True,
                                          callbacks=[_recorder_class()(study, s.epochs, len(todo), console)],
                                          failure_config=tune.FailureConfig(max_failures=s.max_retries)),
            )
            tuner.fit()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    records = st.records_of(study)
    by_number = {r.number: r for r in records}
    for r in chosen:
        scored = by_number[r.number]
        if scored.cv_acc is None:
            line = "not every fold ran (see above); --resume runs the missing ones"
        else:
            sd = math.sqrt(sum((a - scored.cv_acc) ** 2 for a in scored.cv_accs) / max(len(scored.cv_accs) - 1, 1))
            line = f"cv {scored.cv_acc:.4f} ± {sd:.4f} over {len(scored.cv_accs)} folds"
        console.print(f"  trial {r.number}: val {r.val_acc:.4f}, {line}", highlight=False)
    pick = best_under_budget(records, prep.budget.limit)
    if pick is not None and pick.cv_acc is not None:
        console.print(f"selected trial {pick.number} (cv {pick.cv_acc:.4f}; val {pick.val_acc:.4f})",
                      highlight=False)
    return pick
