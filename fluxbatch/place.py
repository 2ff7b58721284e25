"""Placing images in an output root: `Placer` writes an image at a job's output (provenance
embedded, the file written atomically, the placement recorded), from bytes just downloaded or
held already (the content store, another placed file, another root); `place_stored` places
what a render needs no request for; the manifest is rewritten from the store as images land.
No HTTP client is loaded here: `merge` and `clean` use this module without the network half.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxbatch import imagemeta
from fluxbatch.errors import StateError
from fluxbatch.jobs import Job, Plan
from fluxbatch.outcomes import Event, JobFailed, LocalFault, Outcome, OutcomeStatus, Written
from fluxbatch.providers import credits
from fluxbatch.recipe import Recipe
from fluxbatch.selection import Selection, source_placement
from fluxbatch.state.blobs import BlobStore, DamagedBlob, LocalBlobs, fetched_blob, keep_blob
from fluxbatch.state.ledger import Ledger, Task
from fluxbatch.state.manifests import ManifestEntry, Provenance
from fluxbatch.state.placements import Placements
from fluxbatch.state.root import RootState
from fluxbatch.state.store import Store
from fluxbatch.write import (
    NotAnImage,
    manifest_path,
    place,
    provenance,
    temp_dir,
    write_manifest,
)

# The manifest is rewritten as images land, at most this often, and never taking more than
# a tenth of the run (it is written from the store, which is what a resume relies on).
MANIFEST_INTERVAL = 30.0


@dataclass(frozen=True, slots=True)
class Draft:
    """An image about to be written: the entry to embed, and what its output held before."""

    entry: Provenance
    previous: str | None
    shared: bool


class DamagedCopy(Exception):
    """The root's copy of an image (in the content store, or a placed file) no longer holds
    the bytes it was kept with: damaged on disk, not the provider's doing."""


class Placer:
    """Writes a recipe's images into its output root: the provenance embedded, the file
    written atomically, the placement recorded. The same image (one job key) may be placed
    at several outputs, for several recipes, without being paid for again."""

    def __init__(self, recipe: Recipe, store: Placements, provider: str,
                 blobs: BlobStore | None = None) -> None:
        self.recipe = recipe
        self.root = recipe.output_root
        self.store = store
        self.blobs = blobs or LocalBlobs(self.root)
        self.provider = provider
        self.previous = {p.output: p.path for p in store.placements(recipe.name)}

    def place(self, job: Job, data: bytes, task: Task | None, source: Mapping[str, Any],
              submitted_at: float | None = None) -> Written:
        """Place `data` (an image of `job.key`) at the job's output. `task` and `source` (an
        earlier entry of the same image) say which task made it and what it cost."""
        written, full = self.write(job, data, self.draft(job, task, source, submitted_at))
        return self.record(job, written, full)

    def draft(self, job: Job, task: Task | None, source: Mapping[str, Any],
              submitted_at: float | None) -> Draft:
        """The entry to embed, and the file this output held before (removed once the new
        one is written, unless another recipe's image is that file)."""
        def known(name: str, value: Any) -> Any:
            return value if value is not None else source.get(name)

        entry = provenance(
            job, recipe=self.recipe, provider=source.get("provider") or self.provider,
            task_id=known("task_id", task.task_id if task else None),
            # (as recorded: by an earlier release too, which took 1e999 for a cost)
            cost=credits(known("cost", credits(task.cost) if task else None)),
            reported_seed=known("reported_seed", task.reported_seed if task else None),
            submitted_at=submitted_at or (task.submitted_at if task else None),
            finished_at=time.time(), path=job.output)
        if entry["submitted_at"] is None:
            entry["submitted_at"] = source.get("submitted_at")
        previous = self.previous.get(job.output)
        shared = previous is not None and bool(self.store.others_at(previous, self.recipe.name))
        return Draft(entry, previous, shared)

    def write(self, job: Job, data: bytes, draft: Draft) -> tuple[Written, ManifestEntry]:
        """The file (no store access: this may run off the event loop, as `network` runs
        it)."""
        try:
            return place(self.root, job, data, draft.entry, draft.previous, draft.shared)
        except (NotAnImage, imagemeta.ImageFormatError) as error:
            raise JobFailed(f"the provider's image is unusable: {error}") from None
        except OSError as error:
            raise LocalFault.from_os_error(f"cannot write {self.root / job.output}", error) \
                from None

    def record(self, job: Job, written: Written, full: ManifestEntry) -> Written:
        self.store.placed(self.recipe.name, job.output, job.key, full, written.mtime_ns)
        self.previous[job.output] = written.path
        return written

    def from_root(self, job: Job, state: RootState) -> Outcome:
        """Place an image the root already holds (content store, or another placed file).
        Raises `DamagedCopy` when that copy was damaged on disk (a content store's copy is
        removed then)."""
        outcome = Outcome(job, OutcomeStatus.WRITTEN)
        task = state.tasks.get(job.key)
        try:
            data, source = self._held(job, task, state)
            outcome.written = self.place(job, data, task, source)
        except JobFailed as error:
            outcome.status, outcome.reason = OutcomeStatus.FAILED, str(error)
        except LocalFault as error:
            outcome.status, outcome.reason = OutcomeStatus.PENDING, str(error)
        except OSError as error:
            outcome.status = OutcomeStatus.FAILED
            outcome.reason = f"cannot read its stored image: {error.strerror or error}"
        outcome.finished_at = time.time()
        return outcome

    def _held(self, job: Job, task: Task | None,
              state: RootState) -> tuple[bytes, Mapping[str, Any]]:
        """The bytes of `job`'s image that the root holds, checked against their sha256, and
        the manifest entry they were placed with (if any)."""
        blob = fetched_blob(task)
        if blob is not None and self.blobs.has(blob):
            try:
                return self.blobs.read(blob), {}
            except DamagedBlob as damage:
                self.blobs.drop(blob)
                raise DamagedCopy(str(damage)) from None
        found = source_placement(job.key, state, self.root)
        if found is None:
            raise JobFailed("its image was removed from the output root while planning; "
                            "run again")
        data = (self.root / found.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != found.sha256:
            raise DamagedCopy(f"its image at {found.path} was changed on disk since it was "
                              "written")
        return data, self.store.entry(found.recipe, found.output) or {}


def place_stored(plan: Plan, selection: Selection, state: RootState, store: Store,
                 on_event: Callable[[Event], None]) -> list[Outcome]:
    """Place the images the root already holds (`selection.place`): no request, no key. An
    image whose copy was damaged on disk is collected again from the provider, at no cost,
    by this run when it can (`selection` gains it), else by the next."""
    placer = Placer(plan.recipe, store, plan.recipe.provider.name)
    manifest = ManifestPacer(plan.recipe, store)
    outcomes = []
    for job in selection.place:
        if job.key in selection.followers:  # its image is being collected again
            selection.followers[job.key].append(job)
            continue
        try:
            outcome = placer.from_root(job, state)
        except DamagedCopy as damage:
            again = _collect_again(job, str(damage), selection, store)
            if again is None:
                continue
            outcome = again
        on_event(Event(outcome.status, job, outcome.reason))
        outcomes.append(outcome)
        manifest.maybe()
    return outcomes


def _collect_again(job: Job, damage: str, selection: Selection,
                   ledger: Ledger) -> Outcome | None:
    """The outcome for an image whose kept copy was damaged on disk: None when this run
    collects its task again (added to `selection`); else what the next run does about it."""
    outcome = Outcome(job, OutcomeStatus.PENDING, finished_at=time.time())
    if not ledger.fetch_again(job.key, f"{damage}; collected again from the provider without "
                                      "paying"):
        outcome.status = OutcomeStatus.FAILED
        outcome.reason = f"{damage}, and no task is known to collect it from again: the next " \
                         "render pays for a new one"
        return outcome
    task = ledger.task(job.key)
    if selection.collectable(task):
        assert task is not None
        selection.collect(job, task)
        return None
    outcome.reason = f"{damage}; the next run collects it again from the provider without " \
                     "paying"
    return outcome


def keep_held(root: Path, data: bytes, sha256: str) -> None:
    """Keep bytes that came from elsewhere (the shared store), already checked against
    `sha256`, in the root's content store, as a download is kept."""
    spool = temp_dir(root)
    spool.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spool, prefix="held-", suffix=".part",
                                     delete=False) as handle:
        handle.write(data)
        handle.flush()
    keep_blob(root, Path(handle.name), sha256)


class ManifestPacer:
    """Rewrites the manifest as images land: every MANIFEST_INTERVAL seconds at most, and
    never more often than ten times the last rewrite took (so a manifest of 100,000 images
    costs a run at most a tenth of its time, not a rewrite per image)."""

    def __init__(self, recipe: Recipe, store: Store) -> None:
        self.recipe = recipe
        self.store = store
        self.last = time.monotonic()
        self.took = 0.0

    def maybe(self) -> None:
        now = time.monotonic()
        if now - self.last < max(MANIFEST_INTERVAL, 10 * self.took):
            return
        with contextlib.suppress(OSError):  # (the store has it; rewritten at the end)
            write_manifest(self.recipe, self.store)
        self.last = time.monotonic()
        self.took = self.last - now


def finish_manifest(recipe: Recipe, store: Store, *, stopped: str | None = None) -> None:
    """The manifest, from the store; a clear error when the disk refuses it (the store still
    has every image, so nothing is lost). When the run had `stopped` already (a full disk is
    met by the state store first), that reason is the one the line gives."""
    try:
        write_manifest(recipe, store)
    except OSError as error:
        if stopped is not None:
            raise StateError(
                f"stopped: {stopped.rstrip('.')}. The manifest {manifest_path(recipe)} could "
                f"not be written either ({error.strerror or error}); the next run writes it."
            ) from None
        raise StateError(
            f"cannot write {manifest_path(recipe)}: {error.strerror or error}. "
            "Every image written is recorded in the state store; free some space (or make the "
            "folder writable) and run `fluxbatch render` again to write the manifest. Nothing "
            "is paid twice.") from None
