"""The recipe's JSON Schema (draft 2020-12), built from the provider registry and the model
catalogue so it never drifts from the code. `schemas/recipe.schema.json` is this, written
out for editors (`fluxbatch schema > schemas/recipe.schema.json`); a test keeps them equal.
`schema_problems` reads jsonschema's verdicts back as located, readable problems, and
`salvage` takes the values they condemn out of the document, so that everything else in it
is still checked in the same run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any, NamedTuple

import jsonschema

from fluxbatch import models, providers
from fluxbatch.errors import Problem
from fluxbatch.models import did_you_mean, unknown_model_message
from fluxbatch.yamlsource import Path, Positions

SCHEMA_ID = "https://raw.githubusercontent.com/fluxbatch/fluxbatch/main/schemas/recipe.schema.json"
DEFAULT_MAX_JOBS = 10_000
DEFAULT_OUTPUT = "{{ job }}/{{ combo }}-{{ replicate }}.{{ ext }}"
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"
TEMPLATE = {"type": "string", "pattern": "{"}
URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://"  # (schemes ignore case: `HTTPS://` is https)


def _parameter_properties() -> dict[str, Any]:
    """Every request parameter any model knows, for editor completion (checked per model)."""
    props: dict[str, Any] = {
        "model": {
            "description": "Model endpoint, e.g. flux-pro-1.1 (POST /v1/{model}); may be a "
            "template.",
            "anyOf": [{"enum": list(models.catalogue())}, TEMPLATE],
        }
    }
    for model in models.catalogue().values():
        for name, prop in model.properties.items():
            if name in props or name in models.INTERNAL_FIELDS:
                continue
            description = prop.get("description") or prop.get("title") or name
            props[name] = {"description": f"{description} (may be a template)"}
    return props


def recipe_schema() -> dict[str, Any]:
    provider_names = providers.names()
    from_file = {
        "type": "object",
        "description": "Values read from a file next to the recipe: .txt (one per line; "
        "blank lines and # comments skipped), .yaml/.yml/.json (a list), or a .csv column.",
        "required": ["from"],
        "additionalProperties": False,
        "properties": {
            "from": {"type": "string", "minLength": 1},
            "column": {"type": "string", "minLength": 1, "description": "CSV column name"},
        },
    }
    files = {
        "type": "object",
        "description": "Image files matching a glob relative to the recipe (`photos/*.png`; "
        "`**` spans folders), sorted. Each renders as its path and offers .stem, .name and "
        ".path; its content, not its name, counts in seeds and keys.",
        "required": ["files"],
        "additionalProperties": False,
        "properties": {"files": {"type": "string", "minLength": 1}},
    }
    value = {
        "description": "A value: text, a number, or an object whose fields templates read "
        "(`{{ aspect.w }}`). An object is shown (the plan's table, gallery captions, "
        "messages) and selected (`--only aspect=square`) by its `label`, else its `name`.",
        "properties": {
            "label": {"type": ["string", "number"], "minLength": 1,
                      "description": "How this object value is shown and selected."},
            "name": {"description": "Labels this object value when it has no `label`."},
        },
    }
    axis = {
        "description": "A matrix variable: a list of values, values from a file, or image "
        "files.",
        "anyOf": [{"type": "array", "minItems": 1, "items": value},
                  {"$ref": "#/$defs/from_file"}, {"$ref": "#/$defs/files"}],
    }
    rows_file = {
        "type": "object",
        "description": "Rows read from a .csv (one per line, under a header), .yaml, .yml or "
        ".json file next to the recipe.",
        "required": ["from"],
        "additionalProperties": False,
        "properties": {
            "from": {"type": "string", "minLength": 1},
            "files": {
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"type": "string", "minLength": 1},
                "description": "Columns that name image files: each is checked, and counts "
                "by its content in seeds, like a files: variable.",
            },
        },
    }
    combination = {"type": "object", "minProperties": 1}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "fluxbatch recipe",
        "description": "A batch of Flux image requests: Jinja2 templates over variable matrices.",
        "type": "object",
        "required": ["version", "name", "jobs"],
        "additionalProperties": False,
        "properties": {
            "$schema": {"type": "string"},
            "version": {"const": 1, "description": "Recipe format version."},
            "name": {
                "type": "string",
                "pattern": NAME_PATTERN,
                "description": "Recipe name; part of every auto seed, so renaming reseeds.",
            },
            "description": {"type": "string"},
            "provider": {
                "description": "Where requests go: a provider name or a mapping.",
                "anyOf": [
                    {"enum": provider_names},
                    {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"enum": provider_names},
                            "base_url": {"type": "string", "pattern": URL_PATTERN},
                            "concurrency": {"type": "integer", "minimum": 1},
                            "model_concurrency": {
                                "type": "object",
                                "additionalProperties": {"type": "integer", "minimum": 1},
                            },
                            "timeout": {"type": "number", "exclusiveMinimum": 0},
                        },
                    },
                ],
                "default": providers.DEFAULT,
            },
            "output": {
                "type": "string",
                "minLength": 1,
                "description": "Output path template, relative to the output root.",
                "default": DEFAULT_OUTPUT,
            },
            "output_root": {
                "type": "string",
                "minLength": 1,
                "description": "Output root, relative to the recipe (default: its directory).",
            },
            "max_jobs": {
                "type": "integer",
                "minimum": 1,
                "description": "Size guard: a plan of more images than this needs --yes.",
                "default": DEFAULT_MAX_JOBS,
            },
            "defaults": {"$ref": "#/$defs/params"},
            "vars": {"type": "object", "description": "Constants available to every template."},
            "jobs": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/job"},
                     "description": "Groups of images: each job is a prompt template over a "
                     "matrix of values, one image per combination and replicate."},
        },
        "$defs": {
            "params": {
                "type": "object",
                "description": "Request parameters; values may be Jinja2 templates.",
                "properties": _parameter_properties(),
            },
            "from_file": from_file,
            "files": files,
            "rows_file": rows_file,
            "axis": axis,
            "job": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": NAME_PATTERN},
                    "description": {"type": "string"},
                    "prompt": {"type": "string", "description": "Jinja2 prompt template."},
                    "matrix": {"$ref": "#/$defs/matrix"},
                    "replicates": {"type": "integer", "minimum": 1, "default": 1},
                    "params": {"$ref": "#/$defs/params"},
                    "seed": {
                        "description": "auto (derived from the combination), an integer, "
                        "or a template.",
                        "anyOf": [
                            {"const": "auto"},
                            {"type": "integer", "minimum": 0},
                            TEMPLATE,
                        ],
                        "default": "auto",
                    },
                    "output": {"type": "string", "minLength": 1},
                },
            },
            "matrix": {
                "type": "object",
                "description": "Variables whose product makes the combinations "
                "(GitHub Actions strategy.matrix rules), plus zip groups and row tables.",
                "properties": {
                    "include": {"type": "array", "items": combination},
                    "exclude": {"type": "array", "items": combination},
                    "zip": {
                        "description": "Lists that advance in lock-step (one group or several).",
                        "anyOf": [
                            {"$ref": "#/$defs/zip_group"},
                            {"type": "array", "minItems": 1,
                             "items": {"$ref": "#/$defs/zip_group"}},
                        ],
                    },
                    "rows": {
                        "description": "A table whose rows are combinations.",
                        "anyOf": [
                            {"type": "array", "minItems": 1, "items": combination},
                            {"$ref": "#/$defs/rows_file"},
                        ],
                    },
                },
                "additionalProperties": {"$ref": "#/$defs/axis"},
            },
            "zip_group": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {"$ref": "#/$defs/axis"},
            },
        },
    }


# -- reading the schema's verdicts as located problems ----------------------------------------


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = recipe_schema()
    # Each job checked against the job schema itself: looked up through its `$ref`, once per
    # job, it took a third of checking a recipe of many small jobs.
    jobs = schema["properties"]["jobs"]
    schema["properties"]["jobs"] = {**jobs, "items": schema["$defs"]["job"]}
    return jsonschema.Draft202012Validator(schema)


class Harm(Enum):
    """What a fault leaves of the document at its path."""

    EXTRA = "a key the schema does not know: left out, nothing else is lost"
    MISSING = "the mapping at the path lacks a required key"
    BAD = "the value at the path is unusable"
    KEPT = "reported, but the value is usable as written (a duplicate key's last value)"


class Fault(NamedTuple):
    path: Path
    problem: Problem
    harm: Harm


def schema_problems(document: Any, positions: Positions) -> list[Fault]:
    """Every schema violation, located."""
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        message = f"a recipe must be a mapping, but this document is {kind}"
        return [Fault((), positions.problem((), message), Harm.BAD)]
    faults: list[Fault] = []
    for error in _validator().iter_errors(document):
        faults.extend(_explain(error, positions))
    return faults


def _explain(error: jsonschema.ValidationError, positions: Positions) -> list[Fault]:
    path: Path = tuple(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extras = [k for k in error.instance if k not in error.schema.get("properties", {})]
        return [
            Fault((*path, k), positions.problem((*path, k), f"unknown key {k!r}"
                                                + did_you_mean(k, allowed), key=True),
                  Harm.EXTRA)
            for k in extras
        ]
    if error.validator == "anyOf" and path[-2:-1] in (("params",), ("defaults",)) \
            and path[-1] == "model":  # a name from the catalogue, or a template
        message = unknown_model_message(error.instance)
        return [Fault(path, positions.problem(path, message), Harm.BAD)]
    if error.validator in ("anyOf", "oneOf"):
        branch = _matching_branch(error)
        if branch is not None:
            return [p for sub in branch for p in _explain(sub, positions)]
        return [Fault(path, positions.problem(path, _describe_alternatives(error)), Harm.BAD)]
    harm = Harm.MISSING if error.validator == "required" else Harm.BAD
    return [Fault(path, positions.problem(path, _message(error, path)), harm)]


def _message(error: jsonschema.ValidationError, path: Path) -> str:
    if error.validator == "required":
        return str(error.message).replace("property", "key")
    if error.validator == "const":
        return f"must be {error.validator_value!r}"
    if error.validator == "pattern" and error.schema.get("pattern") == NAME_PATTERN:
        return (f"{error.instance!r} must start with a letter or digit and use only letters, "
                "digits, '.', '_' and '-'")
    if error.validator == "pattern" and error.schema.get("pattern") == URL_PATTERN:
        return f"{error.instance!r} is not an http(s) URL"
    if error.validator == "enum":
        choices = ", ".join(repr(c) for c in error.validator_value)
        hint = did_you_mean(str(error.instance), [str(c) for c in error.validator_value])
        return f"{error.instance!r} is not one of {choices}{hint}"
    return str(error.message)


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
    "boolean": bool,
}


def _matching_branch(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError] | None:
    """Of an anyOf's branches, the one meant for this kind of value (the only one whose
    top-level type fits, or of several mappings, whose required keys are there), so the user
    sees that branch's real errors."""
    by_branch: dict[int, list[jsonschema.ValidationError]] = {}
    for sub in error.context or ():
        by_branch.setdefault(int(sub.relative_schema_path[0]), []).append(sub)
    fitting: list[tuple[int, dict[str, Any]]] = []
    for index, branch_schema in enumerate(error.validator_value):
        schema = branch_schema
        if "$ref" in schema:
            schema = _validator().schema["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
        kind = schema.get("type")
        if kind is None or not _is_type(error.instance, kind) or schema == TEMPLATE:
            continue  # (a plain string is no broken template: the message lists what fits)
        fitting.append((index, schema))
    if len(fitting) > 1 and isinstance(error.instance, dict):  # mappings told by their keys
        fitting = [(index, schema) for index, schema in fitting
                   if set(schema.get("required", ())) <= set(error.instance)]
    if len(fitting) == 1 and fitting[0][0] in by_branch:
        return by_branch[fitting[0][0]]
    return None


def _is_type(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    expected: type | tuple[type, ...] = _JSON_TYPES.get(kind, object)
    return isinstance(value, expected)


def _describe_alternatives(error: jsonschema.ValidationError) -> str:
    descriptions = []
    for branch in error.validator_value:
        if "const" in branch:
            descriptions.append(repr(branch["const"]))
        elif "enum" in branch:
            descriptions.append(" or ".join(repr(v) for v in branch["enum"]))
        elif "$ref" in branch:
            descriptions.append({"from_file": "a mapping with 'from'",
                                 "rows_file": "a mapping with 'from'",
                                 "files": "a mapping with 'files'",
                                 "zip_group": "a mapping of lists"}.get(
                branch["$ref"].rsplit("/", 1)[-1], "a mapping"))
        elif branch.get("type") == "string" and "pattern" in branch:
            descriptions.append("a template string")
        else:
            kind = branch.get("type", "value")
            descriptions.append({"object": "a mapping", "array": "a list"}.get(kind, f"an {kind}"
                                if kind[0] in "aeiou" else f"a {kind}"))
    listed = ", ".join(descriptions[:-1]) + " or " + descriptions[-1] \
        if len(descriptions) > 1 else descriptions[0]
    return f"{error.instance!r} is not valid here: expected {listed}"


# -- what a damaged document still lets us check ---------------------------------------------


@dataclass(slots=True)
class Loss:
    """What faults took out of one job. Its problems are reported, so the job is still checked
    (templates, names, parameters, matrix files), but no image is built from it: its images
    would only repeat those problems."""

    model: bool = False  # its model: nothing model-specific can be checked
    names: bool = False  # some of its variables' names: none can be called undefined


@dataclass(frozen=True, slots=True)
class Salvage:
    document: dict[str, Any]  # every condemned value taken out or emptied
    losses: Mapping[int, Loss]  # by job index
    skipped: frozenset[int]  # jobs that are not mappings: nothing in them to check


# Recipe keys whose default is as good as anything for checking the rest.
_DEFAULTED = ("$schema", "version", "description", "output_root", "max_jobs", "provider")


def salvage(document: Any, faults: Iterable[Fault]) -> Salvage | None:
    """`document` (changed in place) with each value a fault condemns taken out, so that its
    default applies, or None when no list of jobs is left to check."""
    if not isinstance(document, dict):
        return None
    shared = _Shared()
    losses: dict[int, Loss] = {}
    for path, _, harm in faults:
        if harm is Harm.KEPT:
            continue
        if path[:1] == ("jobs",) and len(path) >= 2 and isinstance(path[1], int):
            job = document["jobs"][path[1]]
            if isinstance(job, dict) and _job_fault(job, path[2:], harm, losses, path[1]):
                losses.setdefault(path[1], Loss())
        elif not _recipe_fault(document, path, harm, shared):
            return None
    skipped = set()
    for index, job in enumerate(document["jobs"]):
        if not isinstance(job, dict):
            skipped.add(index)
        elif shared.damaged or index in losses or (shared.output and "output" not in job):
            loss = losses.setdefault(index, Loss())
            loss.names |= shared.names
            own_model = isinstance(job.get("params"), dict) and "model" in job["params"]
            loss.model |= shared.model and not own_model
    return Salvage(document, losses, frozenset(skipped))


@dataclass(slots=True)
class _Shared:
    """What recipe-level faults took from every job."""

    damaged: bool = False
    output: bool = False  # from the jobs that use the recipe's output template
    model: bool = False  # from the jobs that do not name their own model
    names: bool = False


def _recipe_fault(document: dict[str, Any], path: Path, harm: Harm, shared: _Shared) -> bool:
    if harm is Harm.EXTRA:
        _take_out(document, path)
        return True
    key = path[0] if path else None
    if key is None:  # a required key is missing
        document.setdefault("name", "")
        return isinstance(document.get("jobs"), list)
    if key in _DEFAULTED or key == "output":
        document.pop(key, None)
        shared.output |= key == "output"
    elif key == "name":
        document["name"] = str(document["name"])
    elif key in ("defaults", "vars"):
        shared.damaged = True
        if len(path) == 1 or not isinstance(document[key], dict):
            document[key] = {}
            shared.model |= key == "defaults"
            shared.names |= key == "vars"
        elif key == "defaults":  # (a parameter: only the model has a schema of its own here)
            _take_out(document, path[:2])
            shared.model |= path[1] == "model"
        else:  # (a constant whose YAML is damaged: the name stays known)
            document["vars"][path[1]] = None
    else:  # the list of jobs itself
        return False
    return True


def _job_fault(job: dict[Any, Any], rest: Path, harm: Harm, losses: dict[int, Loss],
               index: int) -> bool:
    """Take out what the fault condemns; True when the job lost something that matters."""
    key = rest[0] if rest else None
    if (harm is Harm.EXTRA and len(rest) == 1) or key == "description":
        job.pop(key, None)
        return False
    loss = losses.setdefault(index, Loss())
    if key is None:  # (its name, the only required key, is missing)
        job["name"] = ""
    elif key == "name":
        job["name"] = str(job["name"])
    elif key == "params":
        params = job["params"]
        if len(rest) == 1 or not isinstance(params, dict):
            job["params"] = {}
            loss.model = True
        else:
            params.pop(rest[1], None)
            loss.model |= rest[1] == "model"
    elif key == "matrix":
        _matrix_fault(job, rest[1:], loss)
    else:  # prompt, replicates, seed, output
        job.pop(key, None)
    return True


def _matrix_fault(job: dict[Any, Any], rest: Path, loss: Loss) -> None:
    matrix = job["matrix"]
    if not rest or not isinstance(matrix, dict):
        job["matrix"] = {}
        loss.names = True
    elif rest[0] == "exclude":
        matrix.pop("exclude", None)
    elif rest[0] in ("include", "zip", "rows"):
        matrix.pop(rest[0], None)
        loss.names = True
    else:  # a variable: still named, with no values, so the job is not built
        matrix[rest[0]] = []


def _take_out(document: dict[str, Any], path: Path) -> None:
    parent: Any = document
    for part in path[:-1]:
        if isinstance(parent, dict):
            parent = parent.get(part)
        elif isinstance(parent, list) and isinstance(part, int) and part < len(parent):
            parent = parent[part]
        else:
            return
    if isinstance(parent, dict):
        parent.pop(path[-1], None)
