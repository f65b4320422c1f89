"""`autopeft search --strategy oneshot` end to end on digits: the supernet trains as a Ray Tune trial, its finalists
land in the study as ordinary trials with their supernet score, and results, export, report and --resume read the
study as any other. Each search starts (and stops) its own Ray, as the command line does."""

from __future__ import annotations

import json
import math
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
from autopeft.search import storage as st

WEIGHTS = Path(tempfile.gettempdir()) / f"autopeft-oneshot-vit-{os.getpid()}.safetensors"
SEARCH = ["search", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights", str(WEIGHTS),
          "--budget", "5%", "--epochs", "2", "--grace-epochs", "1", "--concurrency", "2", "--seed", "0",
          "--strategy", "oneshot", "--supernet-epochs", "1", "--candidates", "10",
          "--finalists", "3"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    torch.manual_seed(0)
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(WEIGHTS))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    d = tmp_path_factory.mktemp("oneshot")
    cwd = os.getcwd()
    os.chdir(d)
    os.environ["AUTOPEFT_CACHE"] = str(d / "cache")
    try:
        assert main([*SEARCH, "--study", "os"]) == 0
        yield d
    finally:
        os.chdir(cwd)
        WEIGHTS.unlink(missing_ok=True)
        assert not ray.is_initialized()  # the search stopped the Ray it started


def _study(d: Path) -> optuna.Study:
    return optuna.load_study(study_name="os", storage=f"sqlite:///{d}/studies/os.db")


def test_the_finalists_are_the_study_trials_with_their_supernet_scores(study_dir) -> None:
    study = _study(study_dir)
    trials = study.get_trials()
    phase = study.user_attrs["oneshot"]
    assert phase["enqueued"] and phase["scored"] == 10 and 3 <= phase["distinct"] <= 10
    assert len(trials) == 3 and all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                    for t in trials)
    finalists = phase["finalists"]
    # each finalist trained its own plan, in the order of its score, and carries the score
    assert [t.user_attrs["supernet_score"] for t in trials] == [f["score"] for f in finalists]
    assert [t.user_attrs["plan"] for t in trials] == [f["plan"] for f in finalists]
    assert all(t.user_attrs["peft_params"] <= 1622 for t in trials)  # 5 % of the test ViT
    assert not (study_dir / "studies" / "os.supernet.pt").exists()  # the supernet's state goes once it is scored
    # compute in full: the supernet's epochs and its scoring passes, beside the finalists' epochs
    assert phase["supernet_epochs"] == 1 and phase["cost_epochs"] > 1
    assert st.read_settings(study).search.space == "oneshot"  # one-shot's default space, no --space given


def test_results_and_report_show_the_supernet_scores(study_dir, capsys) -> None:
    os.chdir(study_dir)
    assert main(["results", "--study", "os", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    scores = {t.number: t.user_attrs["supernet_score"] for t in _study(study_dir).get_trials()}
    assert {r["trial"]: r["supernet_score"] for r in rows} == scores
    from autopeft.report.cost import rank_correlation
    from autopeft.search.storage import load_records

    settings, records = load_records("os", f"sqlite:///{study_dir}/studies/os.db")
    assert main(["report", "--study", "os", "-o", str(study_dir / "r.html")]) == 0
    html = (study_dir / "r.html").read_text()
    assert "Supernet score against the finalists" in html
    tau, n = rank_correlation(records)
    assert n == sum(r.full_fidelity for r in records)
    assert "Kendall" in html and (f"{tau:+.2f} over {n} finalists" if tau is not None else "needs two") in html


def test_export_takes_the_best_finalist(study_dir) -> None:
    os.chdir(study_dir)
    assert main(["export", "--study", "os", "-o", str(study_dir / "best.yaml")]) == 0
    from autopeft.pareto import best_under_budget
    from autopeft.recipe import Recipe
    from autopeft.search.storage import load_records

    recipe = Recipe.load(study_dir / "best.yaml")
    settings, records = load_records("os", f"sqlite:///{study_dir}/studies/os.db")
    best = best_under_budget(records, settings.budget_limit)
    assert best is not None and best.supernet_score is not None  # a finalist, as every trial of the study
    assert recipe.plan.to_dict() == best.plan


def test_resume_of_a_finished_one_shot_study_trains_nothing_more(study_dir, capsys) -> None:
    os.chdir(study_dir)
    before = [(t.number, t.state) for t in _study(study_dir).get_trials()]
    flags = [f for f in SEARCH if f not in ("--candidates", "10")]  # the study keeps its own settings
    assert main([*flags, "--study", "os", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "supernet epoch" not in err
    assert [(t.number, t.state) for t in _study(study_dir).get_trials()] == before


def test_a_capped_one_shot_study_spends_at_most_its_cap(study_dir, tmp_path, capsys) -> None:
    """`--max-epochs 6`: the supernet's epoch and its scoring passes (10 candidates × 1/3 × 200/800 ≈ 0.8 epochs)
    take 2 epochs of the cap, the finalists the rest. What was spent is read from the study's own records — the
    supernet phase's epochs and distinct scored plans, each finalist's reported curve — not from the cap's count."""
    from autopeft.search.oneshot import FORWARD_SHARE

    os.chdir(tmp_path)
    assert main([*SEARCH, "--study", "capped", "--max-epochs", "6"]) == 0
    assert "at most 6 epochs in all" in capsys.readouterr().err
    study = optuna.load_study(study_name="capped", storage=f"sqlite:///{tmp_path}/studies/capped.db")
    phase = study.user_attrs["oneshot"]
    supernet = phase["supernet_epochs"] + phase["distinct"] * FORWARD_SHARE * 200 / 800  # digits: 800 / 200
    assert phase["cost_epochs"] == pytest.approx(supernet)
    trained = [len(t.user_attrs.get("curve", [])) for t in study.get_trials()]
    assert sum(trained) >= 2  # a finalist trained
    assert math.ceil(supernet) + sum(trained) <= 6, (supernet, trained)


def test_max_epochs_must_leave_room_for_the_scoring_passes(study_dir, tmp_path, capsys) -> None:
    """The pre-check counts the supernet's scoring passes: 2,000 candidates on digits' 200 val images cost more
    epochs than the supernet itself; refused in one line before anything exists."""
    from autopeft.search.oneshot import FORWARD_SHARE

    os.chdir(tmp_path)
    flags = [f for f in SEARCH if f not in ("--candidates", "10")]
    scoring = math.ceil(1 + 2000 * FORWARD_SHARE * 200 / 800) - 1  # digits: 800 train, 200 val images
    assert scoring > 1
    assert main([*flags, "--study", "capped", "--candidates", "2000", "--max-epochs", str(1 + 2 + scoring - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its scoring of 2000 candidates ({scoring} epochs' compute)" in err[0], err
    assert f"give at least {1 + scoring + 2}" in err[0] and not list(tmp_path.iterdir())
