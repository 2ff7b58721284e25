"""Small text-output helpers shared by the commands (tables, money, value lists)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fluxbatch.matrix import label


def money(usd: float | None) -> str:
    if usd is None:
        return "unknown"
    return f"${usd:,.3f}" if 0 < usd < 0.1 else f"${usd:,.2f}"


def short_value(value: object, width: int = 40) -> str:
    """A value as tables and captions show it: an object value by its label (`matrix.label`)."""
    text = label(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def values_text(values: Mapping[str, object]) -> str:
    return " ".join(f"{k}={short_value(v, 30)}" for k, v in values.items()) or "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
          right: frozenset[int] = frozenset()) -> str:
    """A plain aligned table; columns listed in `right` are right-aligned."""
    columns = zip(*rows, strict=True) if rows else [()] * len(headers)
    widths = [max(len(header), max(map(len, column), default=0))
              for header, column in zip(headers, columns, strict=True)]
    # one format string for every line: a plan's table may have a million of them
    line = "  ".join(f"{{:{'>' if i in right else '<'}{width}}}"
                     for i, width in enumerate(widths)).format
    return "\n".join([line(*headers).rstrip(), *(line(*row).rstrip() for row in rows)])


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"
