"""How good `autopeft train`'s default learning rate is: each method at the default and at a fixed lr grid.

    python -m benchmarks.lr_sweep --write                          # digits, 3 epochs (issue [I] item 3)
    python -m benchmarks.lr_sweep --task mnist5k_fs --epochs 3,15 --write

For every (method, epochs) the run at `autopeft train`'s defaults (TrainConfig: AdamW, batch 32, 1 warm-up epoch,
cosine, the learning rate it derives when none is given) and one run per learning rate of the grid, every other
setting equal, seed 0. Each run trains on `train`, reports val after every epoch and test once at the end (as
`autopeft train` does). The figure: the default's test accuracy minus the best test accuracy of the grid.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from typing import Any

from benchmarks import write_result

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("linear", {}),
    "lora r=4": ("lora", {"rank": 4}),
    "adapter d=8": ("adapter", {"dim": 8}),
    "vpt_deep n=10": ("vpt_deep", {"length": 10}),
}
LRS = (1e-3, 3e-3, 1e-2, 3e-2)  # the grid the default is judged against (issue [I] item 3)
EXTRA_LRS = (1e-1,)  # above it: where a derived rate of the grid's top lands


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One `autopeft train` run of `job` (method, options, epochs, lr or None for the default), in-process."""
    import torch

    from autopeft.backbones import backbone_spec
    from autopeft.data import data_config, load_dataset
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.train import train
    from autopeft.train_config import TrainConfig

    torch.set_num_threads(1)
    spec = backbone_spec(job["backbone"])
    plan = PeftPlan.single(make_spec(job["method"], job["options"]), range(spec.num_blocks))
    data = load_dataset(job["task"], None, seed=0, **data_config(job["backbone"]))
    config = TrainConfig(epochs=job["epochs"], **({"lr": job["lr"]} if job["lr"] is not None else {}))
    start = time.perf_counter()
    result = train(job["backbone"], plan, data, config, eval_split="val", test=True)
    return {**job, "lr_used": result.lr,
            "val": [float(h["val_acc"]) for h in result.history if "val_acc" in h],
            "test_acc": float(result.test_acc), "seconds": time.perf_counter() - start}


def table(rows: list[dict[str, Any]], lrs: tuple[float, ...], extra: tuple[float, ...] = EXTRA_LRS) -> str:
    """Test accuracy per (method, epochs): the default's, the grid's and the extra rates' (not judged)."""
    shown = (*lrs, *extra)
    lines = ["| method | epochs | default lr | default test % | " + " | ".join(f"lr {x:g}" for x in shown)
             + " | default − best of grid |", "|---|---:|---:|---:|" + "---:|" * len(shown) + "---:|"]
    keys = sorted({(r["name"], r["epochs"]) for r in rows}, key=lambda k: (list(METHODS).index(k[0]), k[1]))
    for name, epochs in keys:
        group = {r["lr"]: r for r in rows if r["name"] == name and r["epochs"] == epochs}
        default = group[None]
        grid = [100 * group[x]["test_acc"] for x in lrs]
        others = [f"{100 * group[x]['test_acc']:.1f}" if x in group else "–" for x in extra]
        lines.append(f"| {name} | {epochs} | {default['lr_used']:.2g} | {100 * default['test_acc']:.1f} | "
                     + " | ".join([f"{g:.1f}" for g in grid] + others)
                     + f" | {100 * default['test_acc'] - max(grid):+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lr_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits")
    p.add_argument("--backbone", default="autopeft_tiny_vit")
    p.add_argument("--epochs", default="3", help="comma-separated epoch counts")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of: " + ", ".join(METHODS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write benchmarks/results/lr_sweep_<task>.json")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.exit(2, f"lr_sweep: unknown method(s) {', '.join(unknown)}; use: {', '.join(METHODS)}\n")
    epochs = [int(e) for e in args.epochs.split(",")]
    jobs = [{"name": n, "method": METHODS[n][0], "options": METHODS[n][1], "epochs": e, "lr": lr,
             "task": args.task, "backbone": args.backbone}
            for e in epochs for n in names for lr in (None, *LRS, *EXTRA_LRS)]
    start = time.perf_counter()
    if args.workers > 1:
        from benchmarks.compare import make_pool

        with make_pool(args.workers) as pool:
            rows = list(pool.map(run, jobs))
    else:
        rows = [run(j) for j in jobs]
    text = table(rows, LRS)
    print(text)
    if args.write:
        path = write_result(f"lr_sweep_{args.task}.json", {
            "command": "python -m benchmarks.lr_sweep " + " ".join(argv or []),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "wall_s": time.perf_counter() - start, "rows": rows, "table": text})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
