"""`--resume` continues the study it was created as: a setting that defines the study given with another value is
refused in one line before anything is written; the settings that may change hold from the next trial on and are
kept with the trial number they hold from, so a later plain `--resume` keeps them."""

from __future__ import annotations

import optuna
import pytest

from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.cli import main
from autopeft.errors import AutopeftError
from autopeft.search import SearchSettings, prepare, settings_from
from autopeft.search import storage as st
from autopeft.search.engine import create_or_resume
from autopeft.search.study_settings import StudySettings, resumed

CREATED = dict(study="s", dataset="digits", budget="1%", epochs=3, trials=4, max_epochs=9, seed=1, space="lora")


def _stored(**over) -> StudySettings:
    search = SearchSettings(**{**CREATED, **over})
    spec = backbone_spec(search.backbone)
    return StudySettings.of(search, spec, parse_budget(search.budget, spec), 10)


def _create(tmp_path, **over) -> str:
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize"])
    st.write_settings(study, _stored(**over))
    return url


def test_a_plain_resume_runs_with_the_stored_settings() -> None:
    settings, changes = resumed(settings_from(None, {"study": "s", "resume": True}), _stored())
    assert changes == {}
    for name, value in CREATED.items():
        assert getattr(settings, name) == value, name


def test_settings_that_may_change_are_taken_and_reported() -> None:
    given = settings_from(None, {"study": "s", "resume": True, "max_epochs": 12, "trials": 6, "concurrency": 3,
                                 "max_retries": 5, "epochs": 3})
    settings, changes = resumed(given, _stored())
    assert (settings.max_epochs, settings.trials, settings.concurrency, settings.max_retries) == (12, 6, 3, 5)
    assert changes == {"max_epochs": 12, "trials": 6, "concurrency": 3, "max_retries": 5}  # epochs 3: no change


def test_defining_settings_given_otherwise_are_refused_each_named() -> None:
    given = settings_from(None, {"study": "s", "resume": True, "budget": "2%", "epochs": 5, "space": "unified",
                                 "trials": 8})
    with pytest.raises(AutopeftError) as err:
        resumed(given, _stored())
    text = str(err.value)
    for part in ("--budget 1% (given: 2%)", "--epochs 3 (given: 5)", "--space lora (given: unified)"):
        assert part in text, text
    assert "--trials" not in text and "\n" not in text


def test_through_the_command_line_a_mismatch_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    url = _create(tmp_path)
    before = optuna.load_study(study_name="s", storage=url).user_attrs
    code = main(["search", "--study", "s", "--storage", url, "--resume", "--dataset", "digits", "--seed", "2",
                 "--max-epochs", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seed 1 (given: 2)" in err[0], err
    study = optuna.load_study(study_name="s", storage=url)
    assert study.user_attrs == before and not study.get_trials()


def test_a_change_is_stored_with_its_first_trial_and_kept_by_a_later_plain_resume(tmp_path) -> None:
    url = _create(tmp_path)
    study = optuna.load_study(study_name="s", storage=url)
    study.enqueue_trial({})
    prep = prepare(settings_from(None, {"study": "s", "storage": url, "resume": True, "max_epochs": 15}))
    assert prep.settings.max_epochs == 15 and prep.settings.budget == "1%"
    study, _ = create_or_resume(prep)
    assert st.settings_changes(study) == [{"from_trial": 1, "max_epochs": 15}]
    again = prepare(settings_from(None, {"study": "s", "storage": url, "resume": True}))
    assert again.settings.max_epochs == 15 and again.changes == {}


def test_a_relative_folder_is_the_stored_absolute_one(tmp_path, monkeypatch) -> None:
    from data_fixtures import write_image_folder

    from autopeft.data.base import dataset_name

    folder = write_image_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    stored = _stored(dataset=dataset_name(str(folder), None))
    monkeypatch.chdir(tmp_path)
    given = settings_from(None, {"study": "s", "resume": True, "dataset": "imgs"})
    given.dataset = dataset_name(given.dataset, None)  # as prepare() names it
    settings, _ = resumed(given, stored)
    assert settings.dataset == stored.search.dataset


def test_oneshot_defaults_to_its_own_space() -> None:
    s = settings_from(None, {"strategy": "oneshot"})
    assert s.space == "oneshot" and s.defaulted("space")
    assert settings_from(None, {"strategy": "oneshot", "space": "noah"}).space.endswith("noah")
    assert SearchSettings().space == "unified"
