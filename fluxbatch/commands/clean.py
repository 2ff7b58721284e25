"""`fluxbatch clean RECIPE [--delete] [--store]`: the recipe's images whose job is gone from
the recipe (orphans), and, with `--store`, the downloaded copies in the content store that
placed files already hold.

Only this recipe's placements are ever touched, and never a file that another recipe's image
is, or that any recipe using the output root still plans (recipes share a root and its
ledger, each with its own manifest).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fluxbatch.commands.output import plural
from fluxbatch.errors import EXIT_OK, FluxbatchError
from fluxbatch.front import load_plan
from fluxbatch.jobs import Plan
from fluxbatch.layout import stored_path_problem
from fluxbatch.selection import classify, source_placement
from fluxbatch.state.blobs import blob_path, has_blob
from fluxbatch.state.ledger import TaskStatus
from fluxbatch.state.lock import RootLock
from fluxbatch.state.manifests import read_manifests
from fluxbatch.state.root import RootState
from fluxbatch.state.store import Store, has_store
from fluxbatch.write import write_manifest


def clean(*, recipe: str, out: str | None, yes: bool, delete: bool, store: bool = False) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    root = plan.recipe.output_root
    if not has_store(root) and not read_manifests(root):
        print("no orphans: nothing has been rendered into this output root yet")
        return EXIT_OK
    with RootLock(root), Store.open(root) as opened:
        state = RootState.of(plan.recipe.name, opened.tasks(), opened.placements())
        _orphans(plan, state, opened, delete)
        if store:
            _prune(root, state, opened, delete)
    return EXIT_OK


def _orphans(plan: Plan, state: RootState, store: Store, delete: bool) -> None:
    recipe = plan.recipe.name
    orphans = classify(plan, state).orphans
    if not orphans:
        print("no orphans: every image of this recipe belongs to a job in it")
        return
    kept = _kept(plan, state, store, orphans)
    for output in orphans:
        path = state.placements[output].path
        if path in kept:
            print(f"orphan entry: {path} ({kept[path]})")
        else:
            print(f"{'deleting' if delete else 'orphan'}: {path}")
    if not delete:
        print(f"{plural(len(orphans), 'orphan')}; run with --delete to remove them and their "
              "manifest entries")
        return
    root = plan.recipe.output_root
    for output in orphans:
        path = state.placements[output].path
        if path in kept:
            continue
        target = root / path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        _remove_empty_parents(target.parent, root)
    store.forget(recipe, orphans)
    write_manifest(plan.recipe, store)
    print(f"deleted {plural(len(orphans), 'orphan')}")


def _kept(plan: Plan, state: RootState, store: Store,
          orphans: tuple[str, ...]) -> dict[str, str]:
    """The files orphans name that are kept, each with why. A file an orphan once wrote may
    since be the image of a planned job (same path, another extension planned), another
    recipe's image, or planned by another recipe. A path read back from the store that leads
    out of the output root (or into its state) is never deleted through."""
    root = plan.recipe.output_root
    recipe = plan.recipe.name
    planned = _planned_elsewhere(plan, store)
    kept: dict[str, str] = {}
    for output, placement in state.placements.items():
        if output not in orphans:
            kept[placement.path] = "the file is the image of a job in the recipe, and is kept"
    for output in orphans:
        path = state.placements[output].path
        refused = stored_path_problem(root, path)
        others = store.others_at(path, recipe)
        if refused is not None:
            kept[path] = f"refused: {refused}; nothing is deleted through it"
        elif others:
            kept.setdefault(path, f"the file is also the image of recipe {others[0]!r}, and "
                                  "is kept")
        elif _stem(path) in planned:
            kept.setdefault(path, f"the file is planned by recipe {planned[_stem(path)]!r}, "
                                  "and is kept")
    return kept


def _planned_elsewhere(plan: Plan, store: Store) -> dict[str, str]:
    """Output paths (without extension) that the root's other recipes plan, by recipe. A
    recipe that cannot be read now counts as planning every path it has placed."""
    found: dict[str, str] = {}
    for name, path in store.recipes().items():
        if name == plan.recipe.name:
            continue
        try:
            other = load_plan(str(plan.recipe.output_root / path),
                              out=str(plan.recipe.output_root), yes=True) if path else None
        except FluxbatchError:
            other = None
        if other is not None and other.recipe.name == name:
            found.update((_stem(job.output), name) for job in other.jobs)
        else:
            found.update((_stem(p.path), name) for p in store.placements(name))
    return found


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


def _prune(root: Path, state: RootState, store: Store, delete: bool) -> None:
    """Downloaded images whose key a placed file holds: the placed file can be placed again
    anywhere, so the store's copy only costs disk."""
    prunable = []
    for key, task in state.tasks.items():
        if has_blob(root, task) and source_placement(key, state, root) is not None:
            assert task.blob is not None
            prunable.append((key, blob_path(root, task.blob)))
    size = sum(path.stat().st_size for _, path in prunable)
    if not prunable:
        print("the content store holds no image that a placed file does not")
        return
    if not delete:
        print(f"the content store holds {plural(len(prunable), 'image')} ({size:,} bytes) "
              "that placed files also hold; run with --delete to remove them")
        return
    for key, path in prunable:
        store.ended(key, TaskStatus.PLACED, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    print(f"removed {plural(len(prunable), 'image')} ({size:,} bytes) from the content store")


def _remove_empty_parents(directory: os.PathLike[str], root: os.PathLike[str]) -> None:
    current = os.path.abspath(directory)
    stop = os.path.abspath(root)
    while current.startswith(stop + os.sep):
        try:
            os.rmdir(current)
        except OSError:
            return
        current = os.path.dirname(current)
