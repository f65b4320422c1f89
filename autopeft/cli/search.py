"""`autopeft search`, `autopeft results` and `autopeft dashboard`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from autopeft.defaults import STRATEGIES
from autopeft.errors import AutopeftError
from autopeft.train_config import PRECISIONS

if TYPE_CHECKING:
    import pandas as pd


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search PEFT plans under a parameter budget (Ray Tune + Optuna)")
    p.add_argument("--recipe", default=None, help="study recipe YAML (default: the --dataset's shipped recipe; "
                   "studies/digits.yaml when no --dataset)")
    p.add_argument("--dataset", help="registered dataset or folder")
    p.add_argument("--budget", help="trainable-parameter budget, head excluded: 0.5%%, 0.2M, 150k, 150000")
    p.add_argument("--backbone", help="timm model name (default: the recipe's; the bundled tiny ViT for small "
                   "images, else vit_base_patch16_224.augreg_in21k)")
    p.add_argument("--weights", help="local weights file for the backbone")
    p.add_argument("--data-root", help="where datasets live (default $AUTOPEFT_DATA or ~/.cache/autopeft/data)")
    p.add_argument("--space", help="search space name (autopeft space list) or YAML file (default: unified; "
                   "oneshot with --strategy oneshot)")
    p.add_argument("--trials", type=int, help="number of trials (baselines included)")
    p.add_argument("--epochs", type=int, help="epochs of a full-fidelity trial")
    p.add_argument("--max-epochs", type=int, metavar="N",
                   help="training epochs the whole study may spend, stopped trials' included (e.g. 10 × --epochs "
                        "for ten full runs); it ends at N or at --trials, whichever comes first; --resume keeps it")
    p.add_argument("--grace-epochs", type=int, help="epochs before ASHA may stop a trial")
    p.add_argument("--no-early-stopping", dest="early_stopping", action="store_false", default=None,
                   help="train every trial for all --epochs (no ASHA), e.g. for a plain random search")
    p.add_argument("--sampler", help="tpe (default), tpe-nogroup, nsga2, gp or random")
    p.add_argument("--objectives", help="acc,params (default) or acc,params,overhead")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial (fractions share a GPU; default: --trials-per-gpu trials on every GPU Ray "
                        "has, or 1/ceil(c/GPUs) each with --concurrency c; 0 where there are none)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1); those beyond the first prepare "
                                                        "its images in DataLoader processes")
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="DataLoader processes per trial (default: --cpus-per-trial minus one)")
    p.add_argument("--concurrency", type=int, help="trials running at once (default: all the GPUs hold, see "
                                                   "--gpus-per-trial; 2 without GPUs)")
    p.add_argument("--trials-per-gpu", type=int, metavar="K",
                   help="trials sharing one GPU when neither --gpus-per-trial nor --concurrency is given (default 2)")
    p.add_argument("--address", help="address of an existing Ray cluster, e.g. auto or HOST:6379 on its head node "
                                     "(default: a local instance; Ray Client ray:// is not supported)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study>.db)")
    p.add_argument("--study", help="study name (default: the recipe's file name)")
    p.add_argument("--resume", action="store_true", default=None, help="continue an interrupted study")
    p.add_argument("--warm-start", help="enqueue the Pareto plans of another study (same storage) first")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-baselines", dest="baselines", action="store_false", default=None,
                   help="do not start with the hand-picked baseline plans")
    p.add_argument("--baseline-lr-scales", metavar="S,S,...",
                   help="enqueue each baseline at these multiples of the space's centre learning rate (default 1: "
                        "each method's own rate; e.g. 0.5,2 tries two, early stopping culls the worse)")
    p.add_argument("--baseline-mix", dest="baseline_mix", action="store_true", default=None,
                   help="each baseline fixes only its own method's decisions; the sampler draws the rest of its plan "
                        "(the baseline methods combined with others, fitted to the budget)")
    p.add_argument("--select", metavar="val|cv:K",
                   help="how the study picks its best trial: val (default: the best val accuracy) or cv:K (the "
                        "--select-top best by val are trained again in K folds of train+val, as Ray Tune trials, "
                        "and the best mean fold accuracy is the pick; less noise than one small val split)")
    p.add_argument("--select-top", type=int, metavar="N", help="trials --select cv:K scores (default 3)")
    p.add_argument("--max-retries", type=int, metavar="N",
                   help="re-runs of a trial whose worker process or node was lost, e.g. a preempted GPU node "
                        "(default 3); a trial that fails by itself is not re-run")
    p.add_argument("--storage-patience", type=float, metavar="SECONDS",
                   help="how long the search waits out an unreachable storage, e.g. a database restarting "
                        "(default 600); then it stops, keeping its finished trials, for --resume")
    p.add_argument("--stall-floor", type=float, metavar="SECONDS",
                   help="a trial that reports no epoch for 5x the longest epoch so far, and at least this long "
                        "(default 1800), has its worker restarted as after a lost node (a hung worker); 0: never")
    p.add_argument("--checkpoint-every", type=int, metavar="K",
                   help="a trial saves its state every K epochs (default 1; 0: never), so that a re-run after a "
                        "lost worker or node goes on from there")
    p.add_argument("--checkpoint-storage", metavar="PATH_OR_URI",
                   help="where trial checkpoints go: a path every node reaches (a shared filesystem) or an object "
                        "store URI such as s3://bucket/autopeft; default: a temp dir on this machine, and none on "
                        "a cluster")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="trials (default): every trial trains its plan alone; oneshot: train one weight-sharing "
                        "supernet of the space, score --candidates sub-plans on val with its shared weights and train "
                        "the --finalists best alone as the study's trials (a space of sliceable methods: oneshot, "
                        "the default with it, noah, share, ...)")
    p.add_argument("--finalists", type=int, metavar="K", help="oneshot: sub-plans trained alone as trials (default 5)")
    p.add_argument("--candidates", type=int, metavar="N",
                   help="oneshot: sub-plans scored on val with the supernet's weights (default: as many as one "
                        "trial's training compute pays for, e.g. 45 for 15 epochs on as many train as val images)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="what every trial computes at: auto (default: bf16 on a GPU that has it natively, fp16 with "
                        "loss scaling on one that does not, fp32 on the CPU), bf16, fp16 or fp32; exported recipes "
                        "keep it")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="input size in pixels the backbone runs at (default: its pretraining size, e.g. 518 for "
                        "DINOv2; 224 is the VTAB protocol); the budget counts the model at it, exported recipes keep "
                        "it")
    p.add_argument("--supernet-epochs", type=int, metavar="N", help="oneshot: epochs of the supernet (default "
                   "--epochs)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("results", help="print a study's trials or Pareto configs from its storage")
    _study_args(p)
    p.add_argument("--pareto", action="store_true", help="only the Pareto configs under the budget")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("dashboard", help="open a study in optuna-dashboard on 127.0.0.1")
    _study_args(p)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.set_defaults(func=cmd_dashboard)


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study>.db)")


def cmd_search(args: argparse.Namespace) -> int:
    from autopeft.search import search, settings_from
    from autopeft.search.results import frame

    flags = {k: getattr(args, k) for k in ("dataset", "budget", "backbone", "weights", "data_root", "space", "trials",
                                             "epochs", "grace_epochs", "early_stopping", "sampler", "objectives",
                                             "gpus_per_trial", "cpus_per_trial", "concurrency", "trials_per_gpu",
                                             "num_workers",
                                             "address", "storage",
                                             "study", "resume", "warm_start", "seed", "baselines",
                                             "baseline_lr_scales", "baseline_mix", "max_epochs", "select",
                                             "select_top", "max_retries", "storage_patience", "stall_floor",
                                             "checkpoint_every", "checkpoint_storage", "strategy", "finalists",
                                             "candidates", "supernet_epochs", "precision", "img_size")}
    from autopeft.data.recipes import choose_recipe

    choice = choose_recipe(args.recipe, args.dataset)  # the dataset's own recipe, or defaults that suit it
    asked = settings_from(choice.path, flags, defaults=choice.defaults)
    if args.resume:  # the study's stored settings under the flags (and a recipe given with --recipe)
        asked = settings_from(args.recipe, {**flags, "study": asked.study})
        print(f"resuming study {asked.study} with its stored settings; given: "
              f"{', '.join(n for n in asked.given or () if n not in ('study', 'resume')) or 'nothing else'}",
              flush=True)
    else:
        print(choice.line, flush=True)
    outcome = search(asked)
    settings = outcome.settings
    table = frame(settings, outcome.records, pareto=True)
    _print_table(table, f"Pareto configs under {settings.search.budget} ({settings.budget_limit:,} params)")
    from autopeft.pareto import best_under_budget

    best = best_under_budget(outcome.records, settings.budget_limit)
    if best is not None and best.number not in set(table["trial"]):  # picked by cross-validation, off the front
        _print_table(frame(settings, [best]), f"selected by cross-validation: trial {best.number}")
    from autopeft.search.storage import mask_url

    print(f"study '{settings.study}' stored in {mask_url(outcome.storage)}")
    line = all_failed(outcome.records)
    if line:
        import sys

        print(line, file=sys.stderr)
        return 1
    return 0


def all_failed(records: list) -> str | None:
    """One line when every trial of the study failed (a search that trained nothing must not exit 0), naming the
    commonest reason; None otherwise."""
    from collections import Counter

    from autopeft.records import ATTR_REASON

    if not records or any(r.status != "FAIL" for r in records):
        return None
    reason, n = Counter(r.tags.get(ATTR_REASON) or "no reason recorded" for r in records).most_common(1)[0]
    return (f"every trial of the study failed ({len(records)}); the commonest reason ({n} of {len(records)}): "
            f"{reason}")


def _storage(args: argparse.Namespace) -> str:
    from autopeft.search.storage import default_storage

    return args.storage or default_storage(args.study)


def cmd_results(args: argparse.Namespace) -> int:
    from autopeft.search.results import frame, summary
    from autopeft.search.storage import load_records

    settings, records = load_records(args.study, _storage(args))
    table = frame(settings, records, pareto=args.pareto)
    if args.format == "json":
        print(table.to_json(orient="records", indent=2))
    elif args.format == "csv":
        print(table.to_csv(index=False), end="")
    else:
        counts = summary(records)
        _print_table(table, f"study {args.study}: {len(records)} trials · {counts['COMPLETE']} complete · "
                            f"{counts['PRUNED']} stopped early · {counts['FAIL']} failed · {counts['epochs']} epochs")
    return 0


def _print_table(table: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def acc(value: float | None) -> str:
        return "-" if value is None or value != value else f"{value:.4f}"

    t = Table(title=Text(title))  # Text: strings from the study (failure reasons, plans) are shown, not parsed
    cv = bool(table["cv_acc"].notna().any())  # a column only for a study with cross-validated trials
    scored = bool(table["supernet_score"].notna().any())  # a one-shot study's finalists
    cols = ["trial", "status", "val_acc", *(["cv_acc"] if cv else []), *(["supernet"] if scored else []),
            "peft_params", "percent", "epochs", "baseline", "plan"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for row in table.to_dict(orient="records"):
        cells = [str(row["trial"]), row["status"] + (" ★" if row["best"] else ""), acc(row["val_acc"]),
                 *([acc(row["cv_acc"])] if cv else []), *([acc(row["supernet_score"])] if scored else []),
                 f"{row['peft_params']:,}", f"{row['percent']:.3f}",
                 str(row["epochs"]), str(row["baseline"]),
                 row["plan"] if not row["fail_reason"] else f"{row['plan']} — {row['fail_reason']}"]
        t.add_row(*(Text(c) for c in cells))
    Console(width=160).print(t)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from autopeft.search.storage import load_study, mask_url, open_storage

    url = _storage(args)
    load_study(args.study, url)  # one clear line when the study does not exist
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise AutopeftError("optuna-dashboard is not installed; pip install optuna-dashboard") from None
    print(f"optuna-dashboard for study '{args.study}' ({mask_url(url)}) at http://{args.host}:{args.port}/ "
          "(Ctrl-C stops it)", flush=True)
    try:
        run_server(open_storage(url, create=False), host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise AutopeftError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}; pass another --port") \
            from None
    return 0
