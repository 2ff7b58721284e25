"""Stage 2's product: a `Plan` of frozen `Job`s, and the guard on its size. `expand` makes
plans; this module, light to import (no template engine), is what every later stage reads,
and what the plan cache (`plan_cache`) rebuilds a plan with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fluxbatch import matrix as matrix_rules
from fluxbatch.errors import PlanTooLargeError, Problem, RecipeError
from fluxbatch.recipe import JobSpec, Recipe


@dataclass(frozen=True, slots=True)
class Job:
    """One image to make. `key` identifies its pixels: same key, same image."""

    index: int
    job: str
    vars: Mapping[str, object]
    replicate: int
    model: str
    request: Mapping[str, object]
    seed: int
    key: str
    output: str
    combination: matrix_rules.Combination

    @property
    def prompt(self) -> str | None:
        prompt = self.request.get("prompt")
        return prompt if isinstance(prompt, str) else None


@dataclass(frozen=True, slots=True)
class Memo:
    """What a plan was made from, so that the next run of an unchanged recipe can reuse it
    (`plan_cache`): `basis`, the digest of everything loading the recipe read; `expanded`,
    the image inputs expansion looked at (as named, and their sha256). `reused`: this plan
    was read back, not expanded (it may only find that nothing needs doing)."""

    basis: str
    loaded: int  # how many of the project's files read (`Project.consulted`) loading read
    expanded: tuple[tuple[str, str], ...]
    reused: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    recipe: Recipe
    jobs: tuple[Job, ...]
    removed: tuple[tuple[str, matrix_rules.Removed], ...]
    # What works, but not as the recipe reads (a `.png` written as `.jpg`): said, not refused.
    notes: tuple[Problem, ...] = ()
    memo: Memo | None = None

    @property
    def reused(self) -> bool:
        """Read back from the plan cache, not expanded: trusted only to find that every
        image is up to date (see `plan_cache`)."""
        return self.memo is not None and self.memo.reused

    def include_notes(self) -> list[Problem]:
        """The include entries that name a value their variable does not have: each adds a
        combination of its own, which may be meant or a typo (see `matrix.new_includes`).
        Said by `validate`, and by `plan --explain` under the combination; not by every
        render."""
        return [self.recipe.problem(("jobs", spec.index, "matrix", "include", index),
                                    f"fits no combination, so it adds one of its own: {why}")
                for spec in self.recipe.jobs if spec.matrix.loaded
                for index, why in matrix_rules.new_includes(spec.matrix)]

    def explain(self, job: Job) -> str:
        spec = self.recipe.job(job.job)
        return matrix_rules.explain(job.combination, spec.matrix.axes)


def count_upper_bound(recipe: Recipe) -> int:
    return sum(matrix_rules.upper_bound(s.matrix) * s.replicates for s in _built(recipe))


def _built(recipe: Recipe) -> list[JobSpec]:
    return [spec for spec in recipe.jobs if not spec.damaged]


# The most images a recipe's own `max_jobs` can allow (about $4,000 of images, and a few
# hundred MB to plan); a larger plan needs `--yes` from the operator.
MAX_JOBS_CEILING = 100_000


def guard_size(recipe: Recipe) -> None:
    """Refuse a plan over `max_jobs` before building it (a typo can make it enormous). A
    recipe may raise its own limit only as far as MAX_JOBS_CEILING: it may come from a pull
    request, and a plan of a hundred million images would fill any machine's memory."""
    limit = min(recipe.max_jobs, MAX_JOBS_CEILING)
    bound = count_upper_bound(recipe)
    if bound <= limit:
        return
    if bound <= 50 * limit:
        total = sum(len(matrix_rules.combinations(s.matrix)[0]) * s.replicates
                    for s in _built(recipe) if not s.matrix.too_costly)
        if total <= limit:
            return
        count = f"{total:,} images"
    else:
        count = f"up to {bound:,} images"
    if limit < recipe.max_jobs:
        message = (f"the plan has {count}, more than the {limit:,} that a recipe's max_jobs "
                   "may allow; pass --yes on the command line to go ahead")
    else:
        message = (f"the plan has {count}, more than the recipe's limit of {limit:,} (max_jobs); "
                   "pass --yes to go ahead, or raise max_jobs in the recipe")
    if recipe.problems:  # one problem among several: report them all
        raise RecipeError([*recipe.problems, Problem(str(recipe.path), None, None, "", message)])
    raise PlanTooLargeError(f"{recipe.path}: {message}")
