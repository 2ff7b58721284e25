"""The network half of a render: the provider, the executor and the writer wired together,
with the state store journaling every step. What to render is decided in `selection`, and the
whole render is driven from `session`; no printing here. Loaded only when there is work to
do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from fluxbatch import imagemeta, models, providers
from fluxbatch.errors import ConfigError, StateError
from fluxbatch.execute import (
    Event,
    Executor,
    Image,
    JobFailed,
    LocalFault,
    Outcome,
    Settings,
    Unusable,
)
from fluxbatch.expand import Job, Plan
from fluxbatch.inputs import InputProblem, is_descriptor
from fluxbatch.outbox import Outbox
from fluxbatch.outcomes import OutcomeStatus
from fluxbatch.providers import Polled, Submitted
from fluxbatch.providers.responses import credits
from fluxbatch.recipe import Recipe
from fluxbatch.selection import Options, Selection, source_placement
from fluxbatch.state import (
    DamagedBlob,
    ManifestEntry,
    Provenance,
    RootLock,
    RootState,
    Store,
    Task,
    TaskStatus,
    blob_path,
    has_blob,
    keep_blob,
    read_blob,
)
from fluxbatch.wire import Wire
from fluxbatch.write import (
    NotAnImage,
    Written,
    check_image,
    manifest_path,
    place,
    provenance,
    temp_dir,
    write_manifest,
)

# The manifest is rewritten as images land, at most this often, and never taking more than
# a tenth of the run (it is written from the store, which is what a resume relies on).
MANIFEST_INTERVAL = 30.0


class StoreJournal:
    """The executor's journal, written to the state store's ledger, by job key (each call
    one transaction)."""

    def __init__(self, store: Store, provider: str, base_url: str | None, *,
                 outbox: bool = False, run: str | None = None) -> None:
        self.store = store
        self.provider = provider
        self.base_url = base_url
        self.outbox = outbox  # the outbox records submits itself, before answering
        self.run = run

    def submitting(self, job: Job) -> None:
        self.store.submitting(job.key, self.provider, self.base_url, self.run)

    def not_sent(self, job: Job) -> None:
        self.store.not_sent(job.key)

    def submitted(self, job: Job, submitted: Submitted, at: float) -> None:
        if self.outbox:
            return
        self.store.submitted(job.key, submitted.task_id, submitted.polling_url,
                             submitted.cost, at)

    def ready(self, job: Job, polled: Polled) -> None:
        self.store.ready(job.key, polled.reported_seed)

    def finished(self, outcome: Outcome) -> None:
        # (written: recorded by the writer, the bytes kept and the files placed; skipped:
        # never submitted, so the ledger has nothing to say)
        status = _LEDGER.get(outcome.status)
        if status is not None:
            self.store.ended(outcome.job.key, status, outcome.reason)


# What the ledger records of how a job ended. A pending task is still collectable: it stays
# submitted, and only its reason changes.
_LEDGER = {
    OutcomeStatus.PENDING: TaskStatus.SUBMITTED,
    OutcomeStatus.MODERATED: TaskStatus.MODERATED,
    OutcomeStatus.FAILED: TaskStatus.FAILED,
    OutcomeStatus.UNKNOWN: TaskStatus.UNKNOWN,
    OutcomeStatus.GONE: TaskStatus.GONE,
}


def base_url_for(plan: Plan, options: Options, environ: Mapping[str, str]) -> str | None:
    """The base URL and who named it: `--base-url`, then the provider's environment variable
    (the operator's), then the recipe's (checked by `validate`: only the provider's own hosts
    or loopback), then the provider's default."""
    spec = plan.recipe.provider
    info = providers.REGISTRY[spec.name]
    if options.base_url:
        return providers.check_base_url(options.base_url, info, where="--base-url")
    if info.base_url_env and environ.get(info.base_url_env, "").strip():
        return providers.check_base_url(environ[info.base_url_env].strip(), info,
                                        where=info.base_url_env)
    if spec.base_url:
        problem = providers.recipe_base_url_problem(info, spec.base_url)
        if problem is not None:  # (validate reports it, located; this is the last guard)
            raise ConfigError(f"{plan.recipe.path}: provider.base_url: {problem}")
        return providers.check_base_url(spec.base_url, info, where="provider.base_url")
    return info.default_base_url


@contextlib.contextmanager
def provider_for(plan: Plan, options: Options, environ: Mapping[str, str],
                 emulator_latency: float | None = None) -> Iterator[providers.Provider]:
    """The provider the recipe names, with the key from the environment; an in-process one
    (the emulator) is started on a free loopback port for the duration."""
    name = plan.recipe.provider.name
    base_url = base_url_for(plan, options, environ)
    if base_url:  # (for the emulator: one already running elsewhere, `fluxbatch emulator`)
        yield providers.build(name, base_url=base_url, environ=environ)
        return
    assert providers.REGISTRY[name].in_process
    from fluxbatch.emulator import EmulatorConfig, EmulatorThread

    config = EmulatorConfig() if emulator_latency is None else \
        EmulatorConfig(latency=emulator_latency)
    with EmulatorThread(config) as emulator:
        yield providers.build(name, base_url=emulator.base_url, environ=environ)


def settings_for(plan: Plan, options: Options) -> Settings:
    spec = plan.recipe.provider
    account = options.concurrency or spec.concurrency or models.ACCOUNT_CONCURRENCY
    caps = {**models.MODEL_CONCURRENCY, **spec.model_concurrency}
    timeout = options.task_timeout or spec.timeout or Settings().task_timeout
    return Settings(account_cap=account, model_caps=caps, task_timeout=timeout)


@dataclass(frozen=True, slots=True)
class _Draft:
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

    def __init__(self, recipe: Recipe, store: Store, provider: str) -> None:
        self.recipe = recipe
        self.root = recipe.output_root
        self.store = store
        self.provider = provider
        self.previous = {p.output: p.path for p in store.placements(recipe.name)}

    def place(self, job: Job, data: bytes, task: Task | None, source: Mapping[str, Any],
              submitted_at: float | None = None) -> Written:
        """Place `data` (an image of `job.key`) at the job's output. `task` and `source` (an
        earlier entry of the same image) say which task made it and what it cost."""
        written, full = self.write(job, data, self.draft(job, task, source, submitted_at))
        return self.record(job, written, full)

    async def place_later(self, job: Job, data: bytes, task: Task | None,
                          submitted_at: float | None) -> Written:
        """`place`, with the file written off the event loop (the store stays on it)."""
        draft = self.draft(job, task, {}, submitted_at)
        written, full = await asyncio.to_thread(self.write, job, data, draft)
        return self.record(job, written, full)

    def draft(self, job: Job, task: Task | None, source: Mapping[str, Any],
              submitted_at: float | None) -> _Draft:
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
        return _Draft(entry, previous, shared)

    def write(self, job: Job, data: bytes, draft: _Draft) -> tuple[Written, ManifestEntry]:
        """The file (no store access: this may run off the event loop)."""
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
        if has_blob(self.root, task):
            assert task is not None and task.blob is not None
            try:
                return read_blob(self.root, task.blob), {}
            except DamagedBlob as damage:
                blob_path(self.root, task.blob).unlink(missing_ok=True)
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
    manifest = _ManifestPacer(plan.recipe, store)
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


def _collect_again(job: Job, damage: str, selection: Selection, store: Store) -> Outcome | None:
    """The outcome for an image whose kept copy was damaged on disk: None when this run
    collects its task again (added to `selection`); else what the next run does about it."""
    outcome = Outcome(job, OutcomeStatus.PENDING, finished_at=time.time())
    if not store.fetch_again(job.key, f"{damage}; collected again from the provider without "
                                      "paying"):
        outcome.status = OutcomeStatus.FAILED
        outcome.reason = f"{damage}, and no task is known to collect it from again: the next " \
                         "render pays for a new one"
        return outcome
    task = store.task(job.key)
    if selection.collectable(task):
        assert task is not None
        selection.collect(job, task)
        return None
    outcome.reason = f"{damage}; the next run collects it again from the provider without " \
                     "paying"
    return outcome


async def execute(plan: Plan, selection: Selection, store: Store,
                  provider: providers.Provider, settings: Settings,
                  on_event: Callable[[Event], None],
                  started: Callable[[Executor], None] = lambda executor: None,
                  transport: httpx.AsyncBaseTransport | None = None,
                  lock: RootLock | None = None, run: str | None = None) -> list[Outcome]:
    """Submit and collect the selection's jobs (one per key; each image is placed at every
    output of its key). Every step is recorded in `store`, and the manifest is rewritten as
    images land.
    With `lock`, paid submits go through the outbox process, which inherits the lock and
    commits each answer before it is used."""
    recipe = plan.recipe
    root = recipe.output_root
    placer = Placer(recipe, store, provider.info.name)
    manifest = _ManifestPacer(recipe, store)

    async def writer(job: Job, image: Image, outcome: Outcome) -> Any:
        """Keep the bytes (the ledger then says so), then place them at every output of
        the key: a placement that fails is redone by the next run, from the store, free."""
        data = await asyncio.to_thread(image.read)
        try:
            await asyncio.to_thread(check_image, data)
        except (NotAnImage, imagemeta.ImageFormatError) as error:
            raise Unusable(f"the provider's image is unusable: {error}") from None
        try:
            await asyncio.to_thread(keep_blob, root, image.path, image.sha256)
        except OSError as error:
            raise LocalFault.from_os_error("cannot keep a downloaded image", error) from None
        store.fetched(job.key, image.sha256)
        task = store.task(job.key)
        written = None
        for each in [job, *selection.followers.get(job.key, ())]:
            placed = await placer.place_later(each, data, task, outcome.submitted_at)
            written = written or placed
        manifest.maybe()
        return written

    attach = {job.key: Submitted(task.task_id or "", task.polling_url or "", credits(task.cost))
              for job, task in selection.attach}
    # Polls are short, so half as many connections as active tasks keep up.
    connections = max(16, settings.account_cap // 2)
    outbox = Outbox(root, provider, lock.fd, store, run=run) \
        if lock is not None and selection.submit else None
    spool = temp_dir(root)
    spool.mkdir(parents=True, exist_ok=True)
    async with Wire(transport) if transport is not None else Wire.open(connections) as wire:
        if outbox is not None:
            await outbox.start()
        executor = Executor(
            provider, wire, journal=StoreJournal(store, provider.info.name, provider.base_url,
                                                   outbox=outbox is not None, run=run),
            writer=writer, settings=settings, on_event=on_event,
            submit_via=(lambda job: outbox.sender(job.key)) if outbox else None,
            spool=spool, prepare=_preparer(recipe))
        started(executor)
        try:
            ran = await executor.run(selection.jobs, attach)
        finally:
            if outbox is not None:
                await outbox.close()
            finish_manifest(recipe, store, stopped=executor.fatal)
    return with_followers(selection, ran)


def with_followers(selection: Selection, ran: list[Outcome]) -> list[Outcome]:
    """The outcomes of the jobs run, and of the other outputs of each key, which share
    them (placed from the same image, paid once)."""
    outcomes = []
    for outcome in ran:
        for follower in selection.followers.get(outcome.job.key, ()):
            outcomes.append(dataclasses.replace(outcome, job=follower, submitted_at=None,
                                                submitted=None))
    return outcomes + ran


def left_by_stop(selection: Selection, executor: Executor, store: Store,
                 run: str) -> list[Outcome]:
    """What a render stopped at once (its executor cancelled: a second Ctrl-C, the API's
    `stop(now=True)`) did, as the ledger says it: each job it took up as it ended, or, if
    it had not, as the ledger left it (paid and in flight, maybe paid, or never sent), so
    that the report counts what was paid and what the next run collects."""
    left = []
    for outcome in executor.so_far():
        if outcome.finished_at is None:
            outcome = _as_left(outcome, store.task(outcome.job.key), run)
        left.append(outcome)
    taken = {outcome.job.key for outcome in left}
    left += [Outcome(job, OutcomeStatus.SKIPPED, "interrupted before it was submitted")
             for job in selection.jobs if job.key not in taken]
    return with_followers(selection, left)


def _as_left(outcome: Outcome, task: Task | None, run: str) -> Outcome:
    status = task.status if task is not None else None
    if outcome.status == OutcomeStatus.WRITTEN:
        return outcome
    if status in (TaskStatus.SUBMITTED, TaskStatus.READY, TaskStatus.FETCHED):
        assert task is not None
        submitted = outcome.submitted or Submitted(task.task_id or "", task.polling_url or "",
                                                   credits(task.cost))
        paid_now = outcome.submitted_at or (task.submitted_at if task.run == run else None)
        return dataclasses.replace(
            outcome, status=OutcomeStatus.PENDING, submitted=submitted, submitted_at=paid_now,
            reason="stopped before its image was kept; the task is recorded and the next run "
                   "collects it without paying again")
    if status in (TaskStatus.SUBMITTING, TaskStatus.UNKNOWN):
        return dataclasses.replace(outcome, status=OutcomeStatus.UNKNOWN,
                                   reason="stopped while it was being submitted: it may have "
                                          "been billed")
    return dataclasses.replace(outcome, status=OutcomeStatus.SKIPPED,
                               reason="interrupted before it was submitted")


def _preparer(recipe: Recipe) -> Callable[[Job], Awaitable[Mapping[str, Any]]] | None:
    """The submit body of a job whose request names image inputs: each read (off the event
    loop), checked against the sha256 it was planned with, and base64-encoded."""
    inputs = recipe.inputs
    if inputs is None:
        return None

    async def prepare(job: Job) -> Mapping[str, Any]:
        if not any(map(is_descriptor, job.request.values())):
            return job.request
        try:
            return await asyncio.to_thread(inputs.materialize, job.request)
        except InputProblem as problem:
            raise JobFailed(f"not sent: {problem}") from None

    return prepare


class _ManifestPacer:
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
