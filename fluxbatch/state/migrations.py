"""The state store's schema, as an ordered list of migrations, each run once and recorded.

A new store runs them all; a store written by an earlier release runs the ones it lacks, in
one transaction each, so an output root upgrades in place without paying for anything again.
`meta.schema` holds the number of the last one applied. Never edit a migration that has
shipped: add the next one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


def _v1(db: sqlite3.Connection) -> None:
    """The first release: one row per output path (the image written there and the latest
    attempt at it)."""
    db.execute("""CREATE TABLE IF NOT EXISTS images (
        output TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL, provider TEXT,
        base_url TEXT, task_id TEXT, polling_url TEXT, cost REAL, submitted_at REAL,
        reported_seed INTEGER, reason TEXT, updated_at REAL NOT NULL, written_key TEXT,
        entry TEXT, path TEXT, sha256 TEXT, bytes INTEGER, mtime_ns INTEGER)""")


def _v2(db: sqlite3.Connection) -> None:
    """What was paid for belongs to the job key (the ledger, `tasks`), where an image was
    written belongs to a recipe and an output (`placements`). The first release's rows are
    split between the two; an image it wrote keeps its file, and a task it left in flight
    stays collectable."""
    db.execute("""CREATE TABLE tasks (
        key TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        provider TEXT, base_url TEXT, task_id TEXT, polling_url TEXT, cost REAL,
        submitted_at REAL, reported_seed INTEGER,
        blob TEXT,              -- sha256 of the bytes in the content store, once fetched
        reason TEXT,
        run TEXT,               -- the run that submitted it (what this run spent)
        updated_at REAL NOT NULL)""")
    db.execute("""CREATE TABLE placements (
        recipe TEXT NOT NULL,
        output TEXT NOT NULL,   -- the planned path
        path TEXT NOT NULL,     -- the file, with the extension of its real format
        key TEXT NOT NULL,
        entry TEXT NOT NULL,    -- its manifest entry, as JSON
        sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, mtime_ns INTEGER,
        PRIMARY KEY (recipe, output))""")
    db.execute("CREATE INDEX placements_by_key ON placements (key)")
    db.execute("CREATE INDEX placements_by_path ON placements (path)")
    db.execute("CREATE TABLE recipes (name TEXT PRIMARY KEY, path TEXT)")
    owner = db.execute("SELECT value FROM meta WHERE name = 'recipe'").fetchone()
    recipe = owner[0] if owner else ""
    now = time.time()
    rows = db.execute("SELECT output, key, status, provider, base_url, task_id, polling_url, "
                      "cost, submitted_at, reported_seed, reason, written_key, entry, path, "
                      "sha256, bytes, mtime_ns FROM images").fetchall()
    for (output, key, status, provider, base_url, task_id, polling_url, cost, submitted_at,
         reported_seed, reason, written_key, entry, path, sha256, size, mtime_ns) in rows:
        if written_key and entry:
            if not recipe:
                recipe = json.loads(entry).get("recipe", {}).get("name", "")
            db.execute("INSERT OR REPLACE INTO placements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (recipe, output, path or output, written_key, entry, sha256, size,
                        mtime_ns))
            db.execute("INSERT OR IGNORE INTO tasks (key, status, reason, updated_at) "
                       "VALUES (?, 'placed', NULL, ?)", (written_key, now))
        if status in ("written", "planned"):
            continue
        db.execute("INSERT OR REPLACE INTO tasks (key, status, provider, base_url, task_id, "
                   "polling_url, cost, submitted_at, reported_seed, reason, updated_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (key, status, provider, base_url, task_id, polling_url, cost, submitted_at,
                    reported_seed, reason, now))
    if recipe:
        db.execute("INSERT OR IGNORE INTO recipes (name, path) VALUES (?, NULL)", (recipe,))
    db.execute("DROP TABLE images")
    db.execute("DELETE FROM meta WHERE name = 'recipe'")


def _v3(db: sqlite3.Connection) -> None:
    """Money: `charges`, one row per paid submit, kept for good (the ledger's `tasks` keeps
    only a key's latest task, so a key paid twice would be counted once), and `runs`, one row
    per render, so that a budget can count what the unfinished runs it continues spent. The
    costs an earlier release recorded are carried over, with the model and recipe their
    placements name."""
    db.execute("""CREATE TABLE charges (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        run TEXT,               -- the run that paid it
        recipe TEXT, job TEXT, model TEXT, provider TEXT,
        estimate REAL,          -- USD: the catalogue's price of this request
        reserved REAL,          -- USD held for it by the run's budget before it was sent
        cost REAL,              -- credits the provider reported (NULL: none reported)
        status TEXT NOT NULL,   -- reserved | charged | refunded | unknown
        task_id TEXT,
        at REAL NOT NULL,       -- when it was sent
        settled_at REAL)""")
    db.execute("CREATE INDEX charges_by_key ON charges (key)")
    db.execute("CREATE INDEX charges_by_run ON charges (run)")
    db.execute("""CREATE TABLE runs (
        run TEXT PRIMARY KEY,
        recipe TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,          -- NULL: it is running, or it was killed
        finished INTEGER NOT NULL DEFAULT 0,  -- 1: it ran to its end (not stopped early)
        budget REAL)""")
    rows = db.execute("SELECT key, status, provider, task_id, cost, submitted_at, run, "
                      "updated_at FROM tasks WHERE task_id IS NOT NULL").fetchall()
    for key, status, provider, task_id, cost, submitted_at, run, updated_at in rows:
        found = db.execute("SELECT recipe, entry FROM placements WHERE key = ? LIMIT 1",
                           (key,)).fetchone()
        recipe, entry = (found[0], json.loads(found[1])) if found else (None, {})
        charge = "refunded" if status in ("moderated", "failed") else \
            "unknown" if status == "unknown" else "charged"
        db.execute("INSERT INTO charges (key, run, recipe, job, model, provider, cost, status, "
                   "task_id, at, settled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (key, run, recipe, entry.get("job"), entry.get("model"), provider, cost,
                    charge, task_id, submitted_at or updated_at, updated_at))


def _v4(db: sqlite3.Connection) -> None:
    """A pool of accounts (`--accounts`): each task, and each charge, names the account whose
    key paid for it (the operator's name for it, never the key), so that a later run polls
    it with that account's key, or holds it back when that account is no longer configured.
    Earlier rows name none: they were paid through the provider's own key variable."""
    db.execute("ALTER TABLE tasks ADD COLUMN account TEXT")
    db.execute("ALTER TABLE charges ADD COLUMN account TEXT")


MIGRATIONS = (
    Migration(1, "images by output path", _v1),
    Migration(2, "a ledger by job key, placements by recipe and output", _v2),
    Migration(3, "charges per paid submit, and runs", _v3),
    Migration(4, "the account that paid each task and charge", _v4),
)
LATEST = MIGRATIONS[-1].version


def pending(current: int) -> list[Migration]:
    return [migration for migration in MIGRATIONS if migration.version > current]
