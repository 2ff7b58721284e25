"""429s: `fluxbatch render` against an emulator that sheds load or caps the account lower than
fluxbatch's own limit, each beside the same render without 429s, measured in the same run.

Scenarios (emulator in its own process, mean task latency L, fluxbatch at its default 24):
  clean      cap 24, no 429s: the baseline of the shedding runs
  shed 2/5/10%   cap 24, and that share of the submits below it answered 429 at random
             (`EmulatorConfig.shed_rate`, no Retry-After), as a gateway shedding load does
  clean 16   cap 16 and `-j 16`: the baseline of the hard cap
  hard cap   cap 16 while fluxbatch allows 24: every submit over 16 is a 429 (Retry-After)
  cap drop   cap 24, dropping to 12 a third of the way into the clean run's time; its
             baseline is an estimate: that time, then the rest of the images at half the
             clean rate (the tasks in flight at the drop still finish at the full rate,
             so a render can beat it by a few percent)

Each 429 scenario runs with fluxbatch's pacing as it is (`new`: fluxbatch/pacing.py) and, in
the same run, with the pacing it had before (`before`, kept in this file as `BeforeSlots`):
each 429 cut the limit to 75% of the tasks in flight, and it grew back by one slot per
"limit" successes. `--policy` picks one.

Targets (issue "Full speed through shedding gateways"): at 5% shedding, ≤ 1.10 × the clean
render; under the hard cap, no more 429s than the policy before. Run:
  .venv/bin/python bench/bench_shedding.py            # 600 images per render, L = 2 s (~20 min)
  .venv/bin/python bench/bench_shedding.py --quick    # 240 images: a smoke run
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from harness import (
    CAP,
    EmulatorProcess,
    count_images,
    render_parser,
    run_fluxbatch,
    verdict,
    work_dir,
    write_recipe,
)

SHED_TARGET = 1.10  # × the clean render, at 5% shedding
HARD_CAP = 16
DROPPED_CAP = 12
DROP_AT = 1 / 3  # of the clean render's wall time


class BeforeSlots:
    """The policy before (fluxbatch/pacing.py until this benchmark's change), verbatim but
    for the interface it now has to fit (a clock and a sleep, `attached`): additive
    increase, multiplicative decrease."""

    def __init__(self, cap: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.cap = cap
        self.limit = cap
        self.held = 0
        self._successes = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held < self.limit)
            self.held += 1

    async def release(self) -> None:
        async with self._changed:
            self.held -= 1
            self._changed.notify_all()

    def attached(self) -> None:
        pass

    def rate_limited(self) -> None:
        self.limit = max(1, min(self.limit, math.ceil(self.held * 0.75)))
        self._successes = 0

    async def succeeded(self) -> None:
        if self.limit >= self.cap:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            async with self._changed:
                self.limit += 1
                self._changed.notify_all()


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    """Run fluxbatch with the policy before, or as it is."""
    from fluxbatch import execute

    kept = execute.Slots
    if name == "before":
        execute.Slots = BeforeSlots  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        execute.Slots = kept  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    policy: str
    wall: float
    baseline: float
    rejected: int  # every 429 the emulator sent
    shed: int  # of which shed below the cap
    busy: float  # mean tasks rendering: the drawn latencies over the wall time
    peak: int
    complete: bool

    @property
    def ratio(self) -> float:
        return self.wall / self.baseline


def render(jobs: int, latency: float, seed: int, *options: str,
           change: tuple[float, dict[str, Any]] | None = None,
           **emulator: Any) -> tuple[float, dict[str, Any], bool]:
    """One render of `jobs` images into a fresh root: (wall, emulator stats, complete).
    `change` reconfigures the emulator that many seconds into the render."""
    with work_dir(None) as tmp:
        recipe = write_recipe(tmp, jobs, name="bench-shedding")
        with EmulatorProcess(latency=latency, seed=seed, **{"cap": CAP, **emulator}) as emu:
            timer = None
            if change is not None:
                timer = threading.Timer(change[0], emu.reconfigure, kwargs=change[1])
                timer.start()
            try:
                run = run_fluxbatch(recipe, emu.base_url, *options)
            finally:
                if timer is not None:
                    timer.cancel()
                    timer.join()
            stats = emu.stats()
        complete = run.exit_code == 0 and count_images(tmp) == jobs
    return run.wall, stats, complete


def measure(scenario: str, name: str, baseline: float, jobs: int, latency: float, seed: int,
            *options: str, change: tuple[float, dict[str, Any]] | None = None,
            **emulator: Any) -> Result:
    with policy(name):
        wall, stats, complete = render(jobs, latency, seed, *options, change=change,
                                       **emulator)
    result = Result(scenario, name, wall, baseline, stats["rejected_429"], stats["shed_429"],
                    sum(stats["durations"]) / wall, stats["peak_active"], complete)
    print(f"  {scenario:<10} {name:<7} {wall:7.1f} s  {result.ratio:5.2f} ×  "
          f"{result.rejected:5} 429s", flush=True)
    return result


def main() -> int:
    parser = render_parser(__doc__, 600, "images per render", "240 images: a smoke run")
    parser.add_argument("--policy", choices=["new", "before", "both"], default="both",
                        help="which policies to measure in the 429 scenarios (both)")
    args = parser.parse_args()
    jobs = 240 if args.quick else args.jobs
    latency, seed = args.latency, args.seed
    policies = ["new", "before"] if args.policy == "both" else [args.policy]

    print(f"{jobs:,} images per render, mean latency {latency:g} s, emulator in its own process")
    results = []
    clean, _, ok = render(jobs, latency, seed)
    results.append(Result("clean", "-", clean, clean, 0, 0, 0.0, 0, ok))
    print(f"  clean      -       {clean:7.1f} s", flush=True)
    for rate in (0.02, 0.05, 0.10):
        for name in policies:
            results.append(measure(f"shed {rate:.0%}", name, clean, jobs, latency, seed,
                                   shed_rate=rate))
    clean16, _, ok = render(jobs, latency, seed, "-j", str(HARD_CAP), cap=HARD_CAP)
    results.append(Result(f"clean {HARD_CAP}", "-", clean16, clean16, 0, 0, 0.0, 0, ok))
    print(f"  clean {HARD_CAP}   -       {clean16:7.1f} s", flush=True)
    for name in policies:
        results.append(measure("hard cap", name, clean16, jobs, latency, seed, cap=HARD_CAP))
    # The best a client could do: full speed until the drop, then half the clean rate.
    drop = DROP_AT * clean
    dropped = drop + (jobs - jobs / clean * drop) / (jobs / clean * DROPPED_CAP / CAP)
    for name in policies:
        results.append(measure("cap drop", name, dropped, jobs, latency, seed,
                               change=(drop, {"cap": DROPPED_CAP})))
    print()
    table(results)
    return 0 if check(results) else 1


def table(results: list[Result]) -> None:
    print("| scenario | policy | wall | × same render without 429s | 429s (shed) | "
          "mean tasks rendering | peak active |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r.policy == "-":
            print(f"| {r.scenario} | - | {r.wall:.1f} s | (baseline) | 0 | | |")
            continue
        print(f"| {r.scenario} | {r.policy} | {r.wall:.1f} s | {r.ratio:.2f} × | "
              f"{r.rejected} ({r.shed}) | {r.busy:.1f} | {r.peak} |")
    print()


def check(results: list[Result]) -> bool:
    found = {(r.scenario, r.policy): r for r in results}
    checks = {"every render complete": all(r.complete for r in results)}
    shed = found.get(("shed 5%", "new"))
    if shed is not None:
        checks[f"5% shedding ≤ {SHED_TARGET:.2f} × clean ({shed.ratio:.3f})"] = \
            shed.ratio <= SHED_TARGET
    capped, before = found.get(("hard cap", "new")), found.get(("hard cap", "before"))
    if capped is not None and before is not None:
        checks[f"hard cap: no more 429s than before ({capped.rejected} vs "
               f"{before.rejected})"] = capped.rejected <= before.rejected
    for what, ok in checks.items():
        print(f"{what:<60} {verdict(ok)}")
    return all(checks.values())


if __name__ == "__main__":
    sys.exit(main())
