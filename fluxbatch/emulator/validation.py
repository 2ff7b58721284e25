"""Request-body validation with FastAPI's 422 shape.

The body is checked with jsonschema (Draft 2020-12) against the vendored request schema;
each failure is then worded the way FastAPI with pydantic v2 words it, one entry per field,
in the schema's field order: `{"loc": ["body", "width"], "msg": "...", "type": "..."}`.
Image fields that pass the schema are then decoded and checked (inputs.py), their failures
worded as pydantic words a validator's ValueError: `"Value error, ..."`, type `value_error`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from typing import TypedDict

from jsonschema import Draft202012Validator, ValidationError

from fluxbatch import models
from fluxbatch.emulator import inputs


class FieldError(TypedDict):
    """One problem in a request body, in the shape the real API's 422 lists it."""

    loc: list[str | int]
    msg: str
    type: str

_TYPE_ERRORS = {
    "integer": ("Input should be a valid integer", "int_type"),
    "number": ("Input should be a valid number", "float_type"),
    "string": ("Input should be a valid string", "string_type"),
    "boolean": ("Input should be a valid boolean", "bool_type"),
    "object": ("Input should be a valid dictionary", "dict_type"),
    "array": ("Input should be a valid list", "list_type"),
    "null": ("Input should be None", "none_required"),
}
_BOUND_ERRORS = {
    "minimum": ("Input should be greater than or equal to {}", "greater_than_equal"),
    "maximum": ("Input should be less than or equal to {}", "less_than_equal"),
    "exclusiveMinimum": ("Input should be greater than {}", "greater_than"),
    "exclusiveMaximum": ("Input should be less than {}", "less_than"),
    "multipleOf": ("Input should be a multiple of {}", "multiple_of"),
}


def parse_body(model: str, raw: bytes) -> tuple[dict[str, object] | None, list[FieldError]]:
    """The request as a dict and no errors, or None and every error."""
    if not raw.strip():
        return None, [_error(["body"], "Field required", "missing")]
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        position = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        return None, [_error(["body", position], "JSON decode error", "json_invalid")]
    if not isinstance(body, dict):
        message = "Input should be a valid dictionary or object to extract fields from"
        return None, [_error(["body"], message, "model_attributes_type")]
    errors = validate(model, body)
    return (None, errors) if errors else (body, [])


def validate(model: str, body: dict[str, object]) -> list[FieldError]:
    schema = models.request_schema(model)
    order = {name: index for index, name in enumerate(schema.get("properties", {}))}
    found: dict[str, FieldError] = {}
    for name in schema.get("required", ()):
        if name not in body:
            found[name] = _error(["body", name], "Field required", "missing")
    for error in _validator(model).iter_errors(body):
        if error.validator == "required" or not error.absolute_path:
            continue
        name = str(error.absolute_path[0])
        if name not in found:
            message, kind = _describe(_innermost(error))
            found[name] = _error(["body", *error.absolute_path], message, kind)
    for name, message in inputs.problems(model, body, skip=frozenset(found)).items():
        found[name] = _error(["body", name], message, "value_error")
    return [found[name] for name in sorted(found, key=lambda n: order.get(n, len(order)))]


def comet_message(errors: Sequence[FieldError]) -> str:
    return "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors)


def _validator(model: str) -> Draft202012Validator:
    if models.project_model(model) is not None:  # (a project's own: not kept by name)
        return Draft202012Validator(models.request_schema(model))
    return _vendored_validator(model)


@cache
def _vendored_validator(model: str) -> Draft202012Validator:
    return Draft202012Validator(models.request_schema(model))


def _error(loc: list[str | int], msg: str, kind: str) -> FieldError:
    return {"loc": loc, "msg": msg, "type": kind}


def _innermost(error: ValidationError) -> ValidationError:
    """For `anyOf: [{...}, {type: null}]`, the first failure in the first non-null branch."""
    while error.validator == "anyOf" and error.context:
        branches = error.validator_value
        non_null = [
            sub
            for sub in error.context
            if branches[sub.relative_schema_path[0]].get("type") != "null"
        ]
        error = min(non_null or error.context, key=lambda sub: sub.relative_schema_path[0])
    return error


def _describe(error: ValidationError) -> tuple[str, str]:
    validator, value = str(error.validator), error.validator_value
    if validator == "type":
        return _TYPE_ERRORS.get(str(value), (error.message, "type_error"))
    if validator in _BOUND_ERRORS:
        template, kind = _BOUND_ERRORS[validator]
        return template.format(_number(value)), kind
    if validator == "enum":
        return "Input should be " + _alternatives(value), "enum"
    if validator == "minLength":
        plural = "" if value == 1 else "s"
        return f"String should have at least {value} character{plural}", "string_too_short"
    if validator == "maxLength":
        return f"String should have at most {value} characters", "string_too_long"
    return error.message, "value_error"


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _alternatives(values: Sequence[object]) -> str:
    quoted = [repr(v) for v in values]
    if len(quoted) < 2:
        return "".join(quoted)
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]
