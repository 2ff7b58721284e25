"""Provenance inside PNG, JPEG and WebP files, written by editing the container, never the pixels.

The payload is compact JSON (sorted keys, UTF-8) stored under the key `fluxbatch`:

* PNG: one `iTXt` chunk with keyword `fluxbatch`, right after `IHDR`. The text is always stored
  uncompressed: provenance is small, stays greppable, and Pillow refuses to open a PNG whose
  compressed text inflates past 1 MiB. Compressed `iTXt` is read back all the same. Only the
  fluxbatch chunk's CRC is checked, when reading it (a mismatch is reported as corrupt
  metadata); the CRCs of other chunks are neither checked nor changed.
* JPEG: an APP1 XMP segment with the JSON in `fluxbatch:provenance`, after SOI, JFIF and Exif.
  One APP1 segment holds at most 65,502 bytes of XMP, so a larger packet is written instead as
  COM segments whose bodies start with `fluxbatch:` and are concatenated in file order. XMP
  segments written by other tools are left alone.
* WebP: the `XMP ` chunk (WebP allows one, so an existing one is replaced). A simple VP8/VP8L
  file becomes extended: a `VP8X` chunk with the XMP flag and the canvas size from the bitstream.

Bytes after the container's end are kept. Errors name the byte offset; callers add the path.
"""

from __future__ import annotations

import hashlib
import html
import json
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fluxbatch.errors import FluxbatchError

KEY = "fluxbatch"
EXTENSIONS = {
    "png": "png",
    "jpeg": "jpg",
    "webp": "webp",
    "gif": "gif",
    "avif": "avif",
    "heic": "heic",
}
WRITABLE = ("png", "jpeg", "webp")  # what embed, extract and image_data_digest accept


class ImageFormatError(FluxbatchError):
    """Image bytes are not a PNG, JPEG or WebP, or their container is malformed."""


@dataclass(frozen=True, slots=True)
class _Part:
    """One PNG chunk, JPEG segment or WebP chunk: its raw bytes (header to CRC/pad) and body."""

    kind: bytes
    offset: int
    raw: bytes
    body: bytes


def sniff(data: bytes) -> str | None:
    """The real format from the magic bytes, whatever the file name says."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    return None


def dimensions(data: bytes) -> tuple[int, int] | None:
    """Width and height as a PNG's, JPEG's or WebP's header states them, without decoding
    anything; None if the header cannot be read. For checking a size before any decoder
    sees the image: Pillow allocates a WebP's canvas as it opens the file, and refuses a
    PNG of more than 179 megapixels with an exception of its own."""
    try:
        fmt = sniff(data)
        if fmt == "png" and data[12:16] == b"IHDR" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if fmt == "jpeg":
            parts, _ = _jpeg_segments(data)
            frame = next((p.body for p in parts if p.kind[0] in _SOF and len(p.body) >= 5), None)
            if frame is not None:
                height, width = struct.unpack(">HH", frame[1:5])
                return width, height
        if fmt == "webp":
            canvas = int.from_bytes(_vp8x_body(_webp_chunks(data)[0])[4:10], "little")
            return (canvas & 0xFFFFFF) + 1, (canvas >> 24) + 1
    except ImageFormatError:
        pass
    return None


def embed(data: bytes, payload: Mapping[str, Any]) -> bytes:
    """The image with `payload` as its only fluxbatch metadata; image data byte-for-byte kept."""
    text = json.dumps(
        payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return _CODECS[_writable_format(data)].embed(data, text)


def extract(data: bytes) -> dict[str, Any] | None:
    """The fluxbatch payload embedded in the image, or None if it has none."""
    return _CODECS[_writable_format(data)].extract(data)


def image_data_digest(data: bytes) -> str:
    """Hex sha256 of the image data only: unchanged by `embed` or any other metadata edit."""
    digest = hashlib.sha256()
    for part in _CODECS[_writable_format(data)].image_parts(data):
        digest.update(part)
    return digest.hexdigest()


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def _sniff_ftyp(data: bytes) -> str | None:
    box_end = min(int.from_bytes(data[:4], "big"), len(data))
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, box_end - 3, 4)]
    if b"avif" in brands or b"avis" in brands:
        return "avif"
    if any(brand in _HEIF_BRANDS for brand in brands):
        return "heic"
    return None


def _writable_format(data: bytes) -> str:
    fmt = sniff(data)
    if fmt is not None and fmt in WRITABLE:
        return fmt
    if fmt is not None:
        raise ImageFormatError(
            f"{fmt.upper()} images cannot carry fluxbatch metadata; only PNG, JPEG and WebP can"
        )
    if not data:
        raise ImageFormatError("not an image: the data is empty")
    raise ImageFormatError(
        f"not a PNG, JPEG or WebP image (it starts with bytes {data[:8].hex(' ')})"
    )


def _load(raw: bytes | str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(raw if isinstance(raw, str) else raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8 and bad JSON are ValueErrors
        raise ImageFormatError(f"{where}: fluxbatch metadata is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ImageFormatError(f"{where}: fluxbatch metadata is not a JSON object")
    return value


def _name(kind: bytes) -> str:
    return ascii(kind.decode("latin-1"))


# --- XMP (JPEG and WebP) ---------------------------------------------------------------------

_XMP_NS = "urn:fluxbatch:provenance:1/"
_XMP_OPEN = b"<fluxbatch:provenance>"
_XMP_CLOSE = b"</fluxbatch:provenance>"


def _xmp_packet(text: str) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:fluxbatch="{_XMP_NS}">'
        f"<fluxbatch:provenance>{html.escape(text, quote=False)}</fluxbatch:provenance>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def _xmp_extract(packet: bytes, where: str) -> dict[str, Any] | None:
    # Our own packet is found by its element, not parsed as XML: foreign packets (maybe
    # UTF-16, maybe huge) are never decoded, and no XML parser sees untrusted input.
    start = packet.find(_XMP_OPEN)
    if start < 0:
        return None
    end = packet.find(_XMP_CLOSE, start)
    if end < 0:
        raise ImageFormatError(f"{where}: the fluxbatch:provenance XMP element is not closed")
    body = packet[start + len(_XMP_OPEN) : end]
    try:
        text = html.unescape(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ImageFormatError(f"{where}: fluxbatch XMP is not UTF-8 ({error})") from None
    return _load(text, where)


# --- PNG -------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt"}
_PNG_KEYWORD = KEY.encode() + b"\0"
_MAX_TEXT = 64 * 1024 * 1024


def _png_chunks(data: bytes) -> tuple[list[_Part], bytes]:
    """Chunks up to and including IEND, and the bytes after it."""
    parts: list[_Part] = []
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise ImageFormatError(f"PNG is truncated at byte {len(data)}: no IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if not kind.isalpha():
            raise ImageFormatError(f"PNG chunk at byte {pos} has an invalid type {_name(kind)}")
        end = pos + 12 + length
        if end > len(data):
            raise ImageFormatError(
                f"PNG chunk {_name(kind)} at byte {pos} is truncated: it needs {length + 12} "
                f"bytes, {len(data) - pos} remain"
            )
        parts.append(_Part(kind, pos, data[pos:end], data[pos + 8 : end - 4]))
        pos = end
        if kind == b"IEND":
            break
    if parts[0].kind != b"IHDR":
        raise ImageFormatError(f"PNG starts with chunk {_name(parts[0].kind)} instead of IHDR")
    return parts, data[pos:]


def _png_embed(data: bytes, text: str) -> bytes:
    parts, trailer = _png_chunks(data)
    kept = [p.raw for p in parts if not (p.kind in _PNG_TEXT and p.body.startswith(_PNG_KEYWORD))]
    # keyword, compression flag 0 and method 0, empty language tag and translated keyword
    chunk = b"iTXt" + _PNG_KEYWORD + b"\0\0\0\0" + text.encode("utf-8")
    itxt = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return _PNG_SIGNATURE + kept[0] + itxt + b"".join(kept[1:]) + trailer


def _png_extract(data: bytes) -> dict[str, Any] | None:
    parts, _ = _png_chunks(data)
    for part in parts:
        if part.kind == b"iTXt" and part.body.startswith(_PNG_KEYWORD):
            where = f"PNG iTXt chunk at byte {part.offset}"
            if zlib.crc32(part.raw[4:-4]) != int.from_bytes(part.raw[-4:], "big"):
                raise ImageFormatError(f"{where}: bad CRC, the fluxbatch metadata is corrupt")
            return _load(_itxt_text(part.body[len(_PNG_KEYWORD) :], where), where)
    return None


def _itxt_text(fields: bytes, where: str) -> bytes:
    """The text of an iTXt body after its keyword: flag, method, language\\0, keyword\\0, text."""
    rest = fields[2:].split(b"\0", 2)
    if len(fields) < 2 or len(rest) != 3:
        raise ImageFormatError(f"{where}: malformed iTXt chunk")
    compressed, method, text = fields[0], fields[1], rest[2]
    if compressed == 0:
        return text
    if compressed != 1 or method != 0:
        raise ImageFormatError(f"{where}: unknown iTXt compression {compressed}/{method}")
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(text, _MAX_TEXT)
    except zlib.error as error:
        raise ImageFormatError(f"{where}: compressed text is corrupt ({error})") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise ImageFormatError(f"{where}: compressed text is truncated or over 64 MiB")
    return inflated


def _png_image_parts(data: bytes) -> Iterable[bytes]:
    parts, _ = _png_chunks(data)
    yield _PNG_SIGNATURE
    for part in parts:
        if part.kind not in _PNG_TEXT and part.kind != b"tIME":
            yield part.raw


# --- JPEG ------------------------------------------------------------------------------------

_APP0, _APP1, _APP15, _SOS, _EOI, _COM = 0xE0, 0xE1, 0xEF, 0xDA, 0xD9, 0xFE
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # (DHT, JPG and DAC are not frames)
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_EXIF_HEADER = b"Exif\x00\x00"
_COM_PREFIX = KEY.encode() + b":"
_XMP_MAX = 65502
_SEGMENT_MAX = 65533


def _jpeg_segments(data: bytes) -> tuple[list[_Part], int]:
    """The segments between SOI and the first SOS, and the offset of that SOS."""
    parts: list[_Part] = []
    pos = 2
    while True:
        start = pos
        if pos >= len(data) or data[pos] != 0xFF:
            raise ImageFormatError(f"JPEG has no marker at byte {pos}: truncated or corrupt")
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= len(data):
            raise ImageFormatError(f"JPEG is truncated at byte {len(data)}: no image data (SOS)")
        marker = data[pos]
        pos += 1
        if marker == _SOS:
            return parts, start
        if marker in (0x00, 0xD8, _EOI):
            raise ImageFormatError(
                f"JPEG has marker 0xFF{marker:02X} at byte {start} before its image data (SOS)"
            )
        if marker in _STANDALONE:
            parts.append(_Part(bytes([marker]), start, data[start:pos], b""))
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        end = pos + length
        if end > len(data) or pos + 2 > len(data):
            raise ImageFormatError(
                f"JPEG segment 0xFF{marker:02X} at byte {start} is truncated: it needs "
                f"{end - start} bytes, {len(data) - start} remain"
            )
        if length < 2:
            raise ImageFormatError(
                f"JPEG segment 0xFF{marker:02X} at byte {start} has length {length}"
            )
        parts.append(_Part(bytes([marker]), start, data[start:end], data[pos + 2 : end]))
        pos = end


def _is_fluxbatch_xmp(part: _Part) -> bool:
    return part.kind[0] == _APP1 and part.body.startswith(_XMP_HEADER) and _XMP_OPEN in part.body


def _is_jfif_or_exif(part: _Part) -> bool:
    return part.kind[0] == _APP0 or (part.kind[0] == _APP1 and part.body.startswith(_EXIF_HEADER))


def _is_fluxbatch_com(part: _Part) -> bool:
    return part.kind[0] == _COM and part.body.startswith(_COM_PREFIX)


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def _jpeg_metadata(text: str) -> bytes:
    packet = _xmp_packet(text)
    if len(packet) <= _XMP_MAX:
        return _jpeg_segment(_APP1, _XMP_HEADER + packet)
    raw = text.encode("utf-8")
    step = _SEGMENT_MAX - len(_COM_PREFIX)
    return b"".join(
        _jpeg_segment(_COM, _COM_PREFIX + raw[i : i + step]) for i in range(0, len(raw), step)
    )


def _jpeg_embed(data: bytes, text: str) -> bytes:
    parts, sos = _jpeg_segments(data)
    kept = [part for part in parts if not (_is_fluxbatch_xmp(part) or _is_fluxbatch_com(part))]
    at = max((i + 1 for i, part in enumerate(kept) if _is_jfif_or_exif(part)), default=0)
    head, tail = (b"".join(part.raw for part in side) for side in (kept[:at], kept[at:]))
    return data[:2] + head + _jpeg_metadata(text) + tail + data[sos:]


def _jpeg_extract(data: bytes) -> dict[str, Any] | None:
    parts, _ = _jpeg_segments(data)
    for part in parts:
        if _is_fluxbatch_xmp(part):
            where = f"JPEG XMP segment at byte {part.offset}"
            return _xmp_extract(part.body[len(_XMP_HEADER) :], where)
    pieces = [part for part in parts if _is_fluxbatch_com(part)]
    if not pieces:
        return None
    text = b"".join(part.body[len(_COM_PREFIX) :] for part in pieces)
    return _load(text, f"JPEG COM segments from byte {pieces[0].offset}")


def _jpeg_image_parts(data: bytes) -> Iterable[bytes]:
    parts, sos = _jpeg_segments(data)
    yield data[:2]
    for part in parts:
        if not (_APP0 <= part.kind[0] <= _APP15 or part.kind[0] == _COM):
            yield part.raw
    yield data[sos:]


# --- WebP ------------------------------------------------------------------------------------

_WEBP_METADATA = {b"XMP ", b"EXIF", b"ICCP"}
_VP8X_ALPHA, _VP8X_XMP = 0x10, 0x04


def _webp_chunks(data: bytes) -> tuple[list[_Part], bytes]:
    """The chunks inside the RIFF container, and the bytes after it."""
    riff_size = int.from_bytes(data[4:8], "little")
    riff_end = 8 + riff_size
    if riff_end > len(data):
        raise ImageFormatError(
            f"WebP is truncated: its RIFF header declares {riff_size} bytes, {len(data) - 8} follow"
        )
    parts: list[_Part] = []
    pos = 12
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise ImageFormatError(f"WebP chunk header at byte {pos} is truncated")
        kind, size = struct.unpack("<4sI", data[pos : pos + 8])
        end = pos + 8 + size
        if end > riff_end:
            raise ImageFormatError(
                f"WebP chunk {_name(kind)} at byte {pos} is truncated: it needs {size + 8} "
                f"bytes, {riff_end - pos} remain"
            )
        padded_end = min(end + size % 2, riff_end)  # some writers omit the last pad byte
        parts.append(_Part(kind, pos, data[pos:padded_end], data[pos + 8 : end]))
        pos = padded_end
    if not parts:
        raise ImageFormatError("WebP has no chunks")
    if parts[0].kind == b"VP8X" and len(parts[0].body) < 10:
        raise ImageFormatError(f"WebP VP8X chunk at byte {parts[0].offset} is too short")
    return parts, data[riff_end:]


def _padded(raw: bytes) -> bytes:
    return raw + b"\0" if len(raw) % 2 else raw


def _webp_chunk(kind: bytes, body: bytes) -> bytes:
    return _padded(kind + struct.pack("<I", len(body)) + body)


def _vp8x_body(parts: list[_Part]) -> bytes:
    """The file's VP8X chunk body, or for a simple file one with the bitstream's canvas."""
    first = parts[0]
    if first.kind == b"VP8X":
        return first.body
    if first.kind == b"VP8 ":
        if len(first.body) < 10 or first.body[3:6] != b"\x9d\x01\x2a":
            raise ImageFormatError(f"WebP VP8 chunk at byte {first.offset} has no key frame header")
        width = int.from_bytes(first.body[6:8], "little") & 0x3FFF  # the top 2 bits: scaling
        height, alpha = int.from_bytes(first.body[8:10], "little") & 0x3FFF, False
        if width == 0 or height == 0:
            raise ImageFormatError(f"WebP VP8 chunk at byte {first.offset} has an empty frame")
    elif first.kind == b"VP8L":
        if len(first.body) < 5 or first.body[0] != 0x2F:
            raise ImageFormatError(f"WebP VP8L chunk at byte {first.offset} has no signature")
        bits = int.from_bytes(first.body[1:5], "little")
        width, height, alpha = (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1, bool(bits >> 28 & 1)
    else:
        raise ImageFormatError(f"WebP starts with chunk {_name(first.kind)}, not VP8X/VP8/VP8L")
    canvas = (width - 1) | (height - 1) << 24  # two 24-bit fields
    return bytes([_VP8X_ALPHA if alpha else 0, 0, 0, 0]) + canvas.to_bytes(6, "little")


def _webp_embed(data: bytes, text: str) -> bytes:
    parts, trailer = _webp_chunks(data)
    vp8x = _vp8x_body(parts)
    rest = parts[1:] if parts[0].kind == b"VP8X" else parts
    xmp_at = next((i for i, part in enumerate(rest) if part.kind == b"XMP "), len(rest))
    chunks = [_padded(part.raw) for part in rest if part.kind != b"XMP "]
    chunks.insert(xmp_at, _webp_chunk(b"XMP ", _xmp_packet(text)))
    header = _webp_chunk(b"VP8X", bytes([vp8x[0] | _VP8X_XMP]) + vp8x[1:])
    riff = b"".join([b"WEBP", header, *chunks])
    return b"RIFF" + struct.pack("<I", len(riff)) + riff + trailer


def _webp_extract(data: bytes) -> dict[str, Any] | None:
    parts, _ = _webp_chunks(data)
    for part in parts:
        if part.kind == b"XMP ":
            return _xmp_extract(part.body, f"WebP XMP chunk at byte {part.offset}")
    return None


def _webp_image_parts(data: bytes) -> Iterable[bytes]:
    parts, _ = _webp_chunks(data)
    # The canvas, not the VP8X chunk: its flags change with metadata, and a simple file
    # (no VP8X) must digest like its extended form.
    yield _vp8x_body(parts)[4:10]
    for part in parts:
        if part.kind not in _WEBP_METADATA and part.kind != b"VP8X":
            yield part.raw[:8] + part.body


@dataclass(frozen=True, slots=True)
class _Codec:
    embed: Callable[[bytes, str], bytes]
    extract: Callable[[bytes], dict[str, Any] | None]
    image_parts: Callable[[bytes], Iterable[bytes]]


_CODECS = {
    "png": _Codec(_png_embed, _png_extract, _png_image_parts),
    "jpeg": _Codec(_jpeg_embed, _jpeg_extract, _jpeg_image_parts),
    "webp": _Codec(_webp_embed, _webp_extract, _webp_image_parts),
}
