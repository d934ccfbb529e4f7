"""`circuitdiff` command line: one module per command in this package.

Each module defines ``register(subparsers)``, which adds its subcommand and sets ``func``.
Command modules import only argparse-level code at the top; the library (and torch) is
imported when a command runs, so ``--help`` and argument errors return at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from circuitdiff.errors import UserError

COMMANDS = ("attribute", "run", "report", "validate", "intervene", "train", "track", "features", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitdiff",
        description="What did post-training change inside this model? Edge attribution patching on model pairs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"circuitdiff.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"circuitdiff: error: {err}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as err:  # a path the user gave; not a bug
        print(f"circuitdiff: error: {err.filename}: {err.strerror}; choose another path", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
