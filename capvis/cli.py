"""The ``capvis`` console script: thin argparse shells over library functions.

Every module in :mod:`capvis.commands` declares ``COMMAND`` (a tuple such as ``("pretrain",)`` or
``("eval", "voc07")``), ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int | None``; this file
discovers them and builds the parser, so adding a command never edits this file. Heavy imports
happen inside ``run`` so that ``capvis --help`` stays fast. A :class:`CapvisError` is printed as one
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType

from capvis import commands
from capvis.errors import CapvisError


def _command_modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"capvis.commands.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capvis", description="Learning visual representations from text.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for module in _command_modules():
        path: tuple[str, ...] = module.COMMAND
        sub = top
        for depth, word in enumerate(path[:-1]):
            key = " ".join(path[: depth + 1])
            if key not in groups:
                group = sub.add_parser(word, help=f"{word} commands")
                groups[key] = group.add_subparsers(dest=f"{word}_command", metavar="COMMAND", required=True)
            sub = groups[key]
        cmd = sub.add_parser(path[-1], help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args._run(args) or 0)
    except CapvisError as exc:
        print(f"capvis: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capvis: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
