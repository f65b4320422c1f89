"""`autopeft report`: a study as one self-contained plotly HTML file (opens without network)."""

from __future__ import annotations

import argparse

from autopeft.errors import AutopeftError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a study's HTML report (Pareto front, layer map, curves, ...)")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study>.db)")
    p.add_argument("-o", "--out", help="HTML file to write (default dashboards/<study>.html)")
    p.add_argument("--top-k", type=int, default=8, help="plans shown in the layer map (default 8)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from autopeft.report import write_report
    from autopeft.search.storage import default_storage

    if args.top_k < 1:
        raise AutopeftError(f"--top-k must be >= 1, got {args.top_k}")
    path, n = write_report(args.study, args.storage or default_storage(args.study), args.out, top_k=args.top_k)
    size = path.stat().st_size / 1e6
    print(f"report of study '{args.study}' ({n} trials) written to {path} ({size:.1f} MB, opens offline)")
    return 0
