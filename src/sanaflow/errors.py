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


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return a ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> SanaflowError:
    """Build the standard error for an unknown option, naming the valid choices."""
    choices = sorted(choices)
    return ConfigError(f"unknown {kind} {name!r}{suggest(name, choices)}; choose from: {', '.join(choices)}")
