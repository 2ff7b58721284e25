"""The Python API: what the command line does, for scripts, notebooks and CI glue.

    import fluxbatch

    recipe = fluxbatch.load("recipe.yaml")              # RecipeError lists every problem, as
                                                        # `fluxbatch validate` does
    planned = fluxbatch.plan(recipe)                    # offline: reads the output root only
    for job in planned.jobs:
        print(job.output, job.state, job.key[:12])
    report = fluxbatch.render(recipe, on_event=print)   # or: await fluxbatch.arender(...)
    print(report.ok, report.spent_usd())

Nothing here prints, exits or reads the terminal: problems are `FluxbatchError`s (a
`RecipeError` carries each problem's file, line, column, path and message), progress comes
as `Event`s, and the outcome as a `Report`. The API key is read from the environment, as
the command line reads it (pass `environ=` to give another mapping); it is never read from
a recipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fluxbatch import models
from fluxbatch.changes import stale_changes
from fluxbatch.front import load_plan
from fluxbatch.jobs import Job, Plan
from fluxbatch.recipe import Recipe
from fluxbatch.selection import STATE_ORDER, ImageState, Selection
from fluxbatch.session import Options, Render, Report, preview
from fluxbatch.vocabulary import Vocabulary

if TYPE_CHECKING:
    import httpx

    from fluxbatch.outcomes import Event

RecipeLike = Recipe | str | os.PathLike[str]


def load(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
         yes: bool = False) -> Recipe:
    """Read and check the recipe at `path` as `fluxbatch validate` does, by the same code:
    `RecipeError` lists every problem of the recipe and of its images (its YAML, keys and
    files, its templates, each image's parameters and output path). `out` overrides its
    output root (relative to the working directory), as `--out` does; `yes` accepts a plan
    over the recipe's `max_jobs`. The recipe is expanded to check it; `plan` and `render`
    expand it again, reading its files as they are then."""
    return load_plan(path, out=out, yes=yes).recipe


class Action(Vocabulary):
    """What `render` would do with a planned image (`PlannedJob.action`)."""

    SUBMIT = "submit"  # pay for it
    ATTACH = "attach"  # collect the task an earlier run paid for
    PLACE = "place"  # place an image the root holds, or the one another job of its key brings
    SKIP = "skip"  # nothing: it is up to date, or not selected
    HOLD = "hold"  # hold it back: its submit's outcome is unknown, or it was moderated


@dataclass(frozen=True, slots=True)
class PlannedJob:
    """One image of the plan, and what its output root says of it."""

    job: str  # the recipe's job (a group of images), by name
    vars: Mapping[str, Any]  # the combination's values
    replicate: int
    model: str
    request: Mapping[str, Any]  # the body to send (image inputs as descriptors, no bytes)
    seed: int
    key: str  # the image's identity: the same key is the same image
    output: str  # relative to the output root
    state: ImageState  # up-to-date, stored, new, missing, stale, in-flight, failed, ...
    action: Action  # what `render` would do: submit, attach, place, skip or hold
    # for a stale image, what changed, field by field (`width 512 → 576`): the same list as
    # `plan --json`'s `changes` and `status -v`'s reason, from `selection.stale_changes`
    changes: tuple[str, ...] = ()

    @property
    def prompt(self) -> str | None:
        prompt = self.request.get("prompt")
        return prompt if isinstance(prompt, str) else None


@dataclass(frozen=True, slots=True)
class Planned:
    """A plan, read against its output root: what `render` would do, and what it would
    cost. Passing it to `render` renders this very plan (kept private: its type is the
    internal stage-2 `Plan`)."""

    jobs: tuple[PlannedJob, ...]
    orphans: tuple[str, ...]  # outputs of images that left the recipe
    estimated_usd: float | None  # of the images to submit; None when a price is unknown
    _plan: Plan = field(repr=False)

    @property
    def recipe(self) -> Recipe:
        return self._plan.recipe

    def counts(self) -> dict[ImageState, int]:
        """Images by state, in the order `fluxbatch status` lists them."""
        found = {state: 0 for state in STATE_ORDER}
        for job in self.jobs:
            found[job.state] = found.get(job.state, 0) + 1
        if self.orphans:
            found[ImageState.ORPHANED] = len(self.orphans)
        return {state: count for state, count in found.items() if count}


def plan(recipe: RecipeLike, *, out: str | os.PathLike[str] | None = None, yes: bool = False,
         only: Sequence[str] = (), shard: tuple[int, int] | None = None, force: bool = False,
         retry_unknown: bool = False, verify: bool = False,
         store: str | None = None) -> Planned:
    """Expand the recipe and read its output root (nothing is written or sent). `yes`
    accepts a plan over the recipe's `max_jobs`; `only`, `shard`, `force` and
    `retry_unknown` select as `render` would, and each job's `action` says what it would do.
    `store` is a shared store's URL (default: `FLUXBATCH_STORE`; "" for none): what it holds
    counts as obtainable for nothing. Raises `RecipeError` (every problem at once) or another
    `FluxbatchError`."""
    built = load_plan(recipe, out=out, yes=yes, verify=verify)
    options = Options(only=tuple(only), shard=shard, force=force, retry_unknown=retry_unknown,
                      verify=verify, store=store)
    selection = preview(built, options)  # (as `render --dry-run`: the same front half)
    classified = selection.classified
    actions = _actions(selection)
    changes = stale_changes(classified)
    skip = Action.SKIP
    jobs = tuple(_planned(job, found, actions.get(id(job), skip),
                          tuple(changes.get(job.index, ())))
                 for job, found in zip(built.jobs, classified.states, strict=True))
    return Planned(jobs, classified.orphans, selection.estimated_usd(), built)


def render(recipe: RecipeLike | Planned, *, out: str | os.PathLike[str] | None = None,
           yes: bool = False, base_url: str | None = None, jobs: int | None = None,
           only: Sequence[str] = (), shard: tuple[int, int] | None = None,
           force: bool = False, retry_unknown: bool = False, verify: bool = False,
           budget: float | None = None, timeout: float | None = None,
           on_event: Callable[[Event], None] | None = None,
           environ: Mapping[str, str] | None = None,
           transport: httpx.AsyncBaseTransport | None = None,
           store: str | None = None,
           accounts: str | os.PathLike[str] | None = None,
           stop: StopHandle | None = None) -> Report:
    """Render every missing or stale image of the recipe, and its manifest, as
    `fluxbatch render` does; returns the `Report`. Must not be called from a running event
    loop: use `arender` there. See `arender` for the arguments."""
    return asyncio.run(arender(
        recipe, out=out, yes=yes, base_url=base_url, jobs=jobs, only=only, shard=shard,
        force=force, retry_unknown=retry_unknown, verify=verify, budget=budget,
        timeout=timeout, on_event=on_event, environ=environ, transport=transport, store=store,
        accounts=accounts, stop=stop))


async def arender(recipe: RecipeLike | Planned, *, out: str | os.PathLike[str] | None = None,
                  yes: bool = False, base_url: str | None = None, jobs: int | None = None,
                  only: Sequence[str] = (), shard: tuple[int, int] | None = None,
                  force: bool = False, retry_unknown: bool = False, verify: bool = False,
                  budget: float | None = None, timeout: float | None = None,
                  on_event: Callable[[Event], None] | None = None,
                  environ: Mapping[str, str] | None = None,
                  transport: httpx.AsyncBaseTransport | None = None,
                  store: str | None = None,
                  accounts: str | os.PathLike[str] | None = None,
                  stop: StopHandle | None = None) -> Report:
    """Render the recipe (a path, a loaded `Recipe`, or what `plan` returned: then that
    very plan, not expanded again). `base_url` sends the requests (and the key) elsewhere (loopback,
    or the provider's own hosts); `jobs` caps the tasks in flight (default: the provider's
    cap, 24); `budget` (USD) refuses to start above the estimated cost and stops submitting
    when the next image would not fit (it counts this run and the unfinished runs of the
    recipe it continues; `Report.budget` says what was spent, `Report.stopped` why it
    stopped); `yes` also renders when the estimate is over the account's balance (which is
    checked where the provider offers a balance query); `timeout` gives up on one task after
    so many seconds; `accounts` names an accounts file (else `FLUXBATCH_ACCOUNTS` in
    `environ`): the render spreads over its accounts, each key read from `environ`
    (`Report.accounts`, `Report.accounts_out`); `on_event` is called with each `Event`
    (submitted, ready, written, failed, ...) on the event loop's thread. `store` is a shared
    store's URL (default: `FLUXBATCH_STORE` in `environ`; "" for none): each image is claimed
    there before it is paid for, in the name of the account that pays for it (an account of
    the pool, else the one `FLUXBATCH_ACCOUNT` in `environ` names, so that another run of it
    may collect this run's tasks), taken from there when it holds it, and uploaded there once
    downloaded. `stop` is a `StopHandle`: its `stop()` (from any thread, or from `on_event`)
    submits nothing new (what was paid is collected by the next render), `stop(now=True)`
    stops at once.
    Cancelling the call stops at once too: every task already paid for is in the
    state store, and the next render collects it without paying again."""
    built = recipe._plan if isinstance(recipe, Planned) else \
        load_plan(recipe, out=out, yes=yes, verify=verify, reuse=True)
    options = Options(concurrency=jobs, base_url=base_url, force=force, only=tuple(only),
                      retry_unknown=retry_unknown, verify=verify, budget=budget, shard=shard,
                      task_timeout=timeout, yes=yes, store=store,
                      accounts=None if accounts is None else os.fspath(accounts))
    session = Render(built, options, environ=environ, on_event=on_event, transport=transport)
    if stop is None:
        return await session.run()
    stop._attach(session, asyncio.get_running_loop())
    try:
        return await session.run()
    finally:
        stop._detach()


class StopHandle:
    """Stops a render from outside it, as the command line's Ctrl-C does: pass one as
    `render(..., stop=handle)` and call `handle.stop()` from any thread (a GUI's button, a
    signal handler, a watchdog) or from `on_event`. Asked before the render starts, the
    render sends nothing. One handle serves one render at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now: bool | None = None  # None until asked; then whether to stop at once
        self._target: tuple[Render, asyncio.AbstractEventLoop] | None = None

    def stop(self, *, now: bool = False) -> None:
        """Submit nothing new (the report is `interrupted`): the tasks already paid for are
        recorded, and the next render collects them without paying again. With `now`, do
        not wait for the tasks in flight either."""
        with self._lock:  # (against `_attach`: the request is either seen or forwarded)
            self._now = now or bool(self._now)
            target = self._target
        if target is None:
            return
        session, loop = target
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            session.stop(now=now)
        else:  # the session belongs to its loop's thread: hand the request over to it
            with contextlib.suppress(RuntimeError):  # (the loop just closed: nothing to stop)
                loop.call_soon_threadsafe(functools.partial(session.stop, now=now))

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called."""
        return self._now is not None

    def _attach(self, session: Render, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._target = (session, loop)
            now = self._now
        if now is not None:
            session.stop(now=now)

    def _detach(self) -> None:
        with self._lock:
            self._target = None


def _actions(selection: Selection) -> dict[int, Action]:
    """What render would do with each job, by the job's identity."""
    submit, attach, place, hold = Action.SUBMIT, Action.ATTACH, Action.PLACE, Action.HOLD
    found = {id(job): submit for job in selection.submit}
    found.update((id(job), attach) for job, _ in selection.attach)
    found.update((id(job), place) for job in selection.place)
    for followers in selection.followers.values():
        found.update((id(job), place) for job in followers)
    found.update((id(job), hold) for job in selection.held_unknown)
    found.update((id(job), hold) for job in selection.held_moderated)
    found.update((id(job), hold) for job, _ in selection.held_paid)
    return found


def _planned(job: Job, state: ImageState, action: Action,
             changes: tuple[str, ...]) -> PlannedJob:
    request = models.redact(job.request)
    return PlannedJob(job=job.job, vars=dict(job.vars), replicate=job.replicate,
                      model=job.model, request=request, seed=job.seed, key=job.key,
                      output=job.output, state=state, action=action, changes=changes)
