"""YAML documents that remember where every value came from.

`load(text, filename)` returns the plain Python value plus a `Positions` table mapping each
path (`("jobs", 0, "params", "width")`) to the 1-based line and column of its node, so every
later error can say `recipe.yaml:14:9`. Deliberate differences from `yaml.safe_load`:

- duplicate mapping keys are an error (PyYAML silently keeps the last one);
- only `true`/`false` are booleans (YAML 1.2): `on`, `no`, `y` stay strings, so a matrix of
  country codes or answers does not turn into booleans behind the user's back;
- no YAML 1.1 base-60 numbers or implicit dates: `16:9` is an aspect ratio, not 969, and
  `2024-05-01` is text;
- only JSON values: a tag that makes bytes or dates, or a string holding an unpaired
  surrogate, is an error rather than something no request body can carry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import yaml

from fluxbatch.errors import Problem

Path = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and numbers, and no implicit dates."""


_FastLoader: type[yaml.CSafeLoader] | None = None
if yaml.__with_libyaml__:
    class _CLoader(yaml.CSafeLoader):
        """libyaml's parser with `_Loader`'s resolver (set below)."""

    _FastLoader = _CLoader

_YAML_11_TYPES = frozenset(f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp"))
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_TYPES]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
# PyYAML's own patterns without the base-60 forms (`[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+`).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)
if _FastLoader is not None:
    _FastLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers

MAX_NODES = 1_000_000  # aliases can make a short text expand without end ("billion laughs")
_JSON_SCALARS = (str, int, float, bool, type(None))
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def load(text: str, filename: str) -> tuple[object, Positions]:
    """Parse one YAML document; raise `DocumentError` with a located problem on bad syntax."""
    positions = Positions(filename)
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as error:
        raise DocumentError([_syntax_problem(error, filename)]) from None
    except yaml.YAMLError as error:
        raise DocumentError([Problem(filename, None, None, "", f"YAML error: {error}")]) from None
    except RecursionError:
        raise DocumentError([_too_deep(filename)]) from None
    if node is None:
        return None, positions
    # (merges are the only reason to tell written keys from others: without any, skip the
    # walk; a merge is written `<<`, or tagged `merge`, perhaps %-escaped)
    merges = "<<" in text or "merge" in text or "%" in text
    builder = _Builder(positions, _written_keys(node) if merges else None)
    try:
        value = builder.build(node, ())
    except RecursionError:
        raise DocumentError([_too_deep(filename)]) from None
    except _TooLarge:
        message = f"YAML error: the document expands to more than {MAX_NODES:,} values (aliases?)"
        raise DocumentError([Problem(filename, None, None, "", message)]) from None
    if builder.damage:
        raise DocumentError([d.problem for d in builder.damage], (value, positions, builder.damage))
    return value, positions


# Where libyaml and PyYAML's Python parser part ways: tabs (libyaml takes them inside plain
# scalars), byte order marks inside the text, and the positions of an empty key or value
# after `?` (and of an empty document). Texts with any of them are read by the Python
# parser alone.
_PYTHON_ONLY = re.compile(r"[\t\ufeff]|\?(?:\s|$)")


def _compose(text: str) -> yaml.Node | None:
    """The document's node graph: read by libyaml when PyYAML has it (four times faster: a
    1 MB recipe took 4.5 s in Python), else by PyYAML's Python parser. The two build the
    same nodes with the same resolver (a test compares them on generated texts), except on
    what `_PYTHON_ONLY` finds; and when libyaml finds any problem, the Python parser reads
    the text again, so each problem is worded (and judged) as it always was."""
    if _FastLoader is not None and _PYTHON_ONLY.search(text) is None:
        try:
            fast = _FastLoader(text)
            try:
                node = fast.get_single_node()
            finally:
                fast.dispose()
            if not (isinstance(node, yaml.ScalarNode) and node.value == ""):
                return node  # (an empty document's position is the Python parser's to say)
        except Exception:
            pass  # (the Python parser says what it is)
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


class Damage(NamedTuple):
    """A problem in one key or value of a document that was still read to the end."""

    path: Path
    problem: Problem
    # The value at `path` is one the text holds (a duplicate key's last value), usable as is;
    # otherwise it is a stand-in that nothing should be checked against.
    kept: bool = False


class DocumentError(Exception):
    """The text is not a well-formed YAML document (syntax, duplicate keys, bad tags).

    `partial` is set when the text was still read to the end (the problems are in single
    keys or values): the document, its positions, and the damage, so the recipe stage can
    report its own problems in the same run.
    """

    def __init__(self, problems: list[Problem],
                 partial: tuple[object, Positions, list[Damage]] | None = None) -> None:
        self.problems = problems
        self.partial = partial
        super().__init__("\n".join(str(p) for p in problems))


class _TooLarge(Exception):
    pass


def _too_deep(filename: str) -> Problem:
    return Problem(filename, None, None, "", "YAML error: the document is nested too deeply")


def _syntax_problem(error: yaml.MarkedYAMLError, filename: str) -> Problem:
    mark = error.problem_mark or error.context_mark
    problem = error.problem or "invalid YAML"
    if error.context and error.context_mark is not None and error.context_mark != mark:
        if problem.startswith("but "):  # one sentence, split in two by PyYAML
            problem = f"{error.context}, {problem}"
        else:
            problem = f"{problem} ({error.context} at line {error.context_mark.line + 1})"
    line = mark.line + 1 if mark else None
    column = mark.column + 1 if mark else None
    return Problem(filename, line, column, "", f"YAML syntax error: {problem}")


_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"


def _written_keys(root: yaml.Node) -> dict[int, frozenset[int]]:
    """For each mapping node, the ids of the key nodes written in it — before `<<` merges
    (which change the nodes in place) add others that its own keys may override."""
    written: dict[int, frozenset[int]] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            written[id(node)] = frozenset(id(k) for k, _ in node.value if k.tag != _MERGE)
            stack.extend(child for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return written


class _Builder:
    def __init__(self, positions: Positions, written: dict[int, frozenset[int]] | None) -> None:
        self.positions = positions
        self.written = written
        self.constructor = _Loader("")
        self.damage: list[Damage] = []
        self.building: set[int] = set()  # ids of the collections being built (alias cycles)
        self.nodes = 0

    def problem(self, path: Path, message: str, *, key: bool = False, kept: bool = False) -> None:
        self.damage.append(Damage(path, self.positions.problem(path, message, key=key), kept))

    def build(self, node: yaml.Node, path: Path) -> object:
        self.positions.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if id(node) in self.building:
            self.problem(path, "YAML error: an alias refers to a collection that contains it")
            return None
        self.building.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.building.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> object:
        if node.tag == _STR:  # (what the constructor would make of it, without its set-up)
            value = node.value
            if _SURROGATE.search(value) is None:
                return value
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as error:
            self.problem(path, f"YAML error: {error.problem or error.context}")
            return node.value
        except Exception:  # a tag's constructor fails in its own ways (`!!int abc`)
            self.problem(path, f"YAML error: {node.value!r} is not a valid {tag} value")
            return node.value
        if not isinstance(value, _JSON_SCALARS):
            self.problem(path, f"YAML error: {tag} values are not supported; use a string")
            return node.value
        if isinstance(value, str) and _SURROGATE.search(value):
            self.problem(path, f"YAML error: {value!r} contains an unpaired surrogate, "
                         "which is not a character")
            return _SURROGATE.sub("\ufffd", value)
        return value

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[object, object]:
        try:
            self.constructor.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        except yaml.MarkedYAMLError as error:
            self.problem(path, f"YAML error: {error.problem or error.context}")
            return {}
        result: dict[object, object] = {}
        written = None if self.written is None else self.written.get(id(node), frozenset())
        own: set[str] = set()
        for key_node, value_node in node.value:
            key = self.build(key_node, (*path, "<key>"))
            if isinstance(key, list | dict):
                self.problem(path, "a mapping key must be a scalar", kept=True)  # (entry left out)
                continue
            if not isinstance(key, str):
                key = str(key) if key is not None else "null"
            child = (*path, key)
            self.positions.keys[child] = (
                key_node.start_mark.line + 1,
                key_node.start_mark.column + 1,
            )
            if written is None or id(key_node) in written:  # (a merged key may be overridden)
                if key in own:
                    self.problem(child, f"duplicate key {key!r}", key=True, kept=True)
                own.add(key)
            result[key] = self.build(value_node, child)
        self.positions.values.pop((*path, "<key>"), None)
        return result
