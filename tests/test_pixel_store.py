"""The pixel store: a folder's images decoded once per node into a memory-mapped uint8 file, read by every later
dataset of any process; the trainer reads stored batches as uint8 and normalises them where it trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_image_folder, write_jpeg

import autopeft.data.datasets as ds
from autopeft.data import load_dataset
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.train import TrainConfig, train

PX32 = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    where = tmp_path / "pixels"
    monkeypatch.setenv("AUTOPEFT_PIXEL_CACHE", str(where))
    monkeypatch.delenv("AUTOPEFT_PIXEL_CACHE_MB", raising=False)
    return where


def _items(dataset) -> list[torch.Tensor]:
    return [dataset[i][0] for i in range(len(dataset))]


def _decodes(fn) -> int:
    before = ds.DECODED
    fn()
    return ds.DECODED - before


def test_a_split_is_decoded_once_into_the_store_and_read_exactly_as_decoded(tmp_path, store, monkeypatch) -> None:
    folder = write_image_folder(tmp_path / "imgs", {"a": 7, "b": 7})
    first = load_dataset(str(folder), seed=0, **PX32)
    n = len(first.train)
    assert _decodes(lambda: first.train.stored()) == n
    assert len(list(store.glob("*.npy"))) == 1 and not list(store.glob("*.partial"))
    stored = _items(first.train)
    batch = first.train.__getitems__([3, 0, 5])
    again = load_dataset(str(folder), seed=0, **PX32)
    assert _decodes(lambda: _items(again.train)) == 0  # a later dataset maps the entry
    monkeypatch.setenv("AUTOPEFT_PIXEL_CACHE_MB", "0")  # the store off: every image decoded as it is read
    plain = load_dataset(str(folder), seed=0, **PX32)
    decoded = _items(plain.train)
    assert all(torch.equal(a, b) for a, b in zip(stored, decoded, strict=True))
    assert all(torch.equal(x, decoded[i]) and y == plain.train.samples[i][1]
               for (x, y), i in zip(batch, [3, 0, 5], strict=True))


def test_another_size_or_a_changed_file_is_another_entry_and_augmented_splits_are_not_stored(tmp_path, store) -> None:
    folder = write_image_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    data = load_dataset(str(folder), seed=0, **PX32)
    n = len(data.train)
    assert _decodes(lambda: data.train.stored()) == n
    other = load_dataset(str(folder), seed=0, **{**PX32, "input_size": (3, 24, 24)})
    assert _decodes(lambda: other.train.stored()) == n
    path = data.train.samples[0][0]
    write_jpeg(Path(path), seed=999)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    changed = load_dataset(str(folder), seed=0, **PX32)
    assert _decodes(lambda: changed.train.stored()) == n
    assert not torch.equal(changed.train[0][0], data.train[0][0])  # the old mapping still reads the old pixels
    augmented = load_dataset(str(folder), seed=0, augment=True, **PX32)
    assert augmented.train.stored() is None and augmented.val.stored() is not None


def test_the_store_keeps_within_its_bound(tmp_path, store, monkeypatch) -> None:
    folder = write_image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    data = load_dataset(str(folder), seed=0, **PX32)
    entry = len(data.train) * 3 * 32 * 32
    monkeypatch.setenv("AUTOPEFT_PIXEL_CACHE_MB", str((entry - 1) / 2**20))
    assert data.train.stored() is None and _decodes(lambda: _items(data.train)) == len(data.train)
    monkeypatch.setenv("AUTOPEFT_PIXEL_CACHE_MB", str(1.5 * entry / 2**20))  # room for one train entry
    load_dataset(str(folder), seed=0, **PX32).train.stored()
    other = load_dataset(str(folder), seed=1, **PX32)  # another split of the same folder: another entry
    assert other.train.stored() is not None
    sizes = [p.stat().st_size for p in store.glob("*.npy")]
    assert len(sizes) == 1 and sum(sizes) <= 1.5 * entry + 1024  # the older entry went


def test_concurrent_processes_decode_a_split_once(tmp_path, store) -> None:
    """Trials of a search are processes of one node: the first decodes the split, the others wait for it."""
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        for i in range(40):
            write_jpeg(folder / c / f"{i:03d}.jpg", seed=i + 100 * len(c), size=(320, 240))
    go = tmp_path / "go"
    script = (
        "import json, os, sys, time\n"
        "import autopeft.data.datasets as ds\n"
        "from autopeft.data import load_dataset\n"
        f"data = load_dataset({str(folder)!r}, seed=0, **{PX32!r})\n"
        f"open({str(tmp_path)!r} + '/ready.' + str(os.getpid()), 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "x = data.train.pixel_batch(list(range(len(data.train))))[0]\n"
        "print(json.dumps({'decoded': ds.DECODED, 'sum': int(x.long().sum())}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    for _ in range(18000):  # every process loaded the dataset: now all read it at once
        if len(list(tmp_path.glob("ready.*"))) == len(procs) or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    n = len(load_dataset(str(folder), seed=0, **PX32).train)
    assert sorted(o["decoded"] for o in outs) == [0, 0, n]
    assert len({o["sum"] for o in outs}) == 1


def test_training_on_stored_images_is_the_run_on_decoded_ones(tmp_path, store, monkeypatch) -> None:
    """The trainer reads stored batches as uint8 and normalises them where it trains: the same run, exactly."""
    folder = write_image_folder(tmp_path / "imgs", {"a": 12, "b": 12, "c": 12})
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), [1, 2])
    config = TrainConfig(epochs=2, batch_size=8, feature_cache=False, lr=1e-3)

    def run() -> list[dict]:
        data = load_dataset(str(folder), seed=0, **PX32)
        result = train("autopeft_tiny_vit", plan, data, config, pretrained=False, test=True)
        return [{k: h[k] for k in ("train_loss", "val_loss", "val_acc")} for h in result.history] + [
            {"test": result.test_acc}]

    stored = run()
    assert list(store.glob("*.npy"))
    monkeypatch.setenv("AUTOPEFT_PIXEL_CACHE_MB", "0")
    assert run() == stored


def test_a_spawned_worker_maps_the_store_itself(tmp_path, store) -> None:
    import pickle

    folder = write_image_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    data = load_dataset(str(folder), seed=0, **PX32)
    data.train.stored()
    shipped = pickle.dumps(data.train)
    assert len(shipped) < len(data.train) * 3 * 32 * 32  # the mapped images do not travel
    copy = pickle.loads(shipped)
    assert _decodes(lambda: copy.stored()) == 0
    assert np.array_equal(copy.stored(), data.train.stored())
