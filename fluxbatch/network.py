"""The network half of a render: the provider, the executor and the writer wired together,
with the ledger journaling every step. What to render is decided in `selection`, images are
placed by `place`, and the whole render is driven from `session`; no printing here. Loaded
only when there is something to request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from fluxbatch import imagemeta, models, providers
from fluxbatch.accounts import Account
from fluxbatch.errors import ConfigError, without_key_parameters
from fluxbatch.execute import Executor, Image, PoolAccount, Sender, Settings, Unusable
from fluxbatch.inputs import InputProblem, is_descriptor
from fluxbatch.jobs import Job, Plan
from fluxbatch.money import Budget, Prices
from fluxbatch.outbox import Outbox
from fluxbatch.outcomes import Event, JobFailed, LocalFault, Outcome, OutcomeStatus, Written
from fluxbatch.place import ManifestPacer, Placer, finish_manifest, keep_held
from fluxbatch.providers import Polled, Submitted, credits
from fluxbatch.providers import responses as r
from fluxbatch.recipe import Recipe
from fluxbatch.selection import Selection
from fluxbatch.state.blobs import keep_blob
from fluxbatch.state.ledger import Ledger, Reservation, Task, TaskStatus
from fluxbatch.state.lock import RootLock
from fluxbatch.state.store import Store
from fluxbatch.wire import Wire
from fluxbatch.write import NotAnImage, check_image, temp_dir

if TYPE_CHECKING:
    from fluxbatch.sharing import PlaceHeld, SharedUse, Sharing


class Reach(Protocol):
    """What the operator said of the network (`session.Options` has it): where requests go,
    how many at once, how long one task may take."""

    @property
    def base_url(self) -> str | None: ...
    @property
    def concurrency(self) -> int | None: ...
    @property
    def task_timeout(self) -> float | None: ...


class StoreJournal:
    """The executor's journal, written to the root's ledger, by job key (each call one
    transaction)."""

    def __init__(self, ledger: Ledger, provider: str, base_url: str | None, *,
                 outbox: bool = False, run: str | None = None, recipe: str = "",
                 sharing: Sharing | None = None) -> None:
        self.ledger = ledger
        self.provider = provider
        self.base_url = base_url
        self.outbox = outbox  # the outbox records submits itself, before answering
        self.run = run
        self.recipe = recipe
        self.sharing = sharing  # the shared store: the task into the claim, claims released

    def reserve(self, job: Job, usd: float | None, account: str | None = None) -> None:
        self.ledger.reserve(job.key, Reservation(
            usd, models.estimate_cost(job.model, job.request), job.model, self.recipe,
            job.job, self.provider, self.run, account))

    def submitting(self, job: Job, account: str | None = None) -> None:
        self.ledger.submitting(job.key, self.provider, self.base_url, self.run, account)

    def not_sent(self, job: Job) -> None:
        self.ledger.not_sent(job.key)

    def submitted(self, job: Job, submitted: Submitted, at: float) -> None:
        if self.sharing is not None:
            self.sharing.submitted(job, submitted, at)
        if self.outbox:
            return
        self.ledger.submitted(job.key, submitted.task_id, submitted.polling_url,
                             submitted.cost, at)

    def ready(self, job: Job, polled: Polled) -> None:
        self.ledger.ready(job.key, polled.reported_seed)

    def finished(self, outcome: Outcome) -> None:
        # (written: recorded by the writer, the bytes kept and the files placed; skipped:
        # never submitted, so the ledger has nothing to say)
        status = _LEDGER.get(outcome.status)
        if status is not None:
            self.ledger.ended(outcome.job.key, status, outcome.reason)
        if self.sharing is not None:
            self.sharing.ended(outcome)


# What the ledger records of how a job ended. A pending task is still collectable: it stays
# submitted, and only its reason changes.
_LEDGER = {
    OutcomeStatus.PENDING: TaskStatus.SUBMITTED,
    OutcomeStatus.MODERATED: TaskStatus.MODERATED,
    OutcomeStatus.FAILED: TaskStatus.FAILED,
    OutcomeStatus.UNKNOWN: TaskStatus.UNKNOWN,
    OutcomeStatus.GONE: TaskStatus.GONE,
}


def base_url_for(plan: Plan, options: Reach, environ: Mapping[str, str]) -> str | None:
    return named_base_url(plan.recipe.provider.name, plan.recipe.provider.base_url,
                          str(plan.recipe.path), options.base_url, environ)


def named_base_url(name: str, recipe_url: str | None, recipe_path: str, option: str | None,
                   environ: Mapping[str, str]) -> str | None:
    """The base URL and who named it: `--base-url` (`option`), then the provider's environment
    variable (the operator's), then the recipe's (checked by `validate`: only the provider's
    own hosts or loopback), then the provider's default."""
    info = providers.REGISTRY[name]
    if option:
        return providers.check_base_url(option, info, where="--base-url")
    if info.base_url_env and environ.get(info.base_url_env, "").strip():
        return providers.check_base_url(environ[info.base_url_env].strip(), info,
                                        where=info.base_url_env)
    if recipe_url:
        problem = providers.recipe_base_url_problem(info, recipe_url)
        if problem is not None:  # (validate reports it, located; this is the last guard)
            raise ConfigError(f"{recipe_path}: provider.base_url: {problem}")
        return providers.check_base_url(recipe_url, info, where="provider.base_url")
    return info.default_base_url


def provider_for(plan: Plan, options: Reach, environ: Mapping[str, str],
                 emulator_latency: float | None = None, *, pooled: bool = False
                 ) -> contextlib.AbstractContextManager[providers.Provider]:
    """The provider the recipe names, with the key from the environment; an in-process one
    (the emulator) is started on a free loopback port for the duration. `pooled`: a pool of
    accounts sends every request with its accounts' own keys (`pool_for`), so the provider's
    own key variable is neither read nor needed, and this provider holds no key."""
    return open_provider(plan.recipe.provider.name, base_url_for(plan, options, environ),
                         environ, emulator_latency,
                         key=providers.Secret("") if pooled else None)


@contextlib.contextmanager
def open_provider(name: str, base_url: str | None, environ: Mapping[str, str],
                  emulator_latency: float | None = None, *,
                  key: providers.Secret | None = None) -> Iterator[providers.Provider]:
    """The provider `name` at `base_url` (None: its in-process emulator, started on a free
    loopback port for the duration), with `key` or the key from `environ`."""
    if base_url:  # (for the emulator: one already running elsewhere, `fluxbatch emulator`)
        yield providers.build(name, base_url=base_url, environ=environ, key=key)
        return
    assert providers.REGISTRY[name].in_process
    from fluxbatch.emulator import EmulatorConfig, EmulatorThread

    config = EmulatorConfig() if emulator_latency is None else \
        EmulatorConfig(latency=emulator_latency)
    with EmulatorThread(config) as emulator:
        yield providers.build(name, base_url=emulator.base_url, environ=environ)


class NoBalance(Exception):
    """The balance could not be learned: the provider (or this base URL) offers no balance
    query, or it did not answer usably. The message never holds the key."""


BALANCE_TIMEOUT = httpx.Timeout(10.0, connect=5.0, pool=None)


async def balance(provider: providers.Provider, environ: Mapping[str, str],
                  transport: httpx.AsyncBaseTransport | None = None) -> providers.Balance:
    """The account's balance, asked of the provider's own balance query (BFL's
    `/v1/credits`, CometAPI's quota query). Raises `NoBalance` when there is none or it
    fails: nothing that could carry the key (a URL, an exception's text) leaves this
    function but scrubbed of it."""
    where = f"{provider.info.name} at {providers.without_credentials(provider.base_url)}"
    key = providers.query_key(provider.info, environ)
    request = provider.balance_request(key)
    if request is None:
        raise NoBalance(f"{where} has no balance query that fluxbatch knows")
    in_url = request.url.params.get("key")  # (CometAPI's quota query)
    secrets = [value for value in (in_url, key.reveal() if key else None) if value]
    try:
        wire = Wire(transport) if transport is not None else \
            Wire.open(1, timeout=BALANCE_TIMEOUT)
        async with wire:
            response = await wire.send(request)
        if not response.is_success:
            raise NoBalance(f"{where} answered the balance query with "
                            f"{r.error_message(response)}")
        return provider.read_balance(response)
    except NoBalance as error:
        raise NoBalance(_scrubbed(str(error), secrets)) from None
    except r.BadResponse as error:
        raise NoBalance(_scrubbed(f"{where}: unusable balance answer ({error})", secrets)) \
            from None
    except httpx.RequestError as error:
        raise NoBalance(_scrubbed(f"{where}: the balance query failed "
                                  f"({r.describe_error(error)})", secrets)) from None
    except Exception as error:
        raise NoBalance(_scrubbed(f"{where}: the balance query failed "
                                  f"({type(error).__name__}: {error})", secrets)) from None


def _scrubbed(text: str, secrets: list[str]) -> str:
    """`text` without the keys, and without any `key=` query parameter's value."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return without_key_parameters(text)


def pool_for(plan: Plan, options: Reach, provider: providers.Provider,
             pool: list[tuple[Account, providers.Secret]]) -> list[PoolAccount]:
    """The pool's accounts as the executor drives them: each a provider at `provider`'s base
    URL with its own key, and its caps: its own (`cap`, `model_caps`), else those of `-j` and
    the recipe, else the catalogue's."""
    settings = settings_for(plan, options)
    return [PoolAccount(account.name, providers.build(provider.info.name,
                                                      base_url=provider.base_url,
                                                      environ={}, key=secret),
                        account.cap or settings.account_cap,
                        {**settings.model_caps, **account.model_caps},
                        account.key_env or account.key_file_env)
            for account, secret in pool]


def settings_for(plan: Plan, options: Reach) -> Settings:
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
                  lock: RootLock | None = None, run: str | None = None,
                  budget: Budget | None = None,
                  shared: SharedUse | None = None,
                  accounts: list[PoolAccount] | None = None) -> list[Outcome]:
    """Submit and collect the selection's jobs (one per key; each image is placed at every
    output of its key). Every step is recorded in `store`, and the manifest is rewritten as
    images land.
    With `lock`, paid submits go through the outbox process, which inherits the lock and
    commits each answer before it is used. With `budget`, each paid submit reserves its price
    first (at the highest this provider has charged for the model, per the ledger). With
    `shared`, each key is claimed in the shared store before it is paid for (in the name of
    the account that pays for it), and each image kept is uploaded there (`sharing`). With
    `accounts` (a pool), the jobs spread over them, and each task is polled with the key of
    the account that paid for it."""
    recipe = plan.recipe
    root = recipe.output_root
    placer = Placer(recipe, store, provider.info.name)
    manifest = ManifestPacer(recipe, store)
    spool = temp_dir(root)

    async def place_all(job: Job, data: bytes, task: Task | None, submitted_at: float | None,
                        source: Mapping[str, object]) -> Written | None:
        """Place a kept image at every output of its key: a placement that fails is redone
        by the next run, from the store, free."""
        written = None
        for each in [job, *selection.followers.get(job.key, ())]:
            placed = await _place_later(placer, each, data, task, submitted_at, source)
            written = written or placed
        manifest.maybe()
        return written

    async def writer(job: Job, image: Image, outcome: Outcome) -> Written | None:
        """Keep the bytes (the ledger then says so), then place them at every output of
        the key: a placement that fails is redone by the next run, from the store, free."""
        data = await asyncio.to_thread(_kept, root, image)  # (one trip off the event loop)
        store.fetched(job.key, image.sha256)
        task = store.task(job.key)
        if sharing is not None:
            await sharing.kept(job, image, data, task)
        return await place_all(job, data, task, outcome.submitted_at, {})

    async def place_held(job: Job, data: bytes, sha256: str,
                         source: dict[str, object]) -> Written | None:
        """An image the shared store held (checked against its sha256): kept here too, then
        placed, as a download is."""
        try:
            await asyncio.to_thread(keep_held, root, data, sha256)
        except OSError as error:
            raise LocalFault.from_os_error("cannot keep an image from the store", error) \
                from None
        store.fetched(job.key, sha256)
        return await place_all(job, data, None, None, source)

    attach = {job.key: Submitted(task.task_id or "", task.polling_url or "", credits(task.cost))
              for job, task in selection.attach}
    paid_by = {job.key: task.account for job, task in selection.attach}
    # Polls are short, so half as many connections as active tasks keep up.
    active = sum(account.cap for account in accounts) if accounts else settings.account_cap
    connections = max(16, active // 2)
    sharing = _sharing(shared, store, provider, run, place_held, on_event, settings,
                       [account.name for account in accounts] if accounts else None)
    outbox = Outbox(root, provider, lock.fd, store, run=run,
                    shared=shared.store.url if shared is not None else None,
                    claims=sharing.claim_of if sharing is not None else None) \
        if lock is not None and selection.submit else None
    if sharing is not None and outbox is not None:
        sharing.claimed_with_task = outbox.claims_updated.__contains__
    spool.mkdir(parents=True, exist_ok=True)
    async with Wire(transport) if transport is not None else Wire.open(connections) as wire:
        if outbox is not None:
            await outbox.start()
        executor = Executor(
            provider, wire, journal=StoreJournal(store, provider.info.name, provider.base_url,
                                                   outbox=outbox is not None, run=run,
                                                   recipe=recipe.name, sharing=sharing),
            writer=writer, settings=settings, on_event=on_event,
            submit_via=_submit_via(outbox, sharing, wire), spool=spool,
            prepare=_preparer(recipe), budget=budget,
            prices=Prices.learned(store.highest_costs(provider.info.name)), accounts=accounts)
        if sharing is not None:
            sharing.executor = executor
        started(executor)
        try:
            ran = await executor.run(selection.jobs, attach, paid_by)
        finally:
            if outbox is not None:
                await outbox.close()
            if sharing is not None:
                await sharing.drain()
            finish_manifest(recipe, store, stopped=executor.fatal)
    return with_followers(selection, ran)


def _submit_via(outbox: Outbox | None, sharing: Sharing | None,
                wire: Wire) -> Callable[[Job, str | None], Sender] | None:
    """How each paid submit is sent, given the account of the pool that pays for it: through
    the outbox (which records it first, with that account's name), with this run's claim on
    the key, in that account's name, when there is a shared store."""
    if sharing is None:
        return (lambda job, account: outbox.sender(job.key, account)) \
            if outbox is not None else None

    def via(job: Job, account: str | None) -> Sender:
        send = outbox.sender(job.key, account) if outbox is not None else wire.send
        return sharing.sender(job, account, send, outbox=outbox is not None)

    return via


def _sharing(shared: SharedUse | None, store: Store, provider: providers.Provider,
             run: str | None, place_held: PlaceHeld,
             on_event: Callable[[Event], None], settings: Settings,
             pool: list[str | None] | None) -> Sharing | None:
    """The render's use of the shared store, if it has one. With a pool of accounts, each
    claim names the account that pays for its key (`pool`: their names)."""
    if shared is None:
        return None
    from fluxbatch.sharing import Sharing
    from fluxbatch.state.shared import Claimant

    claimant = Claimant(root=store.root_id(), provider=provider.info.name,
                        base_url=provider.base_url, account=shared.account, run=run)
    return Sharing(shared, claimant, store, place_held, on_event,
                   wait_limit=settings.task_timeout, pool=pool)


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


def _kept(root: Path, image: Image) -> bytes:
    """The downloaded image's bytes, checked, and kept in the content store: each image's
    file work in one call off the event loop."""
    data = image.read()
    try:
        check_image(data)
    except (NotAnImage, imagemeta.ImageFormatError) as error:
        raise Unusable(f"the provider's image is unusable: {error}") from None
    try:
        keep_blob(root, image.path, image.sha256)
    except OSError as error:
        raise LocalFault.from_os_error("cannot keep a downloaded image", error) from None
    return data


async def _place_later(placer: Placer, job: Job, data: bytes, task: Task | None,
                       submitted_at: float | None, source: Mapping[str, object]) -> Written:
    """`placer.place`, with the file written off the event loop (the store stays on it)."""
    draft = placer.draft(job, task, source, submitted_at)
    written, full = await asyncio.to_thread(placer.write, job, data, draft)
    return placer.record(job, written, full)


def _preparer(recipe: Recipe) -> Callable[[Job], Awaitable[Mapping[str, object]]] | None:
    """The submit body of a job whose request names image inputs: each read (off the event
    loop), checked against the sha256 it was planned with, and base64-encoded."""
    inputs = recipe.inputs
    if inputs is None:
        return None

    async def prepare(job: Job) -> Mapping[str, object]:
        if not any(map(is_descriptor, job.request.values())):
            return job.request
        try:
            return await asyncio.to_thread(inputs.materialize, job.request)
        except InputProblem as problem:
            raise JobFailed(f"not sent: {problem}") from None

    return prepare


