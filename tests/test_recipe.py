"""Recipe loading: the typed recipe, every schema problem located and worded for people, and
the YAML reader's deliberate differences from `yaml.safe_load`."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from fluxbatch import recipe, yamlsource
from fluxbatch.errors import RecipeError
from fluxbatch.recipe_schema import DEFAULT_MAX_JOBS, DEFAULT_OUTPUT
from tests.helpers import build_file_tree


def problems(text: str, filename: str = "recipe.yaml") -> list[str]:
    with pytest.raises(RecipeError) as caught:
        recipe.parse(textwrap.dedent(text).lstrip("\n"), filename)
    return str(caught.value).splitlines()


def test_every_key_loads_into_the_typed_recipe(tmp_path: Path) -> None:
    build_file_tree(tmp_path, {
        "recipe.yaml": """
            # yaml-language-server: $schema=../schemas/recipe.schema.json
            version: 1
            name: shop-shots
            description: product photos
            provider: {name: cometapi, concurrency: 4, model_concurrency: {flux-dev: 2},
                       timeout: 30}
            output: "{{ job }}/{{ subject | slug }}.{{ ext }}"
            output_root: renders
            max_jobs: 50
            defaults: {model: flux-dev, width: 768}
            vars: {brand: Acme}
            jobs:
              - name: mugs
                description: on tables
                prompt: "{{ subject }} by {{ brand }}"
                matrix:
                  subject: {from: subjects.txt}
                  style: [ink, oil]
                replicates: 2
                params: {steps: "{{ 10 * 3 }}"}
                seed: 5
                output: "{{ subject }}-{{ style }}-{{ replicate }}.png"
              - name: plain
        """,
        "subjects.txt": "mug\n# not this\ncup\n",
    })
    loaded = recipe.load(tmp_path / "recipe.yaml")
    assert loaded.name == "shop-shots"
    assert loaded.provider == recipe.ProviderSpec("cometapi", None, 4, {"flux-dev": 2}, 30)
    assert loaded.output_root == tmp_path / "renders"
    assert loaded.max_jobs == 50
    assert loaded.defaults == {"model": "flux-dev", "width": 768}
    assert loaded.vars == {"brand": "Acme"}
    mugs, plain = loaded.jobs
    assert (mugs.index, mugs.name, mugs.prompt, mugs.replicates, mugs.seed) == (
        0, "mugs", "{{ subject }} by {{ brand }}", 2, 5)
    assert mugs.params == {"steps": "{{ 10 * 3 }}"}
    assert mugs.output == "{{ subject }}-{{ style }}-{{ replicate }}.png"
    assert [axis.rows for axis in mugs.matrix.axes] == [(("mug",), ("cup",)),
                                                       (("ink",), ("oil",))]
    assert (plain.index, plain.prompt, plain.replicates, plain.seed, plain.params) == (
        1, None, 1, "auto", {})
    assert plain.output == "{{ job }}/{{ subject | slug }}.{{ ext }}"


def test_defaults_of_optional_keys() -> None:
    loaded = recipe.parse("version: 1\nname: r\njobs: [{name: a}]\n", "dir/recipe.yaml")
    assert loaded.provider.name == "bfl"
    assert loaded.output_root == Path("dir")
    assert loaded.max_jobs == DEFAULT_MAX_JOBS == 10_000
    assert loaded.jobs[0].output == DEFAULT_OUTPUT
    assert loaded.jobs[0].seed == "auto"


# -- schema problems --------------------------------------------------------------------------

HEAD = "version: 1\nname: r\n"


@pytest.mark.parametrize("text,expected", [
    ("version: 2\nname: r\njobs: [{name: a}]\n", ["recipe.yaml:1:10: version: must be 1"]),
    ("version: 1\nname: 'my recipe'\njobs: [{name: a}]\n",
     ["recipe.yaml:2:7: name: 'my recipe' must start with a letter or digit and use only "
      "letters, digits, '.', '_' and '-'"]),
    (HEAD + "jobs: []\n", ["recipe.yaml:3:7: jobs: [] should be non-empty"]),
    (HEAD + "jobs: {a: 1}\n", ["recipe.yaml:3:7: jobs: {'a': 1} is not of type 'array'"]),
    (HEAD + "jbos: []\njobs: [{name: a}]\n",
     ["recipe.yaml:3:1: jbos: unknown key 'jbos' (did you mean 'jobs'?)"]),
    (HEAD + "jobs:\n  - name: a\n    promt: x\n",
     ["recipe.yaml:5:5: jobs[0].promt: unknown key 'promt' (did you mean 'prompt'?)"]),
    (HEAD + "jobs:\n  - prompt: x\n", ["recipe.yaml:4:5: jobs[0]: 'name' is a required key"]),
    (HEAD + "jobs:\n  - name: a\n    replicates: 0\n",
     ["recipe.yaml:5:17: jobs[0].replicates: 0 is less than the minimum of 1"]),
    (HEAD + "jobs:\n  - name: a\n    replicates: two\n",
     ["recipe.yaml:5:17: jobs[0].replicates: 'two' is not of type 'integer'"]),
    (HEAD + "jobs:\n  - name: a\n    seed: -1\n",
     ["recipe.yaml:5:11: jobs[0].seed: -1 is less than the minimum of 0"]),
    (HEAD + "jobs:\n  - name: a\n    seed: random\n",
     ["recipe.yaml:5:11: jobs[0].seed: 'random' is not valid here: expected 'auto', an "
      "integer or a template string"]),
    (HEAD + "jobs:\n  - name: a\n    seed: 1.5\n",
     ["recipe.yaml:5:11: jobs[0].seed: 1.5 is not valid here: expected 'auto', an integer "
      "or a template string"]),
    (HEAD + "jobs:\n  - name: a\n    prompt: 5\n",
     ["recipe.yaml:5:13: jobs[0].prompt: 5 is not of type 'string'"]),
    (HEAD + "provider: openai\njobs: [{name: a}]\n",
     ["recipe.yaml:3:11: provider: 'openai' is not valid here: expected 'bfl' or 'cometapi' "
      "or 'emulator' or a mapping"]),
    (HEAD + "provider: {name: bfl, base_url: ftp://x, concurency: 3}\njobs: [{name: a}]\n",
     ["recipe.yaml:3:33: provider.base_url: 'ftp://x' is not an http(s) URL",
      "recipe.yaml:3:42: provider.concurency: unknown key 'concurency' (did you mean "
      "'concurrency'?)"]),
    (HEAD + "provider: {name: emulator, base_url: 'http://x'}\njobs: [{name: a}]\n",
     ["recipe.yaml:3:38: provider.base_url: provider 'emulator' takes no base_url"]),
    (HEAD + "defaults: {model: flux-pro-2}\njobs: [{name: a}]\n",
     ["recipe.yaml:3:19: defaults.model: unknown model 'flux-pro-2' (did you mean "
      "'flux-2-pro'?)"]),
    (HEAD + "jobs:\n  - name: a\n    params: {model: 5}\n",
     ["recipe.yaml:5:21: jobs[0].params.model: unknown model 5"]),
    (HEAD + "max_jobs: 0\njobs: [{name: a}]\n",
     ["recipe.yaml:3:11: max_jobs: 0 is less than the minimum of 1"]),
    (HEAD + "output: ''\njobs: [{name: a}]\n", ["recipe.yaml:3:9: output: '' should be non-empty"]),
    (HEAD + "vars: [1]\njobs: [{name: a}]\n",
     ["recipe.yaml:3:7: vars: [1] is not of type 'object'"]),
    (HEAD + "jobs:\n  - name: a\n    params: [1]\n",
     ["recipe.yaml:5:13: jobs[0].params: [1] is not of type 'object'"]),
    (HEAD + "jobs:\n  - name: a\n    matrix: {x: abc}\n",
     ["recipe.yaml:5:17: jobs[0].matrix.x: 'abc' is not valid here: expected a list, a "
      "mapping with 'from' or a mapping with 'files'"]),
    (HEAD + "jobs:\n  - name: a\n    matrix: {x: []}\n",
     ["recipe.yaml:5:17: jobs[0].matrix.x: [] should be non-empty"]),
    (HEAD + "jobs:\n  - name: a\n    matrix: {x: {from: a.txt, colum: b}}\n",
     ["recipe.yaml:5:31: jobs[0].matrix.x.colum: unknown key 'colum' (did you mean "
      "'column'?)"]),
    (HEAD + "jobs:\n  - name: a\n    matrix: {x: [1], include: {x: 2}}\n",
     ["recipe.yaml:5:31: jobs[0].matrix.include: {'x': 2} is not of type 'array'"]),
    (HEAD + "jobs:\n  - name: a\n    matrix: {zip: [1, {}]}\n",
     ["recipe.yaml:5:20: jobs[0].matrix.zip[0]: 1 is not of type 'object'",
      "recipe.yaml:5:23: jobs[0].matrix.zip[1]: {} should be non-empty"]),
    (HEAD + "defaults: {model: flux-dev}\njobs:\n  - {name: a}\n  - {name: a}\n",
     ["recipe.yaml:6:12: jobs[1].name: duplicate job name 'a' (also jobs[0])"]),
])
def test_schema_problems_are_located_and_worded(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_model_may_be_a_template_in_params_and_defaults() -> None:
    loaded = recipe.parse(HEAD + "defaults: {model: '{{ m }}'}\njobs:\n  - name: a\n"
                          "    params: {model: 'flux-{{ v }}'}\n", "recipe.yaml")
    assert loaded.defaults == {"model": "{{ m }}"}
    assert loaded.jobs[0].params == {"model": "flux-{{ v }}"}


def test_unlenient_load_keeps_damaged_jobs_to_check_and_carries_their_problems() -> None:
    loaded = recipe.parse(HEAD + "jobs:\n  - {name: a, replicates: 0}\n  - {name: b}\n"
                          "  - {name: c, prompt: x, stray: 1}\n", "recipe.yaml", strict=False)
    assert [(job.name, job.replicates, job.damaged) for job in loaded.jobs] == [
        ("a", 1, True), ("b", 1, False), ("c", 1, False)]
    assert [str(p) for p in loaded.problems] == [
        "recipe.yaml:4:27: jobs[0].replicates: 0 is less than the minimum of 1",
        "recipe.yaml:6:26: jobs[2].stray: unknown key 'stray'"]


# -- the document itself ----------------------------------------------------------------------


@pytest.mark.parametrize("content,message", [
    (b"", "recipe.yaml: a recipe must be a mapping, but this document is empty"),
    (b"# only a comment\n", "recipe.yaml: a recipe must be a mapping, but this document is empty"),
    (b"- name: a\n", "recipe.yaml:1:1: a recipe must be a mapping, but this document is a list"),
    (b"just text\n", "recipe.yaml:1:1: a recipe must be a mapping, but this document is a str"),
    (b"name: \xff\n", "recipe.yaml: not UTF-8 text (byte 6)"),
    (b"version: 1\njobs: [\n", "recipe.yaml:3:1: YAML syntax error: expected the node content, "
     "but found '<stream end>'"),
    (b"jobs: [a,\n  b\n", "recipe.yaml:3:1: YAML syntax error: expected ',' or ']', but got "
     "'<stream end>' (while parsing a flow sequence at line 1)"),
    (b"a: b: c\n", "recipe.yaml:1:5: YAML syntax error: mapping values are not allowed here"),
    (b"a: 1\n---\nb: 2\n", "recipe.yaml:2:1: YAML syntax error: expected a single document in "
     "the stream, but found another document"),
])
def test_unreadable_documents_say_why(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "recipe.yaml").write_bytes(content)
    with pytest.raises(RecipeError) as caught:
        recipe.load(tmp_path / "recipe.yaml")
    assert str(caught.value) == f"{tmp_path}/{message}"


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        recipe.load(tmp_path / "nope.yaml")
    assert str(caught.value) == f"{tmp_path}/nope.yaml: No such file or directory"


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_bytes(b"\xef\xbb\xbf" + HEAD.encode() + b"jobs: [{name: a}]\n")
    assert recipe.load(tmp_path / "recipe.yaml").name == "r"


def vars_of(text: str) -> dict[str, Any]:
    loaded = recipe.parse(HEAD + f"vars: {text}\njobs: [{{name: a}}]\n", "recipe.yaml")
    return dict(loaded.vars)


@pytest.mark.parametrize("text,value", [
    ("on", "on"), ("no", "no"), ("y", "y"), ("Yes", "Yes"), ("off", "off"),
    ("true", True), ("False", False),
    ("16:9", "16:9"), ("1:30", "1:30"), ("1:30.5", "1:30.5"),
    ("2024-05-01", "2024-05-01"), ("2024-05-01 10:00:00", "2024-05-01 10:00:00"),
    ("0x1F", 31), ("1_000", 1000), ("-7", -7), (".5", 0.5), ("1.5e+3", 1500.0),
    ("~", None), ("null", None), ("'16:9'", "16:9"),
])
def test_scalars_follow_yaml_1_2_and_json(text: str, value: Any) -> None:
    assert vars_of(f"{{v: {text}}}") == {"v": value}
    assert type(vars_of(f"{{v: {text}}}")["v"]) is type(value)


def test_merge_keys_and_aliases_work() -> None:
    # keys written next to `<<` override merged ones: that is no duplicate
    loaded = recipe.parse(HEAD + "defaults: &base {model: flux-dev, width: 512}\njobs:\n"
                          "  - name: a\n    params: {<<: *base, width: 768}\n"
                          "    matrix: {x: &xs [1, 2], y: *xs}\n", "recipe.yaml")
    assert loaded.jobs[0].params == {"model": "flux-dev", "width": 768}
    assert [axis.rows for axis in loaded.jobs[0].matrix.axes] == [((1,), (2,)), ((1,), (2,))]


def test_merged_mappings_reused_through_aliases_hold_no_duplicates() -> None:
    value, _ = yamlsource.load(textwrap.dedent("""
        base: &a {x: 1, y: 2}
        mid: &b {<<: *a, y: 3, z: 4}
        top: {<<: [*b, *a], z: 5}
        again: *b
    """), "f.yaml")
    assert value == {"base": {"x": 1, "y": 2}, "mid": {"x": 1, "y": 3, "z": 4},
                     "top": {"x": 1, "y": 2, "z": 5}, "again": {"x": 1, "y": 3, "z": 4}}


def test_duplicate_keys_are_reported_with_every_other_problem() -> None:
    assert problems("""
        version: 1
        name: r
        nmae: x
        jobs:
          - name: a
            params: {width: 512, width: 768}
            replicates: 0
          - name: b
            replicates: -1
    """) == [
        "recipe.yaml:3:1: nmae: unknown key 'nmae' (did you mean 'name'?)",
        "recipe.yaml:6:26: jobs[0].params.width: duplicate key 'width'",
        "recipe.yaml:7:17: jobs[0].replicates: 0 is less than the minimum of 1",
        "recipe.yaml:9:17: jobs[1].replicates: -1 is less than the minimum of 1",
    ]


@pytest.mark.parametrize("value,message", [
    ("!!int abc", "jobs[0].prompt: YAML error: 'abc' is not a valid !!int value"),
    ("!!float x", "jobs[0].prompt: YAML error: 'x' is not a valid !!float value"),
    ("!!timestamp 2024-13-45", "jobs[0].prompt: YAML error: '2024-13-45' is not a valid "
     "!!timestamp value"),
    ("!!timestamp 2024-05-01", "jobs[0].prompt: YAML error: !!timestamp values are not "
     "supported; use a string"),
    ("!!binary aGk=", "jobs[0].prompt: YAML error: !!binary values are not supported; use a "
     "string"),
    ("!!python/object:os.system x", "jobs[0].prompt: YAML error: could not determine a "
     "constructor for the tag 'tag:yaml.org,2002:python/object:os.system'"),
    ('"x \\ud800"', "jobs[0].prompt: YAML error: 'x \\ud800' contains an unpaired surrogate, "
     "which is not a character"),
])
def test_values_no_request_could_carry_are_reported(value: str, message: str) -> None:
    assert problems(HEAD + f"jobs:\n  - name: a\n    prompt: {value}\n") == [
        f"recipe.yaml:5:13: {message}"]


@pytest.mark.parametrize("text,expected", [
    ("a: &x [*x]\n", "recipe.yaml:1:4: a[0]: YAML error: an alias refers to a collection that "
     "contains it"),
    ("a: &x {b: *x}\n", "recipe.yaml:1:4: a.b: YAML error: an alias refers to a collection that "
     "contains it"),
    ("a: {<<: 5}\n", "recipe.yaml:1:4: a: YAML error: expected a mapping or list of mappings for "
     "merging, but found scalar"),
    ("a: " + "[" * 5000 + "\n", "recipe.yaml: YAML error: the document is nested too deeply"),
])
def test_pathological_yaml_is_a_problem_not_a_crash(text: str, expected: str) -> None:
    assert expected in problems(text)


def test_aliases_that_expand_without_end_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yamlsource, "MAX_NODES", 5_000)
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    assert problems("\n".join(levels) + "\n") == [
        "recipe.yaml: YAML error: the document expands to more than 5,000 values (aliases?)"]


# -- values read from files -------------------------------------------------------------------


@pytest.mark.parametrize("name,content,message", [
    ("v.txt", "# nothing yet\n\n", "v.txt holds no values (only blank lines and comments)"),
    # YAML data files are read like the recipe itself: located, same tags, same limits
    ("v.yaml", "- !!int abc\n", "v.yaml:1:3: [0]: YAML error: 'abc' is not a valid !!int value"),
    ("v.yaml", "- !!binary aGk=\n", "v.yaml:1:3: [0]: YAML error: !!binary values are not "
     "supported; use a string"),
    ("v.yaml", "- &a [*a]\n", "v.yaml:1:3: [0][0]: YAML error: an alias refers to a collection "
     "that contains it"),
    ("v.json", '["\\ud800"]', "v.json holds values that are not JSON (bytes, dates, sets or "
     "unpaired surrogates)"),
])
def test_unusable_value_files_are_reported(tmp_path: Path, name: str, content: str,
                                           message: str) -> None:
    build_file_tree(tmp_path, {
        "recipe.yaml": HEAD + f"jobs:\n  - name: a\n    matrix: {{v: {{from: {name}}}}}\n",
        name: content,
    })
    with pytest.raises(RecipeError) as caught:
        recipe.load(tmp_path / "recipe.yaml")
    assert str(caught.value) == f"{tmp_path}/recipe.yaml:5:24: jobs[0].matrix.v.from: {message}"


def test_dates_and_ratios_in_value_files_stay_text(tmp_path: Path) -> None:
    build_file_tree(tmp_path, {
        "recipe.yaml": HEAD + "jobs:\n  - name: a\n    matrix: {v: {from: v.yaml}}\n",
        "v.yaml": "- 2024-05-01\n- 16:9\n- on\n",
    })
    axis, = recipe.load(tmp_path / "recipe.yaml").jobs[0].matrix.axes
    assert axis.rows == (("2024-05-01",), ("16:9",), ("on",))


# -- positions --------------------------------------------------------------------------------


@pytest.mark.parametrize("path,text", [
    (("jobs", 0, "params", "width"), "jobs[0].params.width"),
    (("vars", "my key"), "vars['my key']"),
    (("a-b", "c_d"), "a-b.c_d"),
    ((3,), "[3]"),
    ((), ""),
])
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert yamlsource.format_path(path) == text


def test_positions_fall_back_to_the_nearest_ancestor() -> None:
    _, positions = yamlsource.load("a:\n  b: [1, 2]\n", "f.yaml")
    assert positions.of(("a", "b", 1)) == (2, 10)
    assert positions.of(("a", "b", 7)) == (2, 6)
    assert positions.of(("a", "b"), key=True) == (2, 3)
    assert positions.of(("zzz",)) == (1, 1)
