"""`fluxbatch gallery RECIPE`: an HTML contact sheet of the rendered images, any two matrix
variables as rows and columns (the others, and replicates, share a cell)."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxbatch.errors import EXIT_OK, FluxbatchError
from fluxbatch.expand import Job
from fluxbatch.plan import UP_TO_DATE, classify, load_plan
from fluxbatch.state import manifest_name, read_state
from fluxbatch.write import atomic_write

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #f6f6f4; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 32px; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: 6px;
vertical-align: top; background: #fff; } th { background: #eee; font-weight: 600; }
.cell { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; } img { width: 200px; display: block; border-radius: 3px; }
figcaption { font-size: 12px; color: #555; max-width: 200px; } .missing { color: #b00; }
"""


def gallery(*, recipe: str, out: str | None, yes: bool, rows: str | None, cols: str | None,
            output: str | None) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    root = plan.recipe.output_root
    root_state = read_state(root, plan.recipe.name, plan.jobs)
    records = root_state.placements
    classified = classify(plan, root_state)
    target = Path(output) if output else root / gallery_name(plan.recipe.name)
    sections = []
    by_job: dict[str, list[tuple[Job, str]]] = {}
    for job, state in zip(plan.jobs, classified.states, strict=True):
        by_job.setdefault(job.job, []).append((job, state))
    for name, jobs in by_job.items():
        axes = _varying(jobs)
        row_axis = rows if rows in axes else (axes[0] if axes else None)
        col_axis = cols if cols in axes and cols != row_axis else _crossing(jobs, axes, row_axis)
        sections.append(_section(name, jobs, row_axis, col_axis, records, root, target))
    done = sum(1 for s in classified.states if s == UP_TO_DATE)
    if not done:
        raise FluxbatchError(f"nothing rendered yet in {root}: run `fluxbatch render` first")
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(plan.recipe.name)}</title>"
            f"<style>{STYLE}</style><h1>{html.escape(plan.recipe.name)}: {done} of "
            f"{len(plan.jobs)} images</h1>" + "".join(sections))
    atomic_write(target, page.encode("utf-8"))
    print(f"wrote {target} ({done} images)")
    return EXIT_OK


def _varying(jobs: Sequence[tuple[Job, str]]) -> list[str]:
    names: list[str] = []
    for job, _ in jobs:
        names.extend(k for k in job.vars if k not in names)
    return [n for n in names if len({repr(job.vars.get(n)) for job, _ in jobs}) > 1]


def _crossing(jobs: Sequence[tuple[Job, str]], axes: list[str],
              row_axis: str | None) -> str | None:
    """The variable that best crosses the rows: the one filling most cells (one from the same
    CSV row or zip group would make a diagonal table)."""
    others = [a for a in axes if a != row_axis]
    if row_axis is None or not others:
        return others[0] if others else None
    rows = len(_values(jobs, row_axis))

    def fill(axis: str) -> float:
        pairs = {(repr(j.vars.get(row_axis)), repr(j.vars.get(axis))) for j, _ in jobs}
        return len(pairs) / (rows * len(_values(jobs, axis)))

    return max(others, key=fill)  # the first of the best: max keeps the earliest on ties


def _section(name: str, jobs: Sequence[tuple[Job, str]], row_axis: str | None,
             col_axis: str | None, records: Any, root: Path, target: Path) -> str:
    row_values = _values(jobs, row_axis)
    col_values = _values(jobs, col_axis)
    cells: dict[tuple[str, str], list[str]] = {}
    for job, state in jobs:
        key = (_text(job.vars.get(row_axis, "")) if row_axis else "",
               _text(job.vars.get(col_axis, "")) if col_axis else "")
        cells.setdefault(key, []).append(_figure(job, state, records, root, target,
                                                 {row_axis, col_axis}))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in col_values)
    body = ""
    for row in row_values:
        body += f"<tr><th>{html.escape(row)}</th>" + "".join(
            f"<td><div class=cell>{''.join(cells.get((row, col), []))}</div></td>"
            for col in col_values) + "</tr>"
    title = f"{name}" + (f": {row_axis} × {col_axis}" if row_axis and col_axis else "")
    corner = html.escape(f"{row_axis or ''} \\ {col_axis or ''}")
    return f"<h2>{html.escape(title)}</h2><table><tr><th>{corner}</th>{head}</tr>{body}</table>"


def _values(jobs: Sequence[tuple[Job, str]], axis: str | None) -> list[str]:
    if axis is None:
        return [""]
    seen: list[str] = []
    for job, _ in jobs:
        value = _text(job.vars.get(axis, ""))
        if value not in seen:
            seen.append(value)
    return seen


def _figure(job: Job, state: str, records: Any, root: Path, target: Path,
            shown: set[str | None]) -> str:
    others = [f"{k}={_text(v)}" for k, v in job.vars.items() if k not in shown]
    caption = html.escape(", ".join([*others, f"#{job.replicate}", f"seed {job.seed}"]))
    if state != UP_TO_DATE:
        return f"<figure><figcaption class=missing>{html.escape(state)}: {caption}" \
               "</figcaption></figure>"
    placement = records.get(job.output)
    path = root / (placement.path if placement else job.output)
    source = html.escape(os.path.relpath(path, target.parent))
    prompt = html.escape(job.prompt or "")
    return (f'<figure><a href="{source}"><img loading=lazy src="{source}" alt="{prompt}" '
            f'title="{prompt}"></a><figcaption>{caption}</figcaption></figure>')


def gallery_name(recipe: str) -> str:
    """`<recipe>.gallery.html`, beside `<recipe>.manifest.json`: recipes sharing a folder each
    have their own."""
    return manifest_name(recipe).removesuffix(".manifest.json") + ".gallery.html"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
