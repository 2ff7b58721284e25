"""The base of fluxbatch's vocabularies (`ImageState`, `Action`, `OutcomeStatus`, `EventKind`,
`TaskStatus`): string enums whose members are their strings."""

from __future__ import annotations

from enum import StrEnum


class Vocabulary(StrEnum):
    """A `StrEnum` (each member equals, formats and serialises as its string) whose members
    also print as their strings: `repr(ImageState.NEW)` is `'new'`, so a dict of counts or a
    dataclass shows what it showed when the values were plain strings, and what `--json`
    shows."""

    def __repr__(self) -> str:
        return str.__repr__(self.value)
