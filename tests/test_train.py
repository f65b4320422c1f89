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


def _run(data, plan, tmp_path, **kw):
    cfg = dict(epochs=2, lr=3e-3, batch_size=64, cache_dir=str(tmp_path / "cache"))
    cfg.update(kw)
    return train(TINY, plan, data, TrainConfig(**cfg), pretrained=False, test=True)


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
    with caplog.at_level(logging.WARNING):
        result = _run(digits, plan, tmp_path, epochs=1, batch_size=1000, train_fraction=1.0, warmup_epochs=0)
    assert len(result.history) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=0), dict(lr=float("nan")), dict(train_fraction=0),
                                 dict(batch_size=0), dict(label_smoothing=1.0)])
def test_bad_config(bad) -> None:
    from autopeft.errors import AutopeftError

    with pytest.raises(AutopeftError):
        TrainConfig(**bad)
