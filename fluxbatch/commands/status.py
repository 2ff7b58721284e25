"""`fluxbatch status RECIPE`: counts by state, without any network call; exit 0 only when
every image is up to date (so CI can gate on it). `-v` lists every image that is not, with
why (for a stale one, what changed, field by field) and what to do."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Mapping

from fluxbatch.changes import changes_text, stale_changes
from fluxbatch.commands.output import table, values_text
from fluxbatch.errors import EXIT_FAILED, EXIT_OK
from fluxbatch.front import front
from fluxbatch.selection import STATE_ORDER, TO_RENDER, Classified, ImageState
from fluxbatch.state.manifests import ManifestEntry
from fluxbatch.state.root import RootState, read_entries


def status(*, recipe: str, out: str | None, yes: bool, as_json: bool, verify: bool,
           verbose: bool, store: str | None = None) -> int:
    read = front(recipe, out=out, yes=yes, verify=verify, reuse=True, store=store)
    plan, classified = read.plan, read.classified
    counts = classified.count()
    up_to_date = ImageState.UP_TO_DATE
    clean = counts[up_to_date] == len(plan.jobs) and not classified.orphans
    changed = stale_changes(classified)
    reasons = {index: changes_text(found) for index, found in changed.items() if found}
    orphans = read_entries(plan.recipe.output_root, plan.recipe.name, classified.orphans) \
        if (verbose or as_json) else {}
    accounts = in_flight_by_account(classified, read.state)
    if as_json:
        document = _document(classified, changed, orphans, clean)
        document["in_flight_by_account"] = [{"account": name, "tasks": count}
                                            for name, count in accounts.items()]
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return EXIT_OK if clean else EXIT_FAILED
    rows = [[state, f"{counts[state]:,}"] for state in STATE_ORDER if counts[state]]
    print(f"recipe {plan.recipe.name}, output root {plan.recipe.output_root}")
    print(table(["STATE", "IMAGES"], rows or [["(no images)", "0"]], right=frozenset({1})))
    if any(name is not None for name in accounts):
        print("in flight per account: " + ", ".join(
            f"{name or '(no account: the provider key variable)'} {count:,}"
            for name, count in accounts.items()))
    if verbose:
        details = [[job.job, values_text(job.vars), job.output, state,
                    reasons.get(job.index) or classified.reasons.get(job.index, "")]
                   for job, state in zip(plan.jobs, classified.states, strict=True)
                   if state != up_to_date]
        for output in classified.orphans:
            entry = orphans.get(output)
            job_name, combination = (entry.get("job", "-"), entry.get("vars") or {}) if entry \
                else ("-", {})
            details.append([str(job_name), values_text(combination),
                            output, ImageState.ORPHANED, "no longer in the recipe"])
        if details:
            print()
            print(table(["JOB", "VALUES", "OUTPUT", "STATE", "REASON"], details))
    if clean:
        print("everything is up to date")
    else:
        for line in advice(counts, bool(classified.orphans)):
            print(line, file=sys.stderr)
    return EXIT_OK if clean else EXIT_FAILED


def in_flight_by_account(classified: Classified, state: RootState) -> dict[str | None, int]:
    """Tasks in flight (paid, not collected yet) per account of the pool that paid for them
    (None: the provider's own key variable), named accounts first, by name; one per key."""
    in_flight = ImageState.IN_FLIGHT
    seen: dict[str, str | None] = {}
    for job, found in zip(classified.plan.jobs, classified.states, strict=True):
        task = state.tasks.get(job.key) if found == in_flight else None
        if task is not None:
            seen[job.key] = task.account
    counts = Counter(seen.values())
    return dict(sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or "")))


def advice(counts: Counter[ImageState], orphans: bool) -> list[str]:
    """What to do about each kind of image that is not up to date."""
    lines = []
    to_make = sum(counts[state] for state in TO_RENDER)
    free = counts[ImageState.STORED] + counts[ImageState.IN_FLIGHT]
    if to_make or free:
        paid = f"{to_make:,} to render" if to_make else ""
        placed = f"{free:,} to place or collect, at no cost" if free else ""
        lines.append(f"not up to date: `fluxbatch render` makes them ("
                     f"{', '.join(part for part in (paid, placed) if part)})")
    if counts[ImageState.UNKNOWN]:
        lines.append(f"{counts[ImageState.UNKNOWN]:,} unknown: a submit's answer was never "
                     "learned (it may have been billed); `fluxbatch render --retry-unknown` "
                     "submits again")
    if counts[ImageState.MODERATED]:
        lines.append(f"{counts[ImageState.MODERATED]:,} moderated: change the prompt, or "
                     "`fluxbatch render --force` to try again as it is")
    if orphans:
        lines.append("orphans: `fluxbatch clean --delete` removes them")
    return lines


def _document(classified: Classified, changed: dict[int, list[str]],
              orphans: Mapping[str, ManifestEntry], clean: bool) -> dict[str, object]:
    plan = classified.plan
    counts = classified.count()
    not_up_to_date = []
    up_to_date = ImageState.UP_TO_DATE
    for job, state in zip(plan.jobs, classified.states, strict=True):
        if state == up_to_date:
            continue
        item: dict[str, object] = {"output": job.output, "state": state,
                                "reason": classified.reasons.get(job.index)}
        if job.index in changed:
            item["changes"] = changed[job.index]
        not_up_to_date.append(item)
    return {
        "recipe": plan.recipe.name,
        "output_root": str(plan.recipe.output_root),
        "up_to_date": clean,
        "counts": {state: counts[state] for state in STATE_ORDER},
        "not_up_to_date": not_up_to_date,
        "orphans": list(classified.orphans),
        "orphan_images": [_orphan(output, orphans.get(output)) for output in classified.orphans],
    }


def _orphan(output: str, entry: ManifestEntry | None) -> dict[str, object]:
    """An orphan in `status --json`: what its entry says it was made for (when known)."""
    return {"output": output, "job": entry.get("job") if entry else None,
            "vars": entry.get("vars") if entry else None}
