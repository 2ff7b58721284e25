"""Placements: per (recipe, output), the file written there (path, sha256, size, mtime) and
its manifest entry. A recipe's manifest is derived from its placements.

`Placements` is what the placing code asks of them; `PlacementTables` answers from the
root's SQLite file (`placements`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fluxbatch.state.database import Tables
from fluxbatch.state.manifests import ManifestEntry


@dataclass(frozen=True, slots=True)
class Placement:
    """A file written for one recipe's output (its manifest entry stays in the store)."""

    recipe: str
    output: str
    path: str
    key: str
    sha256: str
    size: int
    mtime_ns: int | None


def placement_of(recipe: str, entry: Mapping[str, Any], mtime_ns: int | None = None) -> Placement:
    """The placement a manifest entry describes."""
    return Placement(recipe, entry.get("output", entry["path"]), entry["path"], entry["key"],
                     entry["sha256"], entry["bytes"], mtime_ns)


class Placements(Protocol):
    """Where a root's images were placed, by recipe and output (each change durable before
    it returns)."""

    def placements(self, recipe: str | None = None) -> list[Placement]: ...

    def entry(self, recipe: str, output: str) -> ManifestEntry | None: ...

    def placed(self, recipe: str, output: str, key: str, entry: ManifestEntry,
               mtime_ns: int) -> None: ...

    def others_at(self, path: str, recipe: str) -> list[str]: ...


_PLACEMENT_COLUMNS = "recipe, output, path, key, sha256, bytes, mtime_ns"


class PlacementTables(Tables):
    """The placements in the root's SQLite file."""

    # -- reading ------------------------------------------------------------------------

    def placed_outputs(self, recipe: str) -> set[str]:
        return {output for (output,) in self.db.execute(
            "SELECT output FROM placements WHERE recipe = ?", (recipe,))}

    def placements(self, recipe: str | None = None) -> list[Placement]:
        """One recipe's placements, or every recipe's."""
        if recipe is None:
            rows = self.db.execute(f"SELECT {_PLACEMENT_COLUMNS} FROM placements")
        else:
            rows = self.db.execute(f"SELECT {_PLACEMENT_COLUMNS} FROM placements "
                                   "WHERE recipe = ?", (recipe,))
        return [Placement(*row) for row in rows]

    def entry(self, recipe: str, output: str) -> ManifestEntry | None:
        row = self.db.execute("SELECT entry FROM placements WHERE recipe = ? AND output = ?",
                              (recipe, output)).fetchone()
        if row is None:
            return None
        entry: ManifestEntry = json.loads(row[0])
        return entry

    def entries_json(self, recipe: str) -> Iterator[str]:
        """The manifest entries of one recipe's images, as JSON text, by path (streamed: a
        manifest of 100,000 images is written without holding them)."""
        for (text,) in self.db.execute("SELECT entry FROM placements WHERE recipe = ? "
                                       "ORDER BY path", (recipe,)):
            yield text

    def others_at(self, path: str, recipe: str) -> list[str]:
        """The other recipes whose image is the file at `path`."""
        rows = self.db.execute("SELECT DISTINCT recipe FROM placements WHERE path = ? AND "
                               "recipe != ?", (path, recipe))
        return [name for (name,) in rows]

    # -- writing ------------------------------------------------------------------------

    def _place(self, recipe: str, output: str, key: str, entry: ManifestEntry,
               mtime_ns: int | None) -> None:
        """(Within a transaction: the ledger learns of the key at the same time.)"""
        self.db.execute(
            "INSERT INTO placements (recipe, output, path, key, entry, sha256, bytes, "
            "mtime_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(recipe, output) DO "
            "UPDATE SET path = excluded.path, key = excluded.key, entry = excluded.entry, "
            "sha256 = excluded.sha256, bytes = excluded.bytes, "
            "mtime_ns = excluded.mtime_ns",
            (recipe, output, entry["path"], key,
             json.dumps(entry, ensure_ascii=False, sort_keys=True), entry["sha256"],
             entry["bytes"], mtime_ns))

    def touch(self, recipe: str, output: str, mtime_ns: int) -> None:
        """The file was verified by hash: remember its mtime for the fast path next time."""
        self.db.execute("UPDATE placements SET mtime_ns = ? WHERE recipe = ? AND output = ?",
                        (mtime_ns, recipe, output))

    def forget(self, recipe: str, outputs: Iterable[str]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM placements WHERE recipe = ? AND output = ?",
                                [(recipe, output) for output in outputs])

    # -- the manifest derived from them ---------------------------------------------------

    def wrote_manifest(self, recipe: str, path: Path) -> None:
        """Remember the manifest just written (size and mtime), so that a run with nothing
        to do can tell it is intact without reading it."""
        stat = os.stat(path)
        self._set_meta(f"manifest:{recipe}", f"{stat.st_size}:{stat.st_mtime_ns}")

    def manifest_intact(self, recipe: str, path: Path) -> bool:
        try:
            stat = os.stat(path)
        except OSError:
            return False
        return self.meta(f"manifest:{recipe}") == f"{stat.st_size}:{stat.st_mtime_ns}"
