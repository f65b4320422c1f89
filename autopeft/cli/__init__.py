"""The `autopeft` command line: parse, build the library's dataclasses, call the library, print.

Each room adds its sub-commands from its own module in this package (a `register(subparsers)` function that sets
`func` on its parsers); COMMAND_MODULES lists them. Errors a user can cause (AutopeftError) print as one line on
stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from autopeft.errors import AutopeftError

COMMAND_MODULES = ["autopeft.cli.methods", "autopeft.cli.backbones", "autopeft.cli.train", "autopeft.cli.space",
                   "autopeft.cli.search", "autopeft.cli.report", "autopeft.cli.export"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, as for every other user error
        self.exit(2, f"autopeft: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from autopeft import __version__

    parser = _Parser(prog="autopeft", description="Automated search over PEFT methods for pretrained vision models.")
    parser.add_argument("--version", action="version", version=f"autopeft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AutopeftError as exc:
        print(f"autopeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autopeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
