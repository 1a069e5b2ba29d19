"""User-facing errors: each names the file, key or value at fault and says how to fix it."""

import difflib
from collections.abc import Iterable


class QwenEditError(Exception):
    """Base class of errors caused by the user's input (config, data), not by a bug."""


class ConfigError(QwenEditError):
    pass


class DataError(QwenEditError):
    pass


def suggest(value: str, options: Iterable[str]) -> str:
    """'did you mean X?' for the closest option, else the full list of valid options."""
    options = sorted(options)
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}? (valid: {', '.join(options)})"
    return f"valid options: {', '.join(options)}"
