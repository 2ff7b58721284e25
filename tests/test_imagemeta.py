from __future__ import annotations

import io
import json
import random
import re
import struct
import zlib
from collections.abc import Callable
from functools import cache
from typing import Any
from xml.etree import ElementTree

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from fluxbatch.errors import FluxbatchError
from fluxbatch.imagemeta import (
    EXTENSIONS,
    ImageFormatError,
    embed,
    extract,
    image_data_digest,
    parameters,
    sniff,
)
from tests.helpers import examples

PAYLOAD = {
    "prompt": 'Zürich café at dusk, 東京 neon — "quoted" <tag> & ampersand',
    "seed": 42,
    "model": "flux-pro-1.1",
    "params": {"width": 1024, "ratio": 1.5, "raw": None, "safe": True, "tags": ["ä", "<&>"]},
}
OTHER = {"prompt": "second run", "seed": 7}
# 105 KB of JSON (more once XML-escaped): too big for one JPEG APP1 segment, so JPEG falls
# back to two COM segments.
LARGE = {"prompt": "big", "blob": '<&>"é' * 15_000}
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_PROPERTY = "{urn:fluxbatch:provenance:1/}provenance"


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "fluxbatch test camera"  # Make
    return exif.tobytes()


def _picture(mode: str, size: tuple[int, int]) -> Image.Image:
    """Gradients plus seeded noise: detail for the codecs, same pixels on every run."""
    gradient = Image.linear_gradient("L")
    bands = [gradient, Image.radial_gradient("L"), gradient.rotate(90)]
    base = Image.merge("RGB", [band.resize(size) for band in bands])
    noise = Image.frombytes("RGB", size, random.Random(1).randbytes(size[0] * size[1] * 3))
    picture = Image.blend(base, noise, 0.25)
    if mode == "RGBA":
        picture.putalpha(Image.radial_gradient("L").resize(size))
    return picture


# case id (format first) -> (mode, size, Pillow format, save options)
CASES: dict[str, tuple[str, tuple[int, int], str, dict[str, Any]]] = {
    "png-rgb": ("RGB", (64, 48), "PNG", {}),
    "png-rgba": ("RGBA", (64, 48), "PNG", {}),
    "png-1x1": ("RGB", (1, 1), "PNG", {}),
    "png-2048x1536": ("RGB", (2048, 1536), "PNG", {}),
    "jpeg-jfif": ("RGB", (64, 48), "JPEG", {"quality": 90}),
    "jpeg-exif": ("RGB", (64, 48), "JPEG", {"exif": _exif()}),
    "jpeg-1x1": ("RGB", (1, 1), "JPEG", {}),
    "jpeg-2048x1536": ("RGB", (2048, 1536), "JPEG", {}),
    "webp-lossy": ("RGB", (64, 48), "WEBP", {"quality": 80}),
    "webp-lossless": ("RGB", (64, 48), "WEBP", {"lossless": True}),
    "webp-lossless-rgba": ("RGBA", (64, 48), "WEBP", {"lossless": True}),
    "webp-alpha-vp8x": ("RGBA", (64, 48), "WEBP", {"quality": 80}),
    "webp-exif-vp8x": ("RGB", (64, 48), "WEBP", {"exif": _exif()}),
    "webp-1x1": ("RGB", (1, 1), "WEBP", {"lossless": True}),
    "webp-2048x1536": ("RGB", (2048, 1536), "WEBP", {"quality": 80}),
}
SMALL_CASES = [case for case in CASES if "2048" not in case]


@cache
def _image(case: str) -> bytes:
    mode, size, fmt, options = CASES[case]
    out = io.BytesIO()
    _picture(mode, size).save(out, fmt, **options)
    return out.getvalue()


@cache
def _pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, image.size, image.tobytes()


def _blocks(data: bytes) -> dict[str, int]:
    """How many fluxbatch blocks of each kind the file holds."""
    return {
        "iTXt": data.count(b"iTXtfluxbatch\x00"),
        "XMP": data.count(b"<fluxbatch:provenance>"),
        "COM": len(re.findall(rb"\xff\xfe..fluxbatch:", data, re.DOTALL)),
    }


def _xmp_payload(packet: bytes) -> Any:
    """The payload as an XML parser reads it: proves the packet is well-formed and escaped."""
    element = ElementTree.fromstring(packet).find(f".//{XMP_PROPERTY}")
    assert element is not None and element.text is not None
    return json.loads(element.text)


def test_the_cases_cover_simple_and_extended_webp_and_jfif_and_exif_jpeg() -> None:
    assert _image("webp-lossy")[12:16] == b"VP8 "
    assert _image("webp-lossless")[12:16] == b"VP8L"
    assert _image("webp-lossless-rgba")[12:16] == b"VP8L"
    assert _image("webp-alpha-vp8x")[12:16] == b"VP8X"
    assert _image("webp-exif-vp8x")[12:16] == b"VP8X"
    assert _image("jpeg-jfif")[6:11] == b"JFIF\x00"
    assert b"Exif\x00\x00" in _image("jpeg-exif")


@pytest.mark.parametrize("case", CASES)
def test_embed_keeps_pixels_and_image_data(case: str) -> None:
    original = _image(case)
    embedded = embed(original, PAYLOAD)

    assert embedded != original
    assert sniff(embedded) == sniff(original)
    assert _pixels(embedded) == _pixels(original)
    assert image_data_digest(embedded) == image_data_digest(original)


@pytest.mark.parametrize("case", CASES)
def test_extract_returns_the_embedded_payload(case: str) -> None:
    assert extract(_image(case)) is None
    assert extract(embed(_image(case), PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("case", SMALL_CASES)
def test_embedding_again_replaces_the_payload(case: str) -> None:
    original = _image(case)
    expected = embed(original, OTHER)

    assert embed(embed(original, PAYLOAD), OTHER) == expected
    assert embed(embed(original, LARGE), OTHER) == expected
    assert embed(embed(original, OTHER), LARGE) == embed(original, LARGE)
    assert extract(expected) == OTHER
    assert sum(_blocks(expected).values()) == 1


@pytest.mark.parametrize("case", CASES)
def test_large_payload_round_trips(case: str) -> None:
    original = _image(case)
    embedded = embed(original, LARGE)

    assert extract(embedded) == LARGE
    assert _pixels(embedded) == _pixels(original)
    assert image_data_digest(embedded) == image_data_digest(original)
    expected_blocks = {
        "png": {"iTXt": 1, "XMP": 0, "COM": 0},
        "jpeg": {"iTXt": 0, "XMP": 0, "COM": 2},  # the XMP packet would not fit one APP1
        "webp": {"iTXt": 0, "XMP": 1, "COM": 0},
    }
    assert _blocks(embedded) == expected_blocks[case.split("-")[0]]


@pytest.mark.parametrize("case", CASES)
def test_pillow_sees_the_metadata(case: str) -> None:
    with Image.open(io.BytesIO(embed(_image(case), PAYLOAD))) as image:
        if image.format == "PNG":
            assert json.loads(image.info["fluxbatch"]) == PAYLOAD
        else:
            assert _xmp_payload(image.info["xmp"]) == PAYLOAD


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_data_digest_changes_with_the_pixels(fmt: str) -> None:
    def encoded(picture: Image.Image) -> bytes:
        out = io.BytesIO()
        picture.save(out, fmt, lossless=True)  # only WebP reads `lossless`
        return out.getvalue()

    picture = _picture("RGB", (16, 16))
    original = encoded(picture)
    picture.putpixel((3, 5), (255, 0, 255))

    assert image_data_digest(encoded(picture)) != image_data_digest(original)


@pytest.mark.parametrize("case", SMALL_CASES)
def test_payload_is_compact_sorted_json(case: str) -> None:
    embedded = embed(_image(case), {"b": 1, "a": "é"})

    assert b'{"a":"\xc3\xa9","b":1}' in embedded


def test_jpeg_xmp_goes_after_jfif_and_exif() -> None:
    embedded = embed(_image("jpeg-exif"), PAYLOAD)

    assert embedded.index(b"JFIF") < embedded.index(b"Exif\x00\x00") < embedded.index(XMP_HEADER)
    assert embedded.index(XMP_HEADER) < embedded.index(b"\xff\xdb")  # before the first DQT


@pytest.mark.parametrize(
    ("case", "flags"),
    [("webp-lossy", 0x04), ("webp-lossless", 0x04), ("webp-lossless-rgba", 0x14)],
)
def test_simple_webp_becomes_extended_with_canvas_and_flags(case: str, flags: int) -> None:
    original = _image(case)
    embedded = embed(original, PAYLOAD)

    assert embedded[12:20] == b"VP8X\x0a\x00\x00\x00"
    assert embedded[20] == flags
    assert embedded[24:30] == (63).to_bytes(3, "little") + (47).to_bytes(3, "little")
    assert int.from_bytes(embedded[4:8], "little") == len(embedded) - 8
    assert embedded[30:].startswith(original[12:])  # the image chunk, byte for byte


def test_extended_webp_keeps_its_chunks_and_gains_the_xmp_flag() -> None:
    original = _image("webp-exif-vp8x")
    embedded = embed(original, PAYLOAD)

    assert embedded[20] == original[20] | 0x04
    assert embedded[21:30] == original[21:30]
    assert embedded[30 : len(original)] == original[30:]  # XMP appended after EXIF
    assert int.from_bytes(embedded[4:8], "little") == len(embedded) - 8


@pytest.mark.parametrize("case", ["webp-lossy", "webp-lossless", "webp-alpha-vp8x"])
def test_webp_odd_sized_xmp_chunk_is_padded(case: str) -> None:
    for payload in ({"a": "x"}, {"a": "xy"}):  # one of the two packets has an odd length
        embedded = embed(_image(case), payload)
        start = embedded.index(b"XMP ")
        size = int.from_bytes(embedded[start + 4 : start + 8], "little")
        assert len(embedded) == start + 8 + size + size % 2
        assert extract(embedded) == payload


def test_png_itxt_chunk_follows_ihdr_uncompressed() -> None:
    embedded = embed(_image("png-rgb"), {"a": 1})

    assert embedded[33:37] == struct.pack(">I", 21)
    assert embedded[37:62] == b'iTXtfluxbatch\x00\x00\x00\x00\x00{"a":1}'
    assert embedded[62:66] == struct.pack(">I", zlib.crc32(embedded[37:62]))
    assert embedded[66:74] == _image("png-rgb")[33:41]


def test_png_replaces_text_chunks_written_by_other_tools_and_reads_compressed_itxt() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("fluxbatch", json.dumps(PAYLOAD), zip=True)
    info.add_text("fluxbatch", "old tEXt")
    info.add_text("Software", "kept")
    out = io.BytesIO()
    _picture("RGB", (8, 8)).save(out, "PNG", pnginfo=info)
    written_elsewhere = out.getvalue()

    assert extract(written_elsewhere) == PAYLOAD
    embedded = embed(written_elsewhere, OTHER)
    assert extract(embedded) == OTHER
    assert b"old tEXt" not in embedded
    assert b"tEXtSoftware\x00kept" in embedded
    assert image_data_digest(embedded) == image_data_digest(written_elsewhere)


def test_jpeg_keeps_xmp_written_by_other_tools() -> None:
    foreign = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'
    out = io.BytesIO()
    _picture("RGB", (8, 8)).save(out, "JPEG")
    plain = out.getvalue()
    # Another tool's APP1 XMP segment, inserted by hand (older Pillow cannot write one).
    body = XMP_HEADER + foreign
    segment = b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
    embedded = embed(plain[:2] + segment + plain[2:], PAYLOAD)

    assert XMP_HEADER + foreign in embedded
    assert extract(embedded) == PAYLOAD


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
        (b"\xff\xd8\xff\xdb", "jpeg"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"GIF89a\x01\x00\x01\x00", "gif"),
        (b"GIF87a\x01\x00\x01\x00", "gif"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "avif"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif", "avif"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heic"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41", None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"\xff\xd8", None),
        (b"hello, world", None),
        (b"", None),
    ],
)
def test_sniff_reads_magic_bytes(head: bytes, expected: str | None) -> None:
    assert sniff(head) == expected


@pytest.mark.parametrize("case", CASES)
def test_sniff_recognises_real_images(case: str) -> None:
    assert sniff(_image(case)) == case.split("-")[0]


def test_extensions_cover_every_sniffed_format() -> None:
    assert EXTENSIONS == {
        "png": "png",
        "jpeg": "jpg",
        "webp": "webp",
        "gif": "gif",
        "avif": "avif",
        "heic": "heic",
    }


def _png(*chunks: tuple[bytes, bytes]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    )


IHDR = (b"IHDR", struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0))
IDAT = (b"IDAT", zlib.compress(b"\x00" + bytes(6)))
IEND = (b"IEND", b"")
TINY_PNG = _png(IHDR, IDAT, IEND)  # IHDR at byte 8, IDAT at byte 33


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an image: the data is empty"),
        (
            b"\x00\x01garbage bytes",
            "not a PNG, JPEG or WebP image (it starts with bytes 00 01 67 61 72 62 61 67)",
        ),
        (
            b"GIF89a\x01\x00\x01\x00",
            "GIF images cannot carry fluxbatch metadata; only PNG, JPEG and WebP can",
        ),
        (
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
            "HEIC images cannot carry fluxbatch metadata; only PNG, JPEG and WebP can",
        ),
        (TINY_PNG[:44], "PNG chunk 'IDAT' at byte 33 is truncated: it needs 23 bytes, 11 remain"),
        (TINY_PNG[:-12], "PNG is truncated at byte 56: no IEND chunk"),
        (_png(IDAT, IEND), "PNG starts with chunk 'IDAT' instead of IHDR"),
        (_png(IHDR, (b"ID4T", b""), IEND), "PNG chunk at byte 33 has an invalid type 'ID4T'"),
        (
            _png(IHDR, (b"iTXt", b"fluxbatch\x00\x00\x00\x00\x00not json"), IDAT, IEND),
            "PNG iTXt chunk at byte 33: fluxbatch metadata is not valid JSON "
            "(Expecting value: line 1 column 1 (char 0))",
        ),
        (
            _png(IHDR, (b"iTXt", b"fluxbatch\x00\x00\x00\x00\x00[1, 2]"), IDAT, IEND),
            "PNG iTXt chunk at byte 33: fluxbatch metadata is not a JSON object",
        ),
        (
            _png(IHDR, (b"iTXt", b"fluxbatch\x00\x01\x00\x00\x00not zlib"), IDAT, IEND),
            "PNG iTXt chunk at byte 33: compressed text is corrupt "
            "(Error -3 while decompressing data: incorrect header check)",
        ),
        (
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9",
            "JPEG has marker 0xFFD9 at byte 20 before its image data (SOS)",
        ),
        (
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
            "JPEG segment 0xFFE0 at byte 2 is truncated: it needs 18 bytes, 9 remain",
        ),
        (b"\xff\xd8\xff", "JPEG is truncated at byte 3: no image data (SOS)"),
        (
            b"\xff\xd8\xff\xe0\x00\x04\x00\x00\x12",
            "JPEG has no marker at byte 8: truncated or corrupt",
        ),
        (
            b"RIFF\x40\x00\x00\x00WEBPVP8 ",
            "WebP is truncated: its RIFF header declares 64 bytes, 8 follow",
        ),
        (
            b"RIFF\x0c\x00\x00\x00WEBPVP8 \x20\x00\x00\x00",
            "WebP chunk 'VP8 ' at byte 12 is truncated: it needs 40 bytes, 8 remain",
        ),
        (b"RIFF\x04\x00\x00\x00WEBP", "WebP has no chunks"),
    ],
)
def test_malformed_images_report_what_and_where(data: bytes, message: str) -> None:
    with pytest.raises(ImageFormatError) as caught:
        extract(data)

    assert str(caught.value) == message
    assert isinstance(caught.value, FluxbatchError)


@pytest.mark.parametrize("operation", [lambda d: embed(d, PAYLOAD), image_data_digest])
def test_unknown_format_is_reported_by_every_operation(
    operation: Callable[[bytes], object],
) -> None:
    with pytest.raises(ImageFormatError, match=r"^not a PNG, JPEG or WebP image \(it starts with"):
        operation(b"\x00\x01garbage bytes")


def test_simple_webp_without_a_key_frame_cannot_be_embedded() -> None:
    broken = b"RIFF\x12\x00\x00\x00WEBPVP8 \x06\x00\x00\x00\x00\x00\x00\x00\x00\x00"

    with pytest.raises(ImageFormatError) as caught:
        embed(broken, PAYLOAD)

    assert str(caught.value) == "WebP VP8 chunk at byte 12 has no key frame header"


def test_png_bad_crc_on_the_fluxbatch_chunk_is_reported() -> None:
    embedded = bytearray(embed(TINY_PNG, {"a": 1}))
    embedded[embedded.index(b'{"a":1}') + 5] = ord("2")

    with pytest.raises(ImageFormatError) as caught:
        extract(bytes(embedded))

    assert str(caught.value) == (
        "PNG iTXt chunk at byte 33: bad CRC, the fluxbatch metadata is corrupt"
    )


def test_png_bad_crc_elsewhere_is_neither_checked_nor_changed() -> None:
    broken = bytearray(TINY_PNG)
    broken[-17] ^= 0xFF  # a byte of the IDAT CRC
    embedded = embed(bytes(broken), PAYLOAD)

    assert extract(embedded) == PAYLOAD
    assert bytes(broken[33:]) in embedded
    assert image_data_digest(embedded) == image_data_digest(bytes(broken))


def _check_contract(data: bytes) -> None:
    """extract/parameters/embed/image_data_digest return normally or raise ImageFormatError,
    nothing else; whenever embedding works, it round-trips, is idempotent (the parameters
    text too) and keeps the image data."""
    try:
        found = extract(data)
        assert found is None or isinstance(found, dict)
    except ImageFormatError:
        pass
    try:
        text = parameters(data)
        assert text is None or isinstance(text, str)
    except ImageFormatError:
        pass
    try:
        embedded = embed(data, PAYLOAD)
    except ImageFormatError:
        return
    assert extract(embedded) == PAYLOAD
    assert embed(embed(data, OTHER), PAYLOAD) == embedded
    assert image_data_digest(embedded) == image_data_digest(data)
    stamped = embed(data, PAYLOAD, LATIN)
    assert extract(stamped) == PAYLOAD
    assert parameters(stamped) in (LATIN, None)  # (None: an EXIF block that is not readable)
    assert embed(embed(data, OTHER, PARAMETERS), PAYLOAD, LATIN) == stamped
    assert embed(embed(data, OTHER), PAYLOAD, LATIN) == stamped
    assert image_data_digest(stamped) == image_data_digest(data)


MAGIC = st.sampled_from(
    [
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"RIFF\x20\x00\x00\x00WEBP",
        b"RIFF\xff\xff\x00\x00WEBP",
    ]
)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=80) | st.builds(bytes.__add__, MAGIC, st.binary(max_size=120)))
def test_arbitrary_bytes_never_raise_anything_but_image_format_error(data: bytes) -> None:
    _check_contract(data)


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from(SMALL_CASES), st.data())
def test_mutated_images_never_raise_anything_but_image_format_error(
    case: str, draw: st.DataObject
) -> None:
    image = draw.draw(st.sampled_from([_image(case), embed(_image(case), PAYLOAD),
                                        embed(_image(case), PAYLOAD, PARAMETERS)]))
    position = st.integers(0, min(len(image), 160) - 1) | st.integers(0, len(image) - 1)
    mutated = bytearray(image)
    for index, value in draw.draw(st.lists(st.tuples(position, st.integers(0, 255)), max_size=4)):
        mutated[index] = value
    cut = draw.draw(st.none() | st.integers(0, len(image)))
    _check_contract(bytes(mutated[:cut]))


# -- the A1111-style `parameters` text ---------------------------------------------------------

PARAMETERS = ('Zürich café at dusk, 東京 neon, "quoted"\nSteps: 28, Sampler: flux, Schedule type: '
              "Automatic, Seed: 42, Size: 64x48, Model: flux-dev, Guidance: 3.5")
LATIN = "a red teapot\nSampler: flux, Schedule type: Automatic, Seed: 7, Model: flux-pro-1.1"
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def _exif_with_exif_ifd(byte_order: str = "<") -> bytes:
    """An EXIF block as a camera writes one: IFD0 (Make) and an Exif IFD (DateTimeOriginal)."""
    exif = Image.Exif()
    exif[0x010F] = "fluxbatch test camera"
    exif.get_ifd(EXIF_IFD)[0x9003] = "2026:01:02 03:04:05"
    # (Pillow writes little-endian, after JPEG's `Exif\0\0`; the other order, by hand)
    return exif.tobytes()[6:] if byte_order == "<" else _big_endian_exif()


def _tiff() -> bytes:
    """`_exif()` without JPEG's `Exif\0\0`: the TIFF itself (IFD0 only)."""
    return _exif()[6:]


def _big_endian_exif() -> bytes:
    """A big-endian TIFF by hand: IFD0 with Make (ASCII, by offset) and the Exif IFD pointer,
    the Exif IFD with an earlier UserComment (ASCII) and DateTimeOriginal."""
    make = b"Big Endian Camera\0"
    made = b"2026:01:02 03:04:05\0"
    old = b"ASCII\0\0\0an earlier comment"
    ifd0_at, exif_at = 8, 8 + 2 + 2 * 12 + 4
    data_at = exif_at + 2 + 2 * 12 + 4
    ifd0 = struct.pack(">H", 2) + struct.pack(">HHII", 0x010F, 2, len(make), data_at) + \
        struct.pack(">HHII", EXIF_IFD, 4, 1, exif_at) + bytes(4)
    exif = struct.pack(">H", 2) + \
        struct.pack(">HHII", 0x9003, 2, len(made), data_at + len(make)) + \
        struct.pack(">HHII", USER_COMMENT, 7, len(old), data_at + len(make) + len(made)) + \
        bytes(4)
    return b"MM\0*" + struct.pack(">I", ifd0_at) + ifd0 + exif + make + made + old


def _jpeg_with(exif: bytes, prefix: bytes = b"Exif\x00\x00") -> bytes:
    """A JFIF JPEG with an APP1 EXIF segment holding `exif`, inserted by hand."""
    plain = _image("jpeg-jfif")
    body = prefix + exif
    segment = b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
    return plain[:20] + segment + plain[20:]  # after SOI and the 16-byte JFIF APP0


def _exif_body(data: bytes) -> bytes:
    """The TIFF of the image's first EXIF block (JPEG APP1 or WebP chunk)."""
    with Image.open(io.BytesIO(data)) as image:
        raw = image.info["exif"]
    return raw[6:] if raw.startswith(b"Exif\x00\x00") else raw


def _comment(data: bytes) -> Any:
    with Image.open(io.BytesIO(data)) as image:
        return image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)


def _count_parameters(data: bytes) -> int:
    return data.count(b"parameters\x00") + data.count(b"UNICODE\x00")


@pytest.mark.parametrize("case", CASES)
def test_parameters_are_written_beside_the_provenance_and_keep_the_pixels(case: str) -> None:
    original = _image(case)
    embedded = embed(original, PAYLOAD, PARAMETERS)

    assert parameters(original) is None
    assert parameters(embedded) == PARAMETERS
    assert extract(embedded) == PAYLOAD
    assert _pixels(embedded) == _pixels(original)
    assert image_data_digest(embedded) == image_data_digest(original)


@pytest.mark.parametrize("case", SMALL_CASES)
def test_stamping_again_replaces_the_parameters_and_never_duplicates_them(case: str) -> None:
    original = _image(case)
    expected = embed(original, OTHER, LATIN)

    assert embed(embed(original, PAYLOAD, PARAMETERS), OTHER, LATIN) == expected
    assert embed(embed(expected, PAYLOAD, PARAMETERS), OTHER, LATIN) == expected
    assert _count_parameters(expected) == 1
    assert parameters(expected) == LATIN
    # without new parameters, the image's own are left as they are
    assert parameters(embed(expected, PAYLOAD)) == LATIN


@pytest.mark.parametrize("case", SMALL_CASES)
def test_pillow_reads_the_parameters_back(case: str) -> None:
    embedded = embed(_image(case), PAYLOAD, PARAMETERS)

    with Image.open(io.BytesIO(embedded)) as image:
        if image.format == "PNG":
            assert image.info["parameters"] == PARAMETERS
        else:
            assert _comment(embedded) == b"UNICODE\x00" + PARAMETERS.encode("utf-16-be")


@pytest.mark.parametrize("case", SMALL_CASES)
def test_an_independent_parser_reads_prompt_seed_steps_and_model(case: str) -> None:
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    found = ParserManager().parse(io.BytesIO(embed(_image(case), PAYLOAD, PARAMETERS)))

    assert found is not None
    assert found.generator == Generators.AUTOMATIC1111
    [sampler] = found.samplers
    assert [prompt.value for prompt in sampler.prompts] == [PARAMETERS.split("\n")[0]]
    assert sampler.name == "flux"
    assert sampler.parameters == {"steps": "28", "scheduler": "Automatic", "seed": "42"}
    assert sampler.model is not None and sampler.model.name == "flux-dev"
    assert found.metadata == {"Size": "64x48", "Guidance": "3.5"}


def test_png_parameters_are_text_chunks_after_the_provenance_as_pillow_writes_them() -> None:
    latin = embed(TINY_PNG, {"a": 1}, LATIN)
    other = embed(TINY_PNG, {"a": 1}, PARAMETERS)

    chunk = b"tEXtparameters\x00" + LATIN.encode("latin-1")
    assert latin[66:] == struct.pack(">I", len(chunk) - 4) + chunk + \
        struct.pack(">I", zlib.crc32(chunk)) + TINY_PNG[33:]
    assert b"iTXtparameters\x00\x00\x00\x00\x00" + PARAMETERS.encode() in other


def test_png_parameters_written_by_another_tool_are_read_and_replaced() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "an A1111 prompt\nSteps: 20, Sampler: Euler a", zip=True)
    info.add_text("Software", "kept")
    out = io.BytesIO()
    _picture("RGB", (8, 8)).save(out, "PNG", pnginfo=info)
    written_elsewhere = out.getvalue()

    assert parameters(written_elsewhere) == "an A1111 prompt\nSteps: 20, Sampler: Euler a"
    embedded = embed(written_elsewhere, PAYLOAD, LATIN)
    assert parameters(embedded) == LATIN
    assert embedded.count(b"parameters\x00") == 1
    assert b"tEXtSoftware\x00kept" in embedded


def test_jpeg_without_exif_gets_fluxbatch_s_own_after_jfif_and_before_the_xmp() -> None:
    embedded = embed(_image("jpeg-jfif"), PAYLOAD, LATIN)

    assert embedded.index(b"JFIF") < embedded.index(b"Exif\x00\x00MM\x00*") < \
        embedded.index(XMP_HEADER)
    assert embedded.count(b"Exif\x00\x00") == 1


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("with_exif_ifd", [True, False])
def test_another_tool_s_exif_is_kept_byte_for_byte_and_takes_the_comment(
        byte_order: str, with_exif_ifd: bool) -> None:
    foreign = _exif_with_exif_ifd(byte_order) if with_exif_ifd else _tiff()
    original = _jpeg_with(foreign)
    embedded = embed(original, PAYLOAD, PARAMETERS)

    tiff = _exif_body(embedded)
    assert embedded.count(b"Exif\x00\x00") == 1
    assert parameters(embedded) == PARAMETERS
    assert _comment(embedded) == b"UNICODE\x00" + PARAMETERS.encode("utf-16-be")
    # Nothing of the original moved: only one 4-byte pointer (to IFD0, or to the Exif IFD)
    # was aimed at the copy appended after it.
    changed = [i for i in range(len(foreign)) if tiff[i] != foreign[i]]
    assert len(changed) <= 4 and changed[-1] - changed[0] < 4
    with Image.open(io.BytesIO(embedded)) as image:
        exif = image.getexif()
        assert exif[0x010F] in ("fluxbatch test camera", "Big Endian Camera")
        if with_exif_ifd:
            assert exif.get_ifd(EXIF_IFD)[0x9003] == "2026:01:02 03:04:05"
    # stamping again, or without the parameters, restores the original first
    assert embed(embedded, PAYLOAD, PARAMETERS) == embedded
    assert embed(embed(embedded, OTHER, LATIN), PAYLOAD, PARAMETERS) == embedded
    assert _pixels(embedded) == _pixels(original)


def test_an_earlier_user_comment_in_another_tool_s_exif_is_replaced_and_read_back() -> None:
    original = _jpeg_with(_big_endian_exif())

    assert parameters(original) == "an earlier comment"
    assert parameters(embed(original, PAYLOAD, LATIN)) == LATIN


@pytest.mark.parametrize("prefix", [b"", b"Exif\x00\x00"])
def test_webp_exif_chunk_of_another_tool_takes_the_comment_and_keeps_its_prefix(
        prefix: bytes) -> None:
    simple = _image("webp-lossless")
    chunk = b"EXIF" + struct.pack("<I", len(prefix + _tiff())) + prefix + _tiff()
    chunk += bytes(len(chunk) % 2)
    riff = simple[8:] + chunk
    original = b"RIFF" + struct.pack("<I", len(riff)) + riff

    embedded = embed(original, PAYLOAD, PARAMETERS)

    assert parameters(embedded) == PARAMETERS
    assert embedded[20] & 0x08  # the VP8X EXIF flag
    start = embedded.index(b"EXIF") + 8
    assert embedded[start : start + len(prefix) + 4] == prefix + b"MM\x00*"
    assert embed(embed(embedded, OTHER, LATIN), PAYLOAD, PARAMETERS) == embedded
    with Image.open(io.BytesIO(embedded)) as image:
        assert image.getexif()[0x010F] == "fluxbatch test camera"


def test_webp_gets_the_exif_flag_and_the_chunk_before_the_xmp() -> None:
    embedded = embed(_image("webp-lossy"), PAYLOAD, LATIN)

    assert embedded[20] == 0x04 | 0x08
    assert embedded.index(b"EXIF") < embedded.index(b"XMP ")


@pytest.mark.parametrize(
    "foreign",
    [
        b"not a TIFF at all",
        b"II*\x00\xff\xff\x00\x00",  # IFD0 beyond the block
        b"MM\x00*\x00\x00\x00\x08\xff\xff",  # 65535 entries that are not there
        b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", EXIF_IFD, 4, 1, 9999) + bytes(4),
    ],
)
def test_exif_that_cannot_be_read_is_left_as_it_is_without_the_text(foreign: bytes) -> None:
    original = _jpeg_with(foreign)
    embedded = embed(original, PAYLOAD, LATIN)

    assert b"Exif\x00\x00" + foreign in embedded
    assert embedded.count(b"Exif\x00\x00") == 1
    assert parameters(embedded) is None
    assert extract(embedded) == PAYLOAD


def test_a_text_too_long_for_one_jpeg_segment_is_left_out_of_the_exif_only() -> None:
    long = "word " * 7000 + "\nSampler: flux, Seed: 1"  # 70 KB as UTF-16

    for case in ("jpeg-jfif", "jpeg-exif"):
        embedded = embed(_image(case), PAYLOAD, long)
        assert parameters(embedded) is None
        assert embed(embed(_image(case), PAYLOAD, LATIN), PAYLOAD, long) == embedded
    assert parameters(embed(_image("png-rgb"), PAYLOAD, long)) == long
    assert parameters(embed(_image("webp-lossy"), PAYLOAD, long)) == long


@pytest.mark.parametrize(
    "comment",
    [
        struct.pack("<HHII", USER_COMMENT, 7, 40, 9999),  # its bytes beyond the block
        struct.pack("<HHII", USER_COMMENT, 7, 3, 0),  # shorter than its charset
        struct.pack("<HHII", USER_COMMENT, 7, 12, 26) ,  # JIS: not decoded
    ],
)
def test_a_damaged_or_unknown_user_comment_reads_as_none(comment: bytes) -> None:
    tiff = b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", EXIF_IFD, 4, 1, 26) + \
        bytes(4) + b"\x01\x00" + comment + bytes(4) + b"JIS\x00\x00\x00\x00\x00abcd"

    assert parameters(_jpeg_with(tiff)) is None


def test_a_forged_merge_trailer_is_undone_only_within_the_block() -> None:
    forged = _tiff() + b"fluxbatch:exif\x00\x00" + struct.pack(">II4s", 10**6, 4, b"\xff" * 4)
    embedded = embed(_jpeg_with(forged), PAYLOAD, LATIN)

    assert parameters(embedded) == LATIN
    assert embed(embedded, PAYLOAD, LATIN) == embedded


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from(["<", ">"]), st.data())
def test_mutated_exif_blocks_never_raise_anything_but_image_format_error(
    byte_order: str, draw: st.DataObject
) -> None:
    image = draw.draw(st.sampled_from([_jpeg_with(_exif_with_exif_ifd(byte_order)),
                                       embed(_jpeg_with(_exif_with_exif_ifd(byte_order)),
                                             PAYLOAD, PARAMETERS)]))
    start = image.index(b"Exif\x00\x00")
    position = st.integers(start + 6, start + int.from_bytes(image[start - 2 : start]) - 3)
    mutated = bytearray(image)
    for index, value in draw.draw(st.lists(st.tuples(position, st.integers(0, 255)), max_size=4)):
        mutated[index] = value
    _check_contract(bytes(mutated))
