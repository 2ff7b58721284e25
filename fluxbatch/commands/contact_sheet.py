"""Drawing a contact sheet: the HTML page and the PNG image, both from the same `Sheet`s.

`gallery` decides what goes where (the axes, the cells, the markers); this module only draws
it, so the page and the picture never disagree about which image sits in which cell.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fluxbatch.commands.output import plural
from fluxbatch.errors import FluxbatchError

MIN_THUMB = 64
MAX_THUMB = 1024
# The PNG is for a pull-request comment or a chat message, so it is bounded: a recipe of
# 10,000 images must not make a file nobody can open (16 MP of RGB is 48 MB while drawing).
MAX_PIXELS = 16_000_000
MAX_SIDE = 16_000


class Mark(StrEnum):
    """What a tile shows: the image, or the marker standing in for one that is not there."""

    IMAGE = "image"
    MISSING = "missing"
    EXCLUDED = "excluded"


@dataclass(frozen=True, slots=True)
class Tile:
    kind: Mark
    caption: str
    shape: tuple[int, int]  # the planned width and height: a marker keeps the image's shape
    path: Path | None = None  # the file, for an image
    state: str = ""  # the plan state of a missing image; "excluded" for an excluded one
    hint: str = ""  # hover text: the prompt, or the rule that removed the combination


Group = tuple[Tile, ...]  # one combination: its replicates, or its exclusion marker


@dataclass(frozen=True, slots=True)
class Label:
    text: str
    notes: tuple[str, ...] = ()  # `name=value` of the variables that follow from this value


@dataclass(frozen=True, slots=True)
class Sheet:
    """One job. With rows it is a table; without, a strip of labelled slots that wraps."""

    title: str
    summary: str
    corner: str
    rows: tuple[Label, ...]
    cols: tuple[Label, ...]
    cells: Mapping[tuple[int, int], tuple[Group, ...]]  # by (row, col); a strip is row 0

    def tiles(self) -> list[Tile]:
        return [tile for groups in self.cells.values() for group in groups for tile in group]


def fit(shape: tuple[int, int], thumb: int) -> tuple[int, int]:
    """`shape` scaled so its longer side is `thumb`."""
    width, height = shape
    if width >= height:
        return thumb, max(1, round(thumb * height / width))
    return max(1, round(thumb * width / height)), thumb


# --- HTML ---------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #f6f6f4; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin: 32px 0 2px; }
.summary { color: #555; margin: 0 0 8px; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: 6px;
vertical-align: top; background: #fff; } th { background: #eee; font-weight: 600;
text-align: left; } td.none { background: #ecece9; }
.notes { font-weight: normal; font-size: 12px; color: #555; }
.strip { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.slot { background: #fff; border: 1px solid #ddd; padding: 6px; }
.slot > .label { font-weight: 600; margin-bottom: 4px; }
.cell { display: flex; gap: 8px; } .cell.across { flex-direction: column; }
.group { display: flex; gap: 8px; } .cell.down .group { flex-direction: column; }
figure { margin: 0; } img { display: block; border-radius: 3px; object-fit: contain; }
figcaption { font-size: 12px; color: #555; }
.marker { display: flex; align-items: center; justify-content: center; text-align: center;
box-sizing: border-box; border-radius: 3px; font-weight: 600; }
.missing .marker { border: 2px dashed #b00020; color: #b00020; background: #fbeaea; }
.excluded .marker { border: 1px solid #bbb; color: #666; background:
repeating-linear-gradient(45deg, #eee 0 8px, #e2e2e2 8px 16px); }
"""


def html_page(title: str, heading: str, sheets: Sequence[Sheet], *,
              href: Callable[[Path], str], thumb: int, across: bool) -> str:
    def tile(t: Tile) -> str:
        return _html_tile(t, href, thumb)

    def cell(groups: Sequence[Group]) -> str:
        inner = "".join(f"<div class=group>{''.join(map(tile, g))}</div>" for g in groups)
        return f"<div class='cell {'across' if across else 'down'}'>{inner}</div>"

    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style><h1>{html.escape(heading)}</h1>"]
    for sheet in sheets:
        parts.append(f"<h2>{html.escape(sheet.title)}</h2>"
                     f"<p class=summary>{html.escape(sheet.summary)}</p>")
        parts.append(_html_table(sheet, cell) if sheet.rows else _html_strip(sheet, cell))
    return "".join(parts)


def _html_table(sheet: Sheet, cell: Callable[[Sequence[Group]], str]) -> str:
    head = "".join(f"<th>{_html_label(c)}</th>" for c in sheet.cols)
    body = []
    for i, row in enumerate(sheet.rows):
        tds = []
        for j in range(len(sheet.cols)):
            groups = sheet.cells.get((i, j))
            tds.append(f"<td>{cell(groups)}</td>" if groups else
                       "<td class=none title='no combination of the recipe falls here'></td>")
        body.append(f"<tr><th>{_html_label(row)}</th>{''.join(tds)}</tr>")
    return (f"<table><tr><th>{html.escape(sheet.corner)}</th>{head}</tr>"
            f"{''.join(body)}</table>")


def _html_strip(sheet: Sheet, cell: Callable[[Sequence[Group]], str]) -> str:
    slots = "".join(f"<div class=slot><div class=label>{_html_label(label)}</div>"
                    f"{cell(sheet.cells.get((0, j), ()))}</div>"
                    for j, label in enumerate(sheet.cols))
    return f"<div class=strip>{slots}</div>"


def _html_label(label: Label) -> str:
    notes = "<br>".join(html.escape(n) for n in label.notes)
    return html.escape(label.text) + (f"<div class=notes>{notes}</div>" if notes else "")


def _html_tile(tile: Tile, href: Callable[[Path], str], thumb: int) -> str:
    width, height = fit(tile.shape, thumb)
    hint = html.escape(tile.hint)
    caption = f"<figcaption>{html.escape(tile.caption)}</figcaption>"
    if tile.kind is Mark.IMAGE and tile.path is not None:
        source = html.escape(href(tile.path))
        return (f'<figure class=tile style="width:{width}px"><a href="{source}">'
                f'<img loading=lazy src="{source}" width={width} height={height} alt="{hint}" '
                f'title="{hint}"></a>{caption}</figure>')
    return (f'<figure class="tile {tile.kind.value}" data-state="{html.escape(tile.state)}" '
            f'style="width:{width}px"><div class=marker title="{hint}" '
            f'style="width:{width}px;height:{height}px">{html.escape(tile.state)}</div>'
            f"{caption}</figure>")


# --- PNG ----------------------------------------------------------------------------------

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
MARGIN, PAD, GAP, SECTION_GAP = 24, 6, 6, 28
HEADER_MAX = 220  # a row label wider than this is cut with "…"
BACKGROUND, INK, GREY, RULE, HEAD = "#f6f6f4", "#222222", "#666666", "#dddddd", "#eeeeee"


@dataclass(frozen=True, slots=True)
class Png:
    data: bytes
    width: int
    height: int
    thumb: int  # smaller than asked when the sheet had to shrink to fit


@dataclass(frozen=True, slots=True)
class _Text:
    x: int
    y: int
    text: str
    font: Font
    fill: str
    width: int


@dataclass(frozen=True, slots=True)
class _Box:
    x: int
    y: int
    w: int
    h: int
    fill: str


@dataclass(frozen=True, slots=True)
class _Picture:
    x: int
    y: int
    w: int
    h: int
    tile: Tile


_Op = _Text | _Box | _Picture


def png_sheet(heading: str, sheets: Sequence[Sheet], *, thumb: int, across: bool) -> Png:
    """The contact sheet as one PNG. When it would pass `MAX_PIXELS` or `MAX_SIDE`, the
    thumbnails shrink (down to `MIN_THUMB`); when even that is too big, nothing is drawn."""
    fonts = _Fonts.load()
    size = thumb
    while True:
        width, height, ops = _Layout(fonts, size, across).page(heading, sheets)
        if width * height <= MAX_PIXELS and max(width, height) <= MAX_SIDE:
            break
        if size == MIN_THUMB:
            count = sum(t.kind is not Mark.EXCLUDED for s in sheets for t in s.tiles())
            raise FluxbatchError(
                f"--png: the contact sheet of {plural(count, 'image')} does not fit in one PNG "
                f"(at most {MAX_PIXELS:,} pixels and {MAX_SIDE:,} px a side), even with "
                f"{MIN_THUMB} px thumbnails; nothing was written. The HTML gallery (without "
                "--png) shows them all.")
        scale = min(0.95, math.sqrt(MAX_PIXELS / (width * height)), MAX_SIDE / max(width, height))
        size = max(MIN_THUMB, int(size * scale))
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for op in ops:
        _draw(canvas, draw, op, fonts)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return Png(buffer.getvalue(), width, height, size)


@dataclass(frozen=True, slots=True)
class _Fonts:
    title: Font
    text: Font
    small: Font

    @classmethod
    def load(cls) -> _Fonts:
        return cls(_font(18, bold=True), _font(13), _font(11))


# Pillow's own font has no glyph for "×" or "é"; these system fonts (found by file name in
# the system's font folders) have, and one of them is on most Linux machines.
FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")
BOLD_FONTS = ("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf", "Arial Bold.ttf")


def _font(size: int, *, bold: bool = False) -> Font:
    for name in BOLD_FONTS if bold else FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0 has only the small bitmap font
        return ImageFont.load_default()


TITLE_LINE, TEXT_LINE, SMALL_LINE = 24, 17, 15


class _Layout:
    """Places everything relative to a sheet's top left; `page` stacks the sheets."""

    def __init__(self, fonts: _Fonts, thumb: int, across: bool) -> None:
        self.fonts, self.thumb, self.across = fonts, thumb, across

    def page(self, heading: str, sheets: Sequence[Sheet]) -> tuple[int, int, list[_Op]]:
        tables = [self.sheet(s, 0) for s in sheets if s.rows]
        # a strip wraps at the widest table, or at six thumbnails if that is narrower
        wrap = max([w for w, _, _ in tables] + [6 * (self.thumb + GAP)])
        laid = iter(tables)
        placed = [next(laid) if s.rows else self.sheet(s, wrap) for s in sheets]
        width = max([320, *(w for w, _, _ in placed)])
        ops: list[_Op] = [_Text(MARGIN, MARGIN, heading, self.fonts.title, INK, width)]
        y = MARGIN + TITLE_LINE + 4
        for _, h, sheet_ops in placed:
            y += SECTION_GAP
            ops.extend(dataclasses.replace(op, x=op.x + MARGIN, y=op.y + y) for op in sheet_ops)
            y += h
        return width + 2 * MARGIN, y + MARGIN, ops

    def sheet(self, sheet: Sheet, wrap: int) -> tuple[int, int, list[_Op]]:
        tiles = sheet.tiles()
        sizes = [fit(t.shape, self.thumb) for t in tiles] or [(self.thumb, self.thumb)]
        box = (max(w for w, _ in sizes), max(h for _, h in sizes))
        ops: list[_Op] = []
        top = TITLE_LINE + SMALL_LINE + 6
        body = self.table(sheet, box, top, ops) if sheet.rows else \
            self.strip(sheet, box, top, wrap, ops)
        # the title may be wider than a narrow strip: the page widens for it
        width = math.ceil(max(body[0], self.fonts.title.getlength(sheet.title),
                              self.fonts.small.getlength(sheet.summary)))
        ops[:0] = [_Text(0, 0, sheet.title, self.fonts.title, INK, width),
                   _Text(0, TITLE_LINE, sheet.summary, self.fonts.small, GREY, width)]
        return width, top + body[1], ops

    def table(self, sheet: Sheet, box: tuple[int, int], top: int,
              ops: list[_Op]) -> tuple[int, int]:
        cells = {at: self.cell_size(groups, box) for at, groups in sheet.cells.items()}
        empty = (box[0], box[1] + SMALL_LINE)
        rows, cols = range(len(sheet.rows)), range(len(sheet.cols))
        # a column is as wide as its widest cell, or its header up to the limit, so that a
        # value longer than a thumbnail ("studio photo" over 64-px tiles) is read whole
        col_w = [max(max(cells.get((i, j), empty)[0] for i in rows),
                     self.text_width(sheet.cols[j])) + 2 * PAD for j in cols]
        row_h = [max([cells.get((i, j), empty)[1] + 2 * PAD for j in cols]
                     + [self.label_height(sheet.rows[i])]) for i in rows]
        head_w = max(max(self.text_width(label) for label in (Label(sheet.corner), *sheet.rows))
                     + 2 * PAD, 60)
        head_h = max(self.label_height(label) for label in (*sheet.cols, Label(sheet.corner)))
        self.label(Label(sheet.corner), 0, top, head_w, head_h, HEAD, ops)
        x = head_w
        for j, label in enumerate(sheet.cols):
            self.label(label, x, top, col_w[j], head_h, HEAD, ops)
            x += col_w[j]
        y = top + head_h
        for i, label in enumerate(sheet.rows):
            self.label(label, 0, y, head_w, row_h[i], HEAD, ops)
            x = head_w
            for j in cols:
                groups = sheet.cells.get((i, j))
                ops.append(_Box(x, y, col_w[j], row_h[i], "#ffffff" if groups else "#ecece9"))
                self.groups(groups or (), x + PAD, y + PAD, box, ops)
                x += col_w[j]
            y += row_h[i]
        return x, y - top

    def strip(self, sheet: Sheet, box: tuple[int, int], top: int, wrap: int,
              ops: list[_Op]) -> tuple[int, int]:
        sizes = [self.cell_size(sheet.cells.get((0, j), ()), box) for j in range(len(sheet.cols))]
        slot_w = max(w for w, _ in sizes) + 2 * PAD
        label_h = max(self.label_height(label) for label in sheet.cols) - PAD
        slot_h = label_h + max(h for _, h in sizes) + 2 * PAD
        per_line = max(1, (wrap + GAP) // (slot_w + GAP))
        for j, label in enumerate(sheet.cols):
            x = (j % per_line) * (slot_w + GAP)
            y = top + (j // per_line) * (slot_h + GAP)
            ops.append(_Box(x, y, slot_w, slot_h, "#ffffff"))
            self.label(label, x, y, slot_w, label_h, None, ops)
            self.groups(sheet.cells.get((0, j), ()), x + PAD, y + label_h + PAD, box, ops)
        lines = math.ceil(len(sheet.cols) / per_line)
        return (min(per_line, len(sheet.cols)) * (slot_w + GAP) - GAP,
                lines * (slot_h + GAP) - GAP)

    def cell_size(self, groups: Sequence[Group], box: tuple[int, int]) -> tuple[int, int]:
        longest = max((len(g) for g in groups), default=1)
        across, down = (longest, len(groups)) if self.across else (len(groups), longest)
        return (across * (box[0] + GAP) - GAP, down * (box[1] + SMALL_LINE + GAP) - GAP)

    def groups(self, groups: Sequence[Group], x: int, y: int, box: tuple[int, int],
               ops: list[_Op]) -> None:
        for g, group in enumerate(groups):
            for t, tile in enumerate(group):
                line, column = (g, t) if self.across else (t, g)
                tx, ty = x + column * (box[0] + GAP), y + line * (box[1] + SMALL_LINE + GAP)
                ops.append(_Picture(tx, ty, box[0], box[1], tile))
                ops.append(_Text(tx, ty + box[1] + 1, tile.caption, self.fonts.small, GREY,
                                 box[0]))

    def label(self, label: Label, x: int, y: int, w: int, h: int, fill: str | None,
              ops: list[_Op]) -> None:
        if fill is not None:
            ops.append(_Box(x, y, w, h, fill))
        ops.append(_Text(x + PAD, y + PAD, label.text, self.fonts.text, INK, w - 2 * PAD))
        for n, note in enumerate(label.notes):
            ops.append(_Text(x + PAD, y + PAD + TEXT_LINE + n * SMALL_LINE, note,
                             self.fonts.small, GREY, w - 2 * PAD))

    def text_width(self, label: Label) -> int:
        """The width a label's texts need, up to HEADER_MAX (rounded up: a text wider than
        its box by a fraction of a pixel is cut with "…", as "subject \\ style" was)."""
        widths = [self.fonts.text.getlength(label.text),
                  *(self.fonts.small.getlength(note) for note in label.notes)]
        return math.ceil(min(HEADER_MAX, max(widths)))

    @staticmethod
    def label_height(label: Label) -> int:
        return 2 * PAD + TEXT_LINE + len(label.notes) * SMALL_LINE


def _draw(canvas: Image.Image, draw: ImageDraw.ImageDraw, op: _Op, fonts: _Fonts) -> None:
    if isinstance(op, _Text):
        draw.text((op.x, op.y), _cut(op.text, op.font, op.width), font=op.font, fill=op.fill)
    elif isinstance(op, _Box):
        draw.rectangle((op.x, op.y, op.x + op.w - 1, op.y + op.h - 1), fill=op.fill,
                       outline=RULE)
    elif op.tile.kind is Mark.IMAGE and op.tile.path is not None:
        thumbnail = _thumbnail(op.tile.path, (op.w, op.h))
        if thumbnail is None:
            _marker(draw, op, "unreadable", "#b00020", "#fbeaea", fonts)
        else:
            canvas.paste(thumbnail, (op.x + (op.w - thumbnail.width) // 2,
                                     op.y + (op.h - thumbnail.height) // 2))
    elif op.tile.kind is Mark.EXCLUDED:
        _marker(draw, op, op.tile.state, GREY, "#ececec", fonts, hatched=True)
    else:
        _marker(draw, op, op.tile.state, "#b00020", "#fbeaea", fonts)


def _thumbnail(path: Path, box: tuple[int, int]) -> Image.Image | None:
    opened: Image.Image
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", box)  # a JPEG decodes at a fraction of its size: much faster
            opened.thumbnail(box)
            rgba = opened.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None  # drawn as "unreadable": one bad file must not lose the whole sheet
    flat = Image.new("RGB", rgba.size, "#ffffff")  # transparency shown on white, as in HTML
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _marker(draw: ImageDraw.ImageDraw, op: _Picture, text: str, ink: str, fill: str,
            fonts: _Fonts, *, hatched: bool = False) -> None:
    draw.rectangle((op.x, op.y, op.x + op.w - 1, op.y + op.h - 1), fill=fill, outline=ink,
                   width=2)
    if hatched:  # as in the HTML: an excluded cell reads as "left out", not "broken"
        for offset in range(0, op.w + op.h - 8, 12):
            draw.line(_diagonal(op, offset), fill="#d4d4d4", width=1)
    draw.text((op.x + op.w // 2, op.y + op.h // 2), _cut(text, fonts.text, op.w - 8),
              font=fonts.text, fill=ink, anchor="mm")


def _diagonal(op: _Picture, offset: int) -> tuple[int, int, int, int]:
    """The 45° line `x + y = offset` (box coordinates) clipped to the box, inset by 2."""
    w, h = op.w - 4, op.h - 4
    x0, y0 = max(0, offset - h), min(h, offset)
    x1, y1 = min(w, offset), max(0, offset - w)
    return op.x + 2 + x0, op.y + 2 + y0, op.x + 2 + x1, op.y + 2 + y1


def _cut(text: str, font: Font, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with its "…"
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle] + "…") <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…"
