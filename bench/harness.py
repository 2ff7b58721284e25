"""Shared by the render benchmarks: the emulator in a process of its own, a recipe of N
emulator jobs, and fluxbatch run the way a user runs it (`fluxbatch render RECIPE`), timed.

The emulator runs in a child process so that the client's CPU (`time.process_time()` of this
process) is fluxbatch's alone; its request counters come back through a pipe.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import io
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

CAP = 24
MODEL = "flux-dev"
SIDE = 256  # what each job asks for (and the emulator renders): small, so the emulator is cheap
FORMAT = "jpeg"


def _serve(options: dict[str, Any], conn: Connection) -> None:
    """The child process: an EmulatorThread, answering 'stats', ('reconfigure', changes) and
    'stop' on the pipe."""
    from fluxbatch.emulator import EmulatorConfig, EmulatorThread

    with EmulatorThread(EmulatorConfig(**options)) as emulator:
        conn.send(emulator.base_url)
        while True:
            command = conn.recv()
            if command == "stop":
                return
            if isinstance(command, tuple) and command[0] == "reconfigure":
                emulator.reconfigure(**command[1])
                conn.send(True)
            if command == "stats":
                tasks = [emulator.task(s["task_id"]) for s in list(emulator.submissions)]
                usage = resource.getrusage(resource.RUSAGE_SELF)
                conn.send({**emulator.stats.as_dict(),
                           # (id, submit time (epoch), duration) of each task, in submit order
                           "tasks": [(t.id, t.start_time, t.duration) for t in tasks if t],
                           "durations": [t.duration for t in tasks if t],
                           "cpu": usage.ru_utime + usage.ru_stime})


class EmulatorProcess:
    """`with EmulatorProcess(latency=2.0, cap=24) as emu:` → `emu.base_url`, `emu.stats()`."""

    def __init__(self, **options: Any) -> None:
        self.options = {"port": 0, **options}
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(self.options, child),
                                        name="fluxbatch-emulator", daemon=True)
        self.base_url = ""

    def __enter__(self) -> EmulatorProcess:
        self._process.start()
        try:
            if not self._conn.poll(60):
                raise TimeoutError("did not start within 60 s")
            self.base_url = self._conn.recv()
        except (EOFError, TimeoutError) as error:
            self._process.kill()
            raise RuntimeError(f"the emulator process failed ({error or 'it exited'}); "
                               "its traceback, if any, is above") from None
        return self

    def reconfigure(self, **changes: Any) -> None:
        """Change the running emulator's knobs (a cap that drops mid-run, say)."""
        self._conn.send(("reconfigure", changes))
        self._conn.recv()

    def stats(self) -> dict[str, Any]:
        self._conn.send("stats")
        result: dict[str, Any] = self._conn.recv()
        return result

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def render_parser(doc: str | None, jobs: int, jobs_help: str,
                  quick_help: str) -> argparse.ArgumentParser:
    """The options of every render benchmark: --jobs, --latency, --quick and --seed."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=jobs, help=f"{jobs_help} ({jobs})")
    parser.add_argument("--latency", type=float, default=2.0,
                        help="the emulator's mean task latency L in seconds (2.0)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seed", type=int, default=0, help="the emulator's seed")
    return parser


@contextlib.contextmanager
def work_dir(keep: str | None = None) -> Iterator[Path]:
    """A temporary directory, or `keep` (created, and left in place)."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="fluxbatch-bench-") as tmp:
        yield Path(tmp)


def write_recipe(directory: Path, jobs: int, name: str = "bench-render") -> Path:
    """A recipe of `jobs` distinct flux-dev images on the emulator provider."""
    values = ", ".join(f"p{i:05d}" for i in range(jobs))
    path = directory / "recipe.yaml"
    path.write_text(f"""\
version: 1
name: {name}
provider: emulator
max_jobs: {max(jobs, 1000)}
output: "renders/{{{{ item }}}}.{{{{ ext }}}}"
defaults:
  model: {MODEL}
  width: {SIDE}
  height: {SIDE}
  output_format: {FORMAT}
jobs:
  - name: batch
    prompt: "a studio photo of object {{{{ item }}}}"
    matrix:
      item: [{values}]
""", encoding="utf-8")
    return path


def planned_requests(recipe: Path) -> list[dict[str, Any]]:
    """The request bodies fluxbatch would send for the recipe (prompt, size, seed...)."""
    from fluxbatch.front import load_plan

    return [dict(job.request) for job in load_plan(str(recipe), out=None, yes=True).jobs]


@dataclass(frozen=True, slots=True)
class Run:
    exit_code: int
    wall: float  # seconds
    own_cpu: float  # seconds of this process's CPU (user + system, all threads)
    helper_cpu: float  # seconds of CPU of the processes fluxbatch started and waited for
    output: str  # what `fluxbatch render` printed

    @property
    def cpu(self) -> float:
        return self.own_cpu + self.helper_cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ensure_bytecode() -> None:
    """Compile fluxbatch's modules, as installing a package does. An editable install has no
    bytecode until it runs, and where PYTHONDONTWRITEBYTECODE is set (as on the machine these
    figures come from) every start would compile every module again: ~50 ms of CPU in the
    render process, billed to the run."""
    import fluxbatch

    compileall.compile_dir(Path(fluxbatch.__file__).parent, quiet=1)


def run_fluxbatch(recipe: Path, base_url: str, *options: str) -> Run:
    """`fluxbatch render RECIPE --base-url URL -q [OPTIONS]`, in this process: the whole
    pipeline (plan, state store, executor, image writer, manifest)."""
    ensure_bytecode()
    from fluxbatch.main import main

    printed = io.StringIO()
    # The emulator is a child too, but it is reaped only after this, so RUSAGE_CHILDREN
    # grows here by fluxbatch's own helpers alone (the outbox process).
    children_start = _children_cpu()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(["render", str(recipe), "--base-url", base_url, "-q", *options])
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    return Run(code, wall, cpu, _children_cpu() - children_start, printed.getvalue().strip())


def count_images(root: Path) -> int:
    return sum(1 for path in (root / "renders").glob(f"*.{'jpg' if FORMAT == 'jpeg' else FORMAT}"))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
