"""Deterministic stand-in images: the bytes depend only on the model and the pixel fields.

Each image input is drawn as a labelled thumbnail in a strip along the top-left corner, in
the schema's field order, so that the output shows which inputs made it; a URL input is a
grey placeholder box naming its host, since the emulator never fetches it.

A test can recompute what the emulator served with `render_image(model, request, max_side)`,
where `request` is the body as submitted with `seed` set to the seed the task reported (the
emulator fills one in when none was sent, as the real API does).
"""

from __future__ import annotations

import colorsys
import io
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Mapping
from functools import cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from fluxbatch import models
from fluxbatch.emulator import inputs
from fluxbatch.identity import job_key
from fluxbatch.imagemeta import EXTENSIONS

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "jpeg": {"quality": 88},
    "png": {},
    "webp": {"quality": 85},
}
_ONE_MP_SIDE = 1024
_INPUT_SIZED = (1024, 768)
_CACHE_SIZE = 128
URL_PLACEHOLDER = (96, 104, 118)  # the box drawn for a URL input
_MIN_DRAWN_SIDE = 64  # smaller images (a tiny Fill input) have no room for text or thumbnails

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def pixel_fields(request: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in request.items() if k not in models.NON_PIXEL_FIELDS}


def output_format(model: str, request: Mapping[str, object]) -> str:
    fmt = request.get("output_format")
    if isinstance(fmt, str) and fmt in CONTENT_TYPES:
        return fmt
    spec = models.get(model)
    return spec.default_format if spec is not None else "jpeg"


def requested_size(model: str, request: Mapping[str, object]) -> tuple[int, int]:
    """The size the real API would produce; 0 or absent FLUX.2 sizes mean 1024x1024.

    Models sized by their input (Fill, Expand, Canny, Depth) take its size, plus Expand's
    padding; 1024x768 when the input is a URL, which the emulator does not fetch.
    """
    spec = models.get(model)
    sized_by = spec.sized_by if spec is not None else "input"
    if spec is not None and sized_by == "size":
        return _dimension(spec, request, "width"), _dimension(spec, request, "height")
    if spec is not None and sized_by == "aspect":
        ratio = request.get("aspect_ratio") or spec.properties["aspect_ratio"].get("default")
        return _aspect_size(ratio if isinstance(ratio, str) else "1:1")
    return inputs.sized_output(model, request) or _INPUT_SIZED


def shown_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_image(
    model: str, request: Mapping[str, object], max_side: int = 512
) -> tuple[bytes, str, str]:
    """(bytes, content type, file extension) of the image for this request."""
    pixels = pixel_fields(request)
    digest = job_key(model, request)  # the same key fluxbatch plans with
    key = (digest, max_side)
    cached = _CACHE.get(key)
    if cached is None:
        cached = _render(model, pixels, digest, max_side)
        _CACHE.put(key, cached)
    return cached


class _LRU:
    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, int], tuple[bytes, str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> tuple[bytes, str, str] | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, int], value: tuple[bytes, str, str]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_CACHE = _LRU(_CACHE_SIZE)


# (`Any`: a validated body, whose sizes the schema holds to integers)
def _dimension(spec: models.Model, request: Mapping[str, Any], name: str) -> int:
    value = request.get(name) or spec.properties[name].get("default") or _ONE_MP_SIDE
    return int(value)


def _aspect_size(ratio_text: str) -> tuple[int, int]:
    try:
        left, right = ratio_text.split(":")
        ratio = float(left) / float(right)
    except (ValueError, ZeroDivisionError):
        ratio = 1.0
    if not math.isfinite(ratio) or ratio <= 0:
        ratio = 1.0
    ratio = min(max(ratio, 9 / 21), 21 / 9)
    area = _ONE_MP_SIDE * _ONE_MP_SIDE
    width = round(math.sqrt(area * ratio) / 32) * 32
    height = round(math.sqrt(area / ratio) / 32) * 32
    return width, height


def _render(
    model: str, request: Mapping[str, object], digest: str, max_side: int
) -> tuple[bytes, str, str]:
    fmt = output_format(model, request)
    width, height = requested_size(model, request)
    shown = shown_size(width, height, max_side)
    rng = random.Random(digest)
    image = _background(shown, rng)
    _draw_inputs(image, inputs.given(model, request))
    _draw_caption(image, model, request, (width, height), shown)
    buffer = io.BytesIO()
    image.save(buffer, _PIL_FORMATS[fmt], **_SAVE_OPTIONS[fmt])
    return buffer.getvalue(), CONTENT_TYPES[fmt], EXTENSIONS[fmt]


def _colour(hue: float, saturation: float, value: float, alpha: int = 255) -> tuple[int, ...]:
    red, green, blue = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return (round(red * 255), round(green * 255), round(blue * 255), alpha)


def _background(size: tuple[int, int], rng: random.Random) -> Image.Image:
    hue = rng.random()
    start = Image.new("RGBA", size, _colour(hue, 0.45 + rng.random() * 0.3, 0.95))
    end = Image.new("RGBA", size, _colour(hue + 0.2 + rng.random() * 0.3, 0.7, 0.6))
    image = Image.composite(end, start, _gradient_mask(size, rng.uniform(0, 360)))
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    side = max(size)
    for _ in range(rng.randint(7, 12)):
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        radius = rng.uniform(0.05, 0.3) * side
        fill = _colour(
            hue + rng.uniform(-0.15, 0.45), 0.5, rng.uniform(0.6, 1.0), rng.randint(35, 90)
        )
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    step = max(6, side // 24)
    stripe = _colour(hue + 0.5, 0.2, 1.0, 22)
    for offset in range(-size[1], size[0], step * 2):
        draw.line((offset, size[1], offset + size[1], 0), fill=stripe, width=max(1, step // 3))
    return Image.alpha_composite(image, overlay).convert("RGB")


def _gradient_mask(size: tuple[int, int], angle: float) -> Image.Image:
    # Rotate a square that covers the diagonal, then crop: no uncovered corners.
    side = math.ceil(math.hypot(*size)) + 2
    square = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    square = square.rotate(angle, resample=Image.Resampling.BILINEAR)
    left, top = (side - size[0]) // 2, (side - size[1]) // 2
    return square.crop((left, top, left + size[0], top + size[1]))


def _draw_inputs(image: Image.Image, fields: list[tuple[str, str]]) -> None:
    """A tile per input along the top, wrapping into rows: thumbnail above, field name below.
    Tiles share one width, wide enough for the longest name where the image has room."""
    width, height = image.size
    if not fields or min(width, height) < _MIN_DRAWN_SIDE:
        return
    side = max(40, min(160, min(width, height) // 6))
    pad = max(2, side // 16)
    label_size = max(8, side // 8)
    longest = max(_font(label_size).getlength(name) for name, _ in fields)
    inner = min(max(side, math.ceil(longest)), width - 4 * pad)
    cell = (inner + 2 * pad, side + 3 * pad + label_size)
    per_row = max(1, (width - pad) // (cell[0] + pad))
    corners = [
        (pad + (i % per_row) * (cell[0] + pad), pad + (i // per_row) * (cell[1] + pad))
        for i in range(len(fields))
    ]
    backing = Image.new("RGBA", image.size, (0, 0, 0, 0))
    backing_draw = ImageDraw.Draw(backing)
    for x, y in corners:
        box = (x, y, x + cell[0] - 1, y + cell[1] - 1)
        backing_draw.rounded_rectangle(box, radius=pad, fill=(10, 12, 20, 170))
    image.paste(Image.alpha_composite(image.convert("RGBA"), backing).convert("RGB"))
    draw = ImageDraw.Draw(image)
    for (name, value), (x, y) in zip(fields, corners, strict=True):
        thumb_corner = (x + pad + (inner - side) // 2, y + pad)
        _draw_thumbnail(image, inputs.thumbnail(value, side), thumb_corner, side)
        label, font, _ = _fitted(name, inner, label_size)
        left = x + pad + (inner - round(font.getlength(label))) // 2
        draw.text((left, y + 2 * pad + side), label, font=font, fill=(235, 238, 245))


def _draw_thumbnail(
    image: Image.Image,
    picture: Image.Image | inputs.Url | None,
    corner: tuple[int, int],
    side: int,
) -> None:
    x, y = corner
    if isinstance(picture, Image.Image):
        left, top = x + (side - picture.width) // 2, y + (side - picture.height) // 2
        lowest_alpha, _ = picture.getchannel("A").getextrema()
        if not isinstance(lowest_alpha, tuple) and lowest_alpha < 255:  # show it on a checker
            image.paste(_checker(picture.size, max(4, side // 12)), (left, top))
        image.paste(picture, (left, top), picture)
        return
    draw = ImageDraw.Draw(image)
    box = (x, y, x + side - 1, y + side - 1)
    if isinstance(picture, inputs.Url):
        draw.rectangle(box, fill=URL_PLACEHOLDER, outline=(200, 204, 212))
        _centred(draw, "URL", side, corner, y + side // 3, side // 4)
        host = picture.host or picture.text
        label, font, size = _fitted(host, side - 4, max(8, side // 9))
        _centred(draw, label, side, corner, y + side * 2 // 3, size, font)
    else:  # only when render_image is called with a value the API would refuse
        draw.rectangle(box, fill=(120, 40, 40), outline=(220, 120, 120))
        _centred(draw, "?", side, corner, y + side // 3, side // 3)


def _centred(
    draw: ImageDraw.ImageDraw,
    text: str,
    side: int,
    corner: tuple[int, int],
    top: int,
    size: int,
    font: Font | None = None,
) -> None:
    font = font or _font(size)
    left = corner[0] + (side - round(font.getlength(text))) // 2
    draw.text((left, top - size // 2), text, font=font, fill=(245, 246, 250))


def _fitted(text: str, room: int, size: int) -> tuple[str, Font, int]:
    """`text` in the largest font size from `size` down to 7 that fits `room`, else cut."""
    for candidate in range(size, 6, -1):
        font = _font(candidate)
        if font.getlength(text) <= room:
            return text, font, candidate
    while len(text) > 1 and font.getlength(text + "…") > room:
        text = text[:-1]
    return text + "…", font, 7


def _checker(size: tuple[int, int], square: int) -> Image.Image:
    tile = Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(tile)
    for top in range(0, size[1], square):
        for left in range((top // square) % 2 * square, size[0], 2 * square):
            draw.rectangle((left, top, left + square - 1, top + square - 1), fill=(200, 200, 200))
    return tile


def _draw_caption(
    image: Image.Image,
    model: str,
    request: Mapping[str, object],
    requested: tuple[int, int],
    shown: tuple[int, int],
) -> None:
    width, height = shown
    if min(width, height) < _MIN_DRAWN_SIDE:
        return
    size_line = f"{requested[0]}x{requested[1]}"
    if requested != shown:
        size_line += f" shown at {width}x{height}"
    seed = request.get("seed")
    details = [model, f"seed {seed}" if seed is not None else "no seed", size_line]
    count = len(inputs.given(model, request))
    if count:
        details.append(f"{count} input image{'s' if count > 1 else ''}")
    font_size = max(9, min(max(width, height) // 30, width // 16))
    font, small = _font(font_size), _font(max(8, font_size * 4 // 5))
    margin = max(4, font_size // 2)
    room = width - 4 * margin
    prompt = str(request.get("prompt") or "(no prompt)")
    lines = [(line, font) for line in _wrap(prompt, font, room, max_lines=6)]
    lines += [(line, small) for line in _wrap("  ·  ".join(details), small, room, max_lines=3)]
    line_height = font_size + font_size // 4
    top = max(0, height - line_height * len(lines) - 3 * margin)
    panel = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(panel).rounded_rectangle(
        (margin, top, width - margin, height - margin), radius=margin, fill=(10, 12, 20, 150)
    )
    image.paste(Image.alpha_composite(image.convert("RGBA"), panel).convert("RGB"))
    draw = ImageDraw.Draw(image)
    y = top + margin
    for line, line_font in lines:
        colour = (255, 255, 255) if line_font is font else (200, 210, 230)
        draw.text((2 * margin, y), line, font=line_font, fill=colour)
        y += line_height


def _wrap(text: str, font: Font, room: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > room:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1] + " …"]
    return lines


@cache
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()
