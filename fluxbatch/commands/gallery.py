"""`fluxbatch gallery RECIPE`: a contact sheet of the rendered images, as an HTML page and,
with `--png FILE`, as one PNG image.

Each job is a table with two matrix variables as rows and columns (the others, and the
replicates, share a cell), or, with one variable or none, a strip of labelled slots that
wraps. Images not rendered yet and combinations the matrix's `exclude` removed are marked.
This module decides what goes where; `contact_sheet` draws it.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from fluxbatch.commands.contact_sheet import (
    MAX_THUMB,
    MIN_THUMB,
    Group,
    Label,
    Mark,
    Png,
    Sheet,
    Tile,
    html_page,
    png_sheet,
)
from fluxbatch.commands.output import plural, short_value, values_text
from fluxbatch.errors import EXIT_OK, FluxbatchError, UsageError
from fluxbatch.front import load_plan, read
from fluxbatch.jobs import Job, Plan
from fluxbatch.layout import BLOBS, STATE_DIR, manifest_name
from fluxbatch.models import did_you_mean
from fluxbatch.recipe import JobSpec
from fluxbatch.selection import ImageState, source_placement
from fluxbatch.state.blobs import blob_path, has_blob
from fluxbatch.state.root import RootState
from fluxbatch.write import atomic_write

if TYPE_CHECKING:
    from fluxbatch.commands.diff import Difference

ABSENT = "\x00absent"  # the key of a variable that a combination does not have


@dataclass(frozen=True, slots=True)
class _Item:
    """A planned image, or (with `job` None) a combination that `exclude` removed."""

    values: Mapping[str, object]
    job: Job | None
    state: str  # its `ImageState`, or "excluded"
    path: str | None = None  # an up-to-date image's file, relative to the output root
    rule: int | None = None  # the index of the exclude entry that removed it


def gallery(*, recipe: str, out: str | None, yes: bool, rows: str | None, cols: str | None,
            output: str | None, png: str | None, replicates: str, thumb: int) -> int:
    if not MIN_THUMB <= thumb <= MAX_THUMB:
        raise UsageError(f"gallery --thumb: {thumb} is not between {MIN_THUMB} and "
                         f"{MAX_THUMB} (pixels)")
    plan = load_plan(recipe, out=out, yes=yes)
    _check_axes(_variables(plan), rows, cols)
    root = plan.recipe.output_root
    found = read(plan)
    root_state, states = found.state, found.classified.states
    up_to_date = ImageState.UP_TO_DATE
    done = sum(1 for s in states if s == up_to_date)
    if not done:
        raise FluxbatchError(f"nothing rendered yet in {root}: run `fluxbatch render` first")
    items: dict[str, list[_Item]] = {spec.name: [] for spec in plan.recipe.jobs}
    for job, state in zip(plan.jobs, states, strict=True):
        # the placed file: its extension follows the real format, not always the planned one
        placement = root_state.placements.get(job.output)
        path = (placement.path if placement else job.output) if state == up_to_date else None
        items[job.job].append(_Item(job.vars, job, state, path))
    for name, removed in plan.removed:
        items[name].append(_Item(removed.values, None, "excluded", rule=removed.exclude))
    sheets = [_sheet(plan.recipe.job(name), found, rows, cols, root)
              for name, found in items.items() if found]
    heading = f"{plan.recipe.name}: {done:,} of {plural(len(plan.jobs), 'image')}"
    across = replicates == "across"
    # drawn before anything is written: a sheet too large for one PNG writes nothing
    picture = png_sheet(heading, sheets, thumb=thumb, across=across) if png else None
    target = Path(output) if output else root / gallery_name(plan.recipe.name)
    page = html_page(plan.recipe.name, heading, sheets, thumb=thumb, across=across,
                     href=_href(target))
    _write(target, page, png, picture, thumb, plural(done, "image"))
    return EXIT_OK


def _write(target: Path, page: str, png: str | None, picture: Png | None, thumb: int,
           what: str) -> None:
    atomic_write(target, page.encode("utf-8"))
    print(f"wrote {target} ({what})")
    if png and picture:
        atomic_write(Path(png), picture.data)
        shrunk = f"; {picture.thumb} px thumbnails, to fit" if picture.thumb < thumb else ""
        print(f"wrote {png} ({picture.width:,} × {picture.height:,} px{shrunk})")


def _href(target: Path) -> Callable[[Path], str]:
    return lambda path: quote(Path(os.path.relpath(path, target.parent)).as_posix())


def gallery_name(recipe: str) -> str:
    """`<recipe>.gallery.html`, beside `<recipe>.manifest.json`: recipes sharing a folder each
    have their own."""
    return manifest_name(recipe).removesuffix(".manifest.json") + ".gallery.html"


# -- before and after: `gallery --diff REF` -------------------------------------------------


def gallery_diff(*, recipe: str, out: str | None, yes: bool, ref: str, output: str | None,
                 png: str | None, thumb: int) -> int:
    """A sheet of the images that differ from the recipe at `ref`: a row each, the image
    before (by its old key, from the output root's files or its content store) and after
    (once rendered). Added and removed images are marked, and so is an image that is not
    there: "not rendered yet", "not in the store"."""
    from fluxbatch.commands.diff import diff_at

    if not MIN_THUMB <= thumb <= MAX_THUMB:
        raise UsageError(f"gallery --thumb: {thumb} is not between {MIN_THUMB} and "
                         f"{MAX_THUMB} (pixels)")
    diff = diff_at(recipe, ref, out=out, yes=yes)
    plan, root = diff.plan, diff.plan.recipe.output_root
    changed = diff.changed
    by_job: dict[str, list[Difference]] = {}
    for difference in changed:
        by_job.setdefault(difference.image.job, []).append(difference)
    images = _Images(root, diff.state)
    before = f"before ({diff.base.ref})"
    sheets = [_diff_sheet(name, found, before, images) for name, found in by_job.items()]
    heading = (f"{plan.recipe.name}: {plural(len(changed), 'image')} "
               f"{'differs' if len(changed) == 1 else 'differ'} from {diff.base.ref} "
               f"({diff.base.short})")
    picture = png_sheet(heading, sheets, thumb=thumb, across=True) if png else None
    target = Path(output) if output else \
        root / gallery_name(plan.recipe.name).replace(".gallery.", ".gallery-diff.")
    page = html_page(plan.recipe.name, heading, sheets, thumb=thumb, across=True,
                     href=_href(target))
    said = f"{plural(len(changed), 'image')}, {images.shown:,} of them with a picture " \
        "before or after" if changed else f"no image differs from {diff.base.ref}"
    _write(target, page, png, picture, thumb, said)
    return EXIT_OK


class _Images:
    """The file that holds the image of a key in the output root, if any: a placed file
    that is still the one written (any recipe's, at a path that may be read), else its bytes
    in the content store (only through real folders: never a link out of the root)."""

    def __init__(self, root: Path, state: RootState) -> None:
        self.root, self.state = root, state
        self.shown = 0  # images with a picture before or after

    def of(self, key: str) -> Path | None:
        placement = source_placement(key, self.state, self.root)
        if placement is not None:
            return self.root / placement.path
        task = self.state.tasks.get(key)
        if not has_blob(self.root, task):
            return None
        assert task is not None and task.blob is not None
        path = blob_path(self.root, task.blob)
        inside = os.path.join(os.path.realpath(self.root), STATE_DIR, BLOBS, task.blob[:2],
                              task.blob)
        return path if os.path.realpath(path) == inside else None


def _diff_sheet(name: str, found: Sequence[Difference], before: str, images: _Images) -> Sheet:
    counts = Counter(str(d.change) for d in found)
    summary = ", ".join(f"{n:,} {change}" for change, n in counts.items())
    rows, cells = [], {}
    for i, difference in enumerate(found):
        # (the file's name: a row's label is cut at a width, and a job's folder is shared)
        rows.append(Label(posixpath.basename(difference.image.output), _diff_notes(difference)))
        pictures = [_before(difference, images), _after(difference, images)]
        if any(tile.kind is Mark.IMAGE for tile in pictures):
            images.shown += 1
        for j, tile in enumerate(pictures):
            cells[(i, j)] = ((tile,),)
    return Sheet(f"{name}: {plural(len(found), 'image')} that "
                 f"{'differs' if len(found) == 1 else 'differ'}", summary, "image",
                 tuple(rows), (Label(before), Label("after")), cells)


def _diff_notes(difference: Difference) -> tuple[str, ...]:
    notes = [str(difference.change)]
    if difference.was is not None and difference.job is not None and \
            difference.was.output != difference.job.output:
        notes.append(f"from {difference.was.output}")
    else:
        notes.append(difference.image.output)
    notes.extend(difference.reasons)
    if difference.job is not None and difference.job.vars:
        notes.append(values_text(difference.job.vars))
    return tuple(notes)


def _before(difference: Difference, images: _Images) -> Tile:
    return _side(difference.was, difference.image, images, ("added", "not in the recipe before"),
                 ("not in the store", "no file or content store in this output root holds it"))


def _after(difference: Difference, images: _Images) -> Tile:
    return _side(difference.job, difference.image, images, ("removed", "no longer in the recipe"),
                 ("not rendered yet", "`fluxbatch render` makes it"))


def _side(job: Job | None, image: Job, images: _Images, absent: tuple[str, str],
          missing: tuple[str, str]) -> Tile:
    """One side of a row: the image of `job`, or a marker: `absent` (state, hint) when the
    recipe had no such image on this side, `missing` when no file holds it."""
    if job is None:
        return Tile(Mark.EXCLUDED, "", _shape(image.request), state=absent[0], hint=absent[1])
    return _picture(job, images.of(job.key), *missing)


def _picture(job: Job, path: Path | None, missing: str, why: str) -> Tile:
    caption = f"seed {job.seed}"
    if path is None:
        return Tile(Mark.MISSING, caption, _shape(job.request), state=missing, hint=why)
    return Tile(Mark.IMAGE, caption, _shape(job.request), path, hint=job.prompt or "")


def _variables(plan: Plan) -> list[str]:
    names: dict[str, None] = {}
    for spec in plan.recipe.jobs:
        names.update((n, None) for axis in spec.matrix.axes for n in axis.names)
    for job in plan.jobs:
        names.update((n, None) for n in job.vars)
    for _, removed in plan.removed:
        names.update((n, None) for n in removed.values)
    return list(names)


def _check_axes(names: list[str], rows: str | None, cols: str | None) -> None:
    unknown = [f"--{option} {name!r} is not a matrix variable{did_you_mean(name, names)}"
               for option, name in (("rows", rows), ("cols", cols))
               if name is not None and name not in names]
    if unknown:
        choices = f"choose from {', '.join(names)}" if names else \
            "the recipe's jobs have no matrix variables"
        raise UsageError(f"gallery: {'; '.join(unknown)}; {choices}")
    if rows is not None and rows == cols:
        raise UsageError(f"gallery: --rows and --cols both name {rows!r}; choose two "
                         f"different ones from {', '.join(names)}")


def _key(values: Mapping[str, object], name: str) -> str:
    if name not in values:
        return ABSENT
    return json.dumps(values[name], sort_keys=True, ensure_ascii=False, default=str)


def _label(values: Mapping[str, object], name: str) -> str:
    return short_value(values[name]) if name in values else "(none)"


class _Job:
    """One job's items, each variable's value keys worked out once, and the questions the
    layout asks of them."""

    def __init__(self, spec: JobSpec, items: Sequence[_Item]) -> None:
        self.spec, self.items = spec, items
        labels: dict[str, dict[str, str]] = {}  # name → value key → label, declared order
        for axis in spec.matrix.axes:
            for row in axis.rows:
                for name, value in zip(axis.names, row, strict=True):
                    labels.setdefault(name, {}).setdefault(_key({name: value}, name),
                                                           short_value(value))
        for item in items:
            for name in item.values:
                labels.setdefault(name, {})
        self.keys = [{name: _key(item.values, name) for name in labels} for item in items]
        for item, keys in zip(items, self.keys, strict=True):
            for name, key in keys.items():
                labels[name].setdefault(key, _label(item.values, name))
        self.present = {name: {keys[name] for keys in self.keys} for name in labels}
        self.values = {name: {key: text for key, text in texts.items()
                              if key in self.present[name]} for name, texts in labels.items()}
        self.varying = [name for name in labels if len(self.present[name]) > 1]

    def follows(self, name: str, axis: str) -> bool:
        """Whether each value of `axis` comes with one value of `name` (a CSV row's other
        columns, a zip partner): then `name` belongs beside the axis's label."""
        seen: dict[str, str] = {}
        return all(seen.setdefault(k[axis], k[name]) == k[name] for k in self.keys)

    def crossing(self, axis: str) -> str | None:
        """The variable that best crosses `axis`: the one filling most cells. One that follows
        from it (its zip partner, its CSV row's column) would only make a diagonal."""
        others = [a for a in self.varying if a != axis and not self.follows(a, axis)]

        def fill(other: str) -> float:
            pairs = {(k[axis], k[other]) for k in self.keys}
            return len(pairs) / (len(self.present[axis]) * len(self.present[other]))

        return max(others, key=fill) if others else None  # max keeps the first of the best

    def axes(self, rows: str | None, cols: str | None) -> tuple[str | None, str | None]:
        """(rows, columns); no rows means a strip along the columns' variable."""
        row = rows if rows in self.values else None
        col = cols if cols in self.values else None
        if row is None and col is None and self.varying:
            row = self.varying[0]
            col = self.crossing(row)
            return (row, col) if col else (None, row)
        if row is not None and col is None:
            col = self.crossing(row)
        elif col is not None and row is None:
            row = self.crossing(col)
        return row, col

    def labels(self, axis: str, notes: Sequence[str]) -> tuple[Label, ...]:
        first: dict[str, Mapping[str, object]] = {}
        for item, keys in zip(self.items, self.keys, strict=True):
            first.setdefault(keys[axis], item.values)
        return tuple(Label(text, tuple(f"{n}={_label(first[key], n)}" for n in notes
                                       if n in first[key]))
                     for key, text in self.values[axis].items())


def _sheet(spec: JobSpec, items: Sequence[_Item], rows: str | None, cols: str | None,
           root: Path) -> Sheet:
    job = _Job(spec, items)
    row, col = job.axes(rows, cols)
    rest = [n for n in job.varying if n not in (row, col)]
    row_notes = [n for n in rest if row and job.follows(n, row)]
    col_notes = [n for n in rest if n not in row_notes and col and job.follows(n, col)]
    free = [n for n in rest if n not in row_notes and n not in col_notes]
    row_at = {key: i for i, key in enumerate(job.values[row])} if row else {}
    col_at = {key: j for j, key in enumerate(job.values[col])} if col else {}
    shape = next((_shape(i.job.request) for i in items if i.job), (1, 1))
    cells: dict[tuple[int, int], dict[str, list[Tile]]] = {}
    for item, keys in zip(items, job.keys, strict=True):
        at = (row_at[keys[row]] if row else 0, col_at[keys[col]] if col else 0)
        combination = json.dumps(item.values, sort_keys=True, default=str)
        tile = _tile(item, free, spec.replicates, shape, root)
        cells.setdefault(at, {}).setdefault(combination, []).append(tile)
    grouped: dict[tuple[int, int], tuple[Group, ...]] = {
        at: tuple(tuple(g) for g in groups.values()) for at, groups in cells.items()}
    return Sheet(_title(spec.name, job, row, col), _summary(job), _corner(row, col),
                 job.labels(row, row_notes) if row else (),
                 job.labels(col, col_notes) if col else (Label(""),), grouped)


def _title(name: str, job: _Job, row: str | None, col: str | None) -> str:
    if row and col:
        return f"{name}: {row} × {col}"
    if row or col:
        return f"{name}: by {row or col}"
    prompts = {i.job.prompt for i in job.items if i.job}
    prompt = prompts.pop() if len(prompts) == 1 else None
    return f"{name}: “{short_value(prompt, 80)}”" if prompt else name


def _corner(row: str | None, col: str | None) -> str:
    return f"{row} \\ {col}" if row and col else (row or "")


def _summary(job: _Job) -> str:
    planned = [i for i in job.items if i.job]
    done = sum(1 for i in planned if i.path is not None)
    parts = [plural(len(planned), "image") if done == len(planned) else
             f"{done:,} of {plural(len(planned), 'image')} rendered"]
    if job.spec.replicates > 1:
        parts.append(f"{job.spec.replicates} replicates each")
    excluded = len(job.items) - len(planned)
    if excluded:
        parts.append(f"{plural(excluded, 'combination')} excluded")
    constant = [n for n in job.values if n not in job.varying and job.present[n] != {ABSENT}]
    parts.extend(f"{n}={_label(job.items[0].values, n)}" for n in constant)
    return " · ".join(parts)


def _tile(item: _Item, free: Sequence[str], replicates: int, shape: tuple[int, int],
          root: Path) -> Tile:
    caption = [f"{n}={_label(item.values, n)}" for n in free if n in item.values]
    if item.job is None:
        return Tile(Mark.EXCLUDED, ", ".join([*caption, f"exclude[{item.rule}]"]), shape,
                    state="excluded", hint=f"removed by the matrix's exclude[{item.rule}]")
    job = item.job
    if replicates > 1:
        caption.append(f"#{job.replicate}")
    caption.append(f"seed {job.seed}")
    own = _shape(job.request)
    if item.path is not None:
        return Tile(Mark.IMAGE, ", ".join(caption), own, root / item.path,
                    hint=job.prompt or "")
    return Tile(Mark.MISSING, ", ".join(caption), own, state=item.state, hint=job.prompt or "")


def _shape(request: Mapping[str, object]) -> tuple[int, int]:
    width, height = request.get("width"), request.get("height")
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    ratio = request.get("aspect_ratio")
    if isinstance(ratio, str) and ratio.count(":") == 1:
        w, h = ratio.split(":")
        if w.isdigit() and h.isdigit() and int(w) and int(h):
            return int(w), int(h)
    return 1, 1
