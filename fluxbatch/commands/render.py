"""`fluxbatch render RECIPE`: make every missing or stale image, and the manifest."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from typing import TYPE_CHECKING, TextIO

from fluxbatch.changes import changes_text, stale_changes
from fluxbatch.commands.output import money, plural, table, values_text
from fluxbatch.commands.validate import print_notes
from fluxbatch.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError
from fluxbatch.front import load_plan
from fluxbatch.outcomes import EventKind, OutcomeStatus
from fluxbatch.selection import ACCOUNT, NO_POLLING_URL, Selection

# The render itself runs in `session`; asyncio, tqdm and the providers (httpx) are imported
# only where a render needs the network: a null build of 10,000 images loads none of them.
from fluxbatch.session import Options, Render, Report, preview, preview_budget
from fluxbatch.write import manifest_path

if TYPE_CHECKING:
    import asyncio

    from fluxbatch.jobs import Job, Plan
    from fluxbatch.outcomes import Event


def render(*, recipe: str, out: str | None, yes: bool, options: Options, dry_run: bool,
           quiet: bool, as_json: bool = False, progress_every: float = 5.0) -> int:
    plan = load_plan(recipe, out=out, yes=yes, verify=options.verify, reuse=True)
    print_notes(plan)
    if dry_run:
        return _dry_run(plan, options)
    import signal

    progress: _Progress | None = None
    ticker: asyncio.Future[None] | None = None

    def on_selected(selection: Selection) -> None:
        nonlocal progress
        if selection.jobs or selection.place:
            progress = _Progress(selection, quiet=quiet, every=progress_every)

    def on_event(event: Event) -> None:
        if progress is not None:
            progress.event(event)

    session = Render(plan, options, on_event=on_event, on_selected=on_selected)

    def on_interrupt(*_: object) -> None:
        if session.stopping:
            session.stop(now=True)  # a second Ctrl-C: stop now
            if progress is not None:  # and say nothing more until the report
                progress.silence()
            if ticker is not None:
                ticker.cancel()
            return
        session.stop()
        message = ("stopping: nothing new is submitted; tasks already paid for are "
                   "recorded and picked up by the next run (Ctrl-C again to quit now)")
        if progress is not None:
            progress.write(message)
        else:
            print(message, file=sys.stderr)

    async def with_handlers(requests: Coroutine[object, object, None]) -> None:
        """The network half, with Ctrl-C and the progress display on its event loop."""
        nonlocal ticker
        import asyncio

        loop = asyncio.get_running_loop()
        if progress is not None:
            ticker = asyncio.ensure_future(progress.tick_every())
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, on_interrupt)
        try:
            await requests
        finally:
            if ticker is not None:
                ticker.cancel()
            for number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(number)

    def run_network(requests: Coroutine[object, object, None]) -> None:
        import asyncio

        asyncio.run(with_handlers(requests))

    # Before the network (and with no event loop), a Ctrl-C asks the same of the session.
    before = {number: signal.signal(number, on_interrupt)
              for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = session.run_offline(run_network)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
    if progress is not None:
        progress.close()
    if report.nothing_to_do:
        return _nothing_to_do(plan, report, as_json)
    code = EXIT_INTERRUPTED if report.interrupted else EXIT_OK if report.ok else EXIT_FAILED
    if as_json:
        print(json.dumps(_summary(plan, report, code), ensure_ascii=False))
    _print_report(report, plan, out=sys.stderr if as_json else sys.stdout)
    return code


def _nothing_to_do(plan: Plan, report: Report, as_json: bool) -> int:
    selection = report.selection
    code = EXIT_FAILED if selection.held else EXIT_OK
    if as_json:
        print(json.dumps(_summary(plan, report, code), ensure_ascii=False))
    _print_nothing_to_do(selection, out=sys.stderr if as_json else sys.stdout)
    return code


class _Progress:
    """How a render goes, fed by the executor's events: a tqdm bar on a terminal; without one
    (CI logs), one plain line every `every` seconds; nothing with `-q`. The count is of
    images finished (written, failed, moderated or unknown), never of images skipped."""

    def __init__(self, selection: Selection, *, quiet: bool, every: float) -> None:
        self.counts: Counter[str] = Counter()
        self.phase: dict[str, str] = {}  # job key → "rendering" | "downloading" | "waiting"
        # With a pool of accounts: the account of each task in flight (rendering), by job key
        self.account: dict[str, str] = {}
        self.pooled = selection.accounts is not None
        self.total = len(selection.jobs) + len(selection.place) + \
            sum(len(more) for more in selection.followers.values())
        self.estimate = selection.estimated_usd()
        self.spent: float | None = None
        self.every = every
        self.redraw = 1.0
        self.bar_shown = not quiet and sys.stderr.isatty()
        self.lines_shown = not quiet and not self.bar_shown and every > 0
        self.started = time.monotonic()
        self.silenced = False
        from tqdm import tqdm

        # No rate in the bar: the postfix says more, and an 80-column terminal keeps a bar.
        self.bar = tqdm(total=self.total, unit="img", disable=not self.bar_shown,
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
                                   "{postfix}")

    def event(self, event: Event) -> None:
        if self.silenced:
            return
        key, kind = event.job.key, event.kind
        if kind in (EventKind.SUBMITTED, EventKind.ATTACHED):
            self.phase[key] = "rendering"
            if event.account is not None:
                self.account[key] = event.account
            if event.cost is not None:
                self.spent = (self.spent or 0.0) + event.cost / 100
        elif kind == EventKind.READY:
            self.phase[key] = "downloading"
            self.account.pop(key, None)
        elif kind == EventKind.WAITING:  # for another run's image, through the shared store
            self.phase[key] = "waiting"
        elif kind in ENDED:
            self.phase.pop(key, None)
            self.account.pop(key, None)
            self.counts[kind] += 1
        elif kind == EventKind.ACCOUNT_OUT:  # one line, whatever -q says
            self.write(f"fluxbatch: {event.detail}; it leaves the pool, and the other "
                       "accounts go on")
            return
        else:
            return
        if self.bar_shown:  # (the text is for the bar alone: not made per event without one)
            self.bar.set_postfix_str(self.fitted(), refresh=False)
        if kind in FINISHED:
            self.bar.update(1)  # (after the postfix, so that both show the same count)

    def finished(self) -> int:
        """Images finished (written, failed, moderated, unknown, gone): never skipped ones."""
        return sum(self.counts[kind] for kind in FINISHED)

    def fitted(self) -> str:
        """The bar's postfix, shortened until the bar keeps some room: on an 80-column
        terminal the numbers must not be cut off."""
        import shutil

        room = shutil.get_terminal_size((100, 20)).columns - 45  # (the bar and its counts)
        for text in (self.status(compact=True), self.status(compact=True, total=False),
                     self.status(compact=True, total=False, short=True)):
            if len(text) <= room:
                break
        return text

    def status(self, *, compact: bool = False, total: bool = True, short: bool = False) -> str:
        """`done 12, rendering 24, downloading 3, failed 1, spent $3.95 of ~$8.00`; compact
        (for the bar) leaves out the counts that are zero."""
        phases = Counter(self.phase.values())
        failed = self.counts[OutcomeStatus.FAILED] + self.counts[OutcomeStatus.UNKNOWN] + \
            self.counts[OutcomeStatus.GONE]
        counts = [("done", self.counts[OutcomeStatus.WRITTEN]), ("rendering", phases["rendering"]),
                  ("downloading", phases["downloading"]), ("failed", failed)]
        if phases["waiting"]:
            counts.insert(3, ("waiting", phases["waiting"]))
        if short:
            counts = [(word[:4] if word != "downloading" else "dl", n) for word, n in counts]
        parts = [f"{word} {n:,}" for word, n in counts if n or not compact or word == "done"]
        spent = "not reported" if self.spent is None else money(self.spent)
        of = f" of ~{money(self.estimate)}" if self.estimate and total else ""
        text = ", ".join([*parts, f"{'' if short else 'spent '}{spent}{of}"])
        if self.pooled and not compact:
            text += f"; in flight per account: {self.per_account()}"
        return text

    def per_account(self) -> str:
        """`studio-a 24, studio-b 24, studio-c 11`: tasks rendering, per account."""
        counts = Counter(self.account.values())
        return ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items())) \
            or "none"

    async def tick_every(self) -> None:
        """Keep the display moving while no image finishes (a task takes a while): the bar is
        redrawn every `redraw` seconds, with its clock and what is rendering and spent;
        without a terminal, a line is printed every `every` seconds."""
        import asyncio

        while self.bar_shown:
            await asyncio.sleep(self.redraw)
            if self.silenced:  # (told while asleep)
                return
            self.bar.refresh()
        while self.lines_shown:
            await asyncio.sleep(self.every)
            if self.silenced:
                return
            finished = self.finished()
            elapsed = int(time.monotonic() - self.started)
            print(f"fluxbatch: {finished:,}/{self.total:,} images, {self.status()} "
                  f"({elapsed // 60}m{elapsed % 60:02d}s)", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self.bar_shown:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def silence(self) -> None:
        """The user said "quit now": the bar goes (its line cleared) and nothing more is
        printed until the report."""
        self.silenced = True
        self.lines_shown = self.bar_shown = False
        self.bar.leave = False
        self.bar.close()


# What the count of images finished counts: never an image skipped, or left in flight.
FINISHED = frozenset({OutcomeStatus.WRITTEN, OutcomeStatus.MODERATED, OutcomeStatus.FAILED,
                      OutcomeStatus.UNKNOWN, OutcomeStatus.GONE})
ENDED = frozenset(OutcomeStatus)


def _print_nothing_to_do(selection: Selection, out: TextIO = sys.stdout) -> None:
    """`nothing to render: 4 images up to date`; when images are held back, that comes first
    (and the lines after it say why, and what to do)."""
    held = selection.held
    counts = [f"{selection.up_to_date:,} up to date"] if selection.up_to_date or not held else []
    if selection.filtered_out:
        counts.append(f"{selection.filtered_out:,} not selected")
    if held:
        line = f"nothing rendered: {plural(held, 'image')} held back"
        print(", ".join([line, *counts]), file=out)
    else:
        counts[0] = f"{plural(selection.up_to_date, 'image')} up to date"
        print("nothing to render: " + ", ".join(counts), file=out)
    _print_held(selection)


def _print_held(selection: Selection) -> None:
    if selection.held_unknown:
        count = len(selection.held_unknown)
        print(f"{plural(count, 'image')} held back: an earlier submit's outcome was never "
              "learned (it may have been billed). Re-run with --retry-unknown to submit "
              f"{'it' if count == 1 else 'them'} again.", file=sys.stderr)
    for why, count in sorted(Counter(why for _, why in selection.held_paid).items()):
        it = "it" if count == 1 else "them"
        if why == NO_POLLING_URL:
            print(f"{plural(count, 'image')} held back: paid earlier, but no polling URL was "
                  f"recorded for {'its task' if count == 1 else 'their tasks'}, so "
                  f"{'it' if count == 1 else 'they'} cannot be collected. Re-run with "
                  f"--retry-unknown to submit {it} again.", file=sys.stderr)
        elif why.startswith(ACCOUNT):
            tasks = "its task" if count == 1 else "their tasks"
            print(f"{plural(count, 'image')} held back: {_paid_through(why)}, which this "
                  f"render does not use (only its key polls {tasks}). Render with "
                  f"{_to_use(why)} to collect {it}, or --force to pay for a new one.",
                  file=sys.stderr)
        else:
            print(f"{plural(count, 'image')} held back: paid earlier through provider "
                  f"{why!r}, which this render does not use: render with provider: {why} to "
                  f"collect {it}, or --force to pay for a new one.", file=sys.stderr)
    if selection.held_moderated:
        count = len(selection.held_moderated)
        print(f"{plural(count, 'image')} {'was' if count == 1 else 'were'} moderated before and "
              f"{'is' if count == 1 else 'are'} not retried (change the prompt, or use --force).",
              file=sys.stderr)


def _paid_through(why: str) -> str:
    """`paid earlier through account studio-b` (or through the provider's own key)."""
    name = why.removeprefix(ACCOUNT)
    return f"paid earlier through account {name}" if name else \
        "paid earlier through the provider's own key variable (no account named)"


def _to_use(why: str) -> str:
    name = why.removeprefix(ACCOUNT)
    return f"an accounts file that names {name}" if name else "no --accounts"


def _print_report(report: Report, plan: Plan, out: TextIO = sys.stdout) -> None:
    counts = Counter(o.status for o in report.outcomes)
    if report.fatal:  # one line says it all: the others were skipped for the same reason
        print(f"fluxbatch: stopped: {report.fatal}", file=sys.stderr)
    elif report.stopped:  # the budget: the images it left out are counted there
        print(f"fluxbatch: {report.stopped}", file=sys.stderr)
    # Each failure gets a line, and so does a paid task left in flight for a reason of its
    # own (a download that failed, a timeout); skipped images, and tasks left by an
    # interrupt or by the reason the run stopped, are only counted.
    problems = [o for o in report.outcomes
                if (o.status in PROBLEMS or (o.status == "pending" and o.reason
                                             and not o.reason.startswith("interrupted")))
                and not (report.fatal and o.reason == report.fatal)]
    if problems:
        rows = [[o.job.job, values_text(o.job.vars), o.job.output, o.status, o.reason or ""]
                for o in problems[:50]]
        print(table(["JOB", "VALUES", "OUTPUT", "STATUS", "REASON"], rows), file=sys.stderr)
        if len(problems) > 50:
            print(f"… and {len(problems) - 50:,} more", file=sys.stderr)
    placed = _placed_without_request(report)
    shared = _placed_from_store(report)
    parts = [f"{counts[s]:,} {s}" for s in COUNTED if counts[s]]
    if placed:
        held = [f"{shared:,} placed from the store"] if shared else []
        if placed > shared:
            held.append(f"{placed - shared:,} from images already paid for")
        parts[0] += f" ({', '.join(held)})"
    selection = report.selection
    if selection.up_to_date:
        parts.append(f"{selection.up_to_date:,} up to date")
    if selection.held:  # (why, and what to do, on the lines after)
        parts.append(f"{selection.held:,} held back")
    spent, collected = report.spent_usd(), report.collected_usd()
    unknown = OutcomeStatus.UNKNOWN
    submitted = any(o.submitted_at is not None or o.status == unknown
                    for o in report.outcomes)
    cost = f"cost {money(spent)} (reported by the provider)" if spent is not None else \
        "cost not reported by the provider" if submitted else "nothing paid"
    if collected:
        cost += f", and {money(collected)} paid by earlier runs for the tasks collected"
    print(f"{', '.join(parts) or 'nothing done'}; {cost}; manifest {manifest_path(plan.recipe)}",
          file=out)
    if report.accounts:
        print(_accounts_line(report), file=sys.stderr)
    _print_held(selection)
    if counts[unknown]:
        print(f"{plural(counts[unknown], 'submit')} ended without an answer and may have been "
              "billed; they are not resubmitted unless you pass --retry-unknown.",
              file=sys.stderr)
    if report.store_problems:
        count = len(report.store_problems)
        print(f"the shared store could not record {plural(count, 'image')} "
              f"({report.store_problems[0]}); {'it is' if count == 1 else 'they are'} here, "
              "and `fluxbatch push` uploads them", file=sys.stderr)
    gone = counts[OutcomeStatus.GONE]
    if gone:
        print(f"{plural(gone, 'image')} paid for earlier can no longer be collected: "
              "the provider forgot the task before its image was kept. The next run renders "
              f"{'it' if gone == 1 else 'them'} again, and that is paid again.",
              file=sys.stderr)
    pending = counts[OutcomeStatus.PENDING]
    if pending:
        per_account = _in_flight_by_account(report)
        print(f"{plural(pending, 'task')} still in flight{per_account}: run again to collect "
              "them (they are not paid for twice).", file=sys.stderr)


def _accounts_line(report: Report) -> str:
    """`accounts: studio-a 12 submitted, studio-b 3 submitted (left the pool: ...)`."""
    submitted = Counter(o.account for o in report.outcomes
                        if o.submitted_at is not None and o.account is not None)
    parts = []
    for name in report.accounts:
        part = f"{name} {submitted[name]:,} submitted"
        if name in report.accounts_out:
            part += f" (left the pool: {report.accounts_out[name]})"
        parts.append(part)
    return "accounts: " + ", ".join(parts)


def _in_flight_by_account(report: Report) -> str:
    """` (studio-a 2, studio-b 1)`: the tasks left in flight, per account of the pool."""
    if not report.accounts:
        return ""
    counts = Counter(o.account or "-" for o in report.outcomes
                     if o.status == OutcomeStatus.PENDING and o.submitted is not None)
    if not counts:  # (held for another run's claim in a shared store: no task of this run)
        return ""
    return " (" + ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items())) + ")"


# The outcomes reported one per line (the others are only counted), and every outcome in the
# order the report counts them.
PROBLEMS = (OutcomeStatus.MODERATED, OutcomeStatus.FAILED, OutcomeStatus.UNKNOWN,
            OutcomeStatus.GONE)
COUNTED = (OutcomeStatus.WRITTEN, *PROBLEMS, OutcomeStatus.PENDING, OutcomeStatus.SKIPPED)


def _placed_without_request(report: Report) -> int:
    """Images written without a request of their own: from an image the root held, or from
    the image of another output of the same key."""
    written = OutcomeStatus.WRITTEN
    return sum(1 for o in report.outcomes if o.status == written and o.submitted is None)


def _placed_from_store(report: Report) -> int:
    """Images written from the shared store's copy: nothing paid."""
    written = OutcomeStatus.WRITTEN
    return sum(1 for o in report.outcomes if o.status == written and o.from_store)


def _summary(plan: Plan, report: Report, code: int) -> dict[str, object]:
    """`render --json`: the run's outcome as one object (what CI glue reads)."""
    counts = Counter(o.status for o in report.outcomes)
    selection = report.selection
    return {
        "recipe": str(plan.recipe.path),
        "output_root": str(plan.recipe.output_root),
        "manifest": str(manifest_path(plan.recipe)),
        "counts": {status: counts[status] for status in COUNTED},
        "placed_without_request": _placed_without_request(report),
        "placed_from_store": _placed_from_store(report),
        "store_problems": report.store_problems,
        "up_to_date": selection.up_to_date,
        "held_unknown": len(selection.held_unknown),
        "held_moderated": len(selection.held_moderated),
        "held_paid": len(selection.held_paid),
        "not_selected": selection.filtered_out,
        "spent_usd": report.spent_usd(),
        "collected_usd": report.collected_usd(),
        "interrupted": report.interrupted,
        "stopped": report.stopped,
        "budget": report.budget.as_json() if report.budget is not None else None,
        "accounts": _accounts_document(report),
        "exit_code": code,
        "failures": [{"output": o.job.output, "job": o.job.job, "vars": dict(o.job.vars),
                      "replicate": o.job.replicate, "status": o.status, "reason": o.reason}
                     for o in report.outcomes if o.status in PROBLEMS],
    }


def _accounts_document(report: Report) -> list[dict[str, object]] | None:
    """`render --json`'s `accounts`: per account of the pool, what it submitted, what is
    left in flight through it, and why it left the pool (null: it did not); null without a
    pool."""
    if not report.accounts:
        return None
    submitted = Counter(o.account for o in report.outcomes if o.submitted_at is not None)
    pending = Counter(o.account for o in report.outcomes
                      if o.status == OutcomeStatus.PENDING and o.submitted is not None)
    return [{"name": name, "submitted": submitted[name], "in_flight": pending[name],
             "left_pool": report.accounts_out.get(name)} for name in report.accounts]


def _dry_run(plan: Plan, options: Options) -> int:
    """The same classification and selection as a real run; nothing is sent or written."""
    selection = preview(plan, options)

    def row(job: Job, would: str) -> list[str]:
        return [job.job, values_text(job.vars), str(job.replicate), job.model, job.output, would]

    rows = [row(job, "submit") for job in selection.submit]
    rows += [row(job, "re-attach (paid)") for job, _ in selection.attach]
    rows += [row(job, "place (paid earlier)") for job in selection.place]
    if rows:
        lines = table(["JOB", "VALUES", "REP", "MODEL", "OUTPUT", "WOULD"], rows,
                      right=frozenset({2})).split("\n")
        changed = stale_changes(selection.classified)
        for index, job in enumerate(selection.submit if changed else ()):
            if changed.get(job.index):  # under its row, as `plan` says it
                lines[1 + index] += f"\n  ↳ {changes_text(changed[job.index])}"
        print("\n".join(lines))
    estimate = selection.estimated_usd()
    placed = f", place {len(selection.place):,} already paid for" if selection.place else ""
    print(f"dry run: would submit {plural(len(selection.submit), 'image')} "
          f"(estimated {money(estimate)}), re-attach {len(selection.attach):,}{placed}, skip "
          f"{selection.up_to_date:,} up to date; nothing was sent or written")
    _print_held(selection)
    if selection.jobs:
        _warn_if_no_key(plan)
    preview_budget(plan, selection, options.budget)
    return EXIT_OK


def _warn_if_no_key(plan: Plan) -> None:
    """A dry run needs no key, but says if the real run would stop for want of one."""
    from fluxbatch import providers

    info = providers.REGISTRY[plan.recipe.provider.name]
    if info.key_env is None:
        return
    try:
        providers.api_key(info, os.environ)
    except ConfigError as error:
        print(f"note: a real run would stop here: {error}", file=sys.stderr)
