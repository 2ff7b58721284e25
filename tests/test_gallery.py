"""The gallery's layouts, markers and options, its PNG, and the page in a real browser."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fluxbatch.emulator import EmulatorConfig, EmulatorThread
from fluxbatch.front import load_plan
from fluxbatch.main import main
from tests.helpers import build_file_tree

RECIPE = """\
version: 1
name: sheet
provider: emulator
output: "{{ job }}/{{ colour }}-{{ shape }}-{{ replicate }}.{{ ext }}"
defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: png}
jobs:
  - name: grid
    prompt: "a {{ colour }} {{ shape }}"
    matrix:
      zip: {colour: [red, blue], tone: [warm, cool]}
      shape: [circle, square, star]
      exclude:
        - {colour: blue, shape: star}
    replicates: 2
  - name: compare
    prompt: "a lighthouse, {{ style }}"
    matrix:
      style: [ink, oil, pencil]
    output: "{{ job }}/{{ style }}.{{ ext }}"
  - name: hero
    prompt: "a lighthouse at dusk"
    replicates: 2
    output: "{{ job }}/{{ replicate }}.{{ ext }}"
"""
ONE_IMAGE = """\
version: 1
name: single
provider: emulator
defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: png}
jobs:
  - {name: hero, prompt: "a lighthouse at dusk"}
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rendered(folder: Path, recipe: str, capsys: pytest.CaptureFixture[str],
              *more: str) -> str:
    build_file_tree(folder, {"recipe.yaml": recipe})
    path = str(folder / "recipe.yaml")
    with EmulatorThread(EmulatorConfig(latency=0.01, max_side=64)) as emulator:
        assert main(["render", path, "--base-url", emulator.base_url, "-q", *more]) == 0
    capsys.readouterr()
    return path


def _gallery(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["gallery", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _section(page: str, job: str) -> str:
    start = page.index(f"<h2>{job}")
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else len(page)]


def test_gallery_crosses_the_two_best_variables_and_links_every_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys)
    assert _gallery(capsys, recipe) == (
        0, f"wrote {tmp_path / 'sheet.gallery.html'} (15 images)\n", "")
    page = (tmp_path / "sheet.gallery.html").read_text()
    # colour and tone advance together (zip): shape crosses colour, so it makes the columns
    assert "<h2>grid: colour × shape</h2>" in page
    headers = re.findall(r"<th>([^<]*)</th>", page)
    assert headers[:4] == ["colour \\ shape", "circle", "square", "star"]
    sources = sorted(re.findall(r'<img loading=lazy src="([^"]+)"', page))
    assert sources == sorted(p.relative_to(tmp_path).as_posix()
                             for p in tmp_path.rglob("*.png"))
    assert len(sources) == 15


def test_gallery_before_any_render_says_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    assert _gallery(capsys, str(tmp_path / "recipe.yaml")) == (
        1, "", f"fluxbatch: nothing rendered yet in {tmp_path}: run `fluxbatch render` first\n")


def test_a_job_with_one_variable_or_none_is_a_titled_strip_not_a_headless_column(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys)
    assert _gallery(capsys, recipe)[0] == 0
    page = (tmp_path / "sheet.gallery.html").read_text()

    compare = _section(page, "compare")
    assert compare.startswith("<h2>compare: by style</h2><p class=summary>3 images</p>"
                              "<div class=strip>")
    assert re.findall(r"<div class=label>([^<]*)</div>", compare) == ["ink", "oil", "pencil"]
    assert "<table>" not in compare

    hero = _section(page, "hero")
    assert hero.startswith("<h2>hero: “a lighthouse at dusk”</h2>"
                           "<p class=summary>2 images · 2 replicates each</p><div class=strip>")
    assert hero.count("<img ") == 2


def test_values_that_follow_from_a_row_sit_under_its_label_not_in_every_caption(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys)
    assert _gallery(capsys, recipe)[0] == 0
    grid = _section((tmp_path / "sheet.gallery.html").read_text(), "grid")
    # tone advances with colour (zip): it labels the row once
    assert "<tr><th>red<div class=notes>tone=warm</div></th>" in grid
    assert "<tr><th>blue<div class=notes>tone=cool</div></th>" in grid
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", grid)
    assert len(captions) == 11
    assert [c for c in captions if not re.fullmatch(r"#[12], seed \d+|exclude\[0\]", c)] == []


@pytest.mark.parametrize(("args", "message"), [
    (["--rows", "colr"],
     "gallery: --rows 'colr' is not a matrix variable (did you mean 'colour'?); choose from "
     "colour, tone, shape, style"),
    (["--rows", "size", "--cols", "shap"],
     "gallery: --rows 'size' is not a matrix variable; --cols 'shap' is not a matrix variable "
     "(did you mean 'shape'?); choose from colour, tone, shape, style"),
    (["--rows", "shape", "--cols", "shape"],
     "gallery: --rows and --cols both name 'shape'; choose two different ones from colour, "
     "tone, shape, style"),
    (["--thumb", "20"], "gallery --thumb: 20 is not between 64 and 1024 (pixels)"),
], ids=["unknown-rows", "two-unknown", "same-twice", "thumb-too-small"])
def test_rows_cols_and_thumb_that_cannot_work_are_usage_errors_listing_the_choices(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    code, out, err = _gallery(capsys, str(tmp_path / "recipe.yaml"), *args)
    assert (code, out, err) == (2, "", f"fluxbatch: {message}\n")
    assert not (tmp_path / "sheet.gallery.html").exists()


def test_rows_in_a_recipe_without_matrix_variables_says_there_are_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": ONE_IMAGE})
    assert _gallery(capsys, str(tmp_path / "recipe.yaml"), "--rows", "style") == (
        2, "", "fluxbatch: gallery: --rows 'style' is not a matrix variable; the recipe's jobs "
        "have no matrix variables\n")


def test_cols_alone_picks_the_rows_that_cross_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys)
    assert _gallery(capsys, recipe, "--cols", "colour")[0] == 0
    grid = _section((tmp_path / "sheet.gallery.html").read_text(), "grid")
    assert grid.startswith("<h2>grid: shape × colour</h2>")
    assert "<tr><th>shape \\ colour</th><th>red<div class=notes>tone=warm</div></th>" \
           "<th>blue<div class=notes>tone=cool</div></th></tr><tr><th>circle</th>" in grid


def test_one_image_is_counted_in_the_singular(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, ONE_IMAGE, capsys)
    assert _gallery(capsys, recipe) == (
        0, f"wrote {tmp_path / 'single.gallery.html'} (1 image)\n", "")
    page = (tmp_path / "single.gallery.html").read_text()
    assert "<h1>single: 1 of 1 image</h1>" in page


def test_excluded_combinations_and_missing_images_are_marked_where_they_would_be(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys, "--only", "hero")
    assert _gallery(capsys, recipe)[0] == 0
    page = (tmp_path / "sheet.gallery.html").read_text()
    grid = _section(page, "grid")
    assert "<p class=summary>0 of 10 images rendered · 2 replicates each · " \
           "1 combination excluded</p>" in grid
    blue = grid[grid.index("<tr><th>blue"):]
    last_cell = blue[blue.rindex("<td>"):]
    assert re.findall(r'<figure class="tile (\w+)" data-state="([^"]+)"', last_cell) == [
        ("excluded", "excluded")]
    assert "<figcaption>exclude[0]</figcaption>" in last_cell
    missing = re.findall(r'<figure class="tile missing" data-state="([^"]+)"', page)
    assert missing == ["new"] * 13


def test_replicates_go_side_by_side_by_default_and_stack_with_down(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys)
    sizes = {}
    for layout in ("across", "down"):
        png = tmp_path / f"{layout}.png"
        args = [] if layout == "across" else ["--replicates", "down"]
        assert _gallery(capsys, recipe, "--png", str(png), *args)[0] == 0
        page = (tmp_path / "sheet.gallery.html").read_text()
        assert page.count(f"<div class='cell {layout}'>") == 2 * 3 + 3 + 1
        sizes[layout] = Image.open(png).size
    (across_width, across_height), (down_width, down_height) = sizes["across"], sizes["down"]
    assert across_width > down_width
    assert across_height < down_height


def test_png_draws_the_sheet_with_its_markers_and_says_its_size(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys)
    (tmp_path / "compare" / "oil.png").unlink()
    png = tmp_path / "pr" / "sheet.png"
    png.parent.mkdir()
    code, out, err = _gallery(capsys, recipe, "--png", str(png))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'sheet.gallery.html'} (14 images)"
    match = re.fullmatch(re.escape(f"wrote {png} (") + r"([\d,]+) × ([\d,]+) px\)", lines[1])
    assert match, lines[1]
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    image = Image.open(png).convert("RGB")
    assert image.size == tuple(int(n.replace(",", "")) for n in match.groups())
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}
    assert (0xFB, 0xEA, 0xEA) in colours  # the missing image's marker
    assert (0xEC, 0xEC, 0xEC) in colours  # the excluded combination's marker
    assert len(colours) > 1000  # the thumbnails themselves


def test_png_headers_that_fit_are_drawn_whole() -> None:
    """A header narrower than the limit is never cut: "subject \\ style" measured 90.9 px
    and its cell was 90 px wide, so it read "subject \\ st…"."""
    from fluxbatch.commands.contact_sheet import (
        Label,
        Mark,
        Sheet,
        Tile,
        _cut,
        _Fonts,
        _Layout,
        _Text,
    )

    tile = Tile(Mark.IMAGE, "1", (64, 64))
    sheet = Sheet("mugs", "4 images", "subject \\ style", (Label("teapot"), Label("kettle")),
                  (Label("watercolor"), Label("studio photo")),
                  {(i, j): ((tile,),) for i in range(2) for j in range(2)})
    _, _, ops = _Layout(_Fonts.load(), 64, True).page("quickstart", [sheet])
    texts = [op for op in ops if isinstance(op, _Text)]
    assert {op.text for op in texts} >= {"subject \\ style", "teapot", "kettle", "mugs"}
    assert [op.text for op in texts if _cut(op.text, op.font, op.width) != op.text] == []


def test_png_thumbnails_shrink_to_stay_under_the_pixel_cap(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _rendered(tmp_path, RECIPE, capsys)
    png = tmp_path / "sheet.png"
    code, out, _ = _gallery(capsys, recipe, "--png", str(png), "--thumb", "1024")
    assert code == 0
    match = re.search(r"\(([\d,]+) × ([\d,]+) px; (\d+) px thumbnails, to fit\)\n$", out)
    assert match, out
    width, height, thumb = (int(n.replace(",", "")) for n in match.groups())
    assert width * height <= 16_000_000
    assert 64 <= thumb < 1024
    assert Image.open(png).size == (width, height)


def test_a_recipe_too_large_for_one_png_writes_nothing_and_says_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    many = f"""\
version: 1
name: many
provider: emulator
defaults: {{model: flux-pro-1.1, width: 256, height: 256, output_format: png}}
jobs:
  - name: big
    prompt: "{{{{ a }}}} {{{{ b }}}}"
    matrix: {{a: {list(range(100))}, b: {list(range(50))}}}
"""
    recipe = _rendered(tmp_path, many, capsys, "--only", "big/0-0-1.png")
    png = tmp_path / "sheet.png"
    code, out, err = _gallery(capsys, recipe, "--png", str(png))
    assert (code, out) == (1, "")
    assert err == (
        "fluxbatch: --png: the contact sheet of 5,000 images does not fit in one PNG (at most "
        "16,000,000 pixels and 16,000 px a side), even with 64 px thumbnails; nothing was "
        "written. The HTML gallery (without --png) shows them all.\n")
    assert not png.exists()
    assert not (tmp_path / "many.gallery.html").exists()


# --- in a real browser ---------------------------------------------------------------------

# The flags of the machine notes: no sandbox (CI runs as root), and no background traffic
# (the network is closed; Chromium would otherwise try to reach Google at every start).
CHROMIUM_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def _chromium() -> str:
    """The browser, or a skip that says what is missing. CI sets FLUXBATCH_BROWSER_TESTS to
    `required` after installing Chromium, so there the skip becomes a failure."""
    path = shutil.which("chromium")
    missing = None
    if path is None:
        missing = "no chromium binary on PATH (Debian: apt-get install -y chromium; CI does)"
    elif importlib.util.find_spec("playwright") is None:
        missing = "the playwright package is missing (pip install -e '.[test]')"
    if missing is None and path is not None:
        return path
    if os.environ.get("FLUXBATCH_BROWSER_TESTS") == "required":
        pytest.fail(f"the browser test must run here, but {missing}")
    pytest.skip(f"browser test: {missing}")


def test_the_page_in_headless_chromium_shows_every_image_and_marks_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    recipe = _rendered(tmp_path, RECIPE, capsys)
    manifest = json.loads((tmp_path / "sheet.manifest.json").read_text())
    gone = "compare/oil.png"
    (tmp_path / gone).unlink()
    assert _gallery(capsys, recipe)[0] == 0
    plan = load_plan(recipe)
    shot = tmp_path / "screenshot.png"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((tmp_path / "sheet.gallery.html").as_uri())
            # lazy images load only near the viewport: load them all, to check every link
            page.evaluate("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
            page.wait_for_function(
                "[...document.images].every(i => i.complete)", timeout=30_000)
            sources = page.eval_on_selector_all("img", "els => els.map(e => e.getAttribute('src'))")
            broken = page.eval_on_selector_all("img", "els => els.filter(e => !e.naturalWidth)"
                                               ".map(e => e.getAttribute('src'))")
            missing = page.locator("figure.tile.missing").count()
            excluded = page.locator("figure.tile.excluded").count()
            headings = page.locator("h2").all_inner_texts()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    listed = sorted(entry["path"] for entry in manifest["images"])
    assert sorted(sources) == [p for p in listed if p != gone]
    assert broken == []
    assert missing == 1
    assert excluded == len(plan.removed) == 1
    assert len(sources) + missing == len(plan.jobs)
    assert headings == ["grid: colour × shape", "compare: by style",
                        "hero: “a lighthouse at dusk”"]
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert Image.open(shot).size[0] >= 1280


def test_object_values_are_shown_by_their_label_in_headers_and_captions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Captions and headers read `{"name": "square", "w": 256,…`."""
    recipe = _rendered(tmp_path, """\
        version: 1
        name: catalogue
        provider: emulator
        defaults: {model: flux-dev, output_format: png}
        output: "{{ product }}-{{ backdrop }}-{{ aspect.w }}.{{ ext }}"
        jobs:
          - name: shots
            prompt: "a {{ product }} on {{ backdrop }}"
            matrix:
              product: [chair, stool]
              backdrop: [{name: white, hex: "#fff"}, {name: grey, hex: "#888"}]
              aspect: [{name: square, w: 256, h: 256}, {label: wide, w: 512, h: 256}]
            params: {width: "{{ aspect.w }}", height: "{{ aspect.h }}"}
    """, capsys)
    assert _gallery(capsys, recipe, "--rows", "product", "--cols", "aspect")[0] == 0
    page = (tmp_path / "catalogue.gallery.html").read_text()
    assert re.findall(r"<th>([^<]*)</th>", page) == ["product \\ aspect", "square", "wide",
                                                    "chair", "stool"]
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    assert sorted({caption.split(", seed")[0] for caption in captions}) == [
        "backdrop=grey", "backdrop=white"]
