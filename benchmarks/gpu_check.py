"""The GPU check: what autopeft's training does on one GPU, in five parts, in about 8 minutes.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out PATH] [--backbone NAME] [--batch 64] [--minutes 8]
    python -m benchmarks.gpu_check --smoke          # the same code on the CPU with a 3-block test ViT, < 1 minute

(a) every PEFT method's training-step time, images/s and peak GPU memory (random-initialised backbone, synthetic
    batches on the device, --precision, --batch), as ratios to full fine-tuning measured in the same run;
(b) a LoRA run on generated JPEGs through the project's data path (load_dataset of an image folder, train.set_up,
    train.run_epochs): the data path alone, the model alone and the training epochs, first and later ones, and how
    busy the model keeps the GPU (its step time × steps / epoch wall time);
(c) the precision invariants at bf16 and fp16 (on CUDA; on the CPU under --smoke): cached and uncached training
    give the same val curve within the test suite's tolerance, and `autopeft evaluate`'s path (deploy.evaluate_run
    of the written run) reproduces the recorded test accuracy exactly, for a cacheable and an uncacheable plan;
(d) 1, 2 and 4 concurrent training processes (2 under --smoke) on the one device, each training a LoRA plan for
    the same wall-clock window: their summed images/s;
(e) device memory after a trial that raised (mid-epoch, and from its report callback), against its level after a
    trial that finished (CUDA's allocated bytes; the process's RSS on the CPU, reported but not judged).

Nothing beyond torch, timm, numpy, pandas, pyyaml, safetensors, rich and pillow is imported (no ray, optuna,
sqlalchemy or plotly), and nothing is downloaded: the backbone is random-initialised (its weights written to a
temporary file that training and evaluation load), the images are generated. A part that fails records its error
in the JSON and the run goes on to the next. Writes one JSON (--out, default benchmarks/results/gpu_check.json,
gpu_check_smoke.json under --smoke) and prints a table with the targets as PASS / FAIL lines.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file (python benchmarks/gpu_check.py): the repository root holds the packages
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; timm must not try

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import write_result  # noqa: E402

FORBIDDEN = ("ray", "optuna", "sqlalchemy", "plotly")  # absent on the GPU machine: never imported on this path
GPU_BACKBONE = "vit_base_patch16_224"
SMOKE_BACKBONE = "autopeft_test_vit"  # autopeft's 3-block test ViT (32 px, patch 8, dim 32): the smoke's CPU seconds
READY, RESULT = "GPU_CHECK_READY", "GPU_CHECK_RESULT"  # a (d) worker's lines to the parent
# targets (the issue's): frozen-backbone step time, GPU busy share of a later epoch, 4 trials against one
FROZEN_MAX_RATIO, BUSY_MIN, CONCURRENT_MIN_RATIO = 0.70, 0.90, 2.0
# cached against uncached val curves: the tolerances tests/test_precision.py holds bf16 to
VAL_ACC_TOL, TRAIN_LOSS_RTOL = 0.02, 0.02
LEAK_TOL_BYTES = 2**20
PARTS = "abcde"
MB = 2**20


def log(text: str) -> None:
    """A progress line (stdout, flushed), so a person watching sees which part runs."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# -- what every part shares: settings, the generated image folder and the backbone's weights file -------------------


class Check:
    """The run's settings and its shared inputs (made once by `prepare`)."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.smoke: bool = args.smoke
        self.tmp = tmp
        cuda = torch.cuda.is_available() and not args.smoke
        self.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
        self.backbone: str = args.backbone or (SMOKE_BACKBONE if args.smoke else GPU_BACKBONE)
        self.batch: int = args.batch or (16 if args.smoke else 64)
        self.precision: str = args.precision
        self.images: int = args.images or (300 if args.smoke else 2000)
        self.image_wh: tuple[int, int] = (64, 48) if args.smoke else (500, 375)
        cpus = os.cpu_count() or 1
        self.workers: int = args.workers if args.workers is not None else (1 if args.smoke else min(8, cpus - 1))
        self.steps: int = args.steps or (2 if args.smoke else 10)
        self.rounds = 1 if args.smoke else 3
        self.warmup = 1 if args.smoke else 3
        self.epochs_b = 2 if args.smoke else 3
        self.epochs_c = 2
        self.concurrency: tuple[int, ...] = (1, 2) if args.smoke else (1, 2, 4)
        self.window: float = 1.0 if args.smoke else 15.0
        self.deadline = time.monotonic() + 60 * args.minutes
        self.folder = tmp / "images"
        self.weights = tmp / "backbone.safetensors"

    @property
    def precisions_c(self) -> tuple[str, ...]:
        return ("bf16", "fp16")

    def settings(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "device": str(self.device), "precision": self.precision,
                "batch": self.batch, "images": self.images, "image_wh": list(self.image_wh),
                "loader_workers": self.workers, "smoke": self.smoke}

    def data(self, folder: Path | None = None) -> Any:
        from autopeft.data import data_config, load_dataset

        return load_dataset(str(folder or self.folder), **data_config(self.backbone))

    def num_blocks(self) -> int:
        from autopeft.backbones import backbone_spec

        return backbone_spec(self.backbone).num_blocks

    def lora_all(self) -> Any:
        """LoRA r=8 on every block: no frozen prefix, so every epoch runs the images through the whole model."""
        from autopeft.methods import make_spec
        from autopeft.plan import PeftPlan

        return PeftPlan.single(make_spec("lora", {"rank": 8}), range(self.num_blocks()))

    def config(self, **fields: Any) -> Any:
        from autopeft.train_config import TrainConfig

        base: dict[str, Any] = dict(batch_size=self.batch, lr=1e-3, precision=self.precision,
                                    device=str(self.device), num_workers=self.workers, feature_cache=False,
                                    cache_dir=str(self.tmp / "feature_cache"))
        return TrainConfig(**{**base, **fields})


def make_image_folder(folder: Path, images: int, wh: tuple[int, int], classes: int = 10, seed: int = 0) -> dict:
    """`images` JPEGs of `wh` pixels in `classes` class folders under train/ val/ test/ (70 / 15 / 15 %).

    Each class has its own colour layout (a coarse random grid, smoothly upscaled) with per-image jitter and grain,
    so a model can learn the classes and the JPEGs cost about what photos of that size cost to decode."""
    rng = np.random.default_rng(seed)
    w, h = wh
    layouts = rng.uniform(40, 215, size=(classes, 6, 8, 3))
    grain = [rng.normal(0, 10, size=(h, w, 3)).astype(np.float32) for _ in range(4)]
    per_class = max(images // classes, 3)
    n_val = n_test = max(1, round(per_class * 0.15))
    jobs = []
    for c in range(classes):
        for i in range(per_class):
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            jobs.append((folder / split / f"class{c:02d}" / f"{i:05d}.jpg", c, int(rng.integers(2**31))))

    def write(job: tuple[Path, int, int]) -> None:
        path, c, s = job
        r = np.random.default_rng(s)
        coarse = np.clip(layouts[c] + r.normal(0, 25, size=layouts[c].shape), 0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img = np.clip(img + np.roll(grain[s % 4], s % h, axis=0), 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(write, jobs))
    counts = {s: sum(1 for j in jobs if j[0].parts[-3] == s) for s in ("train", "val", "test")}
    return {"classes": classes, "size": list(wh), **counts}


def write_random_weights(backbone: str, path: Path) -> int:
    """The backbone random-initialised (seed 0) and saved: what training and evaluation load as its weights."""
    import timm
    from safetensors.torch import save_file

    from autopeft.backbones import create_backbone

    torch.manual_seed(0)
    cfg = timm.models.get_pretrained_cfg(backbone)  # its own head: a weights file loads as a pretrained one does
    model = create_backbone(backbone, num_classes=getattr(cfg, "num_classes", None) or 1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return sum(p.numel() for p in model.parameters())


def prepare(check: Check) -> dict:
    start = time.perf_counter()
    folder = make_image_folder(check.folder, check.images, check.image_wh)
    params = write_random_weights(check.backbone, check.weights)
    return {"images": folder, "backbone_params": params, "seconds": time.perf_counter() - start}


# -- (a) methods --------------------------------------------------------------------------------------------------


def make_stepper(model: torch.nn.Module, device: torch.device, precision: str, batch: int, size: int,
                 classes: int) -> Callable[[], None]:
    """One training step on a fixed batch on the device, as train.run_epochs steps (the project's optimiser,
    autocast, gradient scaler for fp16, clipping), without the data."""
    from autopeft.optim import make_optimizer
    from autopeft.train import autocast
    from autopeft.train_config import TrainConfig

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, TrainConfig(lr=1e-4))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()

    return step


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int, rounds: int) -> float:
    """Seconds per step: the median over `rounds` of `steps` back-to-back steps (synchronised only around each
    round, so the host's kernel launches overlap the device's work as in training)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def _method_row(check: Check, label: str, method: str, options: dict, size: int) -> dict[str, Any]:
    from benchmarks.methods_throughput import _build

    free(check.device)
    base = 0
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
        base = torch.cuda.memory_allocated(check.device)
    model = _build(check.backbone, size, method, options, str(check.device)).train()
    if check.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step = make_stepper(model, check.device, check.precision, check.batch, size, 100)
    seconds = time_steps(step, check.device, check.warmup, check.steps, check.rounds)
    peak = (torch.cuda.max_memory_allocated(check.device) - base) / MB if check.device.type == "cuda" else None
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n)
    log(f"(a) {label:22s} {1000 * seconds:8.1f} ms/step  {check.batch / seconds:8.1f} img/s"
        + (f"  {peak:8.0f} MB" if peak is not None else ""))
    return {"label": label, "method": method, "frozen_backbone": method not in ("full", "partial"),
            "params": trainable, "step_ms": 1000 * seconds, "images_per_s": check.batch / seconds, "peak_mb": peak}


def part_a(check: Check) -> dict:
    from autopeft.data import data_config
    from benchmarks.methods_throughput import CONFIGS

    size = int(data_config(check.backbone)["input_size"][-1])
    rows: list[dict[str, Any]] = []
    for label, method, options in CONFIGS:
        if method.startswith("peft"):  # HF peft is not on the GPU machine
            continue
        try:
            rows.append(_method_row(check, label, method, options, size))
        except Exception as exc:  # noqa: BLE001  one method's failure (an OOM, a bug) is its row; the rest still run
            rows.append({"label": label, "method": method, "error": f"{type(exc).__name__}: {exc}"[:300]})
            log(f"(a) {label:22s} FAILED: {rows[-1]['error']}")
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    full = next(r for r in rows if r["method"] == "full")
    for r in rows:
        r["time_vs_full"] = r["step_ms"] / full["step_ms"]
        r["mem_vs_full"] = r["peak_mb"] / full["peak_mb"] if r["peak_mb"] is not None and full["peak_mb"] else None
    frozen = [r for r in rows if r["frozen_backbone"]]
    worst = max(frozen, key=lambda r: r["time_vs_full"])
    return {"image_size": size, "rows": rows, "failed": failed, "slowest_frozen": worst["label"],
            "slowest_frozen_vs_full": worst["time_vs_full"],
            "over_target": [r["label"] for r in frozen if r["time_vs_full"] > FROZEN_MAX_RATIO]}


# -- (b) the data path against the model ---------------------------------------------------------------------------


@contextlib.contextmanager
def timed_source(src: Any, record: list[dict]) -> Iterator[None]:
    """While the block runs, `src.batches` records each epoch's time spent waiting for its batches (data wait);
    undone after it (the wrapper refers to `src`: left in place, the cycle would keep its loader's worker processes
    until a garbage collection, which then waits seconds for them)."""
    inner = getattr(src, "batches", None)
    if inner is None:
        yield
        return

    def batches(index_batches: list[list[int]]) -> Iterator[Any]:
        wait, images = 0.0, 0
        it = iter(inner(index_batches))
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t
            images += len(item[1])
            yield item
        record.append({"data_wait_s": wait, "images": images})

    setattr(src, "batches", batches)  # noqa: B010  (an instance attribute over the method)
    try:
        yield
    finally:
        delattr(src, "batches")


def data_only(src: Any, n: int, batch: int, device: torch.device, epochs: int) -> list[dict]:
    """Images/s of the data path alone: each epoch's batches (a fresh order) moved to the device, no model."""
    out = []
    gen = torch.Generator().manual_seed(1)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen).tolist()
        idx = [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
        t0, images = time.perf_counter(), 0
        for x, y in src.batches(idx):
            x = x.to(device, non_blocking=True)
            images += len(y)
        sync(device)
        seconds = time.perf_counter() - t0
        out.append({"epoch": epoch, "images": images, "seconds": seconds, "images_per_s": images / seconds})
    return out


def part_b(check: Check) -> dict:
    from autopeft.data import data_config
    from autopeft.train import run_epochs, set_up
    from autopeft.train_config import steps_per_epoch

    data = check.data()
    config = check.config(epochs=check.epochs_b)
    run = set_up(check.backbone, check.lora_all(), data, config, weights=str(check.weights), eval_split=None)
    waits: list[dict] = []
    n_train = len(run.train_src)
    per_epoch = steps_per_epoch(n_train, run.config.batch_size)
    stamps: list[float] = []

    def on_step(step: int, total: int) -> None:
        if step % per_epoch == 0:  # an epoch's last step: its time, the device's work included
            sync(check.device)
            stamps.append(time.perf_counter())

    log(f"(b) LoRA on {check.backbone}: {check.epochs_b} epochs of {n_train} images, batch {run.config.batch_size}, "
        f"{check.workers} loader process(es)")
    sync(check.device)
    t0 = time.perf_counter()
    with timed_source(run.train_src, waits):
        run_epochs(run, config, on_step=on_step)
    epochs = []
    for i, t in enumerate(stamps):
        seconds = t - (stamps[i - 1] if i else t0)
        row: dict[str, Any] = {"epoch": i + 1, "images": per_epoch * run.config.batch_size, "seconds": seconds}
        row["images_per_s"] = row["images"] / seconds
        if i < len(waits):
            row["data_wait_s"] = waits[i]["data_wait_s"]
            row["data_wait_share"] = waits[i]["data_wait_s"] / seconds
        epochs.append(row)
    # the model alone, on a batch already on the device: what the GPU's share of an epoch is measured against
    batch = run.config.batch_size
    size = int(data_config(check.backbone)["input_size"][-1])
    step = make_stepper(run.model, check.device, run.precision, batch, size, data.num_classes)
    model_s = time_steps(step, check.device, check.warmup, check.steps, check.rounds)
    for row in epochs:
        row["busy_share"] = min(1.0, per_epoch * model_s / row["seconds"])
        log(f"(b) epoch {row['epoch']}: {row['images_per_s']:.1f} img/s, busy {100 * row['busy_share']:.0f} %"
            + (f", data wait {100 * row['data_wait_share']:.0f} %" if "data_wait_share" in row else ""))
    # the data path alone, as the run's own `source` prepares a split, on a copy of the folder (nothing of it cached
    # yet: its first epoch decodes every file as the training's first epoch did)
    source = run.source
    del step, run
    free(check.device)
    copy = check.tmp / "images_copy"
    shutil.copytree(check.folder, copy, dirs_exist_ok=True)
    copy_data = check.data(copy)
    src = source("train", "train", copy_data.train)
    data_epochs = data_only(src, len(src), batch, check.device, check.epochs_b)
    del src, source
    for row in data_epochs:
        log(f"(b) data path alone, epoch {row['epoch']}: {row['images_per_s']:.1f} img/s")
    later = epochs[1:] or epochs
    return {"plan": "lora r=8 on every block", "train_images": n_train, "batch": batch,
            "loader_workers": check.workers, "epochs": epochs, "data_only": data_epochs,
            "model_step_ms": 1000 * model_s, "model_images_per_s": batch / model_s,
            "later_busy_share": statistics.fmean(r["busy_share"] for r in later),
            "later_images_per_s": statistics.fmean(r["images_per_s"] for r in later)}


# -- (c) precision invariants ---------------------------------------------------------------------------------------


def part_c(check: Check) -> dict:
    from autopeft.deploy import evaluate_run
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.recipe import Recipe, load_data, train_recipe
    from autopeft.runs import load_run, write_run

    n = check.num_blocks()
    plans = {"cacheable: lora r=8 on the last half": PeftPlan.single(make_spec("lora", {"rank": 8}),
                                                                     range(n // 2, n)),
             "uncacheable: vpt_shallow n=10": PeftPlan.single(make_spec("vpt_shallow", {"length": 10}), ())}
    cases: list[dict[str, Any]] = []
    for precision in check.precisions_c:
        for label, plan in plans.items():
            recipe = Recipe(backbone=check.backbone, dataset=str(check.folder), plan=plan, epochs=check.epochs_c,
                            weights=str(check.weights), protocol="search",
                            training={"precision": precision, "batch_size": check.batch, "lr": 1e-3})
            data = load_data(recipe)
            recipe = recipe.replace(num_classes=data.num_classes)
            results = {}
            for cached in (False, True):
                results[cached] = train_recipe(recipe, data, device=str(check.device), feature_cache=cached,
                                               cache_dir=str(check.tmp / "feature_cache"),
                                               num_workers=check.workers)
            plain, cache = results[False], results[True]
            d_acc = max(abs(a["val_acc"] - b["val_acc"]) for a, b in zip(plain.history, cache.history, strict=True))
            d_loss = max(abs(a["train_loss"] - b["train_loss"]) / max(abs(a["train_loss"]), 1e-12)
                         for a, b in zip(plain.history, cache.history, strict=True))
            evaluations = {}
            for cached, result in results.items():
                out = check.tmp / "runs" / f"{precision}-{len(cases)}-{'cached' if cached else 'uncached'}"
                out.mkdir(parents=True)
                config = recipe.train_config(device=str(check.device), feature_cache=cached)
                info = {"dataset": data.name, "backbone": check.backbone, "weights": str(check.weights),
                        "num_classes": data.num_classes, "protocol": recipe.protocol, "config": config.to_dict(),
                        "split_seed": recipe.split_seed, "precision": result.precision}
                write_run(out, result, plan, info, recipe)
                ev = evaluate_run(load_run(out), "test", device=str(check.device))
                evaluations["cached" if cached else "uncached"] = {
                    "cached_blocks": result.cached_blocks, "recorded_test_acc": result.test_acc,
                    "evaluated_test_acc": ev["acc"], "precision": ev["precision"],
                    "exact": ev["acc"] == result.test_acc}
                del result
            curve_ok = d_acc <= VAL_ACC_TOL and d_loss <= TRAIN_LOSS_RTOL
            exact = all(e["exact"] for e in evaluations.values())
            cases.append({"precision": precision, "plan": label, "cached_blocks": cache.cached_blocks,
                          "val_acc_plain": [h["val_acc"] for h in plain.history],
                          "val_acc_cached": [h["val_acc"] for h in cache.history],
                          "max_val_acc_diff": d_acc, "max_train_loss_rel_diff": d_loss, "curve_ok": curve_ok,
                          "evaluate": evaluations, "evaluate_exact": exact, "ok": curve_ok and exact})
            log(f"(c) {precision} {label}: Δval_acc {d_acc:.4f}, Δtrain_loss {100 * d_loss:.2f} %, "
                f"evaluate reproduces the test accuracy: {'yes' if exact else 'NO'}")
            del results, plain, cache
            free(check.device)
    return {"tolerance": {"val_acc": VAL_ACC_TOL, "train_loss_rel": TRAIN_LOSS_RTOL}, "cases": cases,
            "ok": all(c["ok"] for c in cases)}


# -- (d) concurrent training processes ------------------------------------------------------------------------------


class _WindowDone(Exception):
    pass


def worker(spec: dict) -> int:
    """One (d) process: train LoRA, say READY after a warm first epoch, wait for GO on stdin, train for the window,
    print the images and seconds of the window as a RESULT line."""
    from autopeft.backbones import backbone_spec
    from autopeft.data import data_config, load_dataset
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.train import num_samples, train
    from autopeft.train_config import TrainConfig, fitted_batch, steps_per_epoch

    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    backbone = spec["backbone"]
    data = load_dataset(spec["folder"], **data_config(backbone))
    plan = PeftPlan.single(make_spec("lora", {"rank": 8}), range(backbone_spec(backbone).num_blocks))
    n = num_samples(data.train)
    batch = fitted_batch(spec["batch"], n)
    warm = steps_per_epoch(n, batch) + 2  # a whole first epoch: its images are decoded once, as a trial's are
    config = TrainConfig(epochs=100_000, batch_size=spec["batch"], lr=1e-3, precision=spec["precision"],
                         device=spec["device"], num_workers=0, feature_cache=False, seed=spec["rank"])
    state: dict[str, float] = {}

    def on_step(step: int, total: int) -> None:
        if "t0" not in state:
            if step >= warm:
                sync(device)
                if device.type == "cuda":  # idle until its round: hold no more of the GPU than its tensors
                    torch.cuda.empty_cache()
                print(READY, flush=True)
                sys.stdin.readline()
                state.update(t0=time.perf_counter(), s0=step)
        elif time.perf_counter() - state["t0"] >= spec["window"]:
            sync(device)
            state.update(seconds=time.perf_counter() - state["t0"], images=(step - state["s0"]) * batch)
            raise _WindowDone

    try:
        train(backbone, plan, data, config, weights=spec["weights"], eval_split=None, on_step=on_step)
    except _WindowDone:
        pass
    print(RESULT, json.dumps({"rank": spec["rank"], "images": state["images"], "seconds": state["seconds"],
                              "images_per_s": state["images"] / state["seconds"]}), flush=True)
    return 0


def _read_until(proc: subprocess.Popen, prefix: str, logs: dict[int, Path]) -> str:
    """The rest of the worker's first line that starts with `prefix`; its exit and its stderr's end where it ends
    (or is killed at the time limit) without one."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    code = proc.wait()
    tail = " ".join(logs[proc.pid].read_text()[-600:].split()) if proc.pid in logs else ""
    raise RuntimeError(f"a worker exited (code {code}) before saying {prefix}" + (f"; its stderr ends: {tail}"
                                                                                 if tail else ""))


def part_d(check: Check) -> dict:
    """Every round's workers start at once (their start-up and warm first epoch overlap); each round then trains
    alone: its workers get GO together and train for the same window while the other rounds' workers wait idle."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    groups: list[list[subprocess.Popen]] = []
    logs: dict[int, Path] = {}

    def kill_all() -> None:
        for p in (p for g in groups for p in g):
            p.kill()

    timer = threading.Timer(120 if check.smoke else 360, kill_all)
    timer.start()
    runs = []
    try:
        log(f"(d) starting {sum(check.concurrency)} LoRA training processes for rounds of "
            f"{', '.join(map(str, check.concurrency))}; each warms up for one epoch")
        for n in check.concurrency:
            group = []
            for i in range(n):
                spec = {"backbone": check.backbone, "weights": str(check.weights), "folder": str(check.folder),
                        "batch": check.batch, "precision": check.precision, "device": str(check.device),
                        "window": check.window, "rank": i,
                        "threads": 1 if check.smoke else max(1, (os.cpu_count() or 1) // n)}
                path = check.tmp / f"worker{n}-{i}.log"
                with path.open("w") as err:
                    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--worker",
                                             json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err, text=True, cwd=str(ROOT), env=env)
                logs[proc.pid] = path
                group.append(proc)
            groups.append(group)
        for proc in (p for g in groups for p in g):
            _read_until(proc, READY, logs)
        for n, group in zip(check.concurrency, groups, strict=True):
            log(f"(d) {n} concurrent process(es), {check.window:g} s window")
            for proc in group:  # all of the round's workers start their window together
                assert proc.stdin is not None
                proc.stdin.write("GO\n")
                proc.stdin.flush()
            rows = [json.loads(_read_until(proc, RESULT, logs)) for proc in group]
            for proc in group:
                proc.wait(timeout=60)
            runs.append({"processes": n, "per_process": rows,
                         "summed_images_per_s": sum(r["images_per_s"] for r in rows)})
            log(f"(d) {n} process(es): {runs[-1]['summed_images_per_s']:.1f} img/s summed")
    finally:
        timer.cancel()
        for proc in (p for g in groups for p in g):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    one = runs[0]["summed_images_per_s"]
    for r in runs:
        r["vs_one"] = r["summed_images_per_s"] / one
    return {"window_s": check.window, "runs": runs, "most": runs[-1]["processes"], "most_vs_one": runs[-1]["vs_one"]}


# -- (e) memory after a trial that raised ------------------------------------------------------------------------


class _TrialFailed(Exception):
    pass


def part_e(check: Check) -> dict:
    from autopeft.train import train

    cuda = check.device.type == "cuda"
    data = check.data()
    plan = check.lora_all()
    config = check.config(epochs=2, train_fraction=0.5 if not check.smoke else 1.0)

    def used() -> int:
        free(check.device)
        return torch.cuda.memory_allocated(check.device) if cuda else rss_bytes()

    def boom_step(step: int, total: int) -> None:
        if step == 3:
            raise _TrialFailed("raised mid-epoch (on_step)")

    def boom_report(metrics: dict) -> None:
        raise _TrialFailed("raised from the report callback after epoch 1")

    start = used()
    log("(e) a trial that finishes (the baseline after it)")
    train(check.backbone, plan, data, config, weights=str(check.weights))
    baseline = used()
    cases = []
    for label, kwargs in (("on_step", {"on_step": boom_step}), ("report", {"report": boom_report})):
        log(f"(e) a trial that raises ({label})")
        try:
            train(check.backbone, plan, data, config, weights=str(check.weights), **kwargs)
        except _TrialFailed:
            pass
        else:
            raise RuntimeError(f"the {label} trial did not raise")
        after = used()
        cases.append({"raised_from": label, "after_mb": after / MB, "diff_mb": (after - baseline) / MB,
                      "ok": after - baseline <= LEAK_TOL_BYTES if cuda else None})
        log(f"(e) after the {label} trial: {(after - baseline) / MB:+.1f} MB against the baseline")
    return {"measure": "torch.cuda.memory_allocated" if cuda else "process RSS (n/a on CPU: not judged)",
            "before_any_mb": start / MB, "baseline_mb": baseline / MB, "cases": cases,
            "ok": all(c["ok"] for c in cases) if cuda else None}


# -- the report ---------------------------------------------------------------------------------------------------


def targets(report: dict) -> list[dict]:
    """The issue's targets and the invariants, each PASS, FAIL or n/a (a part that failed or did not run)."""
    on_cpu = report["settings"]["device"] == "cpu"
    a, b, c, d, e = (report.get(k) or {} for k in ("a_methods", "b_data_path", "c_precision", "d_concurrency",
                                                     "e_memory"))
    out = []

    def add(name: str, value: Any, threshold: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "threshold": threshold,
                    "result": "n/a" if ok is None else "PASS" if ok else "FAIL", "note": note})

    v = a.get("slowest_frozen_vs_full")
    add("every frozen-backbone method's step time / full fine-tuning's", v, f"<= {FROZEN_MAX_RATIO}",
        None if v is None else v <= FROZEN_MAX_RATIO,
        f"slowest {a['slowest_frozen']}; over: {', '.join(a['over_target']) or 'none'}" if v is not None else "")
    v = b.get("later_busy_share")
    add("GPU busy share of a LoRA epoch after the first", v, f">= {BUSY_MIN}", None if v is None else v >= BUSY_MIN)
    v = d.get("most_vs_one")
    add(f"{d.get('most', 4)} concurrent trials' images/s / one trial's", v, f">= {CONCURRENT_MIN_RATIO}",
        None if v is None else v >= CONCURRENT_MIN_RATIO)
    add("precision invariants (cached = uncached curve, evaluate reproduces test acc)", None, "all cases",
        c.get("ok"))
    add("device memory back to its baseline after a trial that raised", None, f"<= +{LEAK_TOL_BYTES // MB} MB",
        e.get("ok"), "RSS on the CPU: not judged" if e.get("cases") and e.get("ok") is None else "")
    if on_cpu:
        for t in out:
            t["note"] = (t["note"] + "; " if t["note"] else "") + "a CPU run: not the GPU result"
    return out


def _f(v: Any, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def table(report: dict) -> str:
    s = report["settings"]
    lines = [f"GPU check: {s['backbone']} on {report['device_name']} ({s['device']}), {s['precision']}, batch "
             f"{s['batch']}{' [smoke]' if s['smoke'] else ''}, {report['seconds']:.0f} s", ""]
    a = report.get("a_methods") or {}
    lines.append("(a) methods" + (f": ERROR {a['error']}" if "error" in a else f" at {a.get('image_size')} px"))
    if a.get("rows"):
        lines += ["| method | trainable | step ms | img/s | peak MB | time / full | memory / full |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['params']:,} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                  f"{_f(r['peak_mb'], '.0f')} | {r['time_vs_full']:.2f} | {_f(r['mem_vs_full'])} |"
                  for r in a["rows"]]
        lines += [f"| {r['label']} | ERROR {r['error']} | | | | | |" for r in a.get("failed", [])]
    b = report.get("b_data_path") or {}
    lines += ["", "(b) data path against the model, " + (f"ERROR {b['error']}" if "error" in b else
                                                       f"{b.get('plan')}, {b.get('loader_workers')} loader(s)")]
    if b.get("epochs"):
        lines += [f"model alone: {b['model_images_per_s']:.1f} img/s ({b['model_step_ms']:.1f} ms/step)",
                  "| epoch | train img/s | busy | data wait | data path alone img/s |", "|---:|---:|---:|---:|---:|"]
        alone = {r["epoch"]: r["images_per_s"] for r in b.get("data_only", [])}
        for r in b["epochs"]:
            wait = r.get("data_wait_share")
            lines.append(f"| {r['epoch']} | {r['images_per_s']:.1f} | {100 * r['busy_share']:.0f} % | "
                         f"{'—' if wait is None else f'{100 * wait:.0f} %'} | {_f(alone.get(r['epoch']), '.1f')} |")
    c = report.get("c_precision") or {}
    lines += ["", "(c) precision invariants" + (f": ERROR {c['error']}" if "error" in c else "")]
    if c.get("cases"):
        lines += ["| precision | plan | cached blocks | max Δ val acc | max Δ train loss | evaluate = recorded |",
                  "|---|---|---:|---:|---:|---|"]
        lines += [f"| {x['precision']} | {x['plan']} | {x['cached_blocks']} | {x['max_val_acc_diff']:.4f} | "
                  f"{100 * x['max_train_loss_rel_diff']:.2f} % | {'yes' if x['evaluate_exact'] else 'NO'} |"
                  for x in c["cases"]]
    d = report.get("d_concurrency") or {}
    lines += ["", "(d) concurrent training processes" + (f": ERROR {d['error']}" if "error" in d else "")]
    if d.get("runs"):
        lines += ["| processes | per process img/s | summed img/s | × one |", "|---:|---|---:|---:|"]
        for r in d["runs"]:
            each = ", ".join(format(x["images_per_s"], ".1f") for x in r["per_process"])
            lines.append(f"| {r['processes']} | {each} | {r['summed_images_per_s']:.1f} | {r['vs_one']:.2f} |")
    e = report.get("e_memory") or {}
    lines += ["", "(e) memory after a trial that raised" + (f": ERROR {e['error']}" if "error" in e else
                                                             f" ({e.get('measure')})")]
    if e.get("cases"):
        lines.append(f"baseline {e['baseline_mb']:.1f} MB (before any trial {e['before_any_mb']:.1f} MB)")
        lines += [f"- raised from {x['raised_from']}: {x['diff_mb']:+.1f} MB" for x in e["cases"]]
    lines += ["", "Targets:"]
    lines += [f"{t['result']:4s}  {t['target']}: {_f(t['value'])} ({t['threshold']})"
              + (f"  [{t['note']}]" if t["note"] else "") for t in report["targets"]]
    return "\n".join(lines)


def run_part(report: dict, key: str, title: str, fn: Callable[[], dict], check: Check) -> None:
    if time.monotonic() > check.deadline:
        report[key] = {"error": "skipped: the --minutes budget is spent"}
        log(f"{title}: skipped (budget spent)")
        return
    log(f"{title} ...")
    t0 = time.perf_counter()
    try:
        report[key] = fn()
    except Exception as exc:  # noqa: BLE001  a part's failure is its result; the next part still runs
        report[key] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                       "traceback": traceback.format_exc()[-3000:]}
        log(f"{title} FAILED: {report[key]['error']}")
    report[key]["seconds"] = time.perf_counter() - t0
    free(check.device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_BACKBONE} on the CPU, small data: < 1 minute")
    p.add_argument("--out", default=None, help="the JSON (default benchmarks/results/gpu_check.json; "
                                                "gpu_check_smoke.json under --smoke)")
    p.add_argument("--backbone", default=None,
                   help=f"timm name (default {GPU_BACKBONE}; {SMOKE_BACKBONE} under --smoke)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; 16 under --smoke)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="precision of (a), (b), (d), (e); (c) runs bf16 and fp16")
    p.add_argument("--minutes", type=float, default=8.0, help="budget: parts not started by then are skipped")
    p.add_argument("--images", type=int, default=None, help="generated JPEGs (default 2000; 300 under --smoke)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes of (b), (c), (e) "
                                                             "(default min(8, CPUs - 1); 1 under --smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round in (a) and (b)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default cuda when there is one)")
    p.add_argument("--parts", default=PARTS, help="which of a, b, c, d, e to run (default all)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))
    if not args.smoke and args.device is None and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here; run --smoke for the CPU check of the code (or --device cpu to run "
              f"the full check on the CPU, which takes hours with {GPU_BACKBONE})", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        return check_all(args, argv)
    finally:
        torch.set_num_threads(threads)


def check_all(args: argparse.Namespace, argv: list[str] | None) -> int:
    out = Path(args.out).absolute() if args.out else None
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        check = Check(args, Path(tmp))
        if check.device.type == "cpu":  # one thread under --smoke: a shared 2-core machine runs it fastest
            torch.set_num_threads(1 if check.smoke else max(1, min(4, os.cpu_count() or 1)))
        import timm

        report: dict[str, Any] = {
            "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": started, "settings": check.settings(),
            "device_name": torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else
            f"CPU ({os.cpu_count()} cores)",
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        }
        log(f"{check.backbone} on {report['device_name']}, {check.precision}, batch {check.batch}"
            + (" [smoke]" if check.smoke else ""))
        log(f"generating {check.images} JPEGs and random {check.backbone} weights")
        try:
            report["setup"] = prepare(check)
        except Exception as exc:  # noqa: BLE001  nothing can run without the inputs; the JSON still says why
            report["setup"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        parts: list[tuple[str, str, Callable[[Check], dict]]] = [
            ("a", "a_methods", part_a), ("b", "b_data_path", part_b), ("c", "c_precision", part_c),
            ("d", "d_concurrency", part_d), ("e", "e_memory", part_e)]
        titles = {"a": "(a) methods' step time", "b": "(b) data path against the model",
                  "c": "(c) precision invariants", "d": "(d) concurrent training processes",
                  "e": "(e) memory after a trial that raised"}
        for letter, key, fn in parts:
            if letter not in args.parts:
                continue
            if "error" in report["setup"]:
                report[key] = {"error": "set-up failed: " + report["setup"]["error"]}
                continue
            run_part(report, key, titles[letter], functools.partial(fn, check), check)
        report["seconds"] = time.perf_counter() - t0
        report["targets"] = targets(report)
        path = write_result(out or f"gpu_check{'_smoke' if check.smoke else ''}.json", report)
    print(table(report), flush=True)
    log(f"wrote {path}")
    failed = [k for k, v in report.items() if isinstance(v, dict) and ("error" in v or v.get("failed"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
