"""Render throughput: `fluxbatch render` of 1,000 jobs against the emulator (account cap 24,
mean task latency L), measured against the physical limit `jobs / 24 × L`; then one render
driving 240 tasks at once (ten accounts' worth) against an emulator with a cap of 240.

Targets (issue "Trust boundaries and real networks"):
  wall time ≤ 1.05 × ideal; ≤ 3 polls per job on average; 240 tasks at once driven with under
  half a core (the render and its outbox, CPU seconds per wall second).
Client CPU per job is printed with no target: at the real API's cap (24 tasks of ~5 s) a
client has ~200 ms of CPU per image to spend.

The emulator runs in a separate process, so the CPU figure is fluxbatch's alone (plan, state
store journaling with fsync, the outbox process, HTTP, image writing, manifest). It is also
printed as a ratio to the leanest Python client doing the same jobs in the same run
(floor_client.py). Run:
  .venv/bin/python bench/bench_render.py            # 1,000 jobs, L = 2 s (ideal ≈ 83 s)
  .venv/bin/python bench/bench_render.py --quick    # 200 jobs
"""

from __future__ import annotations

import sys

from floor_client import run_floor
from harness import (
    CAP,
    MODEL,
    EmulatorProcess,
    count_images,
    planned_requests,
    render_parser,
    run_fluxbatch,
    verdict,
    work_dir,
    write_recipe,
)

WALL_TARGET = 1.05
POLLS_TARGET = 3.0
WIDE_CAP = 240  # ten accounts' worth of active tasks
WIDE_LATENCY = 5.0  # seconds, about what the real API takes
CORES_TARGET = 0.5


def main() -> int:
    parser = render_parser(__doc__, 1000, "images to render",
                           "200 jobs: a smoke run (start and tail weigh ~4× more)")
    parser.add_argument("--keep", metavar="DIR", help="render into DIR and keep it")
    parser.add_argument("--wide-jobs", type=int, default=2400,
                        help=f"images for the {WIDE_CAP}-task run (2400; 0 skips it)")
    args = parser.parse_args()
    jobs = 200 if args.quick else args.jobs
    wide_jobs = min(args.wide_jobs, 480) if args.quick else args.wide_jobs

    with work_dir(args.keep) as tmp:
        recipe = write_recipe(tmp, jobs)
        with EmulatorProcess(latency=args.latency, cap=CAP, seed=args.seed) as emulator:
            run = run_fluxbatch(recipe, emulator.base_url)
            stats = emulator.stats()
        written = count_images(tmp)
        # The baseline: the leanest Python client (floor_client.py), same jobs, a fresh
        # emulator with the same latency draw.
        with EmulatorProcess(latency=args.latency, cap=CAP, seed=args.seed) as emulator:
            floor_cpu, floor_wall, floor_polls = run_floor(
                emulator.base_url, MODEL, planned_requests(recipe), tmp / "floor",
                args.latency, CAP)

    ideal = jobs / CAP * args.latency
    realized = sum(stats["durations"]) / CAP  # the same bound, from the latencies drawn
    ratio = run.wall / ideal
    polls = stats["polls"] / jobs
    cpu_ms = run.cpu * 1000 / jobs
    checks = {
        "wall": ratio <= WALL_TARGET,
        "polls": polls <= POLLS_TARGET,
        "complete": run.exit_code == 0 and written == jobs and stats["submits"] == jobs,
    }
    print(f"jobs:                       {jobs:,} (emulator: cap {CAP}, mean latency "
          f"{args.latency:g} s, separate process)")
    print(f"fluxbatch said:             {run.output.splitlines()[-1] if run.output else ''}")
    print(f"images on disk:             {written:,}; exit code {run.exit_code}    "
          f"{verdict(checks['complete'])}")
    print(f"wall time:                  {run.wall:.2f} s")
    print(f"ideal jobs/{CAP} × L:          {ideal:.2f} s (from the latencies actually drawn: "
          f"{realized:.2f} s)")
    print(f"ratio wall/ideal:           {ratio:.3f} (target <= {WALL_TARGET:.2f}; "
          f"vs drawn latencies {run.wall / realized:.3f})    {verdict(checks['wall'])}")
    print(f"polls per job:              {polls:.2f} (target <= {POLLS_TARGET:g}; "
          f"{stats['polls']:,} polls)    {verdict(checks['polls'])}")
    print(f"client CPU per job:         {cpu_ms:.2f} ms ({run.cpu:.2f} s in all; no target)")
    print(f"  of which fluxbatch process {run.own_cpu * 1000 / jobs:.2f} ms, its helper "
          f"processes (outbox) {run.helper_cpu * 1000 / jobs:.2f} ms")
    print(f"  baseline, leanest client  {floor_cpu * 1000 / jobs:.2f} ms (asyncio + h11, no state; "
          f"{floor_polls / jobs:.2f} polls/job, wall {floor_wall:.1f} s): fluxbatch uses "
          f"{run.cpu / floor_cpu:.2f}x")
    print(f"emulator:                   {stats['submits']:,} submits, "
          f"{stats['rejected_429']} answered 429, peak {stats['peak_active']} active, "
          f"{stats['downloads']:,} downloads, {stats['cpu']:.1f} s CPU")
    if wide_jobs:
        checks["wide"] = wide(wide_jobs, args.seed)
    return 0 if all(checks.values()) else 1


def wide(jobs: int, seed: int) -> bool:
    """One render driving WIDE_CAP tasks at once: CPU seconds per wall second."""
    with work_dir(None) as tmp:
        recipe = write_recipe(tmp, jobs, name="bench-wide")
        with EmulatorProcess(latency=WIDE_LATENCY, cap=WIDE_CAP, seed=seed) as emulator:
            run = run_fluxbatch(recipe, emulator.base_url, "-j", str(WIDE_CAP))
            stats = emulator.stats()
        written = count_images(tmp)
    cores = run.cpu / run.wall
    ok = cores < CORES_TARGET and run.exit_code == 0 and written == jobs
    ideal = jobs / WIDE_CAP * WIDE_LATENCY
    print(f"{WIDE_CAP} tasks at once:          {jobs:,} images (cap {WIDE_CAP}, mean latency "
          f"{WIDE_LATENCY:g} s): wall {run.wall:.1f} s ({run.wall / ideal:.3f} × ideal), peak "
          f"{stats['peak_active']} active, {stats['polls'] / jobs:.2f} polls/job")
    print(f"  CPU per wall second:      {cores:.3f} cores (target < {CORES_TARGET:g}; render "
          f"{run.own_cpu:.1f} s, outbox {run.helper_cpu:.1f} s; {run.cpu * 1000 / jobs:.2f} "
          f"ms/job)    {verdict(ok)}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
