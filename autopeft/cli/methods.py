"""`autopeft methods` and `autopeft params`."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from autopeft.errors import AutopeftError

if TYPE_CHECKING:
    from autopeft.plan import PeftPlan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the PEFT methods")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("params", help="exact trainable parameter count of a method or plan on a backbone")
    p.add_argument("--backbone", required=True, help="timm model name, e.g. vit_base_patch16_224")
    add_plan_arguments(p, required=True)
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head (default 1000)")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="input size in pixels the backbone runs at (default: its pretraining size); counts "
                        "the model at it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_params)


def add_plan_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """The plan flags shared by every command that takes one method or a plan file."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--method", help="one PEFT method (see `autopeft methods`)")
    g.add_argument("--plan", help="a plan YAML/JSON file")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --set rank=8 --set targets=q,v)")
    p.add_argument("--layers", default="all", help="blocks for the method: all (default), 0-11 or 8,9,10,11")


def plan_from_args(args: argparse.Namespace, num_blocks: int) -> PeftPlan:
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan, parse_layers

    if args.plan:
        if args.options or args.layers != "all":
            raise AutopeftError("--set and --layers go with --method; a --plan file already holds its options")
        return PeftPlan.load(args.plan)
    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AutopeftError(f"--set expects KEY=VALUE, got '{item}'")
        options[key.strip()] = value.strip()
    spec = make_spec(args.method, options)
    return PeftPlan.single(spec, parse_layers(args.layers, num_blocks))


def cmd_methods(args: argparse.Namespace) -> int:
    from autopeft.methods import list_methods

    rows: list[dict[str, Any]] = [
        {
            "name": cls.name,
            "category": cls.category,
            "mergeable": bool(cls.mergeable),
            "families": list(cls.families),
            "scope": cls.scope,
            "options": {k: v for k, v in cls().to_dict().items() if k != "method"},
        }
        for cls in list_methods()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="PEFT methods")
    for col in ("name", "category", "mergeable", "families", "options (defaults)"):
        table.add_column(col)
    for r in rows:
        opts = ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in r["options"].items())
        table.add_row(r["name"], r["category"], "yes" if r["mergeable"] else "no", ",".join(r["families"]), opts or "-")
    Console().print(table)
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from autopeft.backbones import backbone_spec

    if args.num_classes < 0:
        raise AutopeftError(f"--num-classes must be >= 0, got {args.num_classes}")
    spec = backbone_spec(args.backbone, args.img_size)
    plan = plan_from_args(args, spec.num_blocks)
    peft = plan.count(spec)
    blockers = plan.merge_blockers(spec)
    out = {
        "backbone": spec.name,
        "plan": plan.short(),
        "peft_params": peft,
        "head_params": spec.head_params(args.num_classes),
        "backbone_params": spec.backbone_params,
        "input_size": list(spec.input_size),
        "percent": 100.0 * peft / spec.backbone_params,
        "mergeable": not blockers,
        "merge_blockers": blockers,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['plan']} on {spec.name} at {spec.input_size[1]} px: {peft:,} trainable parameters "
              f"({out['percent']:.4f} % of "
              f"{spec.backbone_params:,}); head {out['head_params']:,}; mergeable: "
              f"{'no (' + '; '.join(blockers) + ')' if blockers else 'yes'}")
    return 0
