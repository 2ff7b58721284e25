"""Stage 4: run jobs against a provider — submit, poll, download — concurrently, within the
provider's active-task caps, never paying twice for one image.

One `Executor.run` call handles a whole batch, in the render's one event loop (with the
wire under it and the outbox beside it). Each job ends in an `Outcome`, slotted by plan
index; one job's failure never cancels another. Retry rules (see docs/providers.md, "How
requests are retried"):

- slow start: the run's first submit goes alone; the others wait until one was accepted, so a
  bad key, an empty account or a dead host costs one request and one line, not one per image.
  With a budget, the first submit of each model whose cost is not known yet goes alone too,
  so that the provider's answer sets the price the others reserve.
- budget (`money.Budget`): each paid submit reserves its price right before it goes, is
  reconciled to the reported cost, released when refused, refunded when moderated or failed;
  an image that does not fit stops the submits, and what is in flight is still collected.
- submit: 429 means "no slot now" — wait (Retry-After, else jittered exponential backoff)
  and resubmit, lowering the limit only at the account's cap (`pacing.Slots`); a connection that
  could not be opened is safe to retry a few times, after which the host counts as
  unreachable and the run stops; a request that cannot be framed (a forbidden character in a
  header) was never sent, and fails; a 5xx, a reset connection or a read timeout may already
  have been billed, so the job becomes *unknown* and is never re-sent blindly. 401, 403 and
  402 stop the run.
- poll and download (GETs): transient errors are retried with backoff; a redirect to a
  scheme other than http(s) is not retried.
- a task paid for by an earlier run (attached) is polled at once, from the start of the run,
  each on its own: it never waits for a worker, a slot, the slow-start probe or a 429 wait of
  unpaid work. It still holds a slot while the provider works on it (it counts against the
  provider's cap), taken whatever the limit, so new submits wait for it, never it for them.
- a task that was created (maybe billed) but cannot be collected (its polling URL is unusable,
  or may not receive the key) ends *unknown*, held back by the next run, never *failed* and
  paid for again.
- a local fault (the disk is full, the state store cannot be written) stops the run; a task
  already paid for stays recorded as in flight, so the next run collects it for free.
- with a shared store, a submit may find the key claimed by another run (`Claimed`, raised
  by the sender: nothing was sent); it then collects that run's task instead, or raises
  `Elsewhere` when the image comes from the store, awaited once the job's slots are free.
- a pool of accounts (`PoolAccount`, from `--accounts`): each account has its own slots,
  caps and slow-start probe, and its own workers taking jobs from the one queue per model,
  so that each job goes to an account with room. Each task is polled, and downloaded again
  if need be, with the key of the account that paid for it. An account that refuses (its
  key, or out of credits: 401, 403, 402) leaves the pool with one event; the job it refused
  goes back to the queue, and the others go on. Only when no account is left does the run
  stop. The budget, the prices and the run's other limits are the render's, not an
  account's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from fluxbatch import models
from fluxbatch.errors import FluxbatchError
from fluxbatch.jobs import Job
from fluxbatch.money import Budget, BudgetReached, Prices
from fluxbatch.outbox import OutboxGone, Recovered, Unrecorded
from fluxbatch.outcomes import (
    Event,
    EventKind,
    JobFailed,
    LocalFault,
    Outcome,
    OutcomeStatus,
    Written,
)
from fluxbatch.pacing import Durations, Slots, retry_after
from fluxbatch.providers import KeyNotSent, Polled, Provider, Submitted, without_credentials
from fluxbatch.providers import responses as r
from fluxbatch.wire import MAX_IMAGE, NOT_SENT, BodyTooLarge, Wire


@dataclass(frozen=True, slots=True)
class Settings:
    account_cap: int = models.ACCOUNT_CONCURRENCY
    model_caps: Mapping[str, int] = field(default_factory=lambda: dict(models.MODEL_CONCURRENCY))
    first_poll: float = 0.5  # seconds after submitting
    min_poll_interval: float = 0.1  # the floor, whatever progress predicts...
    # ...except for the first few polls aimed at the end that progress predicts: a slot waits
    # for every poll that comes late, and a prediction is often good to a few milliseconds.
    aimed_poll_floor: float = 0.02
    aimed_polls: int = 3
    max_poll_interval: float = 45.0  # a task stuck for 10 minutes: about 25 polls
    poll_growth: float = 0.5  # without progress to go by, wait this share of the time so far
    task_timeout: float = models.TASK_TIMEOUT  # per task, from submit to Ready
    rate_limit_timeout: float = 1800.0  # give up on a job after 429s for this long
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    connect_attempts: int = 3  # then the host counts as unreachable and the run stops
    get_attempts: int = 8
    not_found_attempts: int = 3
    download_grace: float = 10.0  # on Ctrl-C, how long in-flight downloads may finish
    max_image: int = MAX_IMAGE  # bytes; a larger sample is refused as it streams in


@dataclass(frozen=True, slots=True)
class Image:
    """A downloaded image, spooled to a file, before it is written."""

    path: Path
    size: int
    sha256: str
    content_type: str | None

    def read(self) -> bytes:
        return self.path.read_bytes()


class Journal(Protocol):
    """Where lifecycle changes are recorded, each durably, before the next step."""

    def reserve(self, job: Job, usd: float | None, account: str | None = None) -> None: ...

    def submitting(self, job: Job, account: str | None = None) -> None: ...

    def not_sent(self, job: Job) -> None: ...

    def submitted(self, job: Job, submitted: Submitted, at: float) -> None: ...

    def ready(self, job: Job, polled: Polled) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...


Writer = Callable[[Job, Image, Outcome], Awaitable[Written | None]]
Sender = Callable[[httpx.Request], Awaitable[httpx.Response]]


class Claimed(Exception):  # (not an error: the image comes by another road)
    """A sender's answer: the shared store holds the key (another run claimed it), and nothing
    was sent. `settle()` gives that run's task to collect (paid through the account that
    submits this job), or raises `Elsewhere`."""

    def __init__(self, settle: Callable[[], Awaitable[Submitted]]) -> None:
        super().__init__("claimed")
        self.settle = settle


class Elsewhere(Exception):  # (not an error: the image comes by another road)
    """A sender's settling: this job's image comes from the shared store (another run holds
    it, or is making it), or that run's task is collected through another account of the
    pool. `outcome` is awaited once the job's slots are free; it ends the job."""

    def __init__(self, outcome: Awaitable[Outcome]) -> None:
        super().__init__("elsewhere")
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class PoolAccount:
    """One account of the pool: its name (None: the provider's own key variable, the only
    account), the provider built with its key, its caps, and the variable that holds its key
    (for messages)."""

    name: str | None
    provider: Provider
    cap: int
    model_caps: Mapping[str, int]
    key_env: str | None = None


class _Lane:
    """An account as the executor drives it: its slots, and its slow start (until one of its
    submits is accepted, they go one at a time: a wrong key or an empty account costs one
    request)."""

    def __init__(self, account: PoolAccount, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.name = account.name
        self.provider = account.provider
        self.key_env = account.key_env
        self.cap = account.cap
        self.model_caps = account.model_caps
        self.slots = Slots(account.cap, clock, sleep)
        self.model_slots: dict[str, Slots] = {}
        self._clock, self._sleep = clock, sleep
        self.accepted = asyncio.Event()
        self.probe = asyncio.Lock()
        self.out: str | None = None  # why it left the pool
        # Jobs its workers took from the queue that do not hold their slots yet, in all and
        # per model: a worker takes a job only when there is room beyond these, so that
        # each job goes to an account with room for it.
        self.claims = 0
        self.model_claims: Counter[str] = Counter()

    async def claim(self, model: str) -> None:
        """Wait for room for one more job of `model`, and claim it (see `claims`)."""
        while True:
            await self.slots.room(lambda: self.claims)
            await self.model(model).room(lambda: self.model_claims[model])
            if self.slots.held + self.claims < self.slots.limit or self.out is not None:
                break  # (the room for the account may have gone while waiting for the model)
        self.claims += 1
        self.model_claims[model] += 1

    async def unclaim(self, model: str, *, taken: bool) -> None:
        """Its job took its slots (`taken`), or let its claim go: then others may claim."""
        self.claims -= 1
        self.model_claims[model] -= 1
        if not taken:
            for slots in self.both(model):
                await slots.nudge()

    def model(self, model: str) -> Slots:
        slots = self.model_slots.get(model)
        if slots is None:
            cap = min(self.model_caps.get(model, self.cap), self.cap)
            slots = self.model_slots[model] = Slots(cap, self._clock, self._sleep)
        return slots

    def both(self, model: str) -> tuple[Slots, Slots]:
        return self.slots, self.model(model)


class _Claim:
    """A worker's claim on room in its account, let go once (when its job takes its slots,
    or never gets that far)."""

    def __init__(self, lane: _Lane, model: str) -> None:
        self.lane, self.model = lane, model
        self.held = True

    async def release(self, *, taken: bool) -> None:
        if self.held:
            self.held = False
            await self.lane.unclaim(self.model, taken=taken)



class _Fatal(Exception):
    """The run cannot go on: the provider refused the account (bad key, no credits), the
    host cannot be reached, or this machine cannot record results. Stop submitting."""


class _Refused(_Fatal):
    """The provider refused an account (its key, or out of credits): that account leaves the
    pool; the run stops only when none is left."""


class _LaneOut(Exception):
    """The job's account left the pool before its submit went: it goes back to the queue."""


class _Unknown(Exception):
    """A submit whose outcome cannot be known: it may have been billed. When the cause is
    run-wide (`stops_run`: the state store cannot record answers), the run stops too."""

    def __init__(self, message: str, *, stops_run: bool = False) -> None:
        super().__init__(message)
        self.stops_run = stops_run


class Unusable(JobFailed):
    """The downloaded bytes are not an image fluxbatch can store (a writer raises it): the
    task is polled again for a fresh URL and downloaded again, never paid for again."""


class _Oversized(JobFailed):
    """The sample is over the size limit: a fresh URL would not make it smaller."""


class _Gone(JobFailed):
    """The provider no longer knows the task (results expire)."""


class _Pending(Exception):
    """Submitted, but the result was not learned in this run."""


class _Skipped(Exception):
    """Never accepted by the provider (interrupted between 429 retries, say)."""


# Why an image was not submitted: the next one did not fit in the budget.
BUDGET_REACHED = "not submitted: the budget is reached"


class Executor:
    def __init__(self, provider: Provider, wire: Wire, *, journal: Journal,
                 writer: Writer, settings: Settings | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 submit_via: Callable[[Job, str | None], Sender] | None = None,
                 spool: Path | None = None,
                 prepare: Callable[[Job], Awaitable[Mapping[str, object]]] | None = None,
                 budget: Budget | None = None, prices: Prices | None = None,
                 accounts: Sequence[PoolAccount] | None = None) -> None:
        self.provider = provider
        self.wire = wire
        self.journal = journal
        self.writer = writer
        self.settings = settings or Settings()
        self.on_event = on_event or (lambda event: None)
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        # How a paid submit is sent (`submit_via(job, account)`): by default over the wire;
        # the render pipeline passes the outbox, which commits each answer in the state store
        # before returning it.
        self.submit_via = submit_via
        self.spool = spool  # where downloads land before the writer reads them
        # The body as sent, made when the job's turn comes (its image inputs read, checked
        # and encoded then, so no more of them are in memory than requests in flight); it
        # raises JobFailed when an input cannot be sent.
        self.prepare = prepare
        self._elsewhere: dict[int, Awaitable[Outcome]] = {}  # by id() of the job's outcome
        # The pool: one account (the provider's own key) unless several are given.
        pool = accounts or [PoolAccount(None, provider, self.settings.account_cap,
                                        self.settings.model_caps, provider.info.key_env)]
        self.lanes = [_Lane(account, clock, sleep) for account in pool]
        self._lanes = {lane.name: lane for lane in self.lanes}
        self.pooled = accounts is not None  # accounts named by the operator
        self.durations = Durations()
        self.reports_progress: set[str] = set()  # models whose polls carry `progress`
        self.stopping = False
        self.fatal: str | None = None
        self._downloading: set[asyncio.Task[object]] = set()
        # Every job taken up so far, as its outcome stands (what a render stopped at once,
        # its executor cancelled, still has to report: see `so_far`).
        self._taken: list[Outcome] = []
        # Downloads and writes at once, paid tasks all (attached ones are not bounded by
        # workers): as many as the workers of one model could run before attaching was apart.
        # (With a pool, as many as all its accounts' workers could.)
        self._collecting = asyncio.Semaphore(2 * sum(lane.cap for lane in self.lanes))
        self._stop_event = asyncio.Event()
        # Slow start: until one submit of an account is accepted, its submits go one at a time
        # (`_Lane`); with a budget, also until a model's cost is known, that model's submits
        # (`_probe_turn`).
        self._model_probes: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._probers: dict[asyncio.Lock, Job] = {}  # the job that holds each probe
        self.budget = budget
        self.prices = prices or Prices()

    @property
    def account(self) -> Slots:
        """The first account's slots (the only one's, without a pool)."""
        return self.lanes[0].slots

    @property
    def model_slots(self) -> dict[str, Slots]:
        return self.lanes[0].model_slots

    def in_flight(self) -> dict[str | None, int]:
        """Tasks in flight per account of the pool (accepted or attached, not yet ended)."""
        return {lane.name: lane.slots.held for lane in self.lanes}

    @property
    def accounts_out(self) -> dict[str, str]:
        """The accounts that left the pool, and why."""
        return {lane.name or "": lane.out.removeprefix(_whose(lane.name))
                for lane in self.lanes if lane.out is not None}

    def is_stopping(self) -> bool:
        return self.stopping

    def so_far(self) -> list[Outcome]:
        """The outcome of every job taken up so far: ended ones as they ended, the others
        as they stand (`finished_at` unset: submitted, or not yet). For a run cancelled
        before `run` could return."""
        return list(self._taken)

    def stop(self) -> None:
        """Stop submitting; in-flight polls end as *pending* (re-attached next run)."""
        self.stopping = True
        self._stop_event.set()

    async def run(self, jobs: Sequence[Job],
                  attach: Mapping[str, Submitted] | None = None,
                  paid_by: Mapping[str, str | None] | None = None) -> list[Outcome]:
        """Run every job; `attach` maps a job key to a task submitted by an earlier run,
        which is polled again instead of paid for again, with the key of the account that
        paid for it (`paid_by`, by job key; none: the provider's own key). Returns outcomes in
        job order."""
        attach = attach or {}
        paid_by = paid_by or {}
        outcomes: list[Outcome | None] = [None] * len(jobs)
        queues: dict[str, deque[int]] = defaultdict(deque)
        collecting = []
        for position, job in enumerate(jobs):
            earlier = attach.get(job.key)
            if earlier is None:
                queues[job.model].append(position)
                continue
            lane = self._lanes.get(paid_by.get(job.key))
            if lane is None:  # (the selection holds such a task back: never another's key)
                outcomes[position] = self._not_ours(job, earlier, paid_by.get(job.key))
                continue
            # Paid already, and perhaps about to expire: polled now, on its own, whatever -j
            # is. Its slots are taken at once, even past the limit (the provider may still
            # be working on it, and counts it), so that new submits wait for it, not it for
            # them.
            for slot in lane.both(job.model):
                slot.hold()
            collecting.append(self._collect(position, job, earlier, outcomes, lane))
        submitting = asyncio.ensure_future(self._submit_all(queues, jobs, outcomes))
        await asyncio.gather(*collecting, submitting)
        return [o if o is not None else Outcome(jobs[i], OutcomeStatus.SKIPPED,
                                                "not started")
                for i, o in enumerate(outcomes)]

    async def _submit_all(self, queues: dict[str, deque[int]], jobs: Sequence[Job],
                          outcomes: list[Outcome | None]) -> None:
        """Workers for each account and model take the queues' jobs. A job an account
        refused goes back to its queue; should the accounts still in the pool have finished
        meanwhile, workers start again for what is left."""
        while any(queues.values()):
            workers = []
            lanes = [lane for lane in self.lanes if lane.out is None] or self.lanes[:1]
            for model, queue in queues.items():
                # Twice the cap: a worker that is downloading must not hold back the next
                # submit. Started in turn, account by account, so that each takes its share.
                counts = [min(len(queue), 2 * lane.model(model).cap) for lane in lanes]
                for turn in range(max(counts)):
                    workers += [self._worker(queue, jobs, outcomes, lane)
                                for lane, count in zip(lanes, counts, strict=True)
                                if turn < count]
            await asyncio.gather(*workers)

    async def _collect(self, position: int, job: Job, earlier: Submitted,
                       outcomes: list[Outcome | None], lane: _Lane) -> None:
        """A task of an earlier run, its slots already held: polled until it ends (even after
        a stop, when it ends pending at once, and stays recorded)."""
        outcomes[position] = await self._attempt(job, earlier, None, lane, held=True)

    async def _worker(self, queue: deque[int], jobs: Sequence[Job],
                      outcomes: list[Outcome | None], lane: _Lane) -> None:
        while queue:
            if lane.out is not None and not self.fatal:
                return  # (the accounts still in the pool take the rest)
            if self.stopping or self.fatal or self.budget_reached:
                position = queue.popleft()
                reason = self.fatal or (BUDGET_REACHED if self.budget_reached else
                                        "interrupted before it was submitted")
                outcomes[position] = self._finish(Outcome(jobs[position], OutcomeStatus.SKIPPED,
                                                          reason))
                continue
            model = jobs[queue[0]].model
            await lane.claim(model)  # (only with room for it: then the job is this account's)
            claim = _Claim(lane, model)
            try:
                if not queue:
                    return
                position = queue.popleft()
                try:
                    outcomes[position] = await self._run_job(jobs[position], lane, claim)
                except _LaneOut:
                    queue.appendleft(position)  # another account takes it
            finally:
                await claim.release(taken=False)

    @property
    def budget_reached(self) -> bool:
        return self.budget is not None and self.budget.reached

    async def _run_job(self, job: Job, lane: _Lane, claim: _Claim | None = None) -> Outcome:
        # Slow start: a probe waits for its turn before taking a slot, so that a probe waiting
        # out a 429 gets its slot back.
        probe = await self._probe_turn(job.model, lane)
        if probe is not None:
            self._probers[probe] = job
        try:
            if lane.out is not None:
                raise _LaneOut
            if self.budget is not None:
                price = self.prices.reserve(job.model, job.request)
                try:
                    if price is None:  # (the pre-check refuses such a render: fail closed)
                        raise BudgetReached
                    await self.budget.reserve(job.key, price)
                except BudgetReached:
                    return self._finish(Outcome(job, OutcomeStatus.SKIPPED, BUDGET_REACHED))
            outcome = await self._attempt(job, None, probe, lane, claim=claim)
        finally:
            self._end_probe(probe, job)
        elsewhere = self._elsewhere.pop(id(outcome), None)
        if elsewhere is None:
            return outcome
        return await self._from_elsewhere(elsewhere)

    def _end_probe(self, probe: asyncio.Lock | None, job: Job) -> None:
        """Let the next submit go, if `job` holds `probe` (and only then: once released,
        another job may hold it)."""
        if probe is not None and self._probers.get(probe) is job:
            del self._probers[probe]
            probe.release()

    async def _from_elsewhere(self, coming: Awaitable[Outcome]) -> Outcome:
        """A job whose image comes from the shared store, its slots free: its outcome as the
        store's waiter gives it (finished already when it collected a task through `collect`)."""
        outcome = await coming
        if outcome.finished_at is not None:
            return outcome
        self._taken.append(outcome)
        return self._finish(outcome)

    async def collect(self, job: Job, submitted: Submitted,
                      account: str | None = None) -> Outcome:
        """Collect a task paid for by another run through `account` (an account of the pool;
        None: the provider's own key), found after this one started: as a task of an earlier
        run, polled with that account's key, its slots taken at once."""
        lane = self._lanes.get(account)
        if lane is None:
            return self._not_ours(job, submitted, account)
        for slot in lane.both(job.model):
            slot.hold()
        return await self._attempt(job, submitted, None, lane, held=True)

    def _not_ours(self, job: Job, submitted: Submitted, account: str | None) -> Outcome:
        """A task paid through an account this run does not use: never polled with another
        account's key, so left pending, with why."""
        return self._finish(Outcome(
            job, OutcomeStatus.PENDING, f"paid through {_paid_by(account)}, which this run "
            "does not use: only its own key polls it", submitted=submitted))

    def _calibrated(self, model: str, lane: _Lane) -> bool:
        return lane.accepted.is_set() and (self.budget is None or self.prices.known(model))

    async def _probe_turn(self, model: str, lane: _Lane) -> asyncio.Lock | None:
        """Wait until this submit may go: None when others may go beside it, else the lock
        it holds as a probe. Until one submit of the account was accepted, one goes at a time
        (a bad key, an empty account or an unreachable host is learned from one request, not
        from one per image); with a budget, until a model's cost is known, one of that model
        at a time (its answer sets the price the others reserve)."""
        while not self._calibrated(model, lane) and lane.out is None:
            account_wide = not lane.accepted.is_set()
            lock = lane.probe if account_wide else self._model_probes[model]
            await lock.acquire()
            if self._calibrated(model, lane) or (account_wide and lane.accepted.is_set()) \
                    or lane.out is not None:
                lock.release()
                continue
            return lock
        return None

    async def _attempt(self, job: Job, earlier: Submitted | None,
                       probe: asyncio.Lock | None, lane: _Lane, *,
                       held: bool = False, claim: _Claim | None = None) -> Outcome:
        """Submit (or, with `earlier`, attach) and poll, within a slot (`held`: taken
        already); then download and write."""
        outcome = Outcome(job, OutcomeStatus.PENDING, account=lane.name)
        self._taken.append(outcome)
        slots = lane.both(job.model)
        if not held:
            for slot in slots:
                await slot.acquire()
            if claim is not None:
                await claim.release(taken=True)
        try:
            if earlier is None:
                try:
                    outcome.submitted = await self._paid_submit(job, lane)
                except Claimed as claimed:  # another run's task, to collect: not paid again
                    earlier = await claimed.settle()
                    self._end_probe(probe, job)
            if earlier is None:
                assert outcome.submitted is not None
                if probe is not None:
                    lane.accepted.set()
                    self._end_probe(probe, job)
                outcome.submitted_at = time.time()
                self.journal.submitted(job, outcome.submitted, outcome.submitted_at)
                self.on_event(Event(EventKind.SUBMITTED, job, cost=outcome.submitted.cost,
                                    account=lane.name))
            else:
                outcome.submitted = earlier
                for slot in slots:
                    slot.attached()
                self.on_event(Event(EventKind.ATTACHED, job, account=lane.name))
            outcome.polled = await self._poll(job, outcome.submitted, lane,
                                              attached=earlier is not None)
        except _Unknown as error:
            if error.stops_run:
                self.fatal = self.fatal or str(error)
            outcome.status, outcome.reason = OutcomeStatus.UNKNOWN, str(error)
            return self._finish(outcome)
        except JobFailed as error:
            outcome.status = OutcomeStatus.GONE if isinstance(error, _Gone) \
                else OutcomeStatus.FAILED
            outcome.reason = str(error)
            return self._finish(outcome)
        except _LaneOut:
            self._taken.remove(outcome)
            raise
        except (_Fatal, FluxbatchError) as error:  # (FluxbatchError: the journal failed)
            if isinstance(error, _Refused) and await self._leave(lane, job, str(error)):
                if outcome.submitted is None:  # refused, nothing created: another account
                    self._taken.remove(outcome)
                    raise _LaneOut from None
            else:
                self.fatal = self.fatal or str(error)
            # A task refused while polling was submitted (maybe paid): keep it re-attachable.
            outcome.status = OutcomeStatus.SKIPPED if outcome.submitted is None \
                else OutcomeStatus.PENDING
            outcome.reason = str(error)
            return self._finish(outcome)
        except _Pending as error:
            outcome.status, outcome.reason = OutcomeStatus.PENDING, str(error)
            return self._finish(outcome)
        except _Skipped as error:
            outcome.status, outcome.reason = OutcomeStatus.SKIPPED, str(error)
            return self._finish(outcome)
        except Elsewhere as elsewhere:  # (awaited by `_run_job`, once the slots are free)
            self._taken.remove(outcome)
            self._elsewhere[id(outcome)] = elsewhere.outcome
            return outcome
        finally:
            for slot in slots:
                await slot.release()
        return await self._conclude(job, outcome, lane)

    async def _leave(self, lane: _Lane, job: Job, reason: str) -> bool:
        """The provider refused `lane`'s account: it leaves the pool (once). True when other
        accounts are still in it; when none is, the run stops (`fatal`)."""
        if lane.out is None:
            lane.out = reason
            for slot in (lane.slots, *lane.model_slots.values()):
                await slot.close()  # (its waiting workers wake, and hand their jobs back)
            if self.pooled:
                self.on_event(Event(EventKind.ACCOUNT_OUT, job, reason, account=lane.name))
        if any(other.out is None for other in self.lanes):
            return True
        if not self.pooled:
            self.fatal = self.fatal or reason
        else:
            self.fatal = self.fatal or "no account of the pool is left: " + "; ".join(
                f"{other.out}" for other in self.lanes)
        return False

    async def _conclude(self, job: Job, outcome: Outcome, lane: _Lane) -> Outcome:
        polled = outcome.polled
        assert polled is not None and outcome.submitted is not None
        if polled.status != r.READY and self.budget is not None:
            await self.budget.refund(job.key)  # (moderated or failed: not billed)
        if polled.status in r.MODERATED:
            outcome.status = OutcomeStatus.MODERATED
            outcome.reason = r.with_details(polled.status, polled.details)
            return self._finish(outcome)
        if polled.status != r.READY:
            outcome.status = OutcomeStatus.FAILED
            outcome.reason = r.with_details(f"the task ended with status {polled.status!r}",
                                           polled.details)
            return self._finish(outcome)
        try:
            self.journal.ready(job, polled)
            # (its slot is free: only the download is left)
            self.on_event(Event(EventKind.READY, job))
        except FluxbatchError as error:
            self.fatal = self.fatal or str(error)
            outcome.status, outcome.reason = OutcomeStatus.PENDING, str(error)
            return self._finish(outcome)
        task = asyncio.ensure_future(self._bounded_download(job, outcome, lane))
        self._downloading.add(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Interrupted: give the download a little time to land, then let it go.
            await asyncio.wait({task}, timeout=self.settings.download_grace)
            if task.done() and not task.cancelled():
                return task.result()
            task.cancel()
            raise
        finally:
            self._downloading.discard(task)

    async def _bounded_download(self, job: Job, outcome: Outcome, lane: _Lane) -> Outcome:
        async with self._collecting:
            return await self._download_and_write(job, outcome, lane)

    async def _download_and_write(self, job: Job, outcome: Outcome, lane: _Lane) -> Outcome:
        image = None
        try:
            image = await self._download(job, outcome, lane)
            try:
                outcome.written = await self.writer(job, image, outcome)
            except Unusable:  # (a truncated download, say): a fresh URL, once more
                image.path.unlink(missing_ok=True)
                await self._fresh_sample(job, outcome, lane)
                image = await self._download(job, outcome, lane)
                outcome.written = await self.writer(job, image, outcome)
        except _Gone as error:  # the provider forgot the task: only now may it be paid again
            outcome.status, outcome.reason = OutcomeStatus.GONE, str(error)
            return self._finish(outcome)
        except _Unknown as error:  # (a fresh poll that cannot be sent): held, never paid again
            outcome.status, outcome.reason = OutcomeStatus.UNKNOWN, str(error)
            return self._finish(outcome)
        except JobFailed as error:
            # Ready means paid. Bytes that could not be fetched (an expired or broken URL, a
            # delivery host down, an image over the limit) or not used are fetched again by
            # the next run, from a fresh poll: never paid for again while the task exists.
            outcome.status = OutcomeStatus.PENDING
            outcome.reason = f"{str(error).rstrip('.')}; the next run downloads it again " \
                             "without paying (or --force pays for a new one)"
            return self._finish(outcome)
        except LocalFault as error:  # paid and ready, but not storable here: collect it later
            if error.stops_run:
                self.fatal = self.fatal or str(error)
            outcome.status = OutcomeStatus.PENDING
            outcome.reason = f"{error}; the task is recorded and the next run collects it " \
                             "without paying again"
            return self._finish(outcome)
        except (_Pending, _Fatal, FluxbatchError) as error:  # a fresh poll, or the journal
            if isinstance(error, _Refused):
                await self._leave(lane, job, str(error))
            elif not isinstance(error, _Pending):
                self.fatal = self.fatal or str(error)
            outcome.status, outcome.reason = OutcomeStatus.PENDING, str(error)
            return self._finish(outcome)
        finally:
            if image is not None:
                with contextlib.suppress(OSError):
                    image.path.unlink()
        outcome.status = OutcomeStatus.WRITTEN
        return self._finish(outcome)

    def _finish(self, outcome: Outcome) -> Outcome:
        outcome.finished_at = time.time()
        try:
            self.journal.finished(outcome)
        except FluxbatchError as error:
            self.fatal = self.fatal or str(error)
        self.on_event(Event(outcome.status, outcome.job, outcome.reason,
                            outcome.submitted.cost if outcome.submitted else None,
                            account=outcome.account))
        return outcome

    # -- submit --------------------------------------------------------------------------

    async def _paid_submit(self, job: Job, lane: _Lane) -> Submitted:
        """`_submit`, with its reservation reconciled: to the reported cost when accepted;
        spent when the answer was lost; released when it was refused or never left."""
        budget = self.budget
        try:
            submitted = await self._submit(job, lane)
        except _Unknown:
            if budget is not None:
                await budget.unknown(job.key)
            raise
        except BaseException:
            if budget is not None:
                await budget.release(job.key)
            raise
        cost = submitted.cost / 100 if submitted.cost is not None else None
        self.prices.learn(job.model, job.request, cost)
        if budget is not None:
            await budget.settle(job.key, cost)
        return submitted

    async def _submit(self, job: Job, lane: _Lane) -> Submitted:
        if lane.out is not None:
            raise _LaneOut
        body = job.request if self.prepare is None else await self.prepare(job)
        request = lane.provider.submit_request(job.model, body)
        del body  # (the request holds the encoded body; this would be a second copy)
        send = self.submit_via(job, lane.name) if self.submit_via is not None \
            else self.wire.send
        started = self.clock()
        connect_failures = 0
        rate_limited = 0
        while True:
            if self.fatal:
                raise _Fatal(self.fatal)
            if self.stopping:
                raise _Skipped("interrupted before the provider accepted it")
            if lane.out is not None:  # (it left the pool during a 429's wait)
                raise _LaneOut
            # What it may cost, in the ledger before it leaves (a run killed now still counts
            # it); the answer settles it.
            self.journal.reserve(job, self.budget.held.get(job.key) if self.budget else None,
                                 lane.name)
            if self.submit_via is None:  # (the outbox records this itself, right before sending)
                # until the answer comes, the outcome is unknown
                self.journal.submitting(job, lane.name)
            try:
                response = await send(request)
            except Recovered as recovered:  # the outbox died after committing the answer
                return recovered.submitted
            except Unrecorded as error:  # answered, but the answer is not in the ledger
                raise _Unknown(str(error), stops_run=True) from None
            except OutboxGone as error:
                raise _Fatal(str(error)) from None
            except httpx.LocalProtocolError as error:  # not sent, and sending again won't help
                self.journal.not_sent(job)
                raise JobFailed(f"the submit could not be sent: {r.describe_error(error)}") \
                    from None
            except NOT_SENT as error:  # the request never reached the server: send it again
                self.journal.not_sent(job)
                connect_failures += 1
                if connect_failures >= self.settings.connect_attempts:
                    raise _Fatal(f"cannot reach {without_credentials(lane.provider.base_url)}: "
                                 f"{r.unreachable_reason(error)}{r.network_hint(error)}") \
                        from None
                await self._pause(self._backoff(connect_failures))
                continue
            except httpx.RequestError as error:  # it left: a reset, a timeout, a huge answer
                raise _Unknown(f"the submit may have reached the provider, but its answer was "
                               f"lost ({r.describe_error(error)})") from None
            if response.status_code == 429:
                self.journal.not_sent(job)  # 429: rejected, not processed, not billed
                rate_limited += 1
                for slot in lane.both(job.model):
                    slot.rate_limited()
                if self.clock() - started > self.settings.rate_limit_timeout:
                    raise JobFailed(f"still rate-limited (429) after "
                                    f"{self.settings.rate_limit_timeout:.0f} s; gave up")
                delay = retry_after(response) or self._backoff(rate_limited)
                self.on_event(Event(EventKind.RATE_LIMITED, job,
                                    f"429; retrying in {delay:.1f} s"))
                await self._wait_outside_slots(job, delay, lane)
                continue
            if response.is_success:
                try:
                    submitted = lane.provider.read_submitted(response)
                except r.BadResponse as error:
                    raise _Unknown(str(error)) from None
                for slot in lane.both(job.model):
                    await slot.succeeded()
                return submitted
            refusal = _submit_error(response, lane.key_env, lane.name)
            if isinstance(refusal, JobFailed | _Fatal):
                self.journal.not_sent(job)  # a 4xx: refused, nothing was created
            raise refusal

    async def _wait_outside_slots(self, job: Job, delay: float, lane: _Lane) -> None:
        slots = lane.both(job.model)
        for slot in slots:
            await slot.release()
        try:
            await self._pause(delay)
        finally:
            for slot in slots:
                await slot.acquire()

    async def pause(self, delay: float) -> None:
        """Sleep, but wake at once when the run is being stopped (for those that wait on the
        executor's behalf: the shared store's waiters)."""
        await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Sleep, but wake at once when the run is being stopped."""
        if self.stopping:
            return
        sleeper = asyncio.ensure_future(self.sleep(delay))
        stopper = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the render itself is cancelled (`arender`'s task, a second Ctrl-C):
            # a waiter left pending is destroyed with the executor, and asyncio prints "Task
            # was destroyed but it is pending!" on the user's terminal.
            sleeper.cancel()
            stopper.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)

    def _backoff(self, attempt: int) -> float:
        """Jittered exponential backoff: uniform in [c/4, c], c = min(cap, base * 2**attempt)."""
        ceiling = min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** attempt)
        return self.rng.uniform(ceiling / 4, ceiling)

    # -- poll ----------------------------------------------------------------------------

    async def _poll(self, job: Job, submitted: Submitted, lane: _Lane, *,
                    attached: bool = False) -> Polled:
        """Poll until the task ends. A task of an earlier run (`attached`) is looked at at
        once: it was submitted long ago, and its result may be about to expire."""
        started = self.clock()
        delay = 0.0 if attached else self.settings.first_poll
        typical = self.durations.typical(job.model)
        if typical is not None and job.model not in self.reports_progress and not attached:
            # No progress to predict from: the first look near the usual duration. (With
            # progress, an early first look tells exactly when to look again.)
            delay = max(delay, 0.9 * typical)
        not_found = 0
        aimed = 0  # polls aimed at a predicted end, which may come sooner than the floor
        seen: tuple[float, float] | None = None  # (elapsed, progress) when progress last grew
        while True:
            if self.stopping:
                raise _Pending("interrupted while waiting for the result; the task is recorded "
                               "and a re-run picks it up without paying again")
            if delay > 0:
                await self._pause(delay)
            if self.is_stopping():
                continue
            polled = await self._get_poll(job, submitted, lane)
            elapsed = self.clock() - started
            if polled.status == r.READY or polled.status in r.MODERATED or \
                    polled.status in r.FAILED:
                if polled.status == r.READY and not attached:  # (its start is not known)
                    self.durations.add(job.model, elapsed)
                return polled
            if polled.status == r.TASK_NOT_FOUND:
                # Right after a submit, a regional cluster may not know the task yet; only
                # answers in a row count (a Pending in between shows the task is alive).
                not_found += 1
                if not_found >= self.settings.not_found_attempts:
                    raise _forgotten(submitted)
                delay = self._backoff(not_found)
                continue
            not_found = 0
            if elapsed > self.settings.task_timeout:
                raise _Pending(f"still {polled.status!r} after {elapsed:.0f} s; the task is "
                               "recorded and a re-run picks it up without paying again")
            progress = polled.progress
            grew = progress is not None and 0.02 < progress < 1 and \
                (seen is None or progress > seen[1])
            aim = grew and aimed < self.settings.aimed_polls
            aimed += aim
            floor = self.settings.aimed_poll_floor if aim else self.settings.min_poll_interval
            delay = self._next_poll(job.model, elapsed, progress if grew else None, seen, floor)
            if grew:
                assert progress is not None
                seen = (elapsed, progress)

    def _next_poll(self, model: str, elapsed: float, progress: float | None,
                   seen: tuple[float, float] | None, floor: float) -> float:
        """When to look again. With progress that grew since the last look, aim just past the
        end its rate predicts; otherwise (no progress, or progress that stalls) back off
        geometrically, so a long or stuck task is polled a few dozen times at most."""
        settings = self.settings
        if progress is not None:
            self.reports_progress.add(model)
            since, before = seen if seen is not None else (0.0, 0.0)
            rate = (progress - before) / max(elapsed - since, 1e-9)
            delay = (1 - progress) / rate + 0.01  # just past the predicted end
        else:
            typical = self.durations.typical(model)
            if typical is not None and elapsed < typical:
                delay = typical - elapsed + settings.min_poll_interval
            else:
                delay = elapsed * settings.poll_growth
        return min(max(delay, floor), settings.max_poll_interval)

    async def _get_poll(self, job: Job, submitted: Submitted, lane: _Lane) -> Polled:
        """One poll, with the key of the account that paid for the task."""
        try:
            build = functools.partial(lane.provider.poll_request, submitted)
            response = await self._get(build, "poll", job, pending_on_failure=True,
                                       lane=lane)
        except (KeyNotSent, httpx.InvalidURL) as error:
            # The task exists and may be billed, but cannot be collected: its polling URL
            # cannot be sent (a line break in the task id), or would take the key where it
            # must not go. Not "failed": that would be paid for again at every run (the
            # provider would answer the same way each time). Held back as unknown, the user
            # decides with --retry-unknown.
            problem = str(error) if isinstance(error, KeyNotSent) else \
                f"the provider gave an unusable polling URL ({r.printable(str(error))})"
            raise _Unknown(f"{problem}; the task was created and may have been billed, but "
                           "cannot be collected") from None
        try:
            return lane.provider.read_polled(response)
        except r.BadResponse as error:
            raise _Pending(f"unreadable poll answer ({error}); a re-run retries") from None

    # -- download ------------------------------------------------------------------------

    async def _download(self, job: Job, outcome: Outcome, lane: _Lane) -> Image:
        assert outcome.polled is not None and outcome.submitted is not None
        for attempt in (1, 2):
            sample = outcome.polled.sample
            if not sample:
                raise JobFailed("the task is Ready but its result has no sample URL")
            try:
                return await self._fetch(job, sample)
            except JobFailed as error:
                if attempt == 2 or isinstance(error, _Oversized):
                    raise
                # A signed URL expires (~10 minutes): ask for the result again.
                await self._fresh_sample(job, outcome, lane)
        raise AssertionError("unreachable")

    async def _fresh_sample(self, job: Job, outcome: Outcome, lane: _Lane) -> None:
        """Poll a Ready task again, for a fresh sample URL."""
        assert outcome.submitted is not None
        outcome.polled = await self._get_poll(job, outcome.submitted, lane)
        status = outcome.polled.status
        if status == r.TASK_NOT_FOUND:
            raise _forgotten(outcome.submitted)
        if status != r.READY:
            raise JobFailed(f"the sample URL failed and the task is now {status!r}")

    async def _fetch(self, job: Job, sample: str) -> Image:
        """The sample, streamed into a spool file (retried on transient failures)."""
        try:
            url = httpx.URL(sample)  # (parsed once: httpx checks every character)
        except httpx.InvalidURL as error:
            raise JobFailed(f"download: the provider gave an unusable URL ({error})") from None
        attempts = self.settings.get_attempts
        problem = ""
        for attempt in range(1, attempts + 1):
            try:
                spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 (kept past this block)
                    dir=self.spool, prefix="download-", suffix=".part", delete=False)
            except OSError as error:
                raise LocalFault.from_os_error("cannot store a download", error) from None
            path = Path(spool.name)
            try:
                with spool:
                    done = await self.wire.download(httpx.Request("GET", url), spool,
                                                    limit=self.settings.max_image)
            except BodyTooLarge as error:
                os.unlink(path)
                raise _Oversized(f"download failed: {error}") from None
            except httpx.UnsupportedProtocol as error:  # (redirected to ftp://): not retried
                os.unlink(path)
                raise JobFailed(f"download failed: {r.describe_error(error)}") from None
            except httpx.RequestError as error:  # transport, decoding, redirect loops
                os.unlink(path)
                problem = r.describe_error(error)
            except OSError as error:  # writing the spool file
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise LocalFault.from_os_error("cannot store a download", error) from None
            else:
                response = done.response
                if response.is_success:
                    return Image(path, done.size, done.sha256,
                                 response.headers.get("content-type"))
                os.unlink(path)
                problem = r.error_message(response)
                if response.status_code not in (408, 425, 429) and response.status_code < 500:
                    raise JobFailed(f"download failed: {problem}")
                delay = retry_after(response)
                if delay is not None:
                    await self.sleep(delay)
                    continue
            if attempt < attempts:
                self.on_event(Event(EventKind.RETRY, job, f"download: {problem}"))
                await self.sleep(self._backoff(attempt))
        plural = "s" if attempts > 1 else ""
        raise JobFailed(f"download failed after {attempts} attempt{plural}: {problem}")

    async def _get(self, build: Callable[[], httpx.Request], what: str, job: Job, *,
                   pending_on_failure: bool, lane: _Lane | None = None) -> httpx.Response:
        """A GET with retries on transient failures (GETs are safe to repeat)."""
        attempts = self.settings.get_attempts
        problem = ""
        # A poll stops retrying on Ctrl-C (the task stays re-attachable); a download goes on.
        wait = self._pause if pending_on_failure else self.sleep
        for attempt in range(1, attempts + 1):
            if attempt > 1 and pending_on_failure and self.stopping:
                raise _Pending(f"interrupted while retrying the {what} ({problem}); the task "
                               "is recorded and a re-run picks it up")
            request = build()  # (a URL that cannot be sent raises: the caller decides)
            try:
                response = await self.wire.get_following_redirects(request)
            except httpx.UnsupportedProtocol as error:  # (redirected to ftp://): not worth
                problem = r.describe_error(error)       # repeating
                attempts = attempt
                break
            except httpx.RequestError as error:  # transport, decoding, redirect loops
                problem = r.describe_error(error)
            else:
                if response.is_success:
                    return response
                problem = r.error_message(response)
                if response.status_code not in (408, 425, 429) and response.status_code < 500:
                    if response.status_code in (401, 403) and lane is not None:
                        raise _Refused(f"{_whose(lane.name)}the provider refused the key while "
                                       f"polling: {problem}{_check_key(lane.key_env)}")
                    attempts = attempt  # not worth repeating
                    break
                delay = retry_after(response)
                if delay is not None:
                    await wait(delay)
                    continue
            if attempt < attempts:
                self.on_event(Event(EventKind.RETRY, job, f"{what}: {problem}"))
                await wait(self._backoff(attempt))
        message = f"{what} failed after {attempts} attempt{'s' if attempts > 1 else ''}: {problem}"
        if pending_on_failure:
            raise _Pending(message + "; the task is recorded and a re-run picks it up")
        raise JobFailed(message)


def _forgotten(submitted: Submitted) -> _Gone:
    return _Gone(f"the provider no longer knows task {r.printable(submitted.task_id)} "
                 "('Task not found'; results expire)")


def _submit_error(response: httpx.Response, key_env: str | None,
                  account: str | None = None) -> Exception:
    """A submit that was not accepted, by `responses.submit_answer` (the outbox's rule too)."""
    message = r.error_message(response)
    status = response.status_code
    if r.submit_answer(response) == r.SubmitAnswer.MAYBE_BILLED:
        return _Unknown(f"the provider answered {message}; the task may have been created "
                        "and billed")
    if status in (401, 403):
        return _Refused(f"{_whose(account)}the provider refused the API key ({message})"
                        f"{_check_key(key_env)}")
    if status == 402:
        return _Refused(f"{_whose(account)}out of credits ({message})")
    return JobFailed(f"rejected: {message}")


def _paid_by(account: str | None) -> str:
    return f"account {account}" if account is not None else "the provider's own key variable"


def _whose(account: str | None) -> str:
    """`account studio-b: `, before what an account of the pool was told."""
    return f"account {account}: " if account is not None else ""


def _check_key(key_env: str | None) -> str:
    return f"; check the key in {key_env}" if key_env else ""
