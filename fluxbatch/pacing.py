"""Pacing: how many tasks may be active, how long to wait after a 429, and how long tasks
usually take — the executor's sense of time, kept apart from its protocol logic."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import defaultdict, deque
from email.utils import parsedate_to_datetime

import httpx


class Slots:
    """Active-task slots: at most `limit` held at once. The limit shrinks while the provider
    answers 429 (someone else uses the account too) and grows back, one slot per `limit`
    successes, up to the configured cap (additive increase, multiplicative decrease)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.limit = cap
        self.held = 0
        self._successes = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held < self.limit)
            self.held += 1

    async def release(self) -> None:
        async with self._changed:
            self.held -= 1
            self._changed.notify_all()

    def rate_limited(self) -> None:
        self.limit = max(1, min(self.limit, math.ceil(self.held * 0.75)))
        self._successes = 0

    async def succeeded(self) -> None:
        if self.limit >= self.cap:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            async with self._changed:
                self.limit += 1
                self._changed.notify_all()


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
