"""The render pipeline in one place: classify → select → execute → write, with the state
store journaling every step. No printing here: the command layer shows progress from events.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from fluxbatch import models, providers
from fluxbatch.errors import ConfigError, FluxbatchError
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
from fluxbatch.plan import (
    FAILED,
    IN_FLIGHT,
    MISSING,
    MODERATED,
    NEW,
    STALE,
    UNKNOWN,
    UP_TO_DATE,
    Classified,
    classify,
)
from fluxbatch.providers import Polled, Submitted
from fluxbatch.state import InFlight, RootLock, Store
from fluxbatch.write import NotAnImage, provenance, write_image, write_manifest

MANIFEST_INTERVAL = 1.0  # seconds between manifest rewrites while images land


@dataclass(frozen=True, slots=True)
class Options:
    concurrency: int | None = None
    base_url: str | None = None
    force: bool = False
    only: tuple[str, ...] = ()
    retry_unknown: bool = False
    verify: bool = False
    budget: float | None = None
    shard: tuple[int, int] | None = None  # (i, n), 1-based
    task_timeout: float | None = None


@dataclass(slots=True)
class Selection:
    """What a render will do with each planned job."""

    classified: Classified
    submit: list[Job] = field(default_factory=list)
    attach: list[tuple[Job, InFlight]] = field(default_factory=list)
    held_unknown: list[Job] = field(default_factory=list)
    held_moderated: list[Job] = field(default_factory=list)
    up_to_date: int = 0
    filtered_out: int = 0

    @property
    def jobs(self) -> list[Job]:
        return self.submit + [job for job, _ in self.attach]

    def estimated_usd(self) -> float | None:
        total = 0.0
        for job in self.submit:
            cost = models.estimate_cost(job.model, job.request)
            if cost is None:
                return None
            total += cost
        return total


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, like 2/4") from None
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {text!r}: I must be between 1 and N")
    return index, count


def matches_only(job: Job, patterns: Sequence[str]) -> bool:
    """`--only`: a job name, `name=value` on a matrix value (globs allowed), or an output glob."""
    for pattern in patterns:
        if "=" in pattern:
            name, _, wanted = pattern.partition("=")
            if name in job.vars and fnmatch.fnmatchcase(str(job.vars[name]), wanted):
                return True
        elif pattern == job.job or fnmatch.fnmatchcase(job.output, pattern):
            return True
    return False


def in_shard(job: Job, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and edits: by the job's key, not its position."""
    if shard is None:
        return True
    index, count = shard
    return int(job.key[:12], 16) % count == index - 1


def select(classified: Classified, in_flight: Mapping[str, InFlight], options: Options,
           provider: str) -> Selection:
    selection = Selection(classified)
    for job, state in zip(classified.plan.jobs, classified.states, strict=True):
        if (options.only and not matches_only(job, options.only)) or \
                not in_shard(job, options.shard):
            selection.filtered_out += 1
            continue
        flight = in_flight.get(job.key)
        if state == IN_FLIGHT and flight is not None and flight.provider == provider:
            selection.attach.append((job, flight))  # paid for already: never submit again
        elif options.force:
            selection.submit.append(job)
        elif state == UP_TO_DATE:
            selection.up_to_date += 1
        elif state in (NEW, MISSING, STALE, FAILED, IN_FLIGHT):
            selection.submit.append(job)
        elif state == UNKNOWN:
            (selection.submit if options.retry_unknown else selection.held_unknown).append(job)
        elif state == MODERATED:
            selection.held_moderated.append(job)
    return selection


class StoreJournal:
    """The executor's journal, written to the state store (each call one transaction)."""

    def __init__(self, store: Store, provider: str, base_url: str | None) -> None:
        self.store = store
        self.provider = provider
        self.base_url = base_url

    def submitting(self, job: Job) -> None:
        self.store.submitting(job.output, job.key, self.provider, self.base_url)

    def not_sent(self, job: Job) -> None:
        self.store.not_sent(job.output, job.key)

    def submitted(self, job: Job, submitted: Submitted, at: float) -> None:
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
            and not self.selection.held_unknown


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


def classify_with_store(plan: Plan, store: Store, options: Options) -> Classified:
    with store.transaction():
        return classify(plan, store.records(), verify=options.verify, verified=store.touch)


async def execute(plan: Plan, selection: Selection, store: Store,
                  provider: providers.Provider, settings: Settings,
                  on_event: Callable[[Event], None],
                  started: Callable[[Executor], None] = lambda executor: None,
                  transport: httpx.AsyncBaseTransport | None = None,
                  lock: RootLock | None = None) -> list[Outcome]:
    """Run the selection; every step is journaled in `store`, and the manifest is rewritten
    (at most once a second) as images land. With `lock`, paid submits go through the outbox
    process, which inherits the lock and commits each answer before it is used."""
    recipe = plan.recipe
    root = recipe.output_root
    records = store.records()
    last_manifest = [0.0]

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
        except NotAnImage as error:
            raise JobFailed(str(error)) from None
        except OSError as error:
            raise JobFailed(f"cannot write {root / job.output}: "
                          f"{error.strerror or error}") from None
        store.written(job.output, job.key, full, written.mtime_ns)
        if time.monotonic() - last_manifest[0] > MANIFEST_INTERVAL:
            last_manifest[0] = time.monotonic()
            write_manifest(recipe, store.entries())
        return written

    attach = {job.key: Submitted(f.task_id, f.polling_url, f.cost)
              for job, f in selection.attach}
    limits = httpx.Limits(max_connections=max(64, 3 * settings.account_cap),
                          max_keepalive_connections=max(64, 3 * settings.account_cap))
    timeout = httpx.Timeout(60.0, connect=15.0, pool=None)
    outbox = Outbox(root, provider, lock.fd) if lock is not None and selection.submit else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport,
                                 trust_env=False) as client:
        if outbox is not None:
            await outbox.start()
        executor = Executor(
            provider, client, journal=StoreJournal(store, provider.info.name, provider.base_url),
            writer=writer, settings=settings, on_event=on_event,
            submit_via=(lambda job: outbox.sender(job.output, job.key)) if outbox else None)
        started(executor)
        try:
            return await executor.run(selection.jobs, attach)
        finally:
            if outbox is not None:
                await outbox.close()
            write_manifest(recipe, store.entries())


def check_budget(selection: Selection, budget: float | None) -> None:
    if budget is None:
        return
    estimate = selection.estimated_usd()
    if estimate is None:
        raise FluxbatchError(f"--budget {budget}: some models have no published price, so "
                             "the cost cannot be bounded; drop --budget to go ahead")
    if estimate > budget + 1e-9:
        raise FluxbatchError(f"the estimated cost ${estimate:.2f} of {len(selection.submit)} "
                             f"new images is over the budget of ${budget:.2f}; nothing was sent")
