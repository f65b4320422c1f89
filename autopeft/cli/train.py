"""`autopeft train`: one training run of a method, a plan or a recipe, written to a run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopeft.cli.methods import add_plan_arguments, plan_from_args
from autopeft.defaults import DEFAULT_BACKBONE
from autopeft.errors import AutopeftError

if TYPE_CHECKING:
    from rich.console import Console

    from autopeft.data import DataSplits
    from autopeft.recipe import Recipe

# the training keys with a flag of their own (--augment is a switch, below); without --config the flags not given
# take TrainConfig's defaults, with --config a flag given overrides the recipe
TRAINING_FLAGS = ("batch_size", "lr", "lr_scale", "weight_decay", "warmup_epochs", "optimizer", "scheduler",
                  "label_smoothing", "precision")


def _lr(text: str) -> float | str:
    """--lr: a number, or `auto` (the rate derived from the plan and the schedule; over a recipe's rate too)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or auto, got {text!r}") from None


def _shown(value: float) -> str:
    """A default as the help texts write it: 1e-3, 32, 1, 0."""
    return f"{value:.0e}".replace("e-0", "e-") if 0 < abs(value) < 1e-2 else f"{value:g}"


def register(sub: argparse._SubParsersAction) -> None:
    from autopeft.train_config import OPTIMIZERS, PRECISIONS, SCHEDULERS, SGD_MOMENTUM, TrainConfig

    d = TrainConfig.defaults()
    p = sub.add_parser("train", help="train one method, plan or recipe and write a run directory")
    p.add_argument("--config", help="a recipe (from `autopeft export`, or a run's recipe.yaml) instead of "
                                    "--dataset/--backbone/--method/--plan; the flags below override it")
    p.add_argument("--dataset", help="registered dataset (e.g. digits, flowers102) or a folder")
    p.add_argument("--data-root", default=None, help="where datasets live (default $AUTOPEFT_DATA or ~/.cache)")
    p.add_argument("--backbone", default=None, help=f"timm model name (default {DEFAULT_BACKBONE})")
    p.add_argument("--weights", default=None, help="local weights file (safetensors, .npz, .pth/.bin)")
    add_plan_arguments(p, required=False)
    p.add_argument("--epochs", type=int, help=f"epochs (default {d['epochs']}; a recipe's warm-up keeps its share)")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {d['batch_size']})")
    p.add_argument("--lr", type=_lr, help="peak learning rate, or auto (default: auto, the plan's methods' own rates "
                                          "fitted to the run's steps and the backbone's width, see README; printed "
                                          "when training starts)")
    p.add_argument("--lr-scale", type=float, help=f"multiplies the peak rate, given or auto (default "
                                                   f"{_shown(d['lr_scale'])})")
    p.add_argument("--weight-decay", type=float,
                   help=f"weight decay of matrices (default {_shown(d['weight_decay'])}; decoupled under AdamW, "
                        "L2 under SGD)")
    p.add_argument("--warmup-epochs", type=float, help=f"linear warm-up epochs (default {_shown(d['warmup_epochs'])})")
    p.add_argument("--optimizer", help=f"{' or '.join(OPTIMIZERS)} (default {d['optimizer']}; sgd: momentum "
                                       f"{SGD_MOMENTUM:g}, no Nesterov)")
    p.add_argument("--scheduler", help=f"after the warm-up: {' or '.join(SCHEDULERS)} (default {d['scheduler']}; "
                                       "constant stays at the peak lr)")
    p.add_argument("--label-smoothing", type=float,
                   help=f"label smoothing (default {_shown(d['label_smoothing'])})")
    p.add_argument("--img-size", type=int, default=None, metavar="PX",
                   help="input size in pixels the backbone runs at (default: its pretraining size, e.g. 518 for "
                        "DINOv2; 224 is the VTAB protocol); timm resamples the position embeddings")
    p.add_argument("--seed", type=int,
                   help=f"training seed (default {d['seed']}; without --config also the split seed)")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="train K seeds (seed, seed+1, …) into DIR/seed<S>/ and report mean ± std test accuracy")
    p.add_argument("--merge", action="store_true",
                   help="also write merged.safetensors, a plain timm state dict (plans that merge only)")
    p.add_argument("--augment", action="store_true", default=None,
                   help="augment training images (disables the feature cache)")
    p.add_argument("--final", action="store_true", default=None,
                   help="final protocol: train on train+val (e.g. VTAB train800val200), no val curve, test once")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 …")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="what every forward computes at: auto (default: bf16 on a GPU that has it natively, fp16 "
                        "with loss scaling on one that does not, fp32 on the CPU), bf16, fp16 or fp32; recorded in "
                        "the run, which `autopeft evaluate` and `predict` then use")
    p.add_argument("--no-cache", action="store_true", help="do not cache the frozen prefix's features")
    p.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="DataLoader processes preparing images (default 0: in the training thread)")
    p.add_argument("--out", default=None, help="run directory (default runs/<dataset>-<time>)")
    p.set_defaults(func=cmd_train)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().absolute()) if path else None


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe this command line asks for: --config with the flags given on top, or the flags alone."""
    from autopeft.backbones import backbone_spec
    from autopeft.recipe import Recipe
    from autopeft.train_config import TrainConfig

    defaults = TrainConfig.defaults()
    given = {k: getattr(args, k) for k in TRAINING_FLAGS if getattr(args, k) is not None}
    if args.augment:
        given["augment"] = True
    if args.img_size is not None:
        given["img_size"] = args.img_size
    if args.config:
        conflicts = [flag for flag, value in (("--dataset", args.dataset), ("--backbone", args.backbone),
                                              ("--method", args.method), ("--plan", args.plan),
                                              ("--set", args.options), ("--layers", args.layers != "all"),
                                              ("--final", args.final)) if value]
        if conflicts:
            raise AutopeftError(f"--config holds the dataset, backbone, plan and protocol; drop {', '.join(conflicts)}"
                                " (or edit the recipe)")
        recipe = Recipe.load(args.config)
        if args.epochs is not None:
            recipe = recipe.with_epochs(args.epochs) if args.epochs >= 1 else recipe.replace(epochs=args.epochs)
        changes: dict[str, Any] = {"training": {**recipe.training, **given}}
        if args.seed is not None:
            changes["seed"] = args.seed
        if args.weights:
            changes["weights"] = _absolute(args.weights)
        if args.data_root:
            changes["data_root"] = _absolute(args.data_root)
        return recipe.replace(**changes)
    if not args.dataset:
        raise AutopeftError("--dataset is required (or pass --config recipe.yaml)")
    if not (args.method or args.plan):
        raise AutopeftError("one of --method, --plan or --config is required")
    backbone = args.backbone or DEFAULT_BACKBONE
    plan = plan_from_args(args, backbone_spec(backbone).num_blocks)
    seed = defaults["seed"] if args.seed is None else args.seed
    training = {k: defaults[k] for k in TRAINING_FLAGS} | given
    return Recipe(backbone=backbone, dataset=args.dataset, plan=plan,
                  epochs=defaults["epochs"] if args.epochs is None else args.epochs, weights=_absolute(args.weights),
                  data_root=_absolute(args.data_root), protocol="final" if args.final else "search", split_seed=seed,
                  seed=seed, training=training, provenance={"source": "autopeft train"})


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from autopeft.backbones import backbone_spec, check_pretrained
    from autopeft.data.datasets import check_images
    from autopeft.recipe import load_data
    from autopeft.runs import check_out_dir, staged_dir, write_summary

    console = Console(stderr=True, soft_wrap=True)
    recipe = recipe_from_args(args)
    recipe.check()  # the plan against the backbone, before any data is read
    check_pretrained(recipe.backbone, recipe.weights)
    if args.num_workers < 0:
        raise AutopeftError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.seeds < 1:
        raise AutopeftError(f"--seeds must be >= 1, got {args.seeds}")
    blockers = recipe.plan.merge_blockers(backbone_spec(recipe.backbone, recipe.img_size)) if args.merge else []
    if blockers:  # decided before any training: the backbone's biases decide as much as the methods
        raise AutopeftError(f"--merge: the plan cannot be merged: {'; '.join(blockers)}; train without --merge (the "
                            "adapter loads with `autopeft evaluate`) or export a plan that merges "
                            "(`autopeft export --mergeable`)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = check_out_dir(args.out or Path("runs") / f"{Path(recipe.dataset).name.replace('/', '-')}-{stamp}")
    data = load_data(recipe)
    check_images(data, (*recipe.splits, "test"))  # a bad image file is one line now, not a run stopped mid-way
    recipe = recipe.replace(num_classes=data.num_classes)
    # printed once training starts, so that an error building the model stays the only line
    header = [f"[bold]{recipe.plan.short()}[/] on {recipe.backbone} · {data.name} ({data.num_classes} classes, "
              f"{', '.join(f'{k} {v}' for k, v in data.sizes().items())}) · {recipe.protocol} protocol, "
              f"{recipe.epochs} epochs, {_run_text(recipe, data)}"]
    seeds = [recipe.seed + i for i in range(args.seeds)]
    runs: dict[str, dict] = {}
    with staged_dir(out) as tmp:
        for seed in seeds:
            run_dir = tmp if len(seeds) == 1 else tmp / f"seed{seed}"
            run_dir.mkdir(exist_ok=True)
            runs[run_dir.name] = _one_run(recipe.replace(seed=seed), data, run_dir, args, console, header)
        if len(seeds) > 1:
            recipe.save(tmp / "recipe.yaml")
            summary = write_summary(tmp, runs)
    last = next(iter(runs.values()))
    if len(seeds) > 1:
        each = ", ".join(f"{m['test_acc']:.4f}" for m in runs.values())
        print(f"test accuracy {summary['test_acc_mean']:.4f} ± {summary['test_acc_std']:.4f} over {len(seeds)} "
              f"seeds ({each}) · run written to {out}")
    else:
        print(f"test accuracy {last['test_acc']:.4f} · {last['peft_params']:,} params ({last['percent']:.3f} %) · "
              f"{last['seconds']:.1f}s · run written to {out}")
    trial_acc = recipe.provenance.get("val_acc")
    if trial_acc is not None:
        mean = sum(m["test_acc"] for m in runs.values()) / len(runs)
        print(f"trial {recipe.provenance.get('trial')} of study '{recipe.provenance.get('study')}': val accuracy "
              f"{trial_acc:.4f} after {recipe.provenance.get('search_epochs')} epochs → test accuracy {mean:.4f} "
              f"(gap {mean - trial_acc:+.4f})")
    return 0


def _run_text(recipe: Recipe, data: DataSplits) -> str:
    """The batch and peak rates as the header shows them, `batch 32, lr lora 3.2e-02, head 3.2e-01 (auto)` (one
    rate where every group trains at it: a given `lr`), and what the run trains otherwise than the recipe says
    (`fitted_config`: a batch fitted to a small split, drop-path off)."""
    from autopeft.backbones import backbone_spec
    from autopeft.learning_rate import peak_rates
    from autopeft.train import fitted_config, num_samples

    config = recipe.train_config()
    train_size = num_samples(data.split(recipe.splits[0]))
    fitted, notes = fitted_config(config, recipe.backbone, train_size)
    rates = peak_rates(fitted, recipe.plan, backbone_spec(recipe.backbone, recipe.img_size), train_size)
    shown = (f"{next(iter(rates.values())):.2e}" if len(set(rates.values())) == 1
             else ", ".join(f"{name} {rate:.2e}" for name, rate in rates.items()))
    return (f"batch {fitted.batch_size}, lr {shown}" + (" (auto)" if config.lr is None else "")
            + "".join(f" · {note}" for note in notes))


def _one_run(recipe: Recipe, data: DataSplits, run_dir: Path, args: argparse.Namespace, console: Console,
             header: list[str]) -> dict:
    """Train one seed into `run_dir`; with --merge also write and evaluate the merged weights."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from autopeft.backbones import backbone_spec
    from autopeft.recipe import train_recipe
    from autopeft.runs import METRICS, merged_state_dict, update_metrics, write_merged, write_run

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"training (seed {recipe.seed})", total=None)

        def on_step(step: int, total: int) -> None:
            if header:
                progress.console.print(header.pop(), highlight=False)
            progress.update(task, completed=step, total=total)

        def report(m: dict) -> None:
            val = f"  val_acc {m['val_acc']:.4f}" if "val_acc" in m else ""
            progress.console.print(f"epoch {m['epoch']:3d}  train_loss {m['train_loss']:.4f}{val}  {m['seconds']:.1f}s")

        result = train_recipe(recipe, data, report=report, on_step=on_step, device=args.device,
                              feature_cache=not args.no_cache, num_workers=args.num_workers)
    if result.test_acc is None:
        raise AutopeftError("the run produced no test accuracy")
    config = recipe.train_config(device=args.device, feature_cache=not args.no_cache,
                                 num_workers=args.num_workers)
    spec = backbone_spec(recipe.backbone, recipe.img_size)
    info = {"dataset": data.name, "backbone": recipe.backbone, "weights": recipe.weights,
            "num_classes": data.num_classes, "protocol": recipe.protocol, "config": config.to_dict(),
            "split_seed": recipe.split_seed, "percent": 100.0 * result.peft_params / spec.backbone_params,
            "precision": result.precision,
            "provenance": recipe.provenance}
    write_run(run_dir, result, recipe.plan, info, recipe)
    if args.merge:
        from autopeft.deploy import plain_model
        from autopeft.train import evaluate, resolve_device

        state = merged_state_dict(result.model)
        write_merged(run_dir, state)
        device = resolve_device(args.device)
        merged = plain_model(recipe.backbone, data.num_classes, state,
                             img_size=recipe.img_size).to(device)
        loss, acc = evaluate(merged, data.test, config.eval_batch_size, device, precision=result.precision)
        update_metrics(run_dir, merged={"file": "merged.safetensors", "test_acc": acc, "test_loss": loss})
    return json.loads((run_dir / METRICS).read_text())
