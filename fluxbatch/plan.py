"""Stage 3: compare the plan with what is already on disk and say what each job needs.

`build(recipe_path, ...)` is the shared front half of `plan`, `render`, `status` and `clean`:
load → expand → classify. The classification reads the state (which images exist, under
which key) but never changes anything.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxbatch import models, recipe
from fluxbatch.errors import ConfigError, FluxbatchError, Problem, RecipeError
from fluxbatch.expand import Job, Plan, expand
from fluxbatch.state import STATE_DIR, InFlight, Record, Store

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
    """Outputs that a symbolic link (a linked directory on the way, or a link where the file
    goes) would send outside the output root, or into its state directory."""
    root = plan.recipe.output_root
    real_root = os.path.realpath(root)
    verdicts: dict[str, str | None] = {}
    problems = []
    for job in plan.jobs:
        parent = os.path.dirname(job.output)
        if parent not in verdicts:
            verdicts[parent] = _link_problem(real_root, root / parent)
        problem = verdicts[parent]
        target = root / job.output
        if problem is None and os.path.islink(target):
            problem = _link_problem(real_root, target)
        if problem is None:
            continue
        spec = plan.recipe.job(job.job)
        problems.append(plan.recipe.problem(("jobs", spec.index, "output"),
                                            f"output path {job.output!r} {problem}"))
    return problems


def _link_problem(real_root: str, path: Path) -> str | None:
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        return "leaves the output root through a symbolic link"
    if os.path.relpath(real, real_root).split(os.sep)[0].casefold() == STATE_DIR:
        return f"leads into {STATE_DIR}/, the output root's state directory, through a " \
            "symbolic link"
    return None


def classify(plan: Plan, records: Mapping[str, Record], *, verify: bool = False,
             verified: Callable[[str, int], None] | None = None) -> Classified:
    """Each job's state, given the state's records by output path.

    A written image is up to date when its key matches and the file is still the one that
    was written: same size and mtime (the fast path), else — or with `verify` — the same
    sha256. `verified(output, mtime_ns)` hears of files confirmed by hash, so the fast path
    works for them next time.
    """
    root = plan.recipe.output_root
    states: list[str] = []
    reasons: dict[int, str] = {}
    for job in plan.jobs:
        record = records.get(job.output)
        state = _state(job, record, root, verify, verified)
        states.append(state)
        if record is not None and record.reason and state not in (UP_TO_DATE, NEW, STALE):
            reasons[job.index] = record.reason
        elif record is not None and state in (MISSING, STALE, IN_FLIGHT, UNKNOWN):
            reasons[job.index] = _why(state, record, root, job.output)
    planned = {job.output for job in plan.jobs}
    orphans = tuple(sorted(output for output, record in records.items()
                           if output not in planned and record.written_key is not None))
    return Classified(plan, tuple(states), orphans, reasons)


_ATTEMPT_STATES = {"submitted": IN_FLIGHT, "ready": IN_FLIGHT, "submitting": UNKNOWN,
                   "unknown": UNKNOWN, "failed": FAILED, "moderated": MODERATED}


def _state(job: Job, record: Record | None, root: Path, verify: bool,
           verified: Callable[[str, int], None] | None) -> str:
    if record is None:
        return NEW
    if record.written_key == job.key and _intact(root, job.output, record, verify, verified):
        return UP_TO_DATE
    if record.key == job.key and record.status in _ATTEMPT_STATES:
        return _ATTEMPT_STATES[record.status]
    if record.written_key == job.key:
        return MISSING
    return STALE if record.written_key is not None else NEW


_REASONS = {
    STALE: "the request changed (prompt, parameters, model or seed)",
    IN_FLIGHT: "submitted by an earlier run; the next render collects it without paying again",
    UNKNOWN: "a run stopped while submitting it: the answer was never recorded, and it may "
             "have been billed",
}


def _why(state: str, record: Record, root: Path, output: str) -> str:
    """Why a job is not up to date, when the state itself recorded no reason."""
    if state in _REASONS:
        return _REASONS[state]
    if os.path.lexists(root / (record.path or output)):
        return "the file was changed after it was written"
    return "the file was deleted"


def _intact(root: Path, output: str, record: Record, verify: bool,
            verified: Callable[[str, int], None] | None) -> bool:
    target = root / (record.path or output)
    try:
        stat = os.stat(target)
    except OSError:
        return False
    if stat.st_size != record.size:
        return False
    if not verify and stat.st_mtime_ns == record.mtime_ns:
        return True
    if file_sha256(target) != record.sha256:
        return False
    if verified is not None:
        verified(output, stat.st_mtime_ns)
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# -- selecting what a render does ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    concurrency: int | None = None
    base_url: str | None = None
    force: bool = False
    only: tuple[str, ...] = ()
    retry_unknown: bool = False
    verify: bool = False
    budget: float | None = None
    shard: tuple[int, int] | None = None  # (i, n), 1-based
    task_timeout: float | None = None


@dataclass(slots=True)
class Selection:
    """What a render will do with each planned job."""

    classified: Classified
    submit: list[Job] = field(default_factory=list)
    attach: list[tuple[Job, InFlight]] = field(default_factory=list)
    held_unknown: list[Job] = field(default_factory=list)
    held_moderated: list[Job] = field(default_factory=list)
    up_to_date: int = 0
    filtered_out: int = 0

    @property
    def jobs(self) -> list[Job]:
        return self.submit + [job for job, _ in self.attach]

    def estimated_usd(self) -> float | None:
        total = 0.0
        for job in self.submit:
            cost = models.estimate_cost(job.model, job.request)
            if cost is None:
                return None
            total += cost
        return total


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, like 2/4") from None
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {text!r}: I must be between 1 and N")
    return index, count


def matches_only(job: Job, patterns: Sequence[str]) -> bool:
    """`--only`: a job name, `name=value` on a matrix value (globs allowed), or an output glob."""
    for pattern in patterns:
        if "=" in pattern:
            name, _, wanted = pattern.partition("=")
            if name in job.vars and fnmatch.fnmatchcase(str(job.vars[name]), wanted):
                return True
        elif pattern == job.job or fnmatch.fnmatchcase(job.output, pattern):
            return True
    return False


def in_shard(job: Job, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and edits: by the job's key, not its position."""
    if shard is None:
        return True
    index, count = shard
    return int(job.key[:12], 16) % count == index - 1


def select(classified: Classified, in_flight: Mapping[str, InFlight], options: Options,
           provider: str) -> Selection:
    selection = Selection(classified)
    # The in-process emulator dies with its run: its tasks cannot be collected later, and
    # sending one again costs nothing, so nothing of it is held back or re-attached.
    ephemeral = provider == "emulator" and options.base_url is None
    for job, state in zip(classified.plan.jobs, classified.states, strict=True):
        if (options.only and not matches_only(job, options.only)) or \
                not in_shard(job, options.shard):
            selection.filtered_out += 1
            continue
        flight = None if ephemeral else in_flight.get(job.key)
        if state == IN_FLIGHT and flight is not None and flight.provider == provider:
            selection.attach.append((job, flight))  # paid for already: never submit again
        elif state == UNKNOWN and not (options.retry_unknown or ephemeral):
            selection.held_unknown.append(job)  # maybe paid: even --force needs --retry-unknown
        elif options.force:
            selection.submit.append(job)
        elif state == UP_TO_DATE:
            selection.up_to_date += 1
        elif state in (NEW, MISSING, STALE, FAILED, IN_FLIGHT) or state == UNKNOWN:
            selection.submit.append(job)
        elif state == MODERATED:
            selection.held_moderated.append(job)
    if options.only and selection.filtered_out == len(classified.plan.jobs):
        raise FluxbatchError(f"--only {' '.join(options.only)}: no job matches (give a job "
                             "name, an output glob, or NAME=VALUE on a matrix value)")
    return selection


def classify_with_store(plan: Plan, store: Store, options: Options) -> Classified:
    with store.transaction():
        return classify(plan, store.records(), verify=options.verify, verified=store.touch)


def check_budget(selection: Selection, budget: float | None) -> None:
    if budget is None:
        return
    estimate = selection.estimated_usd()
    if estimate is None:
        raise FluxbatchError(f"--budget {budget}: some models have no published price, so "
                             "the cost cannot be bounded; drop --budget to go ahead")
    if estimate > budget + 1e-9:
        raise FluxbatchError(f"the estimated cost ${estimate:.2f} of the {len(selection.submit)} "
                             f"images to render is over the budget of ${budget:.2f}; nothing "
                             "was sent")
