"""A project's own models: `fluxbatch.models.json`, beside the recipes, for the models BFL
published after this release of fluxbatch was made.

`fluxbatch models --add openapi.json` takes BFL's published OpenAPI document and keeps, in
that file, the generation endpoints (`POST /v1/{name}`) fluxbatch does not know, each with
its request schema made self-contained. The file is committed with the recipes and reviewed
like them; every recipe of the project may then name those models. Their requests are checked
against the schema the file holds (by the same compiled checks as fluxbatch's own), but
nothing else is known of them: no price (so `--budget` refuses them), no cap of their own,
and `validate` says so.

The file is data a pull request can change, so it is read like any file a recipe reads
(inside the project, bounded) and checked before use: names that are safe in a URL path and
not fluxbatch's own, schemas of the shape fluxbatch compiles, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxbatch import models

FILE = "fluxbatch.models.json"
FORMAT = 1
MAX_BYTES = 4 * 1024 * 1024
# A model's name is a segment of the submit URL (`/v1/{name}`): nothing that could leave it.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# What the compiled checks understand of a property's schema (the rest is not checked here,
# only by the provider, which refuses a bad request without charging for it).
_UNDERSTOOD = frozenset({"type", "anyOf", "enum", "minimum", "maximum", "exclusiveMinimum",
                         "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "default",
                         "description", "title", "examples", "example", "format",
                         "nullable", "deprecated", "x-status"})


class CatalogueError(Exception):
    """The project's catalogue (or a spec given to `--add`) cannot be used; says why."""


@dataclass(frozen=True, slots=True)
class ProjectCatalogue:
    path: Path
    sha256: str
    models: Mapping[str, models.Model]

    def reference(self) -> dict[str, str]:
        """What plans, manifests and images record of it (a model of it was checked against
        this file, not against fluxbatch's vendored spec)."""
        return {"path": FILE, "sha256": self.sha256}


def read(path: Path, data: bytes) -> ProjectCatalogue:
    """The models of a project's catalogue file (its bytes read, confined, by the caller)."""
    document = _json(data, path.name)
    if not isinstance(document, dict) or document.get("fluxbatch_models") != FORMAT:
        raise CatalogueError(f"{path.name}: not a catalogue of fluxbatch's "
                             f"(`\"fluxbatch_models\": {FORMAT}` is missing); it is written "
                             "by `fluxbatch models --add`")
    found = _models_of(document, source=path.name, known=models.catalogue())
    return ProjectCatalogue(path, hashlib.sha256(data).hexdigest(), found)


def added(spec_data: bytes, spec_name: str, current: bytes | None) -> tuple[dict[str, Any],
                                                                           list[str]]:
    """The catalogue document with the new models of an OpenAPI spec added (to `current`, the
    file's bytes when it exists), and the names added or changed. A model already in the
    file is replaced by the spec's version of it; one the spec repeats unchanged is not
    named."""
    spec = _json(spec_data, spec_name)
    components = spec.get("components", {}).get("schemas") if isinstance(spec, dict) else None
    paths = spec.get("paths") if isinstance(spec, dict) else None
    if not isinstance(paths, dict) or not isinstance(components, dict):
        raise CatalogueError(f"{spec_name}: not an OpenAPI document (no `paths` and "
                             "`components.schemas`): download it from the provider, e.g. "
                             "https://api.bfl.ai/openapi.json")
    document: dict[str, Any] = _json(current, FILE) if current else {}
    if current and (not isinstance(document, dict) or
                    document.get("fluxbatch_models") != FORMAT):
        raise CatalogueError(f"{FILE}: not a catalogue of fluxbatch's; move it away first")
    kept = dict(document.get("models") or {}) if document else {}
    names = []
    for path, item in paths.items():
        endpoint = models.generation_endpoint(str(path), item)
        if endpoint is None or endpoint[0] in models.catalogue():
            continue
        name, ref, post = endpoint
        try:
            schema = models.resolve_refs(components[ref], components)
        except (KeyError, RecursionError, TypeError):
            raise CatalogueError(f"{spec_name}: the request schema of {name!r} ({ref}) "
                                 "cannot be resolved") from None
        entry = {"summary": str((post or {}).get("summary", "")), "schema": schema}
        if kept.get(name) != entry:
            kept[name] = entry
            names.append(name)
    source = {"file": Path(spec_name).name,
              "sha256": hashlib.sha256(spec_data).hexdigest(),
              "version": str((spec.get("info") or {}).get("version", ""))}
    added_from = [s for s in (document.get("added_from") or []) if s != source] if document \
        else []
    result = {"fluxbatch_models": FORMAT, "added_from": [*added_from, source],
              "models": dict(sorted(kept.items()))}
    _models_of(result, source=FILE, known=models.catalogue())  # (checked as it will be read)
    return result, names


def unchecked_keywords(model: models.Model) -> list[str]:
    """`pattern on 'style'`: what a property's schema asks that fluxbatch does not check
    before sending (the provider still does)."""
    found = []
    for field, schema in model.properties.items():
        for branch in (schema, *schema.get("anyOf", ())):
            found += [f"{word} on {field!r}" for word in sorted(set(branch) - _UNDERSTOOD)]
    return sorted(set(found))


def _models_of(document: Mapping[str, Any], *, source: str,
               known: Mapping[str, models.Model]) -> dict[str, models.Model]:
    entries = document.get("models")
    if not isinstance(entries, dict):
        raise CatalogueError(f"{source}: `models` is not a mapping of model names")
    found = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise CatalogueError(f"{source}: {name!r} is not a model name (lower-case letters, "
                                 "digits, '.', '-' and '_')")
        if name in known:
            raise CatalogueError(f"{source}: {name!r} is one of fluxbatch's own models; "
                                 "remove it from the project's catalogue")
        schema = entry.get("schema") if isinstance(entry, dict) else None
        try:
            found[name] = _model(name, entry, schema, source)
        except (AttributeError, KeyError, TypeError, ValueError, RecursionError):
            raise CatalogueError(f"{source}: the request schema of {name!r} is not one "
                                 "fluxbatch can check (an object with `properties`, each "
                                 "a type, a range, an enum or `anyOf` of those)") from None
    return found


def _model(name: str, entry: Mapping[str, Any], schema: Any, source: str) -> models.Model:
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        raise ValueError(name)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(name)
    for field, prop in schema["properties"].items():
        if not isinstance(field, str):
            raise ValueError(name)
        _check_shape(prop)
    return models.build_model(name, "Request", {"summary": str(entry.get("summary", ""))},
                              {"Request": schema}, source=source, deprecated=False)


_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _check_shape(prop: Any) -> None:
    """A property's schema is of the shape the compiled checks read, or ValueError (a
    schema the checks would stumble over while validating a recipe)."""
    if not isinstance(prop, dict):
        raise ValueError(prop)
    kind = prop.get("type")
    kinds = kind if isinstance(kind, list) else [] if kind is None else [kind]
    if not all(isinstance(k, str) and k in models.TYPE_TESTS for k in kinds):
        raise ValueError(kind)
    for word in _NUMBERS:
        value = prop.get(word)
        if word in prop and (not isinstance(value, int | float) or isinstance(value, bool)
                             or value != value or value in (float("inf"), float("-inf"))):
            raise ValueError(word)
    for word in ("minLength", "maxLength"):
        if word in prop and (not isinstance(prop[word], int) or isinstance(prop[word], bool)):
            raise ValueError(word)
    if "enum" in prop and not isinstance(prop["enum"], list):
        raise ValueError("enum")
    branches = prop.get("anyOf", [])
    if not isinstance(branches, list):
        raise ValueError("anyOf")
    for branch in branches:
        _check_shape(branch)


def _json(data: bytes | None, name: str) -> Any:
    if data is None:
        return None
    if len(data) > MAX_BYTES:
        raise CatalogueError(f"{name}: larger than {MAX_BYTES // (1024 * 1024)} MiB")
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CatalogueError(f"{name}: not JSON ({error})") from None
    except RecursionError:
        raise CatalogueError(f"{name}: nested too deeply") from None
