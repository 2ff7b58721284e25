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
from fluxbatch.execute import (
    PENDING,
    WRITTEN,
    Event,
    Executor,
    Image,
    JobFailed,
    Outcome,
    Settings,
)
from fluxbatch.expand import Job, Plan
from fluxbatch.outbox import Outbox
from fluxbatch.plan import Options, Selection
from fluxbatch.providers import Polled, Submitted
from fluxbatch.state import RootLock, Store
from fluxbatch.transport import Wire
from fluxbatch.write import NotAnImage, provenance, write_image, write_manifest

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

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def reported_usd(self) -> float:
        return sum((o.submitted.cost or 0.0) / 100 for o in self.outcomes
                   if o.submitted is not None and o.submitted.cost is not None)

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(o.status == WRITTEN for o in self.outcomes) \
            and not self.selection.held_unknown and not self.selection.held_moderated


@contextlib.contextmanager
def provider_for(plan: Plan, options: Options, environ: Mapping[str, str],
                 emulator_latency: float | None = None) -> Iterator[providers.Provider]:
    """The provider the recipe names, with the key from the environment; the emulator is
    started on a free loopback port for the duration."""
    spec = plan.recipe.provider
    base_url = options.base_url or spec.base_url
    if spec.name != "emulator":
        url = providers.check_base_url(base_url or str(providers.REGISTRY[spec.name]
                                                       .default_base_url))
        yield providers.build(spec.name, base_url=url, environ=environ)
        return
    from fluxbatch.emulator import EmulatorConfig, EmulatorThread

    if base_url:  # an emulator already running elsewhere (`fluxbatch emulator`)
        yield providers.build("emulator", base_url=providers.check_base_url(base_url),
                              environ=environ)
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
            written, full = await asyncio.to_thread(
                write_image, root, job, image.data, entry,
                previous.path if previous is not None else None)
        except (NotAnImage, imagemeta.ImageFormatError) as error:
            raise JobFailed(f"the provider's image is unusable: {error}") from None
        except OSError as error:
            raise JobFailed(f"cannot write {root / job.output}: "
                          f"{error.strerror or error}") from None
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
            write_manifest(recipe, entries.values())
        return written

    attach = {job.key: Submitted(f.task_id, f.polling_url, f.cost)
              for job, f in selection.attach}
    # Polls are short, so half as many connections as active tasks keep up.
    connections = max(16, settings.account_cap // 2)
    outbox = Outbox(root, provider, lock.fd) if lock is not None and selection.submit else None
    async with Wire(transport) if transport is not None else Wire.open(connections) as wire:
        if outbox is not None:
            await outbox.start()
        executor = Executor(
            provider, wire, journal=StoreJournal(store, provider.info.name, provider.base_url,
                                                   outbox=outbox is not None),
            writer=writer, settings=settings, on_event=on_event,
            submit_via=(lambda job: outbox.sender(job.output, job.key)) if outbox else None)
        started(executor)
        try:
            return await executor.run(selection.jobs, attach)
        finally:
            if outbox is not None:
                await outbox.close()
            write_manifest(recipe, store.entries())
