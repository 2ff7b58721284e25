"""Helpers shared by test modules (fixtures live in conftest.py): a file tree built from a
mapping, an event loop on virtual time, and the "rebuild" output root that the rebuild and
state-command tests drive through the CLI against the emulator, with the exact text its
commands print."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import selectors
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import pytest

from fluxbatch.emulator import Emulator
from fluxbatch.front import load_plan
from fluxbatch.main import main

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_SCHEMA = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
IMAGE_SUFFIXES = (".png", ".jpg", ".webp")
T = TypeVar("T")

# True when pytest runs with --slow (conftest.py sets it before any test module is imported)
SLOW = False


def examples(full: int) -> int:
    """A property test's max_examples: `full` with --slow, a fifth of it (10 at least) in the
    default run, which must stay fast; CI runs both."""
    return full if SLOW else max(10, full // 5)


def build_file_tree(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """Write `files` (relative path → text, dedented, or bytes) under `root`."""
    for relative, content in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(textwrap.dedent(content).lstrip("\n"), encoding="utf-8")
    return root


# -- virtual time -----------------------------------------------------------------------------


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual: when nothing is ready to run, it jumps to its
    next timer instead of waiting for it. `asyncio.sleep(30)` takes no real time, concurrent
    sleepers wake in the order of their deadlines, and `loop.time()` says how long a run
    took in simulated seconds, the same on any machine."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout is None:
            # Nothing scheduled at all: only another thread can wake the loop.
            return ready or super().select(timeout)
        self._loop.now += timeout
        return []


def run_in_virtual_time(main: Coroutine[object, object, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)


# -- the rebuild root -------------------------------------------------------------------------


def sigkill_when(process: subprocess.Popen[bytes], ready: Callable[[], bool], *,
                 patience: float = 120.0) -> None:
    """SIGKILL a render process (the render alone: its outbox finishes what it holds) once
    `ready()` says it is where the test wants it; it must still be running then. `patience`
    only turns a render that stopped making progress into a failure, not a hang."""
    deadline = time.monotonic() + patience
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the render stopped submitting"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def recipe_text(*, shapes: tuple[str, ...] = ("circle", "square", "star"),
                colours: tuple[str, ...] = ("red", "green", "blue"),
                prompt: str = "a {{ colour }} {{ shape }}", tolerance: int = 2,
                secret: str | None = None) -> str:
    """The rebuild recipe: three shapes in a grid and a lone tree; `secret` is every job's
    webhook_secret."""
    webhook = "" if secret is None else f"\n          webhook_secret: {json.dumps(secret)}"
    return f"""
        version: 1
        name: rebuild
        provider: emulator
        output: "{{{{ job }}}}/{{{{ shape }}}}.{{{{ ext }}}}"
        defaults:
          model: flux-pro-1.1
          width: 256
          height: 256
          output_format: png{webhook}
        jobs:
          - name: grid
            prompt: "{prompt}"
            matrix:
              zip:
                shape: {json.dumps(list(shapes))}
                colour: {json.dumps(list(colours))}
          - name: solo
            prompt: "a lone tree"
            output: "{{{{ job }}}}/tree.{{{{ ext }}}}"
            params: {{safety_tolerance: {tolerance}}}
        """


@dataclass(frozen=True, slots=True)
class Run:
    code: int
    out: str
    err: str


class Cli:
    """`fluxbatch ...` in-process, its output captured; `render` talks to the emulator."""

    def __init__(self, emulator: Emulator, capsys: pytest.CaptureFixture[str],
                 root: Path) -> None:
        self.emulator = emulator
        self.capsys = capsys
        self.root = root
        self.recipe = root / "recipe.yaml"
        self.name = "rebuild"

    def write(self, **edits: Any) -> None:
        build_file_tree(self.root, {"recipe.yaml": recipe_text(**edits)})

    def __call__(self, *argv: str) -> Run:
        self.capsys.readouterr()
        code = main(list(argv))
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)

    def render(self, *options: str) -> Run:
        return self("render", str(self.recipe), "--base-url", self.emulator.base_url, "-q",
                    *options)

    def status(self, *options: str) -> Run:
        return self("status", str(self.recipe), *options)

    def clean(self, *options: str) -> Run:
        return self("clean", str(self.recipe), *options)

    def prompts_sent(self, since: int) -> list[str]:
        return sorted(str(s["request"]["prompt"]) for s in self.emulator.submissions[since:])

    def written(self, count: int, up_to_date: int = 0) -> str:
        """The report of a render that wrote `count` images at $0.04 each."""
        rest = f", {up_to_date} up to date" if up_to_date else ""
        return (f"{count} written{rest}; cost {money(count * 0.04)} (reported by the "
                f"provider); manifest {self.root / (self.name + '.manifest.json')}\n")

    def placed(self, count: int, up_to_date: int = 0) -> str:
        """The report of a render that placed `count` images the root already held."""
        rest = f", {up_to_date} up to date" if up_to_date else ""
        return (f"{count} written ({count} from images already paid for){rest}; nothing paid; "
                f"manifest {self.root / (self.name + '.manifest.json')}\n")


def money(usd: float) -> str:
    return f"${usd:.3f}" if 0 < usd < 0.1 else f"${usd:.2f}"


def images(root: Path) -> dict[str, tuple[int, str]]:
    """Every image under the root: its mtime and sha256."""
    return {path.relative_to(root).as_posix(): (path.stat().st_mtime_ns,
                                                hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(root.rglob("*")) if path.suffix in IMAGE_SUFFIXES}


def check_manifest(cli: Cli) -> dict[str, dict[str, Any]]:
    """The manifest validates, names only existing files with their sha256, and its keys are
    the plan's keys; returns its entries by path."""
    document = json.loads((cli.root / "rebuild.manifest.json").read_text())
    jsonschema.Draft202012Validator(MANIFEST_SCHEMA).validate(document)
    entries = {entry["path"]: entry for entry in document["images"]}
    on_disk = images(cli.root)
    for path, entry in entries.items():
        assert on_disk[path][1] == entry["sha256"]
    keys = {job.output: job.key for job in load_plan(str(cli.recipe)).jobs}
    assert {path: entry["key"] for path, entry in entries.items()} == keys
    return entries


def aligned(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]],
            right: frozenset[int] = frozenset()) -> str:
    """A table as the commands print it, columns in `right` right-aligned (empty when there
    are no rows)."""
    if not rows:
        return ""
    widths = [max(len(header), *(len(row[i]) for row in rows))
              for i, header in enumerate(headers)]
    return "".join("  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                             for i, cell in enumerate(cells)).rstrip()
                   + "\n" for cells in (headers, *rows))


def status_table(root: Path, counts: Sequence[tuple[str, int]]) -> str:
    """The first lines of `status`: the root, then the counts by state."""
    number = max(len("IMAGES"), *(len(str(n)) for _, n in counts))
    state = max(len("STATE"), *(len(s) for s, _ in counts))
    return "\n".join([f"recipe rebuild, output root {root}",
                      f"{'STATE'.ljust(state)}  {'IMAGES'.rjust(number)}",
                      *(f"{s.ljust(state)}  {str(n).rjust(number)}" for s, n in counts), ""])


# what `status` says of an image the content store holds
STORED = "its image is in the content store (paid earlier): placed at no cost"


# -- git repositories -----------------------------------------------------------------------

# A recipe of two jobs whose values come from a file: what the tests of `plan --diff` and of
# the CI example change (a value added, one removed, a parameter).
SHOP_RECIPE = """\
version: 1
name: shop
provider: emulator
output: "{{ job }}/{{ subject | slug }}-{{ replicate }}.{{ ext }}"
defaults: {model: flux-pro-1.1, width: 768, height: 512, output_format: png}
jobs:
  - name: mugs
    prompt: "a {{ subject }} on a wooden table"
    matrix:
      subject: {from: subjects.txt}
    replicates: 2
  - name: hero
    prompt: "a lighthouse at dusk"
    output: "{{ job }}/lighthouse.{{ ext }}"
"""

# Commits made with a fixed identity and dates (never the user's git config: HOME is a temp
# folder, and the system's config is not read), so the same files make the same commits.
GIT_CONFIG = ("-c", "user.name=fluxbatch tests", "-c", "user.email=tests@example.com",
              "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main")
GIT_ENVIRONMENT = {"GIT_AUTHOR_DATE": "2026-01-02T03:04:05+00:00",
                   "GIT_COMMITTER_DATE": "2026-01-02T03:04:05+00:00",
                   "GIT_CONFIG_NOSYSTEM": "1"}


def git(repo: Path, *arguments: str) -> str:
    """Run git in `repo`; its output (a failure fails the test, with git's message)."""
    done = subprocess.run(["git", *GIT_CONFIG, *arguments], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, **GIT_ENVIRONMENT}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def git_repository(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """A git repository at `root` holding `files`, committed on `main`."""
    build_file_tree(root, files)
    git(root, "init", "-q")
    commit(root, "the recipe as merged")
    return root


def commit(repo: Path, message: str) -> str:
    """Commit everything in the work tree; the commit's short hash."""
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "--short=7", "HEAD").strip()
