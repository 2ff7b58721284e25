"""The store: one output root's SQLite file opened — the ledger and the placements in one
database, so that a placement and what the ledger learns of its key commit together — and
the recipes that use the root. A store created where manifests stand is filled from them
(so no image is paid again), and upgraded in place by `migrations`."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterable
from pathlib import Path

from fluxbatch.errors import StateError
from fluxbatch.layout import DATABASE, STATE_DIR, manifest_name
from fluxbatch.providers import credits
from fluxbatch.state import migrations
from fluxbatch.state.adopt import Planned, adoptable
from fluxbatch.state.database import connect, unreadable_store
from fluxbatch.state.files import make_state_dir
from fluxbatch.state.ledger import LedgerTables
from fluxbatch.state.manifests import Manifest, ManifestEntry, read_manifests
from fluxbatch.state.placements import PlacementTables


def has_store(root: Path) -> bool:
    return (root / STATE_DIR / DATABASE).exists()


class Store(LedgerTables, PlacementTables):
    """One output root's state. Open with `Store.open(root)`; close (or use `with`)."""

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> Store:
        path = root / STATE_DIR / DATABASE
        if not path.exists() and not create:
            raise FileNotFoundError(path)
        documents = None if path.exists() else read_manifests(root)  # damaged: stop here
        try:
            if create:
                make_state_dir(root)
            connection = connect(path)
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

    def _migrate(self, documents: list[Manifest] | None) -> None:
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

    # -- placing (the placement and its key in the ledger, in one transaction) -------------

    def placed(self, recipe: str, output: str, key: str, entry: ManifestEntry,
               mtime_ns: int) -> None:
        with self.transaction():
            self._place(recipe, output, key, entry, mtime_ns)
            # Another placement of this very file (the same path, under another output or
            # recipe) with other bytes no longer describes it.
            self.db.execute("DELETE FROM placements WHERE path = ? AND sha256 != ?",
                            (entry["path"], entry["sha256"]))
            self.known(key)

    def root_id(self) -> str:
        """This output root's id, made the first time it is asked for: a shared store's claims
        name the root that made them, so that its next run knows its own."""
        found = self.meta("root_id")
        if found is None:
            found = uuid.uuid4().hex
            with self.transaction():
                self._set_meta("root_id", found)
        return found

    # -- recipes ------------------------------------------------------------------------

    def recipes(self) -> dict[str, str | None]:
        return dict(self.db.execute("SELECT name, path FROM recipes").fetchall())

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

    def import_manifest(self, document: Manifest) -> int:
        """Placements from a manifest (its images only; mtime unknown, so the first look
        verifies each file by its sha256); returns how many."""
        recipe = (document.get("recipe") or {}).get("name") or ""
        images = document.get("images", [])
        with self.transaction():
            for entry in images:
                if "cost" in entry:  # (a manifest is data anyone can edit: 1e999 reads as inf)
                    entry = {**entry, "cost": credits(entry["cost"])}
                self._place(recipe, entry.get("output", entry["path"]), entry["key"], entry,
                            None)
                self.known(entry["key"])
            if recipe:
                self.db.execute("INSERT OR IGNORE INTO recipes (name, path) VALUES (?, NULL)",
                                (recipe,))
        return len(images)

    def adopt(self, recipe: str, jobs: Iterable[Planned]) -> int:
        """Placements from the provenance inside images on disk (when the store and the
        manifests were lost); returns how many images were recognised."""
        found = adoptable(self.root, jobs)
        with self.transaction():
            for entry, mtime_ns in found:
                self.placed(recipe, entry.get("output", entry["path"]), entry["key"], entry,
                            mtime_ns)
        return len(found)
