"""The training engine: frozen-prefix cache equivalence and invalidation, divergence, fidelity knobs."""

from __future__ import annotations

import logging

import pytest
import torch

from autopeft.backbones import backbone_spec
from autopeft.data import data_config, load_dataset
from autopeft.features import FeatureCache
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.train import TrainConfig, TrainingDiverged, train

TINY = "autopeft_test_vit"  # 3 blocks, random weights: the engine's mechanics, not transfer quality


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", **data_config(TINY))


def _run(data, plan, tmp_path, on_step=None, **kw):
    cfg = dict(epochs=2, lr=3e-3, batch_size=64, cache_dir=str(tmp_path / "cache"))
    cfg.update(kw)
    return train(TINY, plan, data, TrainConfig(**cfg), pretrained=False, test=True, on_step=on_step)


def _logits(result, data):
    x = torch.stack([data.test[i][0] for i in range(16)])
    result.model.eval()
    with torch.no_grad():
        return result.model(x)


@pytest.mark.parametrize(
    "plan,k",
    [
        (PeftPlan.single(make_spec("lora", {"rank": 2}), [1, 2]), 1),
        (PeftPlan.single(make_spec("adaptformer", {"dim": 4}), [2]), 2),
        (PeftPlan.single(make_spec("linear"), []), 3),
    ],
)
def test_cache_gives_the_uncached_result(digits, tmp_path, plan, k) -> None:
    plain = _run(digits, plan, tmp_path, feature_cache=False)
    cached = _run(digits, plan, tmp_path, feature_cache=True)
    assert plain.cached_blocks == 0 and cached.cached_blocks == k
    torch.testing.assert_close(_logits(cached, digits), _logits(plain, digits), atol=1e-5, rtol=1e-5)
    for a, b in zip(plain.history, cached.history, strict=True):
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert cached.test_acc == pytest.approx(plain.test_acc)


@pytest.mark.parametrize(
    "plan,expected",
    [
        (PeftPlan.single(make_spec("lora"), [2, 5]), 2),
        (PeftPlan.single(make_spec("vpt_shallow"), []), 0),
        (PeftPlan.single(make_spec("vpt_deep"), [3]), 3),
        (PeftPlan.single(make_spec("linear"), []), 6),
        (PeftPlan.single(make_spec("partial", {"k": 2}), []), 4),
        (PeftPlan.single(make_spec("full"), []), 0),
        (PeftPlan(blocks={4: (make_spec("lora"),)}, global_parts=(make_spec("partial", {"k": 1}),)), 4),
    ],
)
def test_frozen_prefix(plan, expected) -> None:
    assert plan.frozen_prefix(backbone_spec("test_vit")) == expected


def test_cache_entries_are_keyed_and_bounded(digits, tmp_path) -> None:
    cache_dir = tmp_path / "cache"
    lora_late = PeftPlan.single(make_spec("lora"), [2])
    _run(digits, lora_late, tmp_path, epochs=1)
    first = set(cache_dir.glob("*.safetensors"))
    assert len(first) == 3  # train, val, test at k=2
    _run(digits, lora_late, tmp_path, epochs=1)  # same everything: reused, nothing new
    assert set(cache_dir.glob("*.safetensors")) == first
    _run(digits, PeftPlan.single(make_spec("lora"), [1]), tmp_path, epochs=1)  # another k
    assert len(set(cache_dir.glob("*.safetensors"))) == 6
    torch.manual_seed(5)  # other backbone weights: the weight hash changes every key
    _run(digits, lora_late, tmp_path, epochs=1, seed=5)
    assert len(set(cache_dir.glob("*.safetensors"))) == 9
    other = load_dataset("digits", seed=1, **data_config(TINY))  # another split seed: another fingerprint
    assert other.fingerprint != digits.fingerprint
    cache = FeatureCache(cache_dir)
    keys = {cache.key(TINY, "w", 2, digits.fingerprint, "train"), cache.key(TINY, "w", 2, other.fingerprint, "train"),
            cache.key(TINY, "w", 2, digits.fingerprint, "val"), cache.key(TINY, "w2", 2, digits.fingerprint, "train"),
            cache.key(TINY, "w", 1, digits.fingerprint, "train")}
    assert len(keys) == 5
    one_entry = max(p.stat().st_size for p in cache_dir.glob("*.safetensors"))
    FeatureCache(cache_dir, max_bytes=one_entry).evict()
    assert len(list(cache_dir.glob("*.safetensors"))) == 1


def test_torn_cache_entry_is_recomputed(digits, tmp_path) -> None:
    plan = PeftPlan.single(make_spec("lora"), [2])
    ref = _run(digits, plan, tmp_path, epochs=1)
    for p in (tmp_path / "cache").glob("*.safetensors"):
        p.write_bytes(b"garbage")
    again = _run(digits, plan, tmp_path, epochs=1)
    assert again.history[0]["val_acc"] == ref.history[0]["val_acc"]


def test_divergence_raises(digits, tmp_path) -> None:
    plan = PeftPlan.single(make_spec("full"), [])
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        _run(digits, plan, tmp_path, lr=1e30, grad_clip=0.0, warmup_epochs=0)


def test_fidelity_knobs(digits, tmp_path) -> None:
    plan = PeftPlan.single(make_spec("lora"), [2])
    seen = []
    result = train(TINY, plan, digits, TrainConfig(epochs=3, train_fraction=0.25, batch_size=50,
                                                   cache_dir=str(tmp_path)), pretrained=False, report=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert set(seen[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "seconds"}
    assert result.test_acc is None and result.peft_params == plan.count(backbone_spec(TINY))


def test_schedule_warms_up_then_ends_at_lr_min(digits, tmp_path) -> None:
    """Linear warm-up over the first epoch, then a cosine that reaches lr_min (lr / 1000) at the very last step."""
    plan = PeftPlan.single(make_spec("bitfit"), [])
    lrs = [m["lr"] for m in _run(digits, plan, tmp_path, epochs=4, lr=1e-2, warmup_epochs=1).history]
    assert lrs[0] == pytest.approx(1e-2, rel=1e-6)  # warm-up ends at the peak
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] and lrs[3] == pytest.approx(1e-5, rel=1e-6)


def test_a_one_step_run_trains_quietly(digits, tmp_path, caplog) -> None:
    plan = PeftPlan.single(make_spec("bitfit"), [])
    with caplog.at_level(logging.WARNING):  # one image: one step of one
        result = _run(digits, plan, tmp_path, epochs=1, batch_size=1000, train_fraction=0.001, warmup_epochs=0)
    assert len(result.history) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_the_batch_is_fitted_to_a_small_split_and_a_partial_batch_is_dropped(digits, tmp_path) -> None:
    """200 train images at batch 64 would be 3 full batches and one of 8: the run trains 6 batches of 33 per epoch
    (and says so); at batch 32 it keeps 32 and drops the 8 left over (6 steps)."""
    from autopeft.train_config import fitted_batch, steps_per_epoch

    assert [fitted_batch(64, 200), fitted_batch(32, 200), fitted_batch(64, 5), fitted_batch(64, 800)] == [33, 32, 1,
                                                                                                          64]
    assert [steps_per_epoch(200, 64), steps_per_epoch(200, 32), steps_per_epoch(800, 64)] == [6, 6, 12]
    plan = PeftPlan.single(make_spec("bitfit"), [])
    totals: list[int] = []
    result = _run(digits, plan, tmp_path, epochs=2, batch_size=64, train_fraction=0.25,
                  on_step=lambda step, total: totals.append(total))
    assert result.batch_size == 33 and len(totals) == 12 and set(totals) == {12}
    assert result.notes == ["batch 33 instead of 64: 200 train images give at least 6 steps per epoch"]
    totals.clear()
    kept = _run(digits, plan, tmp_path, epochs=1, batch_size=32, train_fraction=0.25,
                on_step=lambda step, total: totals.append(total))
    assert kept.batch_size == 32 and kept.notes == [] and totals == [6] * 6


def test_drop_path_is_off_for_a_backbone_pretrained_without_it(tmp_path) -> None:
    """The bundled backbone was pretrained without stochastic depth: a space's drop_path 0.1 trains at 0 (noted);
    a backbone autopeft knows nothing about keeps the setting."""
    from autopeft.defaults import BUNDLED_BACKBONE

    data = load_dataset("digits", **data_config(BUNDLED_BACKBONE))
    plan = PeftPlan.single(make_spec("bitfit"), [])
    cfg = TrainConfig(epochs=1, lr=1e-3, drop_path=0.1, train_fraction=0.05, cache_dir=str(tmp_path))
    bundled = train(BUNDLED_BACKBONE, plan, data, cfg)
    assert bundled.drop_path == 0.0 and any("drop-path 0 instead of 0.1" in n for n in bundled.notes)
    assert not any("DropPath" in type(m).__name__ for m in bundled.model.modules())
    other = train(TINY, plan, load_dataset("digits", **data_config(TINY)), cfg, pretrained=False)
    assert other.drop_path == 0.1 and any("DropPath" in type(m).__name__ for m in other.model.modules())


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=0), dict(lr=float("nan")), dict(train_fraction=0),
                                 dict(batch_size=0), dict(label_smoothing=1.0)])
def test_bad_config(bad) -> None:
    from autopeft.errors import AutopeftError

    with pytest.raises(AutopeftError):
        TrainConfig(**bad)


@pytest.mark.parametrize(("bad", "needle"), [(dict(optimizer="adam"), "optimizer 'adam' is not valid; use one of: "
                                                                      "adamw, sgd"),
                                             (dict(scheduler="step"), "scheduler 'step' is not valid; use one of: "
                                                                      "cosine, constant")])
def test_optimizer_and_scheduler_name_the_valid_values(bad, needle) -> None:
    from autopeft.errors import AutopeftError

    with pytest.raises(AutopeftError) as err:
        TrainConfig(**bad)
    assert str(err.value) == needle


def test_sgd_is_the_optimizer_that_steps(digits, tmp_path, monkeypatch) -> None:
    """optimizer=sgd trains with SGD (momentum 0.9, no Nesterov: its momentum buffers fill), not with AdamW."""
    import autopeft.train as train_module

    built: list[torch.optim.Optimizer] = []
    make = train_module.make_optimizer

    def spy(params, config):
        built.append(make(params, config))
        return built[-1]

    monkeypatch.setattr(train_module, "make_optimizer", spy)
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), [2])
    sgd = _run(digits, plan, tmp_path, epochs=1, optimizer="sgd")
    adamw = _run(digits, plan, tmp_path, epochs=1)
    assert [type(o) for o in built] == [torch.optim.SGD, torch.optim.AdamW]
    group = built[0].param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] is False and group["weight_decay"] == 1e-4
    # no decay on biases and norms, as under AdamW (each method's and the head's parameters split alike)
    assert all(g["weight_decay"] == (1e-4 if p.ndim > 1 else 0.0) for g in built[0].param_groups for p in g["params"])
    assert all(built[0].state[p]["momentum_buffer"] is not None for g in built[0].param_groups for p in g["params"])
    assert sgd.history[0]["train_loss"] != pytest.approx(adamw.history[0]["train_loss"], rel=1e-6)


def _lrs(scheduler_name: str, total: int = 20, warmup: int = 5, lr: float = 0.1) -> list[float]:
    from autopeft.optim import make_optimizer, make_scheduler

    config = TrainConfig(lr=lr, scheduler=scheduler_name)
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], config)
    scheduler = make_scheduler(optimizer, config, total, warmup)
    out = [optimizer.param_groups[0]["lr"]]
    for step in range(1, total + 1):
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_constant_stays_at_the_peak_after_the_warmup_cosine_decays() -> None:
    cosine, constant = _lrs("cosine"), _lrs("constant")
    assert constant[:6] == cosine[:6]  # the same linear warm-up from lr / 100 up to the peak
    assert constant[0] == pytest.approx(1e-3) and constant[1] < constant[2] < constant[5]
    assert constant[5:] == [0.1] * 16
    assert all(a > b for a, b in zip(cosine[5:-1], cosine[6:], strict=True)) and cosine[-1] == pytest.approx(1e-4)


def test_constant_schedule_in_a_run(digits, tmp_path) -> None:
    plan = PeftPlan.single(make_spec("bitfit"), [])
    lrs = [m["lr"] for m in _run(digits, plan, tmp_path, epochs=3, lr=1e-2, warmup_epochs=1,
                                 scheduler="constant").history]
    assert lrs == pytest.approx([1e-2] * 3, rel=1e-12)


def test_the_training_keys_are_the_config_fields_a_recipe_may_set() -> None:
    from dataclasses import fields

    from autopeft.train import RUN_FIELDS, SPACE_TRAINING_KEYS, TRAINING_KEYS

    names = {f.name for f in fields(TrainConfig)}
    assert set(TRAINING_KEYS) == names - set(RUN_FIELDS) and set(RUN_FIELDS) <= names
    assert {"optimizer", "scheduler", "augment", "lr", "warmup_epochs"} <= set(TRAINING_KEYS)
    assert not {"epochs", "seed", "device"} & set(TRAINING_KEYS)
    assert set(SPACE_TRAINING_KEYS) == {*TRAINING_KEYS, "epochs"} - {"img_size"}  # the study sets the input size
    d = TrainConfig.defaults()
    assert d == TrainConfig().to_dict() and d["optimizer"] == "adamw" and d["scheduler"] == "cosine"


def test_rescale_warmup_keeps_the_share() -> None:
    from autopeft.train import rescale_warmup

    training = {"warmup_epochs": 10, "lr": 0.1}
    assert rescale_warmup(training, 100, 10) == {"warmup_epochs": 1.0, "lr": 0.1}
    assert rescale_warmup(training, 100, 100) == training and rescale_warmup({"lr": 0.1}, 100, 10) == {"lr": 0.1}
    assert rescale_warmup(training, None, 10) == training  # no schedule length to be a share of
    assert training == {"warmup_epochs": 10, "lr": 0.1}  # the input is left as it was


def test_check_training_types_and_refuses_unknown_keys() -> None:
    from autopeft.errors import AutopeftError, UnknownKey
    from autopeft.train import check_training

    assert check_training({"lr": "1e-3", "batch_size": 64.0, "optimizer": "sgd"}) == {
        "batch_size": 64, "lr": 1e-3, "optimizer": "sgd"}
    with pytest.raises(UnknownKey, match="unknown training key.s. optimizr; valid keys: augment, batch_size"):
        check_training({"optimizr": "sgd"})
    with pytest.raises(AutopeftError, match="training key 'optimizer' must be str, got 1"):
        check_training({"optimizer": 1})


def test_dataloader_workers_give_the_same_run(digits, tmp_path) -> None:
    """Images prepared by two persistent DataLoader processes (one loader for all epochs, each epoch's own order)
    train exactly as in the training thread."""
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), [0, 1, 2])
    inline = _run(digits, plan, tmp_path, feature_cache=False, epochs=3)
    workers = _run(digits, plan, tmp_path, feature_cache=False, epochs=3, num_workers=2)
    assert [h["train_loss"] for h in workers.history] == [h["train_loss"] for h in inline.history]
    assert [h["val_acc"] for h in workers.history] == [h["val_acc"] for h in inline.history]
    assert workers.test_acc == inline.test_acc
