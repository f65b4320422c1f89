"""How hard each mini-suite task is for the bundled backbone: a linear probe (cheap: cached features) per task.

    python -m benchmarks.suite_probe [--epochs 20] [--lr 1e-2] [--write]

Linear probing trains only the head on the frozen backbone's features (the feature cache makes an epoch a matter of
milliseconds), so this table shows, in a minute, whether the pretrained features already solve a task (saturated:
no room for PEFT methods to differ) or leave room. Train on train (800 or 200), select nothing, report val and the
test accuracy of the same model.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone

from benchmarks import write_result


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--write", action="store_true", help="write benchmarks/results/suite_probe.json")
    args = p.parse_args(argv)
    import torch

    from autopeft.data import data_config, load_dataset
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.train import TrainConfig, train
    from benchmarks.suite import MINI_TASKS

    torch.set_num_threads(2)
    backbone = "autopeft_tiny_vit"
    plan = PeftPlan.single(make_spec("linear", {}), [])
    rows = []
    for task in MINI_TASKS:
        start = time.perf_counter()
        data = load_dataset(task, **data_config(backbone))
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=64, label_smoothing=0.1, warmup_epochs=1.0)
        result = train(backbone, plan, data, cfg, test=True)
        rows.append({"task": task, "classes": data.num_classes, "sizes": data.sizes(), "val": result.val_acc,
                     "test": result.test_acc, "seconds": time.perf_counter() - start})
        print(f"| {task} | {data.num_classes} | {data.sizes()['train']} / {data.sizes()['val']} / "
              f"{data.sizes()['test']} | {100 * result.val_acc:.1f} | {100 * result.test_acc:.1f} |", flush=True)
    if args.write:
        write_result("suite_probe.json", {"args": vars(args), "backbone": backbone, "rows": rows,
                                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
