"""Interop: each image written carries an A1111-style `parameters` text beside fluxbatch's
provenance, with the fields its request has, read back by an independent parser."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from sd_parsers import ParserManager

from fluxbatch import __version__, imagemeta
from fluxbatch.emulator import Emulator
from tests.helpers import Cli, build_file_tree

RECIPE = """
    version: 1
    name: interop
    provider: emulator
    output: "{{ job }}.{{ ext }}"
    jobs:
      - name: dev
        prompt: "a teapot, in watercolor"
        params: {model: flux-dev, width: 320, height: 256, steps: 20, guidance: 3.5,
                 output_format: png}
        seed: 11
      - name: ultra
        prompt: "a kettle\\non two lines"
        params: {model: flux-pro-1.1-ultra, aspect_ratio: "16:9", output_format: jpeg}
        seed: 12
      - name: pro
        prompt: "a mug"
        params: {model: flux-pro-1.1, width: 256, height: 256, output_format: webp}
        seed: 13
    """


@pytest.fixture
def rendered(emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Path:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    cli = Cli(emulator, capsys, tmp_path)
    assert cli.render().code == 0
    return tmp_path


def test_each_image_carries_the_parameters_its_request_has(rendered: Path) -> None:
    version = f"Version: fluxbatch {__version__}"
    with Image.open(rendered / "ultra.jpg") as ultra:  # (the emulator scales it down)
        width, height = ultra.size

    assert imagemeta.parameters((rendered / "dev.png").read_bytes()) == (
        "a teapot, in watercolor\nSteps: 20, Sampler: flux, Schedule type: Automatic, Seed: 11, "
        f"Size: 320x256, Model: flux-dev, Guidance: 3.5, {version}")
    # sized by aspect ratio: the image's own size; no steps, no guidance in the request
    assert imagemeta.parameters((rendered / "ultra.jpg").read_bytes()) == (
        "a kettle\non two lines\nSampler: flux, Schedule type: Automatic, Seed: 12, "
        f"Size: {width}x{height}, Model: flux-pro-1.1-ultra, {version}")
    assert imagemeta.parameters((rendered / "pro.webp").read_bytes()) == (
        "a mug\nSampler: flux, Schedule type: Automatic, Seed: 13, Size: 256x256, "
        f"Model: flux-pro-1.1, {version}")


@pytest.mark.parametrize("name", ["dev.png", "ultra.jpg", "pro.webp"])
def test_an_independent_parser_reads_what_was_rendered(rendered: Path, name: str) -> None:
    found = ParserManager().parse(rendered / name)
    entry = imagemeta.extract((rendered / name).read_bytes())

    assert found is not None and entry is not None
    [sampler] = found.samplers
    assert [prompt.value for prompt in sampler.prompts] == [entry["prompt"]]
    assert sampler.parameters["seed"] == str(entry["seed"])
    assert sampler.model is not None and sampler.model.name == entry["model"]


def test_pillow_reads_the_user_comment_of_a_rendered_jpeg(rendered: Path) -> None:
    data = (rendered / "ultra.jpg").read_bytes()

    text = imagemeta.parameters(data)

    with Image.open(io.BytesIO(data)) as image:
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert text is not None and comment == b"UNICODE\x00" + text.encode("utf-16-be")


def test_a_value_with_a_comma_is_quoted_as_a1111_quotes_it() -> None:
    from fluxbatch.write import parameters_text

    entry = {"prompt": None, "model": "odd,model", "seed": 1, "request": {"width": 64,
                                                                          "height": 64}}
    assert parameters_text(entry, b"") == (  # type: ignore[arg-type]
        'Sampler: flux, Schedule type: Automatic, Seed: 1, Size: 64x64, Model: "odd,model", '
        f"Version: fluxbatch {__version__}")
