"""Adoption by provenance: the images already at their planned paths whose embedded
manifest entry carries the planned key are recognised as placed (when the store and the
manifests were lost, or the images were copied in from another root)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, cast

from fluxbatch import imagemeta
from fluxbatch.state.manifests import ManifestEntry


class Planned(Protocol):
    """A planned image, as adoption sees one (`jobs.Job` is one)."""

    @property
    def key(self) -> str: ...

    @property
    def output(self) -> str: ...


_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def adoptable(root: Path, jobs: Iterable[Planned]) -> list[tuple[ManifestEntry, int]]:
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


def _provenance(path: Path) -> dict[str, object] | None:
    try:
        return imagemeta.extract(path.read_bytes())
    except (OSError, imagemeta.ImageFormatError):
        return None
