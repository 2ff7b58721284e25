"""A small declaration of JSON-shaped data, read into typed objects.

A frozen dataclass whose fields are made with `key(...)` declares a mapping: each field names
its key's `Kind` (a string, an integer, a list of..., another such class), its description
and default. From that one declaration come

- the JSON Schema an editor reads (`schema_of`),
- the check of a document, every problem collected in one run, located and worded as
  jsonschema words them (`Reading`; "0 is less than the minimum of 1"), and
- the typed objects the rest of the program reads (`Reading.read`).

Why not pydantic, msgspec or cattrs: see "Dependencies" in docs/design.md (in short, start-up
time, and problems collected with their paths).

A value with a problem is *condemned*. A class declared `salvage=True` keeps going: each
condemned field takes its default (or, for `as_text` fields, the text of what was written),
and what that costs is added up (`Cost`), so that everything else is still checked in the same
run. A class without it is condemned as a whole by any problem inside it, and so is a list or
a mapping, unless it says what becomes of a condemned item (`salvage=` of `ListOf`, `MapOf`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from fluxbatch.errors import Problem
from fluxbatch.jsontypes import JSON, JSONObject
from fluxbatch.yamlsource import Path, Positions


class Cost(enum.Flag):
    """What a condemned value costs the recipe, beyond the problem that says why."""

    NOTHING = 0
    IMAGES = enum.auto()  # its job is still checked, but no image is built from it
    MODEL = enum.auto()  # its job's model is unknown: nothing model-specific can be checked
    NAMES = enum.auto()  # some variable names are unknown: none can be called undefined
    OUTPUT = enum.auto()  # the recipe's output template: the jobs that use it build nothing


class _Bad:
    def __repr__(self) -> str:
        return "BAD"


BAD: Any = _Bad()  # what reading a condemned value returns (its problem is recorded)
_MISSING: Any = object()
_KEY = "fluxbatch.key"


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One field of a declared class: the key it is read from, and what a problem costs."""

    kind: Kind
    name: str  # the key in the document ("from" for the field `source`)
    description: str | None
    default: JSON  # shown in the schema (_MISSING: none shown)
    required: bool
    cost: Cost  # of a condemned value (to a class that salvages)
    as_text: bool  # condemned, it still reads as the text of what was written
    fatal: bool  # condemned, nothing of the document is usable


def key(kind: Kind, description: str | None = None, *, default: object = None,
        factory: Callable[[], object] | None = None, show: JSON = _MISSING, required: bool = False,
        cost: Cost = Cost.IMAGES, as_text: bool = False, fatal: bool = False,
        name: str | None = None) -> Any:
    """A declared field. Its default (`default`, or `factory()`) is what a missing or condemned
    value becomes, even for a `required` key (whose absence is a problem all the same); `show`
    is the default the schema shows (editors offer it)."""
    spec = Key(kind, name or "", description, show, required, cost, as_text, fatal)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: spec})
    return dataclasses.field(default=default, metadata={_KEY: spec})


def derived(default: object = None, *, factory: Callable[[], object] | None = None) -> Any:
    """A field that no key sets: the program fills it in after reading."""
    if factory is not None:
        return dataclasses.field(default_factory=factory)
    return dataclasses.field(default=default)


# -- one run over a document ------------------------------------------------------------------


class Reading:
    """Reads one document: collects its problems and what condemned values cost."""

    def __init__(self, positions: Positions, damaged: frozenset[Path] = frozenset()) -> None:
        self.positions = positions
        self.damaged = damaged  # values the YAML reader could not read (already reported)
        self.problems: list[Problem] = []
        self.faults = 0  # problems found, said or not (a quiet reading says none)
        self.cost = Cost.NOTHING
        self.quiet = 0

    def read(self, kind: Kind, value: object, path: Path) -> Any:
        """`value` as `kind`'s typed value, or BAD."""
        result = kind.read(value, path, self)
        if self.damaged and path in self.damaged and not kind.costed_whole:
            return BAD  # (a stand-in for what the text held: checked, but never used)
        return result

    def fault(self, path: Path, message: str, *, key: bool = False) -> None:
        self.faults += 1
        if not self.quiet:
            self.problems.append(self.positions.problem(path, message, key=key))

    def damaged_below(self, path: Path) -> bool:
        size = len(path)
        return any(damaged[:size] == path for damaged in self.damaged)

    @contextmanager
    def quietly(self) -> Iterator[None]:
        """Try a value without reporting anything (which branch of an `AnyOf` fits)."""
        cost = self.cost
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1
            self.cost = cost


# -- kinds ------------------------------------------------------------------------------------

_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
    "boolean": bool, "null": type(None),
}


def is_type(value: object, kind: str) -> bool:
    """JSON Schema's types: a boolean is no number, and 2.0 is an integer."""
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[kind])


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


class Kind:
    """What a value may be. `types` are its JSON types (none: any), used to tell which
    branch of an `AnyOf` a value was meant for; `noun` names it in "expected ..."."""

    types: tuple[str, ...] = ()
    ref: str | None = None  # the schema shows it once, under $defs
    costed_whole = False  # it takes the cost of a damaged stand-in itself (a job)
    description: str | None = None
    required: tuple[str, ...] = ()

    _noun: str | None = None  # (given, else made from its type)

    @property
    def noun(self) -> str:
        if self._noun is not None:
            return self._noun
        return {"object": "a mapping", "array": "a list"}.get(self.types[0], _a(self.types[0])) \
            if self.types else "a value"

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        raise NotImplementedError

    def converted(self, convert: Callable[[Any], Any]) -> Converted:
        return Converted(self, convert)

    def own_schema(self, defs: JSONObject) -> JSONObject:
        raise NotImplementedError

    def schema(self, defs: JSONObject) -> JSONObject:
        if self.ref is None:
            return self.own_schema(defs)
        if self.ref not in defs:
            defs[self.ref] = {}  # (taken: a class that contains itself stops here)
            defs[self.ref] = self.own_schema(defs)
        return {"$ref": f"#/$defs/{self.ref}"}

    def _type_problem(self, value: object, path: Path, reading: Reading) -> bool:
        if any(is_type(value, kind) for kind in self.types):
            return False
        reading.fault(path, f"{value!r} is not of type {', '.join(map(repr, self.types))}")
        return True


class Scalar(Kind):
    """A string or a number, with JSON Schema's bounds. An integral float reads as an int."""

    def __init__(self, *types: str, min_length: int = 0, pattern: str | None = None,
                 mismatch: Callable[[str], str] | None = None, minimum: float | None = None,
                 above: float | None = None, description: str | None = None,
                 noun: str | None = None) -> None:
        self.types = types
        self.min_length = min_length
        self.pattern = pattern
        self.matches = re.compile(pattern).search if pattern is not None else None
        self.mismatch = mismatch or (lambda text: f"{text!r} does not match {pattern!r}")
        self.minimum = minimum
        self.above = above  # JSON Schema's exclusiveMinimum
        self.description = description
        self._noun = noun

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        faults = reading.faults
        self._type_problem(value, path, reading)  # (the bounds of its type apply all the same:
        if isinstance(value, str):  # 0.5 for an integer of at least 1 breaks both)
            if len(value) < self.min_length:
                reading.fault(path, f"{value!r} should be non-empty" if self.min_length == 1
                              else f"{value!r} is too short")
            if self.matches is not None and self.matches(value) is None:
                reading.fault(path, self.mismatch(value))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                reading.fault(path, f"{value!r} is less than the minimum of {self.minimum!r}")
            if self.above is not None and value <= self.above:
                reading.fault(path, f"{value!r} is less than or equal to the minimum of "
                              f"{self.above!r}")
        if reading.faults > faults:
            return BAD
        # (2.0 is an integer to JSON Schema, but no count of anything to Python)
        return int(value) if isinstance(value, float) and self.types == ("integer",) else value

    def own_schema(self, defs: JSONObject) -> JSONObject:
        schema: JSONObject = {"type": self.types[0] if len(self.types) == 1
                                  else list(self.types)}
        for name, value in (("minLength", self.min_length or None), ("pattern", self.pattern),
                            ("minimum", self.minimum), ("exclusiveMinimum", self.above),
                            ("description", self.description)):
            if value is not None:
                schema[name] = value
        return schema


def text(**options: Any) -> Scalar:
    return Scalar("string", **options)


def integer(**options: Any) -> Scalar:
    return Scalar("integer", **options)


def number(**options: Any) -> Scalar:
    return Scalar("number", **options)


class Const(Kind):
    def __init__(self, value: JSON) -> None:
        self.value = value

    @property
    def noun(self) -> str:
        return repr(self.value)

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        if _equal(value, self.value):
            return value
        reading.fault(path, f"must be {self.value!r}")
        return BAD

    def own_schema(self, defs: JSONObject) -> JSONObject:
        return {"const": self.value}


def _equal(one: object, other: object) -> bool:
    """JSON Schema's equality: `true` is not 1, but 1.0 is."""
    return one == other and isinstance(one, bool) == isinstance(other, bool)


class Choice(Kind):
    """One of a list of strings, given by a function (the list may be costly to make)."""

    def __init__(self, choices: Callable[[], Sequence[str]]) -> None:
        self.choices = choices

    @property
    def noun(self) -> str:
        return " or ".join(repr(c) for c in self.choices())

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        choices = self.choices()
        if isinstance(value, str) and value in choices:
            return value
        if reading.quiet:
            reading.faults += 1
        else:
            from fluxbatch.models import did_you_mean

            listed = ", ".join(repr(c) for c in choices)
            reading.fault(path, f"{value!r} is not one of {listed}"
                          + did_you_mean(str(value), list(choices)))
        return BAD

    def own_schema(self, defs: JSONObject) -> JSONObject:
        return {"enum": list(self.choices())}


class Template(Scalar):
    """A Jinja2 template: a string with a `{` in it. Never the branch a plain string was meant
    for: "expected ..." lists what would fit instead."""

    def __init__(self) -> None:
        super().__init__("string", pattern="{", noun="a template string")


class Anything(Kind):
    def __init__(self, description: str | None = None) -> None:
        self.description = description

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        return BAD if reading.damaged and reading.damaged_below(path) else value

    def own_schema(self, defs: JSONObject) -> JSONObject:
        return {} if self.description is None else {"description": self.description}


ANYTHING = Anything()


class Loose(Kind):
    """Any value; when it is a mapping, the keys listed are checked (others are free)."""

    def __init__(self, properties: Mapping[str, Kind], description: str | None = None) -> None:
        self.properties = properties
        self.description = description

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        bad = reading.damaged and reading.damaged_below(path)
        if isinstance(value, dict):
            for name, kind in self.properties.items():
                if name in value and reading.read(kind, value[name], (*path, name)) is BAD:
                    bad = True
        return BAD if bad else value

    def own_schema(self, defs: JSONObject) -> JSONObject:
        return {"description": self.description,
                "properties": {name: kind.schema(defs) for name, kind in self.properties.items()}}


class Converted(Kind):
    """`kind`, read into another type (a provider's name into its mapping)."""

    def __init__(self, kind: Kind, convert: Callable[[Any], Any]) -> None:
        self.kind = kind
        self.convert = convert
        self.types = kind.types

    @property
    def noun(self) -> str:
        return self.kind.noun

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        result = self.kind.read(value, path, reading)
        return BAD if result is BAD else self.convert(result)

    def own_schema(self, defs: JSONObject) -> JSONObject:
        return self.kind.schema(defs)


class AnyOf(Kind):
    """The first branch that takes the value. When none does, the problems are those of the
    one branch meant for this kind of value (the only one whose JSON type fits, or of several
    mappings, whose required keys are there); else one line says what would fit, or
    `unknown(value)` does."""

    def __init__(self, *branches: Kind, description: str | None = None, ref: str | None = None,
                 unknown: Callable[[object], str] | None = None) -> None:
        self.branches = branches
        self.description = description
        self.ref = ref
        self.unknown = unknown
        self.types = tuple(t for branch in branches for t in branch.types)

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        with reading.quietly():
            for branch in self.branches:
                result = branch.read(value, path, reading)
                if result is not BAD:
                    return result
        if self.unknown is not None:
            reading.fault(path, self.unknown(value))
            return BAD
        meant = [branch for branch in self.branches if branch.types
                 and not isinstance(branch, Template)
                 and any(is_type(value, t) for t in branch.types)]
        if len(meant) > 1 and isinstance(value, dict):  # mappings told by their keys
            meant = [branch for branch in meant if set(branch.required) <= set(value)]
        if len(meant) == 1:
            meant[0].read(value, path, reading)
            return BAD
        nouns = [branch.noun for branch in self.branches]
        listed = ", ".join(nouns[:-1]) + " or " + nouns[-1] if len(nouns) > 1 else nouns[0]
        reading.fault(path, f"{value!r} is not valid here: expected {listed}")
        return BAD

    def own_schema(self, defs: JSONObject) -> JSONObject:
        schema: JSONObject = {} if self.description is None \
            else {"description": self.description}
        schema["anyOf"] = [branch.schema(defs) for branch in self.branches]
        return schema


class ListOf(Kind):
    """A list (read as a tuple). With `salvage`, a condemned item is left out (its problem
    said why); without, it condemns the list."""

    types = ("array",)

    def __init__(self, item: Kind, *, min_items: int = 0, unique: bool = False,
                 salvage: bool = False) -> None:
        self.item = item
        self.min_items = min_items
        self.unique = unique
        self.salvage = salvage

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        # (`isinstance` only narrows `value` for the type checker: `_type_problem` checked it)
        if self._type_problem(value, path, reading) or not isinstance(value, list):
            return BAD
        bad = False
        if len(value) < self.min_items:
            reading.fault(path, f"{value!r} should be non-empty" if self.min_items == 1
                          else f"{value!r} is too short")
            bad = True
        if self.unique and any(_equal(a, b) for i, a in enumerate(value) for b in value[i + 1:]):
            reading.fault(path, f"{value!r} has non-unique elements")
            bad = True
        items = []
        for index, item in enumerate(value):
            result = reading.read(self.item, item, (*path, index))
            if result is not BAD:
                items.append(result)
            elif not self.salvage:
                bad = True
        return BAD if bad else tuple(items)

    def own_schema(self, defs: JSONObject) -> JSONObject:
        schema: JSONObject = {"type": "array"}
        if self.min_items:
            schema["minItems"] = self.min_items
        if self.unique:
            schema["uniqueItems"] = True
        schema["items"] = self.item.schema(defs)
        return schema


@dataclasses.dataclass(frozen=True, slots=True)
class Salvage:
    """What becomes of a condemned entry of a mapping: `value` (or, if None, it is left out;
    its key stays known when `keep` is set), and what that costs."""

    cost: Cost = Cost.IMAGES
    keep: bool = False
    value: object = None
    costs: Mapping[str, Cost] = dataclasses.field(default_factory=dict)  # by key


class MapOf(Kind):
    """A mapping of free keys to values of one kind, with `known` keys of their own kinds.
    With `salvage`, a condemned entry is dealt with as it says; without, it condemns the
    mapping."""

    types = ("object",)

    def __init__(self, values: Kind = ANYTHING, *, known: Mapping[str, Kind] | None = None,
                 min_properties: int = 0, salvage: Salvage | None = None,
                 description: str | None = None, ref: str | None = None, noun: str | None = None,
                 listed: Callable[[JSONObject], JSONObject] | None = None) -> None:
        self.values = values
        self.known = known or {}
        self.min_properties = min_properties
        self.salvage = salvage
        self.description = description
        self.ref = ref
        self._noun = noun
        self.listed = listed  # the keys the schema shows (for completion), made when asked

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        if self._type_problem(value, path, reading) or not isinstance(value, dict):
            return BAD
        if len(value) < self.min_properties:
            reading.fault(path, f"{value!r} should be non-empty" if self.min_properties == 1
                          else f"{value!r} does not have enough properties")
            return BAD
        if self.values is ANYTHING and not self.known and not reading.damaged:
            return dict(value)
        entries: dict[str, object] = {}
        bad = False
        for name, item in value.items():
            result = reading.read(self.known.get(name, self.values), item, (*path, name))
            if result is not BAD:
                entries[name] = result
            elif self.salvage is None:
                bad = True
            else:
                reading.cost |= self.salvage.costs.get(name, self.salvage.cost)
                if self.salvage.keep:
                    entries[name] = self.salvage.value
        return BAD if bad else entries

    def own_schema(self, defs: JSONObject) -> JSONObject:
        schema: JSONObject = {"type": "object"}
        if self.description is not None:
            schema["description"] = self.description
        if self.min_properties:
            schema["minProperties"] = self.min_properties
        if self.listed is not None:
            schema["properties"] = self.listed(defs)
        if self.values is not ANYTHING:
            schema["additionalProperties"] = self.values.schema(defs)
        return schema


class Model(Kind):
    """A declared class, read from a mapping.

    - `others`: the kind of the values of keys it does not declare, collected into its field
      `rest` (a matrix's variables; `rest_salvage` says what becomes of a condemned one);
      without it, an unknown key is a problem.
    - `closed`: an unknown key condemns the mapping (it may be a misspelt option that changes
      how the rest reads); otherwise it is only reported, and left out.
    - `salvage`: see the module's docstring. `costed(fields, cost)` turns what its own
      condemned values cost into its fields; `order` names a field that gets the document's
      keys in order; `index` one that gets its position in the list that holds it.
    - `refused`: unknown keys that say why they are not a recipe's to give (what to do
      instead), in place of a "did you mean".
    """

    types = ("object",)

    def __init__(self, cls: type, *, ref: str | None = None, description: str | None = None,
                 noun: str | None = None, others: Kind | None = None, rest: str = "rest",
                 rest_salvage: Salvage | None = None, closed: bool = False,
                 salvage: bool = False, order: str | None = None, index: str | None = None,
                 costed: Callable[[dict[str, object], Cost], None] | None = None,
                 refused: Mapping[str, str] | None = None) -> None:
        self.cls = cls
        self.refused = refused or {}
        self.ref = ref
        self.description = description
        self._noun = noun
        self.others = others
        self.rest = rest
        self.rest_kind = MapOf(others, salvage=rest_salvage) if others is not None else None
        self.closed = closed
        self.salvage = salvage
        self.order = order
        self.index = index
        self.costed = costed
        self.costed_whole = costed is not None
        self.keys: dict[str, tuple[str, Key]] = {}
        for field in dataclasses.fields(cls):
            spec = field.metadata.get(_KEY)
            if spec is not None:
                name = spec.name or field.name
                self.keys[name] = (field.name, dataclasses.replace(spec, name=name))
        self.required = tuple(name for name, (_, spec) in self.keys.items() if spec.required)
        self.allowed = list(self.keys)

    def read(self, value: object, path: Path, reading: Reading) -> Any:
        if self._type_problem(value, path, reading) or not isinstance(value, dict):
            return BAD
        outer, reading.cost = reading.cost, Cost.NOTHING
        fields: dict[str, object] = {}
        bad = self._undeclared(value, path, reading, fields)
        for name, (attribute, spec) in self.keys.items():
            bad |= self._field(value.get(name, _MISSING), attribute, spec, (*path, name),
                               reading, fields)
        if self.order is not None:
            fields[self.order] = tuple(value)
        if self.index is not None:
            fields[self.index] = path[-1]
        if self.costed is None:
            reading.cost |= outer
        else:
            if reading.damaged and path in reading.damaged:
                reading.cost |= Cost.IMAGES
            self.costed(fields, reading.cost)
            reading.cost = outer
        return BAD if bad else self.cls(**fields)

    def _undeclared(self, value: Mapping[str, object], path: Path, reading: Reading,
                    fields: dict[str, object]) -> bool:
        """Reads the keys it does not declare; True when they condemn the mapping."""
        rest = {name: item for name, item in value.items() if name not in self.keys}
        if self.rest_kind is not None:
            fields[self.rest] = self.rest_kind.read(rest, path, reading)
            return fields[self.rest] is BAD
        for name in rest:
            why = self.refused.get(name)
            reading.fault((*path, name), f"unknown key {name!r}" + (
                f": {why}" if why else _did_you_mean(name, self.allowed)), key=True)
        return self.closed and bool(rest)

    def _field(self, item: object, attribute: str, spec: Key, path: Path, reading: Reading,
               fields: dict[str, object]) -> bool:
        """Reads one declared key into `fields`; True when it condemns the mapping."""
        if item is _MISSING:
            if not spec.required:
                return False  # (the field's default)
            reading.fault(path[:-1], f"{spec.name!r} is a required key")
        else:
            result = reading.read(spec.kind, item, path)
            if result is not BAD:
                fields[attribute] = result
                return False
        if not self.salvage or spec.fatal:
            return True
        reading.cost |= spec.cost
        if spec.as_text:
            fields[attribute] = "" if item is _MISSING else str(item)
        return False

    def own_schema(self, defs: JSONObject) -> JSONObject:
        schema: JSONObject = {"type": "object"}
        if self.description is not None:
            schema["description"] = self.description
        if self.required:
            schema["required"] = list(self.required)
        if self.others is None:
            schema["additionalProperties"] = False
        schema["properties"] = {name: _key_schema(spec, defs)
                                for name, (_, spec) in self.keys.items()}
        if self.others is not None:
            schema["additionalProperties"] = self.others.schema(defs)
        return schema


def _key_schema(spec: Key, defs: JSONObject) -> JSONObject:
    schema = dict(spec.kind.schema(defs))
    if spec.description is not None:
        schema["description"] = spec.description
    if spec.default is not _MISSING:
        schema["default"] = spec.default
    return schema


def _did_you_mean(word: str, candidates: list[str]) -> str:
    from fluxbatch.models import did_you_mean

    return did_you_mean(word, candidates)


def schema_of(kind: Kind, header: Mapping[str, JSON]) -> JSONObject:
    """`kind`'s JSON Schema: `header` ($schema, $id, title...), then the kind, then $defs."""
    defs: JSONObject = {}
    body = kind.own_schema(defs)
    return {**header, **body, "$defs": defs} if defs else {**header, **body}
