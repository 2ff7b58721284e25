"""The front half that every command reading a recipe against its output root shares, and
the Python API with them: load → expand → check the outputs' links → read the root's state
→ classify.

    plan = load_plan("recipe.yaml")       # or plan_of(recipe): a Recipe already loaded
    front = read(plan)                    # the root's state, and each image's
    front.classified.states, front.state

`plan`, `status`, `gallery` and `fluxbatch.plan` call `front(...)` (both halves); `render`,
`clean`, `merge` and `validate` call `load_plan` and read the state under the root's lock
themselves (`session`, `clean`, `merge`).

With `reuse`, an unchanged recipe's plan is read back from the plan cache instead of
expanded (`plan_cache`), and trusted only to find that every image is up to date: any other
finding is made again from a fresh expansion (`fresh`). `render` and `status` reuse.

With a shared store (`--store`, `FLUXBATCH_STORE`), `plan`, `status` and `render --dry-run`
count what it holds (`with_store`), last: it is asked only of the keys a render would pay
for in the plan that stands, so a null build makes no request of it, and a plan read back
from the cache is never the one it is asked about.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fluxbatch import plan_cache
from fluxbatch import recipe as recipes
from fluxbatch.errors import Problem, RecipeError
from fluxbatch.jobs import Plan
from fluxbatch.layout import link_problem, links_in
from fluxbatch.recipe import Recipe
from fluxbatch.selection import TO_RENDER, Classified, ImageState, classify
from fluxbatch.state.root import RootState, read_state

if TYPE_CHECKING:
    from fluxbatch.state.shared import SharedStore

RecipeSource = Recipe | str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class Front:
    """A plan read against its output root: the root's state, and each image's."""

    plan: Plan
    state: RootState
    classified: Classified


def load_plan(source: RecipeSource, *, out: str | os.PathLike[str] | None = None,
              yes: bool = False, verify: bool = False, reuse: bool = False) -> Plan:
    """Load (unless `source` is a `Recipe` already), expand, and check that no output path
    escapes the output root via a symlink. `out` overrides the recipe's output root, `yes`
    accepts a plan over its `max_jobs`, `verify` hashes every image input again (see
    `recipe.load`); `reuse` reads the plan back from the plan cache if the recipe and its
    files are unchanged. Raises `RecipeError` (every problem at once) or
    `PlanTooLargeError`."""
    if isinstance(source, Recipe):
        if out is not None:
            raise ValueError("out= applies to a recipe path; load(path, out=...) for a Recipe")
        return plan_of(source, yes=yes)
    loaded = recipes.load(source, output_root=None if out is None else os.fspath(out),
                          strict=False, verify=verify)
    basis = plan_cache.basis(loaded)
    plan = plan_cache.reuse(loaded, basis, yes=yes) if reuse and basis is not None else None
    if plan is None:
        return plan_of(loaded, yes=yes, basis=basis)
    _check_links(plan)
    return plan


def plan_of(recipe: Recipe, *, yes: bool = False, basis: str | None = None) -> Plan:
    """Expand a loaded recipe, and check its outputs' links. With `basis` (what loading it
    read, `plan_cache.basis`), the plan carries what the plan cache needs to keep it."""
    from fluxbatch.expand import expand  # (its template engine only when it is needed)

    consulted = recipe.inputs.project.consulted if recipe.inputs is not None else {}
    loaded = len(consulted)
    plan = expand(recipe, yes=yes)
    if basis is not None:
        plan = replace(plan, memo=plan_cache.memo(recipe, basis, loaded))
    _check_links(plan)
    return plan


def fresh(plan: Plan) -> Plan:
    """`plan` expanded again: a plan read back from the cache (`plan.reused`) is trusted only
    to find that nothing needs doing, and this is the plan to do anything else by."""
    if not plan.reused:
        return plan
    assert plan.memo is not None
    from fluxbatch.expand import expand

    made = expand(plan.recipe, yes=True)  # (its size was checked when it was read back)
    made = replace(made, memo=plan_cache.memo(plan.recipe, plan.memo.basis, plan.memo.loaded))
    _check_links(made)
    return made


def _check_links(plan: Plan) -> None:
    problems = escape_problems(plan)
    if problems:
        raise RecipeError(problems)


def read(plan: Plan, *, verify: bool = False) -> Front:
    """The root's state (read, never changed), and each image's against it."""
    recipe = plan.recipe
    state = read_state(recipe.output_root, recipe.name, plan.jobs)
    return Front(plan, state, classify(plan, state, verify=verify))


def front(source: RecipeSource, *, out: str | os.PathLike[str] | None = None,
          yes: bool = False, verify: bool = False, reuse: bool = False,
          store: str | None = None, environ: Mapping[str, str] | None = None) -> Front:
    """The whole front half: `load_plan`, then `read`. A plan read back from the cache
    stands only if it finds every image up to date, and none orphaned. Then what the
    shared store holds is counted (`store`, else `FLUXBATCH_STORE` in `environ`, default
    the process's): a plan that stands has no image a render would pay for, so a null build
    asks the store nothing."""
    plan = load_plan(source, out=out, yes=yes, verify=verify, reuse=reuse)
    found = read(plan, verify=verify)
    if plan.reused and not all_up_to_date(found.classified):
        found = read(fresh(plan), verify=verify)
    return stored(found, store_of(store, environ))


def all_up_to_date(classified: Classified) -> bool:
    up_to_date = ImageState.UP_TO_DATE
    return not classified.orphans and all(state == up_to_date for state in classified.states)


# -- what a shared store holds -------------------------------------------------------------

# States whose image `render` would look for in a shared store before paying for it.
LOOKED_UP = TO_RENDER | {ImageState.UNKNOWN}


def store_of(store: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The shared store's URL the operator named: `store` (`--store`, `store=`; "" for
    none), else `FLUXBATCH_STORE`."""
    from fluxbatch.state.shared import store_url

    return store_url(store, os.environ if environ is None else environ)


def asks_store(classified: Classified) -> bool:
    """Whether a shared store would be asked anything: only of images a render pays for."""
    return any(state in LOOKED_UP for state in classified.states)


def stored(found: Front, url: str | None) -> Front:
    """`found`, with what the shared store at `url` holds counted (`with_store`); the store
    is opened only when there is something to ask it."""
    if url is None or not asks_store(found.classified):
        return found
    assert not found.plan.reused  # (a plan read back is never the one the store is asked of)
    with shared_store(url) as shared:
        return replace(found, classified=with_store(found.classified, shared))


@contextlib.contextmanager
def shared_store(url: str | None) -> Iterator[SharedStore | None]:
    """The shared store at `url`, for `plan` and `status`; None without a URL. Its backend
    is imported only then."""
    if url is None:
        yield None
        return
    from fluxbatch.state.shared import SharedStore

    store = SharedStore.open(url)  # (no request yet: `with_store` checks it when it asks)
    try:
        yield store
    finally:
        store.close()


def with_store(classified: Classified, store: SharedStore | None) -> Classified:
    """`classified`, with what the shared store holds for the images `render` would pay for:
    a key it has a record of is *stored* (placed from it, at no cost); one that another run
    claimed is *in-flight* (its image or task is collected, at no cost), or *unknown* when
    that run recorded no task. Only those keys are looked up: one request each."""
    if store is None:
        return classified
    from fluxbatch.state.shared import Claim, Record

    looked = [(position, job) for position, (job, state) in
              enumerate(zip(classified.plan.jobs, classified.states, strict=True))
              if state in LOOKED_UP]
    if not looked:
        return classified
    store.check(create=False)
    found = store.lookup_many({job.key for _, job in looked})
    states = list(classified.states)
    reasons = dict(classified.reasons)
    for position, job in looked:
        entry = found.get(job.key)
        if isinstance(entry, Record):
            states[position] = ImageState.STORED
            reasons[job.index] = f"in the shared store {store.url}: placed from it at no cost"
        elif isinstance(entry, Claim):
            silent = not entry.task_id
            states[position] = ImageState.UNKNOWN if silent else ImageState.IN_FLIGHT
            reasons[job.index] = f"claimed in the shared store by {entry.describe()}" + (
                ", which recorded no task yet: it may have been billed" if silent else
                ": `fluxbatch render` collects its image, at no cost")
    return replace(classified, states=tuple(states), reasons=reasons)


def escape_problems(plan: Plan) -> list[Problem]:
    """Outputs that a symbolic link (a linked directory on the way, or a link where the file
    goes) would send outside the output root, or into its state directory. Each folder is
    resolved and listed once; only a name that is there, as a link, is looked at again."""
    root = os.fspath(plan.recipe.output_root)
    real_root = os.path.realpath(root)
    folders: dict[str, tuple[str | None, frozenset[str]]] = {}
    problems = []
    for job in plan.jobs:
        parent, _, name = job.output.rpartition("/")  # (an output path is written with /)
        known = folders.get(parent)
        if known is None:
            folder = os.path.join(root, parent)
            known = folders[parent] = (link_problem(real_root, folder), links_in(folder))
        problem, links = known
        if problem is None and (name in links):
            problem = link_problem(real_root, os.path.join(root, job.output))
        if problem is None:
            continue
        spec = plan.recipe.job(job.job)
        problems.append(plan.recipe.problem(("jobs", spec.index, "output"),
                                            f"output path {job.output!r} {problem}"))
    return problems
