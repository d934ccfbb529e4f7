"""`circuitdiff` command line: one subcommand per pipeline stage.

Each stage module defines ``register_cli(subparsers)``, which adds its subcommand
and sets ``func``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from circuitdiff.errors import UserError

COMMAND_MODULES = [
    "circuitdiff.attribute",
    "circuitdiff.run",
    "circuitdiff.report",
    "circuitdiff.lab.train",
    "circuitdiff.lab.track",
    "circuitdiff.validate",
    "circuitdiff.intervene",
    "circuitdiff.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitdiff",
        description="What did post-training change inside this model? Edge attribution patching on model pairs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"circuitdiff: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
