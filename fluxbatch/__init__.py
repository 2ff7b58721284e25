"""fluxbatch: a declarative, make-style batch renderer for the Flux image APIs.

The Python API (see `fluxbatch.api` for a tour):

- `load(path) -> Recipe`: read and check a recipe; `RecipeError.problems` lists every problem.
- `plan(recipe_or_path) -> Planned`: the images, each with its key, seed, output, request and
  state, read against the output root (nothing written or sent).
- `render(recipe_or_path, ..., stop=StopHandle()) -> Report`, `await arender(...)`: make
  what is missing; a `StopHandle` stops it from another thread, as Ctrl-C does.

Their vocabularies are string enums (`StrEnum`: each member equals its string, as it
appears in `--json` output): `ImageState` (`PlannedJob.state`), `Action`
(`PlannedJob.action`), `OutcomeStatus` (`Outcome.status`) and `EventKind` (with
`OutcomeStatus`, `Event.kind`).

These names, and the types they return or raise, are the stable surface; every other module
is internal. Importing `fluxbatch` loads none of them until one is used, so the command line
starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluxbatch.version import __version__

__all__ = [
    "Action",
    "BudgetOutcome",
    "ConfigError",
    "Event",
    "EventKind",
    "FluxbatchError",
    "ImageState",
    "Job",
    "Outcome",
    "OutcomeStatus",
    "Planned",
    "PlannedJob",
    "Polled",
    "Problem",
    "Recipe",
    "RecipeError",
    "Report",
    "StateError",
    "StopHandle",
    "Submitted",
    "Written",
    "__version__",
    "arender",
    "load",
    "plan",
    "render",
]

if TYPE_CHECKING:
    from fluxbatch.api import (
        Action,
        Planned,
        PlannedJob,
        StopHandle,
        arender,
        load,
        plan,
        render,
    )
    from fluxbatch.errors import ConfigError, FluxbatchError, Problem, RecipeError, StateError
    from fluxbatch.jobs import Job
    from fluxbatch.money import BudgetOutcome
    from fluxbatch.outcomes import Event, EventKind, Outcome, OutcomeStatus, Written
    from fluxbatch.providers import Polled, Submitted
    from fluxbatch.recipe import Recipe
    from fluxbatch.selection import ImageState
    from fluxbatch.session import Report

_WHERE = {
    "Action": "fluxbatch.api", "Planned": "fluxbatch.api", "PlannedJob": "fluxbatch.api",
    "arender": "fluxbatch.api", "load": "fluxbatch.api", "plan": "fluxbatch.api",
    "render": "fluxbatch.api", "StopHandle": "fluxbatch.api", "ConfigError": "fluxbatch.errors",
    "FluxbatchError": "fluxbatch.errors", "Problem": "fluxbatch.errors",
    "RecipeError": "fluxbatch.errors", "StateError": "fluxbatch.errors",
    "Event": "fluxbatch.outcomes", "Outcome": "fluxbatch.outcomes",
    "EventKind": "fluxbatch.outcomes", "OutcomeStatus": "fluxbatch.outcomes",
    "Written": "fluxbatch.outcomes", "Job": "fluxbatch.jobs",
    "BudgetOutcome": "fluxbatch.money", "Polled": "fluxbatch.providers",
    "Submitted": "fluxbatch.providers",
    "Recipe": "fluxbatch.recipe", "ImageState": "fluxbatch.selection",
    "Report": "fluxbatch.session",
}


def __getattr__(name: str) -> Any:
    """The public names, each imported when first used (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fluxbatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
