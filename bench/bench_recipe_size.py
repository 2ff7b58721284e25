"""`fluxbatch validate` on a large plain recipe: 34,000 trivial jobs in 1 MB of YAML.

A recipe that lists its images one job each (generated from a catalogue, say) is checked
job by job: each job's templates, parameters and names. Measured against a baseline in the
same run: the same 34,000 images as one job with a matrix of 34,000 values, which shares
all of that. Each is a whole `fluxbatch validate` process (CPU, user + system, and peak
RSS), run in turn A B A B ...; the medians are quoted.

Target (issue "M7"): validate of the 1 MB recipe in under 5 s of CPU. Before the work on it:
52 s and 486 MB, and 100 s and 740 MB at 2 MB.

Run: .venv/bin/python bench/bench_recipe_size.py [--mb 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from harness import ensure_bytecode, verdict, work_dir

JOBS_PER_MB = 34_000  # `  - {name: j00001, prompt: c}`: 30 bytes a job
TARGET_CPU = 5.0

HEAD = """\
version: 1
name: big
provider: emulator
max_jobs: 100000
defaults:
  model: flux-dev
jobs:
"""

_WRAPPER = ("import resource, subprocess, sys; "
            "code = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
            "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(code, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)")


def many_jobs(directory: Path, jobs: int) -> Path:
    path = directory / "many-jobs.yaml"
    lines = [f"  - {{name: j{i:05d}, prompt: c}}" for i in range(jobs)]
    path.write_text(HEAD + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_job(directory: Path, jobs: int) -> Path:
    """The baseline: the same images, from one job's matrix."""
    path = directory / "one-job.yaml"
    values = ", ".join(f"j{i:05d}" for i in range(jobs))
    path.write_text(HEAD + f"  - name: all\n    prompt: c\n    matrix:\n      v: [{values}]\n"
                    '    output: "{{ v }}/default-{{ replicate }}.{{ ext }}"\n',
                    encoding="utf-8")
    return path


def measure(recipe: Path) -> tuple[float, int]:
    """CPU seconds and peak RSS (KiB) of `fluxbatch validate RECIPE` as a process of its own
    (through a wrapper, so that no other child of this one counts)."""
    command = [sys.executable, "-m", "fluxbatch", "validate", str(recipe)]
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True,
                          text=True, check=True)
    code, cpu, rss = done.stdout.split()
    if code != "0":
        raise SystemExit(f"validate {recipe} exited {code}")
    return float(cpu), int(rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=1.0, help="the recipe's size (default 1)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ensure_bytecode()
    jobs = int(args.mb * JOBS_PER_MB)
    with work_dir(None) as tmp:
        many, one = many_jobs(tmp, jobs), one_job(tmp, jobs)
        size = many.stat().st_size
        runs: dict[Path, list[tuple[float, int]]] = {many: [], one: []}
        for _ in range(args.rounds):
            for recipe in (many, one):
                runs[recipe].append(measure(recipe))
    cpu = {recipe: statistics.median(c for c, _ in found) for recipe, found in runs.items()}
    rss = {recipe: max(r for _, r in found) / 1024 for recipe, found in runs.items()}
    print(f"{jobs:,} jobs, {size / 1e6:.2f} MB: validate {cpu[many]:.2f} s CPU, "
          f"peak {rss[many]:.0f} MiB")
    print(f"baseline, the same images in one job: {cpu[one]:.2f} s CPU, peak {rss[one]:.0f} MiB; "
          f"jobs cost {cpu[many] / cpu[one]:.2f} x the baseline")
    ok = cpu[many] < TARGET_CPU * args.mb
    print(f"target: under {TARGET_CPU * args.mb:g} s of CPU    {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
