"""Planning speed: fluxbatch expanding 100,000 jobs versus dynamicprompts generating the same
100,000 prompt strings alone, measured in the same run.

Target (issue "Recipe language, validation and the planner"): ratio ≤ 1.0 and peak memory
under 300 MB. Run: `.venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/bench_plan.py`
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

A, B, C = 100, 100, 10

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


def values(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(count)]


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(RECIPE.format(
            a=", ".join(values("subject", A)), b=", ".join(values("style", B)),
            c=", ".join(values("light", C))))
        ours, theirs = [], []
        for _ in range(args.repeat):
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
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    ratio = ours_s / theirs_s
    print(f"jobs planned:                 {A * B * C:,}")
    print(f"fluxbatch plan (median of {args.repeat}):  {ours_s:.3f} s")
    print(f"dynamicprompts prompts only:  {theirs_s:.3f} s")
    print(f"ratio fluxbatch/dynamicprompts: {ratio:.2f} (target <= 1.00)")
    print(f"fluxbatch peak memory (tracemalloc): {peak / 2**20:.0f} MB (target < 300 MB)")
    return 0 if ratio <= 1.0 and peak < 300 * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
