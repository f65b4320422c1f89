"""`autopeft space list` and `autopeft space show NAME|FILE --backbone B --budget X`."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

DEFAULT_BACKBONE = "vit_base_patch16_224"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("space", help="inspect search spaces")
    actions = p.add_subparsers(dest="space_command", metavar="ACTION")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    q = actions.add_parser("list", help="list the shipped search spaces")
    q.set_defaults(func=cmd_list)

    q = actions.add_parser("show", help="a space, its size, smallest and largest plans, and feasibility at a budget")
    q.add_argument("space", metavar="NAME|FILE", help="a shipped space (see `autopeft space list`) or a YAML file")
    q.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm model name (default {DEFAULT_BACKBONE})")
    q.add_argument("--budget", help="parameter budget, head excluded: 0.5%%, 0.2M, 150k or 150000")
    q.add_argument("--img-size", type=int, metavar="PX",
                   help="input size in pixels the backbone runs at (default: its pretraining size); counts "
                        "the model at it")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_show)


def cmd_list(args: argparse.Namespace) -> int:
    from autopeft.space import list_spaces, load_space

    for name in list_spaces():
        space = load_space(name)
        print(f"{name:<12} {space.description}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget
    from autopeft.space import describe, load_space

    space = load_space(args.space)
    spec = backbone_spec(args.backbone, args.img_size)
    budget = parse_budget(args.budget, spec) if args.budget is not None else None
    info = describe(space, spec, budget)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def _params(entry: dict[str, Any]) -> str:
    return f"{entry['params']:,} ({entry['percent']:.4f} %)"


def render(info: dict[str, Any]) -> str:
    """The human-readable form of `autopeft.space.describe`'s summary."""
    lines = [f"space {info['space']}  ({info['source']})"]
    if info["description"]:
        lines += textwrap.wrap(info["description"], 116, initial_indent="  ", subsequent_indent="  ")
    lines.append(f"insertion: {info['insertion']}")
    for name, choices in info["slots"].items():
        lines.append(f"  slot {name}: {', '.join(choices)}")
    if info["global"]:
        lines.append(f"  global: {', '.join(info['global'])}")
    if info["mergeable_only"]:
        lines.append("  mergeable methods only (no inference overhead once merged)")
    lines.append("methods:")
    for method, options in info["methods"].items():
        opts = "; ".join(f"{k} {v}" for k, v in options.items()) or "(no options)"
        lines.append(f"  {method:<12} {opts}")
    if info["training"]:
        lines.append("training:")
        lines += [f"  {k:<16} {v}" for k, v in info["training"].items()]
    for note in info["notes"]:
        lines.append(f"note: {note}")
    bb, size = info["backbone"], info["size"]
    plans = f"{size['plans']:.3g}" if size["plans"] else "continuous"
    training = "continuous" if size["training"] is None else f"{size['training']:,}"
    lines.append(f"size: {plans} plan configurations × {training} training settings")
    lines.append(f"backbone {bb['name']} ({bb['family']}, {bb['blocks']} blocks): {bb['params']:,} parameters "
                 "without head")
    lines.append(f"smallest plan: {_params(info['smallest'])}  {info['smallest']['plan']}")
    lines.append(f"largest plan:  {_params(info['largest'])}  {info['largest']['plan']}")
    budget = info["budget"]
    if budget is None:
        lines.append("(pass --budget to see what fits)")
        return "\n".join(lines)
    verdict = "feasible" if info["feasible"] else f"INFEASIBLE: needs at least {info['smallest']['params']:,}"
    lines.append(f"budget {budget['text']} = {budget['limit']:,} parameters ({budget['percent']:.4f} %): {verdict}")
    lines.append(f"  {'method':<12} {'min/place':>10}  {'on every place':>26}  fits at")
    for row in info["methods_at_budget"]:
        everywhere = f"{row['everywhere_params']:,} ({'fits' if row['everywhere_fits'] else 'over'})"
        lines.append(f"  {row['method']:<12} {row['min_params']:>10,}  {everywhere:>26}  {row['where']}")
    for method, depths in (info.get("share_depths") or {}).items():
        if depths != info["share_depths_offered"]:
            lines.append(f"  {method} takes depths {depths} only: deeper, its smallest size with the other methods' "
                         "at theirs could go over the budget (a share space's draws always fit)")
    return "\n".join(lines)
