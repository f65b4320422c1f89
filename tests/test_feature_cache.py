"""The frozen-prefix feature cache within memory ([N] part 6): entries written batch by batch, memory-mapped when
read, one writer per entry, an entry larger than the cache kept for its run only, at the run's precision."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from autopeft.backbones import create_backbone
from autopeft.features import FeatureCache, prefix_forward
from autopeft.train import autocast

TINY = "autopeft_test_vit"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_backbone(TINY, num_classes=3).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(37, 3, 32, 32, generator=g), torch.arange(37) % 3)


class Counting:
    """Counts the prefix's forward passes of a model (one per batch computed)."""

    def __init__(self, model):
        self.calls, self.model = 0, model
        self.original = model.patch_embed.forward

        def counted(x):
            self.calls += 1
            return self.original(x)

        model.patch_embed.forward = counted

    def restore(self):
        self.model.patch_embed.forward = self.original


def test_an_entry_is_the_prefix_output_and_a_valid_safetensors_file(model, images, tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    x, y = cache.features(model, 2, images, "k1", batch_size=8)
    with torch.no_grad():
        expected = torch.cat([prefix_forward(model, images.tensors[0][i:i + 8], 2) for i in range(0, 37, 8)])
    assert torch.equal(x, expected) and torch.equal(y, images.tensors[1])
    stored = load_file(str(tmp_path / "k1.safetensors"))  # the format other tools read
    assert torch.equal(stored["x"], x) and torch.equal(stored["y"], y)
    again = cache.features(model, 2, images, "k1", batch_size=8)
    assert torch.equal(again[0], x)


def test_a_bf16_run_keeps_the_dtype_its_prefix_computes(model, images, tmp_path) -> None:
    cpu = torch.device("cpu")
    x, _ = FeatureCache(tmp_path).features(model, 1, images, "bf", 16, cpu, lambda: autocast("bf16", cpu))
    with torch.no_grad(), autocast("bf16", cpu):
        expected = torch.cat([prefix_forward(model, images.tensors[0][i:i + 16], 1) for i in range(0, 37, 16)])
    assert x.dtype == expected.dtype and torch.equal(x, expected)


def test_concurrent_trials_compute_an_entry_once(model, images, tmp_path) -> None:
    counter = Counting(model)
    results: list = []
    try:
        threads = [threading.Thread(target=lambda: results.append(
            FeatureCache(tmp_path).features(model, 2, images, "shared", batch_size=8))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        counter.restore()
    assert counter.calls == 5  # ceil(37 / 8) batches, once
    assert len(results) == 3 and all(torch.equal(r[0], results[0][0]) for r in results)


def test_an_entry_larger_than_the_cache_is_kept_for_its_run_only(model, images, tmp_path) -> None:
    x, y = FeatureCache(tmp_path, max_bytes=1000).features(model, 2, images, "big", batch_size=8)
    assert x.shape[0] == 37 and torch.equal(y, images.tensors[1])
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.tmp"))
    assert torch.isfinite(x.float()).all()  # still readable: the mapping outlives the deleted file


def test_a_torn_entry_is_recomputed(model, images, tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    x = cache.features(model, 2, images, "torn", batch_size=8)[0].clone()  # off the mapping of the file torn below
    path = tmp_path / "torn.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    counter = Counting(model)
    try:
        again, _ = cache.features(model, 2, images, "torn", batch_size=8)
    finally:
        counter.restore()
    assert counter.calls == 5 and torch.equal(again, x)
