"""The SQLite file of an output root's state (`.fluxbatch/state.sqlite`, WAL): its
connection, whose every failure is a `StateError` that says what to do, its transactions,
and its `meta` table. The tables themselves are read and written by `ledger`, `placements`
and `store`; their schema is in `migrations`."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fluxbatch.errors import StateError


class Connection(sqlite3.Connection):
    """Every statement's failure as a `StateError` that says what to do: a full disk, a
    read-only folder or a damaged file must end a run with one clear line, not a traceback."""

    path: Path

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as error:
            raise state_error(self.path, error) from None

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.Error as error:
            raise state_error(self.path, error) from None


def state_error(path: Path, error: sqlite3.Error) -> StateError:
    if isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError):
        return unreadable_store(path, error)  # damaged: malformed, not a database
    return StateError(f"{path}: cannot record in the state store ({error}). Free some space "
                      "or make the folder writable, then run again: what was recorded is kept, "
                      "and nothing is paid twice.")


def unreadable_store(path: Path, error: sqlite3.DatabaseError) -> StateError:
    # The folder ends in a separator, and the sentence with it: a root of `.` read
    # "...from the manifests in .. No image..." when a full stop followed it.
    folder = os.path.join(path.parent.parent, "")
    return StateError(
        f"{path}: the state store is unreadable ({error}). No image is touched: move it away "
        f"(for example `mv {path} {path}.broken`) and run again, and fluxbatch rebuilds it "
        f"from the manifests in {folder}"
    )


def connect(path: Path) -> sqlite3.Connection:
    """The database at `path` (made if need be), every change durable once committed."""
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, factory=Connection)
    connection.path = path
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


class Tables:
    """One root's open database: what the ledger, the placements and the store share."""

    def __init__(self, root: Path, connection: sqlite3.Connection) -> None:
        self.root = root
        self.db = connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One committed transaction; nested uses join the outer one."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            # (SQLite may have rolled back by itself, on a full disk: then this one fails)
            with contextlib.suppress(StateError):
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _set_meta(self, name: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT(name) "
                        "DO UPDATE SET value = excluded.value", (name, value))

    def meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])
