"""The emulator's image inputs: accepted forms, the API's checks, and the thumbnails it draws."""

from __future__ import annotations

import base64
import io
import re
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops

from fluxbatch import models
from fluxbatch.emulator import EmulatorConfig, EmulatorThread, render_image
from fluxbatch.emulator.images import URL_PLACEHOLDER

KEY = {"x-key": "test-key"}
RED, GREEN, BLUE = (220, 30, 30), (30, 180, 60), (40, 60, 220)
# Every field of the vendored schemas that takes an image (flux-2-flex's internal
# `input_image_blob_path` is a storage path, not an image).
IMAGE_FIELD = re.compile(
    r"input_image(_\d)?|image|mask|image_prompt|control_image|preprocessed_image"
)
IMAGE_FIELDS = [
    (model, field)
    for model, spec in models.catalogue().items()
    for field in spec.properties
    if IMAGE_FIELD.fullmatch(field)
]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with (
        EmulatorThread(EmulatorConfig(latency=0.0)) as emu,
        httpx.Client(base_url=emu.base_url, headers=KEY, timeout=120) as http,
    ):
        yield http


def encoded(colour: tuple[int, int, int], size: tuple[int, int] = (200, 200),
            fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def photo(colour: tuple[int, int, int], size: tuple[int, int] = (200, 200)) -> str:
    return b64(encoded(colour, size))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height` and holds no pixels: cheap to send, checked first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


def body_for(model: str, field: str, value: str) -> dict[str, Any]:
    """A request that is valid but for `field`: Fill and Expand need an `image` too."""
    body: dict[str, Any] = {"prompt": "x", "seed": 1, "output_format": "png", field: value}
    if "image" in models.catalogue()[model].required and field != "image":
        body["image"] = photo(GREEN)
    return body


def render(client: httpx.Client, model: str, body: dict[str, Any]) -> Image.Image:
    task = client.post(f"/v1/{model}", json=body)
    assert task.status_code == 200, task.text
    result = client.get(task.json()["polling_url"]).json()
    assert result["status"] == "Ready", result
    sample = httpx.get(result["result"]["sample"], follow_redirects=True, timeout=120)
    return Image.open(io.BytesIO(sample.content)).convert("RGB")


@dataclass(frozen=True)
class Patch:
    """The pixels of one colour in an image: how many, and the box around them."""

    count: int
    box: tuple[int, int, int, int] | None  # left, top, right, bottom (exclusive)


def pixels_near(image: Image.Image, colour: tuple[int, ...], tolerance: int = 8) -> Patch:
    bands = [
        band.point([255 if abs(v - c) <= tolerance else 0 for v in range(256)])
        for band, c in zip(image.split(), colour, strict=True)
    ]
    mask = ImageChops.multiply(ImageChops.multiply(bands[0], bands[1]), bands[2])
    return Patch(mask.histogram()[255], mask.getbbox())


def value_error(field: str, message: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": f"Value error, {message}", "type": "value_error"}


# -- every field takes every form, and shows it ---------------------------------------------


@pytest.mark.parametrize(("model", "field"), IMAGE_FIELDS)
def test_every_image_field_accepts_base64_and_draws_its_thumbnail(
    client: httpx.Client, model: str, field: str
) -> None:
    image = render(client, model, body_for(model, field, photo(RED)))

    red = pixels_near(image, RED)
    assert red.count >= 30 * 30
    assert red.box is not None
    assert red.box[2] < image.width // 2
    assert red.box[3] < image.height // 2


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("data:image/png;base64," + photo(RED), id="data-uri-png"),
        pytest.param("data:image/jpeg;base64," + b64(encoded(RED, fmt="JPEG")), id="data-uri-jpeg"),
        pytest.param(b64(encoded(RED, fmt="WEBP")), id="webp"),
        pytest.param(b64(encoded(RED, fmt="JPEG")), id="jpeg"),
        pytest.param(base64.encodebytes(encoded(RED)).decode(), id="base64-in-76-column-lines"),
    ],
)
def test_data_uris_jpeg_and_webp_are_accepted_and_drawn(client: httpx.Client, value: str) -> None:
    image = render(client, "flux-kontext-pro", {"prompt": "x", "input_image": value})

    assert pixels_near(image, RED, tolerance=24).count >= 30 * 30


def test_inputs_are_drawn_in_field_order(client: httpx.Client) -> None:
    body = {"prompt": "x", "input_image": photo(RED), "input_image_2": photo(BLUE)}

    image = render(client, "flux-2-pro", {**body, "output_format": "png"})

    red, blue = pixels_near(image, RED).box, pixels_near(image, BLUE).box
    assert red is not None and blue is not None
    assert red[2] < blue[0]


def test_a_different_input_gives_a_different_image_and_the_same_one_the_same(
    client: httpx.Client,
) -> None:
    body = {"prompt": "x", "seed": 7, "output_format": "png"}
    with_red = render(client, "flux-kontext-pro", {**body, "input_image": photo(RED)})
    with_blue = render(client, "flux-kontext-pro", {**body, "input_image": photo(BLUE)})
    again = render(client, "flux-kontext-pro", {**body, "input_image": photo(RED)})

    assert with_red.tobytes() != with_blue.tobytes()
    assert with_red.tobytes() == again.tobytes()
    assert pixels_near(with_red, RED).count >= 30 * 30
    assert pixels_near(with_blue, RED).count == 0


def test_transparent_input_is_drawn_over_a_checker() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (200, 200), (0, 0, 0, 0)).save(buffer, "PNG")
    request = {"prompt": "x", "seed": 1, "input_image": b64(buffer.getvalue())}

    data, _, _ = render_image("flux-kontext-pro", request)

    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert pixels_near(image, (235, 235, 235), 0).count >= 30 * 30
    assert pixels_near(image, (200, 200, 200), 0).count >= 30 * 30


# -- URLs: accepted, never fetched, drawn as a placeholder ---------------------------------


@pytest.fixture
def network_unreachable(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Loopback only: every other lookup or connection is recorded and refused."""
    attempts: list[object] = []
    loopback = ("127.0.0.1", "::1", "localhost")
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in loopback:
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "no network in this test")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and address[0] not in loopback:
            attempts.append(address)
            raise OSError("no network in this test")
        real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize("field", ["input_image", "input_image_2"])
def test_url_input_is_drawn_as_a_placeholder_and_never_fetched(
    client: httpx.Client, network_unreachable: list[object], field: str
) -> None:
    url = "https://photos.example.invalid/catalogue/mug.png?v=3"
    body = {"prompt": "x", "input_image": photo(RED), field: url, "output_format": "png"}

    image = render(client, "flux-kontext-max", body)

    assert pixels_near(image, URL_PLACEHOLDER, 0).count >= 30 * 30
    assert network_unreachable == []


def test_input_sized_model_with_a_url_renders_at_the_default_size(
    client: httpx.Client, network_unreachable: list[object]
) -> None:
    body = {"image": "http://example.invalid/a.png", "output_format": "png"}

    task = client.post("/v1/flux-pro-1.0-fill", json=body).json()
    image = render(client, "flux-pro-1.0-fill", body)

    assert task["output_mp"] == 0.79  # 1024x768
    assert image.size == (512, 384)
    assert pixels_near(image, URL_PLACEHOLDER, 0).count >= 30 * 30
    assert network_unreachable == []


# -- the size of an input-sized model's output ----------------------------------------------


def test_fill_renders_at_the_size_of_its_image(client: httpx.Client) -> None:
    body = {"image": photo(RED, (300, 200)), "mask": photo(GREEN, (300, 200))}

    task = client.post("/v1/flux-pro-1.0-fill", json=body).json()
    image = render(client, "flux-pro-1.0-fill", body)

    assert task["output_mp"] == 0.06
    assert image.size == (300, 200)


def test_expand_adds_its_padding_to_the_image(client: httpx.Client) -> None:
    body = {"image": photo(RED, (300, 200)), "top": 100, "left": 50, "right": None}

    image = render(client, "flux-pro-1.0-expand", body)

    assert image.size == (350, 300)


def test_a_one_pixel_fill_input_renders_a_one_pixel_image(client: httpx.Client) -> None:
    body = {"image": photo(RED, (1, 1)), "output_format": "png"}

    image = render(client, "flux-pro-1.0-fill", body)

    assert image.size == (1, 1)


# -- what the API refuses -------------------------------------------------------------------

NOT_BASE64 = (
    "not valid base64 (an image field takes a base64-encoded image, a data:image/...;base64, "
    "URI or an http(s) URL)"
)
NOT_AN_IMAGE = "not a PNG, JPEG or WebP image"
RED_PNG, RED_JPEG = encoded(RED), encoded(RED, (400, 400), "JPEG")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("photos/mug.png", NOT_BASE64, id="a-path"),
        pytest.param("not base64!", NOT_BASE64, id="punctuation"),
        pytest.param("abc", NOT_BASE64, id="bad-padding"),
        pytest.param(b64(b"hello, world"), NOT_AN_IMAGE, id="text"),
        pytest.param("", NOT_AN_IMAGE, id="empty"),
        pytest.param(
            b64(b"GIF89a" + bytes(40)),
            "this is a GIF file; the API takes PNG, JPEG or WebP images",
            id="gif",
        ),
        pytest.param(
            b64(b"%PDF-1.7\n"), "this is a PDF file; the API takes PNG, JPEG or WebP images",
            id="pdf",
        ),
        pytest.param(
            b64(RED_PNG[: len(RED_PNG) // 2]), "the PNG image is damaged or truncated",
            id="truncated-png",
        ),
        pytest.param(
            b64(RED_JPEG[: len(RED_JPEG) // 2]), "the JPEG image is damaged or truncated",
            id="truncated-jpeg",
        ),
        pytest.param(
            b64(RED_PNG[:12]), "the PNG image is damaged or truncated", id="png-signature-only"
        ),
        pytest.param(
            b64(png_header(6000, 5000)),
            "the image is 6000x5000 (30.0 megapixels); the limit is 25 megapixels",
            id="too-many-pixels",
        ),
        pytest.param(
            "data:text/plain;base64," + photo(RED),
            "a data URI should look like data:image/png;base64,...",
            id="data-uri-not-an-image-type",
        ),
        pytest.param(
            "data:image/png," + photo(RED),
            "a data URI should look like data:image/png;base64,...",
            id="data-uri-not-base64",
        ),
        pytest.param("data:image/png;base64,@@@@", NOT_BASE64, id="data-uri-bad-payload"),
        pytest.param("http://", "not a valid URL: it has no host", id="url-without-host"),
        pytest.param(
            "https://exa mple.com/a.png", "not a valid URL", id="url-with-space"
        ),
        pytest.param("https://example.com:port/a.png", "not a valid URL", id="url-bad-port"),
        pytest.param(
            "ftp://example.com/a.png", "URL scheme should be 'http' or 'https', not 'ftp'",
            id="ftp",
        ),
        pytest.param(
            "file:///etc/passwd", "URL scheme should be 'http' or 'https', not 'file'",
            id="file-url",
        ),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    client: httpx.Client, value: str, message: str
) -> None:
    response = client.post("/v1/flux-kontext-pro", json={"prompt": "x", "input_image_3": value})

    assert response.status_code == 422
    assert response.json() == {"detail": [value_error("input_image_3", message)]}


@pytest.mark.parametrize(("model", "field"), IMAGE_FIELDS)
def test_every_image_field_is_checked(client: httpx.Client, model: str, field: str) -> None:
    response = client.post(f"/v1/{model}", json=body_for(model, field, b64(b"hello, world")))

    assert response.status_code == 422
    assert response.json() == {"detail": [value_error(field, NOT_AN_IMAGE)]}


def test_image_over_20_mib_is_refused(client: httpx.Client) -> None:
    data = RED_PNG + bytes(20 * 1024 * 1024)

    response = client.post("/v1/flux-2-pro", json={"prompt": "x", "input_image_8": b64(data)})

    assert response.status_code == 422
    message = "the image is 20.1 MiB; the limit is 20 MiB"
    assert response.json() == {"detail": [value_error("input_image_8", message)]}


def test_fill_mask_of_another_size_than_the_image_is_refused(client: httpx.Client) -> None:
    body = {"image": photo(RED, (300, 200)), "mask": photo(GREEN, (200, 300))}

    response = client.post("/v1/flux-pro-1.0-fill", json=body)

    assert response.status_code == 422
    message = "the mask is 200x300 but the image is 300x200; they should be the same size"
    assert response.json() == {"detail": [value_error("mask", message)]}


def test_schema_and_image_errors_are_reported_together_in_field_order(
    client: httpx.Client,
) -> None:
    body = {
        "prompt": "x",
        "input_image": "not base64!",
        "input_image_2": 5,
        "input_image_4": "ftp://example.com/a.png",
        "width": 8,
    }

    response = client.post("/v1/flux-2-pro", json=body)

    assert response.json() == {
        "detail": [
            value_error("input_image", NOT_BASE64),
            {"loc": ["body", "input_image_2"], "msg": "Input should be a valid string",
             "type": "string_type"},
            value_error("input_image_4", "URL scheme should be 'http' or 'https', not 'ftp'"),
            {"loc": ["body", "width"], "msg": "Input should be greater than or equal to 64",
             "type": "greater_than_equal"},
        ]
    }


def test_comet_route_refuses_a_bad_input_in_its_envelope(client: httpx.Client) -> None:
    response = client.post(
        "/flux/v1/flux-kontext-pro",
        headers={"authorization": "Bearer test-key"},
        json={"prompt": "x", "input_image": b64(b"hello, world")},
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"].startswith(f"body.input_image: Value error, {NOT_AN_IMAGE} (request")
    assert (error["code"], error["param"]) == ("invalid_request", "input_image")


def test_an_image_field_the_model_lacks_is_neither_checked_nor_drawn(
    client: httpx.Client,
) -> None:
    body = {"prompt": "x", "input_image": photo(RED), "input_image_5": photo(BLUE),
            "input_image_6": "not base64!", "output_format": "png"}

    image = render(client, "flux-kontext-pro", body)

    assert pixels_near(image, RED).count >= 30 * 30
    assert pixels_near(image, BLUE).count == 0
