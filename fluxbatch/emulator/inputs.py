"""Image inputs: which fields hold one, what a value may be, and the checks the API makes.

A value is base64 of the image bytes, a `data:image/...;base64,` URI, or an `http(s)://` URL.
The emulator has no network and must never reach out, so a URL is only parsed: it is valid
when it is http(s) with a host, and the output shows a placeholder for it.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

from PIL import Image, ImageOps

from fluxbatch import models

# The emulator's own limits: BFL publishes none for inputs. 20 MiB of image bytes and
# 25 megapixels let through any photo a camera or phone makes (a 24 MP full-frame JPEG is
# ~12 MiB) while refusing what is almost surely a mistake, such as a TIFF scan renamed .png
# or a panorama stitched from dozens of frames. The client may refuse sooner.
MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 25_000_000

ACCEPTED = "PNG, JPEG or WebP"
_PADDING = ("top", "bottom", "left", "right")  # Expand's extra pixels per side
_DATA_URI = re.compile(
    r"data:image/[\w.+-]+(?:;[\w.+-]+=[^;,]*)*;base64,(.*)", re.DOTALL | re.IGNORECASE
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # ':' is never in base64
_HOST = re.compile(r"[\w.-]+")
_WHITESPACE = re.compile(rb"[ \t\r\n]+")
# Magic bytes (offset, bytes), sniffed before Pillow sees the data: the formats the API
# takes, then a few it does not, named so that the message says what the file is.
Marks = tuple[tuple[int, bytes], ...]
_ACCEPTED_MAGIC: tuple[tuple[str, Marks], ...] = (
    ("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("JPEG", ((0, b"\xff\xd8\xff"),)),
    ("WEBP", ((0, b"RIFF"), (8, b"WEBP"))),
)
_REFUSED_MAGIC: tuple[tuple[str, Marks], ...] = (
    ("GIF", ((0, b"GIF8"),)),
    ("BMP", ((0, b"BM"),)),
    ("TIFF", ((0, b"II*\x00"),)),
    ("TIFF", ((0, b"MM\x00*"),)),
    ("HEIC", ((4, b"ftypheic"),)),
    ("AVIF", ((4, b"ftypavif"),)),
    ("PDF", ((0, b"%PDF"),)),
)
_NAMES = {"WEBP": "WebP"}  # as people write them; the others are written as Pillow does


class InputError(ValueError):
    """An image field's value the API would refuse; the text is the 422's message."""


@dataclass(frozen=True, slots=True)
class Url:
    """An image given by address: never fetched, drawn as a placeholder."""

    text: str

    @property
    def host(self) -> str:
        return urlsplit(self.text).hostname or ""


@cache
def image_fields(model: str) -> tuple[str, ...]:
    """The model's fields that take an image, in the schema's order."""
    spec = models.get(model)
    if spec is None:
        return ()
    return spec.image_fields


def given(model: str, request: Mapping[str, object]) -> list[tuple[str, str]]:
    """(field, value) of every image field the request fills, in the schema's order."""
    return [
        (name, value)
        for name in image_fields(model)
        if isinstance(value := request.get(name), str)
    ]


def problems(model: str, request: Mapping[str, object], skip: frozenset[str]) -> dict[str, str]:
    """A message per image field the API would refuse, `skip` (already refused) aside."""
    found: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for name, value in given(model, request):
        if name in skip:
            continue
        try:
            source = parse(value)
            if isinstance(source, bytes):
                sizes[name] = check_image(source)
        except InputError as exc:
            found[name] = f"Value error, {exc}"
    if "mask" in sizes and "image" in sizes and sizes["mask"] != sizes["image"]:
        mask, image = (_size_text(sizes[name]) for name in ("mask", "image"))
        found["mask"] = (
            f"Value error, the mask is {mask} but the image is {image}; "
            "they should be the same size"
        )
    return found


def parse(value: str) -> bytes | Url:
    """The image bytes (not yet checked) or the URL a value holds."""
    scheme = _SCHEME.match(value)
    if scheme is None:
        return _base64(value.encode("ascii", "replace"))
    name = scheme.group()[:-1].lower()
    if name in ("http", "https"):
        return _url(value)
    if name == "data":
        match = _DATA_URI.fullmatch(value)
        if match is None:
            raise InputError("a data URI should look like data:image/png;base64,...")
        return _base64(match.group(1).encode("ascii", "replace"))
    raise InputError(f"URL scheme should be 'http' or 'https', not {name!r}")


def check_image(data: bytes) -> tuple[int, int]:
    """The image's size, once its bytes have passed every check the API makes."""
    image = open_image(data)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(_damaged(image.format or "")) from exc
    return image.size


def open_image(data: bytes) -> Image.Image:
    """The image with its header read and its size checked; pixels are decoded on load()."""
    if len(data) > MAX_BYTES:
        size = math.ceil(len(data) * 10 / 2**20) / 10  # rounded up: never "20.0 MiB" here
        raise InputError(f"the image is {size:.1f} MiB; the limit is {MAX_BYTES // 2**20} MiB")
    fmt = _sniff(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6  # Pillow refuses these at open
        raise InputError(_too_many_pixels(f"over {bomb:.0f} megapixels")) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(_damaged(fmt)) from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        area = f"{width}x{height} ({width * height / 1e6:.1f} megapixels)"
        raise InputError(_too_many_pixels(area))
    return image


def size_of(value: object) -> tuple[int, int] | None:
    """An input's size from its header, or None for a URL or a value the API would refuse."""
    if not isinstance(value, str):
        return None
    try:
        source = parse(value)
        return None if isinstance(source, Url) else open_image(source).size
    except InputError:
        return None


def sized_output(model: str, request: Mapping[str, object]) -> tuple[int, int] | None:
    """For models sized by their input (Fill, Expand, Canny, Depth): the input's size,
    plus Expand's padding. None when the input is a URL or unreadable."""
    spec = models.get(model)
    fields = given(model, request)
    size = size_of(fields[0][1]) if fields else None
    if spec is None or size is None:
        return None
    pad = {name: request.get(name) for name in _PADDING if name in spec.properties}
    extra = {name: value if isinstance(value, int) else 0 for name, value in pad.items()}
    return (
        size[0] + extra.get("left", 0) + extra.get("right", 0),
        size[1] + extra.get("top", 0) + extra.get("bottom", 0),
    )


def thumbnail(value: str, side: int) -> Image.Image | Url | None:
    """The input fitted into a `side` square (RGBA), its URL, or None when unreadable."""
    try:
        source = parse(value)
        if isinstance(source, Url):
            return source
        image = open_image(source)
        image.draft("RGB", (side, side))  # JPEG decodes at a fraction of full size
        return ImageOps.contain(image.convert("RGBA"), (side, side))
    except (InputError, OSError, SyntaxError, ValueError, EOFError):
        return None


def _base64(text: bytes) -> bytes:
    try:
        return base64.b64decode(_WHITESPACE.sub(b"", text), validate=True)
    except binascii.Error as exc:
        raise InputError(
            "not valid base64 (an image field takes a base64-encoded image, "
            "a data:image/...;base64, URI or an http(s) URL)"
        ) from exc


def _url(text: str) -> Url:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InputError("not a valid URL") from exc
    if any(c.isspace() for c in text):
        raise InputError("not a valid URL")
    host = parts.hostname or ""  # without user, port or IPv6 brackets
    if not (_HOST.fullmatch(host) or ":" in host):
        raise InputError("not a valid URL: it has no host")
    return Url(text)


def _sniff(data: bytes) -> str:
    for fmt, marks in _ACCEPTED_MAGIC:
        if _has(data, marks):
            return fmt
    for fmt, marks in _REFUSED_MAGIC:
        if _has(data, marks):
            raise InputError(f"this is a {fmt} file; the API takes {ACCEPTED} images")
    raise InputError(f"not a {ACCEPTED} image")


def _has(data: bytes, marks: Marks) -> bool:
    return all(data[offset : offset + len(magic)] == magic for offset, magic in marks)


def _damaged(fmt: str) -> str:
    return f"the {_NAMES.get(fmt, fmt)} image is damaged or truncated"


def _too_many_pixels(what: str) -> str:
    return f"the image is {what}; the limit is {MAX_PIXELS // 1_000_000} megapixels"


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
