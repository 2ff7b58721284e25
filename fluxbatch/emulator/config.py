"""The emulator's knobs, one frozen value object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fluxbatch import models

FAULT_KINDS = frozenset({"500", "drop", "drop-after-submit", "slow"})


def _default_model_caps() -> Mapping[str, int]:
    return MappingProxyType(dict(models.MODEL_CONCURRENCY))


@dataclass(frozen=True)
class Account:
    """A key the emulator takes as an account of its own: its own active-task caps (the
    config's model caps, each at most `cap`), its own credits, and its own tasks, which no
    other key is shown ("Task not found")."""

    key: str
    cap: int | None = None  # None: the config's `cap`
    credits: float | None = None  # None: the config's `credits`


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulated API behaves; the defaults match BFL's documented behaviour."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    latency: float = 1.0  # mean task duration in seconds; 0 → Ready immediately
    latency_sigma: float = 0.25  # lognormal shape
    cap: int = models.ACCOUNT_CONCURRENCY  # active (Pending) tasks per account
    # Per-model caps count inside the account cap (BFL does not say; this is the stricter reading).
    model_caps: Mapping[str, int] = field(default_factory=_default_model_caps)
    fault_rate: float = 0.0
    # Share of the submits the caps would accept that are answered 429 anyway, at random and
    # without Retry-After, as a gateway that sheds load does below any cap.
    shed_rate: float = 0.0
    faults: frozenset[str] = FAULT_KINDS
    submit_faults: bool = True  # False: faults hit only polls and downloads (the GETs)
    slow_fault_seconds: float = 1.0  # how long a `slow` fault takes to trickle out a body
    seed: int = 0
    key: str | None = None  # None: any non-empty key is accepted
    # Several accounts, each with its own key, caps and credits; then only their keys are
    # accepted (and `key` is not used). Empty: one account, whatever key is sent.
    accounts: tuple[Account, ...] = ()
    url_ttl: float = 600.0
    task_ttl: float = 3600.0
    max_side: int = 512
    log: str | None = None  # JSONL file, one line per accepted submit
    redirect_downloads: bool = True
    retry_after_header: bool = True
    credits: float = 1_000_000.0  # starting balance; a submit costing more gets 402
    # What each image costs, in credits (1 credit = $0.01): None, the catalogue's price of
    # the request (per megapixel for FLUX.2). A provider or gateway charging 5x the list
    # price of flux-dev is `cost=12.5`. Moderated and failed tasks are refunded.
    cost: float | None = None
    report_cost: bool = True  # False: submits answer `cost: null`, as some gateways do

    def __post_init__(self) -> None:
        unknown = self.faults - FAULT_KINDS
        if unknown:
            raise ValueError(
                f"unknown fault kinds {sorted(unknown)}; choose from {sorted(FAULT_KINDS)}"
            )
        for name in ("fault_rate", "shed_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {rate}")
        if self.latency < 0 or self.latency_sigma < 0:
            raise ValueError("latency and latency_sigma must not be negative")
        caps = [self.cap, *self.model_caps.values(),
                *(account.cap for account in self.accounts if account.cap is not None)]
        if any(cap < 1 for cap in caps):
            raise ValueError("concurrency caps must be at least 1")
        if self.cost is not None and not self.cost >= 0:
            raise ValueError(f"cost must be zero or more, not {self.cost}")
        keys = [account.key for account in self.accounts]
        if len(set(keys)) != len(keys) or not all(keys):
            raise ValueError("each account needs a key of its own")
        if self.max_side < 64:
            raise ValueError(f"max_side must be at least 64, not {self.max_side}")
