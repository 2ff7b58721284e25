"""The output root's lock: one `render` (or `merge`, `clean`) at a time per root."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from fluxbatch.errors import StateError
from fluxbatch.layout import LOCK, STATE_DIR
from fluxbatch.state.files import make_state_dir


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
