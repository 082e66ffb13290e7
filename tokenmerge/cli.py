"""The ``tokenmerge`` command line: one module per subcommand in :mod:`tokenmerge.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# Each module exposes add_parser(subparsers), which registers a subcommand with
# set_defaults(func=run).
COMMANDS = [
    "tokenmerge.commands.bench",
    "tokenmerge.commands.eval",
    "tokenmerge.commands.visualize",
    "tokenmerge.commands.demo",
    "tokenmerge.commands.train",
    "tokenmerge.commands.tune",
    "tokenmerge.commands.export",
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tokenmerge",
        description="Faster Vision Transformers by merging tokens (ToMe, ATC, MCTF, PiToMe, DTEM, TC-ViT).",
    )
    parser.add_argument("--version", action="version", version=f"tokenmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, OSError) as err:  # OSError: missing, existing or unwritable files
        print(f"tokenmerge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
