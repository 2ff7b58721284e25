"""The ledger: what was paid for, by job key. Per key, its latest task: submitting →
submitted (task id, polling URL, cost: committed before the first poll) → ready (reported
seed) → fetched (the bytes' sha256, in the content store) — or moderated / failed / unknown
/ gone, with the reason (placed: the bytes are only in placed files).

`Ledger` is what the rest of fluxbatch asks of it; `LedgerTables` answers from the root's
SQLite file (each change one committed transaction)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fluxbatch.errors import StateError
from fluxbatch.layout import DATABASE, STATE_DIR
from fluxbatch.providers import without_credentials
from fluxbatch.state.database import Tables
from fluxbatch.vocabulary import Vocabulary


class TaskStatus(Vocabulary):
    """Where a job key's latest task stands, in the ledger (`tasks.status`)."""

    SUBMITTING = "submitting"  # handed to the wire: until an answer, it may have been billed
    SUBMITTED = "submitted"
    READY = "ready"
    FETCHED = "fetched"  # the bytes are in the content store
    PLACED = "placed"  # the bytes are only in placed files (a migrated root, a pruned store)
    MODERATED = "moderated"
    FAILED = "failed"
    UNKNOWN = "unknown"
    GONE = "gone"  # paid, but the provider forgot the task before its bytes were kept


IN_FLIGHT = frozenset({TaskStatus.SUBMITTED, TaskStatus.READY})


@dataclass(frozen=True, slots=True)
class Task:
    """The ledger's row for one job key."""

    key: str
    status: TaskStatus
    provider: str | None = None
    base_url: str | None = None
    task_id: str | None = None
    polling_url: str | None = None
    cost: float | None = None
    submitted_at: float | None = None
    reported_seed: int | None = None
    blob: str | None = None
    reason: str | None = None
    run: str | None = None
    updated_at: float = 0.0
    # The operator's name for the account whose key paid for it (`--accounts`), never the
    # key; None: the provider's own key variable (BFL_API_KEY...).
    account: str | None = None


class Ledger(Protocol):
    """What was paid for, by job key (each change durable before it returns). The local
    backend is `LedgerTables`; a shared store answers the same questions."""

    def task(self, key: str) -> Task | None: ...

    def tasks(self) -> dict[str, Task]: ...

    def submitting(self, key: str, provider: str, base_url: str | None,
                   run: str | None = None, account: str | None = None) -> None: ...

    def not_sent(self, key: str) -> None: ...

    def submitted(self, key: str, task_id: str, polling_url: str, cost: float | None,
                  at: float) -> None: ...

    def ready(self, key: str, reported_seed: int | None) -> None: ...

    def paid_elsewhere(self, task: Task) -> None: ...

    def fetched(self, key: str, blob: str) -> None: ...

    def fetch_again(self, key: str, reason: str) -> bool: ...

    def ended(self, key: str, status: TaskStatus, reason: str | None) -> None: ...

    def reserve(self, key: str, reservation: Reservation) -> None: ...


class Charge(Vocabulary):
    """What became of one paid submit (`charges.status`)."""

    RESERVED = "reserved"  # sent (or about to be): no answer recorded yet
    CHARGED = "charged"  # accepted: `cost` is what the provider reported (NULL: nothing)
    REFUNDED = "refunded"  # moderated or failed: not billed
    UNKNOWN = "unknown"  # its answer was never learned: counted as spent


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a run holds against its budget for one submit, and what it records of it."""

    usd: float | None  # held (None: no budget, nothing held)
    estimate: float | None  # the catalogue's price of the request
    model: str
    recipe: str
    job: str
    provider: str
    run: str | None
    account: str | None = None  # the operator's name for the account that pays it


@dataclass(frozen=True, slots=True)
class ChargeRow:
    """One row of `charges`: one paid submit."""

    key: str
    run: str | None
    recipe: str | None
    job: str | None
    model: str | None
    provider: str | None
    estimate: float | None  # USD
    reserved: float | None  # USD
    cost: float | None  # credits reported
    status: str
    at: float
    account: str | None = None


def charged_usd(row: ChargeRow) -> float:
    """What a charge counts as spent: the cost reported; without one, what was held for it
    (or the catalogue's price); an unknown outcome counts as spent; a refund as nothing."""
    if row.status == Charge.REFUNDED:
        return 0.0
    if row.status == Charge.CHARGED and row.cost is not None:
        return row.cost / 100
    held = row.reserved if row.reserved is not None else row.estimate
    return held or 0.0


_CHARGE_COLUMNS = ("key, run, recipe, job, model, provider, estimate, reserved, cost, status, "
                   "at, account")
_TASK_COLUMNS = ("key, status, provider, base_url, task_id, polling_url, cost, submitted_at, "
                 "reported_seed, blob, reason, run, updated_at, account")
_STATUSES = {status.value: status for status in TaskStatus}


def _task_of(row: tuple[Any, ...], root: Path) -> Task:
    """A row of `_TASK_COLUMNS` as a `Task`, its status a `TaskStatus` (found by value in a
    dict: calling the enum would cost as much as the rest, and a plan reads the whole ledger)."""
    status = _STATUSES.get(row[1])
    if status is None:
        raise StateError(f"{root / STATE_DIR / DATABASE}: the ledger holds a task whose status "
                         f"{row[1]!r} this fluxbatch does not know; upgrade fluxbatch")
    return Task(row[0], status, *row[2:])


class LedgerTables(Tables):
    """The ledger in the root's SQLite file (`tasks`)."""

    # -- reading ------------------------------------------------------------------------

    def tasks(self) -> dict[str, Task]:
        return {row[0]: _task_of(row, self.root) for row in
                self.db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks")}

    def lazy_tasks(self) -> Mapping[str, Task]:
        """The ledger, read row by row as asked (a null build of 10,000 images reads none of
        it); only while the store is open."""
        return _LazyTasks(self)

    def keys_in_flight(self) -> set[str]:
        """The keys whose task is in flight: one query, no row read whole."""
        statuses = sorted(status.value for status in IN_FLIGHT)
        marks = ", ".join("?" * len(statuses))
        return {row[0] for row in self.db.execute(
            f"SELECT key FROM tasks WHERE status IN ({marks})", statuses)}

    def task(self, key: str) -> Task | None:
        row = self.db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE key = ?",
                              (key,)).fetchone()
        return None if row is None else _task_of(row, self.root)

    # -- writing (each call one committed transaction) ------------------------------------

    def _task(self, key: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)
        self.db.execute(f"INSERT INTO tasks (key, {names}) VALUES (?, {marks}) "
                        f"ON CONFLICT(key) DO UPDATE SET {updates}", (key, *fields.values()))

    def submitting(self, key: str, provider: str, base_url: str | None,
                   run: str | None = None, account: str | None = None) -> None:
        """(A password in the base URL, `https://user:secret@host`, is not recorded; nor is
        any key: an account is recorded by the name the operator gave it.)"""
        self._task(key, status=TaskStatus.SUBMITTING, provider=provider,
                   base_url=without_credentials(base_url) if base_url else base_url,
                   task_id=None, polling_url=None, cost=None, submitted_at=None,
                   reported_seed=None, blob=None, reason=None, run=run, account=account)

    def not_sent(self, key: str) -> None:
        """The submit never left (or was refused unprocessed): nothing was paid."""
        with self.transaction():
            self.db.execute("DELETE FROM tasks WHERE key = ? AND status = ?",
                            (key, TaskStatus.SUBMITTING))
            self.db.execute("DELETE FROM charges WHERE key = ? AND status = ?",
                            (key, Charge.RESERVED))

    def submitted(self, key: str, task_id: str, polling_url: str, cost: float | None,
                  at: float) -> None:
        """The provider accepted the task: its reservation (if any) becomes a charge of the
        reported cost, in the same transaction."""
        with self.transaction():
            self._task(key, status=TaskStatus.SUBMITTED, task_id=task_id,
                       polling_url=without_credentials(polling_url), cost=cost,
                       submitted_at=at)
            settled = self.db.execute(
                "UPDATE charges SET status = ?, cost = ?, task_id = ?, settled_at = ? WHERE id = "
                "(SELECT MAX(id) FROM charges WHERE key = ? AND status = ?)",
                (Charge.CHARGED, cost, task_id, at, key, Charge.RESERVED)).rowcount
            if not settled:  # (sent without a reservation: recorded all the same)
                self.db.execute(
                    "INSERT INTO charges (key, run, provider, account, cost, status, task_id, "
                    "at, settled_at) SELECT key, run, provider, account, ?, ?, ?, ?, ? FROM "
                    "tasks WHERE key = ?", (cost, Charge.CHARGED, task_id, at, at, key))

    def paid_elsewhere(self, task: Task) -> None:
        """A task another output root paid for (found through the shared store), to be
        collected by this one, through `task.account` (an account of the pool, by name; None:
        the provider's own key): in flight here, charged nowhere here (it is that root's
        spending, and its ledger says so)."""
        self._task(task.key, status=TaskStatus.SUBMITTED, provider=task.provider,
                   base_url=without_credentials(task.base_url) if task.base_url else None,
                   task_id=task.task_id,
                   polling_url=without_credentials(task.polling_url or ""), cost=task.cost,
                   submitted_at=task.submitted_at, reported_seed=None, blob=None, reason=None,
                   run=None, account=task.account)

    def ready(self, key: str, reported_seed: int | None) -> None:
        self._task(key, status=TaskStatus.READY, reported_seed=reported_seed)

    def fetched(self, key: str, blob: str) -> None:
        self._task(key, status=TaskStatus.FETCHED, blob=blob, reason=None)

    def fetch_again(self, key: str, reason: str) -> bool:
        """The bytes kept of a paid task are lost (damaged on disk): it is in flight again, to
        be polled for a fresh URL and downloaded again, without paying. False when the ledger
        knows no task to poll (then nothing changes)."""
        task = self.task(key)
        if task is None or not task.task_id or not task.polling_url:
            return False
        self._task(key, status=TaskStatus.READY, blob=None, reason=reason)
        return True

    def ended(self, key: str, status: TaskStatus, reason: str | None) -> None:
        """moderated | failed | unknown | gone; or, for a task in flight, only its reason."""
        if status in IN_FLIGHT:
            self.db.execute("UPDATE tasks SET reason = ?, updated_at = ? WHERE key = ?",
                            (reason, time.time(), key))
            return
        with self.transaction():
            self._task(key, status=status, reason=reason)
            if status in (TaskStatus.MODERATED, TaskStatus.FAILED):
                # Not billed (BFL charges neither): the task's own charge is refunded; a
                # submit refused before any task existed had its reservation dropped.
                self.db.execute(
                    "UPDATE charges SET status = ?, settled_at = ? WHERE key = ? AND status = ? "
                    "AND task_id = (SELECT task_id FROM tasks WHERE key = ?)",
                    (Charge.REFUNDED, time.time(), key, Charge.CHARGED, key))
            elif status == TaskStatus.UNKNOWN:
                self._unknown_reservations(key)

    def known(self, key: str) -> None:
        """A key whose image the root holds in a placed file, unless the ledger knows more."""
        self.db.execute("INSERT OR IGNORE INTO tasks (key, status, updated_at) VALUES (?, ?, ?)",
                        (key, TaskStatus.PLACED, time.time()))

    # -- money: charges and runs (docs/money.md) -------------------------------------------

    def reserve(self, key: str, reservation: Reservation) -> None:
        """Right before a paid submit is sent: what it may cost, held against the budget
        until the answer says what it did cost. A reservation an earlier attempt left (its
        process died while sending) is unknown from here on: it may have been billed."""
        with self.transaction():
            self._unknown_reservations(key)
            self.db.execute(
                "INSERT INTO charges (key, run, recipe, job, model, provider, estimate, "
                "reserved, status, at, account) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, reservation.run, reservation.recipe, reservation.job, reservation.model,
                 reservation.provider, reservation.estimate, reservation.usd, Charge.RESERVED,
                 time.time(), reservation.account))

    def _unknown_reservations(self, key: str) -> None:
        self.db.execute("UPDATE charges SET status = ?, settled_at = ? WHERE key = ? AND "
                        "status = ?", (Charge.UNKNOWN, time.time(), key, Charge.RESERVED))

    def settle_reservations(self) -> None:
        """Reservations left by a run that died (the root's lock is held, so no outbox of it
        is still sending): one whose submit was recorded as sent is unknown (it may have
        been billed); one whose submit never left is dropped."""
        with self.transaction():
            rows = self.db.execute(
                "SELECT c.id, c.at, t.status, t.updated_at FROM charges c LEFT JOIN tasks t "
                "ON t.key = c.key WHERE c.status = ?", (Charge.RESERVED,)).fetchall()
            for ident, at, status, updated_at in rows:
                sent = status in (TaskStatus.SUBMITTING, TaskStatus.UNKNOWN) and \
                    updated_at is not None and updated_at >= at
                if sent:
                    self.db.execute("UPDATE charges SET status = ?, settled_at = ? WHERE id = ?",
                                    (Charge.UNKNOWN, time.time(), ident))
                else:
                    self.db.execute("DELETE FROM charges WHERE id = ?", (ident,))

    def run_started(self, run: str, recipe: str, budget: float | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO runs (run, recipe, started_at, budget) "
                        "VALUES (?, ?, ?, ?)", (run, recipe, time.time(), budget))

    def run_ended(self, run: str, *, finished: bool) -> None:
        """`finished`: the run went to its end; one stopped early (Ctrl-C, an error, its
        budget) is continued by the next run of its recipe, whose budget counts its spend."""
        self.db.execute("UPDATE runs SET ended_at = ?, finished = ? WHERE run = ?",
                        (time.time(), int(finished), run))

    def unfinished_runs(self, recipe: str, *, besides: str | None = None) -> list[str]:
        """The runs of `recipe` since its last run that finished (killed, interrupted,
        stopped by an error or by their budget): the render that the next run continues."""
        last = self.db.execute("SELECT MAX(started_at) FROM runs WHERE recipe = ? AND "
                               "finished = 1", (recipe,)).fetchone()[0]
        rows = self.db.execute("SELECT run FROM runs WHERE recipe = ? AND started_at > ? "
                               "AND run IS NOT ? ORDER BY started_at",
                               (recipe, last if last is not None else -1.0, besides))
        return [run for (run,) in rows]

    def spent_by_runs(self, runs: Iterable[str]) -> float:
        """USD: what `runs` paid, as a budget counts it (see `charged_usd`)."""
        wanted = list(runs)
        if not wanted:
            return 0.0
        marks = ", ".join("?" for _ in wanted)
        rows = self.db.execute(f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE run IN ({marks})",
                               wanted)
        return round(sum(charged_usd(ChargeRow(*row)) for row in rows), 6)

    def highest_costs(self, provider: str) -> dict[str, tuple[float, float]]:
        """Per model, what `provider` has charged here at most: (USD, and its ratio to the
        catalogue's price of the same request)."""
        rows = self.db.execute(
            "SELECT model, MAX(cost), MAX(CASE WHEN estimate > 0 THEN cost / (estimate * 100) "
            "END) FROM charges WHERE provider = ? AND cost IS NOT NULL AND model IS NOT NULL "
            "GROUP BY model", (provider,))
        return {model: (most / 100, ratio or 0.0) for model, most, ratio in rows}

    def charges(self, since: float | None = None, *,
                recipe: str | None = None) -> list[ChargeRow]:
        """Every paid submit (and reservation) the ledger holds, oldest first; of one
        recipe's images, with `recipe`."""
        where = "at >= ?" + (" AND recipe = ?" if recipe is not None else "")
        parameters = (since if since is not None else -1.0,
                      *((recipe,) if recipe is not None else ()))
        rows = self.db.execute(f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE {where} "
                               "ORDER BY at, id", parameters)
        return [ChargeRow(*row) for row in rows]


class _LazyTasks(Mapping[str, Task]):
    def __init__(self, ledger: LedgerTables) -> None:
        self.ledger = ledger
        self.seen: dict[str, Task | None] = {}
        self.every: dict[str, Task] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        if self.every is not None:
            return self.every.get(key, default)
        if key not in self.seen:
            self.seen[key] = self.ledger.task(key)
        found = self.seen[key]
        return default if found is None else found

    def __getitem__(self, key: str) -> Task:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def _all(self) -> dict[str, Task]:
        if self.every is None:
            self.every = self.ledger.tasks()
        return self.every

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def keys_in_flight(tasks: Mapping[str, Task]) -> set[str]:
    """The keys of `tasks` whose task is in flight. A ledger read lazily answers with one
    query, so that a null build still reads none of its rows."""
    if isinstance(tasks, _LazyTasks) and tasks.every is None:
        return tasks.ledger.keys_in_flight()
    return {key for key, task in tasks.items() if task.status in IN_FLIGHT}


def new_run_id() -> str:
    """An id for one render, recorded with each task it submits (what this run spent)."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
