"""StudySettings: one typed, versioned record of what a study stores, read the same way by results, export, report.

tests/fixtures/study_v0.sql is the SQL dump (sqlite3 `iterdump`) of the database that `autopeft search --dataset
digits --budget 2% --trials 4 --epochs 2 --study v0` wrote with the code of 2026-11-30 (study format 1: a flat mapping
without a format number or block count); kept as text because study databases are not tracked. It must keep loading.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import optuna
import pytest
import yaml

import autopeft.bundled  # noqa: F401  (registers the bundled backbone the fixture study used)
from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.cli import main
from autopeft.errors import AutopeftError
from autopeft.search import storage as st
from autopeft.search.settings import SearchSettings
from autopeft.search.study_settings import STUDY_FORMAT, StudySettings

FIXTURE = Path(__file__).parent / "fixtures" / "study_v0.sql"


@pytest.fixture()
def v0(tmp_path: Path) -> str:
    """The format-1 study database, rebuilt from its dump."""
    path = tmp_path / "v0.db"
    with sqlite3.connect(path) as con:
        con.executescript(FIXTURE.read_text())
    con.close()
    return f"sqlite:///{path}"


def test_a_format_1_study_loads_with_its_stored_facts(v0: str) -> None:
    settings, records = st.load_records("v0", v0)
    assert settings.version == 1 and settings.study == "v0"
    assert settings.search.dataset == "digits" and settings.search.backbone == "autopeft_tiny_vit"
    assert settings.budget_limit == 9198 and settings.backbone_params == 459936 and settings.num_classes == 10
    assert settings.num_blocks == backbone_spec("autopeft_tiny_vit").num_blocks  # derived: format 1 lacks it
    assert settings.metrics == ["val_acc", "peft_params"]
    assert len(records) == 4 and all(r.peft_plan.count(backbone_spec("autopeft_tiny_vit")) == r.peft_params
                                     for r in records)


def test_results_export_and_report_read_a_format_1_study(v0: str, tmp_path: Path, capsys) -> None:
    assert main(["results", "--study", "v0", "--storage", v0, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["trial"] for r in rows] == [0, 1, 2, 3] and any(r["best"] for r in rows)
    out = tmp_path / "best.yaml"
    assert main(["export", "--study", "v0", "--storage", v0, "-o", str(out)]) == 0
    recipe = yaml.safe_load(out.read_text())
    assert recipe["backbone"] == "autopeft_tiny_vit" and recipe["provenance"]["budget_limit"] == 9198
    page = tmp_path / "v0.html"
    assert main(["report", "--study", "v0", "--storage", v0, "-o", str(page)]) == 0
    assert "autopeft_tiny_vit" in page.read_text()


def test_new_studies_store_format_2_and_read_back_equal() -> None:
    spec = backbone_spec("autopeft_test_vit")
    search = SearchSettings(study="s", dataset="digits", backbone="autopeft_test_vit", budget="5%", trials=3)
    written = StudySettings.of(search, spec, parse_budget("5%", spec), num_classes=10)
    stored = written.to_stored()
    assert stored["format"] == STUDY_FORMAT and stored["num_blocks"] == spec.num_blocks
    assert not {"storage", "resume", "address", "warm_storage"} & set(stored)  # a URL may hold a password
    json.dumps(stored)  # JSON types only: Optuna keeps user attributes as JSON
    assert StudySettings.from_stored(stored, "s") == written


def test_missing_facts_of_a_format_1_mapping_are_derived_from_the_backbone() -> None:
    spec = backbone_spec("autopeft_test_vit")
    got = StudySettings.from_stored({"dataset": "digits", "backbone": "autopeft_test_vit", "budget": "5%"}, "old")
    assert got.budget_limit == parse_budget("5%", spec).limit and got.backbone_params == spec.backbone_params
    assert got.num_blocks == spec.num_blocks and got.num_classes is None and got.study == "old"


@pytest.mark.parametrize("data, words", [
    ({}, "holds no autopeft search settings"),
    ({"dataset": "digits", "backbone": "autopeft_test_vit", "format": 99}, "newer autopeft"),
    ({"dataset": "digits", "backbone": "autopeft_test_vit", "budget": "5%", "sampler": "nope"}, "not readable"),
])
def test_unreadable_settings_are_one_clear_error(data: dict, words: str) -> None:
    with pytest.raises(AutopeftError, match=words):
        StudySettings.from_stored(data, "x")


def test_the_cli_names_a_study_without_settings(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path}/plain.db"
    optuna.create_study(study_name="plain", storage=st.open_storage(url))
    assert main(["results", "--study", "plain", "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no autopeft search settings" in err[0]
