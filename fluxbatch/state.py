"""The state store: what has been rendered, and what is in flight, per output path.

An SQLite database in the output root (`.fluxbatch/state.sqlite`, WAL mode, one committed
transaction per state change) records each image's lifecycle:

    planned → submitting → submitted (task id, polling URL, cost: committed before the first
    poll) → ready (sample URL, reported seed) → written (path, sha256, size, mtime)
    — or moderated / failed / unknown, with the reason.

A row keeps two things apart: the latest *attempt* (`key`, `status`, task fields) and the
last *written image* (`written_key`, `entry`, file facts), so a failed re-render of a stale
image never forgets the image still on disk. `manifest.json` is derived from the written
images; when the store is missing it is rebuilt from the manifest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxbatch import imagemeta
from fluxbatch.errors import StateError

if TYPE_CHECKING:  # (the outbox process imports this module, and needs no planner)
    from fluxbatch.expand import Job

STATE_DIR = ".fluxbatch"
DATABASE = "state.sqlite"
LOCK = "lock"
MANIFEST = "manifest.json"
SCHEMA_VERSION = 1

# Attempt statuses stored in `images.status`
PLANNED = "planned"
SUBMITTING = "submitting"
SUBMITTED = "submitted"
READY = "ready"
WRITTEN = "written"

_COLUMNS = """
    output TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    provider TEXT,
    base_url TEXT,
    task_id TEXT,
    polling_url TEXT,
    cost REAL,
    submitted_at REAL,
    reported_seed INTEGER,
    reason TEXT,
    updated_at REAL NOT NULL,
    written_key TEXT,
    entry TEXT,
    path TEXT,
    sha256 TEXT,
    bytes INTEGER,
    mtime_ns INTEGER
"""


@dataclass(frozen=True, slots=True)
class InFlight:
    """A task submitted by an earlier run, to re-attach to instead of paying again."""

    output: str
    key: str
    provider: str
    base_url: str | None
    task_id: str
    polling_url: str
    cost: float | None


@dataclass(frozen=True, slots=True)
class Record:
    """What the state knows about one output path: the latest attempt (`key`, `status`) and
    the last image written there (`written_key`, file facts)."""

    key: str
    status: str  # planned | submitting | submitted | ready | written | moderated | failed | unknown
    written_key: str | None = None
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    reason: str | None = None
    path: str | None = None



@dataclass(frozen=True, slots=True)
class Attempt:
    """The latest attempt at one output path, as committed (for settling what a dead outbox
    process held)."""

    key: str
    status: str
    task_id: str | None
    polling_url: str | None
    cost: float | None
    updated_at: float


class _Connection(sqlite3.Connection):
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


class Store:
    """One output root's state. Open with `Store.open(root)`; close (or use `with`)."""

    def __init__(self, root: Path, connection: sqlite3.Connection) -> None:
        self.root = root
        self.db = connection

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> Store:
        directory = root / STATE_DIR
        path = directory / DATABASE
        document = None
        if not path.exists():
            if not create:
                raise FileNotFoundError(path)
            document = read_manifest(root)  # a damaged manifest stops us before anything exists
        try:
            directory.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, timeout=30, isolation_level=None,
                                         factory=_Connection)
            connection.path = path
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(f"CREATE TABLE IF NOT EXISTS images ({_COLUMNS})")
            connection.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, "
                               "value TEXT NOT NULL)")
            found = connection.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.DatabaseError as error:
            raise unreadable_store(path, error) from None
        except StateError:
            raise
        except OSError as error:
            raise StateError(f"{path}: cannot open the state store: "
                             f"{error.strerror or error}") from None
        store = cls(root, connection)
        if found is None:
            # New, or created but never filled (an empty file, a run stopped by a damaged
            # manifest): without the manifest's images every image would be paid for again.
            try:
                store.import_manifest(document)
            except BaseException:
                store.close()
                raise
        elif int(found[0]) > SCHEMA_VERSION:
            store.close()
            raise StateError(f"{path} was written by a newer fluxbatch (store schema "
                             f"{found[0]}); upgrade fluxbatch")
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_meta(self, name: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT(name) "
                        "DO UPDATE SET value = excluded.value", (name, value))

    def meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    # -- reading ------------------------------------------------------------------------

    def records(self) -> dict[str, Record]:
        """What the planner needs to classify each output path."""
        records = {}
        try:
            rows = self.db.execute(
                "SELECT output, key, status, written_key, sha256, bytes, mtime_ns, reason, path "
                "FROM images"
            ).fetchall()
        except sqlite3.DatabaseError as error:  # a damaged page past the header
            raise state_error(self.root / STATE_DIR / DATABASE, error) from None
        for row in rows:
            output, key, status, written_key, sha256, size, mtime_ns, reason, path = row
            records[output] = Record(key=key, status=status, written_key=written_key,
                                     sha256=sha256, size=size, mtime_ns=mtime_ns, reason=reason,
                                     path=path)
        return records

    def in_flight(self) -> dict[str, InFlight]:
        """Submitted tasks whose result was never learned, by job key."""
        found = {}
        for row in self.db.execute(
            "SELECT output, key, provider, base_url, task_id, polling_url, cost FROM images "
            "WHERE status IN (?, ?) AND task_id IS NOT NULL", (SUBMITTED, READY)
        ):
            flight = InFlight(*row)
            found[flight.key] = flight
        return found

    def attempt(self, output: str) -> Attempt | None:
        row = self.db.execute("SELECT key, status, task_id, polling_url, cost, updated_at "
                              "FROM images WHERE output = ?", (output,)).fetchone()
        return None if row is None else Attempt(*row)

    def entries(self) -> list[dict[str, Any]]:
        """The manifest entries of every written image, by path."""
        rows = self.db.execute("SELECT entry FROM images WHERE entry IS NOT NULL ORDER BY path")
        return [json.loads(entry) for (entry,) in rows]

    # -- the lifecycle (each call one committed transaction) ---------------------------------

    def _upsert(self, output: str, key: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)
        self.db.execute(
            f"INSERT INTO images (output, key, {names}) VALUES (?, ?, {marks}) "
            f"ON CONFLICT(output) DO UPDATE SET key = excluded.key, {updates}",
            (output, key, *fields.values()),
        )

    def submitting(self, output: str, key: str, provider: str, base_url: str | None) -> None:
        self._upsert(output, key, status=SUBMITTING, provider=provider, base_url=base_url,
                     task_id=None, polling_url=None, cost=None, submitted_at=None,
                     reported_seed=None, reason=None)

    def not_sent(self, output: str, key: str) -> None:
        self._upsert(output, key, status=PLANNED)

    def submitted(self, output: str, key: str, task_id: str, polling_url: str,
                  cost: float | None, at: float) -> None:
        self._upsert(output, key, status=SUBMITTED, task_id=task_id, polling_url=polling_url,
                     cost=cost, submitted_at=at)

    def ready(self, output: str, key: str, reported_seed: int | None) -> None:
        self._upsert(output, key, status=READY, reported_seed=reported_seed)

    def ended(self, output: str, key: str, status: str, reason: str | None) -> None:
        """moderated | failed | unknown, or a pending task's reason (status unchanged)."""
        if status in (SUBMITTED, READY):
            self.db.execute("UPDATE images SET reason = ?, updated_at = ? WHERE output = ?",
                            (reason, time.time(), output))
        else:
            self._upsert(output, key, status=status, reason=reason)

    def written(self, output: str, key: str, entry: Mapping[str, Any], mtime_ns: int) -> None:
        with self.transaction():
            # Another output's record of this very file (written under another extension
            # before) no longer describes it: the file now holds this image.
            self.db.execute("UPDATE images SET written_key = NULL, entry = NULL, path = NULL, "
                            "sha256 = NULL, bytes = NULL, mtime_ns = NULL "
                            "WHERE path = ? AND output != ?", (entry["path"], output))
            self._upsert(output, key, status=WRITTEN, reason=None, written_key=key,
                         entry=json.dumps(entry, ensure_ascii=False, sort_keys=True),
                         path=entry["path"], sha256=entry["sha256"], bytes=entry["bytes"],
                         mtime_ns=mtime_ns)

    def touch(self, output: str, mtime_ns: int) -> None:
        """The file was verified by hash: remember its mtime for the fast path next time."""
        self.db.execute("UPDATE images SET mtime_ns = ? WHERE output = ?", (mtime_ns, output))

    def adopt(self, jobs: Iterable[Job]) -> int:
        """Fill an empty store from the provenance inside images on disk (when the store and
        the manifest were both lost); returns how many images were recognised."""
        found = adoptable(self.root, jobs)
        with self.transaction():
            for entry in found:
                mtime_ns = entry.pop("mtime_ns")
                self.written(entry.get("output", entry["path"]), entry["key"], entry, mtime_ns)
        return len(found)

    def is_empty(self) -> bool:
        return self.db.execute("SELECT 1 FROM images LIMIT 1").fetchone() is None

    def forget(self, outputs: list[str]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM images WHERE output = ?", [(o,) for o in outputs])

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

    # -- the recipe that owns this root ----------------------------------------------------

    def claim_root(self, recipe_name: str) -> None:
        """One output root belongs to one recipe: `clean` on another would delete its images."""
        owner = self.meta("recipe")
        if owner is None:
            self._set_meta("recipe", recipe_name)
        elif owner != recipe_name:
            raise StateError(
                f"{self.root} holds the images of recipe {owner!r}, not {recipe_name!r}: give "
                "each recipe its own output root (output_root: or --out)"
            )

    # -- rebuilding ---------------------------------------------------------------------------

    def import_manifest(self, document: Mapping[str, Any] | None = None) -> int:
        """Fill a new store from manifest.json (written images only), and mark it filled in
        the same transaction; returns how many."""
        if document is None:
            document = read_manifest(self.root) or {}
        with self.transaction():
            if self.meta("schema") is not None:
                return 0  # check, lock, re-check: another process has just filled it
            self._set_meta("schema", str(SCHEMA_VERSION))
            for entry in document.get("images", []):
                # mtime unknown: the first classification verifies the file by its sha256
                self._upsert(entry.get("output", entry["path"]), entry["key"], status=WRITTEN,
                             written_key=entry["key"],
                             entry=json.dumps(entry, ensure_ascii=False, sort_keys=True),
                             path=entry["path"], sha256=entry["sha256"], bytes=entry["bytes"],
                             mtime_ns=None)
            recipe = (document.get("recipe") or {}).get("name")
            if recipe:
                self._set_meta("recipe", recipe)
        return len(document.get("images", []))


def unreadable_store(path: Path, error: sqlite3.DatabaseError) -> StateError:
    return StateError(
        f"{path}: the state store is unreadable ({error}). Move it away (for example "
        f"`mv {path} {path}.broken`) and run again: fluxbatch rebuilds it from "
        f"{path.parent.parent / MANIFEST}. No image is touched."
    )


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest, or None when there is none; a clear error when it is damaged."""
    path = root / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise StateError(f"{path}: cannot read the manifest: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise StateError(
            f"{path}:{error.lineno}:{error.colno}: the manifest is not valid JSON "
            f"({error.msg}). Restore it (from version control), or delete it: "
            f"{_rewritten_from(root)}. No image is touched."
        ) from None
    problems = _manifest_shape_problems(document)
    if problems:
        raise StateError(f"{path}: the manifest is damaged: {problems}. Restore it (from "
                         f"version control), or delete it: {_rewritten_from(root)}. No image "
                         "is touched.")
    return dict(document)


def _rewritten_from(root: Path) -> str:
    store = root / STATE_DIR / DATABASE
    if store.exists():
        return f"fluxbatch rewrites it from {store}"
    return "fluxbatch then recognises your images by the provenance embedded in them"


def _manifest_shape_problems(document: Any) -> str | None:
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        return "expected an object with an 'images' list"
    for index, entry in enumerate(document["images"]):
        if not isinstance(entry, dict):
            return f"images[{index}] is not an object"
        for name, kind in (("path", str), ("key", str), ("sha256", str), ("bytes", int)):
            if not isinstance(entry.get(name), kind):
                return f"images[{index}].{name} is missing or not a {kind.__name__}"
    return None


class RootLock:
    """An exclusive lock on an output root, held for a whole `render` (and by its outbox
    process until that has committed its last answer): two processes never both pay for one
    image. The OS releases it when its holders die."""

    def __init__(self, root: Path, *, wait: float = 15.0) -> None:
        self.path = root / STATE_DIR / LOCK
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> RootLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise StateError(
                        f"{self.path.parent.parent} is being rendered by another fluxbatch "
                        f"({holder or 'another process'}); wait for it to finish, or render "
                        "into another output root"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def has_store(root: Path) -> bool:
    return (root / STATE_DIR / DATABASE).exists()


def read_records(root: Path, jobs: Iterable[Job] = ()) -> dict[str, Record]:
    """Records by output path, without creating anything (for `plan`, `status`, `gallery`).
    With neither a store nor a manifest, images on disk that carry the provenance of a
    planned job count as written."""
    if has_store(root):
        with Store.open(root, create=False) as store:
            return store.records()
    document = read_manifest(root)
    entries = document["images"] if document is not None else adoptable(root, jobs)
    return {
        entry.get("output", entry["path"]): Record(
            key=entry["key"], status=WRITTEN, written_key=entry["key"], sha256=entry["sha256"],
            size=entry["bytes"], mtime_ns=entry.get("mtime_ns"), path=entry["path"])
        for entry in entries
    }


_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def adoptable(root: Path, jobs: Iterable[Job]) -> list[dict[str, Any]]:
    """Manifest entries recovered from the provenance inside images already on disk: what a
    lost store and manifest can be rebuilt from. Only an image whose embedded key is its
    planned job's key counts."""
    entries = []
    for job in jobs:
        planned = root / job.output
        candidates = [planned, *(planned.with_suffix(e) for e in _EXTENSIONS
                                 if e != planned.suffix.lower())]
        for candidate in candidates:
            entry = _provenance(candidate)
            if entry is None or entry.get("key") != job.key:
                continue
            data = candidate.read_bytes()
            entries.append(dict(entry, path=candidate.relative_to(root).as_posix(),
                                sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                                mtime_ns=os.stat(candidate).st_mtime_ns))
            break
    return entries


def _provenance(path: Path) -> dict[str, Any] | None:
    try:
        return imagemeta.extract(path.read_bytes())
    except (OSError, imagemeta.ImageFormatError):
        return None
