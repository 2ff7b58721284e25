"""YAML documents that remember where every value came from.

`load(text, filename)` returns the plain Python value plus a `Positions` table mapping each
path (`("jobs", 0, "params", "width")`) to the 1-based line and column of its node, so every
later error can say `recipe.yaml:14:9`. Two deliberate differences from `yaml.safe_load`:

- duplicate mapping keys are an error (PyYAML silently keeps the last one);
- only `true`/`false` are booleans (YAML 1.2): `on`, `no`, `y` stay strings, so a matrix of
  country codes or answers does not turn into booleans behind the user's back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from fluxbatch.errors import Problem

Path = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


@dataclass
class Positions:
    """Where each value (and each mapping key) of a document starts."""

    file: str
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def of(self, path: Path, *, key: bool = False) -> tuple[int | None, int | None]:
        """The position of `path`, or of its nearest ancestor that has one."""
        table = self.keys if key else self.values
        probe = path
        while probe:
            if probe in table:
                return table[probe]
            if probe in self.values:
                return self.values[probe]
            probe = probe[:-1]
        return self.values.get((), (None, None))

    def problem(self, path: Path, message: str, *, key: bool = False) -> Problem:
        line, column = self.of(path, key=key)
        return Problem(self.file, line, column, format_path(path), message)


def format_path(path: Path) -> str:
    """`("jobs", 0, "params", "width")` → `jobs[0].params.width`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def load(text: str, filename: str) -> tuple[Any, Positions]:
    """Parse one YAML document; raise `DocumentError` with a located problem on bad syntax."""
    positions = Positions(filename)
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        raise DocumentError([_syntax_problem(error, filename)]) from None
    except yaml.YAMLError as error:
        raise DocumentError([Problem(filename, None, None, "", f"YAML error: {error}")]) from None
    if node is None:
        return None, positions
    builder = _Builder(positions)
    value = builder.build(node, ())
    if builder.problems:
        raise DocumentError(builder.problems)
    return value, positions


class DocumentError(Exception):
    """The text is not a well-formed YAML document (syntax, duplicate keys, bad tags)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _syntax_problem(error: yaml.MarkedYAMLError, filename: str) -> Problem:
    mark = error.problem_mark or error.context_mark
    problem = error.problem or "invalid YAML"
    if error.context and error.context_mark is not None and error.context_mark != mark:
        problem = f"{problem} ({error.context} at line {error.context_mark.line + 1})"
    line = mark.line + 1 if mark else None
    column = mark.column + 1 if mark else None
    return Problem(filename, line, column, "", f"YAML syntax error: {problem}")


class _Builder:
    def __init__(self, positions: Positions) -> None:
        self.positions = positions
        self.constructor = _Loader("")
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.positions.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as error:
            self.problems.append(self.positions.problem(path, f"YAML error: {error}"))
            return None

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        self.constructor.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.build(key_node, (*path, "<key>"))
            if isinstance(key, list | dict):
                self.problems.append(self.positions.problem(path, "a mapping key must be a scalar"))
                continue
            if not isinstance(key, str):
                key = str(key) if key is not None else "null"
            child = (*path, key)
            self.positions.keys[child] = (
                key_node.start_mark.line + 1,
                key_node.start_mark.column + 1,
            )
            if key in result:
                self.problems.append(
                    self.positions.problem(child, f"duplicate key {key!r}", key=True)
                )
            result[key] = self.build(value_node, child)
        self.positions.values.pop((*path, "<key>"), None)
        return result
