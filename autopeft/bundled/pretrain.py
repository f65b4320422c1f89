"""Pretrain the bundled tiny ViT on Fashion-MNIST, deterministically, on CPU.

    python -m autopeft.bundled.pretrain [--epochs N] [--out DIR] [--seed S] [--threads T]

Reads Debian's `dataset-fashion-mnist` (gzip IDX files), pads each 28 px image with 2 px of background on every
side to 32 px (target tasks such as digits are presented the same way, centred in 32 px, so transfer does not start
with an input shift), replicates the grey channel to 3 so RGB tasks fit, and trains all 60k training images with
light augmentation (random shift of up to 2 px, horizontal flip, occasional small random erasing), AdamW with
linear warm-up and cosine decay, and label smoothing. The 10k test set is evaluated once, at the end. Writes
`autopeft_tiny_vit.safetensors` (the model state dict, float32) and `autopeft_tiny_vit.json` (test accuracy,
epochs, seconds, seed, architecture, versions, command) into `--out` (default: this package directory).

On a shared machine run it with `OMP_WAIT_POLICY=PASSIVE` in the environment (it must be set before torch is
imported): with busy-waiting OpenMP threads a training step measured 8x slower when other processes held the cores.
It changes speed only, not results.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from autopeft.bundled import ARCH, BUNDLED_BACKBONE, MEAN, NUM_CLASSES, PAD, STD

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIFT = 2  # max random translation in px; larger shifts push the wide items (trousers, bags) off the frame


def read_idx(path: Path, offset: int) -> np.ndarray:
    """Reads a gzip IDX file as a flat uint8 array, skipping its `offset`-byte header (16 images, 8 labels)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one split padded to 32 px.

    Args:
        data_dir: folder with the four `*-ubyte.gz` files.
        split: "train" or "t10k".

    Returns:
        uint8 images (N, 32, 32) and int64 labels (N,).
    """
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz", 8)
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))  # background of Fashion-MNIST is 0
    return torch.from_numpy(padded.copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32) -> normalised float (B, 3, 32, 32), the grey channel replicated."""
    x = images.float().div_(255.0)
    x = (x - MEAN[0]) / STD[0]
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def augment(images: torch.Tensor, gen: torch.Generator, erase_p: float = 0.1) -> torch.Tensor:
    """Random shift (zero fill), horizontal flip and small random erasing, vectorised over the batch.

    Args:
        images: uint8 (B, 32, 32).
        gen: the generator all randomness is drawn from (determinism).
        erase_p: probability of erasing one rectangle of 2-15 % of the image to background.

    Returns:
        Augmented uint8 images of the same shape.
    """
    b, h, w = images.shape
    padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT))
    oy = torch.randint(0, 2 * SHIFT + 1, (b, 1), generator=gen)
    ox = torch.randint(0, 2 * SHIFT + 1, (b, 1), generator=gen)
    rows = (oy + torch.arange(h)).unsqueeze(2)
    cols = (ox + torch.arange(w)).unsqueeze(1)
    out = padded[torch.arange(b).view(b, 1, 1), rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.where(flip.view(b, 1, 1), out.flip(-1), out)
    area = torch.empty(b).uniform_(0.02, 0.15, generator=gen) * h * w
    aspect = torch.exp(torch.empty(b).uniform_(math.log(0.3), math.log(3.3), generator=gen))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    y0 = (torch.rand(b, generator=gen) * (h - eh + 1)).long()
    x0 = (torch.rand(b, generator=gen) * (w - ew + 1)).long()
    erase = torch.rand(b, generator=gen) < erase_p
    r = torch.arange(h).view(1, h, 1)
    c = torch.arange(w).view(1, 1, w)
    mask = (
        (r >= y0.view(b, 1, 1))
        & (r < (y0 + eh).view(b, 1, 1))
        & (c >= x0.view(b, 1, 1))
        & (c < (x0 + ew).view(b, 1, 1))
        & erase.view(b, 1, 1)
    )
    return out.masked_fill(mask, 0)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, device: str = "cpu"
) -> float:
    """Top-1 accuracy of `model` (already on `device`) on the given uint8 images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(to_input(images[i : i + batch_size]).to(device))
        correct += int((logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum())
    return correct / len(images)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m autopeft.bundled.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where weights + JSON go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="fixed intra-op thread count (results depend on it)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--erase-p", type=float, default=0.1, help="probability of random erasing per image")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--device", default="cpu", help="e.g. cuda; augmentation stays on the CPU generator")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (smoke tests)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="saved after every epoch (default OUT/pretrain-checkpoint.pt) and resumed from when present "
                        "with the same settings: a run killed after epoch k goes on at epoch k+1 with the same result")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the pretraining and writes the weights and the metadata JSON.

    Returns:
        The metadata that was written.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    # cuBLAS needs a fixed workspace for deterministic matmuls; must be set before CUDA initialises.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    train_x, train_y = load_split(args.data_dir, "train")
    test_x, test_y = load_split(args.data_dir, "t10k")
    if args.train_limit:
        train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]

    model = timm.create_model(BUNDLED_BACKBONE, pretrained=False, num_classes=NUM_CLASSES).to(args.device)
    # No weight decay on biases, norms, tokens and position embeddings (1-d or token parameters), as in DeiT.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in ("cls_token", "pos_embed"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = len(train_x) // args.batch_size  # drop the last partial batch: constant step cost
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 1e-5 + (args.lr - 1e-5) * 0.5 * (1.0 + math.cos(math.pi * progress))

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{BUNDLED_BACKBONE}: {ARCH}, {n_params:,} params; {len(train_x)} train images, "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, {args.threads} threads",
        flush=True,
    )
    checkpoint = args.checkpoint or args.out / "pretrain-checkpoint.pt"
    settings = json.dumps({k: str(v) for k, v in sorted(vars(args).items()) if k not in ("out", "checkpoint")})
    first_epoch, seconds_before = 0, 0.0
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved["settings"] != settings:
            raise SystemExit(f"{checkpoint} was written with other settings ({saved['settings']}); "
                             "delete it or pass the same options")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        first_epoch, seconds_before = int(saved["epoch"]), float(saved["seconds"])
        print(f"resumed from {checkpoint} after epoch {first_epoch}", flush=True)
    start = time.perf_counter() - seconds_before
    step = first_epoch * steps_per_epoch
    for epoch in range(first_epoch, args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_x), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = to_input(augment(train_x[idx], gen, args.erase_p)).to(args.device)
            y = train_y[idx].to(args.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.4f}, train acc (augmented) "
            f"{correct / seen:.4f}, lr {lr_at(step - 1):.2e}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        if epoch + 1 < args.epochs:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            partial = checkpoint.with_name(checkpoint.name + ".partial")
            torch.save({"settings": settings, "epoch": epoch + 1, "seconds": time.perf_counter() - start,
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state()},
                       partial)
            os.replace(partial, checkpoint)  # a kill while saving leaves the previous checkpoint intact
    train_seconds = time.perf_counter() - start

    test_acc = evaluate(model, test_x, test_y, device=args.device)  # the one and only look at the test set
    print(f"Fashion-MNIST test accuracy: {test_acc:.4f} ({train_seconds:.0f} s training)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = args.out / f"{BUNDLED_BACKBONE}.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # save_file creates it owner-only; an installed package must be readable by everyone
    info = {
        "name": BUNDLED_BACKBONE,
        "architecture": dict(ARCH, num_classes=NUM_CLASSES, timm_class="VisionTransformer"),
        "params": n_params,
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train, 10k test",
        "preprocess": {
            "pad": PAD,
            "input_size": [3, 32, 32],
            "mean": list(MEAN),
            "std": list(STD),
            "note": "28 px grey padded with 2 px background per side, replicated to 3 channels",
        },
        "augmentation": {"shift_px": SHIFT, "hflip": 0.5, "random_erasing": args.erase_p},
        "optimizer": {
            "name": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "warmup_epochs": args.warmup_epochs,
            "schedule": "cosine",
            "label_smoothing": args.label_smoothing,
            "grad_clip": 1.0,
        },
        "epochs": args.epochs,
        "train_images": len(train_x),
        "test_accuracy": round(test_acc, 4),
        "seconds": round(train_seconds, 1),
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m autopeft.bundled.pretrain", *argv]),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    }
    (args.out / f"{BUNDLED_BACKBONE}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    checkpoint.unlink(missing_ok=True)
    return info


if __name__ == "__main__":
    main()
