"""The search engine end to end on digits: Ray Tune + OptunaSearch + ASHA + SQLite storage, results and resume.

One local Ray instance (2 CPUs) serves the whole module.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import optuna
import pytest
import ray
import torch
from safetensors.torch import save_file

from autopeft.backbones import create_backbone
from autopeft.cli import main
from autopeft.pareto import pareto_front
from autopeft.search import storage as st
from autopeft.search.engine import _searcher_class
from autopeft.space import load_space

# The engine's mechanics on a 3-block test ViT with stand-in "pretrained" weights written by the fixture (fast);
# the bundled backbone's search is the README's quickstart.
WEIGHTS = Path(tempfile.gettempdir()) / f"autopeft-test-vit-{os.getpid()}.safetensors"
SEARCH = ["search", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights", str(WEIGHTS),
          "--budget", "5%", "--epochs", "3", "--grace-epochs", "1", "--concurrency", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def ray_instance():
    torch.manual_seed(0)
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(WEIGHTS))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    WEIGHTS.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, ray_instance):
    """One 8-trial study shared by the read-only tests below."""
    d = tmp_path_factory.mktemp("search")
    cwd = os.getcwd()
    os.chdir(d)
    os.environ["AUTOPEFT_CACHE"] = str(d / "cache")
    try:
        assert main([*SEARCH, "--trials", "8", "--study", "e2e"]) == 0
    finally:
        os.chdir(cwd)
    return d


def test_storage_holds_every_trial_with_names_and_attrs(study_dir) -> None:
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{study_dir}/studies/e2e.db")
    assert study.metric_names == ["val_acc", "peft_params"]
    trials = study.get_trials()
    assert len(trials) == 8 and sorted(t.number for t in trials) == list(range(8))
    for t in trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED), t
        for key in ("plan", "peft_params", "percent", "epochs", "max_epochs", "curve", "seconds"):
            assert key in t.user_attrs, (t.number, key)
        assert len(t.user_attrs["curve"]) == t.user_attrs["epochs"]
    settings = study.user_attrs["autopeft"]
    assert settings["dataset"] == "digits" and settings["budget_limit"] > 0
    # baselines come first, tagged; searched trials use readable parameter names
    baselines = [t.user_attrs.get("baseline") for t in trials if t.user_attrs.get("baseline")]
    assert {"lora", "adapter", "linear"} <= set(baselines)
    searched = [t for t in trials if not t.user_attrs.get("baseline")]
    assert searched and all("lr_scale" in t.params for t in searched)
    assert any(name.startswith(("block", "group", "global", "noah")) for t in searched for name in t.params)


def test_a_trial_in_a_reused_worker_equals_a_fresh_run(study_dir) -> None:
    """Workers run trial after trial (Ray's reuse_actors): the last full trial, which ran in a worker that had run
    others before it, has the val curve of the same plan and hyper-parameters trained afresh in this process."""
    from autopeft.data import data_config, load_dataset
    from autopeft.plan import PeftPlan
    from autopeft.search.trainable import trial_config
    from autopeft.train import train

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{study_dir}/studies/e2e.db")
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE and t.number >= 2]
    assert done, "no full trial after the first two (one per worker)"
    t = max(done, key=lambda t: t.number)
    cfg = trial_config(dict(t.user_attrs[st.ATTR_HPARAMS]), 3, 0)  # TrainConfig's defaults fill the rest
    data = load_dataset("digits", None, augment=cfg.augment, seed=0,
                        **data_config("autopeft_test_vit"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU trial
    try:
        curve = []
        train("autopeft_test_vit", PeftPlan.from_dict(t.user_attrs[st.ATTR_PLAN]), data, cfg, weights=str(WEIGHTS),
              report=lambda m: curve.append(m["val_acc"]))
    finally:
        torch.set_num_threads(threads)
    assert curve == pytest.approx(t.user_attrs["curve"], abs=1e-9), (t.number, curve, t.user_attrs["curve"])


def test_without_early_stopping_every_trial_trains_all_epochs(tmp_path, monkeypatch, ray_instance) -> None:
    """`--no-early-stopping`: ASHA is off (a plain random search over the space, for instance), no trial is cut."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    assert main([*SEARCH, "--trials", "4", "--study", "fifo", "--no-early-stopping", "--no-baselines",
                 "--sampler", "random"]) == 0
    _, records = st.load_records("fifo", f"sqlite:///{tmp_path}/studies/fifo.db")
    assert len(records) == 4 and all(r.status == "COMPLETE" and r.epochs == 3 for r in records), records


def test_max_epochs_caps_the_study_and_resume_keeps_the_cap(tmp_path, monkeypatch, ray_instance, capsys) -> None:
    """`--max-epochs 7` with 3-epoch trials (two at a time, ASHA on): the study's trials spend the 7 epochs, every
    one of them reported (no trial is cut inside an epoch: each trial's curve has an entry for each epoch it
    trained), and it ends before its 10 trials; `--resume` without the flag keeps the stored cap (nothing more
    runs), with a larger one it goes on to that."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path}/studies/cap.db"
    base = [*SEARCH, "--trials", "10", "--study", "cap", "--no-baselines"]
    assert main([*base, "--max-epochs", "7"]) == 0
    _, records = st.load_records("cap", url)
    spent = sum(len(r.curve) for r in records)  # from the trials' own reports, not from the cap's counter
    assert spent == 7 and len(records) < 10, [(r.number, r.epochs, r.curve, r.status) for r in records]
    study = optuna.load_study(study_name="cap", storage=url)
    assert [t.user_attrs.get("trained_epochs", 0) for t in study.trials] == [len(r.curve) for r in records]
    # a trial asked just before the cap was reached may never train: it is closed, not left RUNNING
    assert all(r.status in ("COMPLETE", "PRUNED") or (r.status == "FAIL" and r.epochs == 0 and "epoch cap" in
                                                       r.tags.get("fail_reason", "")) for r in records), \
        [(r.number, r.status, r.epochs, r.tags) for r in records]
    assert "at most 7 epochs in all" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0
    _, again = st.load_records("cap", url)
    assert len(again) == len(records)  # the stored cap holds: all 7 are spent, nothing more runs
    assert main([*base, "--resume", "--max-epochs", "12"]) == 0
    _, more = st.load_records("cap", url)
    assert len(more) > len(records) and sum(r.epochs for r in more) <= 12


def test_select_cv_scores_the_top_trials_in_folds_and_resume_runs_only_the_missing(tmp_path, monkeypatch,
                                                                                    ray_instance, capsys) -> None:
    """`--select cv:2 --select-top 2`: after the trials, the two best by val are trained in 2 folds of train+val as
    Ray Tune trials; each fold's held-out accuracy is in the study, the pick is the best mean, export records the
    folds; a fold that failed is the only one `--resume` runs again."""
    from autopeft.pareto import best_under_budget, top_by_val
    from autopeft.records import cv_attr

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path}/studies/cv.db"
    base = [*SEARCH, "--trials", "4", "--study", "cv", "--no-early-stopping", "--select", "cv:2", "--select-top", "2"]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "4 fold runs × 3 epochs = 12 epochs" in err, err
    settings, records = st.load_records("cv", url)
    top = top_by_val(records, settings.budget_limit, 2)
    scored = [r for r in records if r.cv_accs]
    assert sorted(r.number for r in scored) == sorted(r.number for r in top) and len(top) == 2
    assert all(len(r.cv_accs) == 2 and 0 <= r.cv_acc <= 1 for r in scored)
    pick = best_under_budget(records, settings.budget_limit)
    assert pick is not None and pick.cv_acc == max(r.cv_acc for r in scored)
    assert main(["results", "--study", "cv", "--storage", url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["trial"]: row["cv_acc"] for row in rows if row["cv_acc"] is not None} == \
        {r.number: pytest.approx(r.cv_acc) for r in scored}
    assert [row["trial"] for row in rows if row["best"]] == [pick.number]
    assert main(["export", "--study", "cv", "--storage", url, "-o", str(tmp_path / "r.yaml")]) == 0
    recipe = (tmp_path / "r.yaml").read_text()
    assert f"trial: {pick.number}" in recipe and "cv_accs:" in recipe
    # one fold failed (a lost node, say): --resume runs that fold only, and no new trial
    study = optuna.load_study(study_name="cv", storage=url)
    study.set_user_attr(cv_attr(2, top[1].number, 1), {"fail": "lost"})
    assert main([*base, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "1 fold runs × 3 epochs" in err and "(3 ran before)" in err, err
    _, again = st.load_records("cv", url)
    assert len(again) == 4 and len(next(r for r in again if r.number == top[1].number).cv_accs) == 2


def test_the_pickled_fold_recorder_holds_no_storage_url(tmp_path) -> None:
    import ray.cloudpickle as cloudpickle
    from rich.console import Console

    from autopeft.search.selection import _recorder_class

    url = f"sqlite:///{tmp_path}/secret-s3cr3t.db"
    study = optuna.create_study(study_name="s", storage=st.open_storage(url))
    recorder = _recorder_class()(study, 3, 1, Console())
    assert b"s3cr3t" not in cloudpickle.dumps(recorder)


def test_a_single_objective_study_tells_the_sampler_every_epoch(tmp_path, monkeypatch, ray_instance, capsys) -> None:
    """`--objectives acc`: one direction, each epoch's val accuracy reported to the Optuna trial (so a trial ASHA
    stops reaches TPE with its last value), and the Pareto views still trade accuracy against parameters."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    assert main([*SEARCH, "--trials", "6", "--study", "one", "--objectives", "acc"]) == 0
    url = f"sqlite:///{tmp_path}/studies/one.db"
    study = optuna.load_study(study_name="one", storage=url)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE]
    for t in study.get_trials():
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED), t
        reported = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        curve = t.user_attrs["curve"]  # a complete trial's last epoch is its objective value, not a report
        assert reported == (curve if t.state == optuna.trial.TrialState.PRUNED else curve[: len(reported)]), t
        assert len(reported) >= len(curve) - 1
    settings, records = st.load_records("one", url)
    assert settings.metrics == ["val_acc"] and settings.front_metrics == ["val_acc", "peft_params"]
    capsys.readouterr()
    assert main(["results", "--study", "one", "--storage", url, "--pareto", "--format", "json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front and [r["trial"] for r in front] == [r.number for r in pareto_front(records)]


def test_early_stopped_trials_are_pruned_and_never_on_the_front(study_dir) -> None:
    settings, records = st.load_records("e2e", f"sqlite:///{study_dir}/studies/e2e.db")
    stopped = [r for r in records if r.epochs < 3]
    assert stopped, "ASHA stopped no trial"
    assert all(r.status == "PRUNED" for r in stopped)
    front = pareto_front(records)
    assert front and all(r.epochs == 3 and r.status == "COMPLETE" for r in front)
    assert all(r.peft_params <= settings.budget_limit for r in records)


def test_results_formats(study_dir, capsys) -> None:
    url = f"sqlite:///{study_dir}/studies/e2e.db"
    assert main(["results", "--study", "e2e", "--storage", url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and {"trial", "status", "val_acc", "peft_params", "plan", "baseline"} <= set(rows[0])
    assert main(["results", "--study", "e2e", "--storage", url, "--pareto", "--format", "json"]) == 0
    pareto = json.loads(capsys.readouterr().out)
    assert pareto and all(r["pareto"] and r["status"] == "COMPLETE" for r in pareto)
    assert main(["results", "--study", "e2e", "--storage", url, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("trial,status,val_acc")


def test_resume_finishes_the_requested_count_without_duplicates(tmp_path, ray_instance, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    assert main([*SEARCH, "--trials", "3", "--study", "r", "--no-baselines"]) == 0
    url = st.default_storage("r")
    study = optuna.load_study(study_name="r", storage=url)
    before = {t.number: (t.state, t.values) for t in study.get_trials()}
    # a driver killed mid-trial leaves a RUNNING trial behind
    orphan = study.ask()
    rate = dict(load_space("unified").training)["lr_scale"]
    orphan.suggest_float("lr_scale", rate.low, rate.high, log=True)  # the space's own learning-rate parameter
    assert main([*SEARCH, "--trials", "5", "--study", "r", "--resume"]) == 0
    trials = optuna.load_study(study_name="r", storage=url).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5
    for t in trials:  # what finished before the interruption is kept as it was
        if t.number in before:
            assert (t.state, t.values) == before[t.number]
    dead = trials[orphan.number]
    assert dead.state.name == "FAIL" and "interrupted" in dead.user_attrs["fail_reason"]
    assert any(t.params.get("lr_scale") == dead.params["lr_scale"] for t in trials if t.number > orphan.number)


def test_fidelity_aware_searcher_marks_states() -> None:
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher_class()(space=lambda t: {"x": t.suggest_float("x", 0, 1)}, metric=["val_acc", "peft_params"],
                                 mode=["max", "min"], storage=storage, study_name="s", max_epochs=4)
    for tid in ("full", "stopped", "failed", "crashed"):
        searcher.suggest(tid)
    searcher.on_trial_complete("full", {"val_acc": 0.9, "peft_params": 10, "epoch": 4, "curve": [0.5, .6, .8, .9]})
    searcher.on_trial_complete("stopped", {"val_acc": 0.95, "peft_params": 5, "epoch": 2, "curve": [0.9, 0.95]})
    searcher.on_trial_complete("failed", {"fail_reason": "training diverged", "epoch": 1, "curve": [0.1]})
    searcher.on_trial_complete("crashed", None, error=True)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert trials[0].values == [0.9, 10] and trials[1].values is None
    assert trials[1].user_attrs["epochs"] == 2 and trials[2].user_attrs["fail_reason"] == "training diverged"
    assert "worker" in trials[3].user_attrs["fail_reason"]


def test_a_diverged_trial_is_recorded_stopped_with_its_reason_and_its_last_value() -> None:
    """A trial that stopped because it diverged is PRUNED (TPE ranks stopped trials by their last value and ignores
    failed ones), keeps its reason, and its last val is its intermediate value at that epoch."""
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher_class()(space=lambda t: {"x": t.suggest_float("x", 0, 1)}, metric="val_acc", mode="max",
                                 storage=storage, study_name="s", max_epochs=4)
    searcher.suggest("d")
    searcher.on_trial_complete("d", {"fail_reason": "diverged: val accuracy 0.100 is at chance (epoch 1)",
                                     "epoch": 1, "curve": [0.1]})
    (trial,) = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert trial.state.name == "PRUNED" and trial.user_attrs["fail_reason"].startswith("diverged")
    assert trial.intermediate_values == {1: 0.1}


def test_a_trial_the_experiment_ended_before_it_reported_is_closed_and_not_counted() -> None:
    """The epoch cap can end the experiment between asking a trial and its first report; Ray then tells the
    searcher nothing of it. `settle_unstarted` closes it (FAIL, with the reason, not counted), so the study holds no
    RUNNING trial once the search is over."""
    from autopeft.search.engine import tally

    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher_class()(space=lambda t: {"x": t.suggest_float("x", 0, 1)}, metric="val_acc", mode="max",
                                 storage=storage, study_name="s", max_epochs=2)
    searcher.suggest("done")
    searcher.suggest("never")
    searcher.on_trial_complete("done", {"val_acc": 0.5, "epoch": 2, "curve": [0.4, 0.5]})
    assert searcher.settle_unstarted() == [1]
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert "epoch cap" in trials[1].user_attrs["fail_reason"] and tally(trials) == (1, 0)
    assert searcher.settle_unstarted() == []


def test_the_pickled_searcher_holds_no_storage_url(tmp_path) -> None:
    """Ray pickles the searcher into its work dir (tuner.pkl); the study URL (a password, for PostgreSQL) stays out."""
    import ray.cloudpickle as cloudpickle

    url = f"sqlite:///{tmp_path}/secret-s3cr3t.db"
    searcher = _searcher_class()(space=lambda t: {"x": t.suggest_float("x", 0, 1)}, metric=["val_acc", "peft_params"],
                                 mode=["max", "min"], storage=st.open_storage(url), study_name="s", max_epochs=4)
    searcher.suggest("a")
    blob = cloudpickle.dumps(searcher)
    assert b"s3cr3t" not in blob
    searcher.on_trial_complete("a", {"val_acc": 0.5, "peft_params": 3, "epoch": 4, "curve": [0.5] * 4})
    assert optuna.load_study(study_name="s", storage=url).trials[0].values == [0.5, 3]  # the live one still works


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--sampler", "cmaes"], "unknown sampler 'cmaes'"),
        (["--objectives", "acc,speed"], "--objectives"),
        (["--budget", "0.5"], "0.5"),
        (["--budget", "500", "--space", "noah"], "smallest plan"),
        (["--budget", "0.0001%"], "rounds to 0"),
        (["--space", "nope"], "nope"),
        (["--resume"], "no study"),
        (["--trials", "0"], "--trials must be >= 1"),
        (["--max-epochs", "2"], "less than one trial's 3 epochs"),
        (["--baseline-lr-scales", "9"], "outside the space's range"),
        (["--storage", "notaurl"], "not a database URL"),
        (["--select", "cv:1"], "--select 'cv:1' is not valid"),
        (["--select", "best"], "--select 'best' is not valid"),
        (["--select-top", "0"], "--select-top must be >= 1"),
        (["--max-retries", "-1"], "--max-retries must be >= 0"),
        (["--storage-patience", "-5"], "--storage-patience must be >= 0 seconds"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
        (["--study", "a b"], "study name"),
    ],
)
def test_bad_search_input_creates_nothing(tmp_path, monkeypatch, capsys, ray_instance, extra, needle) -> None:
    monkeypatch.chdir(tmp_path)
    args = [*SEARCH, "--trials", "2", "--study", "bad"]
    for flag, value in zip(extra[::2], extra[1::2], strict=False):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if extra == ["--resume"]:
        args.append("--resume")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.iterdir())


def test_unloadable_hub_weights_stop_the_search_before_any_trial(tmp_path, monkeypatch, capsys, ray_instance) -> None:
    """timm's `test_vit` names hub weights; offline they cannot load: one line on the driver, exit 2, no study, rather
    than every trial failing with the same line."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in SEARCH if a not in ("--weights", str(WEIGHTS))]
    args[args.index("autopeft_test_vit")] = "test_vit"
    assert main([*args, "--trials", "2", "--study", "hub"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrained weights for test_vit could not be loaded" in err[0], err
    assert not list(tmp_path.iterdir())


def test_a_relative_folder_reaches_every_trial(tmp_path, monkeypatch, capsys, ray_instance) -> None:
    """Trials run in Ray's own working directories: `--dataset data` (relative to where the search starts) is made
    absolute on the driver, stored so, and every trial trains on it."""
    from data_fixtures import write_image_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", {"a": 10, "b": 10})
    args = [*SEARCH, "--trials", "2", "--epochs", "1", "--study", "folder", "--no-baselines"]
    args[args.index("digits")] = "data"
    assert main(args) == 0
    settings, records = st.load_records("folder", f"sqlite:///{tmp_path}/studies/folder.db")
    assert settings.search.dataset == f"imagefolder:{tmp_path / 'data'}"
    assert len(records) == 2 and all(r.status == "COMPLETE" for r in records), [r.tags for r in records]


def test_a_study_whose_every_trial_failed_is_one_line() -> None:
    from autopeft.cli.search import all_failed
    from autopeft.records import ATTR_REASON, TrialRecord

    def record(n: int, status: str, reason: str = "") -> TrialRecord:
        return TrialRecord(number=n, plan={}, peft_params=0, status=status,
                           tags={ATTR_REASON: reason} if reason else {})

    failed = [record(0, "FAIL", "out of memory"), record(1, "FAIL", "boom"), record(2, "FAIL", "boom")]
    assert all_failed(failed) == ("every trial of the study failed (3); the commonest reason (2 of 3): boom")
    assert all_failed([*failed, record(3, "PRUNED")]) is None
    assert all_failed([]) is None


def test_existing_study_needs_resume(study_dir, monkeypatch, capsys) -> None:
    monkeypatch.chdir(study_dir)
    assert main([*SEARCH, "--trials", "8", "--study", "e2e"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_progress_prints_one_unwrapped_line_per_trial(capsys) -> None:
    """Logs of a search (stderr to a file, not a terminal) keep one line per trial however long it is."""
    from types import SimpleNamespace

    from autopeft.search.progress import SearchProgress

    progress = SearchProgress(total=12, max_epochs=3, budget_limit=10_000)
    for number, result in enumerate([{"epoch": 3, "val_acc": 0.5}, {"epoch": 1, "val_acc": 0.25},
                                     {"epoch": 2, "fail_reason": "CUDA out of memory " * 8}]):
        trial = SimpleNamespace(trial_id=f"t{number}", last_result=result,
                                config={"autopeft": {"peft_params": 1234, "number": number}})
        progress.on_trial_start(0, [], trial)
        progress.on_trial_complete(0, [], trial)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["trial 0", "trial 1", "trial 2"], lines
    assert "best under budget 0.5000 (trial 0, 1,234 params)" in lines[2] and "3/12 finished" in lines[2]


def test_a_diverged_trial_is_shown_stopped_as_the_study_records_it(capsys) -> None:
    from types import SimpleNamespace

    from autopeft.search.progress import SearchProgress

    progress = SearchProgress(total=4, max_epochs=6, budget_limit=10_000)
    reason = "diverged: val accuracy 0.100, 0.100 in epochs 1-2 is at chance"
    for number, result in enumerate([{"epoch": 2, "val_acc": 0.1, "fail_reason": reason},
                                     {"epoch": 2, "fail_reason": "CUDA out of memory"}]):
        trial = SimpleNamespace(trial_id=f"t{number}", last_result=result,
                                config={"autopeft": {"peft_params": 99, "number": number}})
        progress.on_trial_start(0, [], trial)
        progress.on_trial_complete(0, [], trial)
    lines = capsys.readouterr().err.splitlines()
    assert "stopped at epoch 2, diverged: val accuracy" in lines[0] and "FAIL" not in lines[0], lines
    assert "FAIL CUDA out of memory" in lines[1] and "1 stopped early · 1 failed" in lines[1], lines


def test_epoch_count_adds_each_trials_last_epoch_to_the_finished_ones() -> None:
    from autopeft.search.epoch_cap import EpochCount

    count = EpochCount(base=5)
    count.see("a", {"epoch": 1})
    count.see("a", {"epoch": 2})
    count.see("b", {"epoch": 1})
    count.see("a", {"epoch": 2})  # a repeated report (Ray's final result) is not counted twice
    count.see("c", None)
    assert count.spent == 8
    assert count.room_for_another(cap=11, running=2) and not count.room_for_another(cap=10, running=2)


def test_epoch_count_counts_every_run_of_a_trial_re_run_after_a_lost_worker() -> None:
    """A trial whose worker was lost is run again by Ray: from its start without a checkpoint (every epoch trained
    again), or from its last checkpoint (the epochs after it). Each run carries its own `attempt` token."""
    from autopeft.search.epoch_cap import EpochCount, trained_epochs

    count = EpochCount(base=0)
    for epoch in (1, 2, 3):  # the first run trains 3 epochs, then its node is lost
        count.see("a", {"epoch": epoch, "attempt": "first"})
    for epoch in (1, 2, 3, 4):  # no checkpoint: the re-run starts over
        count.see("a", {"epoch": epoch, "attempt": "again"})
    count.see("a", {"epoch": 4, "attempt": "again"})  # the final result, repeated
    assert count.trained("a") == 7 and count.spent == 7
    for epoch in (1, 2):
        count.see("b", {"epoch": epoch, "attempt": "b1"})
    for epoch in (2, 3, 4):  # from the checkpoint of epoch 1: epochs 2-4 trained again
        count.see("b", {"epoch": epoch, "attempt": "b2", "resumed_from": 1})
    assert count.trained("b") == 5 and count.spent == 12

    class Trial:
        def __init__(self, attrs: dict) -> None:
            self.user_attrs, self.state = attrs, optuna.trial.TrialState.COMPLETE

    assert trained_epochs(Trial({"epochs": 4, "trained_epochs": 7})) == 7
    assert trained_epochs(Trial({"epochs": 4})) == 4  # a trial recorded before the count: its length


def test_the_capped_scheduler_lets_a_trial_start_an_epoch_only_where_the_cap_has_room_for_it() -> None:
    """Under `--max-epochs`, every live trial holds the epoch it is training: a trial that reports goes on only
    while the epochs spent, one for each other live trial and its own next one fit; elsewhere ASHA decides.
    No trial is ever cut inside an epoch, so every epoch trained is a reported, counted one."""
    from types import SimpleNamespace

    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from autopeft.search.epoch_cap import capped

    class Inner(FIFOScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def on_trial_result(self, controller, trial, result):  # type: ignore[no-untyped-def]
            self.seen.append(trial.trial_id)
            return TrialScheduler.CONTINUE

    a, b, c = (SimpleNamespace(trial_id=t) for t in "abc")
    live = [a, b]
    controller = SimpleNamespace(get_live_trials=lambda: list(live))
    inner = Inner()
    sched = capped(inner, cap=7, base=3)
    assert sched.on_trial_result(controller, a, {"epoch": 1}) == TrialScheduler.CONTINUE  # 4 + b's + a's next = 6
    assert sched.on_trial_result(controller, b, {"epoch": 1}) == TrialScheduler.CONTINUE  # 5 + 1 + 1 = 7
    assert sched.on_trial_result(controller, a, {"epoch": 2}) == TrialScheduler.STOP  # 6 + 1 + 1 > 7
    live.remove(a)
    assert sched.on_trial_result(controller, b, {"epoch": 2}) == TrialScheduler.STOP  # 7 spent: none left
    assert inner.seen == ["a", "b"] and sched.count.spent == 7  # the cap's stops are its own; all 7 were reported
    # with room, the inner scheduler's decision holds (ASHA stopping a weak trial)
    inner.on_trial_result = lambda controller, trial, result: TrialScheduler.STOP  # type: ignore[method-assign]
    live[:] = [c]
    assert capped(inner, cap=20, base=0).on_trial_result(controller, c, {"epoch": 1}) == TrialScheduler.STOP


def test_a_trial_whose_worker_hangs_is_re_run_as_after_a_lost_node(tmp_path, monkeypatch, ray_instance,
                                                                    capsys) -> None:
    """The first trial's worker is stopped (SIGSTOP: alive to Ray, silent to the search) as soon as it runs; past
    its limit (`--stall-floor 15`, nothing reported yet) the driver kills the worker, Ray re-runs the trial, and the
    study ends with both trials finished, the stalled one with its retry. (With no epoch seen the floor is the limit,
    for the re-run too, which starts a new worker: at 2 s it failed on a loaded machine, every re-run killed.)"""
    import signal
    import threading
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    stopped: list[int] = []

    def workers() -> list[int]:
        """This test process's Ray trial workers (its Ray runs below it; other processes' are never touched)."""
        parents: dict[int, int] = {}
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if proc.name.isdigit():
                    parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        mine, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier}
            mine |= frontier
        out = []
        for pid in mine:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                    out.append(pid)
        return out

    before = set(workers())  # another test's idle trial workers are not this one's

    def stop_the_first_trial() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            for pid in set(workers()) - before:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
                # a driver that never restarts it would wait forever: after 120 s the worker goes on (and the
                # assertions below fail) rather than the test hanging
                while time.time() < deadline and Path(f"/proc/{pid}").exists():
                    if time.time() > deadline - 180:
                        os.kill(pid, signal.SIGCONT)
                        return
                    time.sleep(0.1)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_the_first_trial, daemon=True)
    watcher.start()
    try:
        code = main([*SEARCH, "--trials", "2", "--concurrency", "1", "--study", "stall", "--no-baselines",
                     "--stall-floor", "15"])
    finally:
        watcher.join(timeout=1)
        for pid in stopped:  # the driver killed it; never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    err = capsys.readouterr().err
    assert code == 0 and stopped, err[-2000:]
    assert "no report for" in err and "restarting it, as after a lost node" in err, err[-2000:]
    trials = optuna.load_study(study_name="stall", storage=f"sqlite:///{tmp_path}/studies/stall.db").get_trials()
    assert len(trials) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), \
        [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert [t.user_attrs.get("retries", 0) for t in trials].count(1) == 1, [t.user_attrs for t in trials]
