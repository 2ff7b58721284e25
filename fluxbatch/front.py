"""The front half that every command reading a recipe against its output root shares, and
the Python API with them: load → expand → check the outputs' links → read the root's state
→ classify.

    plan = load_plan("recipe.yaml")       # or plan_of(recipe): a Recipe already loaded
    front = read(plan)                    # the root's state, and each image's
    front.classified.states, front.state

`plan`, `status`, `gallery` and `fluxbatch.plan` call `front(...)` (both halves); `render`,
`clean`, `merge` and `validate` call `load_plan` and read the state under the root's lock
themselves (`session`, `clean`, `merge`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fluxbatch import recipe as recipes
from fluxbatch.errors import Problem, RecipeError
from fluxbatch.expand import Plan, expand
from fluxbatch.layout import link_problem, links_in
from fluxbatch.recipe import Recipe
from fluxbatch.selection import Classified, classify
from fluxbatch.state.root import RootState, read_state

RecipeSource = Recipe | str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class Front:
    """A plan read against its output root: the root's state, and each image's."""

    plan: Plan
    state: RootState
    classified: Classified


def load_plan(source: RecipeSource, *, out: str | os.PathLike[str] | None = None,
              yes: bool = False, verify: bool = False) -> Plan:
    """Load (unless `source` is a `Recipe` already), expand, and check that no output path
    escapes the output root via a symlink. `out` overrides the recipe's output root, `yes`
    accepts a plan over its `max_jobs`, `verify` hashes every image input again (see
    `recipe.load`). Raises `RecipeError` (every problem at once) or `PlanTooLargeError`."""
    if isinstance(source, Recipe):
        if out is not None:
            raise ValueError("out= applies to a recipe path; load(path, out=...) for a Recipe")
        return plan_of(source, yes=yes)
    loaded = recipes.load(source, output_root=None if out is None else os.fspath(out),
                          strict=False, verify=verify)
    return plan_of(loaded, yes=yes)


def plan_of(recipe: Recipe, *, yes: bool = False) -> Plan:
    """Expand a loaded recipe, and check its outputs' links."""
    plan = expand(recipe, yes=yes)
    problems = escape_problems(plan)
    if problems:
        raise RecipeError(problems)
    return plan


def read(plan: Plan, *, verify: bool = False) -> Front:
    """The root's state (read, never changed), and each image's against it."""
    recipe = plan.recipe
    state = read_state(recipe.output_root, recipe.name, plan.jobs)
    return Front(plan, state, classify(plan, state, verify=verify))


def front(source: RecipeSource, *, out: str | os.PathLike[str] | None = None,
          yes: bool = False, verify: bool = False) -> Front:
    """The whole front half: `load_plan`, then `read`."""
    return read(load_plan(source, out=out, yes=yes, verify=verify), verify=verify)


def escape_problems(plan: Plan) -> list[Problem]:
    """Outputs that a symbolic link (a linked directory on the way, or a link where the file
    goes) would send outside the output root, or into its state directory. Each folder is
    resolved and listed once; only a name that is there, as a link, is looked at again."""
    root = os.fspath(plan.recipe.output_root)
    real_root = os.path.realpath(root)
    folders: dict[str, tuple[str | None, frozenset[str]]] = {}
    problems = []
    for job in plan.jobs:
        parent, name = os.path.split(job.output)
        known = folders.get(parent)
        if known is None:
            folder = os.path.join(root, parent)
            known = folders[parent] = (link_problem(real_root, folder), links_in(folder))
        problem, links = known
        if problem is None and name in links:
            problem = link_problem(real_root, os.path.join(root, job.output))
        if problem is None:
            continue
        spec = plan.recipe.job(job.job)
        problems.append(plan.recipe.problem(("jobs", spec.index, "output"),
                                            f"output path {job.output!r} {problem}"))
    return problems
