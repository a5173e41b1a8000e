"""``ultramem <command>``: the command-line entry point.

Each command lives in its own module exposing ``register(subparsers)``, which adds a subparser
whose ``func(args) -> int`` runs it. Add a command by adding its module to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ultramem import __version__
from ultramem.errors import ConfigError

COMMANDS = (
    "ultramem.info",
    "ultramem.data.cli",
    "ultramem.train.cli",
    "ultramem.train.plot",
    "ultramem.eval.cli",
    "ultramem.inference.generate",
    "ultramem.train.demo",
    "ultramem.hf.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultramem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ultramem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"ultramem: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
