"""`autopeft export`, `autopeft evaluate`, `autopeft predict` and `autopeft export-peft`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autopeft.defaults import BUNDLED_BACKBONE
from autopeft.errors import AutopeftError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the recipe of a study's best (or knee, or chosen) trial")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study>.db)")
    p.add_argument("--pick", default="best",
                   help="best (under the budget, default: the highest cross-validation accuracy of a study "
                        "searched with --select cv:K, else the highest val accuracy), knee (of the Pareto front) or a "
                        "trial number")
    p.add_argument("--budget", help="a tighter budget than the study's: 0.5%%, 0.2M, 150k, 150000")
    p.add_argument("--mergeable", action="store_true",
                   help="only plans that merge into the backbone weights (for `autopeft train --merge`)")
    p.add_argument("--epochs", type=int, help="epochs of the final run (default: the space's schedule)")
    p.add_argument("--confirm", type=int, default=0, metavar="K",
                   help="re-train the top-K Pareto plans with fresh seeds on train/val, pick the best mean")
    p.add_argument("--confirm-seeds", type=int, default=3, metavar="S", help="seeds per plan for --confirm (3)")
    p.add_argument("--device", default="auto", help="device of --confirm runs: auto (default), cpu, cuda …")
    p.add_argument("-o", "--out", required=True, help="recipe file to write (YAML)")
    p.add_argument("--force", action="store_true", help="replace an existing recipe file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="evaluate a run's model on a split; reproduces its recorded accuracy")
    _run_args(p)
    p.add_argument("--split", default="test", choices=["test", "val", "train", "train_full"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files with a run's model")
    _run_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export-peft", help="write a LoRA-only run as a Hugging Face peft adapter directory")
    p.add_argument("--run", required=True, help="run directory written by `autopeft train`")
    p.add_argument("-o", "--out", required=True, help="adapter directory to write (new or empty)")
    p.add_argument("--weights", help="the backbone's weights file, when it moved since training (for the check)")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the export with peft and comparing its logits to autopeft's")
    p.set_defaults(func=cmd_export_peft)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by `autopeft train`")
    p.add_argument("--merged", action="store_true", help="use merged.safetensors (a plain timm model)")
    p.add_argument("--data-root", help="where datasets live, when it moved since training")
    p.add_argument("--weights", help="the backbone's weights file, when it moved since training")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda …")


def cmd_export(args: argparse.Namespace) -> int:
    from autopeft.backbones import backbone_spec
    from autopeft.export import export_recipe

    out = Path(args.out)
    if out.exists() and not args.force:
        raise AutopeftError(f"{out} already exists; pass --force to replace it or another -o")
    if args.epochs is not None and args.epochs < 1:
        raise AutopeftError(f"--epochs must be >= 1, got {args.epochs}")
    recipe = export_recipe(args.study, args.storage, str(args.pick), args.budget, args.mergeable, args.epochs,
                           args.confirm, args.confirm_seeds, args.device, log=_stderr)
    recipe.save(out)
    p = recipe.provenance
    how = {"best": "best under the budget", "knee": "Pareto knee", "trial": "chosen",
           "confirm": f"best mean of {args.confirm_seeds} seeds"}[p["pick"]]
    cv = f" · cv_acc {p['cv_acc']:.4f} ({len(p['cv_accs'])} folds)" if p.get("cv_acc") is not None else ""
    print(f"trial {p['trial']} ({how}): {recipe.plan.short()} · val_acc {p['val_acc']:.4f}{cv} · "
          f"{p['peft_params']:,} params ({p['percent']:.3f} %) → {out}")
    for note in p.get("notes", []):
        print(f"  note: {note}")
    blockers = recipe.plan.merge_blockers(backbone_spec(recipe.backbone, recipe.img_size))
    if blockers:
        print(f"  note: {'; '.join(blockers)}, so `train --merge` will refuse this plan; `export --mergeable` picks "
              "among plans that merge on this backbone")
    print(f"train it: autopeft train --config {out}")
    return 0


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from autopeft.deploy import evaluate_run
    from autopeft.runs import load_run, seed_runs

    seeds = seed_runs(args.run)
    runs = [load_run(p) for p in seeds] if seeds else [load_run(args.run)]
    rows = [evaluate_run(r, args.split, args.merged, args.data_root, args.weights, args.device) for r in runs]
    if args.json:
        print(json.dumps(rows if seeds else rows[0], indent=2))
    else:
        for row in rows:
            rec = row["recorded_acc"]
            check = "" if rec is None else (" = recorded" if row["matches"] else f" ≠ recorded {rec:.4f}")
            print(f"{row['run']}: {row['split']} accuracy {row['acc']:.4f}{check} ({row['images']} images, "
                  f"{row['model']} model, loss {row['loss']:.4f})")
        if len(rows) > 1:
            import statistics

            accs = [r["acc"] for r in rows]
            print(f"mean {statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f} over {len(accs)} seeds")
    return 0 if all(r["matches"] for r in rows) else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from autopeft.deploy import predict
    from autopeft.runs import load_run

    rows = predict(load_run(args.run), args.images, args.top_k, args.merged, args.data_root, args.weights,
                   args.device)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        tops = ", ".join(f"{t['name']} {t['prob']:.3f}" for t in row["top"])
        print(f"{row['image']}: {tops}")
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    from autopeft.peft_interop import check_peft_export, export_peft
    from autopeft.runs import load_run

    run = load_run(args.run)
    out = export_peft(run, args.out)
    print(f"peft LoRA adapter written to {out} (adapter_config.json, adapter_model.safetensors)")
    if not args.no_check:
        diff = check_peft_export(run, out, args.weights)
        if diff > 1e-5:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            raise AutopeftError(f"peft's load of {out} differs from autopeft's model by {diff:.2e} in the logits; "
                                "nothing was kept; please report this")
        print(f"checked: peft.PeftModel.from_pretrained gives autopeft's logits (max difference {diff:.1e})")
    k = int(run.recipe.num_classes or run.metrics["num_classes"])
    # timm knows the bundled backbone once autopeft.bundled is imported
    register = "import autopeft.bundled; " if run.recipe.backbone == BUNDLED_BACKBONE else ""
    print(f"load it: {register}PeftModel.from_pretrained(timm.create_model('{run.recipe.backbone}', pretrained=True, "
          f"num_classes={k}), '{out}')")
    return 0
