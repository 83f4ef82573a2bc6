"""User-facing errors: anything the user can fix ends as one clear line and exit code 2."""

from __future__ import annotations


class TunevalError(Exception):
    """A problem with the user's input (config, data, model, command line).

    The CLI prints ``str(error)`` without a traceback and exits with ``exit_code``.
    Each message names the file, the field and the fix.
    """

    exit_code = 2


class ConfigError(TunevalError):
    """Every problem found in a config file, reported at once (one line each)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(TunevalError):
    """The benchmark's data does not match its declaration."""


class ModelError(TunevalError):
    """A model source cannot be resolved or loaded."""
