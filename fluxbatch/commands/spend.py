"""`fluxbatch spend [ROOT]`: what the ledger says was paid, offline.

Every paid submit has a row in the ledger's `charges` (see `state.Store.reserve`): the
catalogue's estimate, the cost the provider reported, and whether it was refunded (a moderated
or failed task) or its outcome is unknown (counted as spent). Grouped by recipe, job, model,
day (UTC) or run; `--since DATE` keeps the submits from that day on.
"""

from __future__ import annotations

import csv
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path

from fluxbatch.commands.output import table
from fluxbatch.errors import EXIT_OK, ConfigError, UsageError
from fluxbatch.layout import STATE_DIR
from fluxbatch.money import Spend, usd
from fluxbatch.state.ledger import ChargeRow
from fluxbatch.state.store import Store, has_store

GROUPS: dict[str, Callable[[ChargeRow], str]] = {
    "recipe": lambda row: row.recipe or "?",
    "job": lambda row: f"{row.recipe or '?'}/{row.job or '?'}",
    "model": lambda row: row.model or "?",
    "day": lambda row: _day(row.at),
    "run": lambda row: row.run or "?",
    # (a pool's account; "-": paid through the provider's own key variable)
    "account": lambda row: row.account or "-",
}


def spend(*, root: str, by: str, since: str | None, form: str) -> int:
    folder = _root(Path(root))
    start = _since(since)
    if not has_store(folder):
        raise ConfigError(f"{folder}: no ledger ({STATE_DIR}/state.sqlite): nothing was "
                          "rendered into this output root")
    with Store.open(folder, create=False) as store:
        rows = store.charges(start)
    groups: dict[str, Spend] = {}
    key = GROUPS[by]
    for row in rows:
        name = key(row)
        groups.setdefault(name, Spend(name)).add(row)
    total = Spend("total")
    for row in rows:
        total.add(row)
    ordered = [groups[name] for name in sorted(groups)]
    if form == "json":
        print(json.dumps({"root": str(folder), "by": by, "since": since,
                          "groups": [g.as_json() for g in ordered],
                          "total": total.as_json(), "total_usd": round(total.spent, 6)}))
    elif form == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        fields = list(total.as_json())
        writer.writerow([by if f == "group" else f for f in fields])
        for group in [*ordered, total]:
            writer.writerow(group.as_json().values())
    else:
        _print_table(folder, by, since, ordered, total)
    return EXIT_OK


def _print_table(folder: Path, by: str, since: str | None, groups: list[Spend],
                 total: Spend) -> None:
    since_text = f" since {since}" if since else ""
    print(f"spend in {folder}{since_text}, by {by} (from the ledger; 1 credit = $0.01)")
    if not groups:
        print("nothing was paid")
        return

    def row(group: Spend) -> list[str]:
        return [group.name, f"{group.paid:,}", usd(group.estimate), usd(group.reported),
                f"{group.not_reported:,}", f"{group.refunded:,} ({usd(group.refunded_usd)})",
                f"{group.unknown:,}", usd(group.spent)]

    print(table([by.upper(), "PAID", "ESTIMATE", "REPORTED", "NO COST", "REFUNDED", "UNKNOWN",
                 "SPENT"], [*map(row, groups), row(total)],
                right=frozenset(range(1, 8))))
    notes = []
    if total.not_reported:
        notes.append(f"{total.not_reported:,} without a reported cost count at the price "
                     "reserved for them")
    if total.unknown:
        notes.append(f"{total.unknown:,} whose answer was never learned count as spent")
    for note in notes:
        print(f"note: {note}")


def _root(path: Path) -> Path:
    """An output root, or a recipe (its output root)."""
    if path.is_file():
        from fluxbatch import recipe

        return recipe.load(str(path), strict=False).output_root
    if not path.is_dir():
        raise ConfigError(f"{path}: no such output root")
    return path


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: expected a date, like 2026-05-01") from None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def _day(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).date().isoformat()
