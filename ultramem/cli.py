"""``ultramem <command>``: the command-line entry point.

Each command lives in its own module exposing ``register(subparsers)``, which adds a subparser
whose ``func(args) -> int`` runs it. Add a command by adding its module to ``COMMANDS``.

One error path: an expected error (:class:`ultramem.errors.UltramemError`: a bad config, bad
data, a bad checkpoint, a diverged run, a locked run directory) or an operating-system error
(a missing, unwritable or full location) prints one line ``ultramem <command>: error: ...``
and exits with status 2; ``--debug`` (anywhere on the line) shows the traceback instead.
Dotted overrides (``train.lr=1e-3``) may come before or after the options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ultramem import __version__
from ultramem.cli_args import Parser
from ultramem.errors import UltramemError

COMMANDS = (
    "ultramem.info",
    "ultramem.data.cli",
    "ultramem.train.cli",
    "ultramem.train.plot",
    "ultramem.eval.cli",
    "ultramem.inference.generate",
    "ultramem.inference.bench",
    "ultramem.train.demo",
    "ultramem.experiment",
    "ultramem.hf.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ultramem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ultramem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse, accepting ``a.b=c`` overrides anywhere for the commands that take them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    rest = [a for a in extra if a not in overrides]
    if rest or (overrides and not hasattr(args, "overrides")):
        prog = f"ultramem {args.command}" if getattr(args, "command", None) else "ultramem"
        print(f"{prog}: error: unrecognized arguments: {' '.join(rest or overrides)} "
              f"(see {prog} --help)", file=sys.stderr)
        sys.exit(2)
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    return args


def command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "data_command", None)
    return " ".join(x for x in ("ultramem", args.command, sub) if x)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = parse(argv)
    try:
        return int(args.func(args) or 0)
    except (UltramemError, OSError) as e:
        if debug:
            raise
        print(f"{command_name(args)}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training handles SIGINT itself (it saves); elsewhere: stop quietly
        if debug:
            raise
        print(f"{command_name(args)}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, UltramemError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror} (rerun with --debug for the traceback)"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
