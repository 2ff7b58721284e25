"""Stage 3: compare the plan with what is already on disk, say what each image needs, and
select what a render does (`--only`, `--shard`, `--force`, `--budget`).

`classify` reads the state (which images exist, under which key) but never changes
anything; `select` turns the classification into a `Selection`, which `session.Render`
carries out. `fluxbatch.front` puts the front half together (load → expand → check links →
read the state → classify) for every command and the Python API.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fluxbatch import models
from fluxbatch.errors import ConfigError, FluxbatchError
from fluxbatch.jobs import Job, Plan
from fluxbatch.layout import stored_path_problem
from fluxbatch.matrix import label, value_hint
from fluxbatch.models import did_you_mean
from fluxbatch.money import EPSILON, SCOPE, Prices, usd
from fluxbatch.recipe import Recipe
from fluxbatch.state.blobs import has_blob
from fluxbatch.state.files import file_sha256
from fluxbatch.state.ledger import IN_FLIGHT as TASK_IN_FLIGHT
from fluxbatch.state.ledger import Task, TaskStatus, keys_in_flight
from fluxbatch.state.placements import Placement
from fluxbatch.state.root import RootState
from fluxbatch.state.store import Store
from fluxbatch.vocabulary import Vocabulary


class ImageState(Vocabulary):
    """What a planned image needs, read against its output root: each job's state in
    `plan`, `status` and the API (`PlannedJob.state`); listed in this order."""

    UP_TO_DATE = "up-to-date"  # placed under its key, and the file is the one written
    STORED = "stored"  # the root holds its image (content store, another file): placed free
    NEW = "new"
    MISSING = "missing"  # placed once, then deleted or changed
    STALE = "stale"  # the file there is of another request
    IN_FLIGHT = "in-flight"  # paid earlier and not collected yet: collected free
    FAILED = "failed"
    MODERATED = "moderated"
    UNKNOWN = "unknown"  # a submit's answer was never learned: it may have been billed
    ORPHANED = "orphaned"  # placed for an output the recipe no longer plans


# States whose jobs `render` would pay for (stored images are placed and in-flight tasks
# collected: neither is paid again).
TO_RENDER = frozenset({ImageState.NEW, ImageState.MISSING, ImageState.STALE, ImageState.FAILED})
STATE_ORDER = tuple(ImageState)

# (Loops over every image below bind the members they compare with to locals first: on
# Python 3.11, reading a member through its class costs about 0.7 µs; a local, next to nothing.)


@dataclass(frozen=True, slots=True)
class Classified:
    plan: Plan
    states: tuple[ImageState, ...]
    orphans: tuple[str, ...] = ()
    reasons: Mapping[int, str] = field(default_factory=dict)

    def count(self) -> Counter[ImageState]:
        counts = Counter(self.states)
        if self.orphans:
            counts[ImageState.ORPHANED] = len(self.orphans)
        return counts


def classify(plan: Plan, state: RootState, *, verify: bool = False,
             verified: Callable[[str, int], None] | None = None) -> Classified:
    """Each job's state, from the root's state.

    A placed image is up to date when its key matches and the file is still the one that was
    written: same size and mtime (the fast path), else — or with `verify` — the same sha256.
    `verified(output, mtime_ns)` hears of files confirmed by hash, so the fast path works for
    them next time. A job that is not up to date but whose image the root already holds (in
    the content store, or in a file placed for any output or recipe) is *stored*: rendering
    it places that image, at no cost.
    """
    root = plan.recipe.output_root
    states: list[ImageState] = []
    reasons: dict[int, str] = {}
    up_to_date = ImageState.UP_TO_DATE
    placed, stat, prefix = state.placements.get, os.stat, os.path.join(root, "")
    # Keys with a task in flight (few, or none): an up-to-date image whose key has one was
    # re-rendered by a `--force` run that stopped before collecting it. That task is paid:
    # the image is in flight, not up to date, or the next render would never collect it.
    live = keys_in_flight(state.tasks)
    for job in plan.jobs:
        placement = placed(job.output)
        if placement is not None and placement.key == job.key and job.key not in live:
            if not verify:  # the fast path, inlined: this runs once per image
                try:
                    found_stat: os.stat_result | None = stat(prefix + placement.path)
                except OSError:
                    found_stat = None
                if found_stat is not None and found_stat.st_size == placement.size and \
                        found_stat.st_mtime_ns == placement.mtime_ns:
                    states.append(up_to_date)
                    continue
            if _intact(root, placement, verify, verified):
                states.append(up_to_date)
                continue
        found, why = _state(job, placement, state, root)
        states.append(found)
        if why:
            reasons[job.index] = why
    planned = {job.output for job in plan.jobs}
    orphans = tuple(sorted(output for output in state.placements if output not in planned))
    return Classified(plan, tuple(states), orphans, reasons)


def _state(job: Job, placement: Placement | None, state: RootState,
           root: Path) -> tuple[ImageState, str | None]:
    """A job's state (not up to date) and why, from the ledger and the placements."""
    task = state.tasks.get(job.key)
    if task is not None and task.status in TASK_IN_FLIGHT and placement is not None and \
            placement.key == job.key:
        return ImageState.IN_FLIGHT, task.reason or _REASONS[FORCED]
    if has_blob(root, task):
        return ImageState.STORED, "its image is in the content store (paid earlier): placed " \
            "at no cost"
    elsewhere = source_placement(job.key, state, root, exclude=placement)
    if elsewhere is not None:
        return ImageState.STORED, f"the same image is at {elsewhere.path}: placed at no cost"
    reason = task.reason if task is not None else None
    if task is not None and task.status in TASK_IN_FLIGHT:
        return ImageState.IN_FLIGHT, reason or _REASONS[ImageState.IN_FLIGHT]
    if task is not None and task.status in (TaskStatus.FETCHED, TaskStatus.PLACED) and task.task_id:
        return ImageState.IN_FLIGHT, "paid earlier, but its bytes are gone: the task is " \
            "collected again"
    if task is not None and task.status in (TaskStatus.SUBMITTING, TaskStatus.UNKNOWN):
        return ImageState.UNKNOWN, reason or _REASONS[ImageState.UNKNOWN]
    if task is not None and task.status == TaskStatus.MODERATED:
        return ImageState.MODERATED, reason
    if task is not None and task.status == TaskStatus.FAILED:
        return ImageState.FAILED, reason
    gone = task is not None and task.status == TaskStatus.GONE
    if placement is None:
        return ImageState.NEW, _REASONS[TaskStatus.GONE] if gone else None
    if placement.key != job.key:
        return ImageState.STALE, _REASONS[ImageState.STALE]
    return ImageState.MISSING, _REASONS[TaskStatus.GONE] if gone else (
        "the file was changed after it was written" if os.path.lexists(root / placement.path)
        else "the file was deleted")


FORCED = "forced"  # (a key of `_REASONS`: an up-to-date image with a paid re-render in flight)

_REASONS: dict[object, str] = {
    ImageState.STALE: "the request changed (prompt, parameters, model or seed)",
    ImageState.IN_FLIGHT: "submitted by an earlier run; the next render collects it without "
                          "paying again",
    ImageState.UNKNOWN: "a run stopped while submitting it: the answer was never recorded, and "
                        "it may have been billed",
    TaskStatus.GONE: "paid before, but the provider no longer has the task and its bytes were "
                     "lost",
    FORCED: "re-rendered by a --force run that stopped before collecting it: the next render "
            "collects it without paying again",
}


def source_placement(key: str, state: RootState, root: Path, *,
                     exclude: Placement | None = None) -> Placement | None:
    """An intact file in the root that holds the image of `key` (any recipe, any output), at
    a path that may be read (see `stored_path_problem`)."""
    for candidate in state.by_key.get(key, ()):
        if candidate is not exclude and candidate.key == key and \
                _intact(root, candidate, False, None) and \
                stored_path_problem(root, candidate.path) is None:
            return candidate
    return None


def _intact(root: Path, placement: Placement, verify: bool,
            verified: Callable[[str, int], None] | None) -> bool:
    target = os.path.join(root, placement.path)  # (not Path: this runs once per image)
    try:
        stat = os.stat(target)
    except OSError:
        return False
    if stat.st_size != placement.size:
        return False
    if not verify and stat.st_mtime_ns == placement.mtime_ns:
        return True
    if stored_path_problem(root, placement.path) is not None:
        return False  # (never read, even to hash it)
    if file_sha256(Path(target)) != placement.sha256:
        return False
    if verified is not None:
        verified(placement.output, stat.st_mtime_ns)
    return True


@dataclass(frozen=True, slots=True)
class ModelSummary:
    jobs: int
    to_render: int
    estimated_usd: float | None
    price_source: str | None


# -- selecting what a render does ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SelectOptions:
    """What the operator asked of the selection (`render`'s own options, the network's,
    extend these: `session.Options`)."""

    force: bool = False
    only: tuple[str, ...] = ()
    retry_unknown: bool = False
    verify: bool = False
    budget: float | None = None
    shard: tuple[int, int] | None = None  # (i, n), 1-based


NO_POLLING_URL = ""  # (why a task paid for earlier cannot be collected: no URL to poll)
# (...or it was paid through an account this render does not use: ACCOUNT + its name, or
# ACCOUNT alone for the provider's own key variable)
ACCOUNT = "account:"


@dataclass(slots=True)
class Selection:
    """What a render will do with each planned job: pay for it (`submit`, one job per key),
    collect a task paid earlier (`attach`), place an image the root holds (`place`), or
    leave it. `followers` are the other planned jobs of a key being submitted or collected:
    they are placed from the same image, never paid for again."""

    classified: Classified
    submit: list[Job] = field(default_factory=list)
    attach: list[tuple[Job, Task]] = field(default_factory=list)
    place: list[Job] = field(default_factory=list)
    followers: dict[str, list[Job]] = field(default_factory=dict)
    held_unknown: list[Job] = field(default_factory=list)
    held_moderated: list[Job] = field(default_factory=list)
    # Paid for earlier, in flight, but not collectable by this render; with why (the
    # provider that took it, when this render uses another; or NO_POLLING_URL).
    held_paid: list[tuple[Job, str]] = field(default_factory=list)
    up_to_date: int = 0
    filtered_out: int = 0
    provider: str = ""
    # The in-process emulator dies with its run: its tasks cannot be collected later, and
    # sending one again costs nothing, so nothing of it is held back or re-attached.
    ephemeral: bool = False
    # The names of the accounts of the pool this render uses (`--accounts`); None: no pool,
    # the provider's own key variable.
    accounts: frozenset[str] | None = None

    def collectable(self, task: Task | None) -> bool:
        """Whether `task` (paid for earlier) can be collected by this render: polled by its
        stored URL, through the provider that took it."""
        return task is not None and not self.ephemeral and self.why_not_collected(task) is None

    def why_not_collected(self, task: Task) -> str | None:
        """Why this render cannot collect `task`, paid for earlier: the provider that took
        it, when this render uses another; NO_POLLING_URL; or ACCOUNT and the name of the
        account that paid for it, when this render does not use that account (its task is
        polled with its own key, or not at all). None when it can."""
        if task.provider != self.provider:
            return task.provider or "another provider"
        if not task.task_id or not task.polling_url:
            return NO_POLLING_URL
        configured = task.account is None if self.accounts is None else \
            task.account in self.accounts
        if not configured:
            return ACCOUNT + (task.account or "")
        return None

    @property
    def idle(self) -> bool:
        """Nothing to send, collect, place or hold back: every selected image is up to
        date."""
        return not self.submit and not self.attach and not self.place and not self.held

    @property
    def held(self) -> int:
        """How many images are held back (maybe paid, moderated, or paid and not
        collectable here): not rendered, and not up to date."""
        return len(self.held_unknown) + len(self.held_moderated) + len(self.held_paid)

    def collect(self, job: Job, task: Task) -> None:
        """Collect `task` for `job` (and place it at every other output of its key)."""
        self.attach.append((job, task))
        self.followers[job.key] = []

    @property
    def jobs(self) -> list[Job]:
        """The jobs that need the network: first the tasks paid for by earlier runs (to
        collect before their results expire), then the submits."""
        return [job for job, _ in self.attach] + self.submit

    def estimated_usd(self) -> float | None:
        total = 0.0
        for job in self.submit:
            cost = models.estimate_cost(job.model, job.request)
            if cost is None:
                return None
            total += cost
        return round(total, 4)  # as `plan --json` says it: 0.4, not 0.39999999999999997


SHARD_ENV = "FLUXBATCH_SHARD"  # I/N, as --shard takes it
SHARDS_ENV = "FLUXBATCH_SHARDS"  # N, with a 0-based index from the engine (Kubernetes)
INDEX_ENV = "JOB_COMPLETION_INDEX"  # a Kubernetes Indexed Job's pod index, 0-based


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """`I/N` (1-based), or `auto`: the shard the environment names (`shard_from`)."""
    if text == "auto":
        return shard_from(environ if environ is not None else {})
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, like 2/4, or auto") from None
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {text!r}: I must be between 1 and N")
    return index, count


def shard_from(environ: Mapping[str, str]) -> tuple[int, int]:
    """`--shard auto`: FLUXBATCH_SHARD=I/N (what the emitted GitHub workflow sets from
    `strategy.job-index` and `job-total`), else a Kubernetes Indexed Job's 0-based
    JOB_COMPLETION_INDEX with FLUXBATCH_SHARDS=N (Kubernetes does not say the count)."""
    given = environ.get(SHARD_ENV, "").strip()
    if given:
        try:
            return parse_shard(given)
        except ConfigError as error:
            raise ConfigError(str(error).replace(f"--shard {given!r}",
                                                 f"auto: {SHARD_ENV}={given!r}")) from None
    index, count = environ.get(INDEX_ENV, "").strip(), environ.get(SHARDS_ENV, "").strip()
    if index and count:
        where = f"{INDEX_ENV}={index!r} with {SHARDS_ENV}={count!r}"
        try:
            position, total = int(index), int(count)
        except ValueError:
            raise ConfigError(f"auto: {where}: both must be whole numbers") from None
        if not 0 <= position < total:
            raise ConfigError(f"auto: {where}: the index must be from 0 to {SHARDS_ENV} - 1")
        return position + 1, total
    if index:
        raise ConfigError(f"auto: {INDEX_ENV} is set ({index}), but not {SHARDS_ENV}: set it "
                          "to the Job's completions (Kubernetes does not say it)")
    raise ConfigError(f"auto: no shard in the environment: set {SHARD_ENV}=I/N, or "
                      f"{INDEX_ENV} (a Kubernetes Indexed Job sets it) with {SHARDS_ENV}=N")


def matches_only(job: Job, patterns: Sequence[str]) -> bool:
    """`--only`: a job name, `name=value` on a matrix value (globs allowed; a value as the
    plan's table shows it too, so an object by its label: `aspect=square`), or a glob on the
    output path or on its file name (`teapot-*` matches `renders/mugs/teapot-1.png`).
    Several patterns select what any of them matches."""
    for pattern in patterns:
        if "=" in pattern:
            name, _, wanted = pattern.partition("=")
            if name in job.vars and _value_matches(job.vars[name], wanted):
                return True
        elif pattern == job.job or fnmatch.fnmatchcase(job.output, pattern) or \
                ("/" not in pattern and fnmatch.fnmatchcase(posixpath.basename(job.output),
                                                            pattern)):
            return True
    return False


def _value_matches(value: object, wanted: str) -> bool:
    """By the value's text, or as tables show it (an object by its label)."""
    return fnmatch.fnmatchcase(str(value), wanted) or \
        (not isinstance(value, str) and fnmatch.fnmatchcase(label(value), wanted))


def in_shard(job: Job, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and edits: by the job's key, not its position."""
    if shard is None:
        return True
    index, count = shard
    return int(job.key[:12], 16) % count == index - 1


def select(classified: Classified, state: RootState, options: SelectOptions,
           provider: str, *, ephemeral: bool = False,
           accounts: frozenset[str] | None = None) -> Selection:
    """What a render does with each job. `ephemeral`: the provider lives and dies with this
    run (the in-process emulator), so nothing of it is held back or collected later.
    `accounts`: the names of the pool's accounts, when the render uses one."""
    selection = Selection(classified, provider=provider, ephemeral=ephemeral,
                          accounts=accounts)
    now = time.time()
    up_to_date, stored, in_flight, unknown, moderated = (
        ImageState.UP_TO_DATE, ImageState.STORED, ImageState.IN_FLIGHT, ImageState.UNKNOWN,
        ImageState.MODERATED)
    for job, found in zip(classified.plan.jobs, classified.states, strict=True):
        if (options.only and not matches_only(job, options.only)) or \
                not in_shard(job, options.shard):
            selection.filtered_out += 1
            continue
        if found == up_to_date and not options.force:
            selection.up_to_date += 1
            continue
        if job.key in selection.followers:  # its key is already being submitted or collected
            selection.followers[job.key].append(job)
            continue
        task = state.tasks.get(job.key)
        if found == stored and not options.force:
            selection.place.append(job)
        elif found == in_flight and selection.collectable(task) and \
                (not options.force or _untried(task, now)):
            # paid for already: never submitted again. --force pays anew only for a task
            # that a run failed to collect, or that has waited longer than a task may take
            # (the way out of one whose image will never come); one no run has tried yet,
            # such as the one an interrupted --force run paid for, is collected.
            assert task is not None
            selection.collect(job, task)
        elif found == in_flight and not options.force and not ephemeral and task is not None \
                and not (options.retry_unknown and
                         selection.why_not_collected(task) == NO_POLLING_URL):
            # paid for, and this render cannot collect it: held back, never paid again
            # silently (another provider's task: --force; no URL to poll: --retry-unknown)
            selection.held_paid.append((job, selection.why_not_collected(task) or ""))
        elif found == unknown and not (options.retry_unknown or ephemeral):
            selection.held_unknown.append(job)  # maybe paid: even --force needs --retry-unknown
        elif found == moderated and not options.force:
            selection.held_moderated.append(job)
        else:
            selection.submit.append(job)
            selection.followers[job.key] = []
    if options.only and selection.filtered_out == len(classified.plan.jobs) and \
            not any(matches_only(job, options.only) for job in classified.plan.jobs):
        raise nothing_matches(options.only, classified.plan.recipe)
    return selection


def _untried(task: Task | None, now: float) -> bool:
    """Whether `task` is in flight, no run has failed to collect it (a run that does records
    why), and it was submitted less than a task may take ago."""
    return task is not None and task.status in TASK_IN_FLIGHT and task.reason is None and \
        task.submitted_at is not None and now - task.submitted_at < models.TASK_TIMEOUT


def nothing_matches(only: Sequence[str], recipe: Recipe) -> FluxbatchError:
    """`--only` that selects no image: an error, for `plan` and `render` alike, with a "did
    you mean" for a variable, value or job name that the recipe does not have."""
    hints = [hint for pattern in only if (hint := _only_hint(pattern, recipe))]
    detail = f": {'; '.join(hints)}" if hints else \
        " (give a job name, an output glob, or NAME=VALUE on a matrix value)"
    return FluxbatchError(f"--only {' '.join(only)}: no image matches{detail}")


def _only_hint(pattern: str, recipe: Recipe) -> str | None:
    """What in `pattern` names nothing in the recipe, if anything."""
    name, equals, wanted = pattern.partition("=")
    if not equals:
        jobs = [spec.name for spec in recipe.jobs]
        close = did_you_mean(pattern, jobs)
        if close and pattern not in jobs and not _GLOB.intersection(pattern):
            return f"no job is named {pattern!r}{close}"
        return None
    values: dict[str, list[object]] = {}
    for spec in recipe.jobs:
        for axis in spec.matrix.axes:
            for column, variable in enumerate(axis.names):
                values.setdefault(variable, []).extend(row[column] for row in axis.rows)
        for entry in spec.matrix.include:
            for variable, value in entry.items():
                values.setdefault(variable, []).append(value)
    if name not in values:
        return f"{name!r} is not a matrix variable{did_you_mean(name, list(values))}"
    if _GLOB.intersection(wanted) or any(_value_matches(v, wanted) for v in values[name]):
        return None
    return f"no {name} is {wanted!r}{value_hint(wanted, values[name])}"


_GLOB = frozenset("*?[")


def classify_with_store(plan: Plan, store: Store,
                        options: SelectOptions) -> tuple[Classified, RootState]:
    recipe_name = plan.recipe.name

    def touch(output: str, mtime_ns: int) -> None:
        store.touch(recipe_name, output, mtime_ns)

    with store.transaction():
        state = RootState.of(recipe_name, store.lazy_tasks(), store.placements())
        return classify(plan, state, verify=options.verify, verified=touch), state


def estimate_at(selection: Selection, prices: Prices) -> float | str:
    """USD: the images to submit at the prices their submits will reserve (the catalogue's,
    raised to what the provider has charged here); or the first model with no price."""
    total = 0.0
    for job in selection.submit:
        price = prices.reserve(job.model, job.request)
        if price is None:
            return job.model
        total += price
    return round(total, 6)


def check_budget(selection: Selection, budget: float | None, *, spent: float = 0.0,
                 prices: Prices | None = None) -> None:
    """Before anything is sent: the images to submit, at the prices their submits will
    reserve (the catalogue's, raised to what the provider has charged here), must fit in what
    is left of the budget once `spent` (by the unfinished runs this one continues) is
    counted. A model with no price fails closed."""
    if budget is None:
        return
    total = estimate_at(selection, prices or Prices())
    if isinstance(total, str):
        raise FluxbatchError(f"--budget {budget}: {total} has no published price, so the "
                             "cost cannot be bounded; drop --budget to go ahead")
    if total + spent > budget + EPSILON:
        count = len(selection.submit)
        over = f"over the budget of {usd(budget)} (it counts {SCOPE})" if not spent else \
            f"over what is left of the budget: {usd(max(budget - spent, 0.0))} of " \
            f"{usd(budget)}, after {usd(spent)} spent by the unfinished runs this one continues"
        raise FluxbatchError(f"the estimated cost {usd(total)} of the {count:,} "
                             f"image{'s' if count != 1 else ''} to render is {over}; "
                             "nothing was sent")
