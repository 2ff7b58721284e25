"""One render of a plan into its output root, end to end: the composition root.

Open the root (its lock, its state store) → classify and select → place the images the root
already holds → submit, collect and place the rest → report. The CLI's `render`, its dry run
(`preview`) and the Python API (`fluxbatch.render`) all come through here, so that they
cannot drift apart. Nothing here prints, exits, reads the terminal or installs a signal
handler: progress leaves as `Event`s, the outcome as a `Report`, problems as
`FluxbatchError`s; a caller stops a render with `Render.stop()`.

The network half (`fluxbatch.network`: the provider, the executor, the writer) is imported
only when there is something to send: a null build of 10,000 images loads no HTTP stack.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fluxbatch import accounts, plan_cache, providers
from fluxbatch.errors import FluxbatchError, StateError
from fluxbatch.front import LOOKED_UP, fresh, read, store_of, stored
from fluxbatch.jobs import Plan
from fluxbatch.money import EPSILON, Budget, BudgetOutcome, Prices, usd
from fluxbatch.outcomes import OutcomeStatus
from fluxbatch.place import finish_manifest, place_stored
from fluxbatch.providers import REGISTRY
from fluxbatch.recipe import collector_paused
from fluxbatch.selection import (
    Selection,
    SelectOptions,
    check_budget,
    classify_with_store,
    estimate_at,
    select,
)
from fluxbatch.state.ledger import new_run_id
from fluxbatch.state.lock import RootLock
from fluxbatch.state.root import RootState
from fluxbatch.state.store import Store
from fluxbatch.write import clear_debris, manifest_path, write_manifest

if TYPE_CHECKING:
    import asyncio

    import httpx

    from fluxbatch.execute import Executor, PoolAccount
    from fluxbatch.outcomes import Event, Outcome
    from fluxbatch.sharing import SharedUse


@dataclass(frozen=True, slots=True)
class Options(SelectOptions):
    """How to render: what to select (`SelectOptions`), and the network's part: where the
    requests go (`base_url`), how many tasks at once (`concurrency`), how long one task may
    take (`task_timeout`), which shared store the images are claimed in (`store`), which
    accounts pay for them (`accounts`)."""

    concurrency: int | None = None
    base_url: str | None = None
    task_timeout: float | None = None
    yes: bool = False  # render even when the estimate is over the account's balance
    # The shared store's URL (`--store`; the session falls back on FLUXBATCH_STORE), or ""
    # for none even when that is set.
    store: str | None = None
    # The operator's accounts file (`--accounts`; the session falls back on
    # FLUXBATCH_ACCOUNTS): one render spread over several accounts.
    accounts: str | None = None

    def ephemeral(self, provider: str) -> bool:
        """Whether the provider lives and dies with this run: the in-process emulator,
        started for it (its tasks cannot be collected later, and cost nothing)."""
        return REGISTRY[provider].in_process and self.base_url is None


@dataclass(slots=True)
class Report:
    """What a render did: one `Outcome` per image it wrote or tried to (placed from the
    store, submitted, or collected), with what it left alone in `selection`."""

    selection: Selection
    outcomes: list[Outcome] = field(default_factory=list)
    interrupted: bool = False
    fatal: str | None = None  # why the run stopped early (a refused key, an unreachable host)
    # With a budget: what the render spent of it, and whether it stopped the submits.
    budget: BudgetOutcome | None = None
    # What the shared store could not record (the images are here: `fluxbatch push`).
    store_problems: list[str] = field(default_factory=list)
    # With a pool of accounts (`--accounts`): their names, and those that left it, and why.
    accounts: tuple[str, ...] = ()
    accounts_out: dict[str, str] = field(default_factory=dict)

    @property
    def stopped(self) -> str | None:
        """Why the run stopped before submitting everything: `fatal`, or `budget reached:
        spent $X of $Y; N images not rendered (...)`."""
        if self.fatal:
            return self.fatal
        return self.budget.message() if self.budget is not None and self.budget.reached \
            else None

    @property
    def nothing_to_do(self) -> bool:
        return not self.selection.jobs and not self.selection.place

    def spent_usd(self) -> float | None:
        """What the provider reported for the tasks submitted in this run, less the tasks
        it does not bill (moderated, failed); None when it reported none."""
        unbilled = (OutcomeStatus.MODERATED, OutcomeStatus.FAILED)
        costs = [0.0 if o.status in unbilled else o.submitted.cost for o in self.outcomes
                 if o.submitted is not None and o.submitted_at is not None
                 and o.submitted.cost is not None]
        return sum(costs) / 100 if costs else None

    def collected_usd(self) -> float | None:
        """What tasks paid for by earlier runs, and collected by this one, had cost."""
        costs = [o.submitted.cost for o in self.outcomes if o.submitted is not None
                 and o.submitted_at is None and o.submitted.cost is not None]
        return sum(costs) / 100 if costs else None

    @property
    def ok(self) -> bool:
        """Every image wanted is in place: nothing failed, was held back or interrupted."""
        written = OutcomeStatus.WRITTEN
        return not self.interrupted and not self.stopped \
            and all(o.status == written for o in self.outcomes) \
            and not self.selection.held


def preview(plan: Plan, options: Options | None = None,
            environ: Mapping[str, str] | None = None) -> Selection:
    """What `Render(plan, options).run()` would do, from the same classification and
    selection, reading the output root and writing nothing (the dry run); `preview_budget`
    says whether `options.budget` would refuse it. It reads the accounts file, not the
    keys."""
    options = options or Options()
    provider = plan.recipe.provider.name
    found = read(plan, verify=options.verify)
    url = store_of(options.store)
    if plan.reused and url is not None and \
            any(state in LOOKED_UP for state in found.classified.states):
        # (the store is asked of a fresh plan only)
        return preview(fresh(plan), options, environ)
    found = stored(found, url)
    pool = pool_accounts(plan, options, os.environ if environ is None else environ)
    selection = select(found.classified, found.state, options, provider,
                       ephemeral=options.ephemeral(provider), accounts=names_of(pool))
    if plan.reused and not selection.idle:  # (trusted only to find nothing to do)
        return preview(fresh(plan), options, environ)
    return selection


def pool_accounts(plan: Plan, options: Options,
                  environ: Mapping[str, str]) -> list[accounts.Account] | None:
    """The accounts of the recipe's provider in the operator's accounts file (`--accounts`,
    else FLUXBATCH_ACCOUNTS); None without one."""
    path = accounts.named_file(options.accounts, environ)
    if path is None:
        return None
    return accounts.for_provider(accounts.load(path), plan.recipe.provider.name,
                                 accounts.describe(path))


def names_of(pool: list[accounts.Account] | None) -> frozenset[str] | None:
    return None if pool is None else frozenset(account.name for account in pool)


def preview_budget(plan: Plan, selection: Selection, budget: float | None) -> None:
    """Raise `FluxbatchError` when `budget` would refuse the render `preview` describes."""
    if budget is not None:
        spent, prices = budget_so_far(plan, read_only=True)
        check_budget(selection, budget, spent=spent, prices=prices)


def budget_so_far(plan: Plan, store: Store | None = None, *,
                  read_only: bool = False) -> tuple[float, Prices]:
    """What the unfinished runs of the recipe spent (which a `--budget` counts), and the
    prices its provider has charged here, from the ledger (nothing when there is none)."""
    recipe = plan.recipe
    if store is None:
        try:
            opened = Store.open(recipe.output_root, create=not read_only)
        except FileNotFoundError:
            return 0.0, Prices()
        with opened:
            return budget_so_far(plan, opened)
    return (store.spent_by_runs(store.unfinished_runs(recipe.name)),
            Prices.learned(store.highest_costs(recipe.provider.name)))


class Render:
    """`await Render(plan, options).run()` renders the plan; `stop()` (from a signal
    handler or another task on the same loop) asks it to finish early.

    `environ` is where the API key (and the proxies, and the provider's base-URL variable)
    are read: the process environment unless given. `transport` replaces the network (tests
    pass an `httpx.MockTransport`)."""

    def __init__(self, plan: Plan, options: Options | None = None, *,
                 environ: Mapping[str, str] | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 on_selected: Callable[[Selection], None] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.plan = plan
        self.options = options or Options()
        self.environ = os.environ if environ is None else environ
        self.on_event: Callable[[Event], None] = on_event or (lambda event: None)
        # Called once the root is read, before anything is placed or sent: what will be done.
        self.on_selected: Callable[[Selection], None] = on_selected or (lambda selection: None)
        self.transport = transport
        self.selection: Selection | None = None  # known once the root is read
        self._executor: Executor | None = None
        self._executing: asyncio.Future[list[Outcome]] | None = None
        self._stopping = False
        self._aborted = False

    def stop(self, *, now: bool = False) -> None:
        """Submit nothing new; tasks already paid for are recorded and collected by the next
        run. With `now`, do not wait for the tasks in flight either (what they cost is known
        to the state store, and the next run collects them without paying again)."""
        self._stopping = True
        if self._executor is not None:
            self._executor.stop()
        if now:
            self._aborted = True
            if self._executing is not None:
                self._executing.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(self) -> Report:
        """Render the plan (see `run_offline`, which does the same with no event loop until
        something must be requested)."""
        with self._opened() as (store, lock):
            report, ahead = self._offline(store)
            if ahead is not None:
                await self._request(store, lock, report, ahead)
            return report

    def run_offline(self, run_network: Callable[[Coroutine[Any, Any, None]], None]) -> Report:
        """Render the plan, running `run_network(coroutine)` (`asyncio.run`, say) only if
        something must be requested: a null build starts no event loop, and loads no
        network code."""
        with self._opened() as (store, lock):
            report, ahead = self._offline(store)
            if ahead is not None:
                run_network(self._request(store, lock, report, ahead))
            return report

    @contextlib.contextmanager
    def _opened(self) -> Iterator[tuple[Store, RootLock]]:
        """The output root, made if need be, locked, and its state store open."""
        root = self.plan.recipe.output_root
        try:
            root.mkdir(parents=True, exist_ok=True)
            with RootLock(root) as lock, Store.open(root) as store:
                yield store, lock
        except OSError as error:  # the output root itself: read-only, gone, not a folder
            reason = "it is a file, not a folder" if root.exists() and not root.is_dir() \
                else error.strerror or str(error)
            raise StateError(f"cannot use the output root {root}: {reason}") from None

    def _offline(self, store: Store) -> tuple[Report, _Ahead | None]:
        """Everything before the network: select, then place what the root holds; and,
        when something must be requested, the budget it is requested within and the pool
        of accounts (from the accounts file: their keys are read when they are needed)."""
        options = self.options
        recipe = self.plan.recipe
        store.use(recipe.name, recipe.path)
        if recipe.inputs is not None:  # what planning learnt of the image inputs
            recipe.inputs.cache.save()
        clear_debris(recipe.output_root)
        pool = pool_accounts(self.plan, self.options, self.environ)  # (the names: no key)
        with collector_paused():
            selection, state = self._select(store, names_of(pool))
        plan = self.plan
        plan_cache.save(plan)  # (a plan just expanded: the next run of it reads it back)
        budget = None
        spent, prices = budget_so_far(plan, store)
        if options.budget is not None:
            check_budget(selection, options.budget, spent=spent, prices=prices)
            budget = Budget(options.budget, earlier=spent)
        report = Report(selection)
        if pool is not None:
            report.accounts = tuple(account.name for account in pool)
        self.on_selected(selection)
        if report.nothing_to_do:
            if not store.manifest_intact(recipe.name, manifest_path(recipe)):
                write_manifest(recipe, store)  # missing, changed or damaged: from the store
            return report, None
        report.outcomes = place_stored(plan, selection, state, store, self.on_event)
        if not selection.jobs or self._stopping:
            finish_manifest(recipe, store)
            report.interrupted = self._stopping
            return report, None
        return report, _Ahead(budget, prices, pool)

    def _select(self, store: Store,
                pool: frozenset[str] | None) -> tuple[Selection, RootState]:
        """What to do with each planned image: images at planned paths that the store does
        not know are adopted first. A plan read back from the plan cache is trusted only to
        find that nothing needs doing (then every image it selects is placed, and there is
        nothing to adopt): anything else is found again from a fresh one. `pool`: the names
        of the pool's accounts, if there is one."""
        plan, options = self.plan, self.options
        name = plan.recipe.provider.name
        settled = False
        while True:  # (twice at most: a fresh plan is not reused)
            if not plan.reused:  # (reused: there is none if it stands)
                adopt_found_images(plan, store)
            if not settled:
                store.settle_reservations()  # (those of a run that was killed)
                settled = True
            classified, state = classify_with_store(plan, store, options)
            selection = select(classified, state, options, name,
                               ephemeral=options.ephemeral(name), accounts=pool)
            if not plan.reused or selection.idle:
                self.selection = selection
                return selection, state
            plan = self.plan = fresh(plan)

    async def _request(self, store: Store, lock: RootLock, report: Report,
                       ahead: _Ahead) -> None:
        """The network half: the pool's keys (a missing one is an error before anything is
        sent), the shared store opened if there is one, then submit and collect
        `report.selection.jobs`, and place them."""
        from fluxbatch.state.shared import StoreError

        try:
            pool = self._keyed(ahead.pool)
            shared = await self._shared()
        except (FluxbatchError, StoreError):
            finish_manifest(self.plan.recipe, store)  # (what was placed)
            raise
        try:
            await self._send(store, lock, report, ahead, shared, pool)
        finally:
            if shared is not None:
                report.store_problems = shared.problems
                shared.store.close()

    async def _send(self, store: Store, lock: RootLock, report: Report, ahead: _Ahead,
                    shared: SharedUse | None,
                    pool: list[tuple[accounts.Account, providers.Secret]] | None) -> None:
        import asyncio

        from fluxbatch import network

        plan, options, selection = self.plan, self.options, report.selection
        recipe, budget = plan.recipe, ahead.budget
        settings = network.settings_for(plan, options)
        run = new_run_id()
        with network.provider_for(plan, options, self.environ,
                                  pooled=pool is not None) as provider:
            members = network.pool_for(plan, options, provider, pool) \
                if pool is not None else None
            refused = None if options.yes else \
                await self._over_balance(provider, selection, ahead.prices, members)
            if refused is not None:
                if not selection.attach:  # (tasks paid earlier are still collected)
                    finish_manifest(recipe, store)  # (what was placed)
                    raise FluxbatchError(refused)
                report.outcomes += _not_submitted(selection, refused)
            store.run_started(run, recipe.name, options.budget)
            self._executing = asyncio.ensure_future(network.execute(
                plan, selection, store, provider, settings, self.on_event, self._started,
                transport=self.transport, lock=lock, run=run, budget=budget,
                shared=shared, accounts=members))
            try:
                report.outcomes += await self._executing
            except asyncio.CancelledError:
                if not self._aborted:
                    raise  # cancelled from outside: not ours to swallow
                if self._executor is not None:  # what was paid, and what is left to collect
                    report.outcomes += network.left_by_stop(selection, self._executor, store,
                                                            run)
        report.interrupted = self._stopping
        report.fatal = self._executor.fatal if self._executor is not None else None
        if self._executor is not None and pool is not None:
            report.accounts_out = self._executor.accounts_out
        report.fatal = report.fatal or refused
        if budget is not None:
            report.budget = self._budget_outcome(store, run, budget, report)
        store.run_ended(run, finished=not report.stopped and not report.interrupted)

    def _keyed(self, found: list[accounts.Account] | None
               ) -> list[tuple[accounts.Account, providers.Secret]] | None:
        """The pool of accounts, each with its key from the environment (a missing one is an
        error before anything is sent); None without an accounts file."""
        if found is None:
            return None
        source = accounts.describe(accounts.named_file(self.options.accounts, self.environ)
                                   or "")
        pool = [(account, accounts.key_of(account, self.environ, source)) for account in found]
        accounts.distinct_keys(pool, source)
        return pool

    async def _over_balance(self, provider: providers.Provider, selection: Selection,
                            prices: Prices,
                            members: list[PoolAccount] | None = None) -> str | None:
        """Why the render may not start (its estimate is over the account's balance, or the
        pool's: its accounts' balances added up), or None. Where the provider, or the base
        URL, offers no balance query, or it fails (for any account of the pool), nothing is
        refused: the check only ever uses the provider's own balance query."""
        from fluxbatch import network

        estimate = estimate_at(selection, prices)
        if not selection.submit or isinstance(estimate, str):
            return None
        asked = [(member.name, member.provider) for member in members] if members else \
            [(None, provider)]
        found = []
        for name, each in asked:
            try:
                # (a pool's account is asked with its own key alone)
                balance = await network.balance(each, {} if members else self.environ,
                                                self.transport)
            except network.NoBalance:
                return None
            found.append((name, balance.usd))
        total = sum(usd_ for _, usd_ in found)
        if estimate <= total + EPSILON:
            return None
        count = len(selection.submit)
        where = f"{provider.info.name} at {providers.without_credentials(provider.base_url)}"
        balance_text = f"the account's balance of {usd(total)}" if not members else \
            f"the balance of the pool's {len(found)} accounts, {usd(total)} in all (" + \
            ", ".join(f"{name} {usd(each)}" for name, each in found) + ")"
        return (f"the estimated cost {usd(estimate)} of the {count:,} "
                f"image{'s' if count != 1 else ''} to render is over {balance_text} "
                f"({where}); nothing was sent. Add credits, or pass --yes to render until the "
                "provider refuses")

    def _budget_outcome(self, store: Store, run: str, budget: Budget,
                        report: Report) -> BudgetOutcome:
        """From the ledger: what the render (`money.SCOPE`) spent, refunds counted."""
        from fluxbatch.execute import BUDGET_REACHED

        runs = [*store.unfinished_runs(self.plan.recipe.name, besides=run), run]
        not_rendered = sum(1 for o in report.outcomes if o.status == OutcomeStatus.SKIPPED
                           and o.reason == BUDGET_REACHED)
        return BudgetOutcome(budget.limit, store.spent_by_runs(runs), budget.reached,
                             not_rendered)

    async def _shared(self) -> SharedUse | None:
        """The shared store the operator named, opened and checked before anything is paid
        (a `StoreError`, one line, when it cannot be used); None without one. Asked only
        when something must be requested: a null build makes no request of the store."""
        import asyncio

        from fluxbatch.state.shared import SharedStore, StoreError, account_name

        url = store_of(self.options.store, self.environ)
        if url is None:
            return None
        from fluxbatch.sharing import SharedUse

        shared = SharedStore.open(url)
        try:
            await asyncio.get_running_loop().run_in_executor(shared.pool, shared.check)
        except StoreError as error:
            shared.close()
            raise StoreError(f"{error}; nothing was sent") from None
        return SharedUse(shared, account_name(self.environ), force=self.options.force,
                         retry_unknown=self.options.retry_unknown)

    def _started(self, executor: Executor) -> None:
        self._executor = executor
        if self._stopping:
            executor.stop()


def _not_submitted(selection: Selection, reason: str) -> list[Outcome]:
    """The images a refused render leaves out (it only collects what earlier runs paid)."""
    from fluxbatch.outcomes import Outcome

    left = [job for submitted in selection.submit
            for job in (submitted, *selection.followers.pop(submitted.key, ()))]
    selection.submit = []
    return [Outcome(job, OutcomeStatus.SKIPPED, reason) for job in left]


@dataclass(frozen=True, slots=True)
class _Ahead:
    """What the offline half found for the network half: the budget (when `--budget` is
    given), the prices the provider has charged here, and the pool's accounts (when there
    is an accounts file)."""

    budget: Budget | None
    prices: Prices
    pool: list[accounts.Account] | None


def adopt_found_images(plan: Plan, store: Store) -> None:
    """Images at their planned paths that the store does not know (copied from a shard, or
    the store and manifest were lost) are adopted by the key their provenance carries
    (`Store.adopt`)."""
    placed = store.placed_outputs(plan.recipe.name)
    unknown = [job for job in plan.jobs if job.output not in placed]
    if unknown:
        store.adopt(plan.recipe.name, unknown)
