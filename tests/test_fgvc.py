"""FGVC readers (cub200, nabirds, stanford_dogs, stanford_cars) on fixture trees in their official layouts, and the
recipe `autopeft search --dataset NAME` resolves to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from data_fixtures import (
    check_items,
    guard_offline,
    labels_of,
    write_cars,
    write_cub,
    write_dogs,
    write_nabirds,
    write_vpt_json,
)

from autopeft.data import dataset_info, list_datasets, load_dataset
from autopeft.data.fgvc import VAL_FRACTION
from autopeft.data.recipes import PACKAGE_STUDIES, REAL_IMAGE_BACKBONE, choose_recipe
from autopeft.defaults import BUNDLED_BACKBONE
from autopeft.errors import AutopeftError
from autopeft.search.settings import load_recipe, settings_from

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(input_size=(3, 24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
WRITERS = {"cub200": write_cub, "nabirds": write_nabirds, "stanford_dogs": write_dogs, "stanford_cars": write_cars}
NAMES = {
    "cub200": ["Bird_1", "Bird_2", "Bird_3"],  # classes.txt's "001.Bird_1" without the id
    "nabirds": ["Species 295 (Adult)", "Species 313 (Adult)", "Species 1010 (Adult)"],  # ids in numeric order
    "stanford_dogs": ["Chihuahua", "Japanese_spaniel", "standard_poodle"],  # Images/ folders without WordNet ids
    "stanford_cars": ["Make 1 Model 1 2012", "Make 2 Model 2 2012", "Make 3 Model 3 2012"],  # cars_meta.mat
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    guard_offline(monkeypatch, tmp_path)


def paths(dataset) -> set[str]:
    return {p for p, _ in dataset.samples}


# --- readers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WRITERS))
def test_official_test_and_a_stratified_tenth_of_train_as_val(tmp_path, name) -> None:
    folder = WRITERS[name](tmp_path)  # 3 classes; 10 train images each
    splits = load_dataset(name, tmp_path, **SMALL)
    test_size = 9 if name == "nabirds" else 6
    assert splits.num_classes == 3 and splits.class_names == NAMES[name]
    assert splits.sizes() == {"train": 27, "val": 3, "test": test_size, "train_full": 30}
    assert round(VAL_FRACTION * 30) == 3
    assert sorted(labels_of(splits.val)) == [0, 1, 2]  # stratified: one of each class's ten
    assert paths(splits.train).isdisjoint(paths(splits.val))
    assert paths(splits.train_full) == paths(splits.train) | paths(splits.val)
    assert paths(splits.test).isdisjoint(paths(splits.train_full))
    for split in ("train", "val", "test", "train_full"):
        assert set(labels_of(splits.split(split))) <= {0, 1, 2}
        assert all(Path(p).is_file() and Path(p).is_relative_to(folder) for p in paths(splits.split(split)))
    check_items(splits, (3, 24, 24))
    # seeded: the same seed draws the same val, and ROOT may be the dataset's folder itself
    assert paths(load_dataset(name, folder, **SMALL).val) == paths(splits.val)
    others = [paths(load_dataset(name, tmp_path, seed=s, **SMALL).val) for s in range(1, 6)]
    assert any(o != paths(splits.val) for o in others)


def test_nabirds_maps_sparse_ids_in_numeric_order(tmp_path) -> None:
    write_nabirds(tmp_path, used=(1010, 295, 313))  # images.txt lists class 1010 first; "1010" < "295" as text
    splits = load_dataset("nabirds", tmp_path, **SMALL)
    assert splits.class_names == NAMES["nabirds"]
    by_folder = {Path(p).parent.name: y for p, y in splits.test.samples}
    assert by_folder == {"0295": 0, "0313": 1, "1010": 2}


def test_dogs_lists_beside_images_and_cars_test_labels_in_devkit(tmp_path) -> None:
    write_dogs(tmp_path, lists=".")  # lists.tar unpacked next to Images/
    assert load_dataset("stanford_dogs", tmp_path, **SMALL).sizes()["test"] == 6
    folder = write_cars(tmp_path)
    (folder / "cars_test_annos_withlabels.mat").rename(folder / "devkit" / "cars_test_annos_withlabels.mat")
    assert load_dataset("stanford_cars", tmp_path, **SMALL).class_names == NAMES["stanford_cars"]


@pytest.mark.parametrize("name", list(WRITERS))
def test_vpt_split_files_replace_the_drawn_split(tmp_path, name) -> None:
    folder = WRITERS[name](tmp_path)
    drawn = load_dataset(name, tmp_path, **SMALL)
    image_dir = {"cub200": "images", "nabirds": "images", "stanford_dogs": "Images", "stanford_cars": "."}[name]
    rel = {split: {os.path.relpath(p, folder / image_dir): y + 7 for p, y in drawn.split(split).samples}
           for split in ("train", "val", "test")}  # VPT's labels: any increasing ids
    moved = next(iter(rel["train"]))
    rel["val"][moved] = rel["train"].pop(moved)  # VPT's val is not the one we draw
    write_vpt_json(folder, rel)
    vpt = load_dataset(name, tmp_path, **SMALL)
    assert vpt.sizes() == {**drawn.sizes(), "train": 26, "val": 4}
    assert str((folder / image_dir / moved).resolve()) in {str(Path(p).resolve()) for p in paths(vpt.val)}
    assert labels_of(vpt.test) == labels_of(drawn.test) and vpt.class_names == drawn.class_names
    assert vpt.fingerprint != drawn.fingerprint  # caches keyed on it must not mix the two splits up


def test_vpt_split_files_with_another_class_count_are_refused(tmp_path) -> None:
    folder = write_cub(tmp_path)
    write_vpt_json(folder, {"train": {"0001/00001.png": 0}, "val": {"0001/00002.png": 0},
                            "test": {"0002/00013.png": 1}})
    with pytest.raises(AutopeftError, match="hold 2 classes, CUB-200-2011 has 3"):
        load_dataset("cub200", tmp_path, **SMALL)


MISSING = [
    ("cub200", "CUB_200_2011/train_test_split.txt", "CUB_200_2011.tgz"),
    ("cub200", "CUB_200_2011/images", "CUB_200_2011.tgz"),
    ("nabirds", "nabirds/classes.txt", "nabirds.tar.gz"),
    ("stanford_dogs", "stanford_dogs/lists/test_list.mat", "lists.tar"),
    ("stanford_cars", "stanford_cars/devkit/cars_meta.mat", "car_devkit.tgz"),
    ("stanford_cars", "stanford_cars/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat"),
]


@pytest.mark.parametrize("name,rel,download", MISSING)
def test_a_missing_file_is_named_with_what_to_download(tmp_path, name, rel, download) -> None:
    import shutil

    WRITERS[name](tmp_path)
    target = tmp_path / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(AutopeftError) as err:
        load_dataset(name, tmp_path, **SMALL)
    message = str(err.value)
    assert f"{target} is missing" in message and download in message and "\n" not in message


@pytest.mark.parametrize("name", list(WRITERS))
def test_nothing_there_names_the_folder_expected(tmp_path, name) -> None:
    folder = {"cub200": "CUB_200_2011", "nabirds": "nabirds"}.get(name, name)
    with pytest.raises(AutopeftError, match=f"not found: {tmp_path / folder}/"):
        load_dataset(name, tmp_path)


def test_broken_annotations_say_which_file(tmp_path) -> None:
    folder = write_cub(tmp_path)
    (folder / "classes.txt").write_text("1 001.Bird_1\n2 002.Bird_2\n")
    with pytest.raises(AutopeftError, match="classes.txt lacks class 3"):
        load_dataset("cub200", tmp_path, **SMALL)
    folder = write_cub(tmp_path)
    (folder / "images" / "0002" / "00013.png").unlink()
    with pytest.raises(AutopeftError, match="1 CUB-200-2011 images listed in .*images.txt are missing"):
        load_dataset("cub200", tmp_path, **SMALL)
    (folder / "train_test_split.txt").write_text("1 maybe\n")
    with pytest.raises(AutopeftError, match="train_test_split.txt: image 1 is 'maybe', not 1 or 0"):
        load_dataset("cub200", tmp_path, **SMALL)
    (folder / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(AutopeftError, match="train_test_split.txt has no line for image 2 of images.txt"):
        load_dataset("cub200", tmp_path, **SMALL)
    (folder / "train_test_split.txt").write_text("1\n")
    with pytest.raises(AutopeftError, match="train_test_split.txt:1: expected '<id> <value>'"):
        load_dataset("cub200", tmp_path, **SMALL)
    import scipy.io

    cars = write_cars(tmp_path)
    scipy.io.savemat(cars / "devkit" / "cars_meta.mat", {"class_names": ["only one"]})
    with pytest.raises(AutopeftError, match="cars_train_annos.mat has labels outside 1-1"):
        load_dataset("stanford_cars", tmp_path, **SMALL)


def test_train_runs_on_a_cub_fixture_tree(tmp_path) -> None:
    write_cub(tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AUTOPEFT_OFFLINE": "1", "AUTOPEFT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "autopeft", "train", "--dataset", "cub200", "--data-root", str(tmp_path / "data"),
           "--backbone", BUNDLED_BACKBONE, "--method", "lora", "--set", "rank=2", "--epochs", "1", "--batch-size", "8",
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "cub200" and 0 <= metrics["test_acc"] <= 1
    assert [h["epoch"] for h in metrics["history"]] == [1]


# --- which recipe a search runs -----------------------------------------------------------------------------------


def test_search_flowers102_runs_the_flowers102_recipe(monkeypatch, capsys) -> None:
    """`autopeft search --dataset flowers102 --budget 0.5%`: the shipped recipe's backbone and fidelity, flags over
    it, and the first line names the recipe (the search itself is replaced: nothing runs or downloads)."""
    import autopeft.search
    from autopeft.cli import main

    class Ran(Exception):
        pass

    seen = []
    monkeypatch.setattr(autopeft.search, "search", lambda settings: seen.append(settings) or (_ for _ in ()).throw(Ran))
    monkeypatch.chdir(REPO)
    with pytest.raises(Ran):
        main(["search", "--dataset", "flowers102", "--budget", "0.5%"])
    recipe = yaml.safe_load((PACKAGE_STUDIES / "flowers102.yaml").read_text())
    (s,) = seen
    assert (s.backbone, s.epochs, s.grace_epochs, s.trials) == (
        "vit_base_patch16_224.augreg_in21k", recipe["epochs"], recipe["grace_epochs"], recipe["trials"])
    assert (s.study, s.dataset, s.budget, s.concurrency) == ("flowers102", "flowers102", "0.5%", recipe["concurrency"])
    assert capsys.readouterr().out.splitlines()[0] == (
        "recipe: studies/flowers102.yaml (shipped for flowers102; flags override it)")
    with pytest.raises(Ran):
        main(["search", "--dataset", "flowers102", "--epochs", "3", "--backbone", BUNDLED_BACKBONE])
    assert (seen[1].epochs, seen[1].backbone, seen[1].trials) == (3, BUNDLED_BACKBONE, recipe["trials"])


def test_outside_a_checkout_the_installed_recipe_is_used(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    choice = choose_recipe(None, "cub200")
    assert Path(choice.path) == PACKAGE_STUDIES / "fgvc-cub200.yaml" and str(PACKAGE_STUDIES) in choice.line
    s = settings_from(choice.path, {"dataset": "cub200", "budget": "0.5%"}, defaults=choice.defaults)
    assert (s.study, s.backbone, s.budget) == ("cub200", REAL_IMAGE_BACKBONE, "0.5%")


def test_a_vtab_task_runs_its_groups_recipe_under_its_own_study(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    choice = choose_recipe(None, "vtab1k/dtd")
    assert Path(choice.path).name == "vtab1k-natural.yaml"
    s = settings_from(choice.path, {"dataset": "vtab1k/dtd"}, defaults=choice.defaults)
    assert (s.study, s.dataset, s.backbone, s.trials) == ("vtab1k-dtd", "vtab1k/dtd", REAL_IMAGE_BACKBONE, 48)
    assert settings_from(choice.path, {"dataset": "vtab1k/cifar"}).study == "vtab1k-cifar"  # the recipe's own


def test_datasets_without_a_recipe_get_defaults_by_their_kind(tmp_path) -> None:
    small = choose_recipe(None, "digits")
    assert small.path is None
    assert settings_from(None, {"dataset": "digits"}, small.defaults).backbone == BUNDLED_BACKBONE
    assert BUNDLED_BACKBONE in small.line
    for dataset in (str(tmp_path), "imagefolder"):  # a folder of real images, never the 32-px backbone silently
        real = choose_recipe(None, dataset)
        s = settings_from(real.path, {"dataset": dataset}, real.defaults)
        assert real.path is None and s.backbone == REAL_IMAGE_BACKBONE and REAL_IMAGE_BACKBONE in real.line
    assert Path(choose_recipe(None, None).path).name == "digits.yaml"
    given = choose_recipe("my.yaml", "cub200")
    assert (given.path, given.defaults) == ("my.yaml", {}) and "my.yaml" in given.line


def test_every_declared_recipe_ships_and_names_its_dataset_or_group() -> None:
    declared = {n: dataset_info(n) for n in list_datasets()}
    for name, info in declared.items():
        assert not (info.recipe and info.small_images), name
        if info.recipe:
            data = load_recipe(PACKAGE_STUDIES / f"{info.recipe}.yaml")
            assert data["dataset"] == name or info.recipe.startswith("vtab1k-"), name
            assert data["backbone"] == REAL_IMAGE_BACKBONE, name
            link = REPO / "studies" / f"{info.recipe}.yaml"  # the repository's studies/ links to the package copy
            assert link.is_symlink() and link.resolve() == (PACKAGE_STUDIES / f"{info.recipe}.yaml").resolve()
    assert {n for n, i in declared.items() if i.recipe} >= {"flowers102", *WRITERS, "vtab1k/dtd"}
    assert {"digits", "fashion_mnist", "cifar10", "mnist5k", "fmnist_count"} <= {
        n for n, i in declared.items() if i.small_images}
