"""The task table: lifetimes, outcomes, active-task caps and the record of what happened.

A task's status is a pure function of the clock: it is Pending until `finishes`, then its
outcome. Nothing runs in the background, so 1,000 pending tasks cost 1,000 small objects.
"""

from __future__ import annotations

import heapq
import math
import random
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fluxbatch.emulator.config import EmulatorConfig
from fluxbatch.emulator.images import output_format

PENDING = "Pending"
READY = "Ready"
REQUEST_MODERATED = "Request Moderated"
CONTENT_MODERATED = "Content Moderated"
ERROR = "Error"
NOT_FOUND = "Task not found"

# Prompt tokens that steer a task's outcome, checked in this order.
OUTCOME_TOKENS = (
    ("[[request-moderated]]", REQUEST_MODERATED),
    ("[[error]]", ERROR),
    ("[[content-moderated]]", CONTENT_MODERATED),
)
UNBILLED = frozenset({REQUEST_MODERATED, CONTENT_MODERATED, ERROR})
SLOW_TOKEN = "[[slow]]"
SLOW_FACTOR = 10.0
_SWEEP_INTERVAL = 5.0


@dataclass(slots=True)
class Task:
    """One accepted submit; `seed` is the one reported back (sent, or drawn for the caller)."""

    id: str
    model: str
    request: dict[str, object]
    route: str  # "bfl" or "comet"
    seed: int
    submitted: float  # monotonic
    start_time: float  # epoch
    duration: float
    outcome: str
    fmt: str
    cost: float | None = None  # credits charged for it
    refunded: bool = False  # moderated or failed, and its credits given back
    owner: str = ""  # the key of the account that submitted it ("": the only account)

    @property
    def finishes(self) -> float:
        return self.submitted + self.duration

    @property
    def end_time(self) -> float:
        return self.start_time + self.duration

    @property
    def pixel_request(self) -> dict[str, object]:
        """The body with the reported seed filled in: what the image is rendered from."""
        return {**self.request, "seed": self.seed}

    def status(self, now: float) -> str:
        return PENDING if now < self.finishes else self.outcome

    def progress(self, now: float) -> float:
        if self.duration <= 0:
            return 1.0
        return round(min(0.99, max(0.0, (now - self.submitted) / self.duration)), 3)


@dataclass(slots=True)
class Stats:
    """Counters a test can assert on."""

    requests: int = 0  # every request received, whatever its answer
    submits: int = 0
    rejected_429: int = 0  # every 429: a full cap, or shed
    shed_429: int = 0  # of which shed (`shed_rate`), below the caps
    rejected_422: int = 0
    rejected_auth: int = 0
    polls: int = 0
    downloads: int = 0
    redirects: int = 0
    leaked_auth_downloads: int = 0
    peak_active: int = 0  # most Pending tasks at once, across the account
    faults: dict[str, int] = field(default_factory=dict)
    # With several accounts (`EmulatorConfig.accounts`), by key: most Pending tasks at once,
    # and submits accepted; polls of a task with another account's key (answered "Task not
    # found", as another account's task is).
    peak_by_account: dict[str, int] = field(default_factory=dict)
    submits_by_account: dict[str, int] = field(default_factory=dict)
    foreign_polls: int = 0

    def count_fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A full active-task cap: seconds until its first slot frees, and whose cap it is."""

    wait: float
    cap: int
    model: str | None  # None: the account-wide cap


def outcome_of(prompt: object) -> tuple[str, float]:
    """(final status, latency factor) for a prompt's test tokens."""
    text = prompt if isinstance(prompt, str) else ""
    factor = SLOW_FACTOR if SLOW_TOKEN in text else 1.0
    for token, outcome in OUTCOME_TOKENS:
        if token in text:
            return outcome, 0.0 if outcome == REQUEST_MODERATED else factor
    return READY, factor


class TaskTable:
    """Every task by id, plus heaps of the pending ones, per account, for the active-task
    caps."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._tasks: dict[str, Task] = {}
        # Per account (its key; "" when there is only one): its pending tasks, all and by model.
        self._pending: dict[str, list[tuple[float, str]]] = {}
        self._pending_by_model: dict[str, dict[str, list[tuple[float, str]]]] = {}
        self._latency_rng = random.Random(f"{config.seed}:latency")
        self._seed_rng = random.Random(f"{config.seed}:seed")
        self._last_sweep = -math.inf

    def __len__(self) -> int:
        return len(self._tasks)

    def reconfigure(self, config: EmulatorConfig) -> None:
        """New caps (or latencies) from now on; the tasks already running keep theirs."""
        self._config = config

    def caps(self, owner: str) -> tuple[int, Mapping[str, int]]:
        """The account's cap, and its per-model caps (each at most the account's)."""
        cap = next((account.cap for account in self._config.accounts
                    if account.key == owner and account.cap is not None), self._config.cap)
        return cap, {model: min(model_cap, cap)
                     for model, model_cap in self._config.model_caps.items()}

    def _heaps(self, owner: str, model: str | None) -> list[tuple[float, str]] | None:
        if model is None:
            return self._pending.setdefault(owner, [])
        if model not in self._config.model_caps:
            return None
        return self._pending_by_model.setdefault(owner, {}).setdefault(model, [])

    def refusal(self, model: str, now: float, owner: str = "") -> Refusal | None:
        """None when `model` may start another task, else which cap is full and for how long."""
        refusals = []
        cap, model_caps = self.caps(owner)
        wait = self._wait(self._pending.setdefault(owner, []), cap, now)
        if wait is not None:
            refusals.append(Refusal(wait, cap, None))
        model_cap = model_caps.get(model)
        heap = self._heaps(owner, model)
        if model_cap is not None and heap is not None:
            wait = self._wait(heap, model_cap, now)
            if wait is not None:
                refusals.append(Refusal(wait, model_cap, model))
        return max(refusals, key=lambda r: r.wait) if refusals else None

    def active(self, now: float, model: str | None = None, owner: str | None = None) -> int:
        """Pending tasks: of `owner`'s account, or of every account (None)."""
        owners = list(self._pending) if owner is None else [owner]
        count = 0
        for each in owners:
            heap = self._heaps(each, model)
            if heap:
                _drop_finished(heap, now)
                count += len(heap)
        return count

    def add(
        self, model: str, request: Mapping[str, Any], route: str, now: float, epoch: float,
        owner: str = "",
    ) -> Task:
        outcome, factor = outcome_of(request.get("prompt"))
        sent_seed = request.get("seed")  # (`request: Any`: validated, so an integer if sent)
        drawn_seed = self._seed_rng.randrange(2**32)
        task = Task(
            id=str(uuid.uuid4()),
            model=model,
            request=dict(request),
            route=route,
            seed=int(sent_seed) if sent_seed is not None else drawn_seed,
            submitted=now,
            start_time=epoch,
            duration=self._draw_latency() * factor,
            outcome=outcome,
            fmt=output_format(model, request),
            owner=owner,
        )
        self._tasks[task.id] = task
        if task.duration > 0:
            entry = (task.finishes, task.id)
            heapq.heappush(self._pending.setdefault(owner, []), entry)
            heap = self._heaps(owner, model)
            if heap is not None:
                heapq.heappush(heap, entry)
        self._sweep(now)
        return task

    def ended_unbilled(self, now: float) -> list[Task]:
        """Tasks moderated or failed by now and not refunded yet (a provider does not bill
        them)."""
        return [task for task in self._tasks.values() if not task.refunded and task.cost
                and task.outcome in UNBILLED and task.status(now) == task.outcome]

    def get(self, task_id: str, now: float) -> Task | None:
        task = self._tasks.get(task_id)
        if task is not None and self._expired(task, now):
            del self._tasks[task_id]
            return None
        return task

    def _draw_latency(self) -> float:
        mean, sigma = self._config.latency, self._config.latency_sigma
        if mean <= 0:
            return 0.0
        if sigma <= 0:
            return mean
        # Lognormal with the configured mean: E[exp(N(mu, s))] = exp(mu + s²/2).
        return self._latency_rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)

    def _wait(self, heap: list[tuple[float, str]], cap: int, now: float) -> float | None:
        _drop_finished(heap, now)
        if len(heap) < cap:
            return None
        return heap[0][0] - now

    def _expired(self, task: Task, now: float) -> bool:
        return now >= task.finishes + self._config.task_ttl

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < _SWEEP_INTERVAL:
            return
        self._last_sweep = now
        for task_id in [t.id for t in self._tasks.values() if self._expired(t, now)]:
            del self._tasks[task_id]


def _drop_finished(heap: list[tuple[float, str]], now: float) -> None:
    while heap and heap[0][0] <= now:
        heapq.heappop(heap)
