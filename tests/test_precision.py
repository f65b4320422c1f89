"""One precision per run ([N] part 3): the cached prefix, training, evaluation, `evaluate` and `predict` compute at
the run's precision; bf16 runs on the CPU through torch's autocast, so these checks run here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autopeft.cli import main
from autopeft.data import data_config, load_dataset
from autopeft.deploy import evaluate_run, predict
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.runs import load_run
from autopeft.train import TrainConfig, resolve_precision, train
from autopeft.train_config import PRECISIONS

TINY = "autopeft_test_vit"  # 3 blocks, random weights


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", **data_config(TINY))


def test_auto_is_fp32_on_the_cpu_and_a_given_precision_stays() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    for p in PRECISIONS[1:]:
        assert resolve_precision(p, cpu) == p


def test_an_unknown_precision_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse's choices
        main(["train", "--dataset", "digits", "--method", "lora", "--precision", "fp8"])
    assert exc.value.code == 2
    from autopeft.errors import AutopeftError

    with pytest.raises(AutopeftError, match="precision 'fp8' is not valid"):
        TrainConfig(precision="fp8")


def _curve(data, plan, tmp_path, precision, cache):
    cfg = TrainConfig(epochs=2, lr=3e-3, batch_size=64, cache_dir=str(tmp_path / "cache"), precision=precision,
                      feature_cache=cache)
    return train(TINY, plan, data, cfg, pretrained=False, test=True)


def test_bf16_cached_and_uncached_train_alike(digits, tmp_path) -> None:
    """The cached prefix computes under the run's autocast: block 1 sees what the uncached bf16 model feeds it."""
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), [1, 2])
    plain = _curve(digits, plan, tmp_path, "bf16", cache=False)
    cached = _curve(digits, plan, tmp_path, "bf16", cache=True)
    fp32 = _curve(digits, plan, tmp_path, "fp32", cache=True)
    assert plain.precision == cached.precision == "bf16" and fp32.precision == "fp32"
    assert plain.cached_blocks == 0 and cached.cached_blocks == 1
    for a, b in zip(plain.history, cached.history, strict=True):
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=0.02)  # bf16: ~3 significant digits
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)
    # the cache is keyed by precision: the fp32 run computed its own features, not the bf16 ones
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) >= 2 * 2


@pytest.mark.parametrize("method,cached", [("linear", True), ("vpt_shallow", False)])
def test_evaluate_reproduces_a_bf16_run_exactly(tmp_path, method, cached) -> None:
    out = tmp_path / method
    assert main(["train", "--dataset", "digits", "--method", method, "--epochs", "1", "--precision", "bf16",
                 "--out", str(out)]) == 0
    run = load_run(out)
    assert run.metrics["precision"] == "bf16" and run.recipe.training["precision"] == "bf16"
    assert (run.metrics["cached_blocks"] > 0) == cached
    result = evaluate_run(run)
    assert result["precision"] == "bf16" and result["acc"] == run.metrics["test_acc"]
    # computed at fp32 instead, the same weights give other logits: the recorded precision is what reproduces
    as_fp32 = dataclasses.replace(run, metrics=dict(run.metrics, precision="fp32"))
    assert evaluate_run(as_fp32)["loss"] != result["loss"]


def test_predict_computes_at_the_runs_precision(tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--method", "lora", "--epochs", "1", "--precision", "bf16",
                 "--out", str(out)]) == 0
    image = tmp_path / "x.png"
    Image.new("L", (8, 8), 128).save(image)
    run = load_run(out)
    top = predict(run, [image], top_k=3)[0]["top"]
    probs = [t["prob"] for t in top]  # computed under bf16 autocast without a dtype clash
    assert len(top) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
