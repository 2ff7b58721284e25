"""Files in an output root, written so that no one (not a reader, not a crash) sees half of
one; the state directory, made with a `.gitignore` in it; and a file's sha256, by which a
placed image is checked."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fluxbatch.errors import StateError
from fluxbatch.layout import BLOBS, GITIGNORE, STATE_DIR, TMP

_GITIGNORE_TEXT = "# Written by fluxbatch: its state stays out of version control.\n*\n"


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


# -- the state directory ----------------------------------------------------------------------


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


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
