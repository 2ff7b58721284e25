"""A recipe's project as it was at a git ref, exported to a temporary folder, so that the one
recipe loader reads it as it reads the working tree (for `plan --diff` and `gallery --diff`).

The tree at the ref is listed (`git ls-tree`) and its blobs written out (`git cat-file
--batch`), as git stores them: no checkout, so no hook, no filter, no `export-ignore` or
`export-subst` of the ref's own `.gitattributes` (a Git LFS pointer is read as the content the
local LFS store holds for it, as the working tree has it). Only the recipe's project is written (the
top of the work tree, or the recipe's folder when the work tree is no project, as
`project.find_root` decides), with an empty `.git/` at its top, so that the loader draws the
project's bounds where it draws them in the working tree, and refuses what it refuses there:
a link in the old tree that leads out of the project, or into `.git/`, is refused the same
way. Version control's folders and fluxbatch's state (which no recipe may read) are left
out; a file larger than any file a recipe may read is written as a sparse file of its size,
which the loader refuses by its size, as it would the real one. A file whose content a
partial clone lacks is left out (and said to be, if the recipe at the ref fails to load).

Git is only ever asked about the local repository: `protocol.allow=never` (and
`GIT_NO_LAZY_FETCH`) stop it from fetching anything, even the missing blobs of a partial
clone. A ref that is unknown, or missing from a shallow clone, is one clear line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fluxbatch.errors import FluxbatchError
from fluxbatch.inputs import MAX_INPUT_BYTES
from fluxbatch.layout import STATE_DIR
from fluxbatch.project import (
    MAX_FILE_BYTES,
    VCS_DIRS,
    ProjectFileError,
    find_root,
    read_regular,
)

# A blob larger than this is no file a recipe may read: it is written as a sparse file of
# its size, which the loader refuses by its size, without its bytes being kept.
LARGEST_READ = max(MAX_FILE_BYTES, MAX_INPUT_BYTES)
_PRIVATE = frozenset((*VCS_DIRS, STATE_DIR))
_SUBMODULE, _LINK = "160000", "120000"

# Never a remote: no protocol may be used (a partial clone's missing blob is not fetched),
# and nothing waits for a password or touches the index.
_GIT = ("git", "-c", "protocol.allow=never", "-c", "core.fsmonitor=false")
_ENVIRONMENT = {"GIT_NO_LAZY_FETCH": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}


class GitRefError(FluxbatchError):
    """The ref cannot be read: unknown, missing from a shallow clone, no git, no work tree."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The recipe's project at `ref`, written under `folder` (deleted when the `at_ref`
    block ends)."""

    ref: str  # as given
    commit: str  # what it names
    path: str  # the recipe's path at the ref, from the top of the work tree (posix)
    recipe: Path | None  # the recipe in `folder`; None when it did not exist at the ref
    folder: Path  # the top of the work tree, as exported
    renamed_from: str | None = None  # the recipe's path at the ref, when git saw it move
    missing: tuple[str, ...] = ()  # files at the ref whose content this (partial) clone lacks

    @property
    def short(self) -> str:
        return self.commit[:7]

    def relabel(self, text: str) -> str:
        """`text` (a message of the loader) with the temporary folder's paths written as
        `REF:path`, as a person names a file at a ref."""
        top = os.fspath(self.folder)
        above = os.path.dirname(top)  # (the temporary folder itself, where `../` leads)
        return text.replace(top + os.sep, f"{self.ref}:").replace(top, f"{self.ref}:.") \
            .replace(above + os.sep, f"{self.ref}:../")


@contextlib.contextmanager
def at_ref(recipe: str | os.PathLike[str], ref: str) -> Iterator[Snapshot]:
    """The project of the recipe at `recipe` (a path in a git work tree) as it was at `ref`,
    exported to a temporary folder for the duration of the block."""
    if not ref or ref.startswith("-") or "\x00" in ref:
        raise GitRefError(f"--diff {ref!r}: not a git ref (a branch, a tag or a commit)")
    folder = os.path.realpath(os.path.dirname(os.fspath(recipe)) or ".")
    top = _top(folder, ref)
    commit = _commit(top, ref)
    path = Path(os.path.relpath(os.path.join(folder, os.path.basename(recipe)), top)).as_posix()
    project = os.path.relpath(find_root(folder), top)
    scope = "" if project == "." else Path(project).as_posix()
    entries = _tree(top, commit, scope)
    renamed_from = None
    if path not in entries:
        renamed_from = _renamed_from(top, commit, path)
        if renamed_from not in entries:
            renamed_from = None
    temporary = tempfile.mkdtemp(prefix="fluxbatch-diff-")
    try:
        exported = Path(temporary) / "tree"
        exported.mkdir()
        (exported / (scope or ".") / ".git").mkdir(parents=True)
        missing = _export(top, exported, entries)
        found = renamed_from or (path if path in entries else None)
        if found in missing:
            raise GitRefError(f"--diff {ref}: this clone does not have the content of {found} "
                              f"at {ref} (a partial clone), and fluxbatch fetches nothing; "
                              f"have git fetch it first (`git show {commit[:12]}:{found} "
                              ">/dev/null`), or clone without --filter")
        if found is not None:
            _check_recipe(exported, found, ref)
        yield Snapshot(ref, commit, renamed_from or path,
                       None if found is None else exported / found, exported, renamed_from,
                       tuple(missing))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _check_recipe(exported: Path, name: str, ref: str) -> None:
    """The recipe at the ref is read as a file of its project: a link there is followed only
    inside it (the operator named the working tree's recipe, not where a link at the ref
    leads)."""
    real = os.path.realpath(exported / name)
    top = os.path.realpath(exported)
    if not real.startswith(top + os.sep) or not os.path.isfile(real):
        raise GitRefError(f"--diff {ref}: {name} is a symbolic link at {ref} that does not lead "
                          "to a file of the recipe's project; nothing is read through it")


def _git(top: str, *arguments: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run([*_GIT, *arguments], cwd=top, capture_output=True,
                              env={**os.environ, **_ENVIRONMENT}, check=False)
    except FileNotFoundError:
        raise GitRefError("--diff reads the recipe at a git ref, and git is not installed "
                          "(or not on PATH)") from None


def _first_line(stderr: bytes) -> str:
    """What git said went wrong: its first error, else its first line."""
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    errors = [line for line in lines if line.startswith(("fatal: ", "error: "))]
    found = (errors or lines or ["git failed"])[0]
    return found.removeprefix("fatal: ").removeprefix("error: ")


def _top(folder: str, ref: str) -> str:
    found = _git(folder, "rev-parse", "--show-toplevel")
    if found.returncode != 0:
        raise GitRefError(f"--diff {ref}: the recipe is not in a git work tree ({folder}: "
                          f"{_first_line(found.stderr)})")
    return os.path.realpath(found.stdout.decode("utf-8", "surrogateescape").strip())


def _commit(top: str, ref: str) -> str:
    found = _git(top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    if found.returncode == 0:
        return found.stdout.decode().strip()
    shallow = _git(top, "rev-parse", "--is-shallow-repository").stdout.strip() == b"true"
    if shallow:
        branch = ref.removeprefix("origin/") if ref.startswith("origin/") else "BRANCH"
        raise GitRefError(
            f"--diff {ref}: this clone is shallow (only the last commits were fetched) and "
            f"does not have {ref}; fetch it first: `git fetch --depth=1 origin {branch}`, or "
            "actions/checkout with fetch-depth: 0")
    if not _git(top, "rev-list", "-n", "1", "--all").stdout.strip():
        raise GitRefError(f"--diff {ref}: this repository has no commit yet: there is nothing "
                          "to compare with")
    remote = _git(top, "for-each-ref", "--format=%(refname:short)", f"refs/remotes/*/{ref}")
    close = remote.stdout.decode("utf-8", "replace").split()
    hint = f"did you mean {close[0]}?" if close else \
        "`git branch -a` lists the branches, a remote's once fetched"
    raise GitRefError(f"--diff {ref}: this repository has no commit, branch or tag of that "
                      f"name ({hint})")


@dataclass(frozen=True, slots=True)
class _Entry:
    mode: str
    kind: str
    oid: str


def _tree(top: str, commit: str, scope: str) -> dict[str, _Entry]:
    """Every file of the tree at `commit` under `scope` (all with ""), by path from the top.
    (Without sizes: a partial clone would try to fetch every blob it lacks to tell them.)"""
    arguments = ["ls-tree", "-r", "-z", "--full-tree", commit]
    if scope:
        arguments += ["--", scope]
    listed = _git(top, *arguments)
    if listed.returncode != 0:
        raise GitRefError(f"--diff: cannot list the tree of {commit[:7]}: "
                          f"{_first_line(listed.stderr)}")
    entries = {}
    for record in listed.stdout.split(b"\x00"):
        if not record:
            continue
        header, _, name = record.partition(b"\t")
        mode, kind, oid = header.decode().split()
        entries[os.fsdecode(name)] = _Entry(mode, kind, oid)
    return entries


def _renamed_from(top: str, commit: str, path: str) -> str | None:
    """The path at `commit` of the file that git sees moved to `path` by HEAD (tree to tree:
    nothing of the working tree is hashed, so no filter runs)."""
    found = _git(top, "diff", "--no-ext-diff", "--no-textconv", "-M", "--name-status", "-z",
                 "--diff-filter=R", commit, "HEAD")
    if found.returncode != 0:
        return None  # (no HEAD yet, say: then nothing moved)
    fields = found.stdout.split(b"\x00")
    for status, old, new in zip(fields[::3], fields[1::3], fields[2::3], strict=False):
        if status.startswith(b"R") and os.fsdecode(new) == path:
            return os.fsdecode(old)
    return None


def _export(top: str, exported: Path, entries: dict[str, _Entry]) -> list[str]:
    """Write the files and links of `entries` under `exported`, their bytes as git has them;
    return the paths whose content this clone does not have (a partial clone's)."""
    wanted: list[tuple[str, Path, _Entry]] = []
    for name, entry in entries.items():
        parts = name.split("/")
        if entry.mode == _SUBMODULE or entry.kind != "blob" or \
                any(part in ("", ".", "..") for part in parts) or \
                any(part.casefold().rstrip(". ") in _PRIVATE for part in parts):
            continue  # (no recipe reads there; a crafted tree's `..` is never followed)
        target = exported.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        wanted.append((name, target, entry))
    lfs = _lfs_objects(top)
    missing = []
    for (name, target, entry), blob in zip(wanted, _blobs(top, [e.oid for _, _, e in wanted]),
                                           strict=True):
        if blob is None:
            missing.append(name)
        elif isinstance(blob, int):  # larger than any file a recipe may read
            with open(target, "wb") as handle:
                handle.truncate(blob)
        elif entry.mode == _LINK:
            os.symlink(blob, os.fsencode(target))
        else:
            target.write_bytes(_lfs_content(lfs, blob) or blob)
    return missing


def _lfs_objects(top: str) -> Path:
    found = _git(top, "rev-parse", "--git-common-dir")
    common = os.path.join(top, found.stdout.decode("utf-8", "surrogateescape").strip())
    return Path(common) / "lfs" / "objects"


_LFS_POINTER = re.compile(rb"version https://git-lfs\.github\.com/spec/v1\n"
                          rb"oid sha256:(?P<oid>[0-9a-f]{64})\nsize (?P<size>[0-9]+)\n")


def _lfs_content(objects: Path, data: bytes) -> bytes | None:
    """The content a Git LFS pointer stands for, if the local LFS store holds it (as it does
    for every file that was checked out): a photo kept in LFS is read as the photo, as in
    the working tree. Nothing is fetched; the content must have the pointer's sha256."""
    pointer = _LFS_POINTER.match(data) if len(data) < 1024 else None
    if pointer is None:
        return None
    oid = pointer["oid"].decode()
    if int(pointer["size"]) > LARGEST_READ:
        return None
    try:
        content = read_regular(objects / oid[:2] / oid[2:4] / oid, limit=LARGEST_READ,
                               name=oid)
    except (OSError, ProjectFileError):
        return None
    return content if hashlib.sha256(content).hexdigest() == oid else None


def _blobs(top: str, oids: Sequence[str]) -> Iterator[bytes | int | None]:
    """The bytes of each object, in order, from one `git cat-file --batch`: None for one
    this clone lacks, and only the size of one larger than `LARGEST_READ`."""
    if not oids:
        return
    process = subprocess.Popen([*_GIT, "cat-file", "--batch"], cwd=top, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env={**os.environ, **_ENVIRONMENT})
    assert process.stdin is not None and process.stdout is not None

    def feed() -> None:  # (on a thread: git answers while it reads, and a pipe is bounded)
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError), process.stdin:
            for oid in oids:
                process.stdin.write(f"{oid}\n".encode())

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        for _ in oids:
            header = process.stdout.readline().split()
            if len(header) != 3:  # `OID missing`
                yield None
                continue
            size = int(header[2])
            if size > LARGEST_READ:
                _skip(process.stdout, size)
                yield size
            else:
                yield process.stdout.read(size)
            process.stdout.read(1)  # (the newline after each object)
    finally:
        process.stdout.close()
        process.kill()
        process.wait()
        feeder.join()


def _skip(stream: IO[bytes], count: int) -> None:
    while count > 0:
        read = len(stream.read(min(count, 1 << 20)))
        if not read:
            return
        count -= read
