"""The recipe is declared once: one field gives the schema an editor reads, the check (in
jsonschema's words, every problem in one run) and the typed value. The check agrees with
jsonschema itself on the schema it writes."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import example, given, settings

from fluxbatch import recipe
from fluxbatch.declaration import Cost, Model, Reading, integer, key, schema_of, text
from fluxbatch.recipe_schema import read as read_recipe
from fluxbatch.recipe_schema import recipe_schema
from fluxbatch.yamlsource import Positions, format_path
from tests.helpers import examples
from tests.test_fuzz import documents, sensible_recipes, wild_recipes

SCHEMA = recipe_schema()
# jsonschema's own messages, which the declaration words the same way (the others, such as
# `anyOf` and `additionalProperties`, are reworded for people on both sides)
PLAIN = {"type", "minimum", "exclusiveMinimum", "minItems", "minLength", "minProperties",
         "uniqueItems"}


@settings(max_examples=examples(300), deadline=None)
@given(sensible_recipes | wild_recipes | documents.filter(lambda d: isinstance(d, dict)))
@example({"version": 1, "name": "r", "jobs": [{"name": "a", "replicates": 0.5}]})  # two faults
@example({"version": True, "name": "r", "provider": {"name": "bfl", "timeout": 0},
          "jobs": [{"name": "a", "matrix": {"x": {"from": "a.csv", "column": ""}},
                    "seed": -1.0}]})
def test_the_check_agrees_with_jsonschema_on_the_schema_it_writes(document: Any) -> None:
    ours = read_recipe(document, Positions("r.yaml"))
    theirs = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(document))
    assert (not ours.problems) == (not theirs), (ours.problems, [e.message for e in theirs])
    worded = {(format_path(tuple(e.absolute_path)), e.message) for e in theirs
              if e.validator in PLAIN}
    assert worded <= {(p.path, p.message) for p in ours.problems}


@dataclass(frozen=True, slots=True, kw_only=True)
class Shelf:
    width: int = key(integer(minimum=1), "How wide, in books.", default=3, show=3)
    label: str | None = key(text(min_length=1), cost=Cost.NOTHING)


SHELF = Model(Shelf, salvage=True, description="A shelf.")


def test_one_field_gives_the_schema_the_check_and_the_typed_value() -> None:
    assert schema_of(SHELF, {"title": "shelf"}) == {
        "title": "shelf", "type": "object", "description": "A shelf.",
        "additionalProperties": False, "properties": {
            "width": {"type": "integer", "minimum": 1, "description": "How wide, in books.",
                      "default": 3},
            "label": {"type": "string", "minLength": 1}}}
    reading = Reading(Positions("shelf.yaml"))
    assert reading.read(SHELF, {"width": 5, "label": "oak"}, ()) == Shelf(width=5, label="oak")
    assert reading.read(SHELF, {}, ()) == Shelf(width=3, label=None)
    assert not reading.problems and reading.cost is Cost.NOTHING
    # a condemned value takes its default, so the rest is still read; its cost is declared
    assert reading.read(SHELF, {"width": 0, "label": "", "lable": 1}, ()) == Shelf()
    assert [str(p) for p in reading.problems] == [
        "shelf.yaml: lable: unknown key 'lable' (did you mean 'label'?)",
        "shelf.yaml: width: 0 is less than the minimum of 1",
        "shelf.yaml: label: '' should be non-empty"]
    assert reading.cost is Cost.IMAGES


def test_schema_file_is_equal_as_json_to_what_the_code_writes() -> None:
    path = Path(__file__).resolve().parent.parent / "schemas" / "recipe.schema.json"
    assert json.loads(path.read_text(encoding="utf-8")) == SCHEMA


@pytest.mark.parametrize("text,expected", [
    ("replicates: 2.0", (2, "auto")),
    ("seed: 7.0", (1, 7)),
])
def test_integral_floats_read_as_integers(text: str, expected: tuple[Any, Any]) -> None:
    # YAML's 2.0 is an integer to JSON Schema; `range(2.0)` made planning crash
    loaded = recipe.parse(textwrap.dedent(f"""
        version: 1
        name: r
        defaults: {{model: flux-dev}}
        jobs:
          - name: a
            {text}
    """), "recipe.yaml")
    job, = loaded.jobs
    assert (job.replicates, job.seed) == expected
    assert (type(job.replicates), type(job.seed)) == tuple(type(v) for v in expected)


def test_a_recipe_with_integral_floats_plans(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from fluxbatch.main import main

    (tmp_path / "recipe.yaml").write_text(
        "version: 1\nname: r\nprovider: emulator\nmax_jobs: 5.0\ndefaults: {model: flux-dev}\n"
        "jobs:\n  - {name: a, prompt: x, replicates: 2.0}\n", encoding="utf-8")
    assert main(["plan", str(tmp_path / "recipe.yaml")]) == 0
    assert "2 images: 2 new" in capsys.readouterr().out
