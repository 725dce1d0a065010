"""The ``refusalguard`` command line.

Each subcommand lives in its own module in this package and provides
``add_parser(subparsers)`` (registering its argparse sub-parser with
``set_defaults(func=run)``) and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order shown in --help.
SUBCOMMANDS = ("demo", "models", "extract", "train", "eval", "diagnose", "env")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refusalguard",
        description="Keep a model's refusal geometry in place while fine-tuning with LoRA (RefusalGuard).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"refusalguard_kernels.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"refusalguard_kernels.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
