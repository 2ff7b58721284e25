"""The model catalogue: every generation endpoint, request checks that agree with jsonschema,
jsonschema-worded messages, and the conversion of rendered templates to the schema's types."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxbatch import models
from fluxbatch.main import main
from tests.helpers import examples

GENERATION_MODELS = {
    "flux-pro-1.1", "flux-pro-1.1-ultra", "flux-dev", "flux-kontext-pro", "flux-kontext-max",
    "flux-pro-1.0-fill", "flux-pro-1.0-expand", "flux-2-pro", "flux-2-max", "flux-2-flex",
    "flux-2-klein-4b", "flux-2-klein-9b", "flux-2-pro-preview", "flux-2-klein-9b-preview",
    "flux-pro", "flux-pro-1.0-canny", "flux-pro-1.0-depth",
}
DEPRECATED = {"flux-pro", "flux-pro-1.0-canny", "flux-pro-1.0-depth"}


def test_catalogue_holds_every_generation_model() -> None:
    catalogue = models.catalogue()
    assert set(catalogue) == GENERATION_MODELS
    assert {name for name, model in catalogue.items() if model.deprecated} == DEPRECATED
    assert list(catalogue)[-3:] == ["flux-pro", "flux-pro-1.0-canny", "flux-pro-1.0-depth"]


@pytest.mark.parametrize("name", sorted(GENERATION_MODELS))
def test_every_model_has_a_price_and_takes_a_seed(name: str) -> None:
    model = models.catalogue()[name]
    assert name in models.PRICES
    assert "seed" in model.checks
    assert model.types_of("seed") == ("integer", "null")


# -- compiled checks agree with jsonschema ----------------------------------------------------

FIELDS = [(name, field) for name, model in sorted(models.catalogue().items())
          for field in model.properties]
any_json = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


def _limits(schema: Any) -> list[Any]:
    """The numbers and enum members a schema names, wherever they are."""
    found: list[Any] = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("minimum", "maximum", "multipleOf", "minLength", "maxLength"):
                found.append(value)
            elif key == "enum":
                found.extend(value)
            else:
                found.extend(_limits(value))
    elif isinstance(schema, list):
        for item in schema:
            found.extend(_limits(item))
    return found


def near_the_limits(schema: Any) -> st.SearchStrategy[Any]:
    """Values on and around each limit: where an off-by-one would show."""
    candidates: list[Any] = []
    for limit in _limits(schema):
        if isinstance(limit, int | float) and not isinstance(limit, bool):
            for delta in (-1, -0.5, 0, 0.5, 1):
                candidates += [limit + delta, float(limit + delta), limit * 3 + delta]
            candidates += ["x" * int(limit), "x" * (int(limit) + 1)]
        else:
            candidates += [limit, str(limit).upper()]
    return st.sampled_from(candidates) if candidates else st.nothing()


fields_and_values = st.sampled_from(FIELDS).flatmap(lambda field: st.tuples(
    st.just(field),
    any_json | near_the_limits(models.request_schema(field[0])["properties"][field[1]])))


@settings(max_examples=examples(2000), deadline=None)
@given(fields_and_values)
def test_compiled_check_agrees_with_jsonschema(case: tuple[tuple[str, str], Any]) -> None:
    (name, prop), value = case
    schema = models.request_schema(name)
    errors = [e for e in jsonschema.Draft202012Validator(schema).iter_errors({prop: value})
              if list(e.absolute_path) == [prop]]
    message = models.compile_check(schema["properties"][prop])(value)
    assert (message is None) == (not errors), (message, [e.message for e in errors])


@pytest.mark.parametrize("name", sorted(GENERATION_MODELS))
def test_every_property_of_every_model_is_checked(name: str) -> None:
    model = models.catalogue()[name]
    assert set(model.checks) == set(model.properties) - models.INTERNAL_FIELDS


# -- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,request_body,problems", [
    ("flux-pro-1.1", {"width": 2000}, [("width", "2000 is greater than the maximum of 1440")]),
    ("flux-pro-1.1", {"height": 200}, [("height", "200 is less than the minimum of 256")]),
    ("flux-pro-1.1", {"width": 1000}, [("width", "1000 is not a multiple of 32")]),
    ("flux-pro-1.1", {"width": "512"}, [("width", "'512' is not of type 'integer'")]),
    ("flux-pro-1.1", {"width": 512.5}, [("width", "512.5 is not of type 'integer'")]),
    ("flux-pro-1.1", {"width": True}, [("width", "True is not of type 'integer'")]),
    ("flux-pro-1.1", {"output_format": "gif"},
     [("output_format", "'gif' is not one of ['jpeg', 'png', 'webp']")]),
    ("flux-pro", {"output_format": "webp"},
     [("output_format", "'webp' is not one of ['jpeg', 'png']")]),
    ("flux-dev", {"steps": 0}, [("steps", "0 is less than the minimum of 1")]),
    ("flux-dev", {"guidance": 6}, [("guidance", "6 is greater than the maximum of 5")]),
    ("flux-dev", {"guidance": float("nan")}, [("guidance", "nan is not of type 'number'")]),
    ("flux-dev", {"guidance": float("inf")}, [("guidance", "inf is not of type 'number'")]),
    ("flux-dev", {"safety_tolerance": 7}, [("safety_tolerance",
                                            "7 is greater than the maximum of 6")]),
    ("flux-dev", {"prompt": None}, [("prompt", "None is not of type 'string'")]),
    ("flux-dev", {"stpes": 3},
     [("stpes", "unknown parameter 'stpes' for flux-dev (did you mean 'steps'?)")]),
    ("flux-pro-1.1", {"modle": "x"},
     [("modle", "unknown parameter 'modle' for flux-pro-1.1 (did you mean 'model'?)")]),
    ("flux-2-klein-4b", {"prompt": "x", "guidance": 3},
     [("guidance", "unknown parameter 'guidance' for flux-2-klein-4b")]),
    ("flux-2-flex", {"prompt": "x", "input_image_blob_path": "blob"},
     [("input_image_blob_path", "'input_image_blob_path' is internal to the API and must not "
       "be sent")]),
    ("flux-2-pro", {"width": 32}, [(None, "missing required parameter 'prompt' for flux-2-pro"),
                                   ("width", "32 is less than the minimum of 64")]),
    ("flux-pro-1.0-fill", {}, [(None, "missing required parameter 'image' for "
                                "flux-pro-1.0-fill")]),
    ("flux-kontext-pro", {}, [(None, "missing required parameter 'prompt' for "
                               "flux-kontext-pro")]),
    ("flux-pro-1.1-ultra", {"aspect_ratio": 3}, [("aspect_ratio",
                                                  "3 is not of type 'string'")]),
    ("flux-pro-1.1-ultra", {"raw": "yes"}, [("raw", "'yes' is not of type 'boolean'")]),
    ("flux-pro-1.0-expand", {"image": "x", "top": 5000},
     [("top", "5000 is greater than the maximum of 2048")]),
    ("flux-pro-1.0-canny", {"prompt": "x", "steps": 10},
     [("steps", "10 is less than the minimum of 15")]),
    ("flux-pro-1.0-depth", {"prompt": "x", "guidance": 0},
     [("guidance", "0 is less than the minimum of 1")]),
    ("flux-kontext-max", {"prompt": "x", "aspect_ratio": None, "seed": 3}, []),
    ("flux-2-max", {"prompt": "x", "width": 1024, "height": 1024}, []),
])
def test_validate_reports_each_problem_in_jsonschema_words(
        name: str, request_body: dict[str, Any], problems: list[tuple[str | None, str]]) -> None:
    assert models.catalogue()[name].validate(request_body) == problems


@pytest.mark.parametrize("name,expected", [
    ("flux-kontext", "unknown model 'flux-kontext' (did you mean 'flux-kontext-pro'?)"),
    ("flux-pro-2", "unknown model 'flux-pro-2' (did you mean 'flux-2-pro'?)"),
    ("dall-e-3", "unknown model 'dall-e-3'"),
    # another version of a model it knows, or a Flux name it cannot place: perhaps newer
    ("flux-pro-1.2", "unknown model 'flux-pro-1.2' (did you mean 'flux-pro-1.1'?); a model "
                     "this release of fluxbatch does not know can be added to the project's "
                     "own catalogue with `fluxbatch models --add openapi.json`"),
    ("flux-3", "unknown model 'flux-3' (did you mean 'flux-dev'?); a model this release of "
               "fluxbatch does not know can be added to the project's own catalogue with "
               "`fluxbatch models --add openapi.json`"),
])
def test_unknown_model_message_suggests_the_closest(name: str, expected: str) -> None:
    assert models.unknown_model_message(name) == expected


# -- rendered templates become the schema's type ----------------------------------------------


@pytest.mark.parametrize("text,types,expected", [
    ("6", ("integer", "null"), 6),
    (" 6 ", ("integer",), 6),
    ("6.0", ("integer",), 6),
    ("6.5", ("integer", "null"), "6.5"),
    ("3", ("number", "null"), 3.0),
    ("2.5", ("number",), 2.5),
    ("nan", ("number",), "nan"),
    ("True", ("boolean", "null"), True),
    ("false", ("boolean",), False),
    ("yes", ("boolean",), True),
    ("maybe", ("boolean",), "maybe"),
    ("none", ("integer", "null"), None),
    ("", ("integer", "null"), None),
    ("16:9", ("string",), "16:9"),
    ("42", ("string", "null"), "42"),
    ("42", (), "42"),
])
def test_coerce_text_converts_to_the_schema_type(text: str, types: tuple[str, ...],
                                                 expected: Any) -> None:
    assert models.coerce_text(text, types) == expected
    assert type(models.coerce_text(text, types)) is type(expected)


@pytest.mark.parametrize("value,types,expected", [
    (3, ("number", "null"), 3.0),
    (3.0, ("integer", "null"), 3),
    (3.5, ("integer",), 3.5),
    (True, ("number",), True),
    ("3", ("number",), "3"),
])
def test_normalise_value_gives_one_form_per_number(value: Any, types: tuple[str, ...],
                                                   expected: Any) -> None:
    assert models.normalise_value(value, types) == expected
    assert type(models.normalise_value(value, types)) is type(expected)


@pytest.mark.parametrize("name,request_body,usd", [
    ("flux-pro-1.1", {"width": 1024, "height": 1024}, 0.04),
    ("flux-2-pro", {"width": 1024, "height": 1024}, 0.03 + 0.05 * 0.015),
    ("flux-2-pro", {}, 0.03),
    ("flux-2-pro", {"input_image": "a", "input_image_2": "b"}, 0.03 + 2 * 0.015),
])
def test_estimate_cost(name: str, request_body: dict[str, Any], usd: float) -> None:
    assert models.estimate_cost(name, request_body) == pytest.approx(usd)


# -- `fluxbatch models` -----------------------------------------------------------------------


def test_models_command_lists_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "MODEL                    PRICE                   CAP  SIZE BY",
        "flux-pro-1.1             $0.040                  24   size",
        "flux-dev                 $0.025 (?)              24   size",
        "flux-pro-1.1-ultra       $0.060                  24   aspect",
        "flux-pro-1.0-fill        $0.050                  24   input",
        "flux-pro-1.0-expand      $0.050 (?)              24   input",
        "flux-kontext-pro         $0.040                  24   aspect",
        "flux-kontext-max         $0.080                  6    aspect",
        "flux-2-max               $0.070 + $0.030/MP (?)  24   size",
        "flux-2-klein-9b          $0.015 + $0.002/MP (?)  24   size",
        "flux-2-klein-4b          $0.014 + $0.001/MP (?)  24   size",
        "flux-2-klein-9b-preview  $0.015 + $0.002/MP (?)  24   size",
        "flux-2-pro-preview       $0.030 + $0.015/MP (?)  24   size",
        "flux-2-pro               $0.030 + $0.015/MP (?)  24   size",
        "flux-2-flex              $0.060 + $0.060/MP (?)  24   size",
        "flux-pro                 $0.050 (?)              24   deprecated",
        "flux-pro-1.0-canny       $0.050 (?)              24   deprecated",
        "flux-pro-1.0-depth       $0.050 (?)              24   deprecated",
        "",
        "Request schemas: BFL OpenAPI 2026-04-23; (?) marks an unverified price. "
        "`fluxbatch models NAME` lists a model's parameters.",
    ]


def test_models_command_shows_one_models_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "flux-dev"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flux-dev: Generate an image with FLUX.1 [dev].\n"
                          "schema bfl-openapi-2026-04-23.json #/components/schemas/FluxDevInputs\n")
    assert "width              integer       min 256 max 1440 × 32  1024\n" in out
    assert out.endswith("* required\n")


def test_models_command_rejects_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "flux-pro-2"]) == 1
    assert capsys.readouterr().err == (
        "fluxbatch: unknown model 'flux-pro-2' (did you mean 'flux-2-pro'?)\n")
