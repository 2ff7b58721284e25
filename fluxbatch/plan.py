"""Stage 3: compare the plan with what is already on disk and say what each job needs.

`build(recipe_path, ...)` is the shared front half of `plan`, `render`, `status` and `clean`:
load → expand → classify. The classification reads the state (which images exist, under
which key) but never changes anything.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxbatch import models, recipe
from fluxbatch.errors import Problem, RecipeError
from fluxbatch.expand import Job, Plan, expand

NEW = "new"
UP_TO_DATE = "up-to-date"
MISSING = "missing"
STALE = "stale"
IN_FLIGHT = "in-flight"
UNKNOWN = "unknown"
FAILED = "failed"
MODERATED = "moderated"
ORPHANED = "orphaned"

# States whose jobs `render` would pay for (in-flight ones are re-attached, not paid again).
TO_RENDER = frozenset({NEW, MISSING, STALE, FAILED})
STATE_ORDER = (UP_TO_DATE, NEW, MISSING, STALE, IN_FLIGHT, FAILED, MODERATED, UNKNOWN, ORPHANED)


@dataclass(frozen=True, slots=True)
class Record:
    """What the state knows about one output path."""

    key: str
    status: str  # "written" | "submitted" | "moderated" | "failed" | "unknown" | ...
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Classified:
    plan: Plan
    states: tuple[str, ...]
    orphans: tuple[str, ...] = ()
    reasons: Mapping[int, str] = field(default_factory=dict)

    def count(self) -> Counter[str]:
        counts = Counter(self.states)
        if self.orphans:
            counts[ORPHANED] = len(self.orphans)
        return counts

    def selected(self, states: frozenset[str]) -> list[Job]:
        return [job for job, state in zip(self.plan.jobs, self.states, strict=True)
                if state in states]


def load_plan(path: str, *, out: str | None = None, yes: bool = False) -> Plan:
    """Load, expand, and check that no output path escapes the output root via a symlink."""
    plan = expand(recipe.load(path, output_root=out, strict=False), yes=yes)
    problems = escape_problems(plan)
    if problems:
        raise RecipeError(problems)
    return plan


def escape_problems(plan: Plan) -> list[Problem]:
    root = plan.recipe.output_root
    real_root = os.path.realpath(root)
    inside: dict[str, bool] = {}
    problems = []
    for job in plan.jobs:
        parent = os.path.dirname(job.output)
        if parent not in inside:
            inside[parent] = _within(real_root, root / parent)
        real_file = root / job.output
        escapes = not inside[parent] or (real_file.is_symlink()
                                         and not _within(real_root, real_file))
        if escapes:
            spec = plan.recipe.jobs[[s.name for s in plan.recipe.jobs].index(job.job)]
            problems.append(plan.recipe.problem(
                ("jobs", spec.index, "output"),
                f"output path {job.output!r} leaves the output root through a symbolic link"))
    return problems


def _within(real_root: str, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def classify(plan: Plan, records: Mapping[str, Record], *,
             verify: Callable[[Path, Record], bool] | None = None) -> Classified:
    """Each job's state, given the state's records by output path.

    A written image is up to date when its key matches and the file is still the one that
    was written: same size and mtime (fast path), or same sha256 when `verify` says so.
    """
    root = plan.recipe.output_root
    states: list[str] = []
    reasons: dict[int, str] = {}
    for job in plan.jobs:
        record = records.get(job.output)
        target = root / job.output
        if record is None:
            states.append(NEW)
            continue
        if record.key != job.key:
            states.append(STALE if record.status == "written" or target.exists() else NEW)
            continue
        if record.status == "written":
            states.append(UP_TO_DATE if _intact(target, record, verify) else MISSING)
        elif record.status in ("submitted", "submitting", "ready"):
            states.append(IN_FLIGHT if record.status != "submitting" else UNKNOWN)
        else:
            states.append({"moderated": MODERATED, "failed": FAILED}.get(record.status, UNKNOWN))
        if record.reason:
            reasons[job.index] = record.reason
    planned = {job.output for job in plan.jobs}
    orphans = tuple(sorted(p for p, r in records.items() if p not in planned
                           and r.status == "written"))
    return Classified(plan, tuple(states), orphans, reasons)


def _intact(target: Path, record: Record, verify: Callable[[Path, Record], bool] | None) -> bool:
    try:
        stat = os.stat(target)
    except OSError:
        return False
    if verify is None and stat.st_size == record.size and stat.st_mtime_ns == record.mtime_ns:
        return True
    return verify(target, record) if verify is not None else False


@dataclass(frozen=True, slots=True)
class ModelSummary:
    jobs: int
    to_render: int
    estimated_usd: float | None
    price_source: str | None


def summarise(jobs: Sequence[Job], states: Sequence[str]) -> dict[str, ModelSummary]:
    """Per model: how many jobs, how many would be paid for, and their estimated cost."""
    totals: dict[str, list[Any]] = {}
    for job, state in zip(jobs, states, strict=True):
        entry = totals.setdefault(job.model, [0, 0, 0.0, True])
        entry[0] += 1
        if state in TO_RENDER:
            entry[1] += 1
            cost = models.estimate_cost(job.model, job.request)
            if cost is None:
                entry[3] = False
            else:
                entry[2] += cost
    summary = {}
    for name, (count, to_render, usd, priced) in totals.items():
        price = models.PRICES.get(name)
        summary[name] = ModelSummary(count, to_render, round(usd, 4) if priced else None,
                                     price.source if price else None)
    return summary


def redacted(request: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("***" if k in models.SECRET_FIELDS and v else v) for k, v in request.items()}
