"""Image inputs at scale: a folder of 250, then 1,000 photos, each in 2 looks.

Each figure is the CPU time (user + system, with the outbox's) and peak memory of a whole
`fluxbatch` process, and each is set against the same recipe without
image inputs (the same prompts), measured in the same run:

- `plan` with nothing known of the photos (every file read, sniffed and hashed once), and
  again after a render (their facts come from the cache in `.fluxbatch/inputs.json`: no
  file is read);
- `render` against the emulator in its own process (cap 24): peak memory, beside the total
  size of the photos, which it must never hold at once;
- the null build after it.

Targets, at 1,000 photos: a warm plan and a null build within 1.5 × the recipe without
inputs (only a stat of each photo is added). Memory: the render's peak beyond the
baseline's may hold the inputs in flight, but must not grow with the folder: from 250 to
1,000 photos it grows by less than 10% of the added photos' size.

Run: .venv/bin/python bench/bench_inputs.py [--photos 250 1000] [--looks 2]  (about 6 min)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

from bench_scale import measure
from harness import EmulatorProcess, ensure_bytecode, verdict, work_dir

LOOKS = ["watercolor", "pencil sketch", "oil painting", "claymation", "pixel art", "neon",
         "blueprint", "ukiyo-e", "stained glass", "origami", "mosaic", "charcoal"]
SIDE = 256  # what each job asks for: small, so the emulator is cheap


def make_photos(folder: Path, count: int, seed: int = 1) -> int:
    """`count` JPEG photos of 640×480 noise (about 150 KB each, as noise barely compresses);
    returns their total size in bytes."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = random.Random(seed)
    total = 0
    for i in range(count):
        image = Image.frombytes("RGB", (640, 480), rng.randbytes(640 * 480 * 3))  # noise
        path = folder / f"product-{i:05d}.jpg"
        image.save(path, "JPEG", quality=85)
        total += path.stat().st_size
    return total


def write_recipe(folder: Path, looks: int, *, inputs: bool, photos: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = "    params: {input_image: \"{{ photo }}\"}\n" if inputs else ""
    path = folder / "recipe.yaml"
    path.write_text(f"""\
version: 1
name: bench-inputs
provider: emulator
max_jobs: 100000
defaults: {{model: flux-2-klein-4b, width: {SIDE}, height: {SIDE}, output_format: jpeg}}
jobs:
  - name: looks
    prompt: "product {{{{ photo.stem }}}} as {{{{ look }}}}"
    matrix:
      photo: {{files: "{photos}/*.jpg"}}
      look: {LOOKS[:looks]!r}
{image}    output: "{{{{ look | slug }}}}/{{{{ photo.stem }}}}.{{{{ ext }}}}"
""", encoding="utf-8")
    return path


def measure_root(tmp: Path, photos: int, looks: int, *, inputs: bool,
                 repeat: int) -> dict[str, tuple[float, int]]:
    """(CPU seconds, peak RSS in KiB) of each step, for one recipe in a folder of its own.
    CPU, not wall time: this machine may be busy, and what a step costs is its CPU. Plans and
    null builds change nothing, so each is run `repeat` times and the median kept."""
    fluxbatch = [sys.executable, "-m", "fluxbatch"]
    label = f"{'with' if inputs else 'without'}-{photos}"
    recipe = write_recipe(tmp / label, looks, inputs=inputs, photos=f"../photos-{photos}")
    plan = [*fluxbatch, "plan", str(recipe), "--yes"]

    def median_of(command: list[str]) -> tuple[float, int]:
        runs = []
        for _ in range(repeat):
            code, _, cpu, rss = measure(command)
            assert code == 0, f"{' '.join(command[2:4])} failed ({label})"
            runs.append((cpu, rss))
        return statistics.median(cpu for cpu, _ in runs), max(rss for _, rss in runs)

    row: dict[str, tuple[float, int]] = {"plan, cold": median_of(plan)}
    with EmulatorProcess(latency=0.05, latency_sigma=0.1, cap=24, model_caps={}) as emulator:
        render = [*fluxbatch, "render", str(recipe), "-q", "--yes", "--base-url",
                  emulator.base_url]
        code, _, cpu, rss = measure(render)
        assert code == 0, f"render failed ({label})"
        row["render"] = (cpu, rss)
        sent = emulator.stats()["submits"]
        assert sent == photos * looks, f"{sent} submits for {photos * looks} images ({label})"
        row["plan, warm"] = median_of(plan)
        row["null build"] = median_of(render)
        assert emulator.stats()["submits"] == sent, "the null build paid"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, nargs=2, default=[250, 1000],
                        metavar=("SMALL", "LARGE"))
    parser.add_argument("--looks", type=int, default=2, choices=range(1, len(LOOKS) + 1))
    parser.add_argument("--repeat", type=int, default=3, help="runs of each plan and null build")
    parser.add_argument("--keep", metavar="DIR", help="keep the projects here")
    args = parser.parse_args()
    ensure_bytecode()
    small, large = args.photos
    with work_dir(args.keep) as tmp:
        (tmp / ".git").mkdir(exist_ok=True)  # the project: the photos and the recipes
        sizes = {count: make_photos(tmp / f"photos-{count}", count) for count in (small, large)}
        rows = {}
        for count in (small, large):
            print(f"{count:,} photos ({sizes[count] / 2**20:.0f} MiB) × {args.looks} looks = "
                  f"{count * args.looks:,} images", flush=True)
            for inputs in (True, False):
                rows[count, inputs] = measure_root(tmp, count, args.looks, inputs=inputs,
                                                     repeat=args.repeat)
            print(f"  {'CPU':<12}{'with inputs':>22}{'without':>22}{'ratio':>8}")
            for step in ("plan, cold", "plan, warm", "render", "null build"):
                (a, a_rss), (b, b_rss) = rows[count, True][step], rows[count, False][step]
                print(f"  {step:<12}{a:>10.2f} s {a_rss / 1024:>6.0f} MiB"
                      f"{b:>10.2f} s {b_rss / 1024:>6.0f} MiB{a / b:>8.2f}", flush=True)
        warm = rows[large, True]["plan, warm"][0] / rows[large, False]["plan, warm"][0]
        null = rows[large, True]["null build"][0] / rows[large, False]["null build"][0]
        held = {count: (rows[count, True]["render"][1] - rows[count, False]["render"][1]) / 1024
                for count in (small, large)}
        growth = held[large] - held[small]
        retained = (sizes[large] - sizes[small]) / 2**20
        print(f"warm plan at {large:,} photos: {warm:.2f} × the recipe without inputs "
              f"(target <= 1.5)    {verdict(warm <= 1.5)}")
        print(f"null build at {large:,} photos: {null:.2f} × (target <= 1.5)    "
              f"{verdict(null <= 1.5)}")
        print(f"render's peak memory beyond the baseline: {held[small]:.0f} MiB at {small:,} "
              f"photos, {held[large]:.0f} MiB at {large:,}: {growth:+.0f} MiB for "
              f"{retained:.0f} MiB more photos (target < 10% of that, {retained / 10:.0f} MiB: "
              f"inputs held only in flight)    {verdict(growth < retained / 10)}")
        return 0 if warm <= 1.5 and null <= 1.5 and growth < retained / 10 else 1


if __name__ == "__main__":
    sys.exit(main())
