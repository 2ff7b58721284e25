"""Plan and render a recipe from Python: the quickstart, against the bundled emulator.

    .venv/bin/python examples/api/render_quickstart.py [RECIPE]

It prints what the plan holds, renders what is missing with a line per finished image, and
exits non-zero unless every image is in place. Run it twice: the second run renders nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fluxbatch


def main(path: str) -> int:
    try:
        planned = fluxbatch.plan(path)
    except fluxbatch.RecipeError as error:
        for problem in error.problems:  # each with .file, .line, .column, .path, .message
            print(f"{problem.file}:{problem.line}: {problem.message}", file=sys.stderr)
        return 1
    print(f"{planned.recipe.name}: {len(planned.jobs)} images, {planned.counts()}")
    for job in planned.jobs:
        if job.action != "skip":
            print(f"  {job.action:<7} {job.output}  seed {job.seed}  key {job.key[:12]}")
        if job.changes:  # a stale image: what changed, field by field, as `plan` says it
            print(f"          changed: {'; '.join(job.changes)}")

    def on_event(event: fluxbatch.Event) -> None:
        if event.kind in ("written", "failed", "moderated", "unknown"):
            print(f"  {event.kind:<9} {event.job.output}")

    report = fluxbatch.render(planned, on_event=on_event)  # the very plan printed above
    spent = report.spent_usd()
    print(f"ok: {report.ok}; spent {'nothing' if spent is None else f'${spent:.2f}'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "quickstart" / "recipe.yaml"
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(default)))
