"""The shared store in a render (`--store`): the network half's side of
`fluxbatch.state.shared`. Loaded only when a store is named and something must be requested.

- Each submit carries this run's claim on its key, which the outbox makes right before it
  sends (the process that sends claims, as it records "submitting": a killed render leaves no
  claim of a request that was never sent). The claim is the look-up: a run that wins it
  pays; one that finds the key's record places that image, nothing paid; one that finds
  another run's claim collects that task itself when the claim names the same provider and
  account, and otherwise waits for that run's image (bounded by the task timeout, shown as
  "waiting").
- The outbox writes the task into the claim as soon as the submit is answered (so a run killed
  then leaves a claim another run can collect); after the download, the bytes are uploaded,
  then the record, which releases the claim. A task that ends without an image (failed,
  moderated, forgotten, never sent) releases it, so that another run may try.
- With a pool of accounts (`--accounts`), each claim names the account that pays for its
  key (its name in the accounts file, never its key), and a claim of any account of the
  pool is collected here, polled with that account's key; without one, claims name the
  account `FLUXBATCH_ACCOUNT` names.
- A claim left by a run that died:
  - with a task: collected by whoever holds that account;
  - without one (the submit's outcome was never learned, it may have been billed): held
    back, never paid again silently; `--retry-unknown` takes it over (once: a conditional
    create decides between two runs) and pays.
  - A claim this output root made in an earlier run is its own: the root's ledger, which
    decided to submit, is what counts.
- With `--force` nothing is claimed or looked up: the run pays, and its record replaces the
  store's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from fluxbatch import models
from fluxbatch.execute import Claimed, Elsewhere, Executor, Image, Sender
from fluxbatch.jobs import Job
from fluxbatch.outbox import ClaimLost
from fluxbatch.outcomes import Event, EventKind, Outcome, OutcomeStatus, Written
from fluxbatch.providers import Submitted, credits
from fluxbatch.state.ledger import Ledger, Task, TaskStatus
from fluxbatch.state.shared import (
    Claim,
    Claimant,
    CorruptObject,
    Entry,
    Record,
    SharedStore,
    StoreError,
    entry_json,
    read_entry,
)

T = TypeVar("T")

# A claim with no task this long after it was made: its run died while submitting (a live one
# writes the task within seconds of claiming), and the submit's outcome is unknown.
SILENT_AFTER = 120.0
WAIT_FIRST, WAIT_LONGEST = 1.0, 10.0  # seconds between looks at another run's claim

# Outcomes whose claim is given up, so that another run may try the key again.
_RELEASED = frozenset({OutcomeStatus.FAILED, OutcomeStatus.MODERATED, OutcomeStatus.GONE,
                       OutcomeStatus.SKIPPED})


@dataclass(slots=True)
class SharedUse:
    """A render's shared store, as the session opened and checked it, and what the store
    could not record (said in the report)."""

    store: SharedStore
    # The operator's name for the account (`FLUXBATCH_ACCOUNT`); a pool's accounts are named
    # by the accounts file instead.
    account: str | None
    force: bool = False
    retry_unknown: bool = False
    problems: list[str] = field(default_factory=list)


# Places an image the store held: (job, its bytes, their sha256, the record's provenance).
PlaceHeld = Callable[[Job, bytes, str, dict[str, object]], Awaitable[Written | None]]


@dataclass(slots=True)
class Sharing:
    """One render's use of the shared store (see the module's docstring)."""

    use: SharedUse
    claimant: Claimant
    ledger: Ledger
    place_held: PlaceHeld
    on_event: Callable[[Event], None]
    wait_limit: float
    claimed_with_task: Callable[[str], bool] = lambda key: False  # the outbox wrote the task
    executor: Executor | None = None
    # The names of the pool's accounts (`--accounts`); None: the provider's own key, whose
    # account `claimant.account` names.
    pool: Sequence[str | None] | None = None
    mine: dict[str, Claim] = field(default_factory=dict)  # the claims this run holds
    _background: set[asyncio.Future[None]] = field(default_factory=set)

    def named(self, account: str | None) -> str | None:
        """The name a claim or record gives the account that pays through the executor's
        `account` (a pool's account, by name; None: the provider's own key)."""
        return account if self.pool is not None else self.claimant.account

    def paying(self, named: str | None) -> tuple[bool, str | None]:
        """Whether this run holds the account a claim or record names, and the executor's
        name for it (what `named` reverses)."""
        if self.pool is not None:
            return named in self.pool, named
        return named == self.claimant.account, None

    @property
    def store(self) -> SharedStore:
        return self.use.store

    async def _do(self, action: Callable[..., T], *args: object) -> T:
        """A blocking request of the store, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.store.pool, functools.partial(action, *args))

    def _later(self, action: Callable[..., object], *args: object) -> None:
        """A request whose outcome nothing waits for (awaited by `drain`)."""
        future = asyncio.ensure_future(self._quietly(action, *args))
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    async def _quietly(self, action: Callable[..., object], *args: object) -> None:
        try:
            await self._do(action, *args)
        except (StoreError, CorruptObject) as error:
            self.use.problems.append(str(error))

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def claim_of(self, key: str) -> Claim | None:
        return self.mine.get(key)

    # -- a submit -----------------------------------------------------------------------------

    def sender(self, job: Job, account: str | None, send: Sender, *, outbox: bool) -> Sender:
        """`send` (the job's submit through `account`), with this run's claim on the key, in
        that account's name: the outbox makes it right before it sends (else it is made
        here). When another run holds the key, nothing is sent, and the executor hears
        `Claimed`: it collects that run's task, or the image comes from the store
        (`Elsewhere`). With `--force`, nothing is claimed."""
        if self.use.force:
            return send
        named = self.named(account)
        claim = self.mine.get(job.key)
        if claim is None or claim.account != named:  # (another account of the pool took
            # the job after one refused it: a claim of this root with no task, made over)
            claim = self.mine[job.key] = dataclasses.replace(self.claimant.claim(job.key),
                                                             account=named)

        async def claimed(request: httpx.Request) -> httpx.Response:
            while True:
                try:
                    if not outbox:
                        await self._claim_here(claim)
                    return await send(request)
                except ClaimLost as lost:
                    self.ledger.not_sent(job.key)  # (nothing was sent: nor reserved, then)
                    found = _found(job.key, lost)
                except StoreError:
                    self.ledger.not_sent(job.key)
                    raise
                if not await self._took_over(found, claim):
                    break
            self.mine.pop(job.key, None)
            raise Claimed(functools.partial(self._settle, job, found, account))

        return claimed

    async def _claim_here(self, claim: Claim) -> None:
        try:
            found = await self._do(self.store.claim, claim)
        except CorruptObject as error:
            raise ClaimLost({"corrupt": str(error)}) from None
        if found is not None:
            raise ClaimLost({"entry": entry_json(found).decode()})

    async def _took_over(self, found: Entry | CorruptObject, claim: Claim) -> bool:
        """With `--retry-unknown`, a claim that says nothing (its run died while submitting)
        is taken over, once: True when this run did, and sends."""
        return isinstance(found, Claim) and self._silent(found) and \
            not self._collectable(found) and self.use.retry_unknown and \
            await self._do(self.store.take_over, found, claim)

    async def _settle(self, job: Job, found: Entry | CorruptObject,
                      account: str | None) -> Submitted:
        """What becomes of a key another run holds: its task, collected here through
        `account` (the account whose submit found the claim), or `Elsewhere`: collected
        through another account of the pool, its record's image, the wait for that run's
        image, or why it is held back."""
        if isinstance(found, CorruptObject):
            raise Elsewhere(_ended(job, OutcomeStatus.FAILED, f"{found}; nothing was paid. "
                                   "`--force` pays for a new image, and records it"))
        if isinstance(found, Record):
            raise Elsewhere(self._from_record(job, found))
        if self._collectable(found):
            submitted, paying = self._adopt(found)
            if paying == account:
                return submitted
            assert self.executor is not None
            raise Elsewhere(self.executor.collect(job, submitted, paying))
        if self._silent(found):
            raise Elsewhere(_ended(job, OutcomeStatus.PENDING, _held(found)))
        raise Elsewhere(self._wait(job, found))

    def _collectable(self, claim: Claim) -> bool:
        held, _ = self.paying(claim.account)
        if not held:
            return False  # (only the key of the account that paid may poll it)
        own = claim.root == self.claimant.root
        if own and claim.task_id and claim.polling_url and claim.provider == \
                self.claimant.provider:
            return True  # (this root's own task, from an earlier run of it)
        return claim.collectable_by(self.claimant.provider, self.claimant.base_url,
                                    claim.account)

    def _adopt(self, claim: Claim) -> tuple[Submitted, str | None]:
        """Another run's task, to be collected by this one, and the executor's name for the
        account that paid it (whose key polls it): recorded in this root's ledger first
        (paid by another root, so not charged here), so that if this run stops, the next
        collects it with that account's key."""
        assert claim.task_id is not None and claim.polling_url is not None
        _, paying = self.paying(claim.account)
        self.ledger.paid_elsewhere(Task(
            claim.key, TaskStatus.SUBMITTED, provider=claim.provider, base_url=claim.base_url,
            task_id=claim.task_id, polling_url=claim.polling_url, cost=claim.cost,
            submitted_at=claim.submitted_at or time.time(), account=paying))
        return Submitted(claim.task_id, claim.polling_url, credits(claim.cost)), paying

    @staticmethod
    def _silent(claim: Claim) -> bool:
        return not claim.task_id and time.time() - claim.claimed_at > SILENT_AFTER

    async def _wait(self, job: Job, found: Entry | None) -> Outcome:
        """Another run holds the key's claim: wait for its image (or its task, when this run
        may collect it), until the task timeout; then the next render looks again."""
        assert isinstance(found, Claim)
        self.on_event(Event(EventKind.WAITING, job, f"claimed by {found.describe()}"))
        deadline = time.monotonic() + self.wait_limit
        delay = WAIT_FIRST
        last = found
        while True:
            if found is None:
                return _outcome(job, OutcomeStatus.SKIPPED, "the run that had claimed it "
                                "ended without its image; the next render submits it")
            if isinstance(found, Record):
                return await self._from_record(job, found)
            last = found
            if self._collectable(found) and self.executor is not None:
                return await self.executor.collect(job, *self._adopt(found))
            if self._silent(found):
                return _outcome(job, OutcomeStatus.PENDING, _held(found))
            if time.monotonic() >= deadline or self._stopping():
                break
            await self._pause(delay)
            delay = min(WAIT_LONGEST, delay * 1.5)
            try:
                found = await self._do(self.store.lookup, job.key)
            except (StoreError, CorruptObject) as error:
                return _outcome(job, OutcomeStatus.PENDING, f"{error}; the next render looks "
                                "again")
        why = "interrupted while waiting for" if self._stopping() else "gave up waiting for"
        return _outcome(job, OutcomeStatus.PENDING, f"{why} the image that {last.describe()} "
                        "is rendering; the next render places it from the store, at no cost")

    def _stopping(self) -> bool:
        return self.executor is not None and self.executor.stopping

    async def _pause(self, delay: float) -> None:
        if self.executor is not None:
            await self.executor.pause(delay)
        else:
            await asyncio.sleep(delay)

    async def _from_record(self, job: Job, record: Record) -> Outcome:
        """Place the image the store holds for the key: nothing paid."""
        try:
            try:
                data = await self._do(self.store.fetch, record)
            except CorruptObject:  # (cut short on the way, say): once more
                data = await self._do(self.store.fetch, record)
        except CorruptObject as error:
            return _outcome(job, OutcomeStatus.FAILED, f"{error}; not placed. `--force` pays "
                            "for a new image, and records it in the store")
        except StoreError as error:
            return _outcome(job, OutcomeStatus.PENDING, f"{error}; the next render places it "
                            "from the store")
        outcome = _outcome(job, OutcomeStatus.WRITTEN, None)
        try:
            outcome.written = await self.place_held(job, data, record.sha256, record.source())
        except Exception as error:  # (JobFailed, LocalFault: as the writer says them)
            outcome.status = OutcomeStatus.FAILED
            outcome.reason = f"its image from the store could not be placed: {error}"
            return outcome
        outcome.from_store = True
        return outcome

    # -- as the task goes -------------------------------------------------------------------

    def submitted(self, job: Job, submitted: Submitted, at: float) -> None:
        """The submit was answered: the task goes into this run's claim (the outbox has
        done so already, unless it could not)."""
        claim = self.mine.get(job.key)
        if claim is None or self.claimed_with_task(job.key):
            return
        self.mine[job.key] = claim = dataclasses.replace(
            claim, task_id=submitted.task_id, polling_url=submitted.polling_url,
            cost=submitted.cost, submitted_at=at)
        self._later(self.store.update, claim)

    async def kept(self, job: Job, image: Image, data: bytes, task: Task | None) -> None:
        """The image was downloaded and kept: its bytes, then its record (which releases the
        claim). A store that refuses costs no image: `fluxbatch push` uploads it later."""
        record = Record(
            key=job.key, sha256=image.sha256, size=len(data), model=job.model,
            provider=self.claimant.provider, request=models.redact(job.request), seed=job.seed,
            reported_seed=task.reported_seed if task else None,
            cost=credits(task.cost) if task else None, task_id=task.task_id if task else None,
            submitted_at=task.submitted_at if task else None, recorded_at=time.time(),
            account=self.named(task.account if task else None))
        try:
            await self._do(self.store.put_image, data, image.sha256)
            await self._do(self.store.update, record)
        except StoreError as error:
            self.use.problems.append(str(error))
            return
        self.mine.pop(job.key, None)

    def ended(self, outcome: Outcome) -> None:
        """A job ended: a claim whose task ended without an image is given up."""
        if outcome.status in _RELEASED:
            claim = self.mine.pop(outcome.job.key, None)
            if claim is not None:
                self._later(self.store.release, claim)


def _found(key: str, lost: ClaimLost) -> Entry | CorruptObject:
    """What the store holds for `key`, as the outbox (or this process) found it."""
    if "corrupt" in lost.found:
        return CorruptObject(lost.found["corrupt"])
    try:
        return read_entry(key, lost.found["entry"].encode())
    except CorruptObject as error:
        return error


def _held(claim: Claim) -> str:
    return (f"claimed in the shared store by {claim.describe()}, which recorded no task: it "
            "may have been billed. Held back; `--retry-unknown` takes the claim over and pays")


def _outcome(job: Job, status: OutcomeStatus, reason: str | None) -> Outcome:
    return Outcome(job, status, reason)


async def _ended(job: Job, status: OutcomeStatus, reason: str) -> Outcome:
    return _outcome(job, status, reason)

