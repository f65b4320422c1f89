"""`autopeft train`: one training run of a method or plan, written to a run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from autopeft.backbones import DEFAULT_BACKBONE, backbone_spec, check_pretrained
from autopeft.cli.methods import add_plan_arguments, plan_from_args
from autopeft.errors import AutopeftError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one method or plan and write a run directory")
    p.add_argument("--dataset", required=True, help="registered dataset (e.g. digits, flowers102) or a folder")
    p.add_argument("--data-root", default=None, help="where datasets live (default $AUTOPEFT_DATA or ~/.cache)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm model name (default {DEFAULT_BACKBONE})")
    p.add_argument("--weights", default=None, help="local weights file (safetensors, .npz, .pth/.bin)")
    add_plan_arguments(p, required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", action="store_true", help="augment training images (disables the feature cache)")
    p.add_argument("--final", action="store_true",
                   help="final protocol: train on train+val (e.g. VTAB train800val200), no val curve, test once")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 …")
    p.add_argument("--no-cache", action="store_true", help="do not cache the frozen prefix's features")
    p.add_argument("--out", default=None, help="run directory (default runs/<dataset>-<time>)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from autopeft.data import data_config, load_dataset
    from autopeft.runs import check_out_dir, staged_dir, write_run
    from autopeft.train import TrainConfig, train

    console = Console(stderr=True)
    spec = backbone_spec(args.backbone)
    plan = plan_from_args(args, spec.num_blocks)
    plan.count(spec)  # validates the plan against the backbone before any data is read
    check_pretrained(args.backbone, args.weights)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, seed=args.seed,
                         device=args.device, feature_cache=not args.no_cache)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = check_out_dir(args.out or Path("runs") / f"{Path(args.dataset).name.replace('/', '-')}-{stamp}")
    data = load_dataset(args.dataset, args.data_root, augment=args.augment, seed=args.seed,
                        **data_config(args.backbone))
    console.print(f"[bold]{plan.short()}[/] on {args.backbone} · {data.name} ({data.num_classes} classes, "
                  f"{', '.join(f'{k} {v}' for k, v in data.sizes().items())})")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("training", total=None)

        def on_step(step: int, total: int) -> None:
            progress.update(task, completed=step, total=total)

        def report(m: dict) -> None:
            val = f"  val_acc {m['val_acc']:.4f}" if "val_acc" in m else ""
            progress.console.print(f"epoch {m['epoch']:3d}  train_loss {m['train_loss']:.4f}{val}  {m['seconds']:.1f}s")

        result = train(args.backbone, plan, data, config, weights=args.weights,
                       train_split="train_full" if args.final else "train",
                       eval_split=None if args.final else "val", test=True, report=report, on_step=on_step)
    info = {"dataset": data.name, "backbone": args.backbone, "weights": args.weights, "num_classes": data.num_classes,
            "protocol": "final" if args.final else "search", "config": config.to_dict(),
            "percent": 100.0 * result.peft_params / spec.backbone_params}
    with staged_dir(out) as tmp:
        write_run(tmp, result, plan, info)
    if result.test_acc is None:
        raise AutopeftError("the run produced no test accuracy")
    print(f"test accuracy {result.test_acc:.4f} · {result.peft_params:,} params "
          f"({info['percent']:.3f} %) · {result.seconds:.1f}s · run written to {out}")
    return 0
