"""`fluxbatch render RECIPE`: make every missing or stale image, and the manifest."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from fluxbatch import providers
from fluxbatch.commands.output import money, plural, table, values_text
from fluxbatch.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError, StateError
from fluxbatch.plan import (
    Options,
    Selection,
    check_budget,
    classify,
    classify_with_store,
    load_plan,
    select,
)
from fluxbatch.state import MANIFEST, RootLock, Store, has_store, read_manifest, read_records
from fluxbatch.write import clear_debris, write_manifest

if TYPE_CHECKING:
    from fluxbatch.execute import Event, Executor
    from fluxbatch.render import Report


def render(*, recipe: str, out: str | None, yes: bool, options: Options, dry_run: bool,
           quiet: bool) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    root = plan.recipe.output_root
    if dry_run:
        return _dry_run(plan, options)
    root.mkdir(parents=True, exist_ok=True)
    with RootLock(root) as lock, Store.open(root) as store:
        store.claim_root(plan.recipe.name)
        clear_debris(root)
        if store.is_empty() and not (root / MANIFEST).exists():
            store.adopt(plan.jobs)  # the store and manifest were lost: read the images
        classified = classify_with_store(plan, store, options)
        selection = select(classified, store.in_flight(), options, plan.recipe.provider.name)
        check_budget(selection, options.budget)
        if not selection.jobs:
            _print_nothing_to_do(selection)
            if not _manifest_readable(root):
                write_manifest(plan.recipe, store.entries())  # missing or damaged: from the store
            held = selection.held_unknown or selection.held_moderated
            return EXIT_FAILED if held else EXIT_OK
        # Only now, with work to do, load the network half (httpx, the executor).
        from fluxbatch.render import provider_for

        with provider_for(plan, options, os.environ) as provider:
            progress = _Progress(selection, quiet=quiet)
            report = _run(plan, selection, store, provider, options, progress, lock)
            progress.close()
    _print_report(report, root)
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED


def _manifest_readable(root: Any) -> bool:
    try:
        return read_manifest(root) is not None
    except StateError:
        return False


def _run(plan: Any, selection: Selection, store: Store, provider: Any, options: Options,
         progress: _Progress, lock: RootLock) -> Report:
    from fluxbatch.render import Report, execute, settings_for

    settings = settings_for(plan, options)
    interrupted = [False]

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()

        def on_interrupt(executor: Executor) -> None:
            if interrupted[0]:
                if current is not None:
                    current.cancel()  # a second Ctrl-C: stop now
                return
            interrupted[0] = True
            executor.stop()
            progress.write("stopping: nothing new is submitted; tasks already paid for are "
                           "recorded and picked up by the next run (Ctrl-C again to quit now)")

        def started(executor: Executor) -> None:
            loop.add_signal_handler(signal.SIGINT, on_interrupt, executor)
            loop.add_signal_handler(signal.SIGTERM, on_interrupt, executor)

        try:
            return await execute(plan, selection, store, provider, settings, progress.event,
                                 started, lock=lock)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        outcomes = asyncio.run(main())
    except asyncio.CancelledError:
        outcomes = []
        interrupted[0] = True
    return Report(selection, outcomes, interrupted=interrupted[0])


class _Progress:
    """A tqdm bar fed by the executor's events; silent when stdout is not a terminal."""

    def __init__(self, selection: Selection, *, quiet: bool) -> None:
        self.counts: Counter[str] = Counter()
        self.cost = 0.0
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar = tqdm(total=len(selection.jobs), unit="img", disable=not self.enabled,
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def event(self, event: Event) -> None:
        if event.kind == "submitted":
            self.counts["in flight"] += 1
            if event.cost is not None:
                self.cost += event.cost / 100
        elif event.kind in ("written", "moderated", "failed", "unknown", "pending", "skipped"):
            if event.kind != "skipped" and self.counts["in flight"]:
                self.counts["in flight"] -= 1
            self.counts[event.kind] += 1
            self.bar.update(1)
        else:
            return
        self.bar.set_postfix_str(
            f"done {self.counts['written']}, in flight {self.counts['in flight']}, "
            f"failed {self.counts['failed'] + self.counts['unknown']}, "
            f"{money(self.cost)}", refresh=False)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _print_nothing_to_do(selection: Selection) -> None:
    print(f"nothing to render: {plural(selection.up_to_date, 'image')} up to date"
          + (f", {selection.filtered_out:,} not selected" if selection.filtered_out else ""))
    _print_held(selection)


def _print_held(selection: Selection) -> None:
    if selection.held_unknown:
        print(f"{plural(len(selection.held_unknown), 'image')} held back: an earlier submit's "
              "outcome was never learned (it may have been billed). Re-run with "
              "--retry-unknown to submit them again.", file=sys.stderr)
    if selection.held_moderated:
        count = len(selection.held_moderated)
        print(f"{plural(count, 'image')} {'was' if count == 1 else 'were'} moderated before and "
              f"{'is' if count == 1 else 'are'} not retried (change the prompt, or use --force).",
              file=sys.stderr)


def _print_report(report: Report, root: Any) -> None:
    counts = Counter(o.status for o in report.outcomes)
    # Each failure gets a line; pending and skipped images (an interrupt) are only counted.
    problems = [o for o in report.outcomes if o.status in ("moderated", "failed", "unknown")]
    if problems:
        rows = [[o.job.job, values_text(o.job.vars), o.job.output, o.status, o.reason or ""]
                for o in problems[:50]]
        print(table(["JOB", "VALUES", "OUTPUT", "STATUS", "REASON"], rows), file=sys.stderr)
        if len(problems) > 50:
            print(f"… and {len(problems) - 50:,} more", file=sys.stderr)
    parts = [f"{counts[s]:,} {s}" for s in ("written", "moderated", "failed", "unknown",
                                             "pending", "skipped") if counts[s]]
    selection = report.selection
    if selection.up_to_date:
        parts.append(f"{selection.up_to_date:,} up to date")
    print(f"{', '.join(parts) or 'nothing done'}; cost {money(report.reported_usd())} "
          f"(reported by the provider); manifest {root / 'manifest.json'}")
    _print_held(selection)
    if counts["unknown"]:
        print(f"{plural(counts['unknown'], 'submit')} ended without an answer and may have been "
              "billed; they are not resubmitted unless you pass --retry-unknown.",
              file=sys.stderr)
    if counts["pending"]:
        print(f"{plural(counts['pending'], 'task')} still in flight: run again to collect them "
              "(they are not paid for twice).", file=sys.stderr)


def _dry_run(plan: Any, options: Options) -> int:
    """The same classification and selection as a real run; nothing is sent or written."""
    root = plan.recipe.output_root
    in_flight = {}
    if has_store(root):
        with Store.open(root, create=False) as store:
            records, in_flight = store.records(), store.in_flight()
    else:
        records = read_records(root, plan.jobs)
    classified = classify(plan, records, verify=options.verify)
    selection = select(classified, in_flight, options, plan.recipe.provider.name)
    rows = [[job.job, values_text(job.vars), job.model, job.output, "submit"]
            for job in selection.submit]
    rows += [[job.job, values_text(job.vars), job.model, job.output, "re-attach (paid)"]
             for job, _ in selection.attach]
    if rows:
        print(table(["JOB", "VALUES", "MODEL", "OUTPUT", "WOULD"], rows))
    estimate = selection.estimated_usd()
    print(f"dry run: would submit {plural(len(selection.submit), 'image')} "
          f"(estimated {money(estimate)}), re-attach {len(selection.attach):,}, skip "
          f"{selection.up_to_date:,} up to date; nothing was sent or written")
    _print_held(selection)
    if selection.jobs:
        _warn_if_no_key(plan)
    check_budget(selection, options.budget)
    return EXIT_OK


def _warn_if_no_key(plan: Any) -> None:
    """A dry run needs no key, but says if the real run would stop for want of one."""
    info = providers.REGISTRY[plan.recipe.provider.name]
    if info.key_env is None:
        return
    try:
        providers.api_key(info, os.environ)
    except ConfigError as error:
        print(f"note: a real run would stop here: {error}", file=sys.stderr)
