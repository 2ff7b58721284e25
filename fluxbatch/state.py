"""The state of an output root: what was paid for, by job key; where images were placed, by
recipe and output; and the bytes that were downloaded.

`.fluxbatch/` in the output root holds:

- `state.sqlite` (WAL, one committed transaction per change; schema in `migrations.py`):
  - `tasks`, the ledger: per job key, its latest task — submitting → submitted (task id,
    polling URL, cost: committed before the first poll) → ready (reported seed) → fetched
    (the bytes' sha256) — or moderated / failed / unknown / gone, with the reason (placed:
    the bytes are only in placed files);
  - `placements`: per (recipe, output), the file written there (path, sha256, size, mtime)
    and its manifest entry;
  - `recipes`: the recipes that use this root.
- `blobs/ab/abcd…`: the bytes as downloaded, named by their sha256, fsync'd before the ledger
  says "fetched" (the content store);
- `inputs.json`, the facts of image inputs (hash, format, size) by path, size and mtime;
- `tmp/`, `lock`, `outbox.log`;
- `.gitignore` (`*`), so that `git add -A` in a project never commits any of it.

An image is its key: a key whose bytes the root holds (in the content store or in any placed
file) is placed, never paid for again; a key with a task in flight is collected.
`<recipe>.manifest.json` is derived from one recipe's placements; a lost store is rebuilt from
the manifests, and a lost store and manifests from the provenance inside the images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypedDict, cast

from fluxbatch import imagemeta, migrations
from fluxbatch.errors import StateError
from fluxbatch.outcomes import OutcomeStatus
from fluxbatch.providers import without_credentials
from fluxbatch.vocabulary import Vocabulary

if TYPE_CHECKING:  # (the outbox process imports this module, and needs no planner)
    from fluxbatch.expand import Job

STATE_DIR = ".fluxbatch"
DATABASE = "state.sqlite"
LOCK = "lock"
BLOBS = "blobs"
TMP = "tmp"  # files being written (`write.temp_dir`), cleared at the start of each render
LEGACY_MANIFEST = "manifest.json"  # the first release's name, for a root of one recipe
GITIGNORE = ".gitignore"
_GITIGNORE_TEXT = "# Written by fluxbatch: its state stays out of version control.\n*\n"


class TaskStatus(Vocabulary):
    """Where a job key's latest task stands, in the ledger (`tasks.status`)."""

    SUBMITTING = "submitting"  # handed to the wire: until an answer, it may have been billed
    SUBMITTED = "submitted"
    READY = "ready"
    FETCHED = "fetched"  # the bytes are in the content store
    PLACED = "placed"  # the bytes are only in placed files (a migrated root, a pruned store)
    MODERATED = "moderated"
    FAILED = "failed"
    UNKNOWN = "unknown"
    GONE = "gone"  # paid, but the provider forgot the task before its bytes were kept


IN_FLIGHT = frozenset({TaskStatus.SUBMITTED, TaskStatus.READY})


def manifest_name(recipe: str) -> str:
    return f"{recipe}.manifest.json"


class RecipeRef(TypedDict):
    name: str
    sha256: str


class Provenance(TypedDict):
    """An image's manifest entry as embedded in the image (`write.provenance`): everything but
    the file's own hash and size. A contract: schemas/manifest.schema.json."""

    path: str  # the file, relative to the output root (with its real format's extension)
    output: str  # the planned output path
    key: str  # sha256 of the model and request: the same key is the same image
    job: str
    vars: dict[str, Any]  # the matrix combination
    replicate: int
    prompt: str | None
    model: str
    request: dict[str, Any]  # the body sent, secrets as ***, image inputs as descriptors
    seed: int
    reported_seed: int | None
    provider: str
    task_id: str | None
    cost: float | None  # credits reported (1 credit = $0.01)
    submitted_at: str | None  # ISO 8601, UTC
    finished_at: str | None
    recipe: RecipeRef
    spec_date: str  # of the vendored BFL spec
    fluxbatch: str  # the version that wrote it
    status: Literal[OutcomeStatus.WRITTEN]


class ManifestEntry(Provenance):
    """An image's entry in its recipe's manifest and in the state store: its provenance, and
    the sha256 and size of the file as written (provenance included). An entry read back may
    come from a file (a manifest, an image's provenance) that only its path, key, sha256 and
    bytes were checked in: read the other fields with `.get`."""

    sha256: str
    bytes: int


@dataclass(frozen=True, slots=True)
class Task:
    """The ledger's row for one job key."""

    key: str
    status: TaskStatus
    provider: str | None = None
    base_url: str | None = None
    task_id: str | None = None
    polling_url: str | None = None
    cost: float | None = None
    submitted_at: float | None = None
    reported_seed: int | None = None
    blob: str | None = None
    reason: str | None = None
    run: str | None = None
    updated_at: float = 0.0


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


_TASK_COLUMNS = ("key, status, provider, base_url, task_id, polling_url, cost, submitted_at, "
                 "reported_seed, blob, reason, run, updated_at")
_PLACEMENT_COLUMNS = "recipe, output, path, key, sha256, bytes, mtime_ns"
_STATUSES = {status.value: status for status in TaskStatus}


def _task_of(row: tuple[Any, ...], root: Path) -> Task:
    """A row of `_TASK_COLUMNS` as a `Task`, its status a `TaskStatus` (found by value in a
    dict: calling the enum would cost as much as the rest, and a plan reads the whole ledger)."""
    status = _STATUSES.get(row[1])
    if status is None:
        raise StateError(f"{root / STATE_DIR / DATABASE}: the ledger holds a task whose status "
                         f"{row[1]!r} this fluxbatch does not know; upgrade fluxbatch")
    return Task(row[0], status, *row[2:])


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
        if not path.exists() and not create:
            raise FileNotFoundError(path)
        documents = None if path.exists() else read_manifests(root)  # damaged: stop here
        try:
            if create:
                make_state_dir(root)
            connection = sqlite3.connect(path, timeout=30, isolation_level=None,
                                         factory=_Connection)
            connection.path = path
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as error:
            raise unreadable_store(path, error) from None
        except StateError:
            raise
        except OSError as error:
            raise StateError(f"{path}: cannot open the state store: "
                             f"{error.strerror or error}") from None
        store = cls(root, connection)
        try:
            store._migrate(documents)
        except BaseException:
            store.close()
            raise
        return store

    def _migrate(self, documents: list[dict[str, Any]] | None) -> None:
        """Bring the schema up to date (check, lock, re-check: another process may be doing
        it); a store created now is filled from the manifests, so no image is paid again."""
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, "
                        "value TEXT NOT NULL)")
        found = self.meta("schema")
        if found is not None and int(found) > migrations.LATEST:
            raise StateError(f"{self.root / STATE_DIR / DATABASE} was written by a newer "
                             f"fluxbatch (store schema {found}); upgrade fluxbatch")
        if found is not None and int(found) == migrations.LATEST:
            return
        with self.transaction():
            current = int(self.meta("schema") or 0)
            for migration in migrations.pending(current):
                migration.apply(self.db)
                self._set_meta("schema", str(migration.version))
            if found is None:  # new, or created but never filled (an empty file)
                for document in documents or read_manifests(self.root):
                    self.import_manifest(document)
                    recipe = (document.get("recipe") or {}).get("name") or ""
                    manifest = self.root / manifest_name(recipe)
                    if recipe and manifest.is_file():  # (read whole just now: intact)
                        self.wrote_manifest(recipe, manifest)

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

    # -- reading ------------------------------------------------------------------------

    def tasks(self) -> dict[str, Task]:
        return {row[0]: _task_of(row, self.root) for row in
                self.db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks")}

    def lazy_tasks(self) -> Mapping[str, Task]:
        """The ledger, read row by row as asked (a null build of 10,000 images reads none of
        it); only while the store is open."""
        return _LazyTasks(self)

    def task(self, key: str) -> Task | None:
        row = self.db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE key = ?",
                              (key,)).fetchone()
        return None if row is None else _task_of(row, self.root)

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

    def recipes(self) -> dict[str, str | None]:
        return dict(self.db.execute("SELECT name, path FROM recipes").fetchall())

    # -- the ledger (each call one committed transaction) ---------------------------------

    def _task(self, key: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)
        self.db.execute(f"INSERT INTO tasks (key, {names}) VALUES (?, {marks}) "
                        f"ON CONFLICT(key) DO UPDATE SET {updates}", (key, *fields.values()))

    def submitting(self, key: str, provider: str, base_url: str | None,
                   run: str | None = None) -> None:
        """(A password in the base URL, `https://user:secret@host`, is not recorded.)"""
        self._task(key, status=TaskStatus.SUBMITTING, provider=provider,
                   base_url=without_credentials(base_url) if base_url else base_url,
                   task_id=None, polling_url=None, cost=None, submitted_at=None,
                   reported_seed=None, blob=None, reason=None, run=run)

    def not_sent(self, key: str) -> None:
        """The submit never left (or was refused unprocessed): nothing was paid."""
        self.db.execute("DELETE FROM tasks WHERE key = ? AND status = ?",
                        (key, TaskStatus.SUBMITTING))

    def submitted(self, key: str, task_id: str, polling_url: str, cost: float | None,
                  at: float) -> None:
        self._task(key, status=TaskStatus.SUBMITTED, task_id=task_id,
                   polling_url=without_credentials(polling_url), cost=cost, submitted_at=at)

    def ready(self, key: str, reported_seed: int | None) -> None:
        self._task(key, status=TaskStatus.READY, reported_seed=reported_seed)

    def fetched(self, key: str, blob: str) -> None:
        self._task(key, status=TaskStatus.FETCHED, blob=blob, reason=None)

    def fetch_again(self, key: str, reason: str) -> bool:
        """The bytes kept of a paid task are lost (damaged on disk): it is in flight again, to
        be polled for a fresh URL and downloaded again, without paying. False when the ledger
        knows no task to poll (then nothing changes)."""
        task = self.task(key)
        if task is None or not task.task_id or not task.polling_url:
            return False
        self._task(key, status=TaskStatus.READY, blob=None, reason=reason)
        return True

    def ended(self, key: str, status: TaskStatus, reason: str | None) -> None:
        """moderated | failed | unknown | gone; or, for a task in flight, only its reason."""
        if status in IN_FLIGHT:
            self.db.execute("UPDATE tasks SET reason = ?, updated_at = ? WHERE key = ?",
                            (reason, time.time(), key))
        else:
            self._task(key, status=status, reason=reason)

    # -- placements --------------------------------------------------------------------------

    def placed(self, recipe: str, output: str, key: str, entry: ManifestEntry,
               mtime_ns: int) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO placements (recipe, output, path, key, entry, sha256, bytes, "
                "mtime_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(recipe, output) DO "
                "UPDATE SET path = excluded.path, key = excluded.key, entry = excluded.entry, "
                "sha256 = excluded.sha256, bytes = excluded.bytes, "
                "mtime_ns = excluded.mtime_ns",
                (recipe, output, entry["path"], key,
                 json.dumps(entry, ensure_ascii=False, sort_keys=True), entry["sha256"],
                 entry["bytes"], mtime_ns))
            # Another placement of this very file (the same path, under another output or
            # recipe) with other bytes no longer describes it.
            self.db.execute("DELETE FROM placements WHERE path = ? AND sha256 != ?",
                            (entry["path"], entry["sha256"]))
            self.db.execute("INSERT OR IGNORE INTO tasks (key, status, updated_at) "
                            "VALUES (?, ?, ?)", (key, TaskStatus.PLACED, time.time()))

    def touch(self, recipe: str, output: str, mtime_ns: int) -> None:
        """The file was verified by hash: remember its mtime for the fast path next time."""
        self.db.execute("UPDATE placements SET mtime_ns = ? WHERE recipe = ? AND output = ?",
                        (mtime_ns, recipe, output))

    def forget(self, recipe: str, outputs: Iterable[str]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM placements WHERE recipe = ? AND output = ?",
                                [(recipe, output) for output in outputs])

    def others_at(self, path: str, recipe: str) -> list[str]:
        """The other recipes whose image is the file at `path`."""
        rows = self.db.execute("SELECT DISTINCT recipe FROM placements WHERE path = ? AND "
                               "recipe != ?", (path, recipe))
        return [name for (name,) in rows]

    # -- recipes ------------------------------------------------------------------------

    def use(self, recipe: str, path: Path) -> None:
        """Record that `recipe` (the file at `path`) renders into this root. Two recipes of
        one name cannot share a root: their images, manifest and orphans would mix. The path
        is kept relative to the root, so a project moved or copied whole stays one."""
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))
        with self.transaction():
            known = self.recipes()
            other = known.get(recipe)
            if other is not None and other != relative and (self.root / other).is_file():
                raise StateError(
                    f"{self.root} already holds the images of another recipe named "
                    f"{recipe!r} ({self.root / other}): give this one ({path}) another name, "
                    "or another output root")
            self.db.execute("INSERT INTO recipes (name, path) VALUES (?, ?) ON CONFLICT(name) "
                            "DO UPDATE SET path = excluded.path", (recipe, relative))

    # -- rebuilding ---------------------------------------------------------------------------

    def import_manifest(self, document: Mapping[str, Any]) -> int:
        """Placements from a manifest (its images only; mtime unknown, so the first look
        verifies each file by its sha256); returns how many."""
        recipe = (document.get("recipe") or {}).get("name") or ""
        images = document.get("images", [])
        with self.transaction():
            for entry in images:
                self.db.execute(
                    "INSERT OR REPLACE INTO placements (recipe, output, path, key, entry, "
                    "sha256, bytes, mtime_ns) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                    (recipe, entry.get("output", entry["path"]), entry["path"], entry["key"],
                     json.dumps(entry, ensure_ascii=False, sort_keys=True), entry["sha256"],
                     entry["bytes"]))
                self.db.execute("INSERT OR IGNORE INTO tasks (key, status, updated_at) "
                                "VALUES (?, ?, ?)", (entry["key"], TaskStatus.PLACED, time.time()))
            if recipe:
                self.db.execute("INSERT OR IGNORE INTO recipes (name, path) VALUES (?, NULL)",
                                (recipe,))
        return len(images)

    def adopt(self, recipe: str, jobs: Iterable[Job]) -> int:
        """Placements from the provenance inside images on disk (when the store and the
        manifests were lost); returns how many images were recognised."""
        found = adoptable(self.root, jobs)
        with self.transaction():
            for entry, mtime_ns in found:
                self.placed(recipe, entry.get("output", entry["path"]), entry["key"], entry,
                            mtime_ns)
        return len(found)


class _LazyTasks(Mapping[str, Task]):
    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: dict[str, Task | None] = {}
        self.every: dict[str, Task] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        if self.every is not None:
            return self.every.get(key, default)
        if key not in self.seen:
            self.seen[key] = self.store.task(key)
        found = self.seen[key]
        return default if found is None else found

    def __getitem__(self, key: str) -> Task:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def _all(self) -> dict[str, Task]:
        if self.every is None:
            self.every = self.store.tasks()
        return self.every

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def unreadable_store(path: Path, error: sqlite3.DatabaseError) -> StateError:
    # The folder ends in a separator, and the sentence with it: a root of `.` read
    # "...from the manifests in .. No image..." when a full stop followed it.
    folder = os.path.join(path.parent.parent, "")
    return StateError(
        f"{path}: the state store is unreadable ({error}). No image is touched: move it away "
        f"(for example `mv {path} {path}.broken`) and run again, and fluxbatch rebuilds it "
        f"from the manifests in {folder}"
    )


# -- the content store -----------------------------------------------------------------------


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(name: str) -> bool:
    """Whether `name` is a sha256 in hex, as blobs are named (and nothing else: a name read
    from the ledger becomes a path)."""
    return _SHA256.fullmatch(name) is not None


def blob_path(root: Path, sha256: str) -> Path:
    if not is_sha256(sha256):
        raise StateError(f"{root / STATE_DIR / DATABASE}: the ledger names a downloaded image "
                         f"{sha256!r}, which is not a sha256; nothing is read or deleted "
                         "through it")
    return root / STATE_DIR / BLOBS / sha256[:2] / sha256


def keep_blob(root: Path, spooled: Path, sha256: str) -> Path:
    """Move a downloaded file (already flushed to disk) into the content store, durably."""
    target = blob_path(root, sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(spooled, "rb") as handle:
        os.fsync(handle.fileno())
    move_into_place(spooled, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
    return target


def has_blob(root: Path, task: Task | None) -> bool:
    """Whether the content store holds the bytes of `task` (a blob name that is not a sha256
    counts as none: the task is collected again)."""
    return task is not None and task.status == TaskStatus.FETCHED and task.blob is not None and \
        is_sha256(task.blob) and blob_path(root, task.blob).is_file()


class DamagedBlob(Exception):
    """A downloaded image in the content store whose bytes no longer match their sha256
    (damaged on disk): the message says which."""


def read_blob(root: Path, sha256: str) -> bytes:
    """The bytes of a downloaded image, checked against the sha256 they are named by."""
    path = blob_path(root, sha256)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DamagedBlob(f"the downloaded image kept in {path} was damaged on disk (its "
                          "bytes no longer match their sha256)")
    return data


@contextlib.contextmanager
def replacing(target: Path, temp_dir: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A new temporary file in `temp_dir` that, once the block ends, is flushed to disk and
    renamed over `target` (`move_into_place`); on any error it goes, `target` untouched. It
    is created as `open()` creates files: its permissions follow the umask."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    fd, temporary = _new_temporary(temp_dir, target.name)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        move_into_place(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def move_into_place(temporary: Path, target: Path) -> None:
    """Rename `temporary` (flushed to disk) over `target`. When the two are on different
    file systems (an output folder that is another mount: a Docker volume, a bind mount), the
    rename fails with EXDEV: the file is then copied to a temporary file beside `target`,
    flushed and renamed there, so that a reader (or a crash) still never sees half a file."""
    try:
        os.replace(temporary, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV or temporary.parent == target.parent:
            raise  # (within one folder, a copy would meet the same refusal)
    with open(temporary, "rb") as source, replacing(target, target.parent) as copy:
        shutil.copyfileobj(source, copy)
    os.unlink(temporary)


def _new_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty file in `folder`, named after `name`, opened for writing with the mode
    `open()` would give it (0666 less the umask; `mkstemp` would make it 0600)."""
    for _ in range(100):
        # (a short prefix: a name near the file system's limit must still leave room for it)
        path = folder / f".{name[:40]}.{os.urandom(4).hex()}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free name for a temporary file", str(folder))


# -- manifests -------------------------------------------------------------------------------


def read_manifest(root: Path, recipe: str) -> dict[str, Any] | None:
    """`recipe`'s manifest (or the first release's `manifest.json`, when it is this recipe's),
    or None when there is none; a clear error when it is damaged."""
    document = _read_manifest_file(root / manifest_name(recipe))
    if document is None:
        legacy = _read_manifest_file(root / LEGACY_MANIFEST)
        if legacy is not None and (legacy.get("recipe") or {}).get("name") == recipe:
            return legacy
    return document


def read_manifests(root: Path) -> list[dict[str, Any]]:
    """Every manifest in the root (each recipe's, and a first-release `manifest.json`)."""
    found = []
    names = sorted(p.name for p in root.glob("*.manifest.json")) if root.is_dir() else []
    for name in [*names, LEGACY_MANIFEST]:
        document = _read_manifest_file(root / name)
        if document is not None:
            found.append(document)
    return found


def _read_manifest_file(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise StateError(f"{path}: cannot read the manifest: {error}") from None
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        where = f":{error.lineno}:{error.colno}" if isinstance(error, json.JSONDecodeError) \
            else ""
        detail = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise StateError(
            f"{path}{where}: the manifest is not valid JSON ({detail}). Restore it (from "
            f"version control), or delete it: {_rewritten_from(path.parent)}. No image is "
            "touched.") from None
    problems = _manifest_shape_problems(document)
    if problems:
        raise StateError(f"{path}: the manifest is damaged: {problems}. Restore it (from "
                         f"version control), or delete it: {_rewritten_from(path.parent)}. "
                         "No image is touched.")
    return dict(document)


def _rewritten_from(root: Path) -> str:
    store = root / STATE_DIR / DATABASE
    if store.exists():
        return f"fluxbatch rewrites it from {store}"
    return "fluxbatch then recognises your images by the provenance embedded in them"


def _manifest_shape_problems(document: Any) -> str | None:
    from fluxbatch.expand import output_path_problem  # (here: expand imports this module)

    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        return "expected an object with an 'images' list"
    for index, entry in enumerate(document["images"]):
        if not isinstance(entry, dict):
            return f"images[{index}] is not an object"
        for name, kind in (("path", str), ("key", str), ("sha256", str), ("bytes", int)):
            if not isinstance(entry.get(name), kind):
                return f"images[{index}].{name} is missing or not a {kind.__name__}"
        # A manifest is data anyone can edit: its paths are held to the rules of a recipe's
        # output paths (relative, no `..`, not into .fluxbatch/) before anything is read,
        # written or deleted through them.
        output = entry.get("output", entry["path"])
        if not isinstance(output, str):
            return f"images[{index}].output is not a str"
        problem = output_path_problem(entry["path"]) or output_path_problem(output)
        if problem is not None:
            return f"images[{index}] is refused: {problem}"
    return None


# -- the lock --------------------------------------------------------------------------------


class RootLock:
    """An exclusive lock on an output root, held for a whole `render` (and by its outbox
    process until that has committed its last answer): two processes never both pay for one
    image. The OS releases it when its holders die."""

    def __init__(self, root: Path, *, wait: float = 15.0) -> None:
        self.path = root / STATE_DIR / LOCK
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> RootLock:
        make_state_dir(self.path.parent.parent)
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


def make_state_dir(root: Path) -> Path:
    """The root's state directory, made if need be, with a `.gitignore` in it (as pytest does
    for its cache): a project's `git add -A` commits no ledger, blob or lock. A root made by an
    earlier release gets one the first time it is written to. The directory, its `blobs/` and
    its `tmp/` (cleared at each render) may not be symbolic links: one committed in a pull
    request would send writes, and deletions, elsewhere."""
    directory = root / STATE_DIR
    for path in (directory, directory / BLOBS, directory / TMP):
        if os.path.islink(path):
            raise StateError(
                f"{path} is a symbolic link (to {os.readlink(path)}): fluxbatch keeps an output "
                "root's state only in real folders inside it, and writes, clears and deletes "
                f"nothing through a link. Remove the link (`rm {path}`) and run again.")
    directory.mkdir(parents=True, exist_ok=True)
    ignore_in_git(directory)
    return directory


def ignore_in_git(directory: Path) -> None:
    """Write `directory/.gitignore` (`*`) unless a file of that name is there: one the user
    wrote is theirs, and never replaced. Written whole, then linked into place (so no one sees
    half of it, and a file that appears meanwhile wins). Not worth failing a render for: an
    OSError leaves it unwritten."""
    target = directory / GITIGNORE
    if os.path.lexists(target):
        return
    with contextlib.suppress(OSError):
        fd, temporary = _new_temporary(directory, GITIGNORE)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(_GITIGNORE_TEXT)
            os.link(temporary, target)
        finally:
            os.unlink(temporary)


# -- what is on disk, for a root without a store ------------------------------------------


@dataclass(frozen=True, slots=True)
class RootState:
    """What planning needs from an output root, read once: the ledger, every recipe's
    placements, and which recipe asks."""

    recipe: str
    tasks: Mapping[str, Task]
    placements: Mapping[str, Placement]  # this recipe's, by output
    by_key: Mapping[str, list[Placement]]  # every recipe's, by key

    @classmethod
    def of(cls, recipe: str, tasks: Mapping[str, Task],
           placements: Iterable[Placement]) -> RootState:
        own: dict[str, Placement] = {}
        by_key: dict[str, list[Placement]] = {}
        for placement in placements:
            by_key.setdefault(placement.key, []).append(placement)
            if placement.recipe == recipe:
                own[placement.output] = placement
        return cls(recipe, tasks, own, by_key)

    def with_found(self, root: Path, jobs: Iterable[Job]) -> RootState:
        """This state plus what `render` adopts (`Store.adopt`): the images at the planned
        paths of jobs not placed for this recipe whose embedded provenance carries the
        planned key. (Only folders that exist are listed, and only files there opened.)"""
        unplaced = [job for job in jobs if job.output not in self.placements]
        found = [_placement(self.recipe, entry, mtime_ns)
                 for entry, mtime_ns in adoptable(root, unplaced)] if unplaced else []
        if not found:
            return self
        placements, by_key = dict(self.placements), dict(self.by_key)
        for placement in found:
            placements[placement.output] = placement
            by_key[placement.key] = [*by_key.get(placement.key, ()), placement]
        return dataclasses.replace(self, placements=placements, by_key=by_key)


def read_state(root: Path, recipe: str, jobs: Iterable[Job] = ()) -> RootState:
    """The root's state without creating anything (for `plan`, `status`, `gallery`), as
    `render` would find it: the store, or the manifests standing in for a lost one; and, as
    `render` adopts them, images at the planned paths of the jobs not placed for this recipe
    whose embedded provenance carries the planned key."""
    tasks: Mapping[str, Task] = {}
    if has_store(root):
        with Store.open(root, create=False) as store:
            tasks, placements = store.tasks(), store.placements()
    else:
        placements = [_placement((document.get("recipe") or {}).get("name") or "", entry)
                      for document in read_manifests(root) for entry in document["images"]]
    return RootState.of(recipe, tasks, placements).with_found(root, jobs)


def read_entries(root: Path, recipe: str, outputs: Iterable[str]) -> dict[str, ManifestEntry]:
    """The manifest entries of some of a recipe's placements, by output, without creating
    anything (to say what changed at a stale output)."""
    wanted = set(outputs)
    if not wanted:
        return {}
    if has_store(root):
        with Store.open(root, create=False) as store:
            return {output: entry for output in wanted
                    if (entry := store.entry(recipe, output)) is not None}
    document = read_manifest(root, recipe) or {"images": []}
    return {entry.get("output", entry["path"]): entry for entry in document["images"]
            if entry.get("output", entry["path"]) in wanted}


def _placement(recipe: str, entry: Mapping[str, Any], mtime_ns: int | None = None) -> Placement:
    return Placement(recipe, entry.get("output", entry["path"]), entry["path"], entry["key"],
                     entry["sha256"], entry["bytes"], mtime_ns)


_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def adoptable(root: Path, jobs: Iterable[Job]) -> list[tuple[ManifestEntry, int]]:
    """Manifest entries recovered from the provenance inside images already on disk, each
    with its file's mtime. Only an image whose embedded key is its planned job's key counts.
    Each folder is listed once, and only files that exist are opened (a first plan of
    100,000 images opens nothing)."""
    listings: dict[str, set[str]] = {}
    entries = []
    for job in jobs:
        folder, name = os.path.split(job.output)
        names = listings.get(folder)
        if names is None:
            try:
                names = listings[folder] = set(os.listdir(root / folder))
            except OSError:
                names = listings[folder] = set()
        if not names:
            continue
        stem = os.path.splitext(name)[0]
        candidates = [name, *(stem + e for e in _EXTENSIONS if stem + e != name)]
        for candidate in candidates:
            if candidate not in names:
                continue
            path = root / folder / candidate
            entry = _provenance(path)
            if entry is None or entry.get("key") != job.key:
                continue
            data = path.read_bytes()
            # (found at the job's planned path: the paths embedded in the image, which anyone
            # could have written, are not used)
            found = dict(entry, path=path.relative_to(root).as_posix(), output=job.output,
                         sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
            entries.append((cast(ManifestEntry, found), os.stat(path).st_mtime_ns))
            break
    return entries


def _provenance(path: Path) -> dict[str, Any] | None:
    try:
        return imagemeta.extract(path.read_bytes())
    except (OSError, imagemeta.ImageFormatError):
        return None


def new_run_id() -> str:
    """An id for one render, recorded with each task it submits (what this run spent)."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
