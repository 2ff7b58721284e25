"""Image inputs: files, URLs and data: URIs in image fields, matrices over files, identity by
content, no copies of inputs in outputs, and a located error for every bad input."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fluxbatch import imagemeta, models
from fluxbatch import inputs as inputs_module
from fluxbatch.emulator import Emulator, EmulatorConfig, EmulatorThread
from fluxbatch.errors import RecipeError
from fluxbatch.front import load_plan
from fluxbatch.identity import auto_seed, job_key
from fluxbatch.inputs import FactsCache, InputFile, InputProblem, Inputs
from fluxbatch.main import main
from fluxbatch.project import Project
from tests.helpers import build_file_tree


def image_bytes(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (64, 48),
                fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def photo_project(root: Path, recipe: str, photos: dict[str, bytes] | None = None) -> Path:
    photos = photos if photos is not None else {
        "photos/mug.png": image_bytes((200, 40, 40)),
        "photos/teapot.png": image_bytes((40, 200, 40)),
        "photos/vase.png": image_bytes((40, 40, 200)),
    }
    build_file_tree(root, {"recipe.yaml": recipe, **photos})
    (root / ".git").mkdir(exist_ok=True)  # the project: this folder, not the test's tmp tree
    return root / "recipe.yaml"


LOOKS = """
    version: 1
    name: looks
    provider: emulator
    defaults: {model: flux-kontext-pro}
    jobs:
      - name: looks
        prompt: "the same object, as a {{ look }}"
        matrix:
          photo: {files: "photos/*.png"}
          look: [watercolor, sketch]
        params: {input_image: "{{ photo }}"}
        output: "{{ look }}/{{ photo.stem }}.{{ ext }}"
    """


@contextmanager
def serve() -> Iterator[Emulator]:
    with EmulatorThread(EmulatorConfig(latency=0.0)) as emulator:
        yield emulator


def render(recipe: Path, emulator: Emulator) -> int:
    return main(["render", str(recipe), "--base-url", emulator.base_url, "-q"])


def problems(recipe: Path) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_plan(str(recipe))
    return [str(problem).replace(f"{recipe.parent}/", "").replace(str(recipe.parent), ".")
            for problem in caught.value.problems]


# -- a matrix over files ----------------------------------------------------------------------


def test_files_variable_is_sorted_paths_with_stem_name_and_path(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, LOOKS.replace(
        'prompt: "the same object, as a {{ look }}"',
        'prompt: "{{ photo.name }} {{ photo.path }} {{ look }}"'))
    plan = load_plan(str(recipe))
    assert [job.output for job in plan.jobs] == [
        "watercolor/mug.png", "sketch/mug.png", "watercolor/teapot.png", "sketch/teapot.png",
        "watercolor/vase.png", "sketch/vase.png"]
    first = plan.jobs[0]
    assert first.prompt == "mug.png photos/mug.png watercolor"
    assert first.request["input_image"]["file"] == "photos/mug.png"
    assert plan.explain(first) == "product photo (files photos/*.png)[0] × look[0]"


def test_files_compose_with_zip_exclude_and_replicates(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, """
        version: 1
        name: paired
        defaults: {model: flux-kontext-pro}
        jobs:
          - name: paired
            prompt: "{{ text }}"
            replicates: 2
            matrix:
              zip:
                photo: {files: "photos/*.png"}
                text: [a red mug, a green teapot, a blue vase]
              exclude: [{photo: photos/teapot.png}]
            params: {input_image: "{{ photo }}"}
            output: "{{ photo.stem }}-{{ replicate }}.{{ ext }}"
        """)
    plan = load_plan(str(recipe))
    assert [(job.prompt, job.output) for job in plan.jobs] == [
        ("a red mug", "mug-1.png"), ("a red mug", "mug-2.png"),
        ("a blue vase", "vase-1.png"), ("a blue vase", "vase-2.png")]
    assert plan.jobs[0].seed != plan.jobs[1].seed


def test_rows_pair_each_photo_with_its_prompt_and_files_columns_count_by_content(
        tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, """
        version: 1
        name: rows
        defaults: {model: flux-kontext-pro}
        jobs:
          - name: edits
            prompt: "{{ text }}"
            matrix:
              rows: {from: edits.csv, files: [photo]}
            params: {input_image: "{{ photo }}"}
            output: "{{ photo.stem }}.{{ ext }}"
        """)
    (tmp_path / "edits.csv").write_text(
        "photo,text\nphotos/mug.png,make it gold\nphotos/vase.png,make it glass\n")
    plan = load_plan(str(recipe))
    assert [(job.prompt, job.output) for job in plan.jobs] == [
        ("make it gold", "mug.png"), ("make it glass", "vase.png")]
    assert plan.explain(plan.jobs[1]) == "product rows from edits.csv row 2"
    value = plan.jobs[0].vars["photo"]
    assert isinstance(value, InputFile)
    # Renamed (and the CSV edited to match): the seed follows the content, not the name.
    os.rename(tmp_path / "photos/mug.png", tmp_path / "photos/cup.png")
    (tmp_path / "edits.csv").write_text(
        "photo,text\nphotos/cup.png,make it gold\nphotos/vase.png,make it glass\n")
    again = load_plan(str(recipe))
    assert again.jobs[0].seed == plan.jobs[0].seed
    assert again.jobs[0].key == plan.jobs[0].key


def test_a_csv_column_of_paths_without_files_still_names_the_inputs(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, """
        version: 1
        name: rows
        defaults: {model: flux-kontext-pro}
        jobs:
          - name: edits
            prompt: "{{ text }}"
            matrix: {rows: {from: edits.csv}}
            params: {input_image: "{{ photo }}"}
            output: "{{ photo | slug }}.{{ ext }}"
        """)
    (tmp_path / "edits.csv").write_text("photo,text\nphotos/mug.png,make it gold\n")
    (job,) = load_plan(str(recipe)).jobs
    mug = hashlib.sha256((tmp_path / "photos/mug.png").read_bytes()).hexdigest()
    assert job.request["input_image"]["sha256"] == mug


def test_a_files_column_naming_a_missing_file_is_located_at_its_csv_line(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, """
        version: 1
        name: rows
        defaults: {model: flux-kontext-pro}
        jobs:
          - name: edits
            prompt: "{{ text }}"
            matrix: {rows: {from: edits.csv, files: [photo, mask]}}
        """)
    (tmp_path / "edits.csv").write_text("photo,text\nphotos/mug.png,a\nphotos/gone.png,b\n")
    assert problems(recipe) == [
        "recipe.yaml:7:45: jobs[0].matrix.rows.files: edits.csv has no column 'mask'"]
    text = (tmp_path / "recipe.yaml").read_text().replace("files: [photo, mask]",
                                                          "files: [photo]")
    (tmp_path / "recipe.yaml").write_text(text)
    assert problems(recipe) == [
        "recipe.yaml:7:27: jobs[0].matrix.rows.from: edits.csv:3: photo: file not found: "
        "photos/gone.png (relative to .)"]


def test_files_patterns_skip_hidden_files_take_braces_and_do_not_follow_linked_folders(
        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    build_file_tree(outside, {"far.png": image_bytes()})
    project = tmp_path / "project"
    build_file_tree(project, {"a/one.png": image_bytes(), "a/.hidden.png": image_bytes(),
                              "a/b/two.jpg": image_bytes(fmt="JPEG"), "a/b/notes.txt": "x"})
    (project / ".git").mkdir()
    os.symlink(outside, project / "a" / "linked")
    found = Inputs(Project.of_recipe(project / "recipe.yaml"))
    assert found.files("a/**/*.{png,jpg}") == ["a/b/two.jpg", "a/one.png"]
    assert found.files("a/*.png") == ["a/one.png"]
    with pytest.raises(InputProblem, match="outside the recipe's project"):
        found.files("a/linked/*.png")  # named through the link: its target is outside
    with pytest.raises(InputProblem, match="outside the recipe's project"):
        found.files("../outside/*.png")
    with pytest.raises(InputProblem, match=r"a/b/notes\.txt is not an image"):
        found.files("a/b/*")


# -- bad inputs: each a located error before anything is paid ---------------------------------


def test_every_bad_input_is_a_located_problem_and_nothing_is_sent(tmp_path: Path) -> None:
    project = tmp_path / "project"
    huge = Image.new("L", (6000, 5000))  # 30 megapixels: over the limit
    buffer = io.BytesIO()
    huge.save(buffer, "PNG")
    recipe = photo_project(project, """
        version: 1
        name: bad
        provider: emulator
        defaults: {model: flux-kontext-pro}
        jobs:
          - {name: missing, prompt: x, params: {input_image: photos/nope.png}}
          - {name: outside, prompt: x, params: {input_image: ../secret.png}}
          - {name: absolute, prompt: x, params: {input_image: /etc/hostname}}
          - {name: folder, prompt: x, params: {input_image: photos}}
          - {name: text, prompt: x, params: {input_image: notes.txt}}
          - {name: gif, prompt: x, params: {input_image: anim.gif}}
          - {name: huge, prompt: x, params: {input_image: huge.png}}
          - {name: truncated, prompt: x, params: {input_image: cut.png}}
          - {name: nine, prompt: x, params: {model: flux-2-pro, input_image_9: photos/mug.png}}
          - {name: redux, prompt: x, params: {model: flux-pro-1.1, input_image: photos/mug.png}}
          - {name: ftp, prompt: x, params: {input_image: "ftp://example.com/a.png"}}
          - {name: creds, prompt: x, params: {input_image: "https://u:p@example.com/a.png"}}
          - {name: datauri, prompt: x, params: {input_image: "data:image/png;base64,!!"}}
          - {name: pasted, prompt: x, params: {input_image: "PASTED"}}
          - {name: pin, prompt: x, params: {input_image: {file: photos/mug.png, sha256: "00"}}}
          - name: per-image
            prompt: x
            matrix: {p: [photos/mug.png, photos/none.png]}
            params: {input_image: "{{ p }}"}
            output: "{{ p | slug }}.png"
          - name: mask
            params: {model: flux-pro-1.0-fill, image: photos/mug.png, mask: small.png}
        """.replace("PASTED", base64.b64encode(image_bytes() * 3).decode()), {
        "photos/mug.png": image_bytes(), "notes.txt": "hello", "huge.png": buffer.getvalue(),
        "cut.png": image_bytes()[:60], "small.png": image_bytes(size=(32, 32)),
        "anim.gif": b"GIF89a" + bytes(40)})
    (tmp_path / "secret.png").write_bytes(image_bytes())
    found = problems(recipe)
    expected = [
        ("6:", "jobs[0].params.input_image: file not found: photos/nope.png"),
        ("7:", "jobs[1].params.input_image: ../secret.png resolves to"),
        ("8:", "jobs[2].params.input_image: /etc/hostname is an absolute path"),
        ("9:", "jobs[3].params.input_image: photos is a directory, not a regular file"),
        ("10:", "jobs[4].params.input_image: notes.txt is not an image; image inputs are PNG, "
                "JPEG or WebP"),
        ("11:", "jobs[5].params.input_image: anim.gif is a GIF image; image inputs are PNG, "
                "JPEG or WebP"),
        ("12:", "jobs[6].params.input_image: huge.png is 6000×5000, over the limit of 25 "
                "megapixels"),
        ("13:", "jobs[7].params.input_image: cut.png is not a readable PNG image"),
        ("14:", "jobs[8].params.input_image_9: flux-2-pro takes at most 8 input images "
                "(input_image … input_image_8), so not 'input_image_9'"),
        ("15:", "jobs[9].params.input_image: flux-pro-1.1 has no 'input_image' parameter: its "
                "image input is image_prompt"),
        ("16:", "jobs[10].params.input_image: 'ftp://example.com/a.png' is not an http(s) URL"),
        ("17:", "jobs[11].params.input_image: 'https://u:p@example.com/a.png' carries a user "
                "name or password"),
        ("18:", "jobs[12].params.input_image: the data: URI is not valid base64"),
        ("19:", "jobs[13].params.input_image: this looks like base64 image data; write it as "
                "a data: URI"),
        ("20:", "jobs[14].params.input_image: photos/mug.png is not the file this recipe was "
                "made with"),
        ("24:", "jobs[15].params.input_image: file not found: photos/none.png"),
        ("27:", "jobs[16].params.mask: the mask is 32×32 but the image is 64×48; the API needs "
                "them the same size"),
    ]
    assert len(found) == len(expected), "\n".join(found)
    for text, (line, start) in zip(found, expected, strict=True):
        assert text.startswith(f"recipe.yaml:{line}"), text
        assert start in text, text
    assert "(for p=photos/none.png, replicate=1)" in found[15]
    with serve() as emulator:
        assert render(recipe, emulator) == 1
        assert emulator.stats.submits == 0


def test_the_refusals_leave_the_command_with_a_located_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = photo_project(tmp_path, LOOKS.replace("photos/*.png", "shots/*.png"))
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "recipe.yaml:9:22: jobs[0].matrix.photo.files: 'shots/*.png' matches no file" in err
    assert "Traceback" not in err


# -- identity by content ----------------------------------------------------------------------


def test_renaming_a_photo_changes_no_key_and_pays_for_nothing(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, LOOKS)
    before = {job.vars["photo"].stem: (job.key, job.seed) for job in load_plan(str(recipe)).jobs}
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        assert emulator.stats.submits == 6
        os.rename(tmp_path / "photos/mug.png", tmp_path / "photos/cup.png")
        after = {job.vars["photo"].stem: (job.key, job.seed)
                 for job in load_plan(str(recipe)).jobs}
        assert after["cup"] == before["mug"]
        assert render(recipe, emulator) == 0
        assert emulator.stats.submits == 6  # placed from the store: paid for once
    cup, mug = (imagemeta.extract((tmp_path / f"watercolor/{name}.png").read_bytes())
                for name in ("cup", "mug"))
    assert cup is not None and mug is not None
    assert (cup["key"], cup["task_id"]) == (mug["key"], mug["task_id"])


def test_editing_a_photo_re_renders_exactly_its_images(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, LOOKS)
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        (tmp_path / "photos/teapot.png").write_bytes(image_bytes((0, 0, 0)))
        assert render(recipe, emulator) == 0
        assert emulator.stats.submits == 8
        again = [s["request"]["prompt"] for s in emulator.submissions[6:]]
        assert sorted(again) == ["the same object, as a sketch",
                                 "the same object, as a watercolor"]
        black = base64.b64encode(image_bytes((0, 0, 0))).decode()
        assert all(s["request"]["input_image"] == black for s in emulator.submissions[6:])


def test_urls_are_keyed_by_the_url_and_data_uris_by_their_content(tmp_path: Path) -> None:
    data = image_bytes((9, 9, 9))
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    recipe = photo_project(tmp_path, f"""
        version: 1
        name: kinds
        defaults: {{model: flux-kontext-pro}}
        jobs:
          - name: kinds
            prompt: x
            seed: 1
            matrix:
              source: ["https://example.com/a.png", "{uri}", same.png]
            params: {{input_image: "{{{{ source }}}}"}}
            output: "{{{{ source | hash }}}}.png"
        """, {"same.png": data})
    url, inline, file = load_plan(str(recipe)).jobs
    assert url.request["input_image"] == {"url": "https://example.com/a.png"}
    assert url.key == job_key("flux-kontext-pro", {
        "prompt": "x", "seed": 1, "output_format": "png",
        "input_image": {"url": "https://example.com/a.png"}})
    digest = hashlib.sha256(data).hexdigest()
    assert inline.request["input_image"] == {"data": digest, "bytes": len(data),
                                             "format": "png", "width": 64, "height": 48}
    assert inline.key == file.key  # the same bytes, however they are given


def test_keys_and_seeds_ignore_where_a_file_is_and_how_it_is_described() -> None:
    a = {"prompt": "p", "input_image": {"file": "a.png", "sha256": "f" * 64, "bytes": 1}}
    b = {"prompt": "p", "input_image": {"file": "b/c.png", "sha256": "f" * 64, "bytes": 9}}
    c = {"prompt": "p", "input_image": {"file": "a.png", "sha256": "e" * 64, "bytes": 1}}
    assert job_key("flux-kontext-pro", a) == job_key("flux-kontext-pro", b)
    assert job_key("flux-kontext-pro", a) != job_key("flux-kontext-pro", c)
    assert auto_seed("r", "j", {"p": InputFile("a.png", "f" * 64)}, 1) == \
        auto_seed("r", "j", {"p": InputFile("x/y.png", "f" * 64)}, 1)
    assert auto_seed("r", "j", {"p": InputFile("a.png", "f" * 64)}, 1) != \
        auto_seed("r", "j", {"p": InputFile("a.png", "e" * 64)}, 1)


def test_planned_keys_and_seeds_equal_the_definitions(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, LOOKS)
    for job in load_plan(str(recipe)).jobs:
        assert job.key == job_key(job.model, job.request)
        assert job.seed == auto_seed("looks", "looks", job.vars, job.replicate)


# -- sent at submit, recorded as descriptors --------------------------------------------------


def test_inputs_are_sent_as_base64_and_recorded_without_their_bytes(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, LOOKS)
    mug = (tmp_path / "photos/mug.png").read_bytes()
    encoded = base64.b64encode(mug).decode()
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        sent = {s["request"]["input_image"] for s in emulator.submissions}
    assert encoded in sent
    manifest = (tmp_path / "looks.manifest.json").read_text()
    assert encoded[:40] not in manifest
    entries = [json.loads(line.rstrip(",")) for line in manifest.splitlines()
               if line.startswith('{"bytes"')]
    mug_entry = next(e for e in entries if e["output"] == "watercolor/mug.png")
    assert mug_entry["request"]["input_image"] == {
        "file": "photos/mug.png", "sha256": hashlib.sha256(mug).hexdigest(),
        "bytes": len(mug), "format": "png", "width": 64, "height": 48}
    image = (tmp_path / "watercolor/mug.png").read_bytes()
    assert encoded[:40].encode() not in image and mug not in image
    state = b"".join(path.read_bytes() for path in (tmp_path / ".fluxbatch").rglob("*")
                     if path.is_file() and "blobs" not in path.parts)
    assert encoded[:40].encode() not in state


def test_a_photo_changed_after_planning_is_not_sent(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, LOOKS.replace("[watercolor, sketch]", "[watercolor]"))
    plan = load_plan(str(recipe))
    assert plan.recipe.inputs is not None
    request = plan.jobs[0].request
    assert plan.recipe.inputs.materialize(request)["input_image"] == \
        base64.b64encode((tmp_path / "photos/mug.png").read_bytes()).decode()
    (tmp_path / "photos/mug.png").write_bytes(image_bytes((1, 2, 3)))
    with pytest.raises(InputProblem, match=r"photos/mug\.png changed after the plan was made"):
        plan.recipe.inputs.materialize(request)
    (tmp_path / "photos/mug.png").unlink()
    os.symlink("/etc/hostname", tmp_path / "photos/mug.png")
    with pytest.raises(InputProblem, match="outside the recipe's project"):
        plan.recipe.inputs.materialize(request)


def test_reproduce_names_the_same_files_pinned_by_content(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = photo_project(tmp_path, LOOKS)
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        capsys.readouterr()
        again = tmp_path / "again.yaml"
        assert main(["reproduce", str(tmp_path / "sketch/vase.png"), "-o", str(again)]) == 0
        text = again.read_text()
        vase = hashlib.sha256((tmp_path / "photos/vase.png").read_bytes()).hexdigest()
        assert f"  input_image:\n    file: photos/vase.png\n    sha256: {vase}\n" in text
        (job,) = load_plan(str(again)).jobs
        original = next(j for j in load_plan(str(recipe)).jobs if j.output == "sketch/vase.png")
        assert job.key == original.key
        (tmp_path / "photos/vase.png").write_bytes(image_bytes((5, 5, 5)))
        assert main(["render", str(again), "--base-url", emulator.base_url]) == 1
        assert "photos/vase.png is not the file this recipe was made with" in \
            capsys.readouterr().err
        assert emulator.stats.submits == 6


def test_estimates_count_the_input_megapixels_of_flux_2() -> None:
    two_mp = {"file": "a.png", "sha256": "0" * 64, "width": 2000, "height": 1000}
    assert models.estimate_cost("flux-2-pro", {"width": 1024, "height": 1024}) == 0.03 + \
        0.05 * 0.015
    assert models.estimate_cost("flux-2-pro", {"input_image": two_mp}) == 0.03 + 2 * 0.015
    assert models.estimate_cost("flux-2-pro", {"input_image": {"url": "u"}}) == 0.03 + 0.015


# -- the facts cache --------------------------------------------------------------------------


def test_unchanged_files_are_not_read_again(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = photo_project(tmp_path, LOOKS)
    with serve() as emulator:
        assert render(recipe, emulator) == 0
    reads: list[str] = []
    real_facts = inputs_module._facts

    def counting(data: bytes, name: str) -> Any:
        reads.append(name)
        return real_facts(data, name)

    monkeypatch.setattr(inputs_module, "_facts", counting)
    load_plan(str(recipe))
    assert reads == []
    (tmp_path / "photos/vase.png").write_bytes(image_bytes((7, 7, 7)))
    load_plan(str(recipe))
    assert reads == ["photos/vase.png"]


def test_a_damaged_facts_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "inputs.json"
    path.write_text("{not json")
    assert FactsCache(path).entries == {}
    path.write_text('{"x": [1, 2]}')
    stat = os.stat(path)
    assert FactsCache(path).get("x", stat) is None


def test_the_emulator_bills_input_megapixels_as_the_client_estimates(tmp_path: Path) -> None:
    recipe = photo_project(tmp_path, """
        version: 1
        name: wide
        provider: emulator
        defaults: {model: flux-2-pro, width: 512, height: 512}
        jobs:
          - {name: wide, prompt: x, seed: 3, params: {input_image: wide.png}}
        """, {"wide.png": image_bytes(size=(2000, 1000))})
    (job,) = load_plan(str(recipe)).jobs
    estimate = models.estimate_cost(job.model, job.request)
    assert estimate == 0.03 + 2 * 0.015
    with serve() as emulator:
        assert render(recipe, emulator) == 0
    entry = json.loads((tmp_path / "wide.manifest.json").read_text().splitlines()[2].rstrip(","))
    assert entry["cost"] == pytest.approx(estimate * 100)


# -- decompression bombs ----------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of blank rows: about 50 KB on disk, 400 megapixels decoded."""
    row = bytes(1 + (width + 7) // 8)  # (filter byte, then the row's bits)
    pack = zlib.compressobj(9)
    pixels = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels)
            + png_chunk(b"IEND", b""))


def bomb_jpeg(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small JPEG whose frame header (SOF0) claims `width`×`height`."""
    data = bytearray(image_bytes(size=(8, 8), fmt="JPEG"))
    frame = data.index(b"\xff\xc0") + 5  # (marker, length, precision: then height, width)
    data[frame:frame + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def bomb_webp(width: int = 16_383, height: int = 16_383) -> bytes:
    """A small WebP whose canvas (VP8X) claims `width`×`height`."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "WEBP", lossless=True)
    simple = buffer.getvalue()
    canvas = (width - 1 | (height - 1) << 24).to_bytes(6, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + bytes(4) + canvas + simple[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("command", ["validate", "plan", "render"])
def test_a_decompression_bomb_is_a_located_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        command: str) -> None:
    """Pillow refused this 400-megapixel PNG (50 KB on disk) with DecompressionBombError,
    and every command exited 3 with a traceback."""
    bomb = bomb_png()
    assert len(bomb) < 100_000
    photo_project(tmp_path, LOOKS, {"photos/mug.png": image_bytes(), "photos/bomb.png": bomb})
    monkeypatch.chdir(tmp_path)
    assert main([command, "recipe.yaml"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        "recipe.yaml:9:22: jobs[0].matrix.photo.files: photos/bomb.png is 20000×20000, over "
        "the limit of 25 megapixels for an image input")


@pytest.mark.parametrize("data,size", [
    pytest.param(bomb_png(30_000, 30_000), "30000×30000", id="PNG"),
    pytest.param(bomb_jpeg(), "20000×20000", id="JPEG"),
    pytest.param(bomb_webp(), "16383×16383", id="WebP"),
])
def test_an_image_too_large_to_decode_is_refused_from_its_header(
        tmp_path: Path, data: bytes, size: str) -> None:
    """The size is read from the header before Pillow opens the image: Pillow allocates a
    WebP's canvas as it opens it, and refuses large images with an exception of its own."""
    inputs = Inputs(Project(tmp_path, str(tmp_path)))
    uri = "data:image/x;base64," + base64.b64encode(data).decode()
    with pytest.raises(InputProblem) as caught:
        inputs.resolve(uri, "input_image")
    assert str(caught.value) == (f"the data: URI is {size}, over the limit of 25 megapixels "
                                 "for an image input")


def test_the_header_states_the_size_pillow_reads() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert imagemeta.dimensions(image_bytes(size=(37, 21), fmt=fmt)) == (37, 21), fmt
    assert imagemeta.dimensions(b"\x89PNG\r\n\x1a\n") is None
    assert imagemeta.dimensions(b"not an image") is None


# -- an edit the facts cache cannot see -------------------------------------------------------


def edited_in_place(path: Path, data: bytes) -> None:
    """As `cp -p`, `rsync -t` or `touch -d` leave it: new bytes, the same size, the old mtime."""
    before = path.stat()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def add_a_look(recipe: Path) -> None:
    """Three new images, each of which must read its photo when it is sent."""
    recipe.write_text(recipe.read_text().replace("[watercolor, sketch]",
                                                 "[watercolor, sketch, oil]"))


def test_an_edit_that_keeps_size_and_mtime_is_planned_with_the_new_bytes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cache trusted (size, mtime): the plan kept the old bytes' sha256, the bytes read
    when sending did not match it, and every run said 'changed after the plan was made; run
    again', forever. No program can put back a file's ctime, so the cache sees the edit."""
    recipe = photo_project(tmp_path, LOOKS)
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        edited_in_place(tmp_path / "photos/mug.png", image_bytes((201, 40, 40)))
        add_a_look(recipe)
        assert render(recipe, emulator) == 0
        assert "changed after" not in capsys.readouterr().err
        assert emulator.stats.submits == 6 + 2 + 3  # (the mug's two images, the new look)
    assert main(["status", str(recipe)]) == 0


@contextmanager
def an_edit_the_cache_misses(project: Path) -> Iterator[tuple[Path, Emulator]]:
    """The recipe rendered, then photos/mug.png edited, and a cache entry that fits the file
    as it is but holds the facts of its old bytes (as on a file system whose ctime cannot be
    trusted): the recipe and the emulator that rendered it."""
    recipe = photo_project(project, LOOKS)
    mug = project / "photos/mug.png"
    original = mug.read_bytes()
    with serve() as emulator:
        assert render(recipe, emulator) == 0
        mug.write_bytes(image_bytes((1, 2, 3)))
        cache = FactsCache(project / ".fluxbatch" / "inputs.json")
        real = os.path.realpath(mug)
        cache.put(real, os.stat(real), inputs_module._facts(original, "photos/mug.png"))
        cache.save()
        yield recipe, emulator


def test_a_cache_that_misses_an_edit_costs_one_run_not_every_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with an_edit_the_cache_misses(tmp_path) as (recipe, emulator):
        add_a_look(recipe)
        capsys.readouterr()
        assert render(recipe, emulator) == 1
        assert "photos/mug.png changed after the plan was made; run again to plan with the " \
            "new file" in capsys.readouterr().err
        assert render(recipe, emulator) == 0
        assert "changed after" not in capsys.readouterr().err
        assert emulator.stats.submits == 6 + 2 + 2 + 1  # (the vase's and teapot's oil, then
        # the mug's three: its sketch and watercolor, now stale, and its oil)
    assert main(["status", str(recipe)]) == 0


def test_verify_hashes_every_input_whatever_the_cache_says(tmp_path: Path) -> None:
    with an_edit_the_cache_misses(tmp_path) as (recipe, emulator):
        assert main(["status", str(recipe), "--verify"]) == 1  # (the mug's two images)
        assert main(["render", str(recipe), "--base-url", emulator.base_url, "-q",
                     "--verify"]) == 0
        assert emulator.stats.submits == 6 + 2
    assert main(["status", str(recipe)]) == 0  # (the cache was set right)


def test_schemes_in_capitals_name_the_same_inputs(tmp_path: Path) -> None:
    """`HTTPS://…` was refused as 'not an http(s) URL': schemes ignore case."""
    inputs = Inputs(Project(tmp_path, str(tmp_path)))
    assert inputs.resolve("HTTPS://Example.com/Mug.png", "input_image") == {
        "url": "https://Example.com/Mug.png"}
    assert inputs.resolve("Http://127.0.0.1/a.png", "input_image") == {
        "url": "http://127.0.0.1/a.png"}
    data = image_bytes()
    found = inputs.resolve("DATA:image/png;BASE64," + base64.b64encode(data).decode(),
                           "input_image")
    assert found["data"] == hashlib.sha256(data).hexdigest()
    with pytest.raises(InputProblem, match=r"'FTP://example\.com/a\.png' is not an http"):
        inputs.resolve("FTP://example.com/a.png", "input_image")
