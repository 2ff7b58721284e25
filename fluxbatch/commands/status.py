"""`fluxbatch status RECIPE`: counts by state, without any network call; exit 0 only when
every image is up to date (so CI can gate on it). `-v` lists every image that is not, with
why (for a stale one, what changed, field by field) and what to do."""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

from fluxbatch.commands.output import table, values_text
from fluxbatch.errors import EXIT_FAILED, EXIT_OK
from fluxbatch.selection import (
    FAILED,
    IN_FLIGHT,
    MISSING,
    MODERATED,
    NEW,
    STALE,
    STATE_ORDER,
    STORED,
    UNKNOWN,
    UP_TO_DATE,
    Classified,
    changes_text,
    classify,
    load_plan,
    stale_changes,
)
from fluxbatch.state import read_entries, read_state


def status(*, recipe: str, out: str | None, yes: bool, as_json: bool, verify: bool,
           verbose: bool) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    state = read_state(plan.recipe.output_root, plan.recipe.name, plan.jobs)
    classified = classify(plan, state, verify=verify)
    counts = classified.count()
    clean = counts[UP_TO_DATE] == len(plan.jobs) and not classified.orphans
    changed = stale_changes(classified)
    reasons = {index: changes_text(found) for index, found in changed.items() if found}
    orphans = read_entries(plan.recipe.output_root, plan.recipe.name, classified.orphans) \
        if (verbose or as_json) else {}
    if as_json:
        print(json.dumps(_document(classified, changed, orphans, clean), indent=2,
                         ensure_ascii=False))
        return EXIT_OK if clean else EXIT_FAILED
    rows = [[state, f"{counts[state]:,}"] for state in STATE_ORDER if counts[state]]
    print(f"recipe {plan.recipe.name}, output root {plan.recipe.output_root}")
    print(table(["STATE", "IMAGES"], rows or [["(no images)", "0"]], right=frozenset({1})))
    if verbose:
        details = [[job.job, values_text(job.vars), job.output, state,
                    reasons.get(job.index) or classified.reasons.get(job.index, "")]
                   for job, state in zip(plan.jobs, classified.states, strict=True)
                   if state != UP_TO_DATE]
        for output in classified.orphans:
            entry = orphans.get(output, {})
            details.append([str(entry.get("job", "-")), values_text(entry.get("vars") or {}),
                            output, "orphaned", "no longer in the recipe"])
        if details:
            print()
            print(table(["JOB", "VALUES", "OUTPUT", "STATE", "REASON"], details))
    if clean:
        print("everything is up to date")
    else:
        for line in advice(counts, bool(classified.orphans)):
            print(line, file=sys.stderr)
    return EXIT_OK if clean else EXIT_FAILED


def advice(counts: Counter[str], orphans: bool) -> list[str]:
    """What to do about each kind of image that is not up to date."""
    lines = []
    to_make = counts[NEW] + counts[MISSING] + counts[STALE] + counts[FAILED]
    free = counts[STORED] + counts[IN_FLIGHT]
    if to_make or free:
        paid = f"{to_make:,} to render" if to_make else ""
        placed = f"{free:,} to place or collect, at no cost" if free else ""
        lines.append(f"not up to date: `fluxbatch render` makes them ("
                     f"{', '.join(part for part in (paid, placed) if part)})")
    if counts[UNKNOWN]:
        lines.append(f"{counts[UNKNOWN]:,} unknown: a submit's answer was never learned (it may "
                     "have been billed); `fluxbatch render --retry-unknown` submits again")
    if counts[MODERATED]:
        lines.append(f"{counts[MODERATED]:,} moderated: change the prompt, or "
                     "`fluxbatch render --force` to try again as it is")
    if orphans:
        lines.append("orphans: `fluxbatch clean --delete` removes them")
    return lines


def _document(classified: Classified, changed: dict[int, list[str]],
              orphans: dict[str, dict[str, Any]], clean: bool) -> dict[str, Any]:
    plan = classified.plan
    counts = classified.count()
    not_up_to_date = []
    for job, state in zip(plan.jobs, classified.states, strict=True):
        if state == UP_TO_DATE:
            continue
        item: dict[str, Any] = {"output": job.output, "state": state,
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
        "orphan_images": [{"output": output, "job": orphans.get(output, {}).get("job"),
                           "vars": orphans.get(output, {}).get("vars")}
                          for output in classified.orphans],
    }
