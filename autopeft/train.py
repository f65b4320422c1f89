"""One training run of (backbone, plan, data, hyper-parameters), with a per-epoch report hook.

The same function runs inside a Ray Tune trial (reporting with `tune.report`) and in `autopeft train` (reporting to
a local logger), so search and final training cannot drift apart.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterator, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from autopeft.backbones import BackboneSpec, create_backbone, is_head_param, spec_of_model
from autopeft.data import DataSplits
from autopeft.errors import AutopeftError
from autopeft.features import FeatureCache, prefix_modules, suffix_forward, supports_cache, weights_hash
from autopeft.learning_rate import peak_rates
from autopeft.optim import make_optimizer, make_scheduler, rate_groups
from autopeft.plan import PeftPlan
from autopeft.train_config import (  # noqa: F401  (the training settings, also importable from here)
    MIN_STEPS_PER_EPOCH,
    RUN_FIELDS,
    SPACE_TRAINING_KEYS,
    TRAINING_KEYS,
    TrainConfig,
    check_training,
    fitted_batch,
    fitted_config,
    rescale_warmup,
    steps_per_epoch,
    total_steps,
    training_value,
)

Report = Callable[[dict], None]


class TrainingDiverged(AutopeftError):
    """The loss became NaN or infinite (usually a learning rate too high for the plan)."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    test_acc: float | None = None
    test_loss: float | None = None
    peft_params: int = 0
    head_params: int = 0
    seconds: float = 0.0
    cached_blocks: int = 0
    lr: float = 0.0  # the largest peak learning rate it trained at (`rates`: each group's)
    rates: dict[str, float] = field(default_factory=dict)  # peak rate by group: method name, or `head`
    precision: str = "fp32"  # the precision it computed at (`resolve_precision`: never auto)
    batch_size: int = 0  # the batch it trained with (fitted to the split, see `fitted_config`)
    drop_path: float = 0.0  # the drop-path rate it trained with
    notes: list[str] = field(default_factory=list)  # where the run trained otherwise than its config said, and why

    @property
    def val_acc(self) -> float | None:
        return self.history[-1].get("val_acc") if self.history else None  # None for --final runs (no val split)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AutopeftError(f"device {name} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run computes at on `device`: `auto` is bf16 on a GPU that has it natively (Ampere and later),
    fp16 on one that does not (V100, T4: bf16 there is emulated, slower than fp32), fp32 elsewhere; any other value
    as given (bf16 and fp16 run on the CPU too, through torch's CPU autocast)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        with torch.cuda.device(device):
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """What computes logits at `precision` (resolved) on `device`: torch's autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` in the memory layout every run uses there (channels-last on a GPU), so that a trained
    model evaluated later computes exactly as it did in training."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(backbone: str, plan: PeftPlan, num_classes: int, weights: str | None = None,
                pretrained: bool = True, drop_path: float = 0.0, slices: dict | None = None,
                img_size: int | None = None, owners: dict[str, str] | None = None) -> tuple[nn.Module, BackboneSpec]:
    """The backbone with its (pretrained) weights at input size `img_size` (None: its pretraining size), a fresh head
    and the plan applied (recording in `slices` and `owners` as `PeftPlan.apply` does), and its spec."""
    kwargs = {"drop_path_rate": drop_path} if drop_path else {}
    model = create_backbone(backbone, num_classes=num_classes, pretrained=pretrained, weights=weights,
                            img_size=img_size, **kwargs)
    spec = spec_of_model(model, backbone)  # of the model as built (image size overrides change the token grid)
    return plan.apply(model, spec, slices, owners), spec


class _Batches:
    """Seeded batch order: the same for cached and uncached runs of the same seed."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.generator = n, batch_size, torch.Generator().manual_seed(seed)

    def epoch(self) -> list[list[int]]:
        """The epoch's full batches (a partial last batch is dropped: `steps_per_epoch`)."""
        order = torch.randperm(self.n, generator=self.generator).tolist()
        steps = steps_per_epoch(self.n, self.batch_size)
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(steps)]


def num_samples(dataset: Dataset) -> int:
    """Samples of a map-style dataset (every dataset here has a length; Dataset's type does not say so)."""
    return len(cast(Sized, dataset))


def _subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    if fraction >= 1:
        return dataset
    n = num_samples(dataset)
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: max(1, round(n * fraction))]
    return Subset(dataset, sorted(keep.tolist()))


class _Planned:
    """A batch sampler that yields whatever batches it was last given: one DataLoader, and with workers one set of
    worker processes, serves every epoch's own order."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Source:
    """Batches of one split: either images through the whole model or cached block-k features.

    A split whose images are in the pixel store (`ImageFileDataset.pixel_batch`) is read from it as uint8, one batch
    ahead in a thread, copied to `device` and normalised there. Other images are prepared by `workers` DataLoader
    processes (0: in the training thread), kept alive across epochs; `pin` puts each batch in page-locked memory, so
    that its copy to a GPU overlaps the step."""

    def __init__(self, dataset: Dataset, cached: tuple[torch.Tensor, torch.Tensor] | None, workers: int,
                 pin: bool = False, device: torch.device | str = "cpu"):
        self.dataset, self.cached, self.workers, self.pin = dataset, cached, workers, pin
        self.device = torch.device(device)
        self._plan = _Planned()
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.cached[1]) if self.cached else num_samples(self.dataset)

    @functools.cached_property
    def _pixel_store(self) -> tuple[Any, list[int] | None] | None:
        """(the stored dataset, the Subset's indices into it or None), or None where the split is not stored."""
        base: Any = self.dataset
        index = None
        if isinstance(base, Subset):
            base, index = base.dataset, list(base.indices)
        return (base, index) if hasattr(base, "pixel_batch") and base.stored() is not None else None

    def _stored_batches(self, base: Any, index: list[int] | None, index_batches: list[list[int]]
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        normalize = base.normalize.on(self.device)

        def load(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = base.pixel_batch(batch if index is None else [index[i] for i in batch])
            return (x.pin_memory() if self.pin else x), y

        with ThreadPoolExecutor(1) as pool:  # gathers the next batch from the mapped file while this one trains
            ahead = pool.submit(load, index_batches[0]) if index_batches else None
            for i in range(len(index_batches)):
                assert ahead is not None
                x, y = ahead.result()
                ahead = pool.submit(load, index_batches[i + 1]) if i + 1 < len(index_batches) else None
                yield normalize(x.to(self.device, non_blocking=True)), y

    def batches(self, index_batches: list[list[int]]) -> Iterator[tuple[Any, Any]]:
        if self.cached:
            x, y = self.cached
            for idx in index_batches:
                yield x[idx], y[idx]
            return
        stored = self._pixel_store
        if stored is not None:
            yield from self._stored_batches(*stored, index_batches)
            return
        if self._loader is None:
            self._loader = DataLoader(self.dataset, batch_sampler=self._plan, num_workers=self.workers,
                                      pin_memory=self.pin, persistent_workers=self.workers > 0)
        self._plan.batches = index_batches
        yield from self._loader


@dataclass
class TrainSetup:
    """What the epoch loop needs: the model on its device and the batches of the splits (cached or not)."""

    model: nn.Module
    spec: BackboneSpec
    device: torch.device
    frozen_blocks: int  # blocks 0..k-1 stay as pretrained: they run as at inference, cached or not
    cached_blocks: int  # 0: images run through the whole model
    train_src: _Source
    eval_src: _Source | None
    forward: Callable[[torch.Tensor], torch.Tensor] | None  # replaces model(x) on cached features
    source: Callable[[str, str, Dataset], _Source]  # (role, split name, dataset) -> batches, for the test split
    rates: dict[str, float]  # peak rate by group (autopeft.learning_rate.peak_rates: given or derived, × lr_scale)
    owners: dict[str, str]  # trainable parameter name -> the method that trains it (`PeftPlan.apply`)

    @property
    def lr(self) -> float:
        """The run's reported peak rate: the largest group's."""
        return max(self.rates.values())
    precision: str  # resolved (`resolve_precision`): what every forward of the run computes at
    config: TrainConfig  # the run's config as it trains (`fitted_config`: batch and drop-path)
    notes: list[str]  # what `fitted_config` changed, and why


def set_up(backbone: str, plan: PeftPlan, data: DataSplits, config: TrainConfig, *, weights: str | None = None,
           pretrained: bool = True, train_split: str = "train", eval_split: str | None = "val",
           slices: dict | None = None) -> TrainSetup:
    """Seed, build the model with the plan applied, and prepare the splits' batches (see `train` for the arguments).

    The frozen prefix's features are computed once and cached when the plan leaves blocks 0..k-1 as pretrained and
    the images are not augmented; the epoch loop then runs only the blocks after them.
    """
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    seed_everything(config.seed)
    splits = {"train": _subset(data.split(train_split), config.train_fraction, config.seed)}
    config, notes = fitted_config(config, backbone, num_samples(splits["train"]))
    owners: dict[str, str] = {}
    model, spec = build_model(backbone, plan, data.num_classes, weights, pretrained, config.drop_path, slices,
                              config.img_size, owners)
    model = on_device(model, device)
    k = plan.frozen_prefix(spec) if supports_cache(model) else 0
    k = min(k, spec.num_blocks)
    augmenting = config.augment or bool(getattr(getattr(data.split(train_split), "settings", None), "augment", False))
    use_cache = config.feature_cache and k > 0 and not augmenting

    if eval_split:
        splits["eval"] = data.split(eval_split)
    cache = FeatureCache(config.cache_dir)
    w_hash = weights_hash(model, k) if use_cache else ""

    def source(role: str, split_name: str, dataset: Dataset) -> _Source:
        if not use_cache:
            return _Source(dataset, None, config.num_workers, pin=device.type == "cuda", device=device)
        suffix = f"@{config.train_fraction}:{config.seed}" if role == "train" and config.train_fraction < 1 else ""
        key = cache.key(backbone, w_hash, k, data.fingerprint, split_name + suffix, precision)
        return _Source(dataset, cache.features(model, k, dataset, key, config.eval_batch_size, device,
                                               lambda: autocast(precision, device)), 0)

    return TrainSetup(model=model, spec=spec, device=device, frozen_blocks=k, cached_blocks=k if use_cache else 0,
                  train_src=source("train", train_split, splits["train"]),
                  eval_src=source("eval", eval_split, splits["eval"]) if eval_split else None,
                  forward=(lambda x: suffix_forward(model, x, k)) if use_cache else None, source=source,
                  rates=peak_rates(config, plan, spec, num_samples(splits["train"])), owners=owners,
                  precision=precision, config=config, notes=notes)


def train_state(model: nn.Module, optimizer: torch.optim.Optimizer, batches: _Batches, epoch: int, step: int,
                history: list[dict], scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Everything the epoch loop needs to go on after `epoch` exactly as if it had not stopped: the trainable
    parameters (plan and head; the frozen backbone is rebuilt), the optimiser, the batch order and every random
    number generator, the step and the metrics so far. Small: no frozen weight is in it; tensors, numbers and text
    only, so `torch.load(..., weights_only=True)` reads it."""
    state: dict[str, Any] = {
        "epoch": epoch, "step": step, "history": [dict(h) for h in history],
        "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "batches": batches.generator.get_state(),
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    if scaler is not None and scaler.is_enabled():  # fp16: the loss scale it has found goes on from where it was
        state["scaler"] = scaler.state_dict()
    return state


def _numpy_state() -> tuple:
    """numpy's global RNG state with its key array as a tensor: a state file then loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, batches: _Batches,
             scaler: torch.amp.GradScaler) -> None:
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(state["params"]) != trainable:
        raise AutopeftError("the checkpoint does not belong to this run: its trainable parameters differ "
                            f"({len(state['params'])} saved, {len(trainable)} here)")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    batches.generator.set_state(state["batches"])
    torch.set_rng_state(state["rng"]["torch"])
    kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if "scaler" in state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])


def run_epochs(run: TrainSetup, config: TrainConfig, report: Report | None = None,
               on_step: Callable[[int, int], None] | None = None, resume: dict[str, Any] | None = None,
               checkpoint_every: int = 0, before_step: Callable[[int], float | None] | None = None,
               before_eval: Callable[[], None] | None = None) -> list[dict]:
    """Optimise for `config.epochs` epochs at the set-up's peak rates, evaluating after each; returns the metrics.
    `resume`: a `train_state` to go on from (the run then ends as the uninterrupted run would); `checkpoint_every`
    k > 0: every k-th epoch's report (but the last's) carries the `train_state` under `state`. `before_step(step)`
    runs before each optimiser step (0-based; a number it returns multiplies that step's scheduled rates) and
    `before_eval()` before each evaluation (a supernet sets its sub-plan and its rate there)."""
    config = replace(config, batch_size=run.config.batch_size)
    model, device, forward = run.model, run.device, run.forward
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(rate_groups(model, run.owners, run.rates), config)
    batches = _Batches(len(run.train_src), config.batch_size, config.seed)
    per_epoch = steps_per_epoch(len(run.train_src), config.batch_size)
    total = total_steps(len(run.train_src), config.batch_size, config.epochs)
    warmup = min(int(config.warmup_epochs * per_epoch), max(total - 1, 0))
    scheduler = make_scheduler(optimizer, config, total, warmup)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    frozen_prefix = prefix_modules(model, run.frozen_blocks) if run.frozen_blocks else []
    # fp16's narrow range needs its loss scaled (bf16 has fp32's range and needs none)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    history: list[dict] = []
    step, first = 0, 1
    if resume is not None:
        _restore(resume, model, optimizer, batches, scaler)
        history, step, first = [dict(h) for h in resume["history"]], int(resume["step"]), int(resume["epoch"]) + 1
    for epoch in range(first, config.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        for m in frozen_prefix:  # frozen blocks compute as at inference (no drop-path): cached and uncached agree
            m.eval()
        loss_sum, seen = 0.0, 0
        for images, labels in run.train_src.batches(batches.epoch()):
            images, labels = images.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
            factor = before_step(step) if before_step else None
            if factor is not None:  # the scheduler sets every step's rate afresh after the step
                for group in optimizer.param_groups:
                    group["lr"] *= factor
            with autocast(run.precision, device):
                loss = criterion((forward or model)(images).float(), labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"diverged: the loss became {loss.item()} at epoch {epoch}, step "
                                       f"{step + 1}; lower the learning rate (peak {run.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            scaler.step(optimizer)  # skipped by the scaler where fp16 gradients overflowed
            scaler.update()
            step += 1
            scheduler.step_update(step)
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
            if on_step:
                on_step(step, total)
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "lr": scheduler.factor * run.lr}
        if run.eval_src is not None:
            if before_eval:
                before_eval()
            metrics["val_loss"], metrics["val_acc"] = evaluate(model, run.eval_src, config.eval_batch_size, device,
                                                               forward, run.precision)
        metrics["seconds"] = time.perf_counter() - epoch_start
        history.append(metrics)
        if report:
            due = checkpoint_every > 0 and epoch % checkpoint_every == 0 and epoch < config.epochs
            report({**metrics, "state": train_state(model, optimizer, batches, epoch, step, history, scaler)} if due
                   else dict(metrics))
    return history


def train(
    backbone: str,
    plan: PeftPlan,
    data: DataSplits,
    config: TrainConfig,
    *,
    weights: str | None = None,
    pretrained: bool = True,
    train_split: str = "train",
    eval_split: str | None = "val",
    test: bool = False,
    report: Report | None = None,
    on_step: Callable[[int, int], None] | None = None,
    resume: dict[str, Any] | None = None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """Train `plan` on `backbone` and evaluate after every epoch.

    Args:
        backbone: timm model name.
        plan: the PEFT plan to apply.
        data: the dataset and its splits.
        config: optimisation and fidelity settings.
        weights: a local weights file for the backbone.
        pretrained: load pretrained weights (timm's, or `weights`).
        train_split: split to train on (`train` while searching, `train_full` for a final run).
        eval_split: split evaluated after every epoch (None: none).
        test: evaluate the test split once, after the last epoch.
        report: called after every epoch with {epoch, train_loss, val_loss, val_acc, seconds, lr (the largest)}.
        on_step: called after every optimiser step with (step, total steps), for progress bars.
        resume: a `train_state` from an earlier run of the same plan, data and config to go on from.
        checkpoint_every: every k-th epoch's report carries its `train_state` under `state` (0: none).
    """
    start = time.perf_counter()
    run = set_up(backbone, plan, data, config, weights=weights, pretrained=pretrained, train_split=train_split,
                 eval_split=eval_split)
    history = run_epochs(run, config, report, on_step, resume=resume, checkpoint_every=checkpoint_every)
    model = run.model
    result = TrainResult(model=model, history=history, cached_blocks=run.cached_blocks, lr=run.lr,
                         rates=dict(run.rates), precision=run.precision, batch_size=run.config.batch_size,
                         drop_path=run.config.drop_path, notes=list(run.notes), peft_params=plan.count(run.spec),
                         head_params=sum(p.numel() for n, p in model.named_parameters() if is_head_param(n)))
    if test:
        test_src = run.source("test", "test", data.split("test"))
        result.test_loss, result.test_acc = evaluate(model, test_src, config.eval_batch_size, run.device,
                                                     run.forward, run.precision)
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate(model: nn.Module, source: _Source | Dataset, batch_size: int = 256, device: torch.device | str = "cpu",
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None, precision: str = "fp32"
             ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over a split at `precision` (resolved: the run's own, so that a
    recorded accuracy is reproduced); `forward` replaces `model(x)` (cached features)."""
    device = torch.device(device)
    source = source if isinstance(source, _Source) else _Source(source, None, 0, device=device)
    forward = forward or model
    was_training = model.training
    model.eval()
    n = len(source)
    loss_sum, correct = 0.0, 0.0
    for images, labels in source.batches([list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]):
        images, labels = images.to(device), torch.as_tensor(labels).to(device)
        with autocast(precision, device):
            logits = forward(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)
