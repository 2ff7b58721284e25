"""What a render may spend, and what it has: the prices a budget reserves, and the budget.

A `--budget` holds at every submit (docs/money.md):

- Right before each paid submit, the executor reserves the image's price (`Prices.reserve`):
  the catalogue's price of the request, raised to the highest cost the provider has reported
  for that model (in this run or in the ledger), and to the catalogue's price scaled by the
  highest ratio of reported cost to catalogue price seen for the model (a provider charging
  5x the list price is expected to go on doing so, for large images too).
- The answer reconciles the reservation to the reported `cost` (`Budget.settle`); a refused
  submit releases it (`Budget.release`); a moderated or failed task is refunded
  (`Budget.refund`); a submit whose answer was lost stays spent.
- An image that does not fit stops the submits (`Budget.reached`); an image that would fit
  once the submits on the wire have answered waits for them (they may cost less than held).

Spend is counted per *render*: this run and the runs of the same recipe that it continues
(killed, interrupted, or stopped by an error or by their budget since the recipe's last run
that went to its end), read from the ledger's `charges`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fluxbatch import models
from fluxbatch.state.ledger import Charge, ChargeRow, charged_usd

# What every budget message says of what it counts.
if TYPE_CHECKING:  # (`plan` and `validate` load this module, and no event loop: asyncio
    import asyncio  # would bring ssl)

SCOPE = "this run and the unfinished runs it continues"
EPSILON = 1e-9  # (sums of cents in floating point)


def usd(amount: float) -> str:
    """`$0.96`; an amount that is not whole cents, with the digits it takes (`$0.525`,
    `$0.0035`), up to four: money is never rounded away in a report."""
    if abs(amount - round(amount, 2)) < EPSILON:
        return f"${amount:,.2f}"
    return f"${amount:,.4f}".rstrip("0")


@dataclass(slots=True)
class Prices:
    """What the provider has charged per model (USD), learned from the ledger and from each
    answer of this run; what a submit reserves."""

    highest: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)  # reported / catalogue, at most
    answered: set[str] = field(default_factory=set)  # models whose cost this run has seen

    @classmethod
    def learned(cls, found: Mapping[str, tuple[float, float]]) -> Prices:
        return cls({model: most for model, (most, _) in found.items()},
                   {model: ratio for model, (_, ratio) in found.items()})

    def known(self, model: str) -> bool:
        """Whether this run has seen the provider answer a submit of the model (with a cost
        or without): until then, its submits go one at a time, so that the first answer
        sets the price the others reserve. (The ledger's costs raise the reservations but do
        not make a probe unneeded: the provider's price may have changed since.)"""
        return model in self.answered

    def reserve(self, model: str, request: Mapping[str, object]) -> float | None:
        """USD to hold for one submit; None when nothing bounds it (no catalogue price)."""
        estimate = models.estimate_cost(model, request)
        if estimate is None:
            return self.highest.get(model)
        scaled = estimate * max(1.0, self.ratio.get(model, 0.0))
        return round(max(estimate, scaled, self.highest.get(model, 0.0)), 6)

    def learn(self, model: str, request: Mapping[str, object], cost_usd: float | None) -> None:
        self.answered.add(model)
        if cost_usd is None:
            return
        self.highest[model] = max(self.highest.get(model, 0.0), cost_usd)
        estimate = models.estimate_cost(model, request)
        if estimate:
            self.ratio[model] = max(self.ratio.get(model, 0.0), cost_usd / estimate)


class BudgetReached(Exception):
    """The next image does not fit in the budget: nothing more is submitted."""


@dataclass(slots=True)
class Budget:
    """A run's budget (USD), counted per render (`SCOPE`): `earlier` is what the unfinished
    runs this one continues spent. All on the render's event loop."""

    limit: float
    earlier: float = 0.0
    held: dict[str, float] = field(default_factory=dict)  # sent, not answered yet
    charged: dict[str, float] = field(default_factory=dict)  # answered: reported or held
    reached: bool = False
    _changed: asyncio.Condition | None = None

    @property
    def spent(self) -> float:
        """Spent and held: what the budget must still cover."""
        return self.earlier + sum(self.charged.values()) + sum(self.held.values())

    def _condition(self) -> asyncio.Condition:
        import asyncio

        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def reserve(self, key: str, price: float) -> None:
        """Hold `price` for `key`, or raise BudgetReached. When it fits only if submits on
        the wire cost less than held, wait for their answers first."""
        changed = self._condition()
        async with changed:
            while True:
                if self.reached:
                    raise BudgetReached
                settled = self.earlier + sum(self.charged.values())
                if settled + price > self.limit + EPSILON:
                    self.reached = True
                    changed.notify_all()
                    raise BudgetReached
                if self.spent + price <= self.limit + EPSILON:
                    self.held[key] = price
                    return
                await changed.wait()

    def holds(self, key: str) -> bool:
        return key in self.held

    async def settle(self, key: str, cost_usd: float | None) -> None:
        """The submit was accepted: its cost is the one reported, or (none reported) what
        was held for it."""
        held = self.held.pop(key, 0.0)
        self.charged[key] = cost_usd if cost_usd is not None else held
        await self._notify()

    async def release(self, key: str) -> None:
        """The submit was refused (or never left): nothing was paid."""
        self.held.pop(key, None)
        await self._notify()

    async def refund(self, key: str) -> None:
        """A moderated or failed task: not billed."""
        self.charged.pop(key, None)
        await self._notify()

    async def unknown(self, key: str) -> None:
        """The answer was lost: what was held counts as spent."""
        if key in self.held:
            self.charged[key] = self.held.pop(key)
        await self._notify()

    async def _notify(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()


@dataclass(slots=True)
class Spend:
    """Paid submits added up (`fluxbatch spend`, the manifest's totals per run)."""

    name: str = ""
    paid: int = 0  # submits charged, refunded or unknown
    estimate: float = 0.0  # USD, the catalogue's
    reported: float = 0.0  # USD, as the provider reported
    not_reported: int = 0  # charged without a reported cost (counted at what was held)
    refunded: int = 0
    refunded_usd: float = 0.0
    unknown: int = 0  # no answer learned: counted as spent
    spent: float = 0.0

    def add(self, row: ChargeRow) -> None:
        self.paid += 1
        self.estimate += row.estimate or 0.0
        if row.status == Charge.REFUNDED:
            self.refunded += 1
            self.refunded_usd += (row.cost or 0.0) / 100
        elif row.status == Charge.CHARGED and row.cost is not None:
            self.reported += row.cost / 100
        elif row.status == Charge.CHARGED:
            self.not_reported += 1
        else:  # reserved (a render sending it now) or unknown
            self.unknown += 1
        self.spent += charged_usd(row)

    def as_json(self) -> dict[str, object]:
        return {"group": self.name, "paid": self.paid, "estimate_usd": round(self.estimate, 6),
                "reported_usd": round(self.reported, 6), "not_reported": self.not_reported,
                "refunded": self.refunded, "refunded_usd": round(self.refunded_usd, 6),
                "unknown": self.unknown, "spent_usd": round(self.spent, 6)}


@dataclass(frozen=True, slots=True)
class BudgetOutcome:
    """What a render with `--budget` spent: `spent` counts `SCOPE`, from the ledger."""

    limit: float
    spent: float
    reached: bool
    not_rendered: int

    def message(self) -> str:
        """`budget reached: spent $0.96 of $1.00; 4 images not rendered (...)`."""
        images = "image" if self.not_rendered == 1 else "images"
        return (f"budget reached: spent {usd(self.spent)} of {usd(self.limit)}; "
                f"{self.not_rendered:,} {images} not rendered (the budget counts {SCOPE}; "
                "raise --budget to go on)")

    def as_json(self) -> dict[str, object]:
        return {"limit_usd": self.limit, "spent_usd": round(self.spent, 6),
                "reached": self.reached, "not_rendered": self.not_rendered,
                "counts": SCOPE}
