"""Deterministic stand-in images: the bytes depend only on the model and the pixel fields.

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
from fluxbatch.identity import job_key
from fluxbatch.imagemeta import EXTENSIONS

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "jpeg": {"quality": 88},
    "png": {},
    "webp": {"quality": 85},
}
_ONE_MP_SIDE = 1024
_INPUT_SIZED = (1024, 768)
_CACHE_SIZE = 128

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def pixel_fields(request: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k not in models.NON_PIXEL_FIELDS}


def output_format(model: str, request: Mapping[str, Any]) -> str:
    fmt = request.get("output_format")
    if isinstance(fmt, str) and fmt in CONTENT_TYPES:
        return fmt
    spec = models.get(model)
    return spec.default_format if spec is not None else "jpeg"


def requested_size(model: str, request: Mapping[str, Any]) -> tuple[int, int]:
    """The size the real API would produce; 0 or absent FLUX.2 sizes mean 1024x1024."""
    spec = models.get(model)
    sized_by = spec.sized_by if spec is not None else "input"
    if spec is not None and sized_by == "size":
        return _dimension(spec, request, "width"), _dimension(spec, request, "height")
    if spec is not None and sized_by == "aspect":
        ratio = request.get("aspect_ratio") or spec.properties["aspect_ratio"].get("default")
        return _aspect_size(ratio if isinstance(ratio, str) else "1:1")
    return _INPUT_SIZED


def shown_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_image(
    model: str, request: Mapping[str, Any], max_side: int = 512
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
    model: str, request: Mapping[str, Any], digest: str, max_side: int
) -> tuple[bytes, str, str]:
    fmt = output_format(model, request)
    width, height = requested_size(model, request)
    shown = shown_size(width, height, max_side)
    rng = random.Random(digest)
    image = _background(shown, rng)
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


def _draw_caption(
    image: Image.Image,
    model: str,
    request: Mapping[str, Any],
    requested: tuple[int, int],
    shown: tuple[int, int],
) -> None:
    width, height = shown
    size_line = f"{requested[0]}x{requested[1]}"
    if requested != shown:
        size_line += f" shown at {width}x{height}"
    seed = request.get("seed")
    details = [model, f"seed {seed}" if seed is not None else "no seed", size_line]
    inputs = sum(
        1 for k, v in request.items() if v and (k.startswith("input_image") or k == "image")
    )
    if inputs:
        details.append(f"{inputs} input image{'s' if inputs > 1 else ''}")
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
