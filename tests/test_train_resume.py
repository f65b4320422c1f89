"""Epoch checkpoints ([M] part 2): a run resumed from its epoch-k state ends as the uninterrupted run does."""

from __future__ import annotations

import io

import pytest
import torch

import autopeft.bundled  # noqa: F401  (registers the bundled backbone)
from autopeft.data import data_config, load_dataset
from autopeft.errors import AutopeftError
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.train import TrainConfig, train

BACKBONE = "autopeft_test_vit"  # random weights are enough: the test compares two runs of the same thing


def _roundtrip(state: dict) -> dict:
    """The state as a trial stores and loads it (torch.save into its checkpoint directory)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("augment", [False, True])  # True: the images and their random transforms, no cache
def test_a_resumed_run_ends_with_the_curve_and_weights_of_a_straight_one(augment: bool) -> None:
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), range(2)) if augment else PeftPlan.single(
        make_spec("adapter", {"dim": 4}), [1])  # the adapter leaves block 0 frozen: the feature cache is used
    cfg = TrainConfig(epochs=4, batch_size=64, lr=3e-3, warmup_epochs=1, augment=augment, seed=3)
    data = load_dataset("digits", None, augment=augment, seed=3, **data_config(BACKBONE))
    states: list[dict] = []

    def keep(m: dict) -> None:
        if "state" in m:
            states.append(_roundtrip(m["state"]))

    straight = train(BACKBONE, plan, data, cfg, pretrained=False, report=keep, checkpoint_every=1)
    assert [s["epoch"] for s in states] == [1, 2, 3]  # the last epoch's report carries none
    resumed_reports: list[dict] = []
    resumed = train(BACKBONE, plan, data, cfg, pretrained=False, resume=states[1], report=resumed_reports.append)
    assert [m["epoch"] for m in resumed_reports] == [3, 4]
    key = ("val_acc", "val_loss", "train_loss", "lr")
    assert [[h[k] for k in key] for h in resumed.history] == [[h[k] for k in key] for h in straight.history]
    mine = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_a_checkpoint_of_another_plan_is_refused() -> None:
    data = load_dataset("digits", None, **data_config(BACKBONE))
    cfg = TrainConfig(epochs=2, batch_size=64, seed=0)
    states: list[dict] = []
    train(BACKBONE, PeftPlan.single(make_spec("lora", {"rank": 2}), [0]), data, cfg, pretrained=False,
          report=lambda m: states.extend([m["state"]] if "state" in m else []), checkpoint_every=1)
    with pytest.raises(AutopeftError, match="does not belong to this run"):
        train(BACKBONE, PeftPlan.single(make_spec("lora", {"rank": 4}), [0, 1]), data, cfg, pretrained=False,
              resume=states[0])
