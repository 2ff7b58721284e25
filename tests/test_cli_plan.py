"""`fluxbatch validate` and `fluxbatch plan` as a user sees them: exact output, exit codes,
every problem of a recipe in one run, never a traceback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import fluxbatch
from fluxbatch.main import main
from tests.helpers import build_file_tree

Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from tmp_path, so messages name `recipe.yaml` as a user would type it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- validate ---------------------------------------------------------------------------------

MANY_PROBLEMS = """
    version: 1
    name: many
    ouput: "{{ job }}.png"
    defaults:
      model: flux-pro-1.1
    jobs:
      - name: sizes
        prompt: "{{ subjct }} at dusk"
        matrix:
          subject: [owl, fox]
        params:
          width: 2000
          stepz: 3
      - name: wrong-types
        prompt: 5
        replicates: two
      - name: unknown-model
        prompt: x
        params:
          model: flux-pro-2
      - name: broken-template
        prompt: "{{ subject | slugify }}"
        matrix: {subject: [a]}
      - name: files
        prompt: "{{ light }} {{ a }} {{ b }}"
        matrix:
          light: {from: lights.txt}
          zip: {a: [1, 2], b: [1]}
      - name: escape
        prompt: x
        output: "../{{ job }}.png"
      - name: same-path
        prompt: "{{ n }}"
        matrix: {n: [1, 2]}
        output: same.png
      - name: dupes
        prompt: x
        params: {width: 512, width: 768}
      - name: sandbox
        prompt: "{{ ''.__class__ }}"
      - name: templated-height
        prompt: "{{ n }}"
        matrix: {n: [1, 2]}
        params: {height: "{{ 64 * n + 128 }}"}
      - name: syntax
        prompt: "{% for x in %}"
"""


def test_validate_reports_every_problem_sorted_by_position(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": MANY_PROBLEMS})
    assert run(capsys, "validate", "recipe.yaml") == (1, "", """\
recipe.yaml:3:1: ouput: unknown key 'ouput' (did you mean 'output'?)
recipe.yaml:8:13: jobs[0].prompt: undefined variable 'subjct' (did you mean 'subject'?)
recipe.yaml:12:14: jobs[0].params.width: 2000 is greater than the maximum of 1440
recipe.yaml:13:14: jobs[0].params.stepz: unknown parameter 'stepz' for flux-pro-1.1
recipe.yaml:15:13: jobs[1].prompt: 5 is not of type 'string'
recipe.yaml:16:17: jobs[1].replicates: 'two' is not of type 'integer'
recipe.yaml:20:14: jobs[2].params.model: unknown model 'flux-pro-2' (did you mean 'flux-2-pro'?)
recipe.yaml:22:13: jobs[3].prompt: template syntax error: unknown filter 'slugify' (did you mean \
'slug'?) (template line 1)
recipe.yaml:27:21: jobs[4].matrix.light.from: file not found: lights.txt (relative to .)
recipe.yaml:28:12: jobs[4].matrix.zip: zip lists must have the same length: a has 2, b has 1
recipe.yaml:31:13: jobs[5].output: output path '../escape.png' leaves the output root ('..') \
(for replicate=1)
recipe.yaml:35:13: jobs[6].output: two images would be written to 'same.png': same-path (n=1, \
replicate=1) and same-path (n=2, replicate=1); put the varying values in the output template
recipe.yaml:38:26: jobs[7].params.width: duplicate key 'width'
recipe.yaml:40:13: jobs[8].prompt: not allowed in a template: access to attribute '__class__' \
of 'str' object is unsafe (for replicate=1)
recipe.yaml:44:22: jobs[9].params.height: 192 is less than the minimum of 256 (for n=1, \
replicate=1)
recipe.yaml:46:13: jobs[10].prompt: template syntax error: Expected an expression, got 'end of \
statement block' (template line 1)
recipe.yaml: 16 problems
""")


# Each file has a structural (schema) problem in a job *and* semantic ones in the same job:
# all of them come in one run, and nothing follows from a value the schema refused.
MIXED_PROBLEMS = [
    pytest.param("""
        version: 1
        name: r
        defaults: {model: flux-pro-1.1}
        jobs:
          - name: owls
            promt: at dusk
            prompt: "{{ subjct }} at dusk"
            matrix: {subject: [owl, fox]}
            params: {width: 2000}
    """, """\
recipe.yaml:6:5: jobs[0].promt: unknown key 'promt' (did you mean 'prompt'?)
recipe.yaml:7:13: jobs[0].prompt: undefined variable 'subjct' (did you mean 'subject'?)
recipe.yaml:9:21: jobs[0].params.width: 2000 is greater than the maximum of 1440
recipe.yaml: 3 problems
""", id="unknown-key-width-and-undefined-variable"),
    pytest.param("""
        version: 1
        name: r
        defaults: {model: flux-dev}
        jobs:
          - prompt: "{{ n | slugify }}"
            matrix: {n: [1]}
            params: {stepz: 3}
          - name: b
            prompt: "{{ v }}"
            matrix: {v: [1, 2]}
            params: {height: "{{ 64 * v }}"}
    """, """\
recipe.yaml:5:5: jobs[0]: 'name' is a required key
recipe.yaml:5:13: jobs[0].prompt: template syntax error: unknown filter 'slugify' (did you \
mean 'slug'?) (template line 1)
recipe.yaml:7:21: jobs[0].params.stepz: unknown parameter 'stepz' for flux-dev (did you mean \
'steps'?)
recipe.yaml:11:22: jobs[1].params.height: 128 is less than the minimum of 256 (for v=2, \
replicate=1)
recipe.yaml:11:22: jobs[1].params.height: 64 is less than the minimum of 256 (for v=1, \
replicate=1)
recipe.yaml: 5 problems
""", id="no-name-syntax-error-and-unknown-parameter"),
    pytest.param("""
        version: 1
        name: r
        defaults: {model: flux-dev}
        jobs:
          - name: a
            prompt: "{{ colour }} {{ size }}"
            replicates: 0
            seed: random
            matrix: {color: [red], size: abc, exclude: [{colour: red}]}
            params: {guidance: 99}
    """, """\
recipe.yaml:6:13: jobs[0].prompt: undefined variable 'colour' (did you mean 'color'?)
recipe.yaml:7:17: jobs[0].replicates: 0 is less than the minimum of 1
recipe.yaml:8:11: jobs[0].seed: 'random' is not valid here: expected 'auto', an integer or a \
template string
recipe.yaml:9:34: jobs[0].matrix.size: 'abc' is not valid here: expected a list, a mapping with \
'from' or a mapping with 'files'
recipe.yaml:9:50: jobs[0].matrix.exclude[0].colour: exclude names 'colour', which is not a \
matrix variable (did you mean 'color'?)
recipe.yaml:10:24: jobs[0].params.guidance: 99.0 is greater than the maximum of 5
recipe.yaml: 6 problems
""", id="bad-values-and-a-misnamed-variable"),
    pytest.param("""
        version: 1
        name: r
        providr: bfl
        defaults: {model: flux-pro-2, width: 4000}
        jobs:
          - name: own-model
            prompt: "{{ x }}"
            params: {model: flux-dev}
          - name: default-model
            prompt: x
            params: {steps: 500}
    """, """\
recipe.yaml:3:1: providr: unknown key 'providr' (did you mean 'provider'?)
recipe.yaml:4:19: defaults.model: unknown model 'flux-pro-2' (did you mean 'flux-2-pro'?)
recipe.yaml:4:38: defaults.width: 4000 is greater than the maximum of 1440
recipe.yaml:7:13: jobs[0].prompt: undefined variable 'x'
recipe.yaml: 4 problems
""", id="bad-default-model-leaves-jobs-with-their-own"),
    pytest.param("""
        version: 1
        name: r
        vars: [acme]
        defaults: {model: flux-dev}
        jobs:
          - name: a
            prompt: "{{ brand }} {{ n }}"
            matrix: [1, 2]
            params: {width: 100}
          - 5
    """, """\
recipe.yaml:3:7: vars: ['acme'] is not of type 'object'
recipe.yaml:8:13: jobs[0].matrix: [1, 2] is not of type 'object'
recipe.yaml:9:21: jobs[0].params.width: 100 is less than the minimum of 256
recipe.yaml:10:5: jobs[1]: 5 is not of type 'object'
recipe.yaml: 4 problems
""", id="unknown-names-are-not-called-undefined"),
]


@pytest.mark.parametrize("content,expected", MIXED_PROBLEMS)
def test_validate_reports_structural_and_semantic_problems_in_one_run(
        workdir: Path, capsys: Capsys, content: str, expected: str) -> None:
    build_file_tree(workdir, {"recipe.yaml": content})
    assert run(capsys, "validate", "recipe.yaml") == (1, "", expected)


@pytest.mark.parametrize("content,expected", [
    (b"version: 1\nname: r\njobs: [\n  {name: a}\n",
     "recipe.yaml:5:1: YAML syntax error: expected ',' or ']', but got '<stream end>' (while "
     "parsing a flow sequence at line 3)\nrecipe.yaml: 1 problem\n"),
    (b"version: 1\nname: \xe9t\xe9\n",
     "recipe.yaml: not UTF-8 text (byte 17)\nrecipe.yaml: 1 problem\n"),
    (b"", "recipe.yaml: a recipe must be a mapping, but this document is empty\n"
     "recipe.yaml: 1 problem\n"),
    (b"- version: 1\n- name: r\n", "recipe.yaml:1:1: a recipe must be a mapping, but this "
     "document is a list\nrecipe.yaml: 1 problem\n"),
    (b"version: 1\nname: r\njobs:\n  - name: a\n    prompt: x\n    matrix: {a: [1, 2, 3]}\n"
     b"    replicates: 5000\ndefaults: {model: flux-dev}\n",
     "recipe.yaml: the plan has 15,000 images, more than the recipe's limit of 10,000 "
     "(max_jobs); pass --yes to go ahead, or raise max_jobs in the recipe\n"),
    (b"version: 1\nname: r\njobs:\n  - {name: a, prompt: x, params: {model: flux-dev}}\n"
     b"  - {name: b, prompt: x, params: {model: flux-dev}, replicates: 0}\nmax_jobs: 1\n",
     "recipe.yaml:5:65: jobs[1].replicates: 0 is less than the minimum of 1\n"
     "recipe.yaml: 1 problem\n"),
])
def test_validate_reports_unusable_files_in_one_line_each(
        workdir: Path, capsys: Capsys, content: bytes, expected: str) -> None:
    (workdir / "recipe.yaml").write_bytes(content)
    assert run(capsys, "validate", "recipe.yaml") == (1, "", expected)


def test_validate_names_a_missing_file(workdir: Path, capsys: Capsys) -> None:
    assert run(capsys, "validate", "nope.yaml") == (
        1, "", "nope.yaml: No such file or directory\nnope.yaml: 1 problem\n")


def test_validate_reports_the_size_with_the_other_problems(workdir: Path,
                                                           capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": """
        version: 1
        name: r
        defaults: {model: flux-dev}
        jobs:
          - {name: a, prompt: x, matrix: {n: {from: n.txt}, m: [1, 2]}, replicates: 6000}
    """})
    assert run(capsys, "validate", "recipe.yaml") == (1, "", """\
recipe.yaml: the plan has 12,000 images, more than the recipe's limit of 10,000 (max_jobs); \
pass --yes to go ahead, or raise max_jobs in the recipe
recipe.yaml:5:45: jobs[0].matrix.n.from: file not found: n.txt (relative to .)
recipe.yaml: 2 problems
""")


def test_validate_says_ok_with_the_count_and_models(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"a/recipe.yaml": """
        version: 1
        name: r
        defaults: {model: flux-dev}
        jobs:
          - {name: a, prompt: x, replicates: 3}
          - {name: b, prompt: x, params: {model: flux-2-pro}}
    """, "b/recipe.yaml": """
        version: 1
        name: r
        jobs: [{name: a, prompt: x, params: {model: flux-dev}}]
    """})
    assert run(capsys, "validate", "a/recipe.yaml", "b/recipe.yaml") == (
        0, "a/recipe.yaml: ok (4 images; flux-2-pro, flux-dev)\n"
           "b/recipe.yaml: ok (1 image; flux-dev)\n", "")


def test_validate_checks_every_recipe_even_after_a_bad_one(workdir: Path,
                                                           capsys: Capsys) -> None:
    build_file_tree(workdir, {
        "good.yaml": "version: 1\nname: r\njobs: [{name: a, prompt: x, "
                     "params: {model: flux-dev}}]\n",
        "bad.yaml": "version: 1\nname: r\njobs: [{name: a, prompt: x}]\n",
    })
    assert run(capsys, "validate", "bad.yaml", "good.yaml") == (
        1, "good.yaml: ok (1 image; flux-dev)\n",
        "bad.yaml:3:8: jobs[0].params: no model: set 'model' in defaults or params\n"
        "bad.yaml: 1 problem\n")


# -- plan -------------------------------------------------------------------------------------

SMALL = """
    version: 1
    name: small
    defaults: {model: flux-dev, width: 512, height: 512}
    jobs:
      - name: owls
        prompt: "{{ mood }} owl"
        matrix:
          mood: [calm, angry, sleepy]
          exclude: [{mood: angry}]
          include: [{mood: calm, hat: true}, {mood: wise}]
        params: {webhook_secret: s3cret}
      - name: fox
        prompt: "a fox"
        seed: 7
        params: {model: flux-2-pro, width: 1024, height: 1024}
"""


def test_plan_prints_a_table_and_a_summary(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    assert run(capsys, "plan", "small.yaml") == (0, """\
recipe small (small.yaml), provider bfl, output root .
JOB   VALUES              REP  MODEL             SEED  OUTPUT                STATE
owls  mood=calm hat=true    1  flux-dev    1263208043  owls/calm-true-1.jpg  new
owls  mood=sleepy           1  flux-dev    1626753431  owls/sleepy-1.jpg     new
owls  mood=wise             1  flux-dev    2109832090  owls/wise-1.jpg       new
fox   -                     1  flux-2-pro           7  fox/default-1.jpg     new

4 images: 4 new
MODEL       IMAGES  TO RENDER  EST. COST  PRICE SOURCE
flux-dev         3          3     $0.075  https://flux-1.ai (third party, unverified)
flux-2-pro       1          1     $0.031  black-forest-labs/skills:skills/bfl-api/SKILL.md@172fdcf
total            4          4      $0.11
""", "")
    assert sorted(p.name for p in workdir.iterdir()) == ["small.yaml"]  # nothing written


def test_plan_explain_names_the_rule_for_each_combination(workdir: Path,
                                                          capsys: Capsys) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    code, out, err = run(capsys, "plan", "small.yaml", "--explain")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split("↳ ")[1] for line in lines if "↳" in line] == [
        "product mood[0]; merged include[0]",
        "product mood[2]",
        "include[1]: new combination (fits no original one)",
        "no matrix: one combination",
    ]
    assert "removed: owls mood=angry (exclude[0])" in lines


def test_plan_explain_names_rows_and_zips(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": """
        version: 1
        name: r
        defaults: {model: flux-dev}
        jobs:
          - name: a
            prompt: "{{ shot }} {{ lens }} {{ light }} {{ x }}{{ y }}"
            matrix:
              rows: {from: shots.csv}
              light: [dawn]
              zip: {x: [1, 2], y: [3, 4]}
    """, "shots.csv": "shot,lens\nwide,24mm\nclose,85mm\n"})
    out = run(capsys, "plan", "recipe.yaml", "--explain")[1]
    assert [line.split("↳ ")[1] for line in out.splitlines() if "↳" in line] == [
        "product rows from shots.csv row 1 × light[0] × zip(x, y) row 1",
        "product rows from shots.csv row 1 × light[0] × zip(x, y) row 2",
        "product rows from shots.csv row 2 × light[0] × zip(x, y) row 1",
        "product rows from shots.csv row 2 × light[0] × zip(x, y) row 2",
    ]


def test_plan_json_is_the_documented_document(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    code, out, err = run(capsys, "plan", "small.yaml", "--json", "--explain")
    assert (code, err) == (0, "")

    def owl(vars_: dict[str, object], seed: int, key: str, output: str,
            explain: str) -> dict[str, object]:
        return {"job": "owls", "vars": vars_, "replicate": 1, "model": "flux-dev",
                "request": {"width": 512, "height": 512, "webhook_secret": "***",
                            "output_format": "jpeg", "prompt": f"{vars_['mood']} owl",
                            "seed": seed},
                "seed": seed, "key": key, "output": output, "state": "new", "changes": [],
                "explain": explain}

    assert json.loads(out) == {
        "recipe": {
            "name": "small", "path": "small.yaml",
            "sha256": hashlib.sha256((workdir / "small.yaml").read_bytes()).hexdigest(),
            "provider": "bfl", "output_root": ".", "spec_date": "2026-04-23",
        },
        "jobs": [
            owl({"mood": "calm", "hat": True}, 1263208043,
                "ddd54a2be76aa63b0ea5f01eda481b5b2beb8ca4c629ab096170a8dadc15219b",
                "owls/calm-true-1.jpg", "product mood[0]; merged include[0]"),
            owl({"mood": "sleepy"}, 1626753431,
                "8f9f872d4dce4019135479daf7b85b26b0c7d26cf71612aa1a9b901d60151e22",
                "owls/sleepy-1.jpg", "product mood[2]"),
            owl({"mood": "wise"}, 2109832090,
                "81be93bac7130b7061aa03f06c90eecbf060cfbae0de98eb85a61a81c2bcc35a",
                "owls/wise-1.jpg", "include[1]: new combination (fits no original one)"),
            {"job": "fox", "vars": {}, "replicate": 1, "model": "flux-2-pro",
             "request": {"width": 1024, "height": 1024, "output_format": "jpeg",
                         "prompt": "a fox", "seed": 7},
             "seed": 7, "key": "9d45b8b239aec387630511425cf21ff33d2c5c5c4172042205e58922510cb14b",
             "output": "fox/default-1.jpg", "state": "new", "changes": [],
             "explain": "no matrix: one combination"},
        ],
        "summary": {
            "jobs": 4, "to_render": 4, "states": {"new": 4},
            "models": {
                "flux-dev": {"jobs": 3, "to_render": 3, "estimated_usd": 0.075,
                             "price_source": "https://flux-1.ai (third party, unverified)"},
                "flux-2-pro": {"jobs": 1, "to_render": 1, "estimated_usd": 0.0307,
                               "price_source":
                                   "black-forest-labs/skills:skills/bfl-api/SKILL.md@172fdcf"},
            },
            "estimated_usd": 0.1057,
        },
        "removed": [{"job": "owls", "vars": {"mood": "angry"}, "explain": "exclude[0]"}],
    }


def test_plan_json_without_explain_has_exactly_the_job_keys(workdir: Path,
                                                            capsys: Capsys) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    document = json.loads(run(capsys, "plan", "small.yaml", "--json")[1])
    assert list(document) == ["recipe", "jobs", "summary"]
    assert [list(job) for job in document["jobs"]] == [
        ["job", "vars", "replicate", "model", "request", "seed", "key", "output", "state",
         "changes"]] * 4


def test_plan_out_is_relative_to_the_working_directory(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipes/small.yaml": SMALL})
    out = run(capsys, "plan", "recipes/small.yaml", "--out", "renders")[1]
    assert out.splitlines()[0] == (
        "recipe small (recipes/small.yaml), provider bfl, output root renders")


def test_plan_refuses_a_large_plan_unless_yes(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": """
        version: 1
        name: r
        max_jobs: 2
        defaults: {model: flux-dev}
        jobs: [{name: a, prompt: x, replicates: 3}]
    """})
    assert run(capsys, "plan", "recipe.yaml") == (
        1, "", "fluxbatch: recipe.yaml: the plan has 3 images, more than the recipe's limit of "
               "2 (max_jobs); pass --yes to go ahead, or raise max_jobs in the recipe\n")
    code, out, err = run(capsys, "plan", "recipe.yaml", "--yes")
    assert (code, err) == (0, "")
    assert "3 images: 3 new" in out


def test_plan_of_an_invalid_recipe_lists_its_problems(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": """
        version: 1
        name: r
        defaults: {model: flux-dev, width: 2000}
        jobs: [{name: a, prompt: x}]
    """})
    assert run(capsys, "plan", "recipe.yaml") == (
        1, "", "recipe.yaml:3:36: defaults.width: 2000 is greater than the maximum of 1440\n")


# -- plan --json layout, --jsonl, --only and --shard ------------------------------------------

ONE = """
    version: 1
    name: one
    defaults: {model: flux-dev}
    jobs:
      - {name: owl, prompt: "an owl", seed: 7, matrix: {mood: [calm, "é"], exclude: [{mood: "é"}]}}
"""


def test_plan_json_puts_each_job_on_a_line_of_its_own(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"one.yaml": ONE})
    sha256 = hashlib.sha256((workdir / "one.yaml").read_bytes()).hexdigest()
    assert run(capsys, "plan", "one.yaml", "--json", "--explain") == (0, f"""\
{{
  "recipe": {{"name": "one", "path": "one.yaml", "sha256": "{sha256}", "provider": "bfl", \
"output_root": ".", "spec_date": "2026-04-23"}},
  "jobs": [
    {{"job": "owl", "vars": {{"mood": "calm"}}, "replicate": 1, "model": "flux-dev", "request": \
{{"output_format": "jpeg", "prompt": "an owl", "seed": 7}}, "seed": 7, "key": \
"5dc9f87c95fa3d95f0ce0c6f13a9ddd605fde186b9e243a15736134d3d4e8fff", "output": \
"owl/calm-1.jpg", "state": "new", "changes": [], "explain": "product mood[0]"}}
  ],
  "summary": {{"jobs": 1, "to_render": 1, "states": {{"new": 1}}, "models": {{"flux-dev": \
{{"jobs": 1, "to_render": 1, "estimated_usd": 0.025, "price_source": "https://flux-1.ai (third \
party, unverified)"}}}}, "estimated_usd": 0.025}},
  "removed": [
    {{"job": "owl", "vars": {{"mood": "é"}}, "explain": "exclude[0]"}}
  ]
}}
""", "")


def jsonl_of(document: dict[str, Any]) -> str:
    """What `--jsonl` prints for the plan `--json` printed as `document`."""
    last = {key: value for key, value in document.items() if key != "jobs"}
    lines = [*document["jobs"], last]
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


@pytest.mark.parametrize("options", [(), ("--explain",), ("--only", "owls"),
                                     ("--shard", "2/2", "--explain")])
def test_plan_jsonl_prints_the_json_plans_jobs_a_line_each_then_the_rest(
        workdir: Path, capsys: Capsys, options: tuple[str, ...]) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    code, out, err = run(capsys, "plan", "small.yaml", "--json", *options)
    assert (code, err) == (0, "")
    assert run(capsys, "plan", "small.yaml", "--jsonl", *options) == (
        0, jsonl_of(json.loads(out)), "")


RENDERED = """
    version: 1
    name: shapes
    provider: emulator
    defaults: {model: flux-dev, width: 256, height: 256}
    jobs: [{name: s, prompt: "a {{ shape }}", matrix: {shape: [circle, square, star]}}]
"""


def test_plan_jsonl_reads_the_same_state_as_json(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": RENDERED})
    assert run(capsys, "render", "recipe.yaml", "-q")[0] == 0  # (in-process emulator)
    build_file_tree(workdir, {"recipe.yaml": RENDERED.replace(
        "[circle, square, star]", "[circle, star, moon]").replace('"a {{', '"one {{')})
    code, out, err = run(capsys, "plan", "recipe.yaml", "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert [job["state"] for job in document["jobs"]] == ["stale", "stale", "new"]
    assert document["summary"]["states"] == {"new": 1, "stale": 2, "orphaned": 1}
    assert run(capsys, "plan", "recipe.yaml", "--jsonl") == (0, jsonl_of(document), "")


def test_plan_says_what_changed_at_each_stale_image_as_status_does(
        workdir: Path, capsys: Capsys) -> None:
    """Under the row in the table (after `--explain`'s line), as a `changes` list in `--json`
    and `--jsonl` (empty for an image that is not stale), and under the row of `render
    --dry-run`: the same words as `status -v`, from the same function."""
    build_file_tree(workdir, {"recipe.yaml": RENDERED})
    assert run(capsys, "render", "recipe.yaml", "-q")[0] == 0  # (in-process emulator)
    build_file_tree(workdir, {"recipe.yaml": RENDERED.replace(
        "[circle, square, star]", "[circle, star, moon]").replace('"a {{', '"one {{').replace(
        "width: 256", "width: 320")})
    circle = 'prompt "a circle" → "one circle"; width 256 → 320'
    star = 'prompt "a star" → "one star"; width 256 → 320'

    assert run(capsys, "plan", "recipe.yaml", "--explain") == (0, f"""\
recipe shapes (recipe.yaml), provider emulator, output root .
JOB  VALUES        REP  MODEL           SEED  OUTPUT          STATE
s    shape=circle    1  flux-dev   847376755  s/circle-1.jpg  stale
  ↳ product shape[0]
  ↳ the request changed: {circle}
s    shape=star      1  flux-dev  1464709300  s/star-1.jpg    stale
  ↳ product shape[1]
  ↳ the request changed: {star}
s    shape=moon      1  flux-dev  1079670929  s/moon-1.jpg    new
  ↳ product shape[2]

3 images: 1 new, 2 stale; not counted: 1 orphaned, no longer in the recipe
MODEL     IMAGES  TO RENDER  EST. COST  PRICE SOURCE
flux-dev       3          3     $0.075  https://flux-1.ai (third party, unverified)
total          3          3     $0.075
""", "")
    out = run(capsys, "plan", "recipe.yaml")[1]
    assert out.splitlines()[2:6] == [
        "s    shape=circle    1  flux-dev   847376755  s/circle-1.jpg  stale",
        f"  ↳ the request changed: {circle}",
        "s    shape=star      1  flux-dev  1464709300  s/star-1.jpg    stale",
        f"  ↳ the request changed: {star}"]

    code, out, err = run(capsys, "plan", "recipe.yaml", "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert [job["changes"] for job in document["jobs"]] == [
        circle.split("; "), star.split("; "), []]
    assert run(capsys, "plan", "recipe.yaml", "--jsonl") == (0, jsonl_of(document), "")
    assert [job.changes for job in fluxbatch.plan(workdir / "recipe.yaml").jobs] == [
        tuple(circle.split("; ")), tuple(star.split("; ")), ()]
    assert run(capsys, "status", "recipe.yaml", "-v")[1].splitlines()[-4:-1] == [
        f"s    shape=circle  s/circle-1.jpg  stale     the request changed: {circle}",
        f"s    shape=star    s/star-1.jpg    stale     the request changed: {star}",
        "s    shape=moon    s/moon-1.jpg    new"]

    assert run(capsys, "render", "recipe.yaml", "--dry-run") == (0, f"""\
JOB  VALUES        REP  MODEL     OUTPUT          WOULD
s    shape=circle    1  flux-dev  s/circle-1.jpg  submit
  ↳ the request changed: {circle}
s    shape=star      1  flux-dev  s/star-1.jpg    submit
  ↳ the request changed: {star}
s    shape=moon      1  flux-dev  s/moon-1.jpg    submit
dry run: would submit 3 images (estimated $0.075), re-attach 0, skip 0 up to date; nothing was \
sent or written
""", "")


def test_plan_jsonl_streams_and_a_late_problem_ends_it_without_a_summary(
        workdir: Path, capsys: Capsys) -> None:
    count = 10_001  # a chunk of 10,000 is printed before the last image is made
    build_file_tree(workdir, {"recipe.yaml": f"""
        version: 1
        name: r
        defaults: {{model: flux-dev}}
        jobs:
          - name: a
            prompt: "{{{{ n }}}}"
            matrix: {{n: {list(range(count))}}}
            params: {{height: "{{{{ 256 if n < {count - 1} else 100 }}}}"}}
    """})
    code, out, err = run(capsys, "plan", "recipe.yaml", "--jsonl", "--yes")
    assert (code, err) == (1, "recipe.yaml:8:22: jobs[0].params.height: 100 is less than the "
                              f"minimum of 256 (for n={count - 1}, replicate=1)\n")
    lines = out.splitlines()
    assert len(lines) == 10_000
    assert [json.loads(lines[i])["vars"] for i in (0, -1)] == [{"n": 0}, {"n": 9999}]


def test_plan_jsonl_prints_nothing_for_a_recipe_with_a_problem(workdir: Path,
                                                               capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": """
        version: 1
        name: r
        defaults: {model: flux-dev}
        jobs:
          - {name: a, prompt: "{{ n }}", matrix: {n: [1, 2]}}
          - {name: b, prompt: "{{ nn }}"}
    """})
    assert run(capsys, "plan", "recipe.yaml", "--jsonl") == (
        1, "", "recipe.yaml:6:23: jobs[1].prompt: undefined variable 'nn'\n")


def test_plan_only_and_shard_select_what_render_would_and_cost_only_that(
        workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    assert run(capsys, "plan", "small.yaml", "--shard", "1/2") == (0, """\
recipe small (small.yaml), provider bfl, output root .
JOB   VALUES              REP  MODEL             SEED  OUTPUT                STATE
owls  mood=calm hat=true    1  flux-dev    1263208043  owls/calm-true-1.jpg  new
owls  mood=sleepy           1  flux-dev    1626753431  owls/sleepy-1.jpg     new
fox   -                     1  flux-2-pro           7  fox/default-1.jpg     new

3 images (of 4, selected by --shard 1/2): 3 new
MODEL       IMAGES  TO RENDER  EST. COST  PRICE SOURCE
flux-dev         2          2     $0.050  https://flux-1.ai (third party, unverified)
flux-2-pro       1          1     $0.031  black-forest-labs/skills:skills/bfl-api/SKILL.md@172fdcf
total            3          3     $0.081
""", "")
    code, out, err = run(capsys, "plan", "small.yaml", "--json", "--only", "mood=*s*",
                         "--only", "fox")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert [job["output"] for job in document["jobs"]] == ["owls/sleepy-1.jpg", "owls/wise-1.jpg",
                                                          "fox/default-1.jpg"]
    assert document["summary"] == {
        "jobs": 3, "to_render": 3, "states": {"new": 3},
        "models": {"flux-dev": {"jobs": 2, "to_render": 2, "estimated_usd": 0.05,
                                "price_source": "https://flux-1.ai (third party, unverified)"},
                   "flux-2-pro": {"jobs": 1, "to_render": 1, "estimated_usd": 0.0307,
                                  "price_source":
                                      "black-forest-labs/skills:skills/bfl-api/SKILL.md@172fdcf"}},
        "estimated_usd": 0.0807,
        "selection": {"only": ["mood=*s*", "fox"], "shard": None, "planned": 4}}


def test_plan_shards_partition_the_plan(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    everything = json.loads(run(capsys, "plan", "small.yaml", "--json")[1])["jobs"]
    shards = [json.loads(run(capsys, "plan", "small.yaml", "--json", "--shard", f"{i}/2")[1])
              for i in (1, 2)]
    assert sorted(job["key"] for shard in shards for job in shard["jobs"]) == \
        sorted(job["key"] for job in everything)
    assert [shard["summary"]["jobs"] for shard in shards] == [3, 1]


@pytest.mark.parametrize("form", ["--json", "--jsonl", "--explain"])
def test_plan_only_matching_nothing_is_an_error(workdir: Path, capsys: Capsys,
                                                form: str) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    assert run(capsys, "plan", "small.yaml", form, "--only", "mood=furious") == (
        1, "", "fluxbatch: --only mood=furious: no image matches: no mood is 'furious' (its "
               "values: 'calm', 'angry', 'sleepy', 'wise')\n")
    assert run(capsys, "plan", "small.yaml", form, "--only", "*.gif") == (
        1, "", "fluxbatch: --only *.gif: no image matches (give a job name, an output glob, "
               "or NAME=VALUE on a matrix value)\n")


@pytest.mark.parametrize("command", ["plan", "render"])
@pytest.mark.parametrize("shard,message", [
    ("0/2", "'0/2': I must be between 1 and N"),
    ("3/2", "'3/2': I must be between 1 and N"),
    ("x", "'x': expected I/N, like 2/4, or auto"),
    ("1/2/3", "'1/2/3': expected I/N, like 2/4, or auto"),
])
def test_a_bad_shard_is_a_usage_error(workdir: Path, capsys: Capsys, command: str, shard: str,
                                      message: str) -> None:
    build_file_tree(workdir, {"small.yaml": SMALL})
    code, out, err = run(capsys, command, "small.yaml", "--shard", shard)
    assert (code, out, err.splitlines()[-1]) == (
        2, "", f"fluxbatch {command}: error: argument --shard: {message}")


def test_help_says_what_images_jobs_and_tasks_are(capsys: Capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One word per meaning: images (what plans count), jobs (groups in a recipe), tasks
    (requests in flight); `-j/--jobs` keeps its name, and its help says it counts tasks."""
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.endswith("""
words:
  image  one picture the plan makes, at one output path (what plans count)
  job    a group of images in the recipe's `jobs:` list: a prompt over a matrix
  task   a request in flight at the provider (what `render -j/--jobs` caps)
""")

    def help_of(command: str) -> str:
        assert main([command, "--help"]) == 0
        return " ".join(capsys.readouterr().out.split())

    render = help_of("render")
    assert "-j N, --jobs N at most N tasks in flight at the provider at once (default: its " \
           "cap, 24); the name is historical: these are tasks, not recipe jobs" in render
    assert "--shard I/N|auto only shard I of N (a stable split of the images by key); auto: " \
        "from FLUXBATCH_SHARD=I/N, or a Kubernetes Indexed Job's JOB_COMPLETION_INDEX with " \
        "FLUXBATCH_SHARDS=N" in render
    for command in ("plan", "render", "status", "clean", "gallery", "merge"):
        assert "--yes accept a plan of more images than the recipe's max_jobs" in \
            help_of(command), command
    assert "--jsonl print one JSON object per image, then a summary line, as the images are " \
           "planned" in help_of("plan")


def test_a_yaml_null_is_shown_as_null_not_as_pythons_none(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": """
        version: 1
        name: r
        provider: emulator
        defaults: {model: flux-dev}
        jobs:
          - name: owls
            prompt: "an owl{% if hat %} in a {{ hat }}{% endif %}"
            matrix: {hat: [~, top hat], exclude: [{hat: top hat}]}
    """})
    code, out, err = run(capsys, "plan", "recipe.yaml", "--explain")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[2].startswith("owls  hat=null    1  flux-dev")
    assert "removed: owls hat=top hat (exclude[0])" in lines
    assert run(capsys, "render", "recipe.yaml", "--dry-run")[1].splitlines()[1].startswith(
        "owls  hat=null    1  flux-dev")


# -- matrix entries that match nothing, and one pass over a job's problems -------------------

RENAMED = """
    version: 1
    name: mugs
    provider: emulator
    defaults: {model: flux-dev}
    jobs:
      - name: mugs
        prompt: "{{ subject }} in {{ style }}"
        matrix:
          subject: [teapot, mug]
          style: [oil painting, watercolour]
          exclude:
            - {subject: mug, style: watercolor}
            - {subject: teapot, style: pastel}
"""


@pytest.mark.parametrize("command", [("validate",), ("plan", "--explain")])
def test_an_exclude_that_matches_no_combination_is_an_error(
        workdir: Path, capsys: Capsys, command: tuple[str, ...]) -> None:
    """A renamed value quietly disabled the exclude, and the excluded images were paid for."""
    build_file_tree(workdir, {"recipe.yaml": RENAMED})
    code, out, err = run(capsys, *command, "recipe.yaml")
    assert (code, out) == (1, "")
    assert err.splitlines()[:2] == [
        "recipe.yaml:12:11: jobs[0].matrix.exclude[0]: matches no combination, so it excludes "
        "nothing: style has no value 'watercolor' (did you mean 'watercolour'?)",
        "recipe.yaml:13:11: jobs[0].matrix.exclude[1]: matches no combination, so it excludes "
        "nothing: style has no value 'pastel' (its values: 'oil painting', 'watercolour')",
    ]


def test_an_exclude_of_values_that_never_meet_is_an_error(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": """
        version: 1
        name: pairs
        defaults: {model: flux-dev}
        jobs:
          - name: pets
            prompt: "{{ animal }}, {{ colour }}"
            matrix:
              zip: {animal: [cat, dog], colour: [black, brown]}
              exclude: [{animal: cat, colour: brown}]
    """})
    assert run(capsys, "validate", "recipe.yaml") == (1, "", (
        "recipe.yaml:9:17: jobs[0].matrix.exclude[0]: matches no combination, so it excludes "
        "nothing: no combination has animal 'cat' with colour 'brown'\n"
        "recipe.yaml: 1 problem\n"))


NEW_INCLUDE = RENAMED.replace("""
          exclude:
            - {subject: mug, style: watercolor}
            - {subject: teapot, style: pastel}
""", """
          include:
            - {style: watercolor, steps: 40}
""").replace("{{ subject }} in {{ style }}", "a teapot in {{ style }}")


def test_an_include_that_names_a_value_nowhere_is_noted_by_validate_and_plan_explain(
        workdir: Path, capsys: Capsys) -> None:
    """Such an entry adds a combination of its own, as GitHub's `fruit: banana` does on
    purpose; but it may be a typo, so validate says so, and plan --explain under it."""
    build_file_tree(workdir, {"recipe.yaml": NEW_INCLUDE})
    assert run(capsys, "validate", "recipe.yaml") == (0, "recipe.yaml: ok (5 images; flux-dev)\n", (
        "recipe.yaml:12:11: note: jobs[0].matrix.include[0]: fits no combination, so it adds "
        "one of its own: style has no value 'watercolor' (did you mean 'watercolour'?)\n"))
    code, out, err = run(capsys, "plan", "recipe.yaml", "--explain")
    assert (code, err) == (0, "")
    assert "  ↳ include[0]: new combination (fits no original one): style has no value " \
        "'watercolor' (did you mean 'watercolour'?)" in out.splitlines()


def test_a_template_failing_on_an_included_combination_names_the_entry(
        workdir: Path, capsys: Capsys) -> None:
    text = NEW_INCLUDE.replace("a teapot in", "{{ subject }} in")
    build_file_tree(workdir, {"recipe.yaml": text})
    assert run(capsys, "validate", "recipe.yaml") == (1, "", (
        "recipe.yaml:7:13: jobs[0].prompt: undefined variable 'subject' (for style=watercolor, "
        "steps=40, replicate=1; include[0] fits no combination, so it makes one of its own, "
        "without subject)\n"
        "recipe.yaml: 1 problem\n"))


TYPO_AND_SIZE = """
    version: 1
    name: chairs
    defaults: {model: flux-dev}
    jobs:
      - name: chairs
        prompt: "a {{ prodcut }} on white"
        matrix:
          product: [chair, stool]
          w: [1024]
        params:
          width: "{{ w + 7 }}"
          height: 5000
"""


def test_a_template_problem_does_not_hide_the_same_jobs_parameter_problems(
        workdir: Path, capsys: Capsys) -> None:
    """The typo was reported alone; fixing it revealed that 1031 is not a multiple of 32."""
    build_file_tree(workdir, {"recipe.yaml": TYPO_AND_SIZE})
    assert run(capsys, "validate", "recipe.yaml") == (1, "", (
        "recipe.yaml:6:13: jobs[0].prompt: undefined variable 'prodcut' (did you mean "
        "'product'?)\n"
        "recipe.yaml:11:14: jobs[0].params.width: 1031 is not a multiple of 32 (for "
        "product=chair, w=1024, replicate=1) and 1 more\n"
        "recipe.yaml:12:15: jobs[0].params.height: 5000 is greater than the maximum of 1440\n"
        "recipe.yaml: 3 problems\n"))


@pytest.mark.parametrize(("edit", "expected"), [
    pytest.param({"output": '"{{ product }}/{{ nope }}.png"', "prompt": '"a {{ product }}"'},
                 ["recipe.yaml:11:14: jobs[0].params.width: 1031 is not a multiple of 32 (for "
                  "product=chair, w=1024, replicate=1) and 1 more",
                  "recipe.yaml:12:13: jobs[0].output: undefined variable 'nope'"],
                 id="a broken output path"),
    pytest.param({"seed": '"{{ sed }}"', "output": '"../{{ product }}.png"'},
                 ["recipe.yaml:6:13: jobs[0].prompt: undefined variable 'prodcut' (did you "
                  "mean 'product'?)",
                  "recipe.yaml:11:14: jobs[0].params.width: 1031 is not a multiple of 32 (for "
                  "product=chair, w=1024, replicate=1) and 1 more",
                  "recipe.yaml:12:13: jobs[0].output: output path '../chair.png' leaves the "
                  "output root ('..') (for product=chair, w=1024, replicate=1)",
                  "recipe.yaml:12:13: jobs[0].output: output path '../stool.png' leaves the "
                  "output root ('..') (for product=stool, w=1024, replicate=1)",
                  "recipe.yaml:13:11: jobs[0].seed: undefined variable 'sed' (did you mean "
                  "'seed'?)"], id="a broken seed, and an output path that leaves the root"),
    pytest.param({"steps": '"{{ prompt | length }}"'},
                 ["recipe.yaml:6:13: jobs[0].prompt: undefined variable 'prodcut' (did you "
                  "mean 'product'?)",
                  "recipe.yaml:11:14: jobs[0].params.width: 1031 is not a multiple of 32 (for "
                  "product=chair, w=1024, replicate=1) and 1 more"],
                 id="a parameter that reads the broken prompt is left out"),
])
def test_a_broken_template_leaves_out_only_what_depends_on_it(
        workdir: Path, capsys: Capsys, edit: dict[str, str], expected: list[str]) -> None:
    text = TYPO_AND_SIZE.replace("          height: 5000\n", "")
    if "prompt" in edit:
        text = text.replace('"a {{ prodcut }} on white"', edit["prompt"])
    if "steps" in edit:
        text += f"          steps: {edit['steps']}\n"
    for key in ("output", "seed"):
        if key in edit:
            text += f"        {key}: {edit[key]}\n"
    build_file_tree(workdir, {"recipe.yaml": text})
    code, out, err = run(capsys, "validate", "recipe.yaml")
    assert (code, out) == (1, "")
    assert err.splitlines() == [*expected, f"recipe.yaml: {len(expected)} problems"]


# -- object values, shown and selected by their label ---------------------------------------

CATALOGUE = """
    version: 1
    name: catalogue
    defaults: {model: flux-dev, output_format: png}
    output: "{{ product }}-{{ aspect.w }}x{{ aspect.h }}.{{ ext }}"
    jobs:
      - name: shots
        prompt: "a {{ product }} on white"
        matrix:
          product: [chair, stool]
          aspect:
            - {name: square, w: 1024, h: 1024}
            - {label: portrait 9:16, name: tall, w: 768, h: 1344}
            - {w: 1344, h: 768}
        params:
          width: "{{ aspect.w }}"
          height: "{{ aspect.h }}"
"""


def test_plan_shows_an_object_value_by_its_label_or_name(workdir: Path, capsys: Capsys) -> None:
    """The VALUES column read `aspect={"name": "square", "w": 1024,…`: lines of 250 columns."""
    build_file_tree(workdir, {"recipe.yaml": CATALOGUE})
    code, out, err = run(capsys, "plan", "recipe.yaml")
    assert (code, err) == (0, "")
    values = [line.split("  ")[1] for line in out.splitlines()[2:8]]
    assert values == [
        "product=chair aspect=square", "product=chair aspect=portrait 9:16",
        'product=chair aspect={"w": 1344, "h": 768}', "product=stool aspect=square",
        "product=stool aspect=portrait 9:16", 'product=stool aspect={"w": 1344, "h": 768}']


def test_only_selects_an_object_value_by_its_label(workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": CATALOGUE})
    code, out, err = run(capsys, "plan", "recipe.yaml", "--json", "--only", "aspect=portrait*",
                         "--only", "aspect=square")
    assert (code, err) == (0, "")
    assert [job["output"] for job in json.loads(out)["jobs"]] == [
        "chair-1024x1024.png", "chair-768x1344.png", "stool-1024x1024.png",
        "stool-768x1344.png"]
    code, out, err = run(capsys, "plan", "recipe.yaml", "--json", "--only",
                         'aspect={"w": 1344, "h": 768}')  # (no label: as shown)
    assert (code, err) == (0, "")
    assert [job["output"] for job in json.loads(out)["jobs"]] == [
        "chair-1344x768.png", "stool-1344x768.png"]


@pytest.mark.parametrize(("pattern", "hint"), [
    ("prodcut=chair", "'prodcut' is not a matrix variable (did you mean 'product'?)"),
    ("aspect=sqaure", "no aspect is 'sqaure' (did you mean 'square'?)"),
    ("shot", "no job is named 'shot' (did you mean 'shots'?)"),
])
@pytest.mark.parametrize("command", ["plan", "render"])
def test_only_that_names_nothing_says_what_was_meant(
        workdir: Path, capsys: Capsys, pattern: str, hint: str, command: str) -> None:
    build_file_tree(workdir, {"recipe.yaml": CATALOGUE})
    assert run(capsys, command, "recipe.yaml", "--only", pattern) == (
        1, "", f"fluxbatch: --only {pattern}: no image matches: {hint}\n")


def test_a_label_that_is_not_text_or_a_number_is_a_located_problem(
        workdir: Path, capsys: Capsys) -> None:
    build_file_tree(workdir, {"recipe.yaml": CATALOGUE.replace("{w: 1344", "{label: [x], w: 1344")})
    assert run(capsys, "validate", "recipe.yaml") == (1, "", (
        "recipe.yaml:13:19: jobs[0].matrix.aspect[2].label: ['x'] is not of type 'string', "
        "'number'\n"
        "recipe.yaml: 1 problem\n"))
