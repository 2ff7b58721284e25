"""`fluxbatch plan RECIPE`: what would be rendered, why, and what it would cost.

Three forms: a table (the default); `--json`, one document whose shape is a contract (see
docs/commands.md); and `--jsonl`, one line per image and then a summary line, printed while the
images are planned, so memory stays flat however many there are. `--only` and `--shard` select
the images `render` would, and the summary covers the selection. A stale image says what
changed, field by field (`changes.stale_changes`, as `status -v` and the Python API say it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TextIO

from fluxbatch import models
from fluxbatch import recipe as recipes
from fluxbatch.changes import changes_text, stale_changes
from fluxbatch.commands.output import money, plural, table, values_text
from fluxbatch.errors import EXIT_OK, Problem, RecipeError
from fluxbatch.expand import Expansion
from fluxbatch.front import (
    escape_problems,
    front,
    load_plan,
    shared_store,
    store_of,
    with_store,
)
from fluxbatch.jobs import Job, Plan
from fluxbatch.recipe import collector_paused
from fluxbatch.selection import (
    STATE_ORDER,
    TO_RENDER,
    ImageState,
    ModelSummary,
    classify,
    in_shard,
    matches_only,
    nothing_matches,
)
from fluxbatch.state.manifests import ManifestEntry, read_manifest
from fluxbatch.state.root import RootState, read_entries, read_state
from fluxbatch.state.store import has_store

TABLE, JSON, JSONL = "table", "json", "jsonl"

# `indent=2` would send every value through json's pure-Python encoder (3-4 times slower):
# each job is encoded compactly, by the C encoder, on a line of its own instead.
_encode = json.JSONEncoder(ensure_ascii=False).encode

_CHUNK = 10_000  # jobs classified and printed at a time by --jsonl


@dataclass(frozen=True, slots=True)
class Pick:
    """`--only` and `--shard`: the jobs `render` would take (`selection.matches_only`)."""

    only: tuple[str, ...] = ()
    shard: tuple[int, int] | None = None

    def __bool__(self) -> bool:
        return bool(self.only) or self.shard is not None

    def describe(self) -> str:
        parts = [f"--only {pattern}" for pattern in self.only]
        if self.shard is not None:
            parts.append(f"--shard {self.shard[0]}/{self.shard[1]}")
        return " ".join(parts)

    def document(self, planned: int) -> dict[str, object]:
        shard = None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}"
        return {"only": list(self.only), "shard": shard, "planned": planned}


def plan(*, recipe: str, out: str | None, yes: bool, form: str = TABLE, explain: bool = False,
         only: Sequence[str] = (), shard: tuple[int, int] | None = None,
         store: str | None = None) -> int:
    pick = Pick(tuple(only), shard)
    if form == JSONL:
        _stream(recipe, out=out, yes=yes, explain=explain, pick=pick, store=store)
        return EXIT_OK
    read = front(recipe, out=out, yes=yes, store=store)
    the_plan, classified = read.plan, read.classified
    tally = Tally(pick)
    shown = [(job, state) for job, state in zip(the_plan.jobs, classified.states, strict=True)
             if tally.selects(job)]
    tally.add_all(shown)
    tally.finish(the_plan.recipe, planned=len(the_plan.jobs), orphans=len(classified.orphans))
    changed = stale_changes(classified)
    if form == JSON:
        write_document(sys.stdout, the_plan, shown, tally, explain=explain, changed=changed)
    else:
        print(plan_text(the_plan, shown, tally, explain=explain, changed=changed))
    return EXIT_OK


def emit_jobs(*, recipe: str, out: str | None, yes: bool, engine: str, shards: int,
              accounts_file: str | None, store: str | None) -> int:
    """`plan --shards N --emit ENGINE`: the job file on stdout (`commands.emit`)."""
    from fluxbatch import accounts
    from fluxbatch.commands.emit import emit

    the_plan = load_plan(recipe, out=out, yes=yes)
    pool = None
    if accounts_file is not None:
        pool = accounts.for_provider(accounts.load(accounts_file), the_plan.recipe.provider.name,
                                     accounts.describe(accounts_file))
    sys.stdout.write(emit(the_plan, engine=engine, shards=shards, recipe=recipe, pool=pool,
                          accounts_file=accounts_file, store=store))
    if shards > len(the_plan.jobs):
        print(f"note: {plural(shards, 'shard')} for {plural(len(the_plan.jobs), 'image')}: "
              "some shards have nothing to render", file=sys.stderr)
    shared = [account.name for account in pool or ()
              if shards * (account.cap or models.ACCOUNT_CONCURRENCY) >
              models.ACCOUNT_CONCURRENCY]
    if shards > 1 and shared:
        share = max(1, models.ACCOUNT_CONCURRENCY // shards)
        print(f"note: every shard uses every account of {accounts_file}, so {shards} shards "
              f"share each account's cap of {models.ACCOUNT_CONCURRENCY}: give "
              f"{', '.join(shared)} `cap: {share}` there (see docs/scale.md)", file=sys.stderr)
    return EXIT_OK


# -- the summary --------------------------------------------------------------------------


@dataclass(slots=True)
class _ModelTally:
    jobs: int = 0
    to_render: int = 0
    usd: float = 0.0
    priced: bool = True


@dataclass(slots=True)
class Tally:
    """What the summary says of the jobs shown, gathered one job at a time (a stream does not
    keep its jobs): counts by state, and per model the jobs, those that would be paid for,
    and their estimated cost (summed in plan order, then rounded)."""

    pick: Pick = field(default_factory=Pick)
    jobs: int = 0
    states: Counter[ImageState] = field(default_factory=Counter)
    models: dict[str, _ModelTally] = field(default_factory=dict)
    matched_only: int = 0  # jobs `--only` matched, shard or not
    planned: int = 0

    def selects(self, job: Job) -> bool:
        """Whether the selection takes `job` (and count what `--only` matched)."""
        if not self.pick:
            return True
        if self.pick.only and not matches_only(job, self.pick.only):
            return False
        self.matched_only += 1
        return in_shard(job, self.pick.shard)

    def add_all(self, shown: Iterable[tuple[Job, ImageState]]) -> None:
        for job, state in shown:
            self.jobs += 1
            self.states[state] += 1
            model = self.models.get(job.model)
            if model is None:
                model = self.models[job.model] = _ModelTally()
            model.jobs += 1
            if state in TO_RENDER:
                model.to_render += 1
                cost = models.estimate_cost(job.model, job.request)
                if cost is None:
                    model.priced = False
                else:
                    model.usd += cost

    def finish(self, recipe: recipes.Recipe, *, planned: int, orphans: int) -> None:
        """Close the count; `--only` that matches nothing is an error, as in `render`.
        Orphans are images no job of the recipe makes, so no selection holds them."""
        if self.pick.only and not self.matched_only:
            raise nothing_matches(self.pick.only, recipe)
        self.planned = planned
        if orphans and not self.pick:
            self.states[ImageState.ORPHANED] = orphans

    def per_model(self) -> dict[str, ModelSummary]:
        result = {}
        for name, model in self.models.items():
            price = models.PRICES.get(name)
            result[name] = ModelSummary(model.jobs, model.to_render,
                                        round(model.usd, 4) if model.priced else None,
                                        price.source if price else None)
        return result

    def to_render(self) -> int:
        return sum(self.states[s] for s in TO_RENDER)


def summary_document(tally: Tally) -> dict[str, object]:
    per_model = tally.per_model()
    known = [s.estimated_usd for s in per_model.values()]
    document: dict[str, object] = {
        "jobs": tally.jobs,
        "to_render": tally.to_render(),
        "states": {s: tally.states[s] for s in STATE_ORDER if tally.states[s]},
        "models": {
            name: {"jobs": s.jobs, "to_render": s.to_render, "estimated_usd": s.estimated_usd,
                   "price_source": s.price_source}
            for name, s in per_model.items()
        },
        "estimated_usd": None if None in known else round(sum(k or 0 for k in known), 4),
    }
    if tally.pick:
        document["selection"] = tally.pick.document(tally.planned)
    return document


# -- JSON -------------------------------------------------------------------------------------


def job_document(the_plan: Plan, job: Job, state: ImageState, *, explain: bool,
                 changes: Sequence[str] = ()) -> dict[str, object]:
    """One image of the public `plan --json` shape (documented in docs/commands.md; a contract).
    `changes`: for a stale image, what changed since the image at its output was made."""
    request = job.request
    entry: dict[str, object] = {
        "job": job.job,
        "vars": job.vars,
        "replicate": job.replicate,
        "model": job.model,
        # (a copy only when there is a secret to hide: most requests carry none)
        "request": request if models.SECRET_FIELDS.isdisjoint(request) else models.redact(request),
        "seed": job.seed,
        "key": job.key,
        "output": job.output,
        "state": state,
        "changes": list(changes),
    }
    if explain:
        entry["explain"] = the_plan.explain(job)
    return entry


def recipe_document(recipe: recipes.Recipe) -> dict[str, object]:
    return {
        "name": recipe.name,
        "path": str(recipe.path),
        "sha256": recipe.sha256,
        "provider": recipe.provider.name,
        "output_root": str(recipe.output_root),
        "spec_date": models.SPEC_DATE,
        **({"model_catalogue": recipe.catalogue.reference()} if recipe.catalogue else {}),
    }


def tail_document(the_plan: Plan, tally: Tally, *, explain: bool) -> dict[str, object]:
    """The document's keys after `jobs`: what `--jsonl` prints on its last line."""
    document: dict[str, object] = {"summary": summary_document(tally)}
    if explain:
        document["removed"] = [
            {"job": name, "vars": dict(removed.values), "explain": f"exclude[{removed.exclude}]"}
            for name, removed in the_plan.removed
        ]
    return document


def write_document(out: TextIO, the_plan: Plan, shown: Iterable[tuple[Job, ImageState]],
                   tally: Tally, *, explain: bool, changed: Mapping[int, Sequence[str]]) -> None:
    """`plan --json`: one object, with an image (and a removed combination) per line."""
    out.write('{\n  "recipe": ' + _encode(recipe_document(the_plan.recipe)) + ',\n  "jobs": [')
    _write_items(out, (job_document(the_plan, job, state, explain=explain,
                                    changes=changed.get(job.index, ()))
                       for job, state in shown))
    for key, value in tail_document(the_plan, tally, explain=explain).items():
        out.write(f",\n  {_encode(key)}: ")
        if isinstance(value, list):
            out.write("[")
            _write_items(out, value)
        else:
            out.write(_encode(value))
    out.write("\n}\n")


def _write_items(out: TextIO, items: Iterable[object]) -> None:
    """The items of a list, one per line, and its closing bracket."""
    separator = "\n    "
    for item in items:
        out.write(separator + _encode(item))
        separator = ",\n    "
    out.write("]" if separator == "\n    " else "\n  ]")


# -- JSON lines, streamed -------------------------------------------------------------------


def _stream(path: str, *, out: str | None, yes: bool, explain: bool, pick: Pick,
            store: str | None = None) -> None:
    """`plan --jsonl`: jobs are made, checked, classified and printed a chunk at a time.

    Nothing is printed once a problem is known, and every job's own checks run before the
    first line; but a problem of one image (a template that fails for one combination, two
    images with one path) can end the output after some lines, without the summary line.
    """
    recipe = recipes.load(path, output_root=out, strict=False)
    with collector_paused():
        expansion = Expansion(recipe, yes=yes)
    states = _StateReader(recipe)
    tally = Tally(pick)
    escapes: list[Problem] = []
    planned = 0
    with collector_paused(), shared_store(store_of(store)) as shared:
        for chunk in _chunks(expansion, _CHUNK):
            planned += len(chunk)
            part = Plan(recipe, chunk, ())
            escapes += escape_problems(part)
            if expansion.problems or escapes:
                continue  # (still made, for every problem in one run)
            classified = with_store(classify(part, states.state_of(chunk)), shared)
            shown = [(job, state) for job, state in zip(chunk, classified.states, strict=True)
                     if tally.selects(job)]
            tally.add_all(shown)
            changed = stale_changes(classified, read=states.entries)
            lines = [_encode(job_document(part, job, state, explain=explain,
                                          changes=changed.get(job.index, ())))
                     for job, state in shown]
            if lines:
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
    problems = expansion.problems.found() + escapes
    if problems:
        raise RecipeError(problems)
    tally.finish(recipe, planned=planned, orphans=states.orphans())
    the_plan = Plan(recipe, (), tuple(expansion.removed))
    last = {"recipe": recipe_document(recipe), **tail_document(the_plan, tally, explain=explain)}
    sys.stdout.write(_encode(last) + "\n")


def _chunks(jobs: Iterable[Job], size: int) -> Iterator[tuple[Job, ...]]:
    iterator = iter(jobs)
    while chunk := tuple(islice(iterator, size)):
        yield chunk


class _StateReader:
    """The output root's state, a chunk of jobs at a time. A store or the manifests are read
    once, and each chunk is classified against its own placements (so that no chunk counts
    the others' as orphans). The planned paths of a chunk's jobs that nothing placed are
    searched for images that carry their job's provenance, as `read_state` does for a
    whole plan (and `render` adopts them)."""

    def __init__(self, recipe: recipes.Recipe) -> None:
        self.root, self.name = recipe.output_root, recipe.name
        whole = read_state(self.root, self.name)
        self.whole = whole if whole.tasks or whole.by_key else None
        # every image placed for the recipe, less those planned so far: the orphans, once
        # all are planned
        self.unplanned = set(classify(Plan(recipe, (), ()), whole).orphans)
        self.stored = has_store(self.root)
        self.manifest: dict[str, ManifestEntry] | None = None  # by output, read once

    def entries(self, outputs: Iterable[str]) -> Mapping[str, ManifestEntry]:
        """The manifest entries of some outputs (what `stale_changes` compares): from the
        store, or from the manifest, read once for the whole stream rather than per chunk."""
        if self.stored:
            return read_entries(self.root, self.name, outputs)
        if self.manifest is None:
            document = read_manifest(self.root, self.name) or {"images": []}
            self.manifest = {entry.get("output", entry["path"]): entry
                             for entry in document["images"]}
        return self.manifest

    def state_of(self, chunk: Sequence[Job]) -> RootState:
        for job in chunk:
            self.unplanned.discard(job.output)
        if self.whole is None:
            return read_state(self.root, self.name, chunk)
        own = self.whole.placements
        return dataclasses.replace(self.whole, placements={
            job.output: own[job.output] for job in chunk if job.output in own
        }).with_found(self.root, chunk)

    def orphans(self) -> int:
        return len(self.unplanned)


# -- the table --------------------------------------------------------------------------------


def plan_text(the_plan: Plan, shown: Sequence[tuple[Job, ImageState]], tally: Tally, *,
              explain: bool = False, changed: Mapping[int, Sequence[str]] | None = None) -> str:
    """The table, and under a row (outside the table, so the columns stay narrow) the matrix
    rule that made it (with `explain`) and, for a stale image, what changed."""
    recipe = the_plan.recipe
    changed = changed or {}
    lines = [f"recipe {recipe.name} ({recipe.path}), provider {recipe.provider.name}, "
             f"output root {recipe.output_root}"]
    rows = [[job.job, values_text(job.vars), str(job.replicate), job.model, str(job.seed),
             job.output, state] for job, state in shown]
    text = table(["JOB", "VALUES", "REP", "MODEL", "SEED", "OUTPUT", "STATE"], rows,
                 right=frozenset({2, 4})).split("\n")
    lines.append(text[0])
    if explain or changed:
        for (job, _), line in zip(shown, text[1:], strict=True):
            lines.append(line)
            if explain:
                lines.append(f"  ↳ {the_plan.explain(job)}")
            if changed.get(job.index):
                lines.append(f"  ↳ {changes_text(changed[job.index])}")
    else:
        lines.extend(text[1:])
    if explain and the_plan.removed:
        lines.append("")
        for name, removed in the_plan.removed:
            lines.append(f"removed: {name} {values_text(removed.values)} "
                         f"(exclude[{removed.exclude}])")
    lines.append("")
    lines.append(summary_text(tally))
    return "\n".join(lines)


def summary_text(tally: Tally) -> str:
    orphaned = ImageState.ORPHANED
    states = ", ".join(f"{tally.states[s]:,} {s}" for s in STATE_ORDER
                       if tally.states[s] and s != orphaned)
    count = plural(tally.jobs, "image")
    if tally.pick:
        count += f" (of {tally.planned:,}, selected by {tally.pick.describe()})"
    orphans = tally.states[orphaned]
    # (orphans are not among the plan's images: counted apart, so that the states add up)
    also = f"; not counted: {orphans:,} orphaned, no longer in the recipe" if orphans else ""
    lines = [f"{count}: {states or 'none'}{also}"]
    per_model = tally.per_model()
    rows = [[name, f"{s.jobs:,}", f"{s.to_render:,}", money(s.estimated_usd),
             s.price_source or "no published price"] for name, s in per_model.items()]
    known = [s.estimated_usd for s in per_model.values()]
    total = None if None in known else sum(k or 0 for k in known)
    to_render = sum(s.to_render for s in per_model.values())
    rows.append(["total", f"{tally.jobs:,}", f"{to_render:,}", money(total), ""])
    lines.append(table(["MODEL", "IMAGES", "TO RENDER", "EST. COST", "PRICE SOURCE"], rows,
                       right=frozenset({1, 2, 3})))
    return "\n".join(lines)
