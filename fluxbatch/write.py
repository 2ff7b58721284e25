"""Stage 5: write images and the manifest — atomically, and only what really arrived.

An image is written to a temporary file in the output root's `.fluxbatch/tmp/` (no debris
beside images), flushed to disk, and renamed over its target (`os.replace`; copied beside it
first when the output folder is on another file system), so a reader (or a crash) never sees
half a file; files are created as `open()` creates them, so their permissions follow the
umask. An image's extension follows the bytes, not the request: a JPEG is never saved as
`.png`. The manifest entry travels inside the image too (see `imagemeta`), minus what cannot
be known before writing (its own hash and size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from fluxbatch import imagemeta, models
from fluxbatch.jobs import Job
from fluxbatch.layout import (
    LEGACY_MANIFEST,
    TMP,
    manifest_name,
    state_path,
    stored_path_problem,
)
from fluxbatch.money import Spend
from fluxbatch.outcomes import OutcomeStatus, Written
from fluxbatch.recipe import Recipe
from fluxbatch.state.files import replacing
from fluxbatch.state.manifests import ManifestEntry, Provenance
from fluxbatch.state.store import Store
from fluxbatch.version import __version__

MANIFEST_VERSION = 2
SCHEMA_URL = "https://raw.githubusercontent.com/fluxbatch/fluxbatch/main/schemas/manifest.schema.json"


class NotAnImage(Exception):
    """The provider's bytes are not an image we can store."""


def atomic_write(target: Path, data: bytes, temp_dir: Path | None = None) -> int:
    """Write `data` to `target` atomically; return the new file's mtime in ns. The temporary
    file lives in `temp_dir`, so a crash leaves no debris beside images (an output folder on
    another file system gets a copy beside the target first: `state.files.move_into_place`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target, temp_dir or target.parent) as handle:
        handle.write(data)
    return os.stat(target).st_mtime_ns


def real_path(planned: str, data: bytes) -> str:
    """The planned path with the extension of the format the bytes really are."""
    fmt = imagemeta.sniff(data)
    if fmt not in imagemeta.WRITABLE:
        start = " ".join(f"{b:02x}" for b in data[:8])
        kind = f"a {fmt.upper()} image" if fmt else f"not an image (it starts with {start})"
        raise NotAnImage(f"the provider returned {kind}; fluxbatch stores PNG, JPEG and WebP")
    extension = imagemeta.EXTENSIONS[fmt]
    stem, current = posixpath.splitext(planned)
    if current.lower().lstrip(".") in ({"jpg", "jpeg"} if fmt == "jpeg" else {extension}):
        return planned
    return f"{stem}.{extension}"


def check_image(data: bytes) -> None:
    """Raise NotAnImage or ImageFormatError unless `data` is an image fluxbatch can place
    (checked before the bytes are kept, so that the store never holds what cannot be used)."""
    real_path("x", data)
    imagemeta.embed(data, {})


def provenance(job: Job, *, recipe: Recipe, provider: str, task_id: str | None,
               cost: float | None, reported_seed: int | None, submitted_at: float | None,
               finished_at: float | None, path: str) -> Provenance:
    """The manifest entry of one image, without its own hash and size (embedded as is)."""
    entry: Provenance = {
        "path": path,
        "output": job.output,
        "key": job.key,
        "job": job.job,
        "vars": dict(job.vars),
        "replicate": job.replicate,
        "prompt": job.prompt,
        "model": job.model,
        "request": models.redact(job.request),
        "seed": job.seed,
        "reported_seed": reported_seed,
        "provider": provider,
        "task_id": task_id,
        "cost": cost,
        "submitted_at": _iso(submitted_at),
        "finished_at": _iso(finished_at),
        "recipe": {"name": recipe.name, "sha256": recipe.sha256},
        # (a floating model may change under its name: the same request may not make the
        # same image again; see `reproduce --verify`)
        "pinned": models.floating(job.model) is None,
        "spec_date": models.SPEC_DATE,
        "fluxbatch": __version__,
        "status": OutcomeStatus.WRITTEN,
    }
    if recipe.catalogue is not None and models.project_model(job.model) is not None:
        entry["model_catalogue"] = recipe.catalogue.reference()
    return entry


def place(root: Path, job: Job, data: bytes, entry: Provenance,
          previous_path: str | None, shared: bool = False) -> tuple[Written, ManifestEntry]:
    """Embed the provenance, write the file atomically, and return the full manifest entry.
    A previous image of this output under another name (another extension) is removed,
    unless another recipe's image is that file (`shared`)."""
    path = real_path(job.output, data)
    payload: Provenance = {**entry, "path": path}
    stamped = imagemeta.embed(data, payload, parameters_text(payload, data))
    mtime_ns = atomic_write(root / path, stamped, temp_dir(root))
    # (the previous path was read back from the store, and may have come from a manifest:
    # nothing outside the root, or reached through a link, is deleted)
    if previous_path and previous_path != path and not shared and \
            stored_path_problem(root, previous_path) is None:
        with contextlib.suppress(OSError):
            os.unlink(root / previous_path)
    written = Written(path, hashlib.sha256(stamped).hexdigest(), len(stamped), mtime_ns)
    return written, {**payload, "sha256": written.sha256, "bytes": written.size}


# A1111's `parameters` text names a sampler, and its readers (sd-parsers, for one) take a
# text for theirs only with three of Sampler, Steps, Seed, CFG scale, ENSD and Schedule type.
# The provider samples as it sees fit, and BFL documents neither sampler nor schedule: these
# two say so in A1111's own words ("Automatic": the sampler's default schedule).
SAMPLER, SCHEDULE = "flux", "Automatic"


def parameters_text(entry: Provenance, data: bytes) -> str:
    """The A1111-style `parameters` text an image carries beside its provenance: the
    prompt, then `Steps: 28, Sampler: flux, Schedule type: Automatic, Seed: 42, Size:
    1024x768, Model: flux-dev, Guidance: 3, Version: fluxbatch 1.2.0`, with only the
    fields the request has (see docs/manifest.md). `Size` is the request's width and
    height, else (a model sized by aspect ratio or by its input) the image's own."""
    request = entry["request"]
    fields: list[tuple[str, object]] = []
    if _positive(request.get("steps")):
        fields.append(("Steps", request["steps"]))
    fields += [("Sampler", SAMPLER), ("Schedule type", SCHEDULE), ("Seed", entry["seed"])]
    width, height = request.get("width"), request.get("height")
    size = (width, height) if _positive(width) and _positive(height) \
        else imagemeta.dimensions(data)
    if size is not None:
        fields.append(("Size", f"{size[0]}x{size[1]}"))
    fields.append(("Model", entry["model"]))
    if _positive(request.get("guidance")):
        fields.append(("Guidance", f"{request['guidance']:g}"))
    fields.append(("Version", f"fluxbatch {__version__}"))
    line = ", ".join(f"{name}: {_quoted(value)}" for name, value in fields)
    prompt = entry["prompt"]
    return f"{prompt}\n{line}" if prompt else line


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _quoted(value: object) -> str:
    """A value as A1111 writes one: in JSON quotes when a comma, colon or newline in it
    would end it early for a reader."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def manifest_path(recipe: Recipe) -> Path:
    return recipe.output_root / manifest_name(recipe.name)


def write_manifest(recipe: Recipe, store: Store) -> Path:
    """The recipe's manifest, from the store: one image per line, so that a diff in review
    shows the images that changed, written from the store's own JSON text (no entry is held
    in memory). A first-release `manifest.json` of this recipe gives way to it."""
    target = manifest_path(recipe)
    root = recipe.output_root
    try:
        recipe_path = os.path.relpath(recipe.path, root)
    except ValueError:
        recipe_path = str(recipe.path)
    head = {
        "$schema": SCHEMA_URL,
        "manifest_version": MANIFEST_VERSION,
        "fluxbatch": __version__,
        "recipe": {"name": recipe.name, "path": recipe_path, "sha256": recipe.sha256},
        "spec_date": models.SPEC_DATE,
        **({"model_catalogue": recipe.catalogue.reference()} if recipe.catalogue else {}),
        "updated_at": _iso(time.time()),
    }
    count = 0
    size = credits = 0.0
    with replacing(target, temp_dir(root), "w") as handle:
        handle.write(json.dumps(head, ensure_ascii=False)[:-1] + ',\n"images": [')
        for text in store.entries_json(recipe.name):
            handle.write(",\n" if count else "\n")
            handle.write(text)
            count += 1
            size += _number(text, '"bytes":')
            credits += _number(text, '"cost":')
        totals = {"images": count, "bytes": int(size), "cost_credits": round(credits, 4),
                  "runs": run_totals(store, recipe.name)}
        handle.write(("\n" if count else "") + '],\n"totals": '
                     + json.dumps(totals) + "\n}\n")
    store.wrote_manifest(recipe.name, target)
    _retire_legacy_manifest(root, recipe.name)
    return target


_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def run_totals(store: Store, recipe: str) -> list[dict[str, object]]:
    """What each run paid for the recipe's images, from the ledger (as `fluxbatch spend
    --by run` says it), oldest first."""
    runs: dict[str, Spend] = {}
    for row in store.charges(recipe=recipe):
        name = row.run or "?"
        runs.setdefault(name, Spend(name)).add(row)
    return [{"run": name, **{k: v for k, v in spent.as_json().items() if k != "group"}}
            for name, spent in runs.items()]


def _number(text: str, field: str) -> float:
    """A top-level number in an entry's JSON text: the manifest's totals without parsing
    every entry. Keys are sorted, so `bytes` and `cost` come before any nested object."""
    at = text.find(field)
    found = _NUMBER.match(text, at + len(field)) if at >= 0 else None
    return float(found.group(1)) if found else 0.0


def _retire_legacy_manifest(root: Path, recipe: str) -> None:
    """A first-release `manifest.json` that was this recipe's is replaced by its own."""
    legacy = root / LEGACY_MANIFEST
    try:
        document = json.loads(legacy.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(document, dict) and (document.get("recipe") or {}).get("name") == recipe:
        with contextlib.suppress(OSError):
            legacy.unlink()


def temp_dir(root: Path) -> Path:
    return state_path(root, TMP)


def clear_debris(root: Path) -> None:
    """Remove temporary files a killed run left behind (call while holding the root lock)."""
    directory = temp_dir(root)
    if directory.is_dir():
        for leftover in directory.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")


def manifest_schema() -> dict[str, object]:
    """The JSON Schema of `<recipe>.manifest.json` (published as schemas/manifest.schema.json)."""
    nullable_number = {"type": ["number", "null"]}
    timestamp = {"type": ["string", "null"], "description": "ISO 8601, UTC"}
    catalogue = {"type": "object", "required": ["path", "sha256"],
                 "description": "the project's own catalogue of models (its "
                 "fluxbatch.models.json), which a model this release does not know came from",
                 "properties": {"path": {"type": "string"},
                                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}
    entry = {
        "type": "object",
        "required": ["path", "output", "key", "job", "vars", "replicate", "prompt", "model",
                     "request", "seed", "reported_seed", "provider", "task_id", "cost",
                     "submitted_at", "finished_at", "sha256", "bytes", "status"],
        "properties": {
            "path": {"type": "string", "description": "the file, relative to the output root"},
            "output": {"type": "string", "description": "the planned output path"},
            "key": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                    "description": "sha256 of the model and request: same key, same image"},
            "job": {"type": "string"},
            "vars": {"type": "object", "description": "the matrix combination"},
            "replicate": {"type": "integer", "minimum": 1},
            "prompt": {"type": ["string", "null"]},
            "model": {"type": "string"},
            "request": {"type": "object", "description": "the body sent (secrets as "
                        "***), with each image input recorded as {file, sha256, bytes, "
                        "format, width, height}, {url}, or {data: sha256, …}, never its "
                        "bytes"},
            "seed": {"type": "integer"},
            "reported_seed": {"type": ["integer", "null"]},
            "provider": {"type": "string"},
            "task_id": {"type": ["string", "null"]},
            "cost": {**nullable_number, "description": "credits reported (1 credit = $0.01)"},
            "submitted_at": timestamp,
            "finished_at": timestamp,
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                       "description": "of the file as written (provenance included)"},
            "bytes": {"type": "integer", "minimum": 0},
            "status": {"const": OutcomeStatus.WRITTEN.value},
            "recipe": {"type": "object"},
            "pinned": {"type": "boolean", "description": "false: made with a floating "
                       "model (`*-preview`), which the provider may change, so the same "
                       "request may not make the same image again"},
            "spec_date": {"type": "string"},
            "model_catalogue": catalogue,
            "fluxbatch": {"type": "string"},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_URL,
        "title": "fluxbatch manifest",
        "type": "object",
        "required": ["manifest_version", "fluxbatch", "recipe", "spec_date", "images"],
        "properties": {
            "$schema": {"type": "string"},
            "manifest_version": {"const": MANIFEST_VERSION},
            "fluxbatch": {"type": "string", "description": "the version that wrote it"},
            "recipe": {
                "type": "object",
                "required": ["name", "path", "sha256"],
                "properties": {"name": {"type": "string"}, "path": {"type": "string"},
                               "sha256": {"type": "string"}},
            },
            "spec_date": {"type": "string", "description": "date of the vendored BFL spec"},
            "model_catalogue": catalogue,
            "updated_at": timestamp,
            "images": {"type": "array", "items": entry},
            "totals": {
                "type": "object",
                "required": ["images", "bytes", "cost_credits"],
                "properties": {
                    "images": {"type": "integer", "minimum": 0},
                    "bytes": {"type": "integer", "minimum": 0},
                    "cost_credits": {"type": "number", "minimum": 0,
                                     "description": "what the images cost when they were "
                                     "rendered, as reported (1 credit = $0.01)"},
                    "runs": {"type": "array", "description": "per run, what it paid for "
                             "this recipe's images, from the ledger (`fluxbatch spend --by "
                             "run`)", "items": {"type": "object", "required": [
                                 "run", "paid", "spent_usd"], "properties": {
                                 "run": {"type": "string"},
                                 "paid": {"type": "integer", "minimum": 0},
                                 "estimate_usd": {"type": "number"},
                                 "reported_usd": {"type": "number"},
                                 "not_reported": {"type": "integer"},
                                 "refunded": {"type": "integer"},
                                 "refunded_usd": {"type": "number"},
                                 "unknown": {"type": "integer"},
                                 "spent_usd": {"type": "number"}}}},
                },
            },
        },
    }
