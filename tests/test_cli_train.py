"""`autopeft train` as a user runs it: the embedded default (digits, bundled backbone) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from autopeft.backbones import DEFAULT_BACKBONE
from autopeft.data import data_config, load_dataset
from autopeft.plan import PeftPlan, load_adapter
from autopeft.train import build_model, evaluate


def autopeft(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AUTOPEFT_CACHE": str(cwd or ".") + "/.cache"}
    return subprocess.run([sys.executable, "-m", "autopeft", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)


def test_train_writes_every_artefact_and_they_reload(tmp_path) -> None:
    out = tmp_path / "run"
    proc = autopeft("train", "--dataset", "digits", "--method", "lora", "--set", "rank=4", "--epochs", "2",
                    "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "metrics.json", "plan.yaml", "recipe.yaml",
                                                     "train.log"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["backbone"] == DEFAULT_BACKBONE and metrics["dataset"] == "digits"
    assert 0 <= metrics["test_acc"] <= 1 and metrics["peft_params"] > 0
    # the adapter reloads into a fresh pretrained backbone and reproduces the recorded test accuracy exactly
    plan = PeftPlan.load(out / "plan.yaml")
    model, _ = build_model(DEFAULT_BACKBONE, plan, num_classes=10)
    load_adapter(model, out / "adapter.safetensors")
    data = load_dataset("digits", **data_config(DEFAULT_BACKBONE))
    _, acc = evaluate(model, data.test)
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dataset", "nodata", "--method", "lora"], "unknown dataset 'nodata'"),
        (["--dataset", "digits", "--method", "lora", "--epochs", "0"], "epochs must be >= 1"),
        (["--dataset", "digits", "--method", "vpt_deep", "--backbone", "autopeft_test_swin"], "does not support"),
        (["--dataset", "digits", "--method", "lora", "--backbone", "autopeft_test_vit"], "--weights"),
        (["--dataset", "digits", "--method", "lora", "--weights", "/nope.safetensors"], "does not exist"),
        (["--dataset", "digits", "--method", "lora", "--optimizer", "adam"],
         "optimizer 'adam' is not valid; use one of: adamw, sgd"),
        (["--dataset", "digits", "--method", "lora", "--scheduler", "step"],
         "scheduler 'step' is not valid; use one of: cosine, constant"),
    ],
)
def test_train_errors_leave_nothing(tmp_path, args, needle) -> None:
    proc = autopeft("train", *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()


def test_existing_out_dir_is_refused(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    proc = autopeft("train", "--dataset", "digits", "--method", "linear", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_bundled_backbone_transfers_to_digits(tmp_path) -> None:
    """LoRA and a linear probe on the pretrained bundled backbone learn digits clearly above chance (10 %)."""
    from autopeft.methods import make_spec
    from autopeft.train import TrainConfig, train

    torch.manual_seed(0)
    data = load_dataset("digits", **data_config(DEFAULT_BACKBONE))
    cfg = TrainConfig(epochs=5, lr=3e-3, cache_dir=str(tmp_path))
    linear = train(DEFAULT_BACKBONE, PeftPlan.single(make_spec("linear"), []), data, cfg, test=True)
    lora = train(DEFAULT_BACKBONE, PeftPlan.single(make_spec("lora", {"rank": 4}), range(6)), data, cfg, test=True)
    assert linear.test_acc > 0.5 and lora.test_acc > 0.6, (linear.test_acc, lora.test_acc)


def test_final_protocol_run_reruns_identically_from_its_recipe(tmp_path, monkeypatch) -> None:
    """--final trains on train_full without a val curve; the run's recipe.yaml re-runs it to the same accuracy."""
    from safetensors.torch import save_file

    from autopeft.backbones import create_backbone
    from autopeft.cli import main
    from autopeft.recipe import Recipe

    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(tmp_path / "w.safetensors"))
    assert main(["train", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights",
                 str(tmp_path / "w.safetensors"), "--method", "lora", "--epochs", "1", "--batch-size", "200",
                 "--final", "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert first["protocol"] == "final" and first["val_acc"] is None and "val_acc" not in first["history"][0]
    recipe = Recipe.load(tmp_path / "a" / "recipe.yaml")
    assert recipe.protocol == "final" and recipe.training["batch_size"] == 200 and recipe.num_classes == 10
    assert main(["train", "--config", str(tmp_path / "a" / "recipe.yaml"), "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["test_acc"] == first["test_acc"] and again["peft_params"] == first["peft_params"]


def _parse(*argv: str):
    import argparse

    from autopeft.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_flag_defaults_are_train_configs() -> None:
    """Without --config every flagged training key takes TrainConfig's default, --optimizer/--scheduler included."""
    from autopeft.cli.train import TRAINING_FLAGS, recipe_from_args
    from autopeft.train import TRAINING_KEYS, TrainConfig

    assert set(TRAINING_FLAGS) <= set(TRAINING_KEYS)
    defaults = TrainConfig.defaults()
    recipe = recipe_from_args(_parse("--dataset", "digits", "--method", "lora"))
    assert recipe.training == {k: defaults[k] for k in TRAINING_FLAGS}
    assert recipe.epochs == defaults["epochs"] and recipe.seed == defaults["seed"]
    cfg = recipe_from_args(_parse("--dataset", "digits", "--method", "lora", "--optimizer", "sgd", "--scheduler",
                                  "constant", "--augment")).train_config()
    assert (cfg.optimizer, cfg.scheduler, cfg.augment) == ("sgd", "constant", True)


def test_flags_override_a_recipe_and_epochs_rescale_its_warmup(tmp_path) -> None:
    from autopeft.cli.train import recipe_from_args
    from autopeft.methods import make_spec
    from autopeft.recipe import Recipe

    Recipe(backbone="autopeft_test_vit", dataset="digits", epochs=100, plan=PeftPlan.single(make_spec("bitfit"), []),
           training={"warmup_epochs": 10, "optimizer": "sgd"}).save(tmp_path / "r.yaml")
    recipe = recipe_from_args(_parse("--config", str(tmp_path / "r.yaml"), "--epochs", "10", "--scheduler",
                                     "constant"))
    assert recipe.training == {"optimizer": "sgd", "scheduler": "constant", "warmup_epochs": 1.0}


def test_help_shows_train_configs_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("batch size (default 32)", "peak learning rate, or auto (default: auto,",
                   "multiplies the peak rate, given or auto (default 1)", "linear warm-up epochs (default 1)",
                   "label smoothing (default 0)", "adamw or sgd (default adamw; sgd: momentum 0.9, no Nesterov)",
                   "cosine or constant (default cosine; constant stays at the peak lr)", "epochs (default 10;"):
        assert needle in text, needle
