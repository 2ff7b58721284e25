"""`fluxbatch validate RECIPE...`: report every problem of every recipe, then exit 0 or 1."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from fluxbatch.errors import EXIT_FAILED, EXIT_OK, PlanTooLargeError, Problem, RecipeError
from fluxbatch.front import load_plan
from fluxbatch.jobs import Plan
from fluxbatch.models import floating


def print_notes(plan: Plan, also: Iterable[Problem] = ()) -> None:
    """What works, but not as the recipe reads: located like a problem, marked as a note."""
    for note in (*plan.notes, *also):
        where, _, rest = str(note).partition(": ")
        print(f"{where}: note: {rest}", file=sys.stderr)


def validate(*, recipes: list[str], yes: bool = False) -> int:
    failed = 0
    for path in recipes:
        try:
            plan = load_plan(path, yes=yes)
        except RecipeError as error:
            failed += 1
            for problem in error.problems:
                print(problem, file=sys.stderr)
            count = len(error.problems)
            print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
            continue
        except PlanTooLargeError as error:
            failed += 1
            print(error, file=sys.stderr)
            continue
        jobs = len(plan.jobs)
        model_names = sorted({job.model for job in plan.jobs})
        print_notes(plan, plan.include_notes())
        for model in model_names:
            why = floating(model)
            if why is not None:
                print(f"{path}: note: {model} is not reproducible: the provider may change this "
                      f"model ({why}); its images are recorded with pinned: false",
                      file=sys.stderr)
        print(f"{path}: ok ({jobs} image{'s' if jobs != 1 else ''}; {', '.join(model_names)})")
    return EXIT_FAILED if failed else EXIT_OK
