"""The plan cache: a render of an unchanged recipe reads back the plan it expanded last time
instead of expanding every image again, so that a null build costs little more than
reading the recipe and looking at the images.

What a plan is made of, and so what the cache is keyed by:

- the `basis`: a digest of fluxbatch's version and code (the model catalogue with it), the
  recipe's bytes, where it is and where its output root is, and every file loading it read
  (`from:` lists and tables, and the image inputs of `files:` patterns and columns, with
  their sha256). The recipe is loaded, validated and confined as always, on every run: the
  cache never skips a check of what loading reads, and a file that changed, appeared or
  went changes the basis;
- `expanded`: the image inputs that expansion looked at (a template naming a photo). They
  are looked at again, through the project's confinement and the input-facts cache, and
  each must still have the recorded sha256.

Given those, expansion is a pure function of them; what it made is stored: each image's
output, key, seed, model and request (its secrets redacted, as in every file fluxbatch
writes), and the notes. The images' variables, combinations
and the combinations `exclude` removed are made again from the recipe just loaded.

The cache lives in the output root (`.fluxbatch/plan.<recipe>.json`), which may be committed
or tampered with, so it is untrusted data: a file that is not exactly what this version
writes (a header, then a JSON body whose sha256 the header states, of the right shape) is
ignored and rewritten; it is read only as a regular file, never through a link, and within
a size bound. Its output paths pass the same rules as a recipe's, and the outputs' links
are checked on every run (`front.escape_problems`). Even so, a hostile file with the right
digests could describe other images than the recipe makes, so a plan read back
(`Plan.reused`) is trusted for one conclusion only: that every image is already up to
date. Anything else (an image to render, place, collect or hold back; an output nothing
placed) is worked out from a fresh expansion (`front.fresh`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fluxbatch import matrix as matrix_rules
from fluxbatch.errors import Problem
from fluxbatch.inputs import InputProblem
from fluxbatch.jobs import Job, Memo, Plan, count_upper_bound, guard_size
from fluxbatch.layout import STATE_DIR, TMP, output_path_problem, plan_cache_name, state_path
from fluxbatch.models import SECRET_FIELDS, redact
from fluxbatch.project import ProjectFileError, read_regular
from fluxbatch.recipe import Recipe, collector_paused
from fluxbatch.state.files import replacing
from fluxbatch.version import __version__

FORMAT = 1
_HEADER = b"fluxbatch plan cache %d " % FORMAT
# What one image may take in the file (its request, most of it the prompt), and a little
# more: a larger file is not read, and a plan that would make one is not kept.
_BYTES_PER_IMAGE = 16 * 1024
_BYTES_MORE = 1024 * 1024


def basis(recipe: Recipe) -> str | None:
    """The digest of everything loading `recipe` read (see the module's docstring); None
    when its plan is not to be kept (it has problems, or was not read from a file)."""
    if recipe.problems or recipe.inputs is None:
        return None
    facts = [FORMAT, __version__, list(sys.version_info[:2]), _code(), recipe.sha256,
             os.path.realpath(recipe.path), os.path.abspath(recipe.output_root),
             list(recipe.inputs.project.consulted.items())]
    return hashlib.sha256(json.dumps(facts, ensure_ascii=False).encode()).hexdigest()


@functools.cache
def _code() -> list[list[Any]]:
    """fluxbatch's own modules and data files (the catalogue), by size and mtime: a change
    that is not a new version (an edited or reinstalled checkout) is one too."""
    package = os.path.dirname(os.path.abspath(__file__))
    found = []
    for folder in (package, os.path.join(package, "data")):
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith((".py", ".json")) and entry.is_file():
                    status = entry.stat()
                    found.append([entry.name, status.st_size, status.st_mtime_ns])
    return sorted(found)


def memo(recipe: Recipe, basis: str, loaded: int) -> Memo:
    """The memo of a plan just expanded from `recipe`: the files that loading read are the
    first `loaded` the project's log holds, and expansion looked at those after them."""
    consulted = recipe.inputs.project.consulted if recipe.inputs is not None else {}
    return Memo(basis, loaded, tuple(list(consulted.items())[loaded:]))


def _path(recipe: Recipe) -> Path:
    return state_path(recipe.output_root, plan_cache_name(recipe.name))


def _limit(recipe: Recipe) -> int:
    return _BYTES_MORE + _BYTES_PER_IMAGE * count_upper_bound(recipe)


def reuse(recipe: Recipe, basis: str, *, yes: bool = False) -> Plan | None:
    """The plan kept for `recipe` (just loaded, whose `basis` is given), if it is there, whole,
    and made of exactly what `recipe` is made of now; else None. Over `max_jobs`, it is
    refused as expanding would refuse it (`PlanTooLargeError`) unless `yes`."""
    if not yes:
        guard_size(recipe)
    with collector_paused():
        return _reuse(recipe, basis)


def _reuse(recipe: Recipe, basis: str) -> Plan | None:
    body = _read(recipe)
    if body is None:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    found = _checked(document, basis)
    loaded = len(recipe.inputs.project.consulted) if recipe.inputs is not None else 0
    if found is None or not _unchanged(recipe, found["expanded"]):
        return None
    made = _jobs(recipe, found)
    if made is None:
        return None
    jobs, removed = made
    notes = tuple(Problem(*note) for note in found["notes"])
    expanded = tuple((name, digest) for name, digest in found["expanded"])
    return Plan(recipe, tuple(jobs), tuple(removed), notes,
                Memo(basis, loaded, expanded, reused=True))


def _read(recipe: Recipe) -> bytes | None:
    """The body of the cache file, if its header states the body's sha256; never through a
    link (the state directory's, or the file's own)."""
    path = _path(recipe)
    if os.path.islink(recipe.output_root / STATE_DIR):
        return None
    try:
        data = read_regular(path, limit=_limit(recipe), name=path.name, follow=False)
    except (OSError, ProjectFileError):
        return None
    header, newline, body = data.partition(b"\n")
    if not newline or header != _HEADER + hashlib.sha256(body).hexdigest().encode():
        return None
    return body


def _checked(document: Any, basis: str) -> dict[str, Any] | None:
    """The document, if it is of this basis and of the shape `save` writes; else None."""
    if not isinstance(document, dict) or document.get("basis") != basis:
        return None
    columns: list[list[Any]] = [column for name in _COLUMNS
                                 if isinstance(column := document.get(name), list)]
    if len(columns) != len(_COLUMNS):
        return None
    outputs, keys, seeds, models, requests = columns
    count = len(outputs)
    if any(len(column) != count for column in columns) or \
            not all(type(output) is str and output_path_problem(output) is None
                    for output in outputs) or \
            not all(type(key) is str for key in keys) or \
            not all(type(seed) is int for seed in seeds) or \
            not all(type(model) is str for model in models) or \
            not all(type(request) is dict for request in requests):
        return None
    expanded, notes = document.get("expanded"), document.get("notes")
    if not isinstance(expanded, list) or len(expanded) > 16 + 16 * count or \
            not all(_strings(entry, 2) for entry in expanded):
        return None
    if not isinstance(notes, list) or not all(_note(note) for note in notes):
        return None
    return document


_COLUMNS = ("outputs", "keys", "seeds", "models", "requests")


def _strings(value: Any, count: int) -> bool:
    return type(value) is list and len(value) == count and all(type(v) is str for v in value)


def _note(value: Any) -> bool:
    return type(value) is list and len(value) == 5 and type(value[0]) is str and \
        all(v is None or type(v) is int for v in value[1:3]) and \
        type(value[3]) is str and type(value[4]) is str


def _unchanged(recipe: Recipe, expanded: list[list[str]]) -> bool:
    """Whether each image input expansion looked at still has its sha256, looked at as
    expansion looks at it (confined to the project; through the input-facts cache)."""
    if recipe.inputs is None:
        return False
    for name, digest in expanded:
        try:
            if recipe.inputs.facts(name).sha256 != digest:
                return False
        except InputProblem:
            return False
    return True


Removals = list[tuple[str, matrix_rules.Removed]]


def _jobs(recipe: Recipe, found: dict[str, Any]) -> tuple[list[Job], Removals] | None:
    """The jobs, their variables and combinations made again from the recipe, in plan order;
    None if the recipe does not make as many images as were kept."""
    outputs, keys, seeds, models, requests = (found[name] for name in _COLUMNS)
    jobs: list[Job] = []
    removed: Removals = []
    total = len(outputs)
    for spec, combo, replicate in _images(recipe, removed):
        index = len(jobs)
        if index == total:
            return None
        jobs.append(Job(index, spec, combo.values, replicate, models[index], requests[index],
                        seeds[index], keys[index], outputs[index], combo))
    return (jobs, removed) if len(jobs) == total else None


def _images(recipe: Recipe,
            removed: Removals) -> Iterator[tuple[str, matrix_rules.Combination, int]]:
    """Each image's job, combination and replicate, in the order expansion makes them."""
    for spec in recipe.jobs:
        if not spec.matrix.loaded:
            continue  # (as `expand.Expansion` skips it)
        combos, gone = matrix_rules.combinations(spec.matrix)
        removed.extend((spec.name, r) for r in gone)
        for combo in combos:
            for replicate in range(1, spec.replicates + 1):
                yield spec.name, combo, replicate


def save(plan: Plan) -> None:
    """Keep a plan just expanded (its `memo` says what it was made of) for the next run, in
    the output root's state directory, which the caller has made (`Store.open`): written
    whole, then renamed into place. Not worth failing a render for: an OSError, or a plan
    too large to keep, leaves the cache as it was."""
    if plan.memo is None or plan.memo.reused:
        return
    recipe = plan.recipe
    jobs = plan.jobs
    document = {
        "basis": plan.memo.basis,
        "expanded": [list(entry) for entry in plan.memo.expanded],
        "outputs": [job.output for job in jobs],
        "keys": [job.key for job in jobs],
        "seeds": [job.seed for job in jobs],
        "models": [job.model for job in jobs],
        # (redacted, as everything fluxbatch writes: a plan read back sends nothing)
        "requests": [job.request if SECRET_FIELDS.isdisjoint(job.request) else
                     redact(job.request) for job in jobs],
        "notes": [[n.file, n.line, n.column, n.path, n.message] for n in plan.notes],
    }
    try:
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, UnicodeEncodeError):
        return
    if len(body) > _limit(recipe) - 128:
        return
    root = recipe.output_root
    try:
        with replacing(_path(recipe), state_path(root, TMP)) as handle:
            handle.write(_HEADER + hashlib.sha256(body).hexdigest().encode() + b"\n")
            handle.write(body)
    except OSError:
        pass  # (a cache: the next run expands again)

