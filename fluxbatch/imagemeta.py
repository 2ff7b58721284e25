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

Beside it, `embed` can write an AUTOMATIC1111-style `parameters` text (prompt, then
`Steps: …, Seed: …, Size: …`), which image browsers, Civitai and prompt readers show:

* PNG: a text chunk keyed `parameters` after fluxbatch's own (`tEXt` when the text is Latin-1,
  else uncompressed `iTXt`, as Pillow and A1111 write it). object earlier `parameters` chunk is
  replaced: readers take one.
* JPEG and WebP: the EXIF `UserComment`, as `UNICODE\0` + UTF-16BE (what A1111 writes, and
  what its readers decode, whatever the EXIF's byte order). With no EXIF, fluxbatch writes a
  minimal one of its own (a big-endian TIFF: IFD0 → Exif IFD → UserComment), recognised again
  by its exact layout. An EXIF block another tool wrote is kept byte for byte and the comment
  merged into it by appending: a copy of its IFD that gains UserComment, one 4-byte pointer
  re-aimed at that copy, and a trailer recording that pointer's old value and the block's old
  length, so that stamping again restores the original first (nothing in it moves, so its
  offsets, maker notes and thumbnail stay valid). An EXIF block that cannot be parsed, or
  that the comment would push past one JPEG segment (64 KiB), is left as it is, without the
  text.

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


def embed(data: bytes, payload: Mapping[str, object], parameters: str | None = None) -> bytes:
    """The image with `payload` as its only fluxbatch metadata; image data byte-for-byte kept.
    With `parameters`, that A1111-style text replaces the one the image carries (if any);
    without, the image's `parameters` text is left as it is."""
    text = json.dumps(
        payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return _CODECS[_writable_format(data)].embed(data, text, parameters)


def extract(data: bytes) -> dict[str, object] | None:
    """The fluxbatch payload embedded in the image, or None if it has none."""
    return _CODECS[_writable_format(data)].extract(data)


def parameters(data: bytes) -> str | None:
    """The A1111-style `parameters` text the image carries (PNG text chunk, or JPEG/WebP EXIF
    UserComment), whoever wrote it; None if it has none, or an EXIF block too damaged to
    read one from (that is not fluxbatch's to judge)."""
    return _CODECS[_writable_format(data)].parameters(data)


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


def _load(raw: bytes | str, where: str) -> dict[str, object]:
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


def _xmp_extract(packet: bytes, where: str) -> dict[str, object] | None:
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


# --- EXIF UserComment (JPEG and WebP) -------------------------------------------------------

_TIFF_ORDERS = {b"II*\0": "<", b"MM\0*": ">"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286  # IFD0's pointer to the Exif IFD; UserComment
_LONG, _UNDEFINED, _IFD_TYPE = 4, 7, 13
_UNICODE, _ASCII = b"UNICODE\0", b"ASCII\0\0\0"
# Ends an EXIF block another tool wrote, into which fluxbatch merged its comment; followed
# by the block's old length, the offset of the pointer re-aimed, and that pointer's old bytes.
_MERGED = b"fluxbatch:exif\0\0"
_TRAILER = struct.Struct(">II4s")
_OWN_HEAD = 44  # header 8, IFD0 18, Exif IFD 18: the comment starts here


def _user_comment(text: str) -> bytes:
    return _UNICODE + text.encode("utf-16-be", "replace")


def _own_exif(comment: bytes) -> bytes:
    """fluxbatch's own EXIF (TIFF) block: IFD0 holding only the Exif IFD pointer, and an
    Exif IFD holding only UserComment."""
    def ifd(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack(">HHHII", 1, tag, kind, count, value) + bytes(4)

    return (b"MM\0*" + struct.pack(">I", 8) + ifd(_EXIF_IFD, _LONG, 1, 26)
            + ifd(_USER_COMMENT, _UNDEFINED, len(comment), _OWN_HEAD) + comment)


def _is_own_exif(tiff: bytes) -> bool:
    return len(tiff) > _OWN_HEAD and tiff == _own_exif(tiff[_OWN_HEAD:])


@dataclass(frozen=True, slots=True)
class _Ifd:
    at: int
    entries: list[bytes]  # 12 bytes each: tag, type, count, value or offset
    next: bytes  # the 4 bytes after the entries: the next IFD's offset

    def find(self, order: str, tag: int) -> int | None:
        return next((i for i, entry in enumerate(self.entries)
                     if struct.unpack(order + "H", entry[:2])[0] == tag), None)


def _read_ifd(tiff: bytes, order: str, at: int) -> _Ifd | None:
    if at < 8 or at + 2 > len(tiff):
        return None
    (count,) = struct.unpack(order + "H", tiff[at : at + 2])
    end = at + 2 + 12 * count
    if end + 4 > len(tiff):
        return None
    return _Ifd(at, [tiff[i : i + 12] for i in range(at + 2, end, 12)], tiff[end : end + 4])


def _exif_ifd(tiff: bytes) -> tuple[str, _Ifd, int, _Ifd | None] | None:
    """The TIFF's byte order, IFD0, the index of its Exif IFD pointer (-1: none) and the
    Exif IFD; None when the block is not a TIFF that can be read so far."""
    order = _TIFF_ORDERS.get(tiff[:4])
    if order is None:
        return None
    ifd0 = _read_ifd(tiff, order, struct.unpack(order + "I", tiff[4:8])[0])
    if ifd0 is None:
        return None
    index = ifd0.find(order, _EXIF_IFD)
    if index is None:
        return order, ifd0, -1, None
    kind, count, at = struct.unpack(order + "HII", ifd0.entries[index][2:])
    exif = _read_ifd(tiff, order, at) if kind in (_LONG, _IFD_TYPE) and count == 1 else None
    return (order, ifd0, index, exif) if exif is not None else None


def _comment_text(tiff: bytes) -> str | None:
    """The UserComment of an EXIF (TIFF) block, decoded; None if it has none or is damaged."""
    found = _exif_ifd(tiff)
    exif = None if found is None else found[3]
    if found is None or exif is None:
        return None
    order = found[0]
    index = exif.find(order, _USER_COMMENT)
    if index is None:
        return None
    _, count, at = struct.unpack(order + "HII", exif.entries[index][2:])
    value = exif.entries[index][8 : 8 + count] if count <= 4 else tiff[at : at + count]
    if len(value) != count:
        return None
    head, body = value[:8], value[8:]
    if head == _UNICODE:
        little = body.startswith(b"\xff\xfe")
        return body.decode("utf-16-le" if little else "utf-16-be", "replace").lstrip("\ufeff")
    if head == _ASCII:
        return body.decode("ascii", "replace").rstrip("\0")
    return None


def _unmerged(tiff: bytes) -> bytes:
    """Another tool's EXIF block as it was before fluxbatch merged a comment into it (it
    may have been merged into more than once by a tool that did not know the trailer)."""
    while len(tiff) >= len(_MERGED) + _TRAILER.size and \
            tiff[-_TRAILER.size - len(_MERGED) : -_TRAILER.size] == _MERGED:
        length, at, value = _TRAILER.unpack(tiff[-_TRAILER.size :])
        if length > len(tiff) - _TRAILER.size - len(_MERGED) or at + 4 > length:
            break  # not a trailer fluxbatch wrote
        tiff = tiff[:at] + value + tiff[at + 4 : length]
    return tiff


def _merged(tiff: bytes, comment: bytes) -> bytes | None:
    """Another tool's EXIF block with `comment` as its UserComment, added by appending (see
    the module's docstring); None when the block cannot be read."""
    found = _exif_ifd(tiff)
    if found is None:
        return None
    order, ifd0, index, exif = found
    base = tiff + bytes(len(tiff) % 2)  # IFDs start on a word boundary

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack(order + "HHII", tag, kind, count, value)

    def ifd(entries: Iterable[bytes], following: bytes) -> bytes:
        ordered = sorted(entries, key=lambda raw: struct.unpack(order + "H", raw[:2])[0])
        return struct.pack(order + "H", len(ordered)) + b"".join(ordered) + following

    kept = [] if exif is None else \
        [e for i, e in enumerate(exif.entries) if i != exif.find(order, _USER_COMMENT)]
    exif_at = len(base)
    comment_at = exif_at + 2 + 12 * (len(kept) + 1) + 4
    appendix = ifd([*kept, entry(_USER_COMMENT, _UNDEFINED, len(comment), comment_at)],
                   bytes(4) if exif is None else exif.next) + comment + bytes(len(comment) % 2)
    if exif is not None:  # the Exif IFD's pointer in IFD0 is aimed at the copy
        at, value = ifd0.at + 2 + 12 * index + 8, exif_at
    else:  # IFD0 gains a pointer: a copy of it, and the header aimed at that
        at, value = 4, len(base) + len(appendix)
        appendix += ifd([*ifd0.entries, entry(_EXIF_IFD, _LONG, 1, exif_at)], ifd0.next)
    trailer = _MERGED + _TRAILER.pack(len(tiff), at, tiff[at : at + 4])
    return base[:at] + struct.pack(order + "I", value) + base[at + 4 :] + appendix + trailer


def _comment_blocks(blocks: list[bytes], text: str,
                    limit: int) -> tuple[list[bytes | None], bytes | None]:
    """What the image's EXIF blocks (in file order) become once `text` is the comment: each
    block as it is to be written (None: removed, it was fluxbatch's own), and fluxbatch's own
    block to add (None: another tool's block took the comment, or could not, or it would
    not fit in `limit` bytes)."""
    comment = _user_comment(text)
    result: list[bytes | None] = []
    foreign = False
    for block in blocks:
        if _is_own_exif(block):
            result.append(None)
            continue
        original = _unmerged(block)
        merged = None if foreign else _merged(original, comment)
        foreign = True  # (the first block is the one readers read)
        result.append(merged if merged is not None and len(merged) <= limit else original)
    own = _own_exif(comment)
    return result, own if not foreign and len(own) <= limit else None


# --- PNG -------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt"}
_PNG_KEYWORD = KEY.encode() + b"\0"
_PNG_PARAMETERS = b"parameters\0"
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


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_text_chunk(keyword: bytes, text: str) -> bytes:
    """`tEXt` when the text is Latin-1, else uncompressed `iTXt` (keyword, compression flag
    and method 0, empty language tag and translated keyword), as Pillow writes text."""
    try:
        return _png_chunk(b"tEXt", keyword + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", keyword + b"\0\0\0\0" + text.encode("utf-8", "replace"))


def _is_png_text(part: _Part, keyword: bytes) -> bool:
    return part.kind in _PNG_TEXT and part.body.startswith(keyword)


def _png_embed(data: bytes, text: str, parameters: str | None) -> bytes:
    parts, trailer = _png_chunks(data)
    replaced = [_PNG_KEYWORD] + ([_PNG_PARAMETERS] if parameters is not None else [])
    kept = [p.raw for p in parts if not any(_is_png_text(p, word) for word in replaced)]
    chunks = [_png_chunk(b"iTXt", _PNG_KEYWORD + b"\0\0\0\0" + text.encode("utf-8"))]
    if parameters is not None:  # (no NUL: it would end the text for every reader)
        chunks.append(_png_text_chunk(_PNG_PARAMETERS, parameters.replace("\0", " ")))
    return _PNG_SIGNATURE + kept[0] + b"".join(chunks) + b"".join(kept[1:]) + trailer


def _png_parameters(data: bytes) -> str | None:
    parts, _ = _png_chunks(data)
    part = next((p for p in parts if _is_png_text(p, _PNG_PARAMETERS)), None)
    if part is None:
        return None
    where = f"PNG {part.kind.decode()} chunk at byte {part.offset}"
    fields = part.body[len(_PNG_PARAMETERS) :]
    if part.kind == b"tEXt":
        return fields.decode("latin-1")
    if part.kind == b"zTXt":
        return _inflated(fields[1:], where).decode("latin-1")
    return _itxt_text(fields, where).decode("utf-8", "replace")


def _png_extract(data: bytes) -> dict[str, object] | None:
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
    return _inflated(text, where)


def _inflated(text: bytes, where: str) -> bytes:
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
    return part.kind[0] == _APP0 or _is_exif(part)


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


def _is_exif(part: _Part) -> bool:
    return part.kind[0] == _APP1 and part.body.startswith(_EXIF_HEADER)


def _exif_segment(tiff: bytes) -> _Part:
    body = _EXIF_HEADER + tiff
    return _Part(bytes([_APP1]), -1, _jpeg_segment(_APP1, body), body)


def _jpeg_with_comment(parts: list[_Part], text: str) -> list[_Part]:
    """The segments with `text` as the EXIF UserComment (see `_comment_blocks`); fluxbatch's
    own EXIF segment goes right after SOI and JFIF, where readers look for it."""
    exif = [i for i, part in enumerate(parts) if _is_exif(part)]
    blocks, own = _comment_blocks([parts[i].body[len(_EXIF_HEADER) :] for i in exif], text,
                                  _SEGMENT_MAX - len(_EXIF_HEADER))
    becomes = dict(zip(exif, blocks, strict=True))
    result = []
    for i, part in enumerate(parts):
        if i not in becomes:
            result.append(part)
        elif (block := becomes[i]) is not None:
            result.append(_exif_segment(block))
    if own is not None:
        at = next((i for i, part in enumerate(result) if part.kind[0] != _APP0), len(result))
        result.insert(at, _exif_segment(own))
    return result


def _jpeg_embed(data: bytes, text: str, parameters: str | None) -> bytes:
    parts, sos = _jpeg_segments(data)
    kept = [part for part in parts if not (_is_fluxbatch_xmp(part) or _is_fluxbatch_com(part))]
    if parameters is not None:
        kept = _jpeg_with_comment(kept, parameters)
    at = max((i + 1 for i, part in enumerate(kept) if _is_jfif_or_exif(part)), default=0)
    head, tail = (b"".join(part.raw for part in side) for side in (kept[:at], kept[at:]))
    return data[:2] + head + _jpeg_metadata(text) + tail + data[sos:]


def _jpeg_extract(data: bytes) -> dict[str, object] | None:
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


def _jpeg_parameters(data: bytes) -> str | None:
    parts, _ = _jpeg_segments(data)
    exif = next((part for part in parts if _is_exif(part)), None)
    return None if exif is None else _comment_text(exif.body[len(_EXIF_HEADER) :])


def _jpeg_image_parts(data: bytes) -> Iterable[bytes]:
    parts, sos = _jpeg_segments(data)
    yield data[:2]
    for part in parts:
        if not (_APP0 <= part.kind[0] <= _APP15 or part.kind[0] == _COM):
            yield part.raw
    yield data[sos:]


# --- WebP ------------------------------------------------------------------------------------

_WEBP_METADATA = {b"XMP ", b"EXIF", b"ICCP"}
_VP8X_ALPHA, _VP8X_EXIF, _VP8X_XMP = 0x10, 0x08, 0x04


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


def _webp_with_comment(parts: list[_Part], text: str) -> list[_Part]:
    """The chunks with `text` as the EXIF UserComment (see `_comment_blocks`); a new EXIF
    chunk goes where the spec orders it: after the image data, before XMP. (Some writers
    start the chunk with JPEG's `Exif\\0\\0`: it is kept.)"""
    at = next((i for i, part in enumerate(parts) if part.kind == b"EXIF"), None)
    found = [] if at is None else [parts.pop(at).body]
    prefix = _EXIF_HEADER if found and found[0].startswith(_EXIF_HEADER) else b""
    blocks, own = _comment_blocks([body[len(prefix) :] for body in found], text, _MAX_TEXT)
    block = own if own is not None else blocks[0] if blocks else None
    if block is not None:
        if at is None:
            at = next((i for i, part in enumerate(parts) if part.kind == b"XMP "), len(parts))
        body = (prefix if own is None else b"") + block
        parts.insert(at, _Part(b"EXIF", -1, _webp_chunk(b"EXIF", body), body))
    return parts


def _webp_embed(data: bytes, text: str, parameters: str | None) -> bytes:
    parts, trailer = _webp_chunks(data)
    vp8x = _vp8x_body(parts)
    rest = parts[1:] if parts[0].kind == b"VP8X" else parts
    if parameters is not None:
        rest = _webp_with_comment(list(rest), parameters)
    xmp_at = next((i for i, part in enumerate(rest) if part.kind == b"XMP "), len(rest))
    chunks = [_padded(part.raw) for part in rest if part.kind != b"XMP "]
    chunks.insert(xmp_at, _webp_chunk(b"XMP ", _xmp_packet(text)))
    flags = vp8x[0] | _VP8X_XMP
    if parameters is not None:  # (the EXIF flag says whether there is an EXIF chunk now)
        has_exif = any(part.kind == b"EXIF" for part in rest)
        flags = flags & ~_VP8X_EXIF | (_VP8X_EXIF if has_exif else 0)
    header = _webp_chunk(b"VP8X", bytes([flags]) + vp8x[1:])
    riff = b"".join([b"WEBP", header, *chunks])
    return b"RIFF" + struct.pack("<I", len(riff)) + riff + trailer


def _webp_extract(data: bytes) -> dict[str, object] | None:
    parts, _ = _webp_chunks(data)
    for part in parts:
        if part.kind == b"XMP ":
            return _xmp_extract(part.body, f"WebP XMP chunk at byte {part.offset}")
    return None


def _webp_parameters(data: bytes) -> str | None:
    parts, _ = _webp_chunks(data)
    body = next((part.body for part in parts if part.kind == b"EXIF"), None)
    if body is None:
        return None
    return _comment_text(body[len(_EXIF_HEADER) :] if body.startswith(_EXIF_HEADER) else body)


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
    embed: Callable[[bytes, str, str | None], bytes]
    extract: Callable[[bytes], dict[str, object] | None]
    parameters: Callable[[bytes], str | None]
    image_parts: Callable[[bytes], Iterable[bytes]]


_CODECS = {
    "png": _Codec(_png_embed, _png_extract, _png_parameters, _png_image_parts),
    "jpeg": _Codec(_jpeg_embed, _jpeg_extract, _jpeg_parameters, _jpeg_image_parts),
    "webp": _Codec(_webp_embed, _webp_extract, _webp_parameters, _webp_image_parts),
}
