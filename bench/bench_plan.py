"""Planning speed and memory: fluxbatch planning 100,000 jobs versus dynamicprompts making the
same 100,000 prompt strings, measured in the same run; and `plan --jsonl` at 1,000,000 jobs.

1. Whole process (what a pull request's CI pays): `fluxbatch plan --json --yes` (also the
   table and `validate`) against a Python process in which dynamicprompts makes the prompts,
   run in turn (A B A B ...), each pair's CPU ratio taken, the median quoted. The output root
   already has a state store, as after a first render.
2. In-process: recipe load + expansion only, against dynamicprompts' generator alone, in this
   process (the figure earlier versions of this benchmark printed).
3. `plan --jsonl` on 100,000 and on 1,000,000 jobs: peak memory, and CPU per job (linear
   when the two agree).

Targets (issue "Planning at a million images"): whole-process `plan --json` CPU at or below
dynamicprompts'; `plan --jsonl` of 1,000,000 jobs under 1 GB peak, in linear time.
Run: `.venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/bench_plan.py`
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from harness import ensure_bytecode

A, B, C = 100, 100, 10  # 100,000 jobs; --jsonl is also run with C = 100: 1,000,000

RECIPE = """\
version: 1
name: bench
max_jobs: 1000000
output: "{{{{ job }}}}/{{{{ subject | slug }}}}/{{{{ style }}}}-{{{{ light }}}}.{{{{ ext }}}}"
defaults:
  model: flux-dev
  output_format: png
jobs:
  - name: grid
    prompt: "A photo of {{{{ subject }}}} painted in {{{{ style }}}}, {{{{ light }}}} lighting"
    matrix:
      subject: [{a}]
      style: [{b}]
      light: [{c}]
    params:
      width: "{{{{ 512 + 32 * (light | length % 4) }}}}"
      steps: "{{{{ 20 + (style | length) % 10 }}}}"
      guidance: 3.5
"""

DYNAMICPROMPTS = """\
import sys
from dynamicprompts.generators import CombinatorialPromptGenerator
a, b, c = (int(n) for n in sys.argv[1:4])
def values(prefix, count):
    return [f"{prefix}{i:03d}" for i in range(count)]
template = ("A photo of {" + "|".join(values("subject", a)) + "} painted in {"
            + "|".join(values("style", b)) + "}, {" + "|".join(values("light", c)) + "} lighting")
prompts = CombinatorialPromptGenerator().generate(template, max_prompts=a * b * c)
assert len(prompts) == a * b * c
"""


def values(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(count)]


def write_recipe(folder: Path, c: int) -> Path:
    """The recipe, in an output root that already has a (empty) state store."""
    from fluxbatch.state.store import Store

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(a=", ".join(values("subject", A)),
                                  b=", ".join(values("style", B)),
                                  c=", ".join(values("light", c))))
    Store.open(folder).close()
    return path


# -- whole processes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Process:
    cpu: float  # user + system seconds
    wall: float
    peak: int  # bytes (the largest resident set)


def run_process(argv: list[str]) -> Process:
    """Run `argv` to the end, its output thrown away, and read the kernel's account of it."""
    import fluxbatch  # the children import the fluxbatch this process imported

    env = {**os.environ, "PYTHONPATH": str(Path(fluxbatch.__file__).parents[1])}
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    errors = child.stderr.read().decode() if child.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({status}): {errors[-2000:]}")
    return Process(usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss * 1024)


def fluxbatch(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "fluxbatch", *arguments]


def dynamicprompts(c: int = C) -> list[str]:
    return [sys.executable, "-c", DYNAMICPROMPTS, str(A), str(B), str(c)]


def whole_processes(recipe: Path, rounds: int) -> dict[str, list[Process]]:
    """Every command once per round, in turn, so that a drift of the machine's speed touches
    all of them alike; the first round is a warm-up."""
    commands = {
        "dynamicprompts": dynamicprompts(),
        "plan --json": fluxbatch("plan", "--json", "--yes", str(recipe)),
        "plan (table)": fluxbatch("plan", "--yes", str(recipe)),
        "validate": fluxbatch("validate", "--yes", str(recipe)),
        "plan --jsonl": fluxbatch("plan", "--jsonl", "--yes", str(recipe)),
    }
    runs: dict[str, list[Process]] = {name: [] for name in commands}
    for round_ in range(rounds + 1):
        for name, argv in commands.items():
            result = run_process(argv)
            if round_:
                runs[name].append(result)
    return runs


def ratios(runs: list[Process], baseline: list[Process]) -> list[float]:
    return [run.cpu / base.cpu for run, base in zip(runs, baseline, strict=True)]


# -- in-process -------------------------------------------------------------------------------


def fluxbatch_plan(path: Path) -> int:
    from fluxbatch import recipe
    from fluxbatch.expand import expand

    plan = expand(recipe.load(path), yes=True)
    return len(plan.jobs)


def dynamicprompts_prompts() -> int:
    from dynamicprompts.generators import CombinatorialPromptGenerator

    template = (
        "A photo of {" + "|".join(values("subject", A)) + "} painted in {"
        + "|".join(values("style", B)) + "}, {" + "|".join(values("light", C)) + "} lighting"
    )
    prompts = CombinatorialPromptGenerator().generate(template, max_prompts=A * B * C)
    return len(prompts)


def timed(function: object, *args: object) -> tuple[float, int]:
    gc.collect()
    start = time.perf_counter()
    count = function(*args)  # type: ignore[operator]
    return time.perf_counter() - start, count


def in_process(path: Path, repeat: int) -> tuple[float, float, int]:
    ours, theirs = [], []
    for _ in range(repeat):
        seconds, count = timed(fluxbatch_plan, path)
        assert count == A * B * C, count
        ours.append(seconds)
        seconds, count = timed(dynamicprompts_prompts)
        assert count == A * B * C, count
        theirs.append(seconds)
    tracemalloc.start()
    fluxbatch_plan(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(ours), statistics.median(theirs), peak


# -- the report -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds of whole processes, and in-process runs (default 5)")
    parser.add_argument("--no-million", action="store_true",
                        help="skip plan --jsonl on 1,000,000 jobs (about 40 s)")
    args = parser.parse_args()
    ensure_bytecode()
    jobs = A * B * C
    with tempfile.TemporaryDirectory() as tmp:
        recipe = write_recipe(Path(tmp) / "100k", C)
        runs = whole_processes(recipe, args.repeat)
        million = None if args.no_million else run_process(
            fluxbatch("plan", "--jsonl", "--yes", str(write_recipe(Path(tmp) / "1m", 100))))
        ours, theirs, traced = in_process(recipe, args.repeat)

    base = runs["dynamicprompts"]
    print(f"jobs planned: {jobs:,}; medians of {args.repeat} rounds; CPU is user + system")
    print()
    print("whole process                CPU s   wall s   peak MB   CPU ratio to dynamicprompts")
    for name, results in runs.items():
        cpu = statistics.median(r.cpu for r in results)
        wall = statistics.median(r.wall for r in results)
        peak = max(r.peak for r in results) / 2**20
        ratio = "" if name == "dynamicprompts" else \
            f"{statistics.median(ratios(results, base)):.2f}"
        print(f"  {name:<25}{cpu:7.2f}{wall:9.2f}{peak:10.0f}   {ratio}")
    json_ratio = statistics.median(ratios(runs["plan --json"], base))
    print()
    print(f"in-process, load + expand only: fluxbatch {ours:.3f} s, dynamicprompts' generator "
          f"{theirs:.3f} s: ratio {ours / theirs:.2f}; peak {traced / 2**20:.0f} MB "
          "(tracemalloc)")
    jsonl = statistics.median(r.cpu for r in runs["plan --jsonl"])
    per_job = jsonl / jobs * 1e6
    print()
    print(f"plan --jsonl, {jobs:,} jobs: {per_job:.1f} µs CPU per job, peak "
          f"{max(r.peak for r in runs['plan --jsonl']) / 2**20:.0f} MB")
    targets = [(f"whole-process plan --json CPU ratio {json_ratio:.2f} <= 1.00",
                json_ratio <= 1.0)]
    if million is not None:
        per_job_m = million.cpu / (jobs * 10) * 1e6
        print(f"plan --jsonl, {jobs * 10:,} jobs: {per_job_m:.1f} µs CPU per job "
              f"({million.cpu:.1f} s), peak {million.peak / 2**20:.0f} MB")
        targets += [
            (f"plan --jsonl at 1,000,000 jobs: peak {million.peak / 2**20:.0f} MB < 1024 MB",
             million.peak < 2**30),
            (f"linear: CPU per job at 1,000,000 / at 100,000 = {per_job_m / per_job:.2f} "
             "<= 1.25", per_job_m <= 1.25 * per_job),
        ]
    print()
    for text, ok in targets:
        print(f"{verdict(ok)}  {text}")
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
