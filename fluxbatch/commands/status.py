"""`fluxbatch status RECIPE`: counts by state, without any network call; exit 0 only when
every image is up to date (so CI can gate on it)."""

from __future__ import annotations

import json
import sys

from fluxbatch.commands.output import table, values_text
from fluxbatch.errors import EXIT_FAILED, EXIT_OK
from fluxbatch.plan import STATE_ORDER, UP_TO_DATE, classify, load_plan
from fluxbatch.state import read_state


def status(*, recipe: str, out: str | None, yes: bool, as_json: bool, verify: bool,
           verbose: bool) -> int:
    plan = load_plan(recipe, out=out, yes=yes)
    state = read_state(plan.recipe.output_root, plan.recipe.name, plan.jobs)
    classified = classify(plan, state, verify=verify)
    counts = classified.count()
    clean = counts[UP_TO_DATE] == len(plan.jobs) and not classified.orphans
    if as_json:
        document = {
            "recipe": plan.recipe.name,
            "output_root": str(plan.recipe.output_root),
            "up_to_date": clean,
            "counts": {state: counts[state] for state in STATE_ORDER},
            "not_up_to_date": [
                {"output": job.output, "state": state, "reason": classified.reasons.get(job.index)}
                for job, state in zip(plan.jobs, classified.states, strict=True)
                if state != UP_TO_DATE
            ],
            "orphans": list(classified.orphans),
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK if clean else EXIT_FAILED
    rows = [[state, f"{counts[state]:,}"] for state in STATE_ORDER if counts[state]]
    print(f"recipe {plan.recipe.name}, output root {plan.recipe.output_root}")
    print(table(["STATE", "IMAGES"], rows or [["(no jobs)", "0"]], right=frozenset({1})))
    if verbose:
        details = [[job.job, values_text(job.vars), job.output, state,
                    classified.reasons.get(job.index, "")]
                   for job, state in zip(plan.jobs, classified.states, strict=True)
                   if state != UP_TO_DATE]
        details += [["-", "-", output, "orphaned", "no longer in the recipe"]
                    for output in classified.orphans]
        if details:
            print()
            print(table(["JOB", "VALUES", "OUTPUT", "STATE", "REASON"], details))
    if clean:
        print("everything is up to date")
    else:
        print("not up to date: `fluxbatch render` makes what is missing"
              + ("; `fluxbatch clean --delete` removes orphans" if classified.orphans else ""),
              file=sys.stderr)
    return EXIT_OK if clean else EXIT_FAILED
