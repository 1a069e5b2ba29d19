"""User-facing errors: each names the file, key or value at fault and says how to fix it."""

import difflib
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

Args = TypeVar("Args")


class QwenEditError(Exception):
    """Base class of errors caused by the user's input (config, data), not by a bug."""


class ConfigError(QwenEditError):
    pass


class DataError(QwenEditError):
    pass


class OutputError(QwenEditError, OSError):
    """A file could not be written (name too long, no permission, disk full, a file where a folder
    should be). Also an OSError, so code that handles failed writes keeps working."""


def exit_status(command: Callable[[Args], int], args: Args) -> int:
    """`command(args)`'s exit status; a user error is its one `error:` line and status 2, no traceback."""
    try:
        return command(args)
    except QwenEditError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def suggest(value: str, options: Iterable[str], list_all: bool = True) -> str:
    """'did you mean X?' for the closest option, plus the valid options when they are few."""
    options = sorted(options)
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
    listing = f"valid: {', '.join(options)}" if list_all else "see README.md for every key"
    if close:
        return f"did you mean {close[0]!r}? ({listing})" if list_all else f"did you mean {close[0]!r}?"
    return listing
