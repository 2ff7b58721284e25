"""`fluxbatch merge RECIPE DIR...`: adopt what other output roots hold for this recipe (shards
rendered on other machines, say) into its own output root, without a request.

From each DIR, an image of a planned key is placed at its planned output (the file, from DIR's
store, manifests or the provenance inside its images), and a task paid for there but not yet
collected is recorded here, so that the next `render` collects it instead of paying again. An
image in DIR of another request for a planned output (DIR rendered another version of the
recipe) is reported as a conflict and left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fluxbatch.commands.output import plural
from fluxbatch.errors import EXIT_FAILED, EXIT_OK, UsageError
from fluxbatch.front import load_plan
from fluxbatch.jobs import Plan
from fluxbatch.place import Placer
from fluxbatch.selection import ImageState, classify, source_placement
from fluxbatch.state.blobs import DamagedBlob, has_blob, read_blob
from fluxbatch.state.ledger import IN_FLIGHT, Task
from fluxbatch.state.lock import RootLock
from fluxbatch.state.manifests import ManifestEntry
from fluxbatch.state.placements import Placement
from fluxbatch.state.root import RootState, read_state
from fluxbatch.state.store import Store, has_store
from fluxbatch.write import manifest_path, write_manifest


@dataclass(slots=True)
class Merged:
    placed: int = 0
    collectable: int = 0
    conflicts: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def merge(*, recipe: str, out: str | None, yes: bool, sources: list[str]) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    root = plan.recipe.output_root
    roots = [Path(source) for source in sources]
    for source in roots:
        if not source.is_dir():
            raise UsageError(f"merge: {source} is not a folder")
        if os.path.realpath(source) == os.path.realpath(root):
            raise UsageError(f"merge: {source} is this recipe's own output root")
    root.mkdir(parents=True, exist_ok=True)
    failed = 0
    with RootLock(root), Store.open(root) as store:
        store.use(plan.recipe.name, plan.recipe.path)
        placer = Placer(plan.recipe, store, plan.recipe.provider.name)
        for source in roots:
            with RootLock(source):
                merged = _merge_one(plan, store, placer, source)
            print(f"{source}: {plural(merged.placed, 'image')} placed, "
                  f"{plural(merged.collectable, 'task')} to collect" +
                  (f", {plural(len(merged.conflicts), 'conflict')}" if merged.conflicts else "")
                  + (f", {len(merged.unreadable)} unreadable" if merged.unreadable else ""))
            for conflict in merged.conflicts:
                print(f"  conflict: {conflict}")
            for unreadable in merged.unreadable:
                print(f"  unreadable: {unreadable}")
            failed += len(merged.conflicts) + len(merged.unreadable)
        write_manifest(plan.recipe, store)
        state = RootState.of(plan.recipe.name, store.tasks(), store.placements())
    classified = classify(plan, state)
    up_to_date = ImageState.UP_TO_DATE
    missing = sum(1 for s in classified.states if s != up_to_date)
    print(f"{plan.recipe.name}: {len(plan.jobs) - missing:,} of {len(plan.jobs):,} images "
          f"present; manifest {manifest_path(plan.recipe)}" +
          ("" if not missing else "; `fluxbatch render` makes (or collects) the rest"))
    return EXIT_FAILED if failed else EXIT_OK


def _merge_one(plan: Plan, store: Store, placer: Placer, source: Path) -> Merged:
    merged = Merged()
    ours = RootState.of(plan.recipe.name, store.tasks(), store.placements())
    theirs = read_state(source, plan.recipe.name, plan.jobs)
    mine = classify(plan, ours)
    up_to_date = ImageState.UP_TO_DATE
    for job, state in zip(plan.jobs, mine.states, strict=True):
        if state == up_to_date:
            continue
        found = source_placement(job.key, theirs, source)
        task = theirs.tasks.get(job.key)
        collectable = task is not None and job.key not in ours.tasks and (
            task.status in IN_FLIGHT or _damaged(source, task))
        try:
            data = _image_in(source, found, task)
        except OSError as error:  # (a disk error, a file this user may not read)
            merged.unreadable.append(f"{error.filename}: {error.strerror or error}; " + (
                _COLLECTED_HERE if collectable else "left out"))
            data = None
        if data is not None:
            entry = _entry(source, found.recipe, found.output) if found is not None else None
            placer.place(job, data, task, entry or {})
            merged.placed += 1
        elif collectable:
            assert task is not None
            _record_task(store, task)
            merged.collectable += 1
        else:
            other = theirs.placements.get(job.output)
            if other is not None and other.key != job.key:
                merged.conflicts.append(
                    f"{job.output}: {source} holds an image of another request there (key "
                    f"{other.key[:12]}…, planned {job.key[:12]}…); left out")
    return merged


_COLLECTED_HERE = "its task is recorded here, and `fluxbatch render` collects it without paying"


def _image_in(source: Path, found: Placement | None, task: Task | None) -> bytes | None:
    """The image `source` holds for a key: the file placed there (`found`), else the copy in
    its content store, if intact. An OSError when it cannot be read."""
    if found is not None:
        return (source / found.path).read_bytes()
    return _held(source, task)


def _held(source: Path, task: Task | None) -> bytes | None:
    """The image of `task` in `source`'s content store, if it is there and intact."""
    if not has_blob(source, task):
        return None
    assert task is not None and task.blob is not None
    try:
        return read_blob(source, task.blob)
    except DamagedBlob:
        return None


def _damaged(source: Path, task: Task) -> bool:
    """Whether `source` fetched `task` but its copy is damaged (the task is collected
    again, from this root, without paying)."""
    return has_blob(source, task) and bool(task.task_id) and bool(task.polling_url)


def _entry(source: Path, recipe: str, output: str) -> ManifestEntry | None:
    if not has_store(source):
        return None
    with Store.open(source, create=False) as store:
        return store.entry(recipe, output)


def _record_task(store: Store, task: Task) -> None:
    """A task paid for in another root, to be collected from this one (with the key of the
    account that paid for it: only that key may poll it)."""
    assert task.task_id is not None and task.polling_url is not None
    store.submitting(task.key, task.provider or "", task.base_url, task.run, task.account)
    store.submitted(task.key, task.task_id, task.polling_url, task.cost,
                    task.submitted_at or 0.0)
