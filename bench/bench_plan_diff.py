"""`plan --diff`: what reading the recipe at a git ref adds to a plan, and the comment of a
large change.

A git repository holds a recipe over a folder of photos (each in 2 looks) and a folder of
other files of the same size that the recipe does not read (committed renders, say); the
working tree changes one look. Whole processes, each figure beside `plan` of the same
recipe in the same run (which reads the photos once, as the diff reads them twice: at the
ref and in the working tree):

- `plan --diff HEAD` (text), wall and CPU, as a ratio to `plan`, and the export's rate
  (the tree at the ref, written to a temporary folder, in MB/s of wall time beyond `plan`);
- `plan --diff HEAD --format markdown` of a change of 20,000 images: its wall time and the
  comment's size (at most 65,536 bytes).

No target: the export grows with the tree at the ref (about a second per 100 MB on a
quiet machine), which is what these figures show.

Run: .venv/bin/python bench/bench_plan_diff.py [--photos 1000] [--others 1000]  (about 1 min)
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

from bench_inputs import make_photos
from bench_scale import measure
from harness import ensure_bytecode, work_dir

GIT = ("git", "-c", "user.name=bench", "-c", "user.email=bench@example.com",
       "-c", "commit.gpgsign=false")


def git(repo: Path, *arguments: str) -> None:
    subprocess.run([*GIT, *arguments], cwd=repo, check=True, capture_output=True)


def recipe(name: str, defaults: str, job: str) -> str:
    return f"""\
version: 1
name: {name}
provider: emulator
max_jobs: 100000
defaults: {{{defaults}}}
jobs:
{job}"""


def photo_recipe(looks: str) -> str:
    """Each photo in each look: every photo is an image input."""
    return recipe("bench-diff", "model: flux-kontext-pro, output_format: jpeg", f"""\
  - name: looks
    prompt: "product {{{{ photo.stem }}}} as {{{{ look }}}}"
    matrix: {{photo: {{files: "photos/*.jpg"}}, look: {looks}}}
    params: {{input_image: "{{{{ photo }}}}"}}
    output: "{{{{ look | slug }}}}/{{{{ photo.stem }}}}.{{{{ ext }}}}"
""")


def big_recipe(width: int) -> str:
    """Each subject in 10 styles, twice: 20 images a subject."""
    styles = "[ink, oil, pencil, watercolor, charcoal, pastel, gouache, pixel art, neon, clay]"
    return recipe("bench-big", f"model: flux-pro-1.1, width: {width}, height: 512, "
                  "output_format: png", f"""\
  - name: grid
    prompt: "a {{{{ subject }}}} in {{{{ style }}}} style"
    matrix: {{subject: {{from: subjects.txt}}, style: {styles}}}
    replicates: 2
""")


def fluxbatch(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "fluxbatch", *arguments]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--others", type=int, default=1000)
    args = parser.parse_args()
    ensure_bytecode()
    with work_dir(None) as tmp:
        repo = tmp / "repo"
        repo.mkdir()
        size = make_photos(repo / "photos", args.photos)
        size += make_photos(repo / "committed-renders", args.others, seed=2)
        (repo / "recipe.yaml").write_text(photo_recipe("[watercolor, pencil sketch]"))
        git(repo, "init", "-q")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "base")
        (repo / "recipe.yaml").write_text(photo_recipe("[watercolor, charcoal]"))
        recipe = str(repo / "recipe.yaml")
        measure(fluxbatch("plan", recipe))  # (the facts cache is warm for both, as in CI)
        _, plan_wall, plan_cpu, _ = measure(fluxbatch("plan", recipe))
        _, diff_wall, diff_cpu, _ = measure(fluxbatch("plan", recipe, "--diff", "HEAD"))
        megabytes = size / 1e6
        print(f"tree at the ref: {args.photos + args.others:,} files, {megabytes:,.0f} MB "
              f"({args.photos:,} photos the recipe reads)")
        print(f"plan:        {plan_wall:6.2f} s wall, {plan_cpu:6.2f} s CPU")
        print(f"plan --diff: {diff_wall:6.2f} s wall, {diff_cpu:6.2f} s CPU "
              f"({diff_wall / plan_wall:.1f}× plan's wall; the export at "
              f"{megabytes / max(diff_wall - plan_wall, 1e-9):,.0f} MB/s)")

        big = tmp / "big"
        big.mkdir()
        rng = random.Random(3)
        (big / "subjects.txt").write_text("".join(f"subject {n}\n" for n in range(1000)))
        (big / "recipe.yaml").write_text(big_recipe(768))
        git(big, "init", "-q")
        git(big, "add", "-A")
        git(big, "commit", "-qm", "base")
        kept = sorted(rng.sample(range(1000), 900))
        (big / "subjects.txt").write_text("".join(f"subject {n}\n" for n in kept) +
                                          "".join(f"subject {n}\n" for n in range(1000, 1100)))
        (big / "recipe.yaml").write_text(big_recipe(1024))
        comment = tmp / "comment.md"
        with open(comment, "w") as out:
            start = os.times()
            subprocess.run(fluxbatch("plan", str(big / "recipe.yaml"), "--diff", "HEAD",
                                     "--format", "markdown"), stdout=out, check=True)
            end = os.times()
        cpu = (end.children_user - start.children_user) + \
            (end.children_system - start.children_system)
        print(f"markdown of a 22,000-image change: {cpu:.2f} s CPU, "
              f"{comment.stat().st_size:,} bytes (limit 65,536)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
