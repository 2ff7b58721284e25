"""What a recipe may read: the files of its project.

A recipe is untrusted data: it may arrive in a pull request that CI renders with an API key
in its environment. So every file it names must resolve, after symbolic links, to a regular
file inside its project: the recipe's folder, or the top of the enclosing git work tree.
Anything else (an absolute path, a `..` or a link that leads out, /proc, a FIFO, a device,
a huge file) is refused with a one-line message that never quotes the file's contents; the
recipe stage turns it into a located problem. Inside the project, version control's folders
(`.git`, `.hg`, `.svn`: CI keeps its token in `.git/config`), any folder git keeps a
repository in (the target of a `.git` file), and fluxbatch's state are refused too. The
same rule confines an `output_root:` written in a recipe (`--out` on the command line is
the operator's choice, and is not).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fluxbatch.layout import STATE_DIR

_MIB = 1024 * 1024
# Value and row files are lists a person edits; 16 MiB is far beyond any real one, and
# still small enough to hold in memory while it is parsed.
MAX_FILE_BYTES = 16 * _MIB
# ...and all the value and row files one recipe names, together, each counted every time it is
# named: their values are held once per naming, at up to ~40 times their size on disk.
MAX_RECIPE_DATA = 32 * _MIB
# Validation time grows with the recipe (a 30 MB recipe took over a minute), and a
# hand-written recipe is a few kilobytes.
MAX_RECIPE_BYTES = 2 * _MIB

# Refused even if a project were there: reading these has effects or no end, or leaks
# the process's secrets (/proc/self/environ).
_SYSTEM = ("/proc", "/sys", "/dev")

# Never read, wherever they are in the project, in any case (a file system that ignores case
# opens `.GIT/config` as `.git/config`): version control keeps its settings there, and
# `actions/checkout` the CI token (in `.git/config`); fluxbatch keeps its state in `.fluxbatch`.
VCS_DIRS = (".git", ".hg", ".svn")
_WHY = {**dict.fromkeys(VCS_DIRS, "version control keeps its settings and credentials there"),
        STATE_DIR: "fluxbatch keeps its state there"}

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class ProjectFileError(Exception):
    """A file a recipe names cannot be used; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Project:
    """The recipe's project. `folder` is the recipe's folder as given, the base of relative
    names (and of messages); `root` is the real path of the top of the project."""

    folder: Path
    root: str
    # folder (real path) → whether git keeps a repository in it: each looked at once
    _git_dirs: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)
    # every file read (or image input looked at) for the recipe, as named → the sha256 of
    # its bytes, in the order first read: what a plan is made of (see `plan_cache`)
    consulted: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of_recipe(cls, recipe: str | os.PathLike[str]) -> Project:
        folder = Path(recipe).parent
        return cls(folder, find_root(os.path.realpath(folder)))

    def resolve(self, name: str) -> str:
        """The real path of the file `name` (relative to the recipe) if a recipe may read it."""
        return self._confined(name, "a recipe may read only files", "")

    def read_bytes(self, name: str, *, limit: int = MAX_FILE_BYTES) -> bytes:
        real = self.resolve(name)
        try:  # (no link is left in `real`; one that appears now is a race, and refused)
            data = read_regular(real, limit=limit, name=name, follow=False)
        except FileNotFoundError:
            raise ProjectFileError(f"file not found: {name} (relative to "
                                   f"{self.folder})") from None
        except OSError as error:
            raise ProjectFileError(f"cannot read {name}: {error.strerror or error}") from None
        self.consulted.setdefault(name, hashlib.sha256(data).hexdigest())
        return data

    def read_text(self, name: str) -> str:
        try:
            return self.read_bytes(name).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ProjectFileError(f"cannot read {name}: not UTF-8 text "
                                   f"(byte {error.start})") from None

    def output_root(self, name: str) -> Path:
        """`output_root:` as written in the recipe, if it stays inside the project."""
        self._confined(name, "a recipe's output_root must be a folder",
                       "; to write elsewhere, pass --out DIR on the command line",
                       verb="write into", private=VCS_DIRS,  # (.fluxbatch: state_dir_problem)
                       folder=True)
        return self.folder / name

    def listing_refusal(self, name: str) -> str | None:
        """Why a `files:` pattern may not list the folder `name` (relative to the recipe),
        in words that name nothing outside the project, or None."""
        real = os.path.realpath(self.folder / name)
        if not _within(real, self.root):
            return f"would list {name}/, outside the recipe's project ({self.root})"
        found = self.private_place(name, real, folder=True)
        if found is not None:
            return f"would list {name}/, inside {found[0]}, which a recipe may never read"
        return None

    def _confined(self, name: str, rule: str, after: str, *, verb: str = "read",
                  private: tuple[str, ...] = (*VCS_DIRS, STATE_DIR), folder: bool = False) -> str:
        if "\x00" in name:
            raise ProjectFileError(f"{name!r} contains a NUL character")
        if os.path.isabs(name):
            raise ProjectFileError(f"{name} is an absolute path; {rule} inside its project "
                                   f"({self.root}), named relative to the recipe{after}")
        real = os.path.realpath(self.folder / name)
        if not _within(real, self.root):
            raise ProjectFileError(f"{name} resolves to {real}, outside the recipe's project "
                                   f"({self.root}); {rule} inside its project{after}")
        system = next((top for top in _SYSTEM if _within(real, top)), None)
        if system is not None:
            raise ProjectFileError(f"{name} resolves to {real}, under {system}, which a "
                                   f"recipe may never name; {rule} inside its project{after}")
        found = self.private_place(name, real, private, folder=folder)
        if found is not None:
            place, why = found
            raise ProjectFileError(f"{name} resolves to {real}, inside {place}, which a recipe "
                                   f"may never {verb}: {why}")
        return real

    def private_place(self, name: str, real: str, private: tuple[str, ...] = (
            *VCS_DIRS, STATE_DIR), *, folder: bool = False) -> tuple[str, str] | None:
        """Where the file (or `folder`) `name`, real path `real`, inside the project, lies
        in a folder a recipe may never read or write, and why: `.git/` (named, or reached
        through a link, in any case), or a folder git keeps a repository in; else None."""
        below = real[len(self.root.rstrip(os.sep)) + 1:].split(os.sep) if real != self.root \
            else []
        for part in (*name.replace(os.sep, "/").split("/"), *below):
            if part[:1] == "." and _folded(part) in private:  # (each of them starts with a dot)
                return f"{_folded(part)}/", _WHY[_folded(part)]
        folders = [self.root]
        for part in below if folder else below[:-1]:
            folders.append(os.path.join(folders[-1], part))
        git_dir = next((folder for folder in folders if self._is_git_dir(folder)), None)
        if git_dir is None:
            return None
        return f"{git_dir}, a folder where git keeps a repository", _WHY[".git"]

    def _is_git_dir(self, folder: str) -> bool:
        """Whether git keeps a repository in `folder` (as git itself tells: a HEAD naming a
        ref or a commit, beside objects/ and refs/, or a worktree's HEAD beside commondir).
        That is where a `.git` file (a worktree, a submodule, `--separate-git-dir`) points."""
        known = self._git_dirs.get(folder)
        if known is None:
            known = self._git_dirs[folder] = _looks_like_git_dir(folder)
        return known


def find_root(folder: str) -> str:
    """The top of the git work tree around `folder` (a `.git` directory, or the `.git` file
    of a worktree or submodule), else `folder` itself. Git is not run: a recipe's project
    must not depend on which git, or whether one, is installed. A work tree at `/` or at the
    home directory (a "dotfiles" repository) is no project: it would open `~/.ssh` to every
    recipe, so the recipe's folder is the project then."""
    too_wide = {os.sep, os.path.realpath(os.path.expanduser("~"))}
    probe = folder
    while True:
        marker = os.path.join(probe, ".git")
        if os.path.isdir(marker) or os.path.isfile(marker):
            return folder if probe in too_wide else probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return folder
        probe = parent


def state_dir_problem(root: str | os.PathLike[str], shown: str) -> str | None:
    """Why `root` cannot be an output root, being in a state directory (whose files
    fluxbatch owns and clears), or None. `shown` is how the message names `root`."""
    lexical = os.path.abspath(root)
    for path in (lexical, os.path.realpath(root)):
        if STATE_DIR.casefold() in (part.casefold() for part in Path(path).parts):
            via = "" if path == lexical else f" resolves to {path}, which"
            return (f"{shown}{via} is inside a {STATE_DIR} directory, where fluxbatch keeps "
                    "its state; choose another output root")
    return None


def read_regular(path: str | os.PathLike[str], *, limit: int, name: str,
                 follow: bool = True) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them.

    The file is opened without blocking (a FIFO with no writer would wait forever) and its
    type is checked on the open descriptor, not the path, so nothing can be swapped in
    between. At most `limit + 1` bytes are read, so a file that grows cannot get past the
    limit. OSError from opening is left to the caller, who knows how to word it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            kind = next((f"{kind}, not" for test, kind in _KINDS if test(status.st_mode)), "not")
            raise ProjectFileError(f"{name} is {kind} a regular file")
        too_large = ProjectFileError(f"{name} is larger than the limit of {limit / _MIB:g} MiB")
        if status.st_size > limit:
            raise too_large
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, _MIB))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise too_large
        return b"".join(chunks)
    finally:
        os.close(fd)


def _looks_like_git_dir(folder: str) -> bool:
    has = os.path.exists
    if not (has(os.path.join(folder, "commondir")) or
            (os.path.isdir(os.path.join(folder, "objects")) and
             os.path.isdir(os.path.join(folder, "refs")))):
        return False
    try:
        head = read_regular(os.path.join(folder, "HEAD"), limit=256, name="HEAD")
    except (OSError, ProjectFileError):
        return False
    return head.startswith(b"ref: ") or re.fullmatch(rb"[0-9a-f]{40}([0-9a-f]{24})?\s*",
                                                      head) is not None


def _folded(part: str) -> str:
    """A file or folder name as a file system that ignores case (and, as Windows does,
    trailing dots and spaces) compares it."""
    return part.casefold().rstrip(". ") or part


def _within(real: str, top: str) -> bool:
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)
