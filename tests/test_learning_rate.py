"""Learning rates that fit the run: each method's declared range, a plan's rate, the run factor, `auto` end to end
(per-method groups and their schedule: tests/test_rates.py)."""

from __future__ import annotations

import math

import pytest
import yaml

from autopeft.backbones import backbone_spec
from autopeft.data import data_config, load_dataset
from autopeft.errors import AutopeftError
from autopeft.learning_rate import (
    HEAD,
    LENGTH_EXPONENT,
    REFERENCE_STEPS,
    REFERENCE_WIDTH,
    WIDTH_EXPONENT,
    centre,
    peak_rates,
    plan_lr,
    run_factor,
)
from autopeft.methods import get_method, make_spec
from autopeft.methods.base import _REGISTRY
from autopeft.plan import PeftPlan
from autopeft.recipe import Recipe
from autopeft.train import TrainConfig, train
from autopeft.train_config import check_training, total_steps

TINY = "autopeft_test_vit"


def peak_lr(config, plan, spec, train_size) -> float:
    """A run's reported rate: the largest of its groups' (autopeft.train's `Run.lr`)."""
    return max(peak_rates(config, plan, spec, train_size).values())


def test_every_method_declares_a_range_a_decade_wide() -> None:
    for name, cls in _REGISTRY.items():
        low, high = cls.lr_range
        assert 0 < low < high and high / low == pytest.approx(10, rel=1e-9), name
    # what PETL_Vision's tuning says about them: a linear head and shallow prompts take larger rates than LoRA
    assert centre(get_method("linear").lr_range) > centre(get_method("vpt_deep").lr_range) > centre(
        get_method("lora").lr_range) > centre(get_method("full").lr_range)


def test_a_plans_one_rate_is_its_parts_centres_weighted_by_their_counts() -> None:
    """`plan_lr`: the one rate a plan trained at before per-method rates (the supernet's per-step factor now)."""
    spec = backbone_spec(TINY)
    lora, vpt = make_spec("lora", {"rank": 2}), make_spec("vpt_deep", {"length": 4})
    assert plan_lr(PeftPlan.single(lora, [0, 1]), spec) == pytest.approx(centre(lora.lr_range))
    linear = centre(get_method("linear").lr_range)
    assert plan_lr(PeftPlan.single(make_spec("linear"), []), spec) == pytest.approx(linear)
    mixed = PeftPlan(blocks={0: (lora,), 1: (vpt,)})
    a, b = lora.count(spec, [0]), vpt.count(spec, [1])
    expected = math.exp((a * math.log(centre(lora.lr_range)) + b * math.log(centre(vpt.lr_range))) / (a + b))
    assert plan_lr(mixed, spec) == pytest.approx(expected)
    assert centre(lora.lr_range) < plan_lr(mixed, spec) < centre(vpt.lr_range)


def test_the_run_factor_is_one_on_the_reference_run_and_follows_steps_and_width() -> None:
    assert run_factor(REFERENCE_STEPS, REFERENCE_WIDTH) == pytest.approx(1.0)
    assert run_factor(REFERENCE_STEPS / 4, REFERENCE_WIDTH) == pytest.approx(4 ** LENGTH_EXPONENT)
    assert run_factor(REFERENCE_STEPS, REFERENCE_WIDTH // 8) == pytest.approx(8 ** WIDTH_EXPONENT)
    with pytest.raises(ValueError):
        run_factor(0, 768)


def test_peak_lr_takes_a_given_rate_or_derives_one_and_scales_both() -> None:
    """The reported rate is the largest group's: a LoRA plan's is LoRA's, its head's too (the plan's rate)."""
    spec = backbone_spec(TINY)
    plan = PeftPlan.single(make_spec("lora"), [0, 1, 2])
    steps = total_steps(800, 32, 3)
    assert peak_lr(TrainConfig(epochs=3, lr=2e-3), plan, spec, 800) == pytest.approx(2e-3)
    assert peak_lr(TrainConfig(epochs=3, lr=2e-3, lr_scale=0.5), plan, spec, 800) == pytest.approx(1e-3)
    auto = peak_lr(TrainConfig(epochs=3), plan, spec, 800)
    factor = run_factor(steps, spec.head_in_features)
    assert auto == pytest.approx(centre(get_method("lora").lr_range) * factor)
    assert peak_rates(TrainConfig(epochs=3), plan, spec, 800) == pytest.approx({"lora": auto, HEAD: auto})
    assert peak_lr(TrainConfig(epochs=3, lr_scale=2.0), plan, spec, 800) == pytest.approx(2 * auto)
    # a longer run (more epochs, or more images) trains at a lower rate
    assert peak_lr(TrainConfig(epochs=12), plan, spec, 800) == pytest.approx(auto / 2 ** (2 * LENGTH_EXPONENT))
    assert peak_lr(TrainConfig(epochs=3), plan, spec, 3200) < auto


def test_lr_auto_is_a_training_value_and_a_bad_scale_is_refused() -> None:
    assert check_training({"lr": "auto", "lr_scale": "2"}) == {"lr": None, "lr_scale": 2.0}
    assert check_training({"lr": None}) == {"lr": None}
    with pytest.raises(AutopeftError, match="lr_scale must be > 0"):
        TrainConfig(lr_scale=0)
    with pytest.raises(AutopeftError, match="training key 'lr' must be float"):
        check_training({"lr": "fast"})


def test_a_recipe_writes_auto_and_reads_it_back(tmp_path) -> None:
    recipe = Recipe(backbone=TINY, dataset="digits", plan=PeftPlan.single(make_spec("lora"), [0]), epochs=3,
                    training={"lr": None, "lr_scale": 1.5})
    recipe.save(tmp_path / "r.yaml")
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["training"]["lr"] == "auto"
    config = Recipe.load(tmp_path / "r.yaml").train_config()
    assert config.lr is None and config.lr_scale == 1.5


def test_training_runs_at_the_derived_peak(tmp_path) -> None:
    """`auto` reaches the optimiser: the run's recorded peak is the largest derived rate (LoRA's and the head's),
    and the schedule's lr after the warm-up epoch is at that peak (cosine from there)."""
    data = load_dataset("digits", **data_config(TINY))
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), [1, 2])
    config = TrainConfig(epochs=2, batch_size=64, warmup_epochs=1, lr_scale=0.5, cache_dir=str(tmp_path))
    result = train(TINY, plan, data, config, pretrained=False)
    expected = 0.5 * centre(get_method("lora").lr_range) * run_factor(total_steps(len(data.train), 64, 2),
                                                                      backbone_spec(TINY).head_in_features)
    assert result.lr == pytest.approx(expected) and result.rates[HEAD] == pytest.approx(expected)
    assert result.history[0]["lr"] == pytest.approx(expected, rel=1e-3)  # end of the warm-up: the peak
    given = train(TINY, plan, data, TrainConfig(epochs=1, lr=3e-3, cache_dir=str(tmp_path)), pretrained=False)
    assert given.lr == pytest.approx(3e-3) and list(given.rates.values()) == pytest.approx([3e-3] * 2)
