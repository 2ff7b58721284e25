"""The content store: the bytes of each downloaded image, named by their sha256
(`.fluxbatch/blobs/ab/abcd…`), flushed to disk before the ledger says "fetched", and
checked against that sha256 whenever they are read.

`BlobStore` is what the placing code asks of a content store; `LocalBlobs` is the output
root's own. The functions below are the local store's primitives."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fluxbatch.errors import StateError
from fluxbatch.layout import BLOBS, DATABASE, STATE_DIR
from fluxbatch.state.files import move_into_place
from fluxbatch.state.ledger import Task, TaskStatus

_SHA256 = re.compile(r"[0-9a-f]{64}")


class DamagedBlob(Exception):
    """A downloaded image in the content store whose bytes no longer match their sha256
    (damaged on disk): the message says which."""


class BlobStore(Protocol):
    """Image bytes by their sha256. `read` checks them (`DamagedBlob` when they no longer
    match); `drop` forgets a damaged copy."""

    def has(self, sha256: str) -> bool: ...

    def read(self, sha256: str) -> bytes: ...

    def keep(self, spooled: Path, sha256: str) -> None: ...

    def drop(self, sha256: str) -> None: ...


@dataclass(frozen=True, slots=True)
class LocalBlobs:
    """The output root's content store."""

    root: Path

    def has(self, sha256: str) -> bool:
        return is_sha256(sha256) and blob_path(self.root, sha256).is_file()

    def read(self, sha256: str) -> bytes:
        return read_blob(self.root, sha256)

    def keep(self, spooled: Path, sha256: str) -> None:
        keep_blob(self.root, spooled, sha256)

    def drop(self, sha256: str) -> None:
        blob_path(self.root, sha256).unlink(missing_ok=True)


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


def fetched_blob(task: Task | None) -> str | None:
    """The sha256 of the bytes the ledger says were kept of `task`, if it says so."""
    return task.blob if task is not None and task.status == TaskStatus.FETCHED else None


def has_blob(root: Path, task: Task | None) -> bool:
    """Whether the content store holds the bytes of `task` (a blob name that is not a sha256
    counts as none: the task is collected again)."""
    blob = fetched_blob(task)
    return blob is not None and LocalBlobs(root).has(blob)


def read_blob(root: Path, sha256: str) -> bytes:
    """The bytes of a downloaded image, checked against the sha256 they are named by."""
    path = blob_path(root, sha256)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DamagedBlob(f"the downloaded image kept in {path} was damaged on disk (its "
                          "bytes no longer match their sha256)")
    return data
