"""`fluxbatch reproduce --verify IMAGE`: render an image again, paying for it after
confirmation, and say whether the new one is identical, drifted (a floating model) or differs.

The new image is rendered by the normal render path (lock, ledger, outbox, `--budget`, the
balance check) into a verify root of its own, `.verify/` in the original's output root, under
the recipe `verify`: the original is never touched, what verifying paid is in that root's
ledger (`fluxbatch spend ROOT/.verify`), and git ignores the folder. Rendering again means a
new task on purpose: once verified, the verify root's ledger holds the key, so the render is
forced. Unless that ledger holds a task of the key that no verify image came from yet (a
verify killed after paying, or one whose image could not be written): that one is collected,
or placed from the content store, and not paid again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fluxbatch import models, recipe
from fluxbatch.commands.inspect import entry_of, origin_root, reproduction_recipe
from fluxbatch.commands.output import plural
from fluxbatch.errors import EXIT_FAILED, EXIT_OK, FluxbatchError, UsageError
from fluxbatch.front import plan_of
from fluxbatch.jobs import Job, Plan
from fluxbatch.layout import stored_path_problem
from fluxbatch.money import usd
from fluxbatch.outcomes import Outcome, OutcomeStatus
from fluxbatch.selection import estimate_at
from fluxbatch.session import Options, Render, Report, budget_so_far, preview
from fluxbatch.state.files import ignore_in_git
from fluxbatch.state.ledger import IN_FLIGHT, TaskStatus
from fluxbatch.state.lock import RootLock
from fluxbatch.state.manifests import read_manifest
from fluxbatch.state.store import Store, has_store

VERIFY_DIR = ".verify"
VERIFY_RECIPE = "verify"
# Images larger than this are not decoded to compare them (FLUX makes at most ~4 MP).
MAX_PIXELS = 64_000_000


def verify(*, source: str, entry_path: str | None, yes: bool, budget: float | None,
           base_url: str | None) -> int:
    image = Path(source)
    entry = entry_of(image, entry_path)
    root = origin_root(image, entry)
    original = root / entry["path"] if root is not None and image.suffix.lower() == ".json" \
        else image
    output = entry["path"] if root is not None else image.name
    before = _pixels(original)  # (a damaged original is found before anything is paid)
    plan = _plan(entry, root or image.parent, output)
    job = plan.jobs[0]
    options = Options(base_url=base_url, budget=budget)
    if not _collects_unplaced(plan, job, options):
        _confirm(plan, job, options, yes=yes)
        options = replace(options, force=True, retry_unknown=True)
    report = asyncio.run(Render(plan, options).run())
    ignore_in_git(plan.recipe.output_root)  # (verify images are for looking at, not committing)
    return _report(report, plan, job, entry, original, before)


def _plan(entry: dict[str, Any], root: Path, output: str) -> Plan:
    """The one-job plan that renders the entry's request again at `output` in the verify
    root. The recipe is made in memory, as if it sat beside the original's (whose folder
    its image inputs are named from)."""
    text = reproduction_recipe({**entry, "path": output}, name=VERIFY_RECIPE)
    folder = _recipe_folder(root, str((entry.get("recipe") or {}).get("name") or ""))
    made = recipe.parse(text, str(folder / f"{VERIFY_RECIPE}.yaml"),
                        output_root=str(root / VERIFY_DIR))
    return plan_of(made, yes=True)  # (its outputs' links checked)


def _recipe_folder(root: Path, name: str) -> Path:
    """The folder of the recipe that made the image, as its manifest records it; else the
    output root."""
    try:
        document = read_manifest(root, name) if name else None
    except FluxbatchError:
        document = None
    path = (document.get("recipe") or {}).get("path") if document else None
    if not isinstance(path, str) or not path:
        return root
    return (root / path).parent


def _collects_unplaced(plan: Plan, job: Job, options: Options) -> bool:
    """Whether the verify root holds a render of the key that no verify image came from yet:
    then this run collects it (or places it from the content store) without paying. Earlier
    verify images of the key are retired first, or the render would find them up to date."""
    root = plan.recipe.output_root
    if not has_store(root):
        return False
    with RootLock(root), Store.open(root) as store:
        task = store.task(job.key)
        if task is None or not task.task_id or \
                task.status not in (*IN_FLIGHT, TaskStatus.FETCHED):
            return False
        earlier = [p for p in store.placements(VERIFY_RECIPE) if p.key == job.key]
        made = [store.entry(VERIFY_RECIPE, p.output) for p in earlier]
        if any(entry is not None and entry.get("task_id") == task.task_id for entry in made):
            return False  # (the last verify's image came from it: render again)
        for placement in earlier:
            if stored_path_problem(root, placement.path) is None:
                with contextlib.suppress(OSError):
                    os.unlink(root / placement.path)
        store.forget(VERIFY_RECIPE, [p.output for p in earlier])
    selection = preview(plan, options)
    return bool(selection.attach or selection.place)


def _confirm(plan: Plan, job: Job, options: Options, *, yes: bool) -> None:
    """Say what the new image costs; go on with `--yes`, or when the terminal says yes."""
    selection = preview(plan, replace(options, force=True, retry_unknown=True))
    _, prices = budget_so_far(plan, read_only=True)
    estimate = estimate_at(selection, prices)
    price = f"estimated {usd(estimate)}" if not isinstance(estimate, str) else \
        "at a price fluxbatch does not know (the model has none published)"
    where = plan.recipe.output_root
    print(f"verify: renders {job.output} again with {job.model} (seed {job.seed}) into {where}; "
          f"this pays for 1 new image, {price}")
    if yes:
        return
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        raise UsageError("reproduce --verify pays for a new image, and there is no terminal to "
                         "confirm it: pass --yes to go ahead; nothing was sent")
    print("Pay for it and render? [y/N] ", end="", flush=True)
    if stdin.readline().strip().lower() not in ("y", "yes"):
        raise FluxbatchError("not confirmed; nothing was sent")


def _report(report: Report, plan: Plan, job: Job, entry: dict[str, Any], original: Path,
            before: _Picture) -> int:
    outcome = next((o for o in report.outcomes if o.job.output == job.output), None)
    if outcome is None or outcome.status != OutcomeStatus.WRITTEN or outcome.written is None:
        raise FluxbatchError(f"not verified: {_why_not(report, outcome)}")
    new = plan.recipe.output_root / outcome.written.path
    print(f"new image: {new} ({_paid(report, outcome)})")
    after = _pixels(new)
    difference = _difference(before, after)
    if difference is None:
        print(f"identical: the same pixels as {original}")
        return EXIT_OK
    floating = models.floating(str(entry["model"]))
    verdict = "drift (floating model)" if floating else "differs"
    why = f" ({entry['model']} is {floating})" if floating else ""
    print(f"{verdict}: not the same pixels as {original}{why}: {difference}")
    return EXIT_OK if floating else EXIT_FAILED


def _why_not(report: Report, outcome: Outcome | None) -> str:
    if report.stopped:
        return report.stopped
    if outcome is not None:
        reason = f": {outcome.reason}" if outcome.reason else ""
        return f"the new image is {outcome.status}{reason}"
    held = report.selection.held
    return f"{plural(held, 'image')} held back" if held else "nothing was rendered"


def _paid(report: Report, outcome: Outcome) -> str:
    if outcome.submitted_at is None:
        return "rendered and paid for by an earlier verify, not paid again"
    spent = report.spent_usd()
    return "cost not reported by the provider" if spent is None else \
        f"cost {usd(spent)}, reported by the provider"


# -- comparing pixels --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Picture:
    size: tuple[int, int]
    mode: str
    data: Any  # a loaded PIL image


def _pixels(path: Path) -> _Picture:
    """The image decoded, as RGBA (any image with alpha) or RGB; a clear error when it is
    not an image Pillow can read, or too large to compare."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise FluxbatchError(f"{path}: {opened.width}x{opened.height} is too large to "
                                     "compare")
            alpha = "A" in opened.getbands() or "transparency" in opened.info
            picture = opened.convert("RGBA" if alpha else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise FluxbatchError(f"{path}: cannot read the image to compare it: {error}") from None
    return _Picture(picture.size, picture.mode, picture)


def _difference(before: _Picture, after: _Picture) -> str | None:
    """None when the pixels are the same; else how they differ: the mean absolute
    difference per channel (of 255), and the share of pixels that changed at all."""
    from PIL import ImageChops, ImageStat

    if before.size != after.size:
        return f"the new image is {after.size[0]}x{after.size[1]}, the original " \
               f"{before.size[0]}x{before.size[1]}"
    mode = "RGBA" if "RGBA" in (before.mode, after.mode) else "RGB"
    diff = ImageChops.difference(before.data.convert(mode), after.data.convert(mode))
    if diff.getbbox(alpha_only=False) is None:
        return None
    means = ImageStat.Stat(diff).mean
    bands = diff.split()
    changed = bands[0]
    for band in bands[1:]:
        changed = ImageChops.lighter(changed, band)
    unchanged = changed.histogram()[0]
    share = 1 - unchanged / (diff.width * diff.height)
    return f"mean absolute difference {sum(means) / len(means):.2f} of 255, " \
           f"{share:.1%} of pixels changed"
