"""Manifests as the state reads them back: `<recipe>.manifest.json` (and the first
release's `manifest.json`), each checked whole before anything is read, written or deleted
through it; and the shape of an entry (`Provenance`, `ManifestEntry`). They are written by
`write.write_manifest`, from the placements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NotRequired, Required, TypedDict

from fluxbatch.errors import StateError
from fluxbatch.layout import (
    DATABASE,
    LEGACY_MANIFEST,
    STATE_DIR,
    manifest_name,
    output_path_problem,
)
from fluxbatch.outcomes import OutcomeStatus


class RecipeRef(TypedDict):
    name: str
    sha256: str


class Provenance(TypedDict):
    """An image's manifest entry as embedded in the image (`write.provenance`): everything but
    the file's own hash and size. A contract: schemas/manifest.schema.json."""

    path: str  # the file, relative to the output root (with its real format's extension)
    output: str  # the planned output path
    key: str  # sha256 of the model and request: the same key is the same image
    job: str
    vars: dict[str, object]  # the matrix combination
    replicate: int
    prompt: str | None
    model: str
    request: dict[str, object]  # the body sent, secrets as ***, image inputs as descriptors
    seed: int
    reported_seed: int | None
    provider: str
    task_id: str | None
    cost: float | None  # credits reported (1 credit = $0.01)
    submitted_at: str | None  # ISO 8601, UTC
    finished_at: str | None
    recipe: RecipeRef
    pinned: bool  # False: a floating model (`*-preview`), which the provider may change
    spec_date: str  # of the vendored BFL spec
    # a model of the project's own catalogue: that file (relative to the recipe's project)
    # and its sha256, since the request was checked against it, not against spec_date's spec
    model_catalogue: NotRequired[dict[str, str]]
    fluxbatch: str  # the version that wrote it
    status: Literal[OutcomeStatus.WRITTEN]


class ManifestEntry(Provenance):
    """An image's entry in its recipe's manifest and in the state store: its provenance, and
    the sha256 and size of the file as written (provenance included). An entry read back may
    come from a file (a manifest, an image's provenance) that only its path, key, sha256 and
    bytes were checked in: read the other fields with `.get`."""

    sha256: str
    bytes: int


class ManifestRecipe(TypedDict, total=False):
    name: str
    path: str | None  # the recipe file, relative to the output root
    sha256: str


class Manifest(TypedDict, total=False):
    """A manifest as read back. Only the shape of `images` was checked (see
    `_manifest_shape_problems`): anyone can edit the file, so read the rest with `.get`."""

    images: Required[list[ManifestEntry]]
    recipe: ManifestRecipe
    manifest_version: int
    fluxbatch: str
    spec_date: str
    model_catalogue: dict[str, str]
    updated_at: str
    totals: dict[str, object]


def read_manifest(root: Path, recipe: str) -> Manifest | None:
    """`recipe`'s manifest (or the first release's `manifest.json`, when it is this recipe's),
    or None when there is none; a clear error when it is damaged."""
    document = _read_manifest_file(root / manifest_name(recipe))
    if document is None:
        legacy = _read_manifest_file(root / LEGACY_MANIFEST)
        if legacy is not None and (legacy.get("recipe") or {}).get("name") == recipe:
            return legacy
    return document


def read_manifests(root: Path) -> list[Manifest]:
    """Every manifest in the root (each recipe's, and a first-release `manifest.json`)."""
    found = []
    names = sorted(p.name for p in root.glob("*.manifest.json")) if root.is_dir() else []
    for name in [*names, LEGACY_MANIFEST]:
        document = _read_manifest_file(root / name)
        if document is not None:
            found.append(document)
    return found


def _read_manifest_file(path: Path) -> Manifest | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise StateError(f"{path}: cannot read the manifest: {error}") from None
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        where = f":{error.lineno}:{error.colno}" if isinstance(error, json.JSONDecodeError) \
            else ""
        detail = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise StateError(
            f"{path}{where}: the manifest is not valid JSON ({detail}). Restore it (from "
            f"version control), or delete it: {_rewritten_from(path.parent)}. No image is "
            "touched.") from None
    problems = _manifest_shape_problems(document)
    if problems:
        raise StateError(f"{path}: the manifest is damaged: {problems}. Restore it (from "
                         f"version control), or delete it: {_rewritten_from(path.parent)}. "
                         "No image is touched.")
    manifest: Manifest = document  # (its shape checked just now)
    return manifest


def _rewritten_from(root: Path) -> str:
    store = root / STATE_DIR / DATABASE
    if store.exists():
        return f"fluxbatch rewrites it from {store}"
    return "fluxbatch then recognises your images by the provenance embedded in them"


def _manifest_shape_problems(document: object) -> str | None:
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        return "expected an object with an 'images' list"
    for index, entry in enumerate(document["images"]):
        if not isinstance(entry, dict):
            return f"images[{index}] is not an object"
        for name, kind in (("path", str), ("key", str), ("sha256", str), ("bytes", int)):
            if not isinstance(entry.get(name), kind):
                return f"images[{index}].{name} is missing or not a {kind.__name__}"
        # A manifest is data anyone can edit: its paths are held to the rules of a recipe's
        # output paths (relative, no `..`, not into .fluxbatch/) before anything is read,
        # written or deleted through them.
        output = entry.get("output", entry["path"])
        if not isinstance(output, str):
            return f"images[{index}].output is not a str"
        problem = output_path_problem(entry["path"]) or output_path_problem(output)
        if problem is not None:
            return f"images[{index}] is refused: {problem}"
    return None
