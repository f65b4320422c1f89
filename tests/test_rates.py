"""Per-method rates ([P] part 2): each method of a plan trains in its own optimiser groups at its own rate, the head
at the plan's, one schedule scales them all alike; a search trial that has diverged stops at once."""

from __future__ import annotations

import math

import pytest
import torch

from autopeft.backbones import backbone_spec, is_head_param
from autopeft.data import data_config, load_dataset
from autopeft.learning_rate import HEAD, centre, peak_rates, plan_lr, run_factor
from autopeft.methods import get_method, make_spec
from autopeft.optim import make_optimizer, make_scheduler, rate_groups
from autopeft.plan import PeftPlan
from autopeft.search import trainable
from autopeft.train import TrainConfig, build_model, train
from autopeft.train_config import total_steps

TINY = "autopeft_test_vit"
MIX = PeftPlan.from_dict({"version": 1, "blocks": {"0": [{"method": "lora", "rank": 2}, {"method": "bitfit"}],
                                                   "1": [{"method": "lora", "rank": 2}]}, "global": []})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", **data_config(TINY))


def _groups(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        assert out.setdefault(g["name"], g["lr"]) == g["lr"]  # a method's decayed and undecayed groups alike
    return out


def test_each_method_and_the_head_get_their_own_derived_rate() -> None:
    spec = backbone_spec(TINY)
    rates = peak_rates(TrainConfig(epochs=3, batch_size=64, lr_scale=0.5), MIX, spec, 800)
    factor = 0.5 * run_factor(total_steps(800, 64, 3), spec.head_in_features)
    assert rates == pytest.approx({"lora": centre(get_method("lora").lr_range) * factor,
                                   "bitfit": centre(get_method("bitfit").lr_range) * factor,
                                   HEAD: plan_lr(MIX, spec) * factor})
    assert rates["bitfit"] / rates["lora"] == pytest.approx(
        centre(get_method("bitfit").lr_range) / centre(get_method("lora").lr_range))
    assert rates["lora"] < rates[HEAD] < rates["bitfit"]  # the head at the plan's (weighted) rate
    # the linear probe: the head alone, at the linear method's rate
    probe = peak_rates(TrainConfig(epochs=3, batch_size=64), PeftPlan.single(make_spec("linear"), []), spec, 800)
    assert probe == pytest.approx({HEAD: centre(get_method("linear").lr_range) * factor / 0.5})


def test_a_given_lr_trains_every_group_at_it_times_lr_scale() -> None:
    rates = peak_rates(TrainConfig(epochs=3, lr=2e-3, lr_scale=0.5), MIX, backbone_spec(TINY), 800)
    assert set(rates) == {"lora", "bitfit", HEAD} and list(rates.values()) == pytest.approx([1e-3] * 3)


def test_every_trainable_parameter_is_in_its_methods_group() -> None:
    owners: dict[str, str] = {}
    model, spec = build_model(TINY, MIX, 10, pretrained=False, owners=owners)
    groups = rate_groups(model, owners, {"lora": 1.0, "bitfit": 2.0, HEAD: 3.0})
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in ps} for k, (ps, _) in groups.items()}
    assert set(by_group) == {"lora", "bitfit", HEAD}
    assert all(is_head_param(n) for n in by_group[HEAD]) and by_group[HEAD]
    assert all(n.endswith("bias") for n in by_group["bitfit"]) and all(".0." in n for n in by_group["bitfit"])
    assert by_group["lora"] and all("bias" not in n for n in by_group["lora"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_group.values()) == trainable
    assert sum(len(ps) for ps, _ in groups.values()) == len(trainable)
    assert {k: r for k, (_, r) in groups.items()} == {"lora": 1.0, "bitfit": 2.0, HEAD: 3.0}


def test_one_schedule_scales_every_group_alike() -> None:
    """Warm-up from 1 % of each group's peak, cosine to 1e-3 of it: every group's rate over its peak is the same
    factor at every step (timm's scheduler over two groups would start and end both at one absolute rate)."""
    config = TrainConfig(lr=None)
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer({"lora": ([a], 0.01), "bitfit": ([b], 0.05)}, config)
    scheduler = make_scheduler(optimizer, config, 20, 5)
    seen = []
    for step in range(21):
        if step:
            scheduler.step_update(step)
        rates = _groups(optimizer)
        assert rates["bitfit"] / rates["lora"] == pytest.approx(5.0)
        seen.append(rates["lora"] / 0.01)
    assert seen[0] == pytest.approx(1e-2) and seen[5] == pytest.approx(1.0) and seen[-1] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(seen[:5], seen[1:6], strict=True))
    assert all(x > y for x, y in zip(seen[5:-1], seen[6:], strict=True))


def test_a_run_trains_each_group_at_its_rate_and_reports_the_largest(digits, tmp_path, monkeypatch) -> None:
    import autopeft.train as train_module

    built: list[torch.optim.Optimizer] = []
    make = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer", lambda p, c: built.append(make(p, c)) or built[-1])
    config = TrainConfig(epochs=2, batch_size=64, warmup_epochs=1, cache_dir=str(tmp_path))
    result = train(TINY, MIX, digits, config, pretrained=False)
    expected = peak_rates(config, MIX, backbone_spec(TINY), len(digits.train))
    assert result.rates == pytest.approx(expected) and result.lr == pytest.approx(max(expected.values()))
    assert result.history[0]["lr"] == pytest.approx(result.lr, rel=1e-3)  # the warm-up's end: the peak
    groups = built[0].param_groups
    assert {g["name"] for g in groups} == {"lora", "bitfit", HEAD}
    # after the last step every group is at the same share of its own peak
    assert len({round(g["lr"] / expected[g["name"]], 9) for g in groups}) == 1
    decay = {(g["name"], g["weight_decay"] > 0) for g in groups}
    assert ("bitfit", True) not in decay and (HEAD, True) in decay and (HEAD, False) in decay


def test_chance_level_and_the_diverged_rule() -> None:
    assert trainable.chance_level(10, 200) == pytest.approx(0.1 + 2.33 * math.sqrt(0.09 / 200))
    assert 0.14 < trainable.chance_level(10, 200) < 0.15
    reason = trainable.diverged([0.12, 0.10], 2.4, 10, 200)
    assert reason is not None and reason.startswith("diverged: val accuracy 0.120, 0.100 in epochs 1-2 is at chance")
    assert trainable.diverged([0.3, 0.12, 0.1], float("nan"), 10, 200) is not None
    assert trainable.diverged([0.10], 2.9, 10, 200) is None  # one epoch (the warm-up's) at chance: not yet
    assert trainable.diverged([0.20, 0.10], 2.9, 10, 200) is None  # the epoch before was above chance
    assert trainable.diverged([0.1, 0.12], 1.5, 10, 200) is None  # at chance on val, but its loss falls
    assert trainable.diverged([0.3, 0.3], 9.0, 10, 200) is None  # its loss is high, but it is above chance
    assert trainable.diverged([0.5, 0.5], 0.7, 2, 200) is not None  # two classes: chance 0.58, ln 2 = 0.69
    assert trainable.diverged([0.5, 0.5], 0.6, 2, 200) is None


@pytest.mark.parametrize("lr_scale,stops", [(1.0, False), (1e4, True)])
def test_a_diverged_trial_stops_after_its_first_epoch(tmp_path, monkeypatch, lr_scale, stops) -> None:
    from ray import tune

    reports: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), [0, 1, 2])
    config = {"autopeft": {"plan": plan.to_dict(), "peft_params": plan.count(backbone_spec("autopeft_tiny_vit")),
                           "hparams": {"lr_scale": lr_scale, "batch_size": 64}}}
    trainable.run_trial(config, trainable.TrialSettings(dataset="digits", backbone="autopeft_tiny_vit", epochs=3))
    if stops:
        # after its second epoch (two at chance, its loss not fallen), or within an epoch (a NaN loss)
        assert reports[-1]["epoch"] <= 2 and reports[-1]["fail_reason"].startswith("diverged")
        assert len(reports) <= 2 and not any("fail_reason" in r for r in reports[:-1])
    else:
        assert [r["epoch"] for r in reports] == [1, 2, 3] and not any("fail_reason" in r for r in reports)


def test_the_stop_can_be_turned_off(tmp_path, monkeypatch) -> None:
    """The driver decides for every node (`TrialSettings.stop_diverged`, shipped to the workers): off without early
    stopping (no trial stops early) or with AUTOPEFT_STOP_DIVERGED=0 in the search command's environment."""
    from ray import tune

    from autopeft.search.engine import trial_settings
    from autopeft.search.settings import SearchSettings

    reports: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(trainable, "diverged", lambda *a: "diverged: always")
    plan = PeftPlan.single(make_spec("bitfit"), [0])
    config = {"autopeft": {"plan": plan.to_dict(), "peft_params": 1, "hparams": {"batch_size": 64}}}
    off = trainable.TrialSettings(dataset="digits", backbone="autopeft_tiny_vit", epochs=2, stop_diverged=False)
    trainable.run_trial(config, off)
    assert [r.get("epoch") for r in reports] == [1, 2] and not any("fail_reason" in r for r in reports)
    s = SearchSettings(dataset="digits")
    monkeypatch.setenv("AUTOPEFT_STOP_DIVERGED", "1")
    assert trial_settings(s).stop_diverged and not trial_settings(SearchSettings(early_stopping=False)).stop_diverged
    monkeypatch.setenv("AUTOPEFT_STOP_DIVERGED", "0")
    assert not trial_settings(s).stop_diverged
