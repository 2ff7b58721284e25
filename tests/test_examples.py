"""The examples plan cleanly, and the README and docs/recipes.md show them as they are."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from fluxbatch.emulator import EmulatorConfig, EmulatorThread
from fluxbatch.front import load_plan
from fluxbatch.main import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*/recipe.yaml"))


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda path: path.parent.name)
def test_every_example_plans_without_a_problem(recipe: Path) -> None:
    plan = load_plan(str(recipe))
    assert plan.jobs
    assert not plan.notes


def blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return re.findall(r"```(?:yaml|csv)\n(.*?)```", text, re.DOTALL)


def test_the_readme_shows_the_quickstart_as_it_is() -> None:
    quickstart = (ROOT / "examples/quickstart/recipe.yaml").read_text(encoding="utf-8")
    assert quickstart in blocks("README.md")


def test_the_recipe_reference_shows_the_edit_example_as_it_is() -> None:
    edit = (ROOT / "examples/edit/recipe.yaml").read_text(encoding="utf-8")
    fixes = (ROOT / "examples/edit/fixes.csv").read_text(encoding="utf-8")
    shown = blocks("docs/recipes.md")
    assert any(block.startswith("defaults:") and block in edit for block in shown)
    assert fixes in shown


def test_the_edit_example_renders_and_a_renamed_photo_costs_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ROOT / "examples/edit", tmp_path / "edit",
                    ignore=shutil.ignore_patterns("renders", ".fluxbatch", "*.json"))
    recipe = tmp_path / "edit" / "recipe.yaml"
    with EmulatorThread(EmulatorConfig(latency=0.0)) as emulator:
        command = ["render", str(recipe), "--base-url", emulator.base_url]
        assert main(command) == 0
        assert capsys.readouterr().out.startswith("12 written")
        (tmp_path / "edit/photos/vase.png").rename(tmp_path / "edit/photos/urn.png")
        table = tmp_path / "edit/fixes.csv"
        table.write_text(table.read_text().replace("photos/vase.png", "photos/urn.png"))
        assert main(command) == 0
        assert emulator.stats.submits == 12
    assert "4 written (4 from images already paid for)" in capsys.readouterr().out
