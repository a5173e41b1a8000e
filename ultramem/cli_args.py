"""Argument types and the parser class of the command line: every bad argument is one line
``ultramem <command>: error: argument --x: <value> ... (allowed: ...)`` and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and whose subparsers are
    the same class, so ``ultramem eval --batch-size 0`` reads ``ultramem eval: error: ...``."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind: type, low: float, inclusive: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (value < low if inclusive else value <= low):  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: {what})")
        return value

    parse.__name__ = f"{kind.__name__} {what}"  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, True, "an integer >= 1")
nonneg_int = _number(int, 0, True, "an integer >= 0")
nonneg_float = _number(float, 0.0, True, "a number >= 0")
