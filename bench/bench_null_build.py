"""The null build: `fluxbatch render` on 10,000 up-to-date images, beside `make -q` on 10,000
up-to-date targets, measured in the same run (whole processes, interpreter start-up included).

Targets (issue "Full speed through shedding gateways, and a null build near make"): under
0.3 s of CPU at 10,000 images, under 2.5 s at 100,000 (`--images 100000`), without hashing
every file (size + mtime is the fast path). The first render after the root is built keeps
the plan (`.fluxbatch/plan.<recipe>.json`) and is not counted; the null builds counted read
it back. One null build without it (the first after any edit: the plan is expanded again)
is printed too. The verdict is taken on CPU time (user + system), which a busy machine does
not inflate the way it does wall time; both are printed. Run:
`.venv/bin/python bench/bench_null_build.py [--images 10000] [--repeat 5]`
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ensure_bytecode

RECIPE = """\
version: 1
name: nullbuild
provider: emulator
max_jobs: 1000000
output: "{{{{ job }}}}/{{{{ a }}}}/{{{{ b }}}}.{{{{ ext }}}}"
defaults:
  model: flux-dev
  output_format: png
jobs:
  - name: grid
    prompt: "{{{{ a }}}} and {{{{ b }}}}"
    matrix:
      a: [{a}]
      b: [{b}]
"""
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def build(root: Path, images: int) -> Path:
    """An output root whose store says every image is written (as a render would leave it)."""
    from fluxbatch.front import load_plan
    from fluxbatch.state.store import Store
    from fluxbatch.write import write_manifest

    side = int(images ** 0.5)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(a=", ".join(f"a{i}" for i in range(side)),
                                    b=", ".join(f"b{i}" for i in range(images // side))))
    plan = load_plan(str(recipe))
    digest = hashlib.sha256(PNG).hexdigest()
    with Store.open(root) as store, store.transaction():
        store.use(plan.recipe.name, plan.recipe.path)
        for job in plan.jobs:
            target = root / job.output
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(PNG)
            entry = {"path": job.output, "output": job.output, "key": job.key,
                     "sha256": digest, "bytes": len(PNG)}
            store.placed(plan.recipe.name, job.output, job.key, entry,
                         os.stat(target).st_mtime_ns)
    with Store.open(root) as store:
        write_manifest(plan.recipe, store)
    return recipe


def make_tree(root: Path, targets: int) -> Path:
    makefile = root / "Makefile"
    (root / "src").write_text("source\n")
    lines = [f"all: {' '.join(f'out/t{i}' for i in range(targets))}\n"]
    lines.append("out/t%: src\n\tmkdir -p out && cp src $@\n")
    makefile.write_text("".join(lines))
    subprocess.run(["make", "-s", "-C", str(root), "-j2"], check=True)
    return makefile


def timed(command: list[str], *, expect: int) -> tuple[float, float]:
    """Wall and CPU seconds of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != expect:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n"
                         f"{result.stdout.decode()}{result.stderr.decode()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("make") is None:
        raise SystemExit("make is not installed")
    ensure_bytecode()  # as an installed package has it: else each start compiles them again
    with tempfile.TemporaryDirectory() as tmp:
        ours_root, make_root = Path(tmp) / "fluxbatch", Path(tmp) / "make"
        ours_root.mkdir()
        make_root.mkdir()
        recipe = build(ours_root, args.images)
        make_tree(make_root, args.images)
        render = [sys.executable, "-m", "fluxbatch", "render", str(recipe), "-q"]
        verify = [*render, "--verify"]
        make_q = ["make", "-q", "-C", str(make_root)]
        timed(render, expect=0)  # (keeps the plan: a warm-up, not counted)
        ours = [timed(render, expect=0) for _ in range(args.repeat)]
        theirs = [timed(make_q, expect=0) for _ in range(args.repeat)]
        verified, _ = timed(verify, expect=0)
        (ours_root / ".fluxbatch" / "plan.nullbuild.json").unlink()
        expanded, expanded_cpu = timed(render, expect=0)  # (and keeps it again)
    ours_s, make_s = (statistics.median(wall for wall, _ in ours),
                      statistics.median(wall for wall, _ in theirs))
    ours_cpu = statistics.median(cpu for _, cpu in ours)
    print(f"up-to-date images:                 {args.images:,}")
    print(f"fluxbatch render (null build):     {ours_s:.3f} s wall, {ours_cpu:.3f} s CPU "
          f"(medians of {args.repeat}, interpreter start-up included)")
    print(f"make -q on {args.images:,} targets:       {make_s:.3f} s wall")
    print(f"ratio fluxbatch / make -q:         {ours_s / make_s:.2f}")
    print(f"fluxbatch render --verify (sha256 of every file): {verified:.3f} s wall")
    print(f"without the plan cache (expanded again): {expanded:.3f} s wall, "
          f"{expanded_cpu:.3f} s CPU")
    target = TARGETS.get(args.images)
    if target is None:
        print(f"target: none for {args.images:,} images (10,000: 0.3 s; 100,000: 2.5 s)")
        return 0
    print(f"target: under {target:g} s of CPU -> {'PASS' if ours_cpu < target else 'FAIL'}")
    return 0 if ours_cpu < target else 1


TARGETS = {10_000: 0.3, 100_000: 2.5}  # images → seconds of CPU


if __name__ == "__main__":
    sys.exit(main())
