"""Small text-output helpers shared by the commands (tables, money, value lists)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def money(usd: float | None) -> str:
    if usd is None:
        return "unknown"
    return f"${usd:,.3f}" if 0 < usd < 0.1 else f"${usd:,.2f}"


def short_value(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def values_text(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={short_value(v, 30)}" for k, v in values.items()) or "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
          right: frozenset[int] = frozenset()) -> str:
    """A plain aligned table; columns listed in `right` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                 for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"
