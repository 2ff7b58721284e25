"""The wire's CPU: one render through the current stack (httpx requests carried by aiohttp,
through httpx-aiohttp; `fluxbatch/wire.py`) against the same render through httpx's own
transport (httpcore; `bench/wire_httpx.py`), at 24 and at 240 tasks in flight (issue 18).

Each stack renders the same N images against the emulator (its own process, loopback, cap
= tasks in flight, `-j` the same). The two stacks run in turn, A B A B ..., and the ratio
httpx / current is taken pair by pair, so a machine whose speed drifts moves both alike.
Printed for each stack and each width: client CPU per image (the render process and its
outbox process, user + system), wall time, and the median of the pair-by-pair CPU ratios.
httpx's pool is tuned: as many kept-alive connections as tasks in flight (the current stack
keeps fluxbatch's own sizing), and each submit over a connection of its own, as wire.py does.
No target: the figures feed the choice recorded in docs/design.md ("Dependencies").

Run: .venv/bin/python bench/bench_wire.py [--jobs 480] [--pairs 3] [--widths 24 240]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import wire_httpx
from harness import EmulatorProcess, count_images, run_fluxbatch, work_dir, write_recipe

STACKS = ("aiohttp", "httpx")


def render(stack: str, jobs: int, width: int, latency: float, seed: int,
           site: Path) -> tuple[float, float]:
    """CPU seconds per image and wall seconds of one render through `stack`."""
    if stack == "httpx":
        os.environ.update(FLUXBATCH_BENCH_WIRE="httpx", BENCH_POOL=str(width),
                          PYTHONPATH=str(site))
        wire_httpx.install()
    try:
        with work_dir(None) as tmp:
            recipe = write_recipe(tmp, jobs, name="bench-wire")
            with EmulatorProcess(latency=latency, cap=width, seed=seed) as emulator:
                run = run_fluxbatch(recipe, emulator.base_url, "-j", str(width))
            if run.exit_code != 0 or count_images(tmp) != jobs:
                raise SystemExit(f"{stack} at {width}: exit {run.exit_code}\n{run.output}")
    finally:
        for name in ("FLUXBATCH_BENCH_WIRE", "BENCH_POOL", "PYTHONPATH"):
            os.environ.pop(name, None)
        wire_httpx.uninstall()
    return run.cpu / jobs, run.wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=480, help="images per render (480)")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs per width (3)")
    parser.add_argument("--widths", type=int, nargs="+", default=[24, 240],
                        help="tasks in flight (24 240)")
    parser.add_argument("--latency", type=float, default=0.5,
                        help="the emulator's mean task latency in seconds (0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-wire-site-") as site:
        # The outbox is a process of its own: it loads wire_httpx through this.
        Path(site, "sitecustomize.py").write_text(
            f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import wire_httpx  # noqa: F401\n", encoding="utf-8")
        print(f"{args.jobs} images per render, emulator latency {args.latency:g} s, "
              f"{args.pairs} pairs per width, stacks in turn")
        for width in args.widths:
            figures: dict[str, list[tuple[float, float]]] = {stack: [] for stack in STACKS}
            for _ in range(args.pairs):
                for stack in STACKS:
                    figures[stack].append(render(stack, args.jobs, width, args.latency,
                                                 args.seed, Path(site)))
            for stack in STACKS:
                cpu = [c for c, _ in figures[stack]]
                wall = [w for _, w in figures[stack]]
                print(f"{width:>4} in flight, {stack:<7}: CPU per image "
                      f"{statistics.median(cpu) * 1000:6.2f} ms (runs "
                      f"{', '.join(f'{c * 1000:.2f}' for c in cpu)}); wall "
                      f"{statistics.median(wall):.2f} s")
            ratios = [h[0] / a[0] for a, h in zip(figures["aiohttp"], figures["httpx"],
                                                   strict=True)]
            walls = [h[1] / a[1] for a, h in zip(figures["aiohttp"], figures["httpx"],
                                                  strict=True)]
            print(f"{width:>4} in flight, httpx / current: CPU {statistics.median(ratios):.2f}x "
                  f"(pairs {', '.join(f'{r:.2f}' for r in ratios)}); wall "
                  f"{statistics.median(walls):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
