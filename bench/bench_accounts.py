"""A pool of accounts: one `fluxbatch render --accounts FILE` over 10 accounts with a cap of
24 each, 240 tasks in flight in one process, against the emulator enforcing each key's cap
(an account over its cap is answered 429).

Target (issue "Fan out on the engines teams already run"): wall time ≤ 1.05 × the ideal
`jobs / 240 × L`. The baseline, measured in the same run on the same jobs: one account with a
cap of 240 (`-j 240`), which has no pool to spread over; the pool's wall time is also printed
as a ratio to it (a loaded machine slows both alike). Printed beside them: the ratio against
the latencies the emulator actually drew, each account's peak of tasks in flight (never over
24) and its share of the submits, polls made with another account's key (must be 0), 429s,
and the CPU the render and its outbox used per wall second.

The emulator runs in a separate process (bench/harness.py), so the CPU figure is fluxbatch's.
Run:
  .venv/bin/python bench/bench_accounts.py            # 2,400 jobs, L = 5 s (ideal 50 s)
  .venv/bin/python bench/bench_accounts.py --quick    # 480 jobs (start and tail weigh more)
"""

from __future__ import annotations

import os
import sys

from harness import (
    EmulatorProcess,
    count_images,
    render_parser,
    run_fluxbatch,
    verdict,
    work_dir,
    write_recipe,
)

from fluxbatch.emulator import Account

ACCOUNTS = 10
CAP = 24  # each account's, as BFL's default
WALL_TARGET = 1.05


def main() -> int:
    parser = render_parser(__doc__, 2400, "images to render",
                           "480 jobs: a smoke run (start and tail weigh ~5x more)")
    parser.set_defaults(latency=5.0)
    args = parser.parse_args()
    jobs = 480 if args.quick else args.jobs
    keys = {f"bench-{n}": f"bench-key-{n:02d}-{os.urandom(4).hex()}" for n in range(ACCOUNTS)}
    for n, key in enumerate(keys.values()):
        os.environ[f"BENCH_KEY_{n}"] = key
    pool = [Account(key, cap=CAP) for key in keys.values()]

    with work_dir(None) as tmp:
        recipe = write_recipe(tmp, jobs, name="bench-accounts")
        accounts = tmp / "accounts.yaml"
        accounts.write_text("accounts:\n" + "".join(
            f"  - {{name: {name}, provider: emulator, key_env: BENCH_KEY_{n}, cap: {CAP}}}\n"
            for n, name in enumerate(keys)), encoding="utf-8")
        with EmulatorProcess(latency=args.latency, cap=CAP, seed=args.seed,
                             accounts=tuple(pool)) as emulator:
            run = run_fluxbatch(recipe, emulator.base_url, "--accounts", str(accounts))
            stats = emulator.stats()
        written = count_images(tmp)
    with work_dir(None) as tmp:
        recipe = write_recipe(tmp, jobs, name="bench-accounts")
        with EmulatorProcess(latency=args.latency, cap=ACCOUNTS * CAP,
                             seed=args.seed) as emulator:
            baseline = run_fluxbatch(recipe, emulator.base_url, "-j", str(ACCOUNTS * CAP))

    total_cap = ACCOUNTS * CAP
    ideal = jobs / total_cap * args.latency
    realized = sum(stats["durations"]) / total_cap
    ratio = run.wall / ideal
    peaks = stats["peak_by_account"]
    shares = stats["submits_by_account"]
    checks = {
        "complete": run.exit_code == 0 and written == jobs and stats["submits"] == jobs,
        "wall": ratio <= WALL_TARGET,
        "caps": len(peaks) == ACCOUNTS and max(peaks.values()) <= CAP,
        "keys": stats["foreign_polls"] == 0 and stats["rejected_auth"] == 0,
    }
    print(f"jobs:                  {jobs:,} over {ACCOUNTS} accounts of cap {CAP} "
          f"({total_cap} in flight at most), mean latency {args.latency:g} s")
    print(f"fluxbatch said:        {run.output.splitlines()[0] if run.output else ''}")
    print(f"images on disk:        {written:,}; exit code {run.exit_code}    "
          f"{verdict(checks['complete'])}")
    print(f"wall time:             {run.wall:.2f} s; ideal jobs/{total_cap} x L {ideal:.2f} s "
          f"(from the latencies drawn: {realized:.2f} s)")
    print(f"ratio wall/ideal:      {ratio:.3f} (target <= {WALL_TARGET:.2f}; vs drawn "
          f"latencies {run.wall / realized:.3f})    {verdict(checks['wall'])}")
    print(f"baseline, one account of cap {total_cap}: {baseline.wall:.2f} s "
          f"({baseline.wall / ideal:.3f} x ideal); the pool takes "
          f"{run.wall / baseline.wall:.3f} x the baseline")
    print(f"peak per account:      {min(peaks.values())}-{max(peaks.values())} (cap {CAP}); "
          f"submits per account {min(shares.values())}-{max(shares.values())}    "
          f"{verdict(checks['caps'])}")
    print(f"another account's key: {stats['foreign_polls']} polls, {stats['rejected_auth']} "
          f"refused; {stats['rejected_429']} answered 429    {verdict(checks['keys'])}")
    print(f"client CPU:            {run.cpu / run.wall:.3f} cores (render {run.own_cpu:.1f} s, "
          f"outbox {run.helper_cpu:.1f} s; {run.cpu * 1000 / jobs:.2f} ms/job; no target here)")
    print(f"polls per job:         {stats['polls'] / jobs:.2f}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
