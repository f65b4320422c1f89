"""Recipe: YAML round trip, validation errors that name the file and the key, schedule scaling."""

from __future__ import annotations

import pytest
import yaml

from autopeft.backbones import backbone_spec
from autopeft.errors import AutopeftError
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.recipe import Recipe

PLAN = PeftPlan.single(make_spec("lora", {"rank": 2}), range(3))


def recipe(**changes) -> Recipe:
    base = dict(backbone="autopeft_test_vit", dataset="digits", plan=PLAN, epochs=100, num_classes=10,
                training={"lr": 3e-3, "warmup_epochs": 10, "batch_size": 64, "label_smoothing": 0.1},
                provenance={"study": "s", "trial": 3, "val_acc": 0.9, "curve": (0.5, 0.9)})
    return Recipe(**{**base, **changes})


def test_round_trip_is_sorted_versioned_yaml(tmp_path) -> None:
    r = recipe()
    r.save(tmp_path / "r.yaml")
    text = (tmp_path / "r.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["version"] == 1 and list(data) == sorted(data)
    back = Recipe.load(tmp_path / "r.yaml")
    assert back == r.replace(provenance={**r.provenance, "curve": [0.5, 0.9]})
    assert back.plan == PLAN and back.check() == PLAN.count(backbone_spec("autopeft_test_vit"))
    assert back.train_config().warmup_epochs == 10.0 and back.splits == ("train_full", None)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_with_epochs_keeps_the_warmup_share() -> None:
    short = recipe().with_epochs(10)
    assert short.epochs == 10 and short.training["warmup_epochs"] == pytest.approx(1.0)
    assert short.with_epochs(10) == short


def test_optimizer_and_scheduler_round_trip_into_the_train_config(tmp_path) -> None:
    r = recipe(training={"lr": 3e-3, "optimizer": "sgd", "scheduler": "constant", "augment": True})
    r.save(tmp_path / "r.yaml")
    back = Recipe.load(tmp_path / "r.yaml")
    cfg = back.train_config()
    assert (cfg.optimizer, cfg.scheduler, cfg.augment, back.augment) == ("sgd", "constant", True, True)
    assert recipe().train_config().optimizer == "adamw" and not recipe().augment  # TrainConfig's defaults


def test_an_unknown_training_key_is_an_unknown_key_naming_the_file(tmp_path) -> None:
    from autopeft.errors import UnknownKey
    from autopeft.recipe import TRAINING_KEYS

    data = recipe().to_dict()
    data["training"]["optimizr"] = "sgd"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(UnknownKey) as err:
        Recipe.load(tmp_path / "r.yaml")
    assert str(err.value) == (f"{tmp_path / 'r.yaml'}: unknown training key(s) optimizr; valid keys: "
                              f"{', '.join(TRAINING_KEYS)}")


def test_relative_paths_are_read_from_the_recipe_folder(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    data = recipe().to_dict()
    data["weights"], data["data_root"] = "w.safetensors", "../data"
    (tmp_path / "sub" / "r.yaml").write_text(yaml.safe_dump(data))
    r = Recipe.load(tmp_path / "sub" / "r.yaml")
    assert r.weights == str(tmp_path / "sub" / "w.safetensors")
    assert r.data_root == str(tmp_path / "sub" / ".." / "data")


def _set(data: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        data = data[k]
    if value is KeyError:
        del data[keys[-1]]
    else:
        data[keys[-1]] = value


@pytest.mark.parametrize(
    "path,value,needle",
    [
        ("colour", "blue", "unknown key(s) colour"),
        ("budget", "2%", "study recipe"),
        ("version", 2, "key 'version' is 2"),
        ("plan", KeyError, "missing key(s) plan"),
        ("epochs", 0, "epochs must be >= 1"),
        ("protocol", "test", "protocol 'test'"),
        ("training.momentum", 0.9, "unknown training key(s) momentum"),
        ("training.lr", "fast", "training key 'lr' must be float"),
        ("training.batch_size", 6.5, "training key 'batch_size' must be int"),
        ("training.optimizer", "adam", "optimizer 'adam' is not valid; use one of: adamw, sgd"),
        ("training.scheduler", "linear", "scheduler 'linear' is not valid; use one of: cosine, constant"),
        ("training.optimizer", 1, "training key 'optimizer' must be str"),
        ("plan.blocks", {"5": [{"method": "lora"}]}, "block(s) [5]"),
        ("backbone", "no_such_net", "unknown backbone"),
        ("training", [1], "key 'training' must be a mapping"),
    ],
)
def test_bad_recipes_name_the_file_and_the_key(tmp_path, path, value, needle) -> None:
    data = recipe().to_dict()
    _set(data, path, value)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(AutopeftError) as err:
        Recipe.load(tmp_path / "r.yaml")
    assert needle in str(err.value) and str(tmp_path / "r.yaml") in str(err.value), str(err.value)


def test_yaml_strings_for_numbers_are_read_as_numbers(tmp_path) -> None:
    data = recipe().to_dict()
    data["training"]["lr"] = "1e-3"  # PyYAML reads 1e-3 (no dot) as a string
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert Recipe.load(tmp_path / "r.yaml").train_config().lr == pytest.approx(1e-3)


def test_not_a_recipe(tmp_path) -> None:
    (tmp_path / "r.yaml").write_text("- just\n- a list\n")
    with pytest.raises(AutopeftError, match="must be a mapping"):
        Recipe.load(tmp_path / "r.yaml")
    with pytest.raises(AutopeftError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")
