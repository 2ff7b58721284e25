"""The gallery's contact sheet, and the README staying in step with the command line."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from fluxbatch.emulator import EmulatorConfig, EmulatorThread
from fluxbatch.main import build_parser, main
from tests.conftest import build_file_tree

ROOT = Path(__file__).resolve().parent.parent
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
    replicates: 2
"""


def test_gallery_crosses_the_two_best_variables_and_links_every_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    recipe = str(tmp_path / "recipe.yaml")
    with EmulatorThread(EmulatorConfig(latency=0.01, max_side=64)) as emulator:
        assert main(["render", recipe, "--base-url", emulator.base_url, "-q"]) == 0
    capsys.readouterr()

    assert main(["gallery", recipe]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'sheet.gallery.html'} (12 images)\n"
    page = (tmp_path / "sheet.gallery.html").read_text()
    # colour and tone advance together (zip): shape crosses colour, so it makes the columns
    assert "<h2>grid: colour × shape</h2>" in page
    headers = re.findall(r"<th>([^<]*)</th>", page)
    assert headers[:4] == ["colour \\ shape", "circle", "square", "star"]
    sources = sorted(re.findall(r'<img loading=lazy src="([^"]+)"', page))
    assert sources == sorted(p.relative_to(tmp_path).as_posix()
                             for p in tmp_path.rglob("*.png"))
    assert len(sources) == 12


def test_gallery_before_any_render_says_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    assert main(["gallery", str(tmp_path / "recipe.yaml")]) == 1
    assert capsys.readouterr().err == (
        f"fluxbatch: nothing rendered yet in {tmp_path}: run `fluxbatch render` first\n")


def test_every_command_is_in_the_readme_command_table() -> None:
    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Commands"):readme.index("Exit codes:")]
    documented = set(re.findall(r"^\| `([a-z]+)", table, re.MULTILINE))
    assert documented == set(subparsers.choices)


def test_every_render_option_is_in_the_readme() -> None:
    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    readme = (ROOT / "README.md").read_text()
    render = subparsers.choices["render"]
    options = {o for a in render._actions for o in a.option_strings if o.startswith("--")}
    options -= {"--help", "--jobs", "--quiet"}  # documented as -j and -q
    missing = sorted(o for o in options if f"`{o}" not in readme)
    assert missing == []
