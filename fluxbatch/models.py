"""The model catalogue: request schemas vendored from BFL's OpenAPI, prices, concurrency caps.

Request validation runs for every planned job, so the vendored JSON Schemas are compiled once
into small per-property check functions (the specs use a flat subset of JSON Schema: types,
`anyOf` with null, ranges, `multipleOf`, enums, string lengths). Messages follow jsonschema's
wording ("2000 is greater than the maximum of 1440"); a test cross-checks every verdict
against jsonschema itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, TypeGuard

SPEC_DATE = "2026-04-23"
SPEC_FILE = f"bfl-openapi-{SPEC_DATE}.json"
DEPRECATED_FILE = "bfl-deprecated-flux1.reconstructed.json"

# Fields that never change the pixels: excluded from job keys, secrets redacted from output.
NON_PIXEL_FIELDS = frozenset({"webhook_url", "webhook_secret"})
SECRET_FIELDS = frozenset({"webhook_secret"})
REDACTED = "***"


def redact(request: Mapping[str, object]) -> dict[str, object]:
    """`request` as fluxbatch prints or records it (plan, status, manifest, provenance): each
    secret field that is there reads `***`, whatever its value. An empty or null secret is
    masked too, so that every output agrees and none tells what a secret holds."""
    return {name: REDACTED if name in SECRET_FIELDS else value
            for name, value in request.items()}

# Documented internal field of flux-2-flex that callers must not send.
INTERNAL_FIELDS = frozenset({"input_image_blob_path"})
# The fields that take an image (Kontext's and FLUX.2's references, Fill's image and mask,
# Redux's image_prompt, Canny/Depth's control images): a recipe names a file, URL or data: URI.
IMAGE_FIELD = re.compile(
    r"^(?:image|mask|image_prompt|control_image|preprocessed_image|input_image(?:_\d+)?)$")


def is_image_field(name: str) -> bool:
    return IMAGE_FIELD.match(name) is not None



@dataclass(frozen=True, slots=True)
class Price:
    """How a model is billed, with the source of the figure."""

    usd: float  # per image, or for the first megapixel when per_mp is set
    per_extra_mp: float | None
    source: str
    verified: bool


# Sources: ../shared/reference/flux-api.md §6 (BFL pricing page; FLUX.2 per-MP rates from
# BFL's skills file). 1 credit = $0.01.
_PRICING_PAGE = "https://docs.bfl.ml/quick_start/pricing"
_SKILLS = "black-forest-labs/skills:skills/bfl-api/SKILL.md@172fdcf"
PRICES: dict[str, Price] = {
    "flux-kontext-pro": Price(0.04, None, _PRICING_PAGE, True),
    "flux-kontext-max": Price(0.08, None, _PRICING_PAGE, True),
    "flux-pro-1.1": Price(0.04, None, _PRICING_PAGE, True),
    "flux-pro-1.1-ultra": Price(0.06, None, _PRICING_PAGE, True),
    "flux-pro-1.0-fill": Price(0.05, None, _PRICING_PAGE, True),
    "flux-pro-1.0-expand": Price(0.05, None, "assumed equal to fill (no published price)", False),
    "flux-dev": Price(0.025, None, "https://flux-1.ai (third party, unverified)", False),
    "flux-pro": Price(0.05, None, "https://flux-1.ai (third party, unverified)", False),
    "flux-pro-1.0-canny": Price(0.05, None, "third-party model registry (unverified)", False),
    "flux-pro-1.0-depth": Price(0.05, None, "third-party model registry (unverified)", False),
    "flux-2-klein-4b": Price(0.014, 0.001, _SKILLS, False),
    "flux-2-klein-9b": Price(0.015, 0.002, _SKILLS, False),
    "flux-2-klein-9b-preview": Price(0.015, 0.002, f"{_SKILLS} (as klein-9b)", False),
    "flux-2-pro": Price(0.03, 0.015, _SKILLS, False),
    "flux-2-pro-preview": Price(0.03, 0.015, f"{_SKILLS} (as flux-2-pro)", False),
    "flux-2-max": Price(0.07, 0.03, _SKILLS, False),
    # Two copies of the skills file disagree (5¢ or 6¢ per MP); estimate with the higher.
    "flux-2-flex": Price(0.06, 0.06, "https://skills.sh/black-forest-labs/skills/bfl-api", False),
}

# Models whose weights may change under the same name (besides every `*-preview`): an image
# made with one may not come out the same again, even with the same request and seed.
FLOATING: dict[str, str] = {}


def floating(name: str) -> str | None:
    """Why `name` is not reproducible (the provider may change it), or None when pinned."""
    if name in FLOATING:
        return FLOATING[name]
    if name.endswith("-preview"):
        return "a preview model, which the provider may change"
    return None


# Active-task caps documented by BFL (help.bfl.ai concurrency article): 24 per account,
# 6 for flux-kontext-max.
ACCOUNT_CONCURRENCY = 24
MODEL_CONCURRENCY = {"flux-kontext-max": 6}
# How long a task may take, from submit to Ready, before a render stops waiting for it
# (`render --timeout` changes it for one run); a task in flight for longer is one that
# `--force` may pay for anew.
TASK_TIMEOUT = 900.0

Check = Callable[[object], str | None]


@dataclass(frozen=True, slots=True)
class Model:
    """One generation endpoint: `POST /v1/{name}`."""

    name: str
    schema_title: str
    summary: str
    properties: Mapping[str, Mapping[str, Any]]
    required: frozenset[str]
    deprecated: bool
    source: str
    checks: Mapping[str, Check]
    field_types: Mapping[str, tuple[str, ...]]

    @property
    def default_format(self) -> str:
        fmt = self.properties.get("output_format", {}).get("default", "jpeg")
        return str(fmt)

    @property
    def sized_by(self) -> str:
        """'size' (width/height), 'aspect' (aspect_ratio) or 'input' (from the input image)."""
        if "width" in self.properties:
            return "size"
        if "aspect_ratio" in self.properties:
            return "aspect"
        return "input"

    def types_of(self, field: str) -> tuple[str, ...]:
        return self.field_types.get(field, ())

    def validate(self, request: Mapping[str, object]) -> list[tuple[str | None, str]]:
        """Every problem with `request` as (field or None, message); empty when valid."""
        return self.missing(request) + self.check_fields(request)

    def missing(self, request: Mapping[str, object]) -> list[tuple[str | None, str]]:
        return [(None, f"missing required parameter {name!r} for {self.name}")
                for name in sorted(self.required.difference(request))]

    def check_fields(self, fields: Mapping[str, object]) -> list[tuple[str | None, str]]:
        problems: list[tuple[str | None, str]] = []
        checks = self.checks
        for field, value in fields.items():
            check = checks.get(field)
            if check is None:
                problems.append((field, self.unknown_field_message(field)))
                continue
            message = check(value) or documented_rule(field, value)
            if message is not None:
                problems.append((field, message))
        return problems

    @property
    def image_fields(self) -> tuple[str, ...]:
        return tuple(name for name in self.properties if is_image_field(name))

    def unknown_field_message(self, field: str) -> str:
        if field in INTERNAL_FIELDS:
            return f"{field!r} is internal to the API and must not be sent"
        if is_image_field(field):
            own = self.image_fields
            references = [name for name in own if name.startswith("input_image")]
            if field.startswith("input_image") and references:
                return (f"{self.name} takes at most {len(references)} input images "
                        f"({references[0]} … {references[-1]}), so not {field!r}"
                        if len(references) > 1 else
                        f"{self.name} takes one input image ({references[0]}), not {field!r}")
            named = [name for name in own if name not in references]
            if references:
                named.append(references[0] if len(references) == 1 else
                             f"{references[0]} … {references[-1]}")
            takes = (f"its image input{'s are' if len(own) > 1 else ' is'} "
                     f"{' and '.join(named)}") if own else "it takes no image"
            return f"{self.name} has no {field!r} parameter: {takes}"
        message = f"unknown parameter {field!r} for {self.name}"
        return message + did_you_mean(field, [*self.properties, "model"])


_RATIO = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
SEED_MAX = 2**32 - 1  # the seeds BFL reports back are 32-bit


def documented_rule(field: str, value: object) -> str | None:
    """What the vendor documents in prose but its schema does not encode: an aspect ratio
    `W:H` between 21:9 and 9:21, and a seed that fits the 32 bits the API reports."""
    if field == "aspect_ratio" and isinstance(value, str):
        found = _RATIO.match(value)
        if found is None or not int(found[1]) or not int(found[2]):
            return f"{value!r} is not an aspect ratio like '16:9'"
        ratio = int(found[1]) / int(found[2])
        if not 9 / 21 - 1e-9 <= ratio <= 21 / 9 + 1e-9:
            side = "wider" if ratio > 1 else "taller"
            return f"{value!r} is {side} than the documented range of 21:9 to 9:21"
    if field == "seed" and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            return f"{value!r} is less than the minimum of 0"
        if value > SEED_MAX:
            return f"{value!r} is greater than the maximum of {SEED_MAX} (seeds are 32-bit)"
    return None


def coerce_text(text: str, types: tuple[str, ...]) -> str | int | float | bool | None:
    if not types or "string" in types:
        return text
    stripped = text.strip()
    lowered = stripped.lower()
    if "integer" in types:
        try:
            return int(stripped)
        except ValueError:
            number = _float_or_none(stripped)
            if number is not None and number.is_integer():
                return int(number)
    if "number" in types:
        number = _float_or_none(stripped)
        if number is not None:
            return number
    if "boolean" in types and lowered in _BOOLEANS:
        return _BOOLEANS[lowered]
    if "null" in types and lowered in ("", "none", "null"):
        return None
    return text


_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _float_or_none(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def normalise_value(value: object, types: tuple[str, ...]) -> object:
    """Canonical in-memory form: integral floats for integer fields become ints, ints for
    number fields become floats, so `guidance: 3` and `guidance: "{{ 3 }}"` share a key."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and "integer" in types and value.is_integer():
        return int(value)
    if isinstance(value, int) and "number" in types and "integer" not in types:
        return float(value)
    return value


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...] | frozenset[str]) -> str:
    import difflib  # (only for a name that is not known: not at every start)

    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@cache
def catalogue() -> dict[str, Model]:
    """Every generation model fluxbatch knows, by name, in the spec's order (deprecated ones
    last). A project's own models (`project_models`) are not among them."""
    models: dict[str, Model] = {}
    for filename, deprecated in ((SPEC_FILE, False), (DEPRECATED_FILE, True)):
        spec = _load_spec(filename)
        components = spec["components"]["schemas"]
        for path, item in spec["paths"].items():
            found = generation_endpoint(path, item)
            if found is not None:
                name, ref, post = found
                models[name] = build_model(name, ref, post, components, source=filename,
                                           deprecated=deprecated)
    return models


def generation_endpoint(path: str, item: Mapping[str, Any]) -> tuple[str, str, Any] | None:
    """(name, request schema name, its POST) of an OpenAPI path that makes images from a
    JSON request, `/v1/{name}`; None for any other path (finetuning ones included)."""
    post = item.get("post") if isinstance(item, Mapping) else None
    name = path.removeprefix("/v1/")
    ref = _request_ref(post)
    if ref is None or name == path or name.endswith("-finetuned") or "finetune" in name:
        return None
    return name, ref, post


def build_model(name: str, ref: str, post: Mapping[str, Any] | None,
                components: Mapping[str, Any], *, source: str, deprecated: bool) -> Model:
    schema = resolve_refs(components[ref], components)
    properties = {k: _tidy(v) for k, v in schema.get("properties", {}).items()}
    return Model(
        name=name,
        schema_title=ref,
        summary=str((post or {}).get("summary", schema.get("x-status", ""))),
        properties=properties,
        required=frozenset(schema.get("required", ())),
        deprecated=deprecated,
        source=f"{source} #/components/schemas/{ref}",
        checks={k: compile_check(v) for k, v in properties.items()
                if k not in INTERNAL_FIELDS},  # documented, but not for callers
        field_types={k: _types_of(v) for k, v in properties.items()},
    )


# The models of the project whose recipe is being read or planned (its committed
# `fluxbatch.models.json`, see `fluxbatch.project_models`): BFL ships models monthly, and a
# project may name one before a release of fluxbatch knows it. Set by `recipe.load` and by
# `expand` from the recipe they work on.
_PROJECT_MODELS: ContextVar[Mapping[str, Model]] = ContextVar(
    "project_models", default=MappingProxyType({}))


def use_project_models(found: Mapping[str, Model]) -> None:
    _PROJECT_MODELS.set(found)


def project_model(name: str) -> Model | None:
    """`name` when it is one of the current project's own models (never a known one)."""
    return _PROJECT_MODELS.get().get(name)


def known_names() -> list[str]:
    """Every model a recipe may name: fluxbatch's, then the current project's own."""
    return [*catalogue(), *_PROJECT_MODELS.get()]


def get(name: str) -> Model | None:
    return catalogue().get(name) or _PROJECT_MODELS.get().get(name)


def unknown_model_message(name: object) -> str:
    """`unknown model 'flux-pro-2' (did you mean 'flux-2-pro'?)`: a current model is
    suggested before a deprecated one."""
    current = [n for n, model in catalogue().items() if not model.deprecated]
    words = sorted(str(name).lower().split("-"))
    same_words = [n for n in current if sorted(n.split("-")) == words]  # flux-pro-2, flux-2-pro
    hint = f" (did you mean {same_words[0]!r}?)" if same_words else \
        did_you_mean(str(name), current) or did_you_mean(str(name), known_names())
    # a typo gets its correction alone; a name fluxbatch cannot place, or another version
    # of a model it knows (flux-pro-1.2), may be newer than this release
    newer = str(name).startswith("flux") and not same_words and (
        not _a_typo(str(name), known_names())
        or _versionless(str(name)) in {_versionless(n) for n in current})
    advice = f"; {ADD_ADVICE}" if newer else ""
    return f"unknown model {name!r}{hint}{advice}"


ADD_ADVICE = ("a model this release of fluxbatch does not know can be added to the project's "
              "own catalogue with `fluxbatch models --add openapi.json`")


def _a_typo(name: str, names: list[str]) -> bool:
    """`name` is a letter or two away from a known name (flux-dve, flux-kontext)."""
    import difflib

    return bool(difflib.get_close_matches(name, names, n=1, cutoff=0.85))


def _versionless(name: str) -> str:
    return re.sub(r"[\d.]+", "#", name)


def request_schema(name: str) -> dict[str, Any]:
    """A self-contained JSON Schema for the model's request body (used by the emulator)."""
    if name in catalogue():
        return _vendored_schema(name)
    model = _PROJECT_MODELS.get()[name]  # (a project's own: its schema, as the file holds it)
    return {"type": "object", "properties": dict(model.properties),
            "required": sorted(model.required)}


@cache
def _vendored_schema(name: str) -> dict[str, Any]:
    model = catalogue()[name]
    spec = _load_spec(DEPRECATED_FILE if model.deprecated else SPEC_FILE)
    components = spec["components"]["schemas"]
    schema: dict[str, Any] = resolve_refs(components[model.schema_title], components)
    return schema


def concurrency_cap(name: str) -> int:
    return MODEL_CONCURRENCY.get(name, ACCOUNT_CONCURRENCY)


def estimate_cost(name: str, request: Mapping[str, Any]) -> float | None:
    """Estimated USD for one image, or None when no price is known."""
    price = PRICES.get(name)
    if price is None:
        return None
    if price.per_extra_mp is None:
        return price.usd
    width, height = request.get("width") or 0, request.get("height") or 0
    output_mp = (width * height) / 1_000_000 if width and height else 1.0
    input_mp = sum(_megapixels(value) for name, value in request.items()
                   if name.startswith("input_image") and value)
    extra = max(0.0, math.ceil(output_mp * 100) / 100 - 1.0) + input_mp
    return round(price.usd + extra * price.per_extra_mp, 6)


def _megapixels(value: object) -> float:
    """An input's megapixels as billed (two decimals, up), when its size is known; else 1."""
    if isinstance(value, Mapping) and value.get("width") and value.get("height"):
        return float(math.ceil(value["width"] * value["height"] / 10_000)) / 100
    return 1.0


def _load_spec(filename: str) -> dict[str, Any]:
    text = resources.files("fluxbatch").joinpath("data", filename).read_text(encoding="utf-8")
    spec: dict[str, Any] = json.loads(text)
    return spec


def _request_ref(post: Mapping[str, Any] | None) -> str | None:
    if not post:
        return None
    schema = post.get("requestBody", {}).get("content", {}).get("application/json", {})
    ref = schema.get("schema", {}).get("$ref", "")
    return str(ref).rsplit("/", 1)[-1] or None


def resolve_refs(node: Any, components: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return resolve_refs(components[node["$ref"].rsplit("/", 1)[-1]], components)
        return {k: resolve_refs(v, components) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_refs(v, components) for v in node]
    return node


def _tidy(node: Any) -> Any:
    """Integral float bounds (1440.0) become ints so messages read "maximum of 1440"."""
    if isinstance(node, dict):
        return {k: _tidy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    if isinstance(node, float) and node.is_integer():
        return int(node)
    return node


def _types_of(schema: Mapping[str, Any]) -> tuple[str, ...]:
    if "anyOf" in schema:
        return tuple(t for branch in schema["anyOf"] for t in _types_of(branch))
    if "type" in schema:
        kind = schema["type"]
        return tuple(kind) if isinstance(kind, list) else (kind,)
    if "enum" in schema:
        return ("string",)
    return ()


# -- the compiled checks ------------------------------------------------------------------

TYPE_TESTS: dict[str, Callable[[object], bool]] = {
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    # JSON has no NaN or infinity: a request body could not carry them
    "number": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and math.isfinite(v)),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def compile_check(schema: Mapping[str, Any]) -> Check:
    """A function returning jsonschema's message for the first failure, or None."""
    if "anyOf" in schema:
        branches = [compile_check(b) for b in schema["anyOf"]]
        null_ok = any(b.get("type") == "null" for b in schema["anyOf"])

        def any_of(value: object) -> str | None:
            if value is None and null_ok:
                return None
            first: str | None = None
            for branch in branches:
                message = branch(value)
                if message is None:
                    return None
                if first is None:
                    first = message
            return first

        return any_of
    steps: list[Check] = []
    kind = schema.get("type")
    if kind is not None:  # (a list of types in a project's own catalogue: any of them)
        kinds = tuple(kind) if isinstance(kind, list) else (kind,)
        tests = tuple(TYPE_TESTS[k] for k in kinds)
        shown = ", ".join(repr(k) for k in kinds)
        steps.append(lambda v: None if any(test(v) for test in tests) else
                     f"{v!r} is not of type {shown}")
    if "enum" in schema:
        allowed = list(schema["enum"])
        steps.append(lambda v: None if v in allowed else f"{v!r} is not one of {allowed!r}")
    steps.extend(_numeric_checks(schema))
    if "minLength" in schema or "maxLength" in schema:
        low, high = schema.get("minLength", 0), schema.get("maxLength", math.inf)

        def length(v: object) -> str | None:
            if not isinstance(v, str):
                return None
            if len(v) < low:
                return f"{v!r} is too short" if low > 1 else f"{v!r} should be non-empty"
            return f"{v!r} is too long" if len(v) > high else None

        steps.append(length)

    def check(value: object) -> str | None:
        for step in steps:
            message = step(value)
            if message is not None:
                return message
        return None

    return check


def _numeric_checks(schema: Mapping[str, Any]) -> list[Check]:
    def numeric(v: object) -> TypeGuard[int | float]:
        return isinstance(v, int | float) and not isinstance(v, bool)

    checks: list[Check] = []
    if "minimum" in schema:
        low = schema["minimum"]
        checks.append(
            lambda v: f"{v!r} is less than the minimum of {low}" if numeric(v) and v < low else None
        )
    if "maximum" in schema:
        high = schema["maximum"]
        checks.append(
            lambda v: f"{v!r} is greater than the maximum of {high}"
            if numeric(v) and v > high
            else None
        )
    if "multipleOf" in schema:
        step = schema["multipleOf"]
        checks.append(
            lambda v: f"{v!r} is not a multiple of {step}" if numeric(v) and v % step else None
        )
    return checks
