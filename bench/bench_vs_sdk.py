"""fluxbatch versus the obvious alternative: a loop over the official `blackforest` SDK
(0.1.3), the same jobs against the same emulator, measured in the same run.

Target (issue "Render: providers, async executor, state store"): fluxbatch at least 10×
faster on 200 jobs. The SDK loop is what its README suggests — one client, `generate(...)`
with `ClientConfig(sync=True)` (it polls `get_result` every second until Ready), then the
image fetched from the `sample` URL and written to a file, one job after another. Run:
  .venv/bin/pip install -e '.[bench]'
  .venv/bin/python bench/bench_vs_sdk.py             # 200 jobs, L = 2 s (SDK ≈ 8 min)
  .venv/bin/python bench/bench_vs_sdk.py --quick     # 40 jobs
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Any

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

SPEEDUP_TARGET = 10.0


def sdk_loop(base_url: str, jobs: list[dict[str, Any]], out: Path) -> None:
    """What a user writes with the SDK: sequential, as its README shows."""
    import requests
    from blackforest import BFLClient
    from blackforest.types.general.client_config import ClientConfig

    client = BFLClient(api_key="emulator", base_url=base_url)
    config = ClientConfig(sync=True)
    out.mkdir(parents=True, exist_ok=True)
    for index, inputs in enumerate(jobs):
        response = client.generate(MODEL, inputs, config)
        image = requests.get(response.result["sample"], timeout=60)
        image.raise_for_status()
        (out / f"{index:05d}.jpg").write_bytes(image.content)


def main() -> int:
    parser = render_parser(__doc__, 200, "images for each side", "40 jobs instead of --jobs")
    args = parser.parse_args()
    jobs = 40 if args.quick else args.jobs

    with work_dir() as tmp, EmulatorProcess(latency=args.latency, cap=CAP,
                                            seed=args.seed) as emulator:
        ours_dir, theirs_dir = tmp / "fluxbatch", tmp / "sdk"
        ours_dir.mkdir()
        recipe = write_recipe(ours_dir, jobs)
        requests = planned_requests(recipe)  # the SDK renders exactly the same bodies
        ours = run_fluxbatch(recipe, emulator.base_url)
        written = count_images(ours_dir)
        after_ours = emulator.stats()
        # The SDK prints a line per poll; a user would see them scroll by.
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            sdk_loop(emulator.base_url, requests, theirs_dir)
        theirs = time.perf_counter() - start
        after_theirs = emulator.stats()
        sdk_written = sum(1 for _ in theirs_dir.glob("*.jpg"))

    speedup = theirs / ours.wall
    ok_complete = ours.exit_code == 0 and written == jobs and sdk_written == jobs
    sdk_polls = after_theirs["polls"] - after_ours["polls"]
    print(f"jobs:                        {jobs:,} each (emulator: cap {CAP}, mean latency "
          f"{args.latency:g} s, separate process)")
    print(f"images on disk:              fluxbatch {written:,}, SDK loop {sdk_written:,}    "
          f"{verdict(ok_complete)}")
    print(f"fluxbatch render:            {ours.wall:.2f} s ({after_ours['polls'] / jobs:.2f} "
          "polls/job)")
    print(f"blackforest SDK loop:        {theirs:.2f} s ({sdk_polls / jobs:.2f} polls/job)")
    print(f"speed-up SDK/fluxbatch:      {speedup:.1f}× (target >= {SPEEDUP_TARGET:g}×)    "
          f"{verdict(speedup >= SPEEDUP_TARGET)}")
    return 0 if ok_complete and speedup >= SPEEDUP_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
