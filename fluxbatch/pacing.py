"""Pacing: how many tasks may be active, how long to wait after a 429, and how long tasks
usually take — the executor's sense of time, kept apart from its protocol logic."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime

import httpx

# How the limit moves (see docs/providers.md, "How requests are retried"):
CAP_EVIDENCE = 2  # 429s in a row at or above a level, with no success there between: the cap
FALLING = 0.75  # after a cut, a 429 below it with no success between: cut to this × level
STEP_WAIT = 1.0  # seconds after a cut (or a step taken) before the limit steps up
STEP_WAIT_LONGEST = 60.0  # each 429 at or above the learned cap doubles that wait, to this


class Slots:
    """Active-task slots: at most `limit` held at once, `limit` at most the configured `cap`.

    Each 429 is read by its *level*: how many of the holders' tasks were in flight when it
    came (accepted by the provider, or attached from an earlier run, and not yet released).
    An account's cap refuses every submit at or above it; a gateway that sheds load refuses
    a few at random, at any level. So:

    - CAP_EVIDENCE 429s in a row at level X or above, with no submit accepted at X or above
      between them, show the cap: the limit is cut to the highest such X, the *learned* cap.
      A 429 below the learned cap before any submit is accepted again shows a cap lower
      still (it dropped mid-run, by an unknown amount): the limit is cut to FALLING × its
      level, so that the tasks finishing meanwhile do not each make room for one more 429.
    - Any other 429 is shedding: that request is retried (after the executor's wait), and
      the limit stays where it is.
    - A 429 at or above the learned cap confirms it: the limit goes back to it (if it was
      trying a step above) and the next step waits twice as long, up to STEP_WAIT_LONGEST.
    - Below the configured cap the limit steps up again, so that a cap that rose, or one cut
      by chance (two shed 429s in a row), is found again within seconds: STEP_WAIT seconds
      after a cut it allows one task more; a submit accepted there raises the learned cap,
      and the next step comes as soon and twice as large. A hard cap therefore costs one 429
      per doubling of the wait.

    A holder is told apart by its asyncio task (a worker holds one slot of each kind at most).
    A step up is taken when it is due, even when no task ends then to make room.
    """

    def __init__(self, cap: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.cap = cap
        self.limit = cap
        self.learned: int | None = None  # the cap the 429s showed, once they have
        self.held = 0
        self._in_flight: set[object] = set()  # holders whose task the provider holds
        self._clock = clock
        self._sleep = sleep
        self._streaks = [0] * (cap + 1)  # per level X: 429s at X or above since a success there
        self._falling = False  # cut, and no submit accepted since
        self._wait = STEP_WAIT  # from a cut or a step taken to the next step up
        self._step = 1
        self._step_at = 0.0
        self._timer: asyncio.Future[None] | None = None  # takes the next step when it is due
        self._waiting = 0  # holders-to-be waiting for a slot
        self._changed = asyncio.Condition()
        self._closed = False

    async def close(self) -> None:
        """No more waiting: the account left the pool, and those waiting for a slot take one
        at once, only to hand their jobs back (nothing more is submitted through it)."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def room(self, claimed: Callable[[], int]) -> None:
        """Wait until a slot is free beyond the `claimed()` ones (jobs taken for a slot here
        that do not hold it yet), without taking it: for a worker that takes a job from a
        queue shared with other accounts only once this one has room for it. It counts as
        waiting (a step up is taken when due)."""
        async with self._changed:
            self._waiting += 1
            try:
                while self.held + claimed() >= self.limit and not self._closed:
                    if self._timer is None:
                        self._arm()
                    await self._changed.wait()
            finally:
                self._waiting -= 1

    async def nudge(self) -> None:
        """Room was given back without a slot being released (a claim let go)."""
        async with self._changed:
            self._changed.notify_all()

    async def acquire(self) -> None:
        async with self._changed:
            self._waiting += 1
            try:
                while self.held >= self.limit and not self._closed:
                    if self._timer is None:
                        self._arm()
                    await self._changed.wait()
            finally:
                self._waiting -= 1
            self.held += 1

    def hold(self) -> None:
        """Take a slot at once, even past the limit: for a task the provider is (perhaps)
        still working on, paid for by an earlier run, which counts against its cap but must
        never wait behind unpaid work."""
        self.held += 1

    async def release(self) -> None:
        async with self._changed:
            self.held -= 1
            self._in_flight.discard(asyncio.current_task())
            self._step_up()
            self._changed.notify_all()

    def attached(self) -> None:
        """The holder polls a task submitted earlier: it counts as in flight."""
        self._in_flight.add(asyncio.current_task())

    def rate_limited(self) -> None:
        """The holder's submit was answered 429: the cap, or shedding."""
        level = self._level()
        learned = self.learned
        if learned is not None and level >= learned:  # the learned cap holds
            self.limit = min(self.limit, learned)
            self._wait = min(STEP_WAIT_LONGEST, 2 * self._wait)
            self._step_later(step=1)
            return
        for x in range(level + 1):
            self._streaks[x] += 1
        shown = self._cap_shown(level)
        if shown is None:
            return  # shedding
        self.limit = self.learned = max(1, min(shown, self.limit))
        self._streaks = [0] * (self.cap + 1)
        self._falling = True
        self._step_later(step=1)

    def _cap_shown(self, level: int) -> int | None:
        """The cap that a 429 at `level` shows, if it shows one."""
        if self._falling:  # 429s go on below the cap just learned: it is lower still
            return int(level * FALLING)
        return next((x for x in range(level, -1, -1) if self._streaks[x] >= CAP_EVIDENCE),
                    None)

    async def succeeded(self) -> None:
        """The holder's submit was accepted: its task is in flight."""
        level = self._level()
        for x in range(level + 1):
            self._streaks[x] = 0
        self._falling = False
        self._in_flight.add(asyncio.current_task())
        learned = self.learned
        if learned is not None and self.limit > learned and level >= learned:
            self.learned = min(level + 1, self.limit)
            if self.learned == self.limit:  # the step was taken: the next comes twice as large
                self._wait = STEP_WAIT
                self._step_later(step=2 * self._step)
        async with self._changed:
            if self._step_up():
                self._changed.notify_all()

    def _level(self) -> int:
        """Tasks in flight: the others' (the holder's own submit is being answered)."""
        return min(len(self._in_flight), self.cap)

    def _step_later(self, step: int) -> None:
        """The next step up, of `step` tasks, comes `_wait` seconds from now."""
        self._step = step
        self._step_at = self._clock() + self._wait
        self._arm()

    def _arm(self) -> None:
        """While some wait for a slot, take the next step up when it is due (a task ending
        then would take it too, but none may)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        learned = self.learned
        if self._waiting and learned is not None and self.limit <= learned < self.cap:
            delay = max(0.0, self._step_at - self._clock())
            self._timer = asyncio.ensure_future(self._step_when_due(delay))

    async def _step_when_due(self, delay: float) -> None:
        await self._sleep(delay)
        async with self._changed:
            if self._timer is not asyncio.current_task():
                return  # armed again meanwhile, for a later step
            self._timer = None
            if self._step_up(due=True):
                self._changed.notify_all()

    def _step_up(self, due: bool = False) -> bool:
        """Raise the limit above the learned cap, when it is time to try."""
        learned = self.learned
        if learned is None or self.limit > learned or self.limit >= self.cap \
                or not (due or self._clock() >= self._step_at):
            return False
        self.limit = min(self.cap, learned + self._step)
        return True


class Durations:
    """Observed task durations per model, to time the first polls when the provider does
    not report progress."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=200))

    def add(self, model: str, seconds: float) -> None:
        self._seen[model].append(seconds)

    def typical(self, model: str) -> float | None:
        seen = self._seen.get(model)
        return statistics.median(seen) if seen and len(seen) >= 3 else None


MAX_RETRY_AFTER = 300.0  # a larger (or nonsensical) Retry-After is capped to this


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (a number or an HTTP date), capped at MAX_RETRY_AFTER."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))
