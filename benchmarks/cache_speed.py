"""Epoch time with and without the frozen-prefix feature cache, for plans touching the last 1/3, 1/2 and all blocks.

    python -m benchmarks.cache_speed [--backbone autopeft_tiny_vit] [--dataset digits] [--epochs 3] [--write]

Each plan is LoRA (rank 4, q,v) on the last third, the last half or every block. The cached run's first epoch pays
for computing the features (reported apart as "feature pass"); the speed-up compares the mean of the later epochs,
which is what every further epoch of a search trial costs. Both runs use the same seed and give the same results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date

import torch

from benchmarks import write_result


def measure(backbone: str, dataset: str, epochs: int, threads: int) -> list[dict]:
    from autopeft.backbones import backbone_spec
    from autopeft.data import data_config, load_dataset
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.train import TrainConfig, train

    torch.set_num_threads(threads)
    spec = backbone_spec(backbone)
    data = load_dataset(dataset, **data_config(backbone))
    n = spec.num_blocks
    rows = []
    for label, first in (("last 1/3", n - n // 3), ("last 1/2", n - n // 2), ("all blocks", 0)):
        plan = PeftPlan.single(make_spec("lora", {"rank": 4}), range(first, n))
        times: dict[bool, list[float]] = {}
        accs = {}
        for cached in (False, True):
            with tempfile.TemporaryDirectory() as cache_dir:
                cfg = TrainConfig(epochs=epochs, lr=3e-3, feature_cache=cached, cache_dir=cache_dir)
                start = time.perf_counter()
                result = train(backbone, plan, data, cfg)
                total = time.perf_counter() - start
            times[cached] = [h["seconds"] for h in result.history]
            accs[cached] = result.history[-1]["val_acc"]
            if cached:
                feature_pass = total - sum(times[cached])
        plain = statistics.mean(times[False][1:])
        fast = statistics.mean(times[True][1:])
        rows.append({"plan": f"lora r=4 on {label} (blocks {first}-{n - 1})", "cached_blocks": first,
                     "epoch_s_uncached": plain, "epoch_s_cached": fast, "speedup": plain / fast,
                     "feature_pass_s": feature_pass, "val_acc_uncached": accs[False], "val_acc_cached": accs[True]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Command: `python -m benchmarks.cache_speed {' '.join(sys.argv[1:])}`  ",
        f"Date: {date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads; backbone "
        f"{args.backbone}, {args.dataset} train split (800 images), batch 32; "
        f"mean epoch time of epochs 2-{args.epochs}.",
        "",
        "| plan | cached blocks | epoch s (no cache) | epoch s (cache) | speed-up | set-up + feature pass s | "
        "val acc no cache / cache |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['cached_blocks']} | {r['epoch_s_uncached']:.3f} | "
                     f"{r['epoch_s_cached']:.3f} | {r['speedup']:.2f}× | {r['feature_pass_s']:.2f} | "
                     f"{r['val_acc_uncached']:.3f} / {r['val_acc_cached']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="autopeft_tiny_vit")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write benchmarks/results/cache_speed.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = measure(args.backbone, args.dataset, args.epochs, args.threads)
    print(table(rows, args))
    if args.write:
        write_result("cache_speed.json", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
