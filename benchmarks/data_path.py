"""The image data path on the CPU: a folder of JPEGs decoded every epoch (the store off) against the image store
(decoded once per node, then memory-mapped), at the bundled backbone's 32 px and at 224 px.

    python -m benchmarks.data_path [--images 2000] [--threads 2] [--write]

Generates `--images` JPEGs at 500×375 (10 classes; 80 % train, 10 % val, 10 % test) in a temporary folder, then for
each input size: the train split read once with the store off (what every epoch cost before the store: decode,
resize, normalise in the training thread), the store's first pass (decode and resize into the store with
`--threads` threads), a later epoch read from the store (uint8 batches of 64 in the trainer's seeded order,
normalised), two processes started at once on a fresh store (how many images each decodes), and a LoRA plan's
training epoch on the stored split, whose data share is the later epoch's read time (train and val) over the
epoch's time. 32 px trains the bundled backbone on the whole split; 224 px trains a random-initialised
vit_tiny_patch16_224 on `--fraction` of it (the CPU is slow there; the share is per image either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks import write_result

SIZES = {32: "autopeft_tiny_vit", 224: "vit_tiny_patch16_224"}
ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, images: int, seed: int = 0) -> Path:
    """Photo-like JPEGs (smooth colour fields with texture, quality 90) at 500×375 in train/val/test class folders."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        folder = root / split / f"c{(i // 10) % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noise = rng.normal(0, 12, (375, 500, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _read_epoch(dataset, batch: int, device: str = "cpu") -> float:
    """Seconds per image to read `dataset`'s full batches once, in the trainer's seeded order, as it reads them."""
    from autopeft.train import _Batches, _Source, fitted_batch

    source = _Source(dataset, None, 0, device=device)
    order = _Batches(len(dataset), fitted_batch(batch, len(dataset)), 0).epoch()
    start = time.perf_counter()
    for x, _ in source.batches(order):
        x.sum()  # touch the batch
    return (time.perf_counter() - start) / sum(len(b) for b in order)


def _concurrent(folder: Path, size: int, store: Path, processes: int = 2) -> list[int]:
    script = (
        "import json\n"
        "import autopeft.data.datasets as ds\n"
        "from autopeft.data import data_config, load_dataset\n"
        f"data = load_dataset({str(folder)!r}, **{{**data_config({SIZES[size]!r}), "
        f"'input_size': (3, {size}, {size})}})\n"
        "data.train.pixel_batch([0])\n"
        "print(json.dumps(ds.DECODED))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AUTOPEFT_PIXEL_CACHE": str(store)}
    env.pop("AUTOPEFT_PIXEL_CACHE_MB", None)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(processes)]
    return [int(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def measure(folder: Path, size: int, threads: int, fraction: float, work: Path) -> dict:
    from autopeft.backbones import backbone_spec
    from autopeft.data import data_config, load_dataset
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.train import TrainConfig, train

    torch.set_num_threads(threads)
    backbone = SIZES[size]
    kw = {**data_config(backbone), "input_size": (3, size, size)}
    batch = 64
    row: dict = {"input_size": size, "backbone": backbone}

    os.environ["AUTOPEFT_PIXEL_CACHE_MB"] = "0"
    os.environ["AUTOPEFT_IMAGE_CACHE_MB"] = "0"
    plain = load_dataset(str(folder), **kw)
    n = len(plain.train)
    row["train_images"] = n
    row["decode_every_epoch_img_s"] = 1 / _read_epoch(plain.train, batch)

    os.environ.pop("AUTOPEFT_PIXEL_CACHE_MB")
    os.environ["AUTOPEFT_PIXEL_CACHE"] = str(work / f"store{size}")
    data = load_dataset(str(folder), **kw)
    start = time.perf_counter()
    data.train.stored()
    row["first_pass_img_s"] = n / (time.perf_counter() - start)
    data.val.stored()
    read_train = _read_epoch(data.train, batch)
    read_val = _read_epoch(data.val, 256) * len(data.val)
    row["stored_epoch_img_s"] = 1 / read_train
    row["stored_bytes_per_image"] = 3 * size * size

    row["concurrent_decoded"] = _concurrent(folder, size, work / f"concurrent{size}")

    frac = 1.0 if size == 32 else fraction
    plan = PeftPlan.single(make_spec("lora", {"rank": 4}), range(backbone_spec(backbone).num_blocks))
    cfg = TrainConfig(epochs=2, batch_size=batch, lr=1e-3, feature_cache=False, train_fraction=frac,
                      eval_batch_size=256)
    result = train(backbone, plan, data, cfg, pretrained=size == 32)
    epoch_s = result.history[-1]["seconds"]
    trained = round(n * frac) // result.batch_size * result.batch_size
    data_s = read_train * trained + read_val
    row.update(train_fraction=frac, lora_epoch_s=epoch_s, model_img_s=trained / epoch_s,
               data_share_after_first=data_s / epoch_s)
    print(json.dumps(row), file=sys.stderr)
    return row


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Command: `python -m benchmarks.data_path {' '.join(sys.argv[1:])}`  ",
        f"Date: {date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads; {args.images} "
        "JPEGs at 500×375 (80 % train), batch 64; LoRA r=4 on q,v of every block, second epoch.",
        "",
        "| input | decode every epoch img/s | store first pass img/s | stored epoch img/s | LoRA training img/s "
        "(backbone) | data share of a later epoch | decoded by 2 concurrent trials |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['input_size']} px | {r['decode_every_epoch_img_s']:.0f} | {r['first_pass_img_s']:.0f} | "
                     f"{r['stored_epoch_img_s']:.0f} | {r['model_img_s']:.1f} ({r['backbone']}) | "
                     f"{100 * r['data_share_after_first']:.2f} % | "
                     f"{' + '.join(str(d) for d in r['concurrent_decoded'])} of {r['train_images']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.2, help="share of the train split trained at 224 px")
    p.add_argument("--sizes", type=int, nargs="+", default=sorted(SIZES), choices=sorted(SIZES))
    p.add_argument("--write", action="store_true", help="write benchmarks/results/data_path.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        folder = make_folder(work / "images", args.images)
        print(f"{args.images} JPEGs written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows = [measure(folder, size, args.threads, args.fraction, work) for size in args.sizes]
    print(table(rows, args))
    if args.write:
        write_result("data_path.json", {"args": vars(args), "date": str(date.today()), "rows": rows})


if __name__ == "__main__":
    main()
