"""`autopeft backbones`: the supported families, example names, input size, size and the methods each takes."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the supported backbone families and the methods each takes")
    p.add_argument("--img-size", type=int, metavar="PX", help="count each family at this input size")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_backbones)


def cmd_backbones(args: argparse.Namespace) -> int:
    from autopeft.families import REFUSED, family_table

    rows = family_table(args.img_size)
    if args.json:
        print(json.dumps({"families": rows, "refused": REFUSED}, indent=2))
        return 0
    for r in rows:
        print(f"{r['family']} ({r['class']}): {', '.join(r['examples'])}")
        print(f"  {r['input_size']} px, {r['params']:,} parameters, {r['blocks']} blocks; methods: "
              f"{', '.join(r['methods'])}" + (f" (not mergeable here: {', '.join(r['not_mergeable'])})"
                                              if r["not_mergeable"] else ""))
        if r["note"]:
            print(f"  {r['note']}")
    for cls, why in REFUSED.items():
        print(f"refused: timm's {cls} class ({why})")
    return 0
