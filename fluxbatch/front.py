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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from fluxbatch import plan_cache
from fluxbatch import recipe as recipes
from fluxbatch.errors import Problem, RecipeError
from fluxbatch.jobs import Plan
from fluxbatch.layout import link_problem, links_in
from fluxbatch.recipe import Recipe
from fluxbatch.selection import Classified, ImageState, classify
from fluxbatch.state.root import RootState, read_state

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
          yes: bool = False, verify: bool = False, reuse: bool = False) -> Front:
    """The whole front half: `load_plan`, then `read`. A plan read back from the cache
    stands only if it finds every image up to date, and none orphaned."""
    plan = load_plan(source, out=out, yes=yes, verify=verify, reuse=reuse)
    found = read(plan, verify=verify)
    if plan.reused and not all_up_to_date(found.classified):
        found = read(fresh(plan), verify=verify)
    return found


def all_up_to_date(classified: Classified) -> bool:
    up_to_date = ImageState.UP_TO_DATE
    return not classified.orphans and all(state == up_to_date for state in classified.states)


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
