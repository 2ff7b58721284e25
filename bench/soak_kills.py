"""Soak: render 1,000 images against the bundled emulator while SIGKILLing `fluxbatch render`
20 times at random moments, resuming after each kill, against a provider that forgets its
tasks soon after they finish, answers 5xx at random and 429 above its cap. Then count what
the provider was paid for.

Figures (issue 17, "Done means"):
  paid twice   images the provider created more than one task for. Split into those paid
               again while the provider still had the earlier task (fluxbatch's fault:
               target 0) and those paid again after the provider had forgotten it (it
               declared the task lost: "Task not found").
  lost         planned images that are neither on disk nor held back with a reason (target 0).
  held         images held back at the end, by reason (a 5xx on a submit may have been
               billed, so it is held as unknown; a last `--retry-unknown` run sends those,
               and meets a 5xx again now and then).

Time is scaled down so that the soak takes a few minutes: by default a task takes 0.75 s
(lognormal, as the emulator draws it) instead of the ~3 s of the real API, and the provider
forgets a task 10 s after it finished instead of ~40 s: the same ratio, 4× faster. The
render asks for more tasks at once (`-j`, 24) than the provider's cap (16), so 429s come
from the cap itself; 5xx come from the emulator's `500` fault, on submits, polls and
downloads alike.

Each kill is a SIGKILL of the render process alone, as the OOM killer or a closed terminal
would do: its outbox process finishes and records what it was sending. The next run starts
at once (it waits for the outbox's lock, as a user's next run would).

  .venv/bin/python bench/soak_kills.py                 # 1,000 images, 20 kills (~4 min)
  .venv/bin/python bench/soak_kills.py --images 200 --kills 5   # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import ensure_bytecode, verdict, work_dir, write_recipe

from fluxbatch.emulator import EmulatorConfig, EmulatorThread
from fluxbatch.front import load_plan
from fluxbatch.identity import job_key

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Run:
    killed: bool
    code: int | None
    seconds: float
    submits: int  # tasks the provider created during the run


def render(recipe: Path, base_url: str, jobs: int, *options: str) -> subprocess.Popen[bytes]:
    env = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "fluxbatch", "render", str(recipe), "--base-url", base_url,
         "-q", "-j", str(jobs), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def run_once(recipe: Path, emulator: Any, jobs: int, kill_after: float | None,
             *options: str) -> tuple[Run, str]:
    """One render, SIGKILLed after `kill_after` seconds if it is still running then."""
    before = len(emulator.submissions)
    started = time.monotonic()
    process = render(recipe, emulator.base_url, jobs, *options)
    killed = False
    try:
        out, err = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)  # (the render alone: its outbox finishes)
        out, err = process.communicate()
        killed = True
    seconds = time.monotonic() - started
    said = (out + err).decode(errors="replace")
    return Run(killed, None if killed else process.returncode, seconds,
               len(emulator.submissions) - before), said


def paid_twice(submissions: list[dict[str, Any]], forget: float) -> tuple[Counter[str], int]:
    """Per image paid for more than once, how each extra task came about: 'kept' (the
    provider still had the earlier task) or 'forgotten' (it had forgotten it)."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for submission in submissions:
        by_key[job_key(str(submission["model"]), submission["request"])].append(submission)
    kinds: Counter[str] = Counter()
    images = 0
    for tasks in by_key.values():
        if len(tasks) < 2:
            continue
        images += 1
        tasks.sort(key=lambda task: task["time"])
        for earlier, later in itertools.pairwise(tasks):
            forgotten_at = earlier["time"] + earlier["duration"] + forget
            kinds["forgotten" if later["time"] >= forgotten_at else "kept"] += 1
    return kinds, images


def status(recipe: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "fluxbatch", "status", str(recipe), "--json"],
                          capture_output=True, env=env, check=False)
    document: dict[str, Any] = json.loads(done.stdout)
    return document


HELD = ("unknown", "moderated", "failed")  # states an image is left in with a reason


def held_reasons(document: dict[str, Any]) -> Counter[str]:
    return Counter(f"{entry['state']}: {entry['reason']}"
                   for entry in document["not_up_to_date"] if entry["state"] in HELD)


def lost(document: dict[str, Any]) -> list[str]:
    """Images a finished run left neither in place nor held back with a reason."""
    return [f"{entry['output']} ({entry['state']})" for entry in document["not_up_to_date"]
            if entry["state"] not in HELD]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images to render (1000)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs, mid-run (20)")
    parser.add_argument("--latency", type=float, default=0.75,
                        help="the emulator's mean task latency in seconds (0.75)")
    parser.add_argument("--forget", type=float, default=10.0,
                        help="seconds after a task finished that the provider forgets it (10)")
    parser.add_argument("--cap", type=int, default=16, help="the provider's active-task cap")
    parser.add_argument("-j", "--jobs", type=int, default=24,
                        help="fluxbatch's concurrency, above the cap: 429s (24)")
    parser.add_argument("--fault-rate", type=float, default=0.01,
                        help="share of requests answered 5xx (0.01)")
    parser.add_argument("--kill-window", type=float, nargs=2, default=(0.2, 4.0),
                        metavar=("MIN", "MAX"), help="seconds after a start to kill (0.2 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="render into DIR and keep it")
    args = parser.parse_args()
    ensure_bytecode()
    rng = random.Random(args.seed)
    config = EmulatorConfig(latency=args.latency, latency_sigma=0.3, cap=args.cap,
                            task_ttl=args.forget, url_ttl=args.forget, max_side=64,
                            fault_rate=args.fault_rate, faults=frozenset({"500"}),
                            seed=args.seed)
    with work_dir(args.keep) as tmp, EmulatorThread(config) as emulator:
        recipe = write_recipe(tmp, args.images, name="soak")
        planned = load_plan(str(recipe)).jobs
        print(f"soak: {args.images:,} images, {args.kills} SIGKILLs, tasks of {args.latency} s "
              f"forgotten {args.forget} s after they finish, cap {args.cap} (-j {args.jobs}), "
              f"{args.fault_rate:.0%} of requests answered 5xx; in {tmp}", flush=True)
        started = time.monotonic()
        runs: list[Run] = []
        while sum(run.killed for run in runs) < args.kills:
            run, said = run_once(recipe, emulator, args.jobs, rng.uniform(*args.kill_window))
            runs.append(run)
            if not run.killed:  # it finished everything before its moment came
                print(f"  a run ended by itself (exit {run.code}) before its kill: "
                      f"{said.strip().splitlines()[0] if said.strip() else ''}", flush=True)
                break
        final, said = run_once(recipe, emulator, args.jobs, None)
        runs.append(final)
        held = status(recipe)
        retry, retried = run_once(recipe, emulator, args.jobs, None, "--retry-unknown")
        runs.append(retry)
        after_retry = status(recipe)
        elapsed = time.monotonic() - started
        submissions = list(emulator.submissions)
        stats = emulator.stats.as_dict()

    kinds, twice = paid_twice(submissions, args.forget)
    lost_before, lost_after = lost(held), lost(after_retry)
    kills = sum(run.killed for run in runs)
    print(f"\nruns: {len(runs)} ({kills} killed, mid-run; then one to the end, then one with "
          f"--retry-unknown), {elapsed:.0f} s in all")
    print(f"provider: {stats['submits']:,} tasks created for {len(planned):,} images; "
          f"{stats['rejected_429']:,} submits answered 429; "
          f"{sum(stats['faults'].values()):,} requests answered 5xx; {stats['polls']:,} polls")
    print(f"final run: exit {final.code}: {said.strip().splitlines()[0] if said.strip() else ''}")
    print(f"retry-unknown run: exit {retry.code}: "
          f"{retried.strip().splitlines()[0] if retried.strip() else ''}")
    print(f"\npaid twice: {twice} images ({kinds['kept']} extra tasks while the provider still "
          f"had the earlier one, {kinds['forgotten']} after it had forgotten it)")
    print(f"lost: {len(lost_before)} after the final run, {len(lost_after)} after "
          f"--retry-unknown {' '.join((lost_before + lost_after)[:10])}")
    print(f"held after the final run: {sum(held_reasons(held).values())}")
    for reason, count in held_reasons(held).most_common():
        print(f"  {count:4}  {reason}")
    print(f"held after --retry-unknown: {sum(held_reasons(after_retry).values())}")
    for reason, count in held_reasons(after_retry).most_common():
        print(f"  {count:4}  {reason}")
    ok_twice = twice == 0
    ok_lost = not lost_before and not lost_after
    print(f"\n{verdict(ok_twice)}  no image paid twice (target 0: {twice})")
    print(f"{verdict(ok_lost)}  no image lost (target 0)")
    print(f"      {after_retry['counts']['up-to-date']:,} of {len(planned):,} images in place "
          "after --retry-unknown (the others held, with the reasons above: a resubmit met a "
          "5xx again)")
    print(f"{verdict(kills == args.kills)}  {kills} of {args.kills} kills landed mid-run")
    return 0 if ok_twice and ok_lost and kills == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
