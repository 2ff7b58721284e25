"""Image inputs: the images a request takes (Kontext's `input_image`, Fill's `image` and
`mask`, FLUX.2's references, `image_prompt`), named in a recipe by a local file, a URL or a
`data:` URI, and matrices that range over files (`photo: {files: "photos/*.png"}`).

An input is identified by its content. A file, or a `data:` URI, is keyed by the sha256 of
its bytes: editing a photo re-renders exactly its images; moving or renaming it re-renders
nothing. A URL is keyed by the URL itself: fluxbatch never fetches what a recipe names (the
provider does), so it cannot know the bytes; to pin an image by content, keep it in the
project and name the file. In plans, manifests and the provenance inside images an input is
a small descriptor, never its bytes:

    {"file": "photos/mug.png", "sha256": "…", "bytes": 5123, "format": "png",
     "width": 256, "height": 256}          (a local file)
    {"url": "https://example.com/mug.png"}  (a URL)
    {"data": "…sha256…", "bytes": …, "format": …, "width": …, "height": …}  (a data: URI)

The bytes are read, checked against their sha256 and base64-encoded only when the request
is sent (`materialize`), so a render holds no more than its requests in flight.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxbatch import imagemeta
from fluxbatch.project import Project, ProjectFileError, read_regular

# BFL's spec types every image field as a string ("Base64 encoded image or URL") and states no
# size limit; fluxbatch refuses what no provider endpoint would take in one request: base64
# makes a 20 MiB file a 27 MB body, and the largest outputs are about 4 megapixels.
MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_INPUT_PIXELS = 25_000_000
_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
# A files: pattern is a folder of photos, not a disk: a pattern that matches more is a mistake.
MAX_FILES = 100_000
_DATA_URI = re.compile(r"^(?i:data):(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),"
                       r"(?P<data>.*)$", re.DOTALL)


def is_descriptor(value: Any) -> bool:
    return isinstance(value, Mapping) and ("sha256" in value or "url" in value or
                                           "data" in value)


def input_identity(value: Any) -> Any:
    """What a job key hashes for an image field's value: the input's content (or its URL),
    never its path, its size or its encoding. Any other value stands for itself."""
    if isinstance(value, Mapping):
        if "url" in value:
            return {"url": value["url"]}
        if "sha256" in value:
            return {"sha256": value["sha256"]}
        if "data" in value:
            return {"sha256": value["data"]}
    return value


def describe(value: Any) -> str:
    """An input as a person reads it: `photos/mug.png (sha256 1a2b3c4d…)`."""
    if not is_descriptor(value):
        return str(value)
    if "url" in value:
        return str(value["url"])
    if "file" in value:
        return f"{value['file']} (sha256 {str(value.get('sha256'))[:12]}…)"
    return f"a data: URI (sha256 {str(value.get('data'))[:12]}…)"


class InputFile(str):
    """A value of a `files:` matrix variable: renders as its path (`input_image:
    "{{ photo }}"` works), and offers `{{ photo.stem }}`, `{{ photo.name }}` and
    `{{ photo.path }}`. In seeds it stands for its content (`identity`), so renaming the
    file changes no seed and no key."""

    __slots__ = ("sha256",)
    sha256: str

    def __new__(cls, path: str, sha256: str) -> InputFile:
        value = super().__new__(cls, path)
        value.sha256 = sha256
        return value

    @property
    def path(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return os.path.basename(self)

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self))[0]

    @property
    def identity(self) -> str:
        return f"sha256:{self.sha256}"


@dataclass(frozen=True, slots=True)
class Facts:
    """What fluxbatch knows of an image file: its hash, format and size."""

    sha256: str
    size: int
    format: str
    width: int
    height: int


class FactsCache:
    """Facts of files by real path, kept in the output root's state directory, so that a
    null build over 10,000 input-driven images hashes no unchanged file.

    An entry holds while the file's size, mtime, ctime and inode are the same. Size and mtime
    alone are not enough: `cp -p`, `rsync -t` and `touch -d` put back an edited file's mtime,
    but no program can set its ctime, and a file replaced by a rename has a new inode. Not
    `trusted` (`--verify`), the cache is not read, only refreshed."""

    def __init__(self, path: Path | None, *, trusted: bool = True) -> None:
        self.path = path
        self.trusted = trusted
        self.entries: dict[str, list[Any]] = {}
        self.changed = False
        self._lock = threading.Lock()  # (requests are prepared on several threads)
        if path is not None and trusted:
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self.entries = loaded
            except (OSError, ValueError):
                pass  # (a cache: missing or damaged, it is rebuilt)

    def get(self, real: str, stat: os.stat_result) -> Facts | None:
        found = self.entries.get(real)
        if isinstance(found, list) and len(found) == 9 and found[:4] == _signature(stat):
            return Facts(*found[4:])
        return None

    def put(self, real: str, stat: os.stat_result, facts: Facts) -> None:
        with self._lock:
            self.entries[real] = [*_signature(stat), facts.sha256, facts.size, facts.format,
                                  facts.width, facts.height]
            self.changed = True

    def forget(self, real: str) -> None:
        with self._lock:
            self.changed = self.entries.pop(real, None) is not None or self.changed

    def save(self) -> None:
        """Written by `render` (which may write to the root); other commands only read."""
        with self._lock:
            if self.path is None or not self.changed:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.path.with_suffix(".tmp")
                temporary.write_text(json.dumps(self.entries), encoding="utf-8")
                os.replace(temporary, self.path)
                self.changed = False
            except OSError:
                pass  # (a cache: the next run hashes again)


def _signature(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


class InputProblem(Exception):
    """An image input that cannot be used; the message says why, in one line."""


def _project_glob(pattern: str, project: Project) -> list[str]:
    """The files `pattern` matches, by wcmatch's glob listing only folders a recipe may read.
    Whatever leads a pattern elsewhere (`..`, a brace such as `{../../etc,x}`, a linked
    folder that `*` matches), the folder is refused before it is listed, and the message
    names the pattern and the folder as the pattern reached it, so no name found outside the
    project is ever seen or said. `**` spans folders, `{png,jpg}` is either, files only;
    `*` skips hidden files (no DOTGLOB) and `**` does not follow links to folders (no
    FOLLOW). (wcmatch is imported here: a recipe without `files:` does not load it.)

    (`_iter`, the one place wcmatch lists a folder, is wcmatch's own, not public API; the
    tests of `files:` patterns fail if it changes.)"""
    from wcmatch import glob as wcglob
    from wcmatch._wcparse import PatternLimitException  # (raised by its glob; defined here)

    class ProjectGlob(wcglob.Glob[str]):
        def _iter(self, curdir: str | None, dir_only: bool,
                  deep: bool) -> Iterator[tuple[str, bool, bool, bool]]:
            refused = project.listing_refusal(curdir or ".")
            if refused is not None:
                raise InputProblem(f"{pattern!r} {refused}; a files: pattern matches only "
                                   "files inside the recipe's project")
            yield from super()._iter(curdir, dir_only, deep)

    names = []
    flags = wcglob.GLOBSTAR | wcglob.BRACE | wcglob.NODIR
    try:
        for name in ProjectGlob(pattern, flags=flags, root_dir=os.fspath(project.folder)).glob():
            names.append(Path(name).as_posix())
            if len(names) > MAX_FILES:
                raise InputProblem(f"{pattern!r} matches more than {MAX_FILES:,} files")
    except PatternLimitException:
        raise InputProblem(f"{pattern!r} expands to too many patterns") from None
    return names


class Inputs:
    """Turns what a recipe writes in an image field into a descriptor, for one project, and
    a descriptor back into what the API takes, when the request is sent."""

    def __init__(self, project: Project, cache: FactsCache | None = None) -> None:
        self.project = project
        self.cache = cache or FactsCache(None)
        self.data: dict[str, bytes] = {}  # the bytes of data: URIs, by sha256
        self.resolved: dict[str, dict[str, Any]] = {}  # by the text written

    def files(self, pattern: str) -> list[InputFile]:
        """A `files:` glob, sorted, each match a regular image file inside the project.

        As in a shell: `*` skips hidden files, `**` spans folders, `{png,jpg}` is either.
        `**` does not follow a linked folder (it could lead anywhere), and no folder outside
        the project, or in `.git/`, is ever listed (see `_project_glob`)."""
        if os.path.isabs(pattern):
            raise InputProblem(f"{pattern} is an absolute path; a files: pattern is relative "
                               "to the recipe")
        names = _project_glob(pattern, self.project)
        if not names:
            raise InputProblem(f"{pattern!r} matches no file (relative to "
                               f"{self.project.folder})")
        names.sort()
        return [InputFile(name, self.facts(name).sha256) for name in names]

    def file(self, name: str) -> InputFile:
        """One file named in a `files:` column of a row table."""
        if not name.strip():
            raise InputProblem("no file named (the cell is empty)")
        return InputFile(Path(name).as_posix(), self.facts(name).sha256)

    def resolve(self, value: Any, field: str) -> dict[str, Any]:
        """The descriptor of an image field's value: a path, a URL, a data: URI, or a
        `{file, sha256}` pin (as `reproduce` writes), whose sha256 the file must still have."""
        if isinstance(value, Mapping):
            return self._pinned(value, field)
        if not isinstance(value, str) or not value.strip():
            raise InputProblem(f"{field} must name an image: a file in the project, an "
                               "http(s) URL, or a data: URI")
        known = self.resolved.get(value)
        if known is None:
            known = self.resolved[value] = self._text(value.strip())
        return known

    def _text(self, text: str) -> dict[str, Any]:
        scheme = text[:8].lower()  # (schemes ignore case: `HTTPS://`, `Data:`)
        if scheme.startswith(("http://", "https://")):
            return self._url(text)
        if scheme.startswith("data:"):
            return self._data_uri(text)
        if "://" in text:
            raise InputProblem(f"{_short(text)!r} is not an http(s) URL, a data: URI or a "
                               "file")
        if len(text) > 256 and _BASE64.match(text):
            raise InputProblem("this looks like base64 image data; write it as a data: URI "
                               "(data:image/png;base64,…), or better, save the image in the "
                               "project and name the file")
        return self._file(text)

    def _pinned(self, value: Mapping[str, Any], field: str) -> dict[str, Any]:
        if "url" in value and set(value) == {"url"}:
            return self._url(str(value["url"]))
        if "file" not in value or not set(value) <= {"file", "sha256"}:
            raise InputProblem(f"{field} as a mapping is {{file: PATH, sha256: HEX}} (a file "
                               "pinned by its content) or {url: URL}")
        found = self._file(str(value["file"]))
        pinned = value.get("sha256")
        if pinned is not None and str(pinned).lower() != found["sha256"]:
            raise InputProblem(f"{value['file']} is not the file this recipe was made with: "
                               f"its sha256 is {found['sha256'][:12]}…, the recipe pins "
                               f"{str(pinned)[:12]}…")
        return found

    def facts(self, name: str) -> Facts:
        try:
            real = self.project.resolve(name)
            stat = os.stat(real)
        except FileNotFoundError:
            raise InputProblem(f"file not found: {name} (relative to "
                               f"{self.project.folder})") from None
        except ProjectFileError as error:
            raise InputProblem(str(error)) from None
        except OSError as error:
            raise InputProblem(f"cannot read {name}: {error.strerror or error}") from None
        known = self.cache.get(real, stat)
        if known is None:
            known = _facts(self._read(real, name), name)
            self.cache.put(real, stat, known)
        self.project.consulted.setdefault(name, known.sha256)
        return known

    def _read(self, real: str, name: str) -> bytes:
        try:  # (`real` holds no link: one that appears now is a race, and refused)
            return read_regular(real, limit=MAX_INPUT_BYTES, name=name, follow=False)
        except ProjectFileError as error:
            raise InputProblem(str(error)) from None
        except OSError as error:
            raise InputProblem(f"cannot read {name}: {error.strerror or error}") from None

    def _file(self, name: str) -> dict[str, Any]:
        facts = self.facts(name)
        return {"file": Path(name).as_posix(), "sha256": facts.sha256, "bytes": facts.size,
                "format": facts.format, "width": facts.width, "height": facts.height}

    def _url(self, text: str) -> dict[str, Any]:
        import urllib.parse  # (only for an input given by URL)

        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputProblem(f"{_short(text)!r} is not an http(s) URL with a host")
        if parsed.username or parsed.password:  # it would travel in every plan and manifest
            raise InputProblem(f"{_short(text)!r} carries a user name or password; fluxbatch "
                               "records input URLs in manifests and images, so use a URL "
                               "without one")
        return {"url": parsed.scheme + text[len(parsed.scheme):]}  # (the scheme as `https`)

    def _data_uri(self, text: str) -> dict[str, Any]:
        found = _DATA_URI.match(text)
        if found is None or ";base64" not in found["params"].lower():
            raise InputProblem("a data: URI must be base64 (data:image/png;base64,…)")
        try:
            data = base64.b64decode(found["data"], validate=True)
        except (binascii.Error, ValueError):
            raise InputProblem("the data: URI is not valid base64") from None
        if len(data) > MAX_INPUT_BYTES:
            raise InputProblem(f"the data: URI holds more than {MAX_INPUT_BYTES >> 20} MiB")
        facts = _facts(data, "the data: URI")
        self.data[facts.sha256] = data
        return {"data": facts.sha256, "bytes": facts.size, "format": facts.format,
                "width": facts.width, "height": facts.height}

    def materialize(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The request as sent: each input as base64 (a file is read now, through the same
        confinement, and must still have the sha256 it was planned with) or its URL."""
        sent = dict(request)
        for name, value in request.items():
            if not is_descriptor(value):
                continue
            if "url" in value:
                sent[name] = value["url"]
                continue
            if "data" in value:
                raw = self.data[value["data"]]
            else:
                try:
                    real = self.project.resolve(value["file"])
                except ProjectFileError as error:
                    raise InputProblem(str(error)) from None
                raw = self._read(real, value["file"])
                if hashlib.sha256(raw).hexdigest() != value["sha256"]:
                    raise self._changed(real, value)
            sent[name] = base64.b64encode(raw).decode("ascii")
        return sent


    def _changed(self, real: str, planned: Mapping[str, Any]) -> InputProblem:
        """The file `planned` names no longer has the bytes the plan was made with. Its
        entry leaves the cache now, on disk too, so that the next run hashes the file again
        and plans with it as it is: a stale entry would plan the old bytes again, and fail
        again, at every run."""
        self.cache.forget(real)
        self.cache.save()
        return InputProblem(f"{planned['file']} changed after the plan was made; run again "
                            "to plan with the new file")


def _facts(data: bytes, name: str) -> Facts:
    """Sniffed and measured: a PNG, JPEG or WebP within the limits, or a clear problem."""
    fmt = imagemeta.sniff(data)
    if fmt not in _FORMATS:
        kind = f"a {fmt.upper()} image" if fmt else "not an image"
        raise InputProblem(f"{name} is {kind}; image inputs are PNG, JPEG or WebP")
    stated = imagemeta.dimensions(data)
    if stated is not None:  # (before Pillow: it allocates a WebP's canvas as it opens it)
        _check_pixels(name, *stated)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            _check_pixels(name, width, height)
            image.verify()  # (a PNG's chunks and checksums: a truncated file is caught here)
    except Image.DecompressionBombError:  # (a header only Pillow could read)
        raise InputProblem(f"{name} is over the limit of {MAX_INPUT_PIXELS / 1e6:g} "
                           "megapixels for an image input (Pillow refuses it as a "
                           "decompression bomb)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InputProblem(f"{name} is not a readable {fmt.upper()} image ({error})") from None
    return Facts(hashlib.sha256(data).hexdigest(), len(data), fmt, width, height)


def _check_pixels(name: str, width: int, height: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise InputProblem(f"{name} is {width}×{height}, over the limit of "
                           f"{MAX_INPUT_PIXELS / 1e6:g} megapixels for an image input")


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
