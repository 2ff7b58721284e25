"""`fluxbatch plan RECIPE --diff REF`: what a change to a recipe does, for its review.

The recipe at REF, with every file it reads at REF, is read by the one loader from an export
of the tree (`gitref.at_ref`), planned, and compared with the plan of the working tree image
by image, by output path: an image is *added*, *removed*, *changed* (its key differs: what
differs is said field by field, as `plan` says it of a stale image), *moved* (the same key
at a new path, where an image of that key left) or unchanged. What rendering the change
would pay is the added and changed images whose image the base does not already make, less
what the working output root's ledger holds (placed at no cost). Nothing is sent anywhere:
no key is needed.

Three forms: a table (the default), `--format markdown` (a pull-request comment, at most
`MAX_COMMENT` characters, and stable, so CI can update one comment in place), and
`--format json`. `gallery --diff` draws the same differences before and after.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from fluxbatch import models
from fluxbatch import recipe as recipes
from fluxbatch.changes import changes, changes_text
from fluxbatch.commands.output import money, plural, table, values_text
from fluxbatch.errors import EXIT_OK, FluxbatchError, RecipeError, UsageError
from fluxbatch.expand import expand
from fluxbatch.front import front
from fluxbatch.gitref import Snapshot, at_ref
from fluxbatch.jobs import Job, Plan
from fluxbatch.selection import (
    TO_RENDER,
    ImageState,
    in_shard,
    matches_only,
    nothing_matches,
)
from fluxbatch.state.manifests import ManifestEntry
from fluxbatch.state.root import RootState
from fluxbatch.vocabulary import Vocabulary

TABLE, JSON, MARKDOWN = "table", "json", "markdown"
# GitHub refuses a comment longer than 65,536 characters; counted here in UTF-8 bytes,
# which are never fewer than the characters GitHub counts.
MAX_COMMENT = 65_536


class Change(Vocabulary):
    """What a change to the recipe does to one image (listed in this order)."""

    ADDED = "added"
    CHANGED = "changed"
    MOVED = "moved"  # the same image (key) at another output
    REMOVED = "removed"
    UNCHANGED = "unchanged"


_ORDER = {change: rank for rank, change in enumerate(Change)}
_COUNTED = tuple(Change)


@dataclass(frozen=True, slots=True)
class Difference:
    """One image: as planned now (`job`; None when removed) and at the ref (`was`; None when
    added). `pays`: rendering the change pays for it; `free` says why an added or changed
    image costs nothing."""

    change: Change
    job: Job | None
    was: Job | None
    reasons: tuple[str, ...] = ()
    state: ImageState | None = None  # in the working output root
    pays: bool = False
    free: str = ""

    @property
    def image(self) -> Job:
        """The job that names the image: as planned now, else as it was."""
        found = self.job or self.was
        assert found is not None
        return found

    @property
    def cost(self) -> float | None:
        return models.estimate_cost(self.image.model, self.image.request) if self.pays else 0.0


@dataclass(slots=True)
class Counts:
    """The differences of one job (or of all), counted."""

    changes: Counter[Change] = field(default_factory=Counter)
    to_render: Counter[Change] = field(default_factory=Counter)
    free: int = 0
    usd: float = 0.0
    priced: bool = True

    def add(self, difference: Difference) -> None:
        self.changes[difference.change] += 1
        if difference.pays:
            self.to_render[difference.change] += 1
            cost = difference.cost
            if cost is None:
                self.priced = False
            else:
                self.usd += cost
        elif difference.free:
            self.free += 1

    @property
    def rendered(self) -> int:
        return sum(self.to_render.values())

    @property
    def estimated_usd(self) -> float | None:
        return round(self.usd, 4) if self.priced else None

    def document(self) -> dict[str, object]:
        return {**{str(change): self.changes[change] for change in _COUNTED},
                "to_render": self.rendered, "free": self.free,
                "estimated_usd": self.estimated_usd}


@dataclass(frozen=True, slots=True)
class PlanDiff:
    """The plan of the working tree against the plan at the ref."""

    plan: Plan
    state: RootState  # of the working output root
    base: Snapshot
    base_sha256: str | None  # the recipe's at the ref; None when it did not exist there
    differences: tuple[Difference, ...]  # every image, unchanged ones too, in job order
    selection: str = ""  # `--only`/`--shard`, as given

    @property
    def changed(self) -> list[Difference]:
        return [d for d in self.differences if d.change != Change.UNCHANGED]

    def counts(self) -> tuple[dict[str, Counts], Counts]:
        """Per job (in the recipe's order, then jobs only the ref had), and in all."""
        by_job: dict[str, Counts] = {}
        total = Counts()
        for difference in self.differences:
            by_job.setdefault(difference.image.job, Counts()).add(difference)
            total.add(difference)
        return by_job, total


# -- comparing ------------------------------------------------------------------------------


def compare(old: Sequence[Job], new: Sequence[Job], states: Sequence[ImageState],
            job_order: Sequence[str] = ()) -> tuple[Difference, ...]:
    """Every image of `new` (with its state in the output root) and of `old`, matched by
    output path; an added image whose key left another path is that image, moved."""
    before = {job.output: job for job in old}
    planned = {job.output for job in new}
    gone: dict[str, list[Job]] = {}
    for job in old:
        if job.output not in planned:
            gone.setdefault(job.key, []).append(job)
    base_keys = {job.key for job in old}
    paid: set[str] = set()
    found: list[Difference] = []
    for job, state in zip(new, states, strict=True):
        was = before.get(job.output)
        if was is not None and was.key == job.key:
            found.append(Difference(Change.UNCHANGED, job, was, state=state))
            continue
        if was is None and gone.get(job.key):
            found.append(Difference(Change.MOVED, job, gone[job.key].pop(0), state=state))
            continue
        change = Change.ADDED if was is None else Change.CHANGED
        reasons = () if was is None else tuple(changes(_entry(was), job))
        free = _why_free(job, state, base_keys, paid)
        if not free:
            paid.add(job.key)
        found.append(Difference(change, job, was, reasons, state, not free, free))
    found.extend(Difference(Change.REMOVED, None, job) for jobs in gone.values() for job in jobs)
    rank = {name: i for i, name in enumerate(job_order)}
    found.sort(key=lambda d: (rank.get(d.image.job, len(rank)), d.image.job, _ORDER[d.change],
                              d.image.output))
    return tuple(found)


def _entry(job: Job) -> ManifestEntry:
    """A job as the manifest entry `changes.changes` compares with (what it recorded)."""
    return {"model": job.model, "request": models.redact(job.request)}  # type: ignore[typeddict-item]


def _why_free(job: Job, state: ImageState, base_keys: set[str], paid: set[str]) -> str:
    """Why rendering the change would not pay for this added or changed image ("" if it
    would): the base makes the same image, the output root holds it, or another image of
    the change is the same."""
    if job.key in base_keys:
        return "the same image as one the recipe made before"
    if state not in TO_RENDER:
        return {ImageState.UP_TO_DATE: "already rendered at its path",
                ImageState.STORED: "the output root holds it: placed at no cost",
                ImageState.IN_FLIGHT: "paid earlier: collected at no cost",
                }.get(state, f"held back ({state})")
    if job.key in paid:
        return "the same image as another of this change"
    return ""


# -- the command ----------------------------------------------------------------------------


def plan_diff(*, recipe: str, out: str | None, yes: bool, ref: str, form: str = TABLE,
              only: Sequence[str] = (), shard: tuple[int, int] | None = None) -> int:
    diff = diff_at(recipe, ref, out=out, yes=yes, only=only, shard=shard)
    if form == JSON:
        sys.stdout.write(json_document(diff))
    elif form == MARKDOWN:
        sys.stdout.write(markdown(diff, recipe))
    else:
        sys.stdout.write(text(diff) + "\n")
    return EXIT_OK


def diff_at(recipe: str, ref: str, *, out: str | None = None, yes: bool = False,
            only: Sequence[str] = (), shard: tuple[int, int] | None = None) -> PlanDiff:
    """The working tree's plan of `recipe` against its plan at `ref` (a git ref)."""
    found = front(recipe, out=out, yes=yes)
    plan, state, states = found.plan, found.state, found.classified.states
    with at_ref(recipe, ref) as base:
        old = _plan_at(base, yes=yes)
    old_jobs = old.jobs if old is not None else ()
    order = [spec.name for spec in plan.recipe.jobs] + \
        ([spec.name for spec in old.recipe.jobs] if old is not None else [])
    differences = compare(old_jobs, plan.jobs, states, order)
    if only or shard is not None:
        differences = _selected(differences, plan, only, shard)
    selection = " ".join([*(f"--only {p}" for p in only),
                          *([f"--shard {shard[0]}/{shard[1]}"] if shard else [])])
    return PlanDiff(plan, state, base, old.recipe.sha256 if old is not None else None, differences,
                    selection)


def _plan_at(base: Snapshot, *, yes: bool) -> Plan | None:
    """The plan of the recipe at the ref (None when it did not exist there), its problems
    located as `REF:path:line:column`."""
    if base.recipe is None:
        return None
    try:
        return expand(recipes.load(base.recipe, strict=False), yes=yes)
    except RecipeError as error:
        lacking = f"\n(this clone lacks the content of {plural(len(base.missing), 'file')} at " \
            f"{base.ref}, a partial clone's, and fluxbatch fetches nothing: fetch {base.ref} " \
            "in full first)" if base.missing else ""
        raise FluxbatchError(f"the recipe at {base.ref} ({base.path}) does not load, so there "
                             "is nothing to compare with:\n" +
                             base.relabel(str(error)) + lacking) from None
    except FluxbatchError as error:
        raise FluxbatchError(f"the recipe at {base.ref} ({base.path}): " +
                             base.relabel(str(error))) from None


def _selected(differences: Iterable[Difference], plan: Plan, only: Sequence[str],
              shard: tuple[int, int] | None) -> tuple[Difference, ...]:
    matched = [d for d in differences if not only or matches_only(d.image, only)]
    if only and not matched:
        raise nothing_matches(only, plan.recipe)
    return tuple(d for d in matched if in_shard(d.image, shard))


def check_form(form: str, *, explain: bool) -> None:
    """`--diff` prints a table, `--format json` or `--format markdown`, and no `--explain`;
    `--format markdown` needs `--diff`."""
    if form == "jsonl":
        raise UsageError("plan --diff: --jsonl is not available; use --format json")
    if explain:
        raise UsageError("plan --diff: --explain is not available with --diff")


# -- what it says ---------------------------------------------------------------------------


def headline(diff: PlanDiff) -> str:
    """One sentence: what rendering the change pays for, and everything else it does."""
    _, total = diff.counts()
    added, changed = total.to_render[Change.ADDED], total.to_render[Change.CHANGED]
    rendered = total.rendered
    if rendered:
        cost = total.estimated_usd
        price = f" (~{money(cost)})" if cost is not None else \
            " (cost unknown: a model has no published price)"
        parts = [f"{n:,} {word}" for n, word in ((added, "new"), (changed, "changed")) if n]
        sentence = f"This change renders {plural(rendered, 'image')}{price}: {', '.join(parts)}"
    else:
        sentence = "This change renders no images"
    more = []
    if total.free:
        more.append(f"{total.free:,} {'more is' if total.free == 1 else 'more are'} "
                    "placed at no cost" if rendered else
                    f"{plural(total.free, 'image')} {'is' if total.free == 1 else 'are'} "
                    "placed at no cost")
    for change, verb in ((Change.MOVED, "moves"), (Change.REMOVED, "removes")):
        if total.changes[change]:
            more.append(f"{verb} {total.changes[change]:,}")
    unchanged = total.changes[Change.UNCHANGED]
    if not diff.changed:
        return f"{sentence}: its plan is the same as at {diff.base.ref} " \
            f"({plural(unchanged, 'image')})."
    more.append(f"{unchanged:,} unchanged")
    return f"{sentence}; {'; '.join(more)}."


def why_changed(diff: PlanDiff) -> list[tuple[str, int]]:
    """What the changed images have in common, field by field, with how many images each:
    a field that changed the same way everywhere as it changed (`height 512 → 576`), else
    by its name (`prompt`). A 300-image change is often one or two edits."""
    found: dict[str, set[str]] = {}
    counts: Counter[str] = Counter()
    for difference in diff.differences:
        for reason in difference.reasons:
            name = reason.split(" ", 1)[0]
            found.setdefault(name, set()).add(reason)
            counts[name] += 1
    return [(next(iter(reasons)) if len(reasons) == 1 else name, counts[name])
            for name, reasons in found.items()]


def why_text(diff: PlanDiff) -> str | None:
    said = [f"{what} ({plural(count, 'image')})" for what, count in why_changed(diff)]
    return "What changed: " + "; ".join(said) + "." if said else None


def base_note(diff: PlanDiff) -> str | None:
    """What to know of the recipe at the ref, when it was not where it is now."""
    base = diff.base
    if diff.base_sha256 is None:
        return f"{base.path} did not exist at {base.ref}: every image is added."
    if base.renamed_from:
        return f"The recipe was {base.renamed_from} at {base.ref}."
    return None


def _state_text(difference: Difference) -> str:
    return str(difference.state) if difference.state is not None else "-"


def _cost_text(difference: Difference) -> str:
    if difference.change in (Change.MOVED, Change.REMOVED, Change.UNCHANGED):
        return ""
    if not difference.pays:
        return "free"
    return money(difference.cost)


def _detail(difference: Difference) -> str | None:
    """What the line under an image says: what changed, where it came from, why it is
    free."""
    if difference.change == Change.CHANGED:
        said = changes_text(difference.reasons)
        return f"{said}; {difference.free}" if difference.free else said
    if difference.change == Change.MOVED:
        assert difference.was is not None
        return f"moved from {difference.was.output}"
    return difference.free or None


def text(diff: PlanDiff) -> str:
    recipe = diff.plan.recipe
    selection = f", {diff.selection}" if diff.selection else ""
    lines = [f"recipe {recipe.name} ({recipe.path}) against {diff.base.ref} "
             f"({diff.base.short}){selection}"]
    note = base_note(diff)
    if note:
        lines.append(note)
    lines.append(headline(diff))
    why = why_text(diff)
    if why:
        lines.append(why)
    shown = diff.changed
    if shown:
        rows = [[str(d.change), d.image.job, values_text(d.image.vars), str(d.image.replicate),
                 d.image.output, _state_text(d), _cost_text(d)] for d in shown]
        rendered = table(["CHANGE", "JOB", "VALUES", "REP", "OUTPUT", "STATE", "COST"], rows,
                         right=frozenset({3, 6})).split("\n")
        lines += ["", rendered[0]]
        for difference, line in zip(shown, rendered[1:], strict=True):
            lines.append(line)
            detail = _detail(difference)
            if detail:
                lines.append(f"  ↳ {detail}")
    by_job, total = diff.counts()
    rows = [[name, *_count_cells(counts)] for name, counts in by_job.items()]
    rows.append(["total", *_count_cells(total)])
    lines += ["", table(["JOB", "ADDED", "CHANGED", "MOVED", "REMOVED", "UNCHANGED",
                         "TO RENDER", "EST. COST"], rows, right=frozenset(range(1, 8)))]
    return "\n".join(lines)


def _count_cells(counts: Counts) -> list[str]:
    return [*(f"{counts.changes[c]:,}" for c in _COUNTED), f"{counts.rendered:,}",
            money(counts.estimated_usd)]


# -- JSON -----------------------------------------------------------------------------------


def json_document(diff: PlanDiff) -> str:
    """`plan --diff --format json`: one object (documented in docs/commands.md), each image
    that differs on a line of its own."""
    from fluxbatch.commands.plan import recipe_document  # (plan's contract, one definition)

    encode = json.JSONEncoder(ensure_ascii=False).encode
    by_job, total = diff.counts()
    base = diff.base
    head = {
        "recipe": recipe_document(diff.plan.recipe),
        "base": {"ref": base.ref, "commit": base.commit, "path": base.path,
                 "exists": diff.base_sha256 is not None, "sha256": diff.base_sha256,
                 "renamed_from": base.renamed_from},
    }
    tail = {"by_job": {name: counts.document() for name, counts in by_job.items()},
            "summary": {**total.document(), "headline": headline(diff),
                        "why": dict(why_changed(diff)), "selection": diff.selection or None}}
    lines = ["{"] + [f"  {encode(k)}: {encode(v)}," for k, v in head.items()]
    images = [encode(_image_document(d)) for d in diff.changed]
    lines.append('  "images": [' + ("\n    " + ",\n    ".join(images) + "\n  ]," if images
                                    else "],"))
    lines += [f"  {encode(k)}: {encode(v)}," for k, v in tail.items()]
    lines[-1] = lines[-1].removesuffix(",")
    return "\n".join([*lines, "}"]) + "\n"


def _image_document(difference: Difference) -> dict[str, object]:
    image = difference.image
    document: dict[str, object] = {
        "change": difference.change, "job": image.job, "vars": image.vars,
        "replicate": image.replicate, "output": image.output,
        "key": difference.job.key if difference.job else None,
        "model": image.model, "seed": image.seed,
        "state": difference.state, "pays": difference.pays,
        "estimated_usd": difference.cost if difference.pays else 0.0,
        "free": difference.free or None, "changes": list(difference.reasons),
    }
    was = difference.was
    document["was"] = None if was is None else {"output": was.output, "key": was.key,
                                                "model": was.model, "seed": was.seed}
    return document


# -- Markdown -------------------------------------------------------------------------------


def comment_marker(recipe: str) -> str:
    """The comment's first line: how CI finds the comment to update (one per recipe)."""
    return f"<!-- fluxbatch plan --diff: {recipe.replace('--', '- -')} -->"


def markdown(diff: PlanDiff, shown_as: str, *, limit: int = MAX_COMMENT) -> str:
    """A pull-request comment: the headline, a table with a row per job, and each image that
    differs (with what changed) in a `<details>` block. At most `limit` bytes: the images,
    then the jobs' rows, are shed first (and the comment says how many); the headline and
    the totals always stay. Sorted, and without a date, so the same change gives the same
    comment."""
    budget = _Budget(limit)
    recipe = diff.plan.recipe
    selection = f" ({_code(diff.selection)})" if diff.selection else ""
    top = [comment_marker(shown_as),
           f"### fluxbatch: {_code(recipe.name)} ({_code(shown_as)}) against "
           f"{_code(diff.base.ref)} ({diff.base.short}){selection}", ""]
    note = base_note(diff)
    if note:
        top += [_escape(note), ""]
    top += [_bold_numbers(headline(diff)), ""]
    why = why_changed(diff)
    if why:
        top += ["What changed: " + "; ".join(f"{_code(what)} ({plural(count, 'image')})"
                                             for what, count in why) + ".", ""]
    by_job, total = diff.counts()
    header = ["| job | added | changed | moved | removed | unchanged | to render | est. cost |",
              "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    total_row = _markdown_row(["**total**", *map(_escape, _count_cells(total))])
    command = _code(f"fluxbatch plan {shown_as} --diff {diff.base.ref}")
    budget.reserve(top + header + [total_row], extra=600)
    rows, left = budget.take(_markdown_row([_code(name), *map(_escape, _count_cells(counts))])
                             for name, counts in by_job.items())
    if left:
        rows.append(_markdown_row([f"… {plural(left, 'more job')}", *[""] * 8]))
    lines = [*top, *header, *rows, total_row]
    changed = diff.changed
    if changed:
        detail, left = budget.take(_detail_lines(changed))
        if detail:
            lines += ["", f"<details><summary>The {plural(len(changed), 'image')} that "
                      f"{'changes' if len(changed) == 1 else 'change'}</summary>", "", *detail]
            if left:
                lines += ["", f"… and {left:,} more, left out to fit one comment: {command} "
                          "lists them all."]
            lines += ["", "</details>"]
        else:
            lines += ["", f"The {plural(len(changed), 'image')} that change are left out to "
                      f"fit one comment: {command} lists them all."]
    return "\n".join(lines) + "\n"


def _detail_lines(changed: Sequence[Difference]) -> Iterator[str]:
    """Each image that differs, a table per job (the heading and the header lines travel
    with the job's first image, so a shed list never ends on an empty table)."""
    job = None
    for difference in changed:
        lines = []
        if difference.image.job != job:
            job = difference.image.job
            lines += [f"#### {_code(job)}", "", "| | image | values | what changes |",
                      "|:--|:--|:--|:--|"]
            if difference is not changed[0]:
                lines.insert(0, "")
        lines.append(_markdown_row([str(difference.change), _code(difference.image.output),
                                    _code(_values(difference.image)),
                                    _markdown_detail(difference)]))
        yield "\n".join(lines)


def _values(job: Job) -> str:
    return f"{values_text(job.vars)} #{job.replicate}"


def _markdown_detail(difference: Difference) -> str:
    if difference.change == Change.CHANGED:
        said = "; ".join(_code(reason) for reason in difference.reasons)
        return f"{said} · {_escape(difference.free)}" if difference.free else said
    if difference.change == Change.MOVED:
        assert difference.was is not None
        return f"moved from {_code(difference.was.output)}"
    if difference.change == Change.ADDED:
        return _escape(difference.free) if difference.free else \
            f"new · {_escape(money(difference.cost))}"
    return ""


class _Budget:
    """What is left of the comment's bytes."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def reserve(self, lines: Sequence[str], *, extra: int) -> None:
        """Keep room for `lines` and `extra` more bytes (the notes of what was shed)."""
        self.left -= sum(_size(line) for line in lines) + extra

    def take(self, lines: Iterable[str]) -> tuple[list[str], int]:
        """As many of `lines` as fit, and how many did not."""
        taken: list[str] = []
        left = 0
        for line in lines:
            if left or _size(line) > self.left:
                left += 1
                continue
            self.left -= _size(line)
            taken.append(line)
        return taken, left


def _size(line: str) -> int:
    return len(line.encode("utf-8")) + 1


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _code(text: str) -> str:
    """`text` as a code span inside a table cell: never read as Markdown or HTML (a value
    from a pull request could otherwise mention someone, link, or close the `<details>`)."""
    text = " ".join(text.split("\n")).replace("\r", " ").replace("|", "\\|")
    if not text:
        return ""
    run = longest = 0
    for character in text:
        run = run + 1 if character == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _escape(text: str) -> str:
    """Plain text in Markdown (the words fluxbatch writes, with paths and refs in them)."""
    out = []
    for character in text:
        out.append("\\" + character if character in "\\`*_[]<>|#!~@&$" else character)
    return "".join(out)


def _bold_numbers(sentence: str) -> str:
    """The headline with what it costs in bold: "renders **5 images (~$0.20)**"."""
    start = sentence.find("renders ") + len("renders ")
    end = sentence.find(":", start)
    if sentence.startswith("This change renders no") or end < 0:
        return _escape(sentence)
    return _escape(sentence[:start]) + "**" + _escape(sentence[start:end]) + "**" + \
        _escape(sentence[end:])
