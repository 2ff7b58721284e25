"""Render at growing N: client CPU per image and peak memory, to show that nothing in a render
costs more per image as the output root grows (no scan per image, a manifest rewritten at a
pace that keeps its share of the run small).

Each size renders N new images into a fresh root against the emulator in its own process
(a cap of 1,000 active tasks and a short latency, so the client, not the cap, sets the
pace), then runs a null build of the same root. Targets: CPU per image at the largest N
within 1.25 x the smallest N's; each further image costs at most 4 KiB of memory beyond
the plan's own.

Run: .venv/bin/python bench/bench_scale.py [--sizes 5000 20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from harness import EmulatorProcess, count_images, verdict, work_dir, write_recipe

CAP = 1000
LATENCY = 0.05


_WRAPPER = ("import resource, subprocess, sys; "
            "code = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
            "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(code, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)")


def measure(command: list[str]) -> tuple[int, float, float, int]:
    """Exit code, wall seconds, CPU seconds (the process and its outbox), and the peak RSS
    in KiB of the largest of them, for one whole-process run (through a wrapper process, so
    that no other child of this one counts)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True,
                          text=True, check=True)
    wall = time.perf_counter() - start
    code, cpu, rss = done.stdout.split()
    return int(code), wall, float(cpu), int(rss)


def plan_only_rss(recipe: Path) -> int:
    """Peak RSS of `fluxbatch plan` on the recipe: the plan's own memory."""
    code, _, _, rss = measure([sys.executable, "-m", "fluxbatch", "plan", str(recipe), "--yes"])
    assert code == 0
    return rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        with work_dir(None) as tmp:
            recipe = write_recipe(tmp, size, name=f"scale-{size}")
            plan_rss = plan_only_rss(recipe)
            with EmulatorProcess(latency=LATENCY, latency_sigma=0.1, cap=CAP,
                                 model_caps={}) as emulator:
                render = [sys.executable, "-m", "fluxbatch", "render", str(recipe), "-q",
                          "--yes", "--base-url", emulator.base_url, "-j", str(CAP)]
                code, wall, cpu, rss = measure(render)
                null_code, null_wall, _, _ = measure(render)
            written = count_images(tmp)
        ok = code == 0 and null_code == 0 and written == size
        rows.append((size, wall, cpu, rss, plan_rss, null_wall, ok))
        print(f"{size:>7,} images: {cpu * 1000 / size:6.2f} ms CPU/image "
              f"(render + outbox), wall {wall:6.1f} s, peak RSS {rss / 1024:6.1f} MiB "
              f"(the plan alone {plan_rss / 1024:5.1f} MiB: "
              f"{(rss - plan_rss) / size:5.2f} KiB/image more), null build {null_wall:.2f} s"
              f"    {verdict(ok)}", flush=True)
    first, last = rows[0], rows[-1]
    ratio = (last[2] / last[0]) / (first[2] / first[0])
    flat = ratio <= 1.25
    # The memory each further image costs beyond the plan's own (the fixed cost of the
    # HTTP stack and the store, some 40 MiB, is the same at any size).
    extra = ((last[3] - last[4]) - (first[3] - first[4])) / max(1, last[0] - first[0])
    lean = extra <= 4.0
    print(f"CPU per image at {last[0]:,} / at {first[0]:,}: {ratio:.2f} (target <= 1.25)    "
          f"{verdict(flat)}")
    print(f"memory per further image beyond the plan, {first[0]:,} to {last[0]:,}: {extra:.2f} "
          f"KiB (target <= 4)    {verdict(lean)}")
    return 0 if flat and lean and all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
