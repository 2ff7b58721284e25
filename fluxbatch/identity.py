"""Identity: the canonical JSON, job keys and auto seeds that make plans reproducible.

These definitions are a contract with every manifest ever written: changing them re-keys or
re-seeds every image. `job_key` and `auto_seed` are the definitions; `ObjectJson` and
`KeyHasher` compute the same texts faster for the planner's hot loop (tests check equality).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from fluxbatch import models

SEED_MODULUS = 2**31  # auto seeds lie in [0, 2**31 - 1]: valid for every Flux endpoint

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              default=str)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 text: the one serialisation keys and seeds hash."""
    return _CANONICAL.encode(value)


def job_key(model: str, request: Mapping[str, Any]) -> str:
    """sha256 of what determines the pixels: the model and the body minus webhooks."""
    pixels = {k: v for k, v in request.items() if k not in models.NON_PIXEL_FIELDS}
    return hashlib.sha256(canonical_json({"model": model, "request": pixels}).encode()).hexdigest()


_encode_string = json.encoder.encode_basestring


def _scalar_json(value: Any) -> str:
    """`canonical_json(value)` for the scalars a rendered parameter can be, quickly."""
    kind = type(value)
    if kind is str:
        return str(_encode_string(value))
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return canonical_json(value)


class ObjectJson:
    """`canonical_json` of a flat mapping, faster for a run of mappings with the same keys:
    the keys' order and JSON (and the JSON of values that never change) are worked out once;
    only the varying values are encoded per call. Gives exactly `canonical_json`'s text (a
    test checks); planning hashes two such texts per image."""

    def __init__(self, constants: Mapping[str, Any] | None = None,
                 skip: frozenset[str] = frozenset()) -> None:
        self.constants = constants or {}
        self.skip = skip
        self.layouts: dict[tuple[str, ...], tuple[tuple[str, str, str | None], ...]] = {}

    def __call__(self, mapping: Mapping[str, Any]) -> str:
        fields = tuple(mapping)
        layout = self.layouts.get(fields)
        if layout is None:
            layout = tuple(
                (name, f"{_encode_string(name)}:",
                 _scalar_json(mapping[name]) if name in self.constants else None)
                for name in sorted(fields) if name not in self.skip)
            self.layouts[fields] = layout
        body = ",".join([prefix + (encoded if encoded is not None else _scalar_json(mapping[name]))
                         for name, prefix, encoded in layout])
        return f"{{{body}}}"


class KeyHasher:
    """`job_key` for a run of requests to one model with the same constant parameters."""

    def __init__(self, model: str, constants: Mapping[str, Any]) -> None:
        self.prefix = f'{{"model":{_scalar_json(model)},"request":'
        self.request_json = ObjectJson(constants, models.NON_PIXEL_FIELDS)

    def __call__(self, request: Mapping[str, Any]) -> str:
        text = f"{self.prefix}{self.request_json(request)}}}"
        return hashlib.sha256(text.encode()).hexdigest()


def auto_seed(recipe_name: str, job_name: str, combination: Mapping[str, Any],
              replicate: int) -> int:
    """Derived from content, never from position: reordering values changes no seed."""
    text = canonical_json([recipe_name, job_name, combination, replicate])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


