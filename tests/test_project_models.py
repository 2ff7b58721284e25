"""A project's own models: a model BFL published after this release of fluxbatch is added
from BFL's OpenAPI (`fluxbatch models --add`) to the project's `fluxbatch.models.json`; its
recipes may then name it, checked against its schema, with a note, recorded in plans,
manifests and images; and a catalogue file that a pull request made hostile is one line."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from fluxbatch import models
from fluxbatch.main import main
from tests.helpers import build_file_tree

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "fluxbatch" / "data" / models.SPEC_FILE
RECIPE = """\
version: 1
name: newer
provider: emulator
output: "out/{{ n }}.{{ ext }}"
defaults: {model: flux-pro-1.2, width: 256, height: 256, output_format: png}
jobs:
  - name: a
    prompt: "a teapot {{ n }}"
    params: {sharpness: SHARPNESS}
    matrix: {n: [1, 2]}
"""
NOTE = ("recipe.yaml:5:19: note: defaults.model: flux-pro-1.2 is not one this release of "
        "fluxbatch knows: it comes from the project's fluxbatch.models.json, whose schema "
        "checks its parameters; its price is unknown (plan shows no cost, and --budget "
        "refuses it)")

Capsys = pytest.CaptureFixture[str]


@cache
def newer_spec() -> bytes:
    """BFL's spec as a later month might publish it: one more model, flux-pro-1.2, shaped
    like flux-pro-1.1 with one more parameter."""
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    paths, components = spec["paths"], spec["components"]["schemas"]
    older = paths["/v1/flux-pro-1.1"]
    ref = older["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = copy.deepcopy(components[ref.rsplit("/", 1)[-1]])
    schema["properties"]["sharpness"] = {"type": "number", "minimum": 0, "maximum": 1,
                                         "pattern": "unused", "default": 0.5}
    components["FluxPro12Inputs"] = schema
    newer = json.loads(json.dumps(older).replace(ref, "#/components/schemas/FluxPro12Inputs"))
    newer["post"]["summary"] = "Generate an image with FLUX1.2 [pro]"
    paths["/v1/flux-pro-1.2"] = newer
    spec["info"]["version"] = "2026-12-01"
    return json.dumps(spec).encode()


def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / ".git").mkdir()  # the top of the project
    build_file_tree(tmp_path, {"recipes/recipe.yaml": RECIPE.replace("SHARPNESS", "0.7")})
    (tmp_path / "openapi.json").write_bytes(newer_spec())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_model_newer_than_the_release_is_named_once_models_add_took_it_in(
        project: Path, capsys: Capsys) -> None:
    recipe = "recipes/recipe.yaml"
    code, _, err = run(capsys, "validate", recipe)
    assert code == 1
    assert "unknown model 'flux-pro-1.2' (did you mean 'flux-pro-1.1'?); a model this " \
        "release of fluxbatch does not know can be added to the project's own catalogue " \
        "with `fluxbatch models --add openapi.json`" in err

    assert run(capsys, "models", "--add", "openapi.json") == (0, (
        f"added flux-pro-1.2 to {project / 'fluxbatch.models.json'}: commit it with your "
        "recipes, which may now name them\n"
        "note: flux-pro-1.2: not checked before sending (the provider checks it): pattern "
        "on 'sharpness'\n"), "")
    assert run(capsys, "models", "--add", "openapi.json")[1].startswith("nothing to add")

    code, out, err = run(capsys, "validate", recipe)
    assert (code, out) == (0, "recipes/recipe.yaml: ok (2 images; flux-pro-1.2)\n")
    assert err == NOTE.replace("recipe.yaml", recipe, 1) + "\n"

    code, out, _ = run(capsys, "plan", recipe, "--json")
    sha256 = hashlib.sha256((project / "fluxbatch.models.json").read_bytes()).hexdigest()
    planned = json.loads(out)
    assert planned["recipe"]["model_catalogue"] == {"path": "fluxbatch.models.json",
                                                    "sha256": sha256}
    assert planned["summary"]["estimated_usd"] is None

    assert run(capsys, "render", recipe, "-q")[0] == 0  # the bundled emulator takes it too
    manifest = json.loads((project / "recipes" / "newer.manifest.json").read_text())
    assert manifest["model_catalogue"]["sha256"] == sha256
    assert {image["model_catalogue"]["sha256"] for image in manifest["images"]} == {sha256}
    code, out, _ = run(capsys, "inspect", str(project / "recipes" / "out" / "1.png"), "--json")
    assert json.loads(out)["model_catalogue"] == {"path": "fluxbatch.models.json",
                                                  "sha256": sha256}

    code, _, err = run(capsys, "render", recipe, "--force", "--budget", "5")
    assert code == 1 and "no published price" in err  # a budget fails closed


def test_a_project_models_parameters_are_checked_against_its_schema(
        project: Path, capsys: Capsys) -> None:
    assert run(capsys, "models", "--add", "openapi.json")[0] == 0
    build_file_tree(project, {"recipes/recipe.yaml": RECIPE.replace("SHARPNESS", "2")})
    code, _, err = run(capsys, "validate", "recipes/recipe.yaml")
    assert code == 1
    assert "recipes/recipe.yaml:9:25: jobs[0].params.sharpness: 2.0 is greater than the " \
        "maximum of 1" in err


def test_models_lists_the_projects_own_models(project: Path, capsys: Capsys) -> None:
    assert run(capsys, "models", "--add", "openapi.json")[0] == 0
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert [line.split() for line in out.splitlines() if "flux-pro-1.2" in line] == [
        ["flux-pro-1.2", "unknown", "24", "size", "(project)"]]
    assert f"(project): from {project / 'fluxbatch.models.json'}" in out
    assert "sharpness" in run(capsys, "models", "flux-pro-1.2")[1]


def catalogue(models_: dict[str, Any], **extra: Any) -> str:
    return json.dumps({"fluxbatch_models": 1, "added_from": [], "models": models_, **extra})


GOOD = {"type": "object", "properties": {"prompt": {"type": "string"}}}
CASES = {
    "a name that leaves the URL path": (
        catalogue({"../credits": {"schema": GOOD}}),
        "fluxbatch.models.json: '../credits' is not a model name (lower-case letters, digits, "
        "'.', '-' and '_')"),
    "one of fluxbatch's own": (
        catalogue({"flux-pro-1.1": {"schema": GOOD}}),
        "fluxbatch.models.json: 'flux-pro-1.1' is one of fluxbatch's own models; remove it "
        "from the project's catalogue"),
    "a bound that is not a number": (
        catalogue({"flux-x": {"schema": {"properties": {"w": {"minimum": "big"}}}}}),
        "fluxbatch.models.json: the request schema of 'flux-x' is not one fluxbatch can check "
        "(an object with `properties`, each a type, a range, an enum or `anyOf` of those)"),
    "a type fluxbatch does not know": (
        catalogue({"flux-x": {"schema": {"properties": {"w": {"type": "tuple"}}}}}),
        "fluxbatch.models.json: the request schema of 'flux-x' is not one fluxbatch can check "
        "(an object with `properties`, each a type, a range, an enum or `anyOf` of those)"),
    "not written by fluxbatch": (
        json.dumps({"models": {}}),
        "fluxbatch.models.json: not a catalogue of fluxbatch's (`\"fluxbatch_models\": 1` is "
        "missing); it is written by `fluxbatch models --add`"),
    "not JSON": ("{", "fluxbatch.models.json: not JSON (Expecting property name enclosed in "
                      "double quotes: line 1 column 2 (char 1))"),
    "nested without end": ("[" * 100_000 + "]" * 100_000,
                           "fluxbatch.models.json: nested too deeply"),
}


@pytest.mark.parametrize("text,said", CASES.values(), ids=CASES.keys())
def test_a_catalogue_that_cannot_be_used_is_one_line(project: Path, capsys: Capsys,
                                                     text: str, said: str) -> None:
    (project / "fluxbatch.models.json").write_text(text)
    assert run(capsys, "validate", "recipes/recipe.yaml") == (
        1, "", f"{said}\nrecipes/recipe.yaml: 1 problem\n")


def test_a_catalogue_linked_outside_the_project_is_not_read(project: Path, capsys: Capsys,
                                                            tmp_path_factory: Any) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "models.json"
    outside.write_text(catalogue({"flux-x": {"schema": GOOD}}))
    os.symlink(outside, project / "fluxbatch.models.json")
    code, out, err = run(capsys, "validate", "recipes/recipe.yaml")
    assert (code, out) == (1, "")
    assert "outside the recipe's project" in err and err.count("\n") == 2


def test_models_add_says_what_is_not_an_openapi_document(project: Path,
                                                         capsys: Capsys) -> None:
    (project / "other.json").write_text('{"openapi": "3.1.0"}')
    assert run(capsys, "models", "--add", "other.json") == (1, "", (
        "fluxbatch: other.json: not an OpenAPI document (no `paths` and `components.schemas`): "
        "download it from the provider, e.g. https://api.bfl.ai/openapi.json\n"))
    assert run(capsys, "models", "--add", "missing.json") == (
        1, "", "fluxbatch: missing.json: no such file\n")
    assert not (project / "fluxbatch.models.json").exists()
