"""Errors raised by sanaflow.

Every error a user can cause (bad input, a missing or corrupt file, an unknown option) is a
`SanaflowError` whose message says what was wrong and what is allowed. The CLI prints such an
error as one line and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SanaflowError(Exception):
    """Base class of all user-facing sanaflow errors."""


class ConfigError(SanaflowError, ValueError):
    """A config (YAML file, config.json, CLI option) is invalid."""


class CheckpointError(SanaflowError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class InputError(SanaflowError, ValueError):
    """An input (prompt, size, image, video) is invalid."""


def suggest(name: object, choices: Iterable[str]) -> str:
    """Return a ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close (or not a string)."""
    if not isinstance(name, str):
        return ""
    choices = [c for c in choices if isinstance(c, str)]
    # Choices are case-sensitive: a name in the wrong case is pointed at the right one.
    same = [c for c in choices if c.casefold() == name.casefold()]
    close = same or difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_choice(kind: str, name: object, choices: Iterable[str]) -> SanaflowError:
    """Build the standard error for an unknown option, naming the valid choices."""
    choices = sorted(choices)
    if not isinstance(name, str):
        return ConfigError(f"{kind} must be a string, got {type(name).__name__} {name!r}; "
                           f"choose from: {', '.join(choices)}")
    return ConfigError(f"unknown {kind} {name!r}{suggest(name, choices)}; choose from: {', '.join(choices)}")


def check_choice(kind: str, name: object, choices: Iterable[str]) -> str:
    """Return `name` if it is one of `choices` (strings), else raise `unknown_choice` (any type of `name`)."""
    choices = list(choices)
    if not isinstance(name, str) or name not in choices:
        raise unknown_choice(kind, name, choices)
    return name
