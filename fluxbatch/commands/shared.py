"""`fluxbatch pull RECIPE` and `fluxbatch push RECIPE`: the shared store (`--store URL`,
`FLUXBATCH_STORE`) and one output root, with no request to the provider.

`pull` places every image of the recipe that the store holds and the root does not: each
checked against its sha256 first (a damaged or truncated object is refused, never placed),
nothing paid; it says what the store does not hold. `push` uploads what the root holds for
the recipe and the store does not (a root rendered before the store existed): the bytes,
then the record.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime

from fluxbatch.commands.output import plural
from fluxbatch.errors import EXIT_FAILED, EXIT_OK, UsageError
from fluxbatch.front import load_plan
from fluxbatch.jobs import Job, Plan
from fluxbatch.place import DamagedCopy, Placer, keep_held
from fluxbatch.selection import ImageState, SelectOptions, classify_with_store, source_placement
from fluxbatch.session import adopt_found_images
from fluxbatch.state.blobs import DamagedBlob, LocalBlobs, fetched_blob
from fluxbatch.state.lock import RootLock
from fluxbatch.state.root import RootState
from fluxbatch.state.shared import (
    Claim,
    CorruptObject,
    Record,
    SharedStore,
    account_name,
    store_url,
)
from fluxbatch.state.store import Store
from fluxbatch.write import manifest_path, write_manifest


def _store(store: str | None, command: str) -> SharedStore:
    url = store_url(store, os.environ)
    if url is None:
        raise UsageError(f"{command}: name the shared store: --store URL, or FLUXBATCH_STORE")
    return SharedStore.open(url)


def pull(*, recipe: str, out: str | None, yes: bool, store: str | None) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    shared = _store(store, "pull")
    try:
        shared.check(create=False)
        root = plan.recipe.output_root
        root.mkdir(parents=True, exist_ok=True)
        with RootLock(root), Store.open(root) as local:
            local.use(plan.recipe.name, plan.recipe.path)
            adopt_found_images(plan, local)
            lines, failed = _pull(plan, local, shared)
            write_manifest(plan.recipe, local)
    finally:
        shared.close()
    for line in lines:
        print(line)
    return EXIT_FAILED if failed else EXIT_OK


def _pull(plan: Plan, local: Store, shared: SharedStore) -> tuple[list[str], bool]:
    """Place what the store holds of the images the root does not; the lines to print."""
    classified, state = classify_with_store(plan, local, SelectOptions())
    up_to_date, stored = ImageState.UP_TO_DATE, ImageState.STORED
    placer = Placer(plan.recipe, local, plan.recipe.provider.name)
    by_key: dict[str, list[Job]] = {}
    here = 0
    for job, found in zip(plan.jobs, classified.states, strict=True):
        if found == stored and _place_here(placer, job, state):
            here += 1
        elif found != up_to_date:
            by_key.setdefault(job.key, []).append(job)
    found_there = shared.lookup_many(by_key)
    placed, refused, claimed, missing = 0, [], [], 0
    for key, jobs in by_key.items():
        entry = found_there.get(key)
        if isinstance(entry, Record):
            try:
                data = shared.fetch(entry)
            except CorruptObject as error:
                refused.append(f"refused: {jobs[0].output}: {error}; not placed")
                continue
            keep_held(plan.recipe.output_root, data, entry.sha256)
            local.fetched(key, entry.sha256)
            for job in jobs:
                placer.place(job, data, None, entry.source())
            placed += len(jobs)
        elif isinstance(entry, Claim):
            claimed.append(entry)
        elif isinstance(entry, CorruptObject):
            refused.append(f"refused: {jobs[0].output}: {entry}")
        else:
            missing += len(jobs)
    lines = [f"{shared.url}: {plural(placed, 'image')} placed from the store, nothing paid" +
             (f" ({here:,} more from images this root held)" if here else "") +
             f"; manifest {manifest_path(plan.recipe)}"]
    if claimed:
        lines.append(f"{plural(len(claimed), 'image')} {'is' if len(claimed) == 1 else 'are'} "
                     f"being rendered by another run ({claimed[0].describe()}): pull again "
                     "when it is done")
    if missing:
        lines.append(f"{plural(missing, 'image')} {'is' if missing == 1 else 'are'} not in the "
                     "store: `fluxbatch render` makes them")
    return lines + refused, bool(refused)


def _place_here(placer: Placer, job: Job, state: RootState) -> bool:
    """Place an image the root holds already (`render` would too, free)."""
    try:
        outcome = placer.from_root(job, state)
    except DamagedCopy:
        return False
    return outcome.status == "written"


def push(*, recipe: str, out: str | None, yes: bool, store: str | None) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    root = plan.recipe.output_root
    shared = _store(store, "push")
    try:
        shared.check()
        with RootLock(root), Store.open(root, create=False) as local:
            counts, problems = _push(plan, local, shared)
    except FileNotFoundError:
        raise UsageError(f"push: {root} holds no rendered images (no {root / '.fluxbatch'})") \
            from None
    finally:
        shared.close()
    print(f"{shared.url}: {plural(counts['uploaded'], 'image')} uploaded, "
          f"{counts['there']:,} already there" +
          (f", {counts['absent']:,} not rendered here" if counts["absent"] else ""))
    for problem in problems:
        print(f"  not uploaded: {problem}")
    return EXIT_FAILED if problems else EXIT_OK


def _push(plan: Plan, local: Store, shared: SharedStore) -> tuple[Counter[str], list[str]]:
    state = RootState.of(plan.recipe.name, local.tasks(), local.placements())
    keys = {job.key: job for job in plan.jobs}
    counts: Counter[str] = Counter()
    found = shared.lookup_many(keys)
    problems = []
    for key, job in keys.items():
        if isinstance(found.get(key), Record):
            counts["there"] += 1
            continue
        try:
            held = _held(plan, job, state, local)
        except OSError as error:  # (a placed file this user may not read, say)
            problems.append(f"{job.output}: {error.strerror or error}")
            continue
        if held is None:
            counts["absent"] += 1
            continue
        data, sha256, source = held
        record = _record(job, data, sha256, source, plan.recipe.provider.name)
        shared.put_image(data, sha256)
        shared.update(record)  # (after the bytes: a record never names what is not there)
        counts["uploaded"] += 1
    return counts, problems


def _held(plan: Plan, job: Job, state: RootState,
          local: Store) -> tuple[bytes, str, dict[str, object]] | None:
    """The bytes this root holds of `job`'s image (as downloaded, else a placed file), their
    sha256, and the manifest entry that says how they were made."""
    root = plan.recipe.output_root
    task = state.tasks.get(job.key)
    blob = fetched_blob(task)
    placement = source_placement(job.key, state, root)
    entry: dict[str, object] = {}
    if placement is not None:
        entry = dict(local.entry(placement.recipe, placement.output) or {})
    if blob is not None and LocalBlobs(root).has(blob):
        try:
            return LocalBlobs(root).read(blob), blob, entry
        except DamagedBlob:
            pass
    if placement is None:
        return None
    data = (root / placement.path).read_bytes()
    return data, placement.sha256, entry


def _record(job: Job, data: bytes, sha256: str, entry: dict[str, object],
            provider: str) -> Record:
    def number(name: str) -> float | None:
        value = entry.get(name)
        return value if isinstance(value, int | float) and not isinstance(value, bool) \
            else None

    def whole(name: str) -> int | None:
        value = entry.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    task_id = entry.get("task_id")
    request = entry.get("request")
    return Record(key=job.key, sha256=sha256, size=len(data), model=job.model,
                  provider=str(entry.get("provider") or provider),
                  request=request if isinstance(request, dict) else {},
                  seed=job.seed, reported_seed=whole("reported_seed"), cost=number("cost"),
                  task_id=task_id if isinstance(task_id, str) else None,
                  submitted_at=_timestamp(entry.get("submitted_at")),
                  recorded_at=datetime.now().timestamp(),
                  account=account_name(os.environ))


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None

