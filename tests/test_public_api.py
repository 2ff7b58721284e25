"""The public API leaks nothing: every type a user can reach from a name in
`fluxbatch.__all__` (a field, an attribute, a property, a method's or a function's result
or argument) is exported from `fluxbatch` too, or is not fluxbatch's (builtins, the
standard library, typing, httpx). A type of fluxbatch's that is reachable but not exported
is a leak: a user holds a value whose type the documentation cannot name."""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import sys
import typing
from collections.abc import Iterator
from typing import Any

import fluxbatch

# Reachable today and not exported, each to be closed: the test fails when one is added,
# and when one is closed and still listed (so that this list only shrinks).
KNOWN_LEAKS = frozenset({
    # `Job.combination`: the matrix row an image came from (`explain` reads it).
    "Job.combination -> fluxbatch.matrix.Combination",
    # `Recipe`: the typed recipe. Its nested specs are the declaration's classes.
    "Recipe.catalogue -> fluxbatch.project_models.ProjectCatalogue",
    "Recipe.inputs -> fluxbatch.inputs.Inputs",
    "Recipe.job -> fluxbatch.recipe_schema.JobSpec",
    "Recipe.jobs -> fluxbatch.recipe_schema.JobSpec",
    "Recipe.positions -> fluxbatch.yamlsource.Positions",
    "Recipe.provider -> fluxbatch.recipe_schema.ProviderSpec",
    # `Report.selection`: what the render decided for each image (the CLI's summary).
    "Report.selection -> fluxbatch.selection.Selection",
})


def _namespace(module_name: str) -> dict[str, Any]:
    """The module's globals, plus the names it imports only for type checkers."""
    module = sys.modules[module_name]
    names = dict(vars(module))
    source = inspect.getsource(module)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                    "typing.TYPE_CHECKING"):
            block = ast.Module(body=node.body, type_ignores=[])
            exec(compile(block, module.__file__ or module_name, "exec"), names)
    return names


def _hints(thing: Any, module_name: str) -> dict[str, Any]:
    return typing.get_type_hints(thing, globalns=_namespace(module_name))


def _classes(annotation: Any) -> Iterator[type]:
    """Every class named in an annotation (`X | None`, `tuple[X, ...]`, `Callable[[X], Y]`)."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        yield annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, list):
            for each in arg:
                yield from _classes(each)
        else:
            yield from _classes(arg)
    origin = typing.get_origin(annotation)
    if isinstance(origin, type):
        yield origin


def _reachable(name: str, thing: Any) -> Iterator[tuple[str, Any]]:
    """(where, annotation) for each public annotation of an exported name."""
    if inspect.isfunction(thing):
        for where, annotation in _hints(thing, thing.__module__).items():
            yield f"{name}({where})" if where != "return" else f"{name}()", annotation
        return
    if not isinstance(thing, type) or issubclass(thing, enum.Enum):
        return
    for owner in reversed(thing.__mro__):
        if not owner.__module__.startswith("fluxbatch"):
            continue
        for attr, annotation in _hints(owner, owner.__module__).items():
            if not attr.startswith("_"):
                yield f"{name}.{attr}", annotation
        for attr, member in vars(owner).items():
            if attr.startswith("_"):
                continue
            function = member.fget if isinstance(member, property) else member
            if isinstance(function, (staticmethod, classmethod)):
                function = function.__func__
            if inspect.isfunction(function):
                hints = _hints(function, owner.__module__)
                if "return" in hints:
                    yield f"{name}.{attr}", hints["return"]


def _leaks() -> set[str]:
    exported = {id(getattr(fluxbatch, name)) for name in fluxbatch.__all__}
    found = set()
    for name in fluxbatch.__all__:
        for where, annotation in _reachable(name, getattr(fluxbatch, name)):
            for cls in _classes(annotation):
                if cls.__module__.startswith("fluxbatch") and id(cls) not in exported:
                    found.add(f"{where} -> {cls.__module__}.{cls.__qualname__}")
    return found


def test_every_type_reachable_from_the_public_names_is_exported() -> None:
    leaks = _leaks()
    assert leaks - KNOWN_LEAKS == set(), "reachable but not exported from fluxbatch"
    assert KNOWN_LEAKS - leaks == set(), "closed: take them off KNOWN_LEAKS"


def test_the_walk_finds_a_leak_and_reads_names_imported_for_type_checkers() -> None:
    # The walk must see through `X | None` and `tuple[X, ...]`, and resolve names a module
    # imports under `TYPE_CHECKING` (`Event.job`'s `Job`), or it would pass by missing all.
    hints = _hints(fluxbatch.Event, "fluxbatch.outcomes")
    assert list(_classes(hints["job"])) == [fluxbatch.Job]
    assert fluxbatch.Written in set(_classes(_hints(fluxbatch.Outcome,
                                                    "fluxbatch.outcomes")["written"]))
    assert any(leak.startswith("Report.selection ->") for leak in _leaks())


def test_every_exported_class_and_its_public_fields_are_documented() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs/api.md").read_text(encoding="utf-8")
    for name in fluxbatch.__all__:
        assert f"`{name}`" in page or f"`{name}(" in page, name
        thing = getattr(fluxbatch, name)
        # (`Recipe`'s fields are the recipe's keys: docs/recipes.md documents them)
        if dataclasses.is_dataclass(thing) and isinstance(thing, type) \
                and thing is not fluxbatch.Recipe:
            for each in dataclasses.fields(thing):
                if not each.name.startswith("_"):
                    assert f"`{each.name}`" in page or f".{each.name}`" in page, \
                        f"{name}.{each.name}"


