"""The exception hierarchy: every error a user can cause derives from `FluxbatchError`.

The CLI's one error boundary (`fluxbatch.main`) prints `str(error)` once, without a
traceback, and exits with `error.exit_code`. Anything else is a bug: a short line, the
traceback in a log file, exit code 3.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130


# A `key=` query parameter: CometAPI's balance query carries the API key so.
_KEY_PARAMETER = re.compile(r"([?&]key=)[^&#\s'\"]*")


def without_key_parameters(text: str) -> str:
    """`text` with the value of every `key=` query parameter replaced by `***`: applied to
    whatever may hold a URL with a key (a crash log, an error from the balance query)."""
    return _KEY_PARAMETER.sub(r"\1***", text)


class FluxbatchError(Exception):
    """A problem the user can fix; its message is complete and printed as is."""

    exit_code = EXIT_FAILED


class UsageError(FluxbatchError):
    """The command line itself is wrong (bad flag value, missing file argument)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True, slots=True)
class Problem:
    """One located problem in a recipe (or a file it reads)."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def sort_key(self) -> tuple[str, int, int, str, str]:
        return (self.file, self.line or 0, self.column or 0, self.path, self.message)

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RecipeError(FluxbatchError):
    """A recipe has one or more problems; all of them are listed, sorted by position."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        # dict.fromkeys: drop duplicates but keep a stable order among equal positions
        self.problems = sorted(dict.fromkeys(problems), key=Problem.sort_key)
        super().__init__("\n".join(str(p) for p in self.problems))


class PlanTooLargeError(FluxbatchError):
    """The plan has more images than the size guard (`max_jobs`) allows and `--yes` was not
    given."""


class ConfigError(FluxbatchError):
    """Missing API key, unknown provider, unusable base URL: found before anything is sent."""


class StateError(FluxbatchError):
    """The state store or manifest is unreadable; the message says how to recover."""
