"""The layout of an output root: where fluxbatch keeps its state in it, what the files there
are called, and which paths an image may take. Every stage may import this module: it
imports nothing of fluxbatch, and nothing heavy.

    <root>/<output paths>               the images (see `output_path_problem`)
    <root>/<recipe>.manifest.json       one per recipe (`manifest.json`: the first release's)
    <root>/.fluxbatch/                  the state (see `fluxbatch.state`):
        state.sqlite, blobs/ab/abcd…, tmp/, lock, outbox.log, inputs.json, .gitignore,
        plan.<recipe>.json (the plan cache, `fluxbatch.plan_cache`)

An output path is checked twice: lexically (`output_path_problem`), and against the links on
the disk (`link_problem`, `stored_path_problem`): a symbolic link on the way may not lead out
of the root or into its state directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

STATE_DIR = ".fluxbatch"
DATABASE = "state.sqlite"
LOCK = "lock"
BLOBS = "blobs"
TMP = "tmp"  # files being written (`write.temp_dir`), cleared at the start of each render
OUTBOX_LOG = "outbox.log"  # what a dying outbox said
INPUT_FACTS = "inputs.json"  # the facts of image inputs (hash, format, size) by path
GITIGNORE = ".gitignore"
LEGACY_MANIFEST = "manifest.json"  # the first release's name, for a root of one recipe


def manifest_name(recipe: str) -> str:
    return f"{recipe}.manifest.json"


def plan_cache_name(recipe: str) -> str:
    """The plan cache's file of a recipe, in the state directory."""
    return f"plan.{recipe}.json"


def state_path(root: Path, name: str) -> Path:
    """The file (or folder) `name` in the root's state directory."""
    return root / STATE_DIR / name


# -- output paths ---------------------------------------------------------------------------

# Most file systems refuse a file or folder name over 255 bytes, and Linux a path over 4096.
NAME_MAX = 255
PATH_MAX = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")


def plainly_safe(path: str) -> bool:
    """A quick yes for the usual output path; anything unusual (a leading dot, which may be
    the state directory; a long or non-ASCII name, which may be over the file system's
    limit) gets the full check."""
    return bool(path) and len(path) <= NAME_MAX and path.isascii() and path[0] not in "/ ." \
        and ".." not in path and "\\" not in path and "//" not in path and "./" not in path \
        and ":" not in path and "\x00" not in path and path[-1] not in "/."


def output_path_problem(path: str) -> str | None:
    """Why `path` may not be used as an output path (lexically), or None. The same rules
    hold for every path read back from a manifest, the ledger or an image."""
    if plainly_safe(path):  # (the usual path, checked in a fifth of the time)
        return None
    text = path.replace("\\", "/")
    if not text.strip():
        return "the output path is empty"
    if "\x00" in text:
        return "the output path contains a NUL character"
    if text.startswith("/") or _DRIVE.match(text):
        return f"output path {path!r} is absolute; it must be relative to the output root"
    parts = text.split("/")
    if ".." in parts:
        return f"output path {path!r} leaves the output root ('..')"
    first = next((part for part in parts if part not in ("", ".")), "")
    if first.casefold() == STATE_DIR:
        return (f"output path {path!r} is inside {STATE_DIR}/, where fluxbatch keeps the "
                "output root's state; images may not be written there")
    if text.endswith("/") or parts[-1] in ("", "."):
        return f"output path {path!r} names a directory, not a file"
    for part in parts:
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > NAME_MAX:
            shown = path if len(path) <= 60 else path[:59] + "…"
            return (f"output path {shown!r} has a name of {size} bytes, over the file "
                    f"system's limit of {NAME_MAX} for one file or folder name; shorten what "
                    "the output template puts in it (`{{ value | hash }}` is 8 characters)")
    return None


# -- symbolic links on the way ----------------------------------------------------------------


def stored_path_problem(root: str | os.PathLike[str], path: str) -> str | None:
    """Why a file path read back from a manifest, the state store or an image's provenance
    may not be read, written or deleted in the output root `root`, or None. It is held to the
    rules of a recipe's output path: relative, no `..`, not into `.fluxbatch/`, and no
    symbolic link on the way that leads out of the root or into its state directory."""
    problem = output_path_problem(path)
    if problem is None:
        linked = link_problem(os.path.realpath(root), os.path.join(root, path))
        problem = None if linked is None else f"path {path!r} {linked}"
    return problem


def link_problem(real_root: str, path: str) -> str | None:
    """Why `path`, resolved through its links, is not a place for an image of the root whose
    resolved path is `real_root` (outside it, or in its state directory), or None."""
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        return "leaves the output root through a symbolic link"
    if os.path.relpath(real, real_root).split(os.sep)[0].casefold() == STATE_DIR:
        return f"leads into {STATE_DIR}/, the output root's state directory, through a " \
            "symbolic link"
    return None


def links_in(folder: str) -> frozenset[str]:
    """The names of the symbolic links in `folder` (none when it does not exist)."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(entry.name for entry in entries if entry.is_symlink())
    except OSError:
        return frozenset()
