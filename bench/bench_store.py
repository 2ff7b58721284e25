"""The shared store's cost: a render with `--store` against one without, in the same run.

1,000 images against the emulator (cap 24, mean latency L) in its own process, rendered twice
into fresh output roots: without a store (the baseline), then with an S3 store served by moto
on loopback, in a process of its own, which counts every request it answers. Then a null build
of the second root (with the store named), and a third root rendering the same recipe, which
takes everything from the store.

Targets (issue "Never pay twice across machines"):
  the render with a store ≤ 1.2 × the one without; ≤ 4 store requests per image bought;
  no store request at all in a null build.

Run:
  .venv/bin/python bench/bench_store.py            # 1,000 images, L = 2 s
  .venv/bin/python bench/bench_store.py --quick    # 200 images
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (tests.s3: the server)

WALL_TARGET = 1.2
REQUESTS_TARGET = 4.0


def _serve(conn: Connection) -> None:
    """The child process: moto's S3 on loopback, answering 'count' and 'stop'."""
    from tests.s3 import S3Server

    with S3Server(record_bodies=False) as s3:
        conn.send((s3.endpoint, s3.environ(), s3.bucket()))
        while (command := conn.recv()) != "stop":
            if command == "count":  # by method, the store's marker apart (once a run)
                conn.send(Counter("marker" if request.path.endswith("/fluxbatch-store.json")
                                  else request.method for request in list(s3.requests)))


class S3Process:
    def __enter__(self) -> S3Process:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        if not self._conn.poll(60):
            raise RuntimeError("the S3 server did not start")
        self.endpoint, self.environ, self.bucket = self._conn.recv()
        return self

    def count(self) -> Counter[str]:
        self._conn.send("count")
        found: Counter[str] = self._conn.recv()
        return found

    def __exit__(self, *exc: Any) -> None:
        self._conn.send("stop")
        self._process.join(10)


def main() -> int:
    parser = render_parser(__doc__, 1000, "images to render", "200 images: a smoke run")
    args = parser.parse_args()
    jobs = 200 if args.quick else args.jobs
    with work_dir() as tmp, S3Process() as s3, \
            EmulatorProcess(latency=args.latency, cap=CAP, seed=args.seed) as emulator:
        os.environ.update(s3.environ)
        url = f"s3://{s3.bucket}/team"
        roots = [tmp / name for name in ("plain", "stored", "third")]
        for root in roots:
            root.mkdir()
        recipes = [write_recipe(root, jobs) for root in roots]
        base = run_fluxbatch(recipes[0], emulator.base_url)
        before = s3.count()
        shared = run_fluxbatch(recipes[1], emulator.base_url, "--store", url)
        bought = s3.count() - before
        before = s3.count()
        null = run_fluxbatch(recipes[1], emulator.base_url, "--store", url)
        null_requests = sum((s3.count() - before).values())
        before = s3.count()
        third = run_fluxbatch(recipes[2], emulator.base_url, "--store", url)
        taken = s3.count() - before
        paid = emulator.stats()["submits"]
        for run in (base, shared, null, third):
            assert run.exit_code == 0, run.output
        assert all(count_images(root) == jobs for root in roots)
    ratio = shared.wall / base.wall
    per_image = _per_image(bought) / jobs
    print(f"{jobs:,} images, L = {args.latency} s, cap {CAP}; paid {paid:,} submits "
          f"({2 * jobs:,} expected: the plain root and the stored one)")
    print(f"without a store: {base.wall:.1f} s; with an S3 store: {shared.wall:.1f} s "
          f"= {ratio:.3f} × (target ≤ {WALL_TARGET}) {verdict(ratio <= WALL_TARGET)}")
    print(f"store requests while buying: {sum(bought.values()):,} ({_methods(bought)}): "
          f"{per_image:.3f} per image (target ≤ {REQUESTS_TARGET}) "
          f"{verdict(per_image <= REQUESTS_TARGET)}, and {bought['marker']} for the run (the "
          "store's marker, read, and created the first time)")
    print(f"null build with the store named: {null.wall:.2f} s, {null_requests} store "
          f"requests (target 0) {verdict(null_requests == 0)}")
    print(f"a third root taking all from the store: {third.wall:.1f} s, "
          f"{_per_image(taken) / jobs:.3f} store requests per image ({_methods(taken)}), "
          "nothing paid")
    return 0 if ratio <= WALL_TARGET and per_image <= REQUESTS_TARGET and null_requests == 0 \
        else 1


def _per_image(counts: Counter[str]) -> int:
    return sum(n for what, n in counts.items() if what != "marker")


def _methods(counts: Counter[str]) -> str:
    return ", ".join(f"{n:,} {method}" for method, n in sorted(counts.items()))


if __name__ == "__main__":
    sys.exit(main())
