"""The one front door of every command line: a user error is one line `error: ...` on stderr and exit status
2; anything else propagates (Python prints the traceback, exit status 1).

    @cli.command(OSError, ValueError)       # the exceptions that mean "bad input" for this command
    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        if args.n < 1:
            raise cli.UsageError("--n must be >= 1")
        ...

`main(argv)` then returns 2 on a user error (or, with `exits=True`, for mains that return something else or
run under absl, raises `BadInput`, a SystemExit with status 2 whose text is the line printed).
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, NoReturn

EXIT_BAD_INPUT = 2
_ERRNO = re.compile(r"\[Errno \d+\] (?P<reason>.+?): '(?P<file>.+)'")


class UsageError(Exception):
    """A bad argument the command found itself (always a user error)."""


class BadInput(SystemExit):
    """Exit status 2 after a user error; str() is the line printed on stderr."""

    def __init__(self, line: str):
        super().__init__(EXIT_BAD_INPUT)
        self.line = line

    def __str__(self) -> str:
        return self.line


def one_line(message) -> str:
    return " ".join(str(message).split())


def describe(error: BaseException) -> str:
    """An exception's message on one line: a KeyError's without its quotes; a system error, also one that ends
    a longer message (ml_collections' config loading), as 'FILE: reason', not "[Errno 2] reason: 'FILE'"."""
    if isinstance(error, KeyError) and error.args:
        return one_line(error.args[0])
    lines = str(error).strip().splitlines()
    errno = _ERRNO.fullmatch(lines[-1].strip()) if isinstance(error, OSError) and lines else None
    if errno:
        return one_line(f"{errno['file']}: {errno['reason']}")
    return one_line(error)


def error_line(error: BaseException) -> str:
    return "error: " + describe(error)


def fail(line: str) -> NoReturn:
    """Prints `line` (on one line) to stderr and exits 2 (raises BadInput)."""
    line = one_line(line)
    print(line, file=sys.stderr)
    raise BadInput(line)


def command(*user_errors: type[BaseException], exits: bool = False) -> Callable:
    """Decorates a command's `main`: UsageError and `user_errors` raised in it become one line on stderr and
    exit status 2 (returned, or raised as BadInput when `exits`); a main returning None exits 0."""
    caught = (UsageError, *user_errors)

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                result = main(*args, **kwargs)
            except caught as error:
                if exits:
                    fail(error_line(error))
                print(error_line(error), file=sys.stderr)
                return EXIT_BAD_INPUT
            return 0 if result is None and not exits else result

        return run

    return decorate
