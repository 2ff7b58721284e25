"""`fluxbatch plan RECIPE`: what would be rendered, why, and what it would cost."""

from __future__ import annotations

import json
from typing import Any

from fluxbatch import models
from fluxbatch.commands.output import money, plural, table, values_text
from fluxbatch.errors import EXIT_OK
from fluxbatch.selection import (
    STATE_ORDER,
    TO_RENDER,
    Classified,
    classify,
    load_plan,
    redacted,
    summarise,
)
from fluxbatch.state import read_state


def plan(*, recipe: str, out: str | None, yes: bool, as_json: bool, explain: bool) -> int:
    the_plan = load_plan(recipe, out=out, yes=yes)
    classified = classify(the_plan, read_state(the_plan.recipe.output_root,
                                                  the_plan.recipe.name, the_plan.jobs))
    if as_json:
        print(json.dumps(plan_document(classified, explain=explain), indent=2, ensure_ascii=False))
    else:
        print(plan_text(classified, explain=explain))
    return EXIT_OK


def plan_document(classified: Classified, *, explain: bool = False) -> dict[str, Any]:
    """The public `plan --json` shape (documented in the README; a contract)."""
    the_plan = classified.plan
    recipe = the_plan.recipe
    jobs = []
    for job, state in zip(the_plan.jobs, classified.states, strict=True):
        entry: dict[str, Any] = {
            "job": job.job,
            "vars": dict(job.vars),
            "replicate": job.replicate,
            "model": job.model,
            "request": redacted(job.request),
            "seed": job.seed,
            "key": job.key,
            "output": job.output,
            "state": state,
        }
        if explain:
            entry["explain"] = the_plan.explain(job)
        jobs.append(entry)
    document: dict[str, Any] = {
        "recipe": {
            "name": recipe.name,
            "path": str(recipe.path),
            "sha256": recipe.sha256,
            "provider": recipe.provider.name,
            "output_root": str(recipe.output_root),
            "spec_date": models.SPEC_DATE,
        },
        "jobs": jobs,
        "summary": summary_document(classified),
    }
    if explain:
        document["removed"] = [
            {"job": name, "vars": dict(removed.values), "explain": f"exclude[{removed.exclude}]"}
            for name, removed in the_plan.removed
        ]
    return document


def summary_document(classified: Classified) -> dict[str, Any]:
    counts = classified.count()
    per_model = summarise(classified.plan.jobs, classified.states)
    known = [s.estimated_usd for s in per_model.values()]
    return {
        "jobs": len(classified.plan.jobs),
        "to_render": sum(counts[s] for s in TO_RENDER),
        "states": {s: counts[s] for s in STATE_ORDER if counts[s]},
        "models": {
            name: {"jobs": s.jobs, "to_render": s.to_render, "estimated_usd": s.estimated_usd,
                   "price_source": s.price_source}
            for name, s in per_model.items()
        },
        "estimated_usd": None if None in known else round(sum(k or 0 for k in known), 4),
    }


def plan_text(classified: Classified, *, explain: bool = False) -> str:
    the_plan = classified.plan
    recipe = the_plan.recipe
    lines = [f"recipe {recipe.name} ({recipe.path}), provider {recipe.provider.name}, "
             f"output root {recipe.output_root}"]
    rows = [[job.job, values_text(job.vars), str(job.replicate), job.model, str(job.seed),
             job.output, state]
            for job, state in zip(the_plan.jobs, classified.states, strict=True)]
    text = table(["JOB", "VALUES", "REP", "MODEL", "SEED", "OUTPUT", "STATE"], rows,
                 right=frozenset({2, 4})).split("\n")
    lines.append(text[0])
    for job, line in zip(the_plan.jobs, text[1:], strict=True):
        lines.append(line)
        if explain:  # under its row, outside the table, so the columns stay narrow
            lines.append(f"  ↳ {the_plan.explain(job)}")
    if explain and the_plan.removed:
        lines.append("")
        for name, removed in the_plan.removed:
            lines.append(f"removed: {name} {values_text(removed.values)} "
                         f"(exclude[{removed.exclude}])")
    lines.append("")
    lines.append(summary_text(classified))
    return "\n".join(lines)


def summary_text(classified: Classified) -> str:
    counts = classified.count()
    states = ", ".join(f"{counts[s]:,} {s}" for s in STATE_ORDER if counts[s])
    lines = [f"{plural(len(classified.plan.jobs), 'job')}: {states or 'none'}"]
    per_model = summarise(classified.plan.jobs, classified.states)
    rows = [[name, f"{s.jobs:,}", f"{s.to_render:,}", money(s.estimated_usd),
             s.price_source or "no published price"] for name, s in per_model.items()]
    known = [s.estimated_usd for s in per_model.values()]
    total = None if None in known else sum(k or 0 for k in known)
    to_render = sum(s.to_render for s in per_model.values())
    rows.append(["total", f"{len(classified.plan.jobs):,}", f"{to_render:,}", money(total), ""])
    lines.append(table(["MODEL", "JOBS", "TO RENDER", "EST. COST", "PRICE SOURCE"], rows,
                       right=frozenset({1, 2, 3})))
    return "\n".join(lines)
