"""Identity: the canonical JSON, job keys and auto seeds that make plans reproducible.

These definitions are a contract with every manifest ever written: changing them re-keys or
re-seeds every image. `job_key` and `auto_seed` are the definitions; `ObjectJson` and
`KeyHasher` compute the same texts faster for the planner's hot loop (tests check equality).
The planner's auto seeds come from `AutoSeeds`, which `auto_seed` itself uses: one
implementation, with the definition in `auto_seed`'s docstring (and a test that recomputes
it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from fluxbatch import models
from fluxbatch.inputs import InputFile, input_identity
from fluxbatch.models import is_image_field

SEED_MODULUS = 2**31  # auto seeds lie in [0, 2**31 - 1]: valid for every Flux endpoint

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              default=str)


def canonical_json(value: object) -> str:
    """Sorted keys, no spaces, UTF-8 text: the one serialisation keys and seeds hash."""
    return _CANONICAL.encode(value)


def job_key(model: str, request: Mapping[str, object]) -> str:
    """sha256 of what determines the pixels: the model and the body minus webhooks, with
    each image input standing for its content (its sha256) or its URL, never its path."""
    pixels = {k: input_identity(v) if is_image_field(k) else v for k, v in request.items()
              if k not in models.NON_PIXEL_FIELDS}
    return hashlib.sha256(canonical_json({"model": model, "request": pixels}).encode()).hexdigest()


_encode_string: Callable[[str], str] = json.encoder.encode_basestring


# (`value: Any`: the `type(value) is ...` tests, faster than isinstance on this hot path, do
# not narrow for the type checker)
def _scalar_json(value: Any) -> str:
    """`canonical_json(value)` for the scalars a rendered parameter can be, quickly."""
    kind = type(value)
    if kind is str:
        return _encode_string(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if kind is InputFile:  # a file of a `files:` variable: its content, not its name
        return _encode_string(value.identity)
    return canonical_json(value)


class ObjectJson:
    """`canonical_json` of a flat mapping, faster for a run of mappings with the same keys:
    the keys' order and JSON (and the JSON of values that never change) are worked out once;
    only the varying values are encoded per call. Gives exactly `canonical_json`'s text (a
    test checks); planning hashes two such texts per image."""

    def __init__(self, constants: Mapping[str, object] | None = None,
                 skip: frozenset[str] = frozenset()) -> None:
        self.constants = constants or {}
        self.skip = skip
        # per key order: a format string with the constants filled in, and the varying keys
        self.layouts: dict[tuple[str, ...], tuple[str, tuple[str, ...]]] = {}

    def __call__(self, mapping: Mapping[str, object]) -> str:
        fields = tuple(mapping)
        layout = self.layouts.get(fields)
        if layout is None:
            layout = self.layouts[fields] = self._layout(mapping)
        template, varying = layout
        encode = _encode_string
        return template.format(*[encode(v) if type(v) is str else _scalar_json(v)
                                 for v in map(mapping.__getitem__, varying)])

    def _layout(self, mapping: Mapping[str, object]) -> tuple[str, tuple[str, ...]]:
        pieces, varying = [], []
        for name in sorted(mapping):
            if name in self.skip:
                continue
            key = _encode_string(name).replace("{", "{{").replace("}", "}}")
            if name in self.constants:
                value = _scalar_json(mapping[name]).replace("{", "{{").replace("}", "}}")
                pieces.append(f"{key}:{value}")
            else:
                pieces.append(f"{key}:{{}}")
                varying.append(name)
        return "{{" + ",".join(pieces) + "}}", tuple(varying)


class KeyHasher:
    """`job_key` for a run of requests to one model with the same constant parameters."""

    def __init__(self, model: str, constants: Mapping[str, object]) -> None:
        self.prefix = f'{{"model":{_scalar_json(model)},"request":'
        self.request_json = ObjectJson(constants, models.NON_PIXEL_FIELDS)
        known = models.get(model)
        self.images = frozenset(name for name in (known.properties if known else ())
                                if is_image_field(name))

    def __call__(self, request: Mapping[str, object]) -> str:
        if self.images and not self.images.isdisjoint(request):
            request = {k: input_identity(v) if k in self.images else v
                       for k, v in request.items()}
        text = f"{self.prefix}{self.request_json(request)}}}"
        return hashlib.sha256(text.encode()).hexdigest()


def auto_seed(recipe_name: str, job_name: str, combination: Mapping[str, object],
              replicate: int) -> int:
    """The `seed: auto` of an image: the first 8 bytes of the sha256 of
    `canonical_json([recipe_name, job_name, combination, replicate])`, as a big-endian
    integer, modulo 2**31, where a file of a `files:` variable stands for its content (its
    `InputFile.identity`). Derived from content, never from position: reordering values, or
    renaming a file, changes no seed."""
    return AutoSeeds(recipe_name, job_name)(combination, replicate)


class AutoSeeds:
    """`auto_seed` for the images of one job, computed in pieces for the planner's hot loop:
    `[recipe, job,` is encoded once, and a combination's values once for all its
    replicates (consecutive calls with the same mapping share its JSON)."""

    __slots__ = ("head", "last", "values_json")

    def __init__(self, recipe_name: str, job_name: str) -> None:
        self.head = canonical_json([recipe_name, job_name])[:-1] + ","
        self.values_json = ObjectJson()  # (an InputFile as its identity, as canonical_json)
        self.last: tuple[Mapping[str, object] | None, str] = (None, "")

    def __call__(self, combination: Mapping[str, object], replicate: int) -> int:
        owner, prefix = self.last
        if owner is not combination:  # (kept referenced: its id cannot be reused meanwhile)
            prefix = f"{self.head}{self.values_json(combination)},"
            self.last = (combination, prefix)
        digest = hashlib.sha256(f"{prefix}{replicate}]".encode()).digest()
        return int.from_bytes(digest[:8], "big") % SEED_MODULUS


