"""Where the account's slot-seconds go during `fluxbatch render` (a diagnostic for
bench_render.py's wall-time target; it prints figures, not PASS/FAIL).

With a cap of 24, the run's wall time × 24 is split into the time tasks spent rendering (the
emulator's drawn latencies) and the idle time. The idle time is broken down into:
  poll lag       from the moment a task finished to the poll that saw it Ready
  resubmit gap   from that poll to the submit that refilled the slot (as the emulator saw it)
  start, tail    before the 24th submit, and after the last one (too few jobs to fill the slots)

It observes the polls by wrapping `fluxbatch.providers.responses.read_polled` and changes
nothing. Run: .venv/bin/python bench/slot_timeline.py [--jobs 1000] [--latency 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from harness import CAP, EmulatorProcess, run_fluxbatch, work_dir, write_recipe


def observe_polls() -> list[tuple[float, str, str]]:
    """(time, task id, status) of every poll answer fluxbatch reads."""
    from fluxbatch.providers import responses

    seen: list[tuple[float, str, str]] = []
    read_polled = responses.read_polled

    def observed(response: Any) -> Any:
        polled = read_polled(response)
        seen.append((time.time(), response.request.url.params.get("id", ""), polled.status))
        return polled

    responses.read_polled = observed
    return seen


def describe(name: str, values: list[float]) -> str:
    ordered = sorted(values) or [0.0]
    return (f"{name:<44} sum {sum(ordered):7.1f} slot-s; per task mean "
            f"{statistics.mean(ordered) * 1000:4.0f} ms, median "
            f"{ordered[len(ordered) // 2] * 1000:4.0f} ms, p90 "
            f"{ordered[int(len(ordered) * 0.9)] * 1000:4.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    seen = observe_polls()
    with work_dir() as tmp:
        recipe = write_recipe(tmp, args.jobs)
        with EmulatorProcess(latency=args.latency, cap=CAP, seed=args.seed) as emulator:
            began = time.time()
            run = run_fluxbatch(recipe, emulator.base_url)
            ended = time.time()
            stats = emulator.stats()

    tasks = {task_id: (start, duration) for task_id, start, duration in stats["tasks"]}
    ready_seen: dict[str, float] = {}
    polls: dict[str, int] = {}
    for moment, task_id, status in seen:
        polls[task_id] = polls.get(task_id, 0) + 1
        if status == "Ready":
            ready_seen.setdefault(task_id, moment)
    lag = {t: ready_seen[t] - (start + duration) for t, (start, duration) in tasks.items()
           if t in ready_seen}
    submits = sorted(start for start, _ in tasks.values())
    readies = sorted(ready_seen.values())
    gaps = [submits[k + CAP] - readies[k] for k in range(len(readies) - CAP)]
    busy = sum(duration for _, duration in tasks.values())
    total = CAP * (ended - began)
    start_idle = sum(submits[k] - began for k in range(min(CAP, len(submits))))
    idle = total - busy
    tail = idle - sum(lag.values()) - sum(gaps) - start_idle

    print(f"fluxbatch said: {run.output.splitlines()[-1] if run.output else ''}")
    print(f"wall {ended - began:.2f} s; ideal from drawn latencies {busy / CAP:.2f} s; "
          f"slot utilisation {busy / total:.1%}")
    print(f"{'slot-seconds: total':<44} {total:7.1f}; rendering {busy:.1f}; idle {idle:.1f} "
          f"(= {idle / CAP:.2f} s of wall)")
    print(describe("  poll lag (finished → Ready seen)", list(lag.values())))
    one = [lag[t] for t in lag if polls.get(t) == 1]
    more = [lag[t] for t in lag if polls.get(t, 0) > 1]
    print(describe(f"    of tasks Ready at the 1st poll ({len(one)})", one))
    print(describe(f"    of tasks polled again ({len(more)})", more))
    print(describe("  resubmit gap (Ready seen → next submit)", gaps))
    print(f"{'  start (before the first 24 submits)':<44} sum {start_idle:7.1f} slot-s")
    print(f"{'  tail and the rest':<44} sum {tail:7.1f} slot-s")
    print(f"polls per job {sum(polls.values()) / max(1, len(tasks)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
