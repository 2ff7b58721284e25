"""The network half of `render`: the provider, the executor and the writer wired together,
with the state store journaling every step (what to render is decided in `plan`). No printing
here: the command layer shows progress from events. Loaded only when there is work to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from fluxbatch import imagemeta, models, providers
from fluxbatch.errors import ConfigError, StateError
from fluxbatch.execute import (
    PENDING,
    WRITTEN,
    Event,
    Executor,
    Image,
    JobFailed,
    LocalFault,
    Outcome,
    Settings,
)
from fluxbatch.expand import Job, Plan
from fluxbatch.outbox import Outbox
from fluxbatch.plan import Options, Selection
from fluxbatch.providers import Polled, Submitted
from fluxbatch.state import RootLock, Store
from fluxbatch.wire import Wire
from fluxbatch.write import NotAnImage, provenance, temp_dir, write_image, write_manifest

# Seconds between manifest rewrites while images land. The store is the record a resume
# relies on; the manifest is derived from it, so rewriting it often only costs time.
MANIFEST_INTERVAL = 30.0


class StoreJournal:
    """The executor's journal, written to the state store (each call one transaction)."""

    def __init__(self, store: Store, provider: str, base_url: str | None, *,
                 outbox: bool = False) -> None:
        self.store = store
        self.provider = provider
        self.base_url = base_url
        self.outbox = outbox  # the outbox records submits itself, before answering

    def submitting(self, job: Job) -> None:
        self.store.submitting(job.output, job.key, self.provider, self.base_url)

    def not_sent(self, job: Job) -> None:
        self.store.not_sent(job.output, job.key)

    def submitted(self, job: Job, submitted: Submitted, at: float) -> None:
        if self.outbox:
            return
        self.store.submitted(job.output, job.key, submitted.task_id, submitted.polling_url,
                             submitted.cost, at)

    def ready(self, job: Job, polled: Polled) -> None:
        self.store.ready(job.output, job.key, polled.reported_seed)

    def finished(self, outcome: Outcome) -> None:
        job = outcome.job
        if outcome.status == WRITTEN:
            return  # recorded by the writer, with the file's facts
        if outcome.status == PENDING:
            self.store.ended(job.output, job.key, "submitted", outcome.reason)
        elif outcome.status in ("moderated", "failed", "unknown"):
            self.store.ended(job.output, job.key, outcome.status, outcome.reason)


@dataclass(slots=True)
class Report:
    selection: Selection
    outcomes: list[Outcome]
    interrupted: bool = False
    manifest: str | None = None
    fatal: str | None = None  # why the run stopped early (a refused key, an unreachable host)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def reported_usd(self) -> float | None:
        """What the provider reported for the tasks of this run; None when it reported none."""
        costs = [o.submitted.cost for o in self.outcomes
                 if o.submitted is not None and o.submitted.cost is not None]
        return sum(costs) / 100 if costs else None

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(o.status == WRITTEN for o in self.outcomes) \
            and not self.selection.held_unknown and not self.selection.held_moderated


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
    """The provider the recipe names, with the key from the environment; the emulator is
    started on a free loopback port for the duration."""
    spec = plan.recipe.provider
    base_url = base_url_for(plan, options, environ)
    if spec.name != "emulator":
        assert base_url is not None
        yield providers.build(spec.name, base_url=base_url, environ=environ)
        return
    from fluxbatch.emulator import EmulatorConfig, EmulatorThread

    if base_url:  # an emulator already running elsewhere (`fluxbatch emulator`)
        yield providers.build("emulator", base_url=base_url, environ=environ)
        return
    config = EmulatorConfig() if emulator_latency is None else \
        EmulatorConfig(latency=emulator_latency)
    with EmulatorThread(config) as emulator:
        yield providers.build("emulator", base_url=emulator.base_url, environ=environ)


def settings_for(plan: Plan, options: Options) -> Settings:
    spec = plan.recipe.provider
    account = options.concurrency or spec.concurrency or models.ACCOUNT_CONCURRENCY
    caps = {**models.MODEL_CONCURRENCY, **spec.model_concurrency}
    timeout = options.task_timeout or spec.timeout or Settings().task_timeout
    return Settings(account_cap=account, model_caps=caps, task_timeout=timeout)


async def execute(plan: Plan, selection: Selection, store: Store,
                  provider: providers.Provider, settings: Settings,
                  on_event: Callable[[Event], None],
                  started: Callable[[Executor], None] = lambda executor: None,
                  transport: httpx.AsyncBaseTransport | None = None,
                  lock: RootLock | None = None) -> list[Outcome]:
    """Run the selection; every step is journaled in `store`, and the manifest is rewritten
    (every MANIFEST_INTERVAL seconds) as images land. With `lock`, paid submits go through
    the outbox process, which inherits the lock and commits each answer before it is used."""
    recipe = plan.recipe
    root = recipe.output_root
    records = store.records()
    entries = {entry.get("output", entry["path"]): entry for entry in store.entries()}
    holders: dict[str, set[str]] = {}  # file path -> the outputs whose entry names it
    for output, entry in entries.items():
        holders.setdefault(entry["path"], set()).add(output)
    last_manifest = [time.monotonic()]

    async def writer(job: Job, image: Image, outcome: Outcome) -> Any:
        submitted = outcome.submitted
        entry = provenance(
            job, recipe=recipe, provider=provider.info.name,
            task_id=submitted.task_id if submitted else None,
            cost=submitted.cost if submitted else None,
            reported_seed=outcome.polled.reported_seed if outcome.polled else None,
            submitted_at=outcome.submitted_at, finished_at=time.time(), path=job.output)
        previous = records.get(job.output)
        try:
            data = await asyncio.to_thread(image.read)
            written, full = await asyncio.to_thread(
                write_image, root, job, data, entry,
                previous.path if previous is not None else None)
        except (NotAnImage, imagemeta.ImageFormatError) as error:
            raise JobFailed(f"the provider's image is unusable: {error}") from None
        except OSError as error:
            raise LocalFault.from_os_error(f"cannot write {root / job.output}", error) from None
        store.written(job.output, job.key, full, written.mtime_ns)
        for output in holders.pop(written.path, set()):
            entries.pop(output, None)  # as in the store: this file now holds this image
        earlier = entries.get(job.output)
        if earlier is not None:  # its previous image, under another path
            holders.get(earlier["path"], set()).discard(job.output)
        entries[job.output] = full
        holders[written.path] = {job.output}
        if time.monotonic() - last_manifest[0] > MANIFEST_INTERVAL:
            last_manifest[0] = time.monotonic()
            with contextlib.suppress(OSError):  # (the store has it; rewritten at the end)
                write_manifest(recipe, entries.values())
        return written

    attach = {job.key: Submitted(f.task_id, f.polling_url, f.cost)
              for job, f in selection.attach}
    # Polls are short, so half as many connections as active tasks keep up.
    connections = max(16, settings.account_cap // 2)
    outbox = Outbox(root, provider, lock.fd, store) \
        if lock is not None and selection.submit else None
    spool = temp_dir(root)
    spool.mkdir(parents=True, exist_ok=True)
    async with Wire(transport) if transport is not None else Wire.open(connections) as wire:
        if outbox is not None:
            await outbox.start()
        executor = Executor(
            provider, wire, journal=StoreJournal(store, provider.info.name, provider.base_url,
                                                   outbox=outbox is not None),
            writer=writer, settings=settings, on_event=on_event,
            submit_via=(lambda job: outbox.sender(job.output, job.key)) if outbox else None,
            spool=spool)
        started(executor)
        try:
            return await executor.run(selection.jobs, attach)
        finally:
            if outbox is not None:
                await outbox.close()
            finish_manifest(recipe, store)


def finish_manifest(recipe: Any, store: Store) -> None:
    """The manifest, from the store; a clear error when the disk refuses it (the store still
    has every image, so nothing is lost)."""
    try:
        write_manifest(recipe, store.entries())
    except OSError as error:
        raise StateError(
            f"cannot write {recipe.output_root / 'manifest.json'}: {error.strerror or error}. "
            "Every image written is recorded in the state store; free some space (or make the "
            "folder writable) and run `fluxbatch render` again to write the manifest. Nothing "
            "is paid twice.") from None
