"""`fluxbatch clean RECIPE [--delete]`: images recorded in the manifest whose job is gone
from the recipe. Only files the manifest names are ever touched."""

from __future__ import annotations

import contextlib
import os

from fluxbatch.commands.output import plural
from fluxbatch.errors import EXIT_OK
from fluxbatch.plan import classify, load_plan
from fluxbatch.state import MANIFEST, RootLock, Store, has_store
from fluxbatch.write import write_manifest


def clean(*, recipe: str, out: str | None, yes: bool, delete: bool) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    root = plan.recipe.output_root
    if not has_store(root) and not (root / MANIFEST).exists():
        print("no orphans: nothing has been rendered into this output root yet")
        return EXIT_OK
    with RootLock(root), Store.open(root) as store:
        store.claim_root(plan.recipe.name)
        records = store.records()
        orphans = classify(plan, records).orphans
        if not orphans:
            print("no orphans: every image in the manifest belongs to a job in the recipe")
            return EXIT_OK
        # A file an orphan once wrote may since have been rewritten by a planned job (same
        # path, another extension planned): it is that job's image now, and is kept.
        kept = {record.path for output, record in records.items()
                if output not in orphans and record.written_key is not None and record.path}
        for output in orphans:
            path = records[output].path or output
            if path in kept:
                print(f"orphan entry: {path} (the file is now the image of a job in the "
                      "recipe and is kept)")
            else:
                print(f"{'deleting' if delete else 'orphan'}: {path}")
        if not delete:
            print(f"{plural(len(orphans), 'orphan')}; run with --delete to remove them and "
                  "their manifest entries")
            return EXIT_OK
        for output in orphans:
            path = records[output].path or output
            if path in kept:
                continue
            target = root / path
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            _remove_empty_parents(target.parent, root)
        store.forget(list(orphans))
        write_manifest(plan.recipe, store.entries())
    print(f"deleted {plural(len(orphans), 'orphan')}")
    return EXIT_OK


def _remove_empty_parents(directory: os.PathLike[str], root: os.PathLike[str]) -> None:
    current = os.path.abspath(directory)
    stop = os.path.abspath(root)
    while current.startswith(stop + os.sep):
        try:
            os.rmdir(current)
        except OSError:
            return
        current = os.path.dirname(current)
