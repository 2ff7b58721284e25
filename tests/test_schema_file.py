"""The published recipe schema never drifts from the code, and every example is a valid recipe
that points editors at it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fluxbatch.main import main
from fluxbatch.recipe_schema import recipe_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "recipe.schema.json"
SCHEMA_LINE = "# yaml-language-server: $schema="


def example_recipes() -> list[Path]:
    """Every recipe under examples/ (data files that recipes read are not recipes, nor is a
    CI workflow, whose `jobs` is a mapping)."""
    found = []
    for path in sorted((ROOT / "examples").rglob("*.y*ml")):
        document: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and isinstance(document.get("jobs"), list):
            found.append(path)
    return found


def test_schema_file_is_the_generated_schema() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json.dumps(recipe_schema(), indent=2) + "\n"


def test_schema_command_prints_the_schema_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == SCHEMA_FILE.read_text(encoding="utf-8")


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_there_are_examples() -> None:
    assert example_recipes()


@pytest.mark.parametrize("path", example_recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_points_editors_at_the_schema(path: Path) -> None:
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith(SCHEMA_LINE)
    target = (path.parent / first_line.removeprefix(SCHEMA_LINE)).resolve()
    assert target == SCHEMA_FILE


@pytest.mark.parametrize("path", example_recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_is_valid_for_editors_and_for_fluxbatch(
        path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(path.read_text("utf-8")))
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"{path}: ok (")
