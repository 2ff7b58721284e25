"""`fluxbatch inspect IMAGE` prints the provenance an image carries; `fluxbatch reproduce`
turns it (or a manifest entry) into a one-job recipe that makes the same image again."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from fluxbatch import imagemeta, providers
from fluxbatch.errors import EXIT_OK, FluxbatchError
from fluxbatch.identity import job_key
from fluxbatch.inputs import is_descriptor
from fluxbatch.models import NON_PIXEL_FIELDS
from fluxbatch.project import Project, ProjectFileError
from fluxbatch.recipe_schema import SCHEMA_ID  # (the raw JSON, which an editor can load)

_JINJA = re.compile(r"\{[{%#]")
_END_RAW = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}")


def inspect(*, image: str, as_json: bool) -> int:
    entry = provenance_of(Path(image))
    if as_json:
        print(json.dumps(entry, indent=2, ensure_ascii=False, sort_keys=True))
        return EXIT_OK
    width = max(len(k) for k in entry)
    for name in sorted(entry):
        print(f"{name.ljust(width)}  {_shown(name, entry[name])}")
    return EXIT_OK


def _shown(name: str, value: Any) -> str:
    if name == "cost" and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value} credits (${value / 100:.2f})"  # the provider's unit: 1 credit = $0.01
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def provenance_of(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FluxbatchError(f"{path}: {error.strerror or error}") from None
    try:
        entry = imagemeta.extract(data)
    except imagemeta.ImageFormatError as error:
        raise FluxbatchError(f"{path}: {error}") from None
    if entry is None:
        raise FluxbatchError(f"{path}: carries no fluxbatch provenance (it was not written by "
                             "fluxbatch, or the metadata was stripped)")
    return entry


def reproducible(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """`entry` if it holds what a reproduction is made of; else a clear error. (It was read
    from an image or a manifest, which anyone can edit.)"""
    request = entry.get("request")
    problem = None
    if not isinstance(request, dict):
        problem = "its request is not an object"
    elif isinstance(request.get("seed"), bool) or not isinstance(request.get("seed"), int):
        problem = "its request has no whole-number seed"
    for field in ("model", "path", "key"):
        if problem is None and not (isinstance(entry.get(field), str) and entry[field]):
            problem = f"its {field!r} is not a text"
    if problem is None and not isinstance(entry.get("recipe") or {}, dict):
        problem = "its 'recipe' is not an object"
    if problem is not None:
        raise FluxbatchError(f"{where}: the provenance it carries is damaged ({problem}); it "
                             "cannot be made again")
    return entry


def reproduce(*, source: str, entry_path: str | None, output: str | None,
              force: bool = False) -> int:
    entry = entry_of(Path(source), entry_path)
    if not output:
        print(reproduction_recipe(entry), end="")
        return EXIT_OK
    target = Path(output)
    if target.exists() and not force:
        raise FluxbatchError(f"{output} exists: choose another file, or pass --force to "
                             "replace it")
    root = origin_root(Path(source), entry)
    output_root, note = _shared_root(target, root)
    target.write_text(reproduction_recipe(entry, output_root), encoding="utf-8")
    print(f"wrote {output}: `fluxbatch render {output}` makes the image again "
          f"(key {entry['key'][:12]}…){note}")
    return EXIT_OK


def origin_root(source: Path, entry: dict[str, Any]) -> Path | None:
    """The output root the image was written into (where its ledger is), if known: a
    manifest's folder, or the image's path less the path the entry records."""
    if source.suffix.lower() == ".json":
        return source.absolute().parent
    placed = str(entry.get("path") or "")
    image = source.absolute().as_posix()
    if not placed or not image.endswith("/" + placed):
        return None  # (copied elsewhere, or renamed)
    return Path(image[:-len(placed) - 1])


def _shared_root(target: Path, root: Path | None) -> tuple[str | None, str]:
    """The reproduction's `output_root:` (the original's root, so that its ledger is shared
    and the image is placed from it, not paid for again), and a note when that cannot be."""
    if root is None:
        return None, ""
    folder = target.absolute().parent
    relative = Path(os.path.relpath(root, folder)).as_posix()
    if relative == ".":
        return None, ""
    try:
        Project.of_recipe(target.absolute()).output_root(relative)
    except ProjectFileError:
        return None, (f"; it renders into {target.parent or '.'}, where the original's image "
                      f"is unknown: pass --out {root} to place it from there without paying")
    return relative, ""


def entry_of(source: Path, entry_path: str | None) -> dict[str, Any]:
    """The manifest entry to reproduce: the provenance `source` (an image) carries, or the
    entry `entry_path` of `source` (a manifest)."""
    if source.suffix.lower() != ".json":
        return reproducible(provenance_of(source), str(source))
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, RecursionError) as error:
        raise FluxbatchError(f"{source}: cannot read the manifest: {error}") from None
    if not isinstance(document, dict):
        raise FluxbatchError(f"{source} is not a fluxbatch manifest")
    if not entry_path:
        raise FluxbatchError(f"{source} is a manifest: say which image with --entry PATH")
    images = document.get("images")
    for entry in images if isinstance(images, list) else []:
        if isinstance(entry, dict) and entry_path in (entry.get("path"), entry.get("output")):
            return reproducible(dict(entry), f"{source}, entry {entry_path}")
    raise FluxbatchError(f"{source} has no image {entry_path!r}")


def reproduction_recipe(entry: dict[str, Any], output_root: str | None = None, *,
                        name: str | None = None) -> str:
    """A recipe whose single job has exactly the entry's request, hence its key; named
    `name` (default: `reproduction_name`)."""
    request = {k: _pinned(k, v) for k, v in entry["request"].items()
               if k not in NON_PIXEL_FIELDS}
    prompt = request.pop("prompt", None)
    seed = request.pop("seed")
    params = {"model": entry["model"], **{k: _literal(v) for k, v in request.items()}}
    job: dict[str, Any] = {"name": entry.get("job") or "image"}
    if prompt is not None:
        job["prompt"] = _literal(prompt)
    job["seed"] = seed
    recipe = {
        "version": 1,
        "name": name or reproduction_name(entry),
        "provider": entry.get("provider") or providers.DEFAULT,
        **({"output_root": output_root} if output_root else {}),
        "output": _literal(entry["path"]),
        "defaults": params,
        "jobs": [job],
    }
    expected = job_key(entry["model"], {**entry["request"]})
    header = (
        f"# yaml-language-server: $schema={SCHEMA_ID}\n"
        f"# Reproduces {entry['path']} (key {entry['key']}).\n"
        "# Made by `fluxbatch reproduce`: `fluxbatch render` on it sends the same request.\n"
    )
    files = [value["file"] for value in request.values() if isinstance(value, dict)]
    if files:
        header += ("# Its image inputs are named relative to the folder of the recipe that made "
                   "it:\n# keep this file there. Each is pinned by its sha256, which is checked "
                   "before anything is paid.\n")
    if expected != entry["key"]:
        header += "# Note: the recorded request was redacted; the key may differ.\n"
    return header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)


def _pinned(field: str, value: Any) -> Any:
    """An image input as a recipe names it again: a file pinned by its content, or the URL."""
    if not is_descriptor(value):
        return value
    if "url" in value:
        return value["url"]
    if "file" in value:
        return {"file": value["file"], "sha256": value["sha256"]}
    raise FluxbatchError(f"this image was made from a data: URI in {field} (sha256 "
                         f"{str(value.get('data'))[:12]}…), whose bytes fluxbatch does not keep; "
                         "copy the URI from the recipe that made it")


def reproduction_name(entry: dict[str, Any]) -> str:
    """A name of its own (`mugs-mug-watercolor-1`): a recipe that shares the original's name
    would share its manifest and take its other images for orphans."""
    original = (entry.get("recipe") or {}).get("name") or "image"
    stem = Path(str(entry.get("path") or "")).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{original}-{stem}").strip("-.") or "reproduce"
    return name[:100]


def _literal(value: Any) -> Any:
    """Keep a string literal when it contains template syntax."""
    if not isinstance(value, str) or not _JINJA.search(value):
        return value
    if _END_RAW.search(value):  # a raw block cannot hold its own end tag; a string can
        return "{{ " + json.dumps(value, ensure_ascii=False) + " }}"
    return "{% raw %}" + value + "{% endraw %}"
