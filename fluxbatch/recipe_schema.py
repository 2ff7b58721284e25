"""The recipe's JSON Schema (draft 2020-12), built from the provider registry and the model
catalogue so it never drifts from the code. `schemas/recipe.schema.json` is this, written
out for editors (`fluxbatch schema > schemas/recipe.schema.json`); a test keeps them equal.
"""

from __future__ import annotations

from typing import Any

from fluxbatch import models, providers

SCHEMA_ID = "https://github.com/fluxbatch/fluxbatch/blob/main/schemas/recipe.schema.json"
DEFAULT_MAX_JOBS = 10_000
DEFAULT_OUTPUT = "{{ job }}/{{ combo }}-{{ replicate }}.{{ ext }}"
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"
TEMPLATE = {"type": "string", "pattern": "{"}


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
    axis = {
        "description": "A matrix variable: a list of values, or values from a file.",
        "anyOf": [{"type": "array", "minItems": 1}, {"$ref": "#/$defs/from_file"}],
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
                            "base_url": {"type": "string", "pattern": "^https?://"},
                            "concurrency": {"type": "integer", "minimum": 1},
                            "model_concurrency": {
                                "type": "object",
                                "additionalProperties": {"type": "integer", "minimum": 1},
                            },
                            "timeout": {"type": "number", "exclusiveMinimum": 0},
                        },
                    },
                ],
                "default": "bfl",
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
                "description": "Size guard: larger plans need --yes.",
                "default": DEFAULT_MAX_JOBS,
            },
            "defaults": {"$ref": "#/$defs/params"},
            "vars": {"type": "object", "description": "Constants available to every template."},
            "jobs": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/job"}},
        },
        "$defs": {
            "params": {
                "type": "object",
                "description": "Request parameters; values may be Jinja2 templates.",
                "properties": _parameter_properties(),
            },
            "from_file": from_file,
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
                            {"$ref": "#/$defs/from_file"},
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
