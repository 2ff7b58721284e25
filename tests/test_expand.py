"""Expansion: requests, seeds, keys and output paths of each image, and the problems that stop
a plan. Matrix rules themselves are covered in test_matrix.py."""

from __future__ import annotations

import hashlib
import itertools
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxbatch import identity, models, recipe
from fluxbatch.errors import PlanTooLargeError, RecipeError
from fluxbatch.expand import Job, Plan, expand
from fluxbatch.front import load_plan
from fluxbatch.inputs import InputFile
from tests.helpers import build_file_tree, examples

HEAD = "version: 1\nname: r\ndefaults: {model: flux-dev}\n"


def recipe_text(jobs: str, head: str = HEAD) -> str:
    return head + "jobs:\n" + textwrap.indent(textwrap.dedent(jobs).strip("\n"), "  ") + "\n"


def plan_of(jobs: str, head: str = HEAD, *, yes: bool = False) -> Plan:
    return expand(recipe.parse(recipe_text(jobs, head), "recipe.yaml", strict=False), yes=yes)


def problems_of(jobs: str, head: str = HEAD) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        plan_of(jobs, head)
    return str(caught.value).splitlines()


def single(jobs: str, head: str = HEAD) -> Job:
    (job,) = plan_of(jobs, head).jobs
    return job


# -- requests ---------------------------------------------------------------------------------


def test_request_holds_defaults_params_prompt_and_seed() -> None:
    job = single("""
        - name: owl
          prompt: "{{ animal | article }} at dusk"
          matrix: {animal: [owl]}
          params: {width: 768, height: 512, guidance: 3}
          seed: 7
    """)
    assert job.model == "flux-dev"
    assert job.request == {"width": 768, "height": 512, "guidance": 3.0,
                           "output_format": "jpeg", "prompt": "an owl at dusk", "seed": 7}
    assert job.output == "owl/owl-1.jpg"


@pytest.mark.parametrize("param,template,value", [
    ("steps", "{{ 3 * 2 }}", 6),
    ("steps", "{{ n + 0.0 }}", 4),
    ("guidance", "{{ n - 1 }}", 3.0),
    ("guidance", "{{ n / 2 }}", 2.0),
    ("prompt_upsampling", "{{ n > 3 }}", True),
    ("output_format", "{{ 'png' }}", "png"),
    ("steps", "{{ none }}", None),
])
def test_parameter_templates_take_the_schema_type(param: str, template: str, value: Any) -> None:
    job = single(f"""
        - name: j
          prompt: x
          matrix: {{n: [4]}}
          params: {{{param}: "{template}"}}
    """)
    assert job.request[param] == value
    assert type(job.request[param]) is type(value)


def test_constant_and_templated_numbers_give_the_same_key() -> None:
    constant = single("- {name: j, prompt: x, seed: 1, params: {guidance: 3, steps: 20.0}}")
    templated = single("- {name: j, prompt: x, seed: 1, "
                       "params: {guidance: '{{ 3 }}', steps: '{{ 20 }}'}}")
    assert constant.request == templated.request
    assert constant.key == templated.key


def test_model_may_be_a_template_per_combination() -> None:
    jobs = plan_of("""
        - name: j
          prompt: x
          matrix: {m: [flux-dev, flux-pro-1.1]}
          params: {model: "{{ m }}"}
    """).jobs
    assert [(job.model, job.output) for job in jobs] == [
        ("flux-dev", "j/flux-dev-1.jpg"), ("flux-pro-1.1", "j/flux-pro-1-1-1.jpg")]


def test_default_output_format_and_extension_come_from_the_model() -> None:
    job = single("- {name: j, prompt: x, params: {model: flux-kontext-pro}}")
    assert job.request["output_format"] == "png"
    assert job.output == "j/default-1.png"


# -- seeds ------------------------------------------------------------------------------------


MATRIX_JOBS = """
    - name: a
      prompt: "{{ animal }} {{ light }}"
      matrix:
        animal: [owl, fox, 3]
        light: [dawn, {kind: neon, hue: 300}]
        include: [{animal: fox, extra: yes}, {animal: crow, light: dusk}]
      replicates: 2
    - name: b
      prompt: "{{ n }}"
      matrix: {zip: {n: [1, 2], m: [x, y]}}
      params: {output_format: "{{ 'png' if n == 1 else 'webp' }}"}
"""


def test_auto_seeds_are_identity_auto_seed_and_in_range() -> None:
    plan = plan_of(MATRIX_JOBS)
    assert len(plan.jobs) == 16
    for job in plan.jobs:
        assert job.seed == identity.auto_seed("r", job.job, job.vars, job.replicate)
        assert 0 <= job.seed <= 2**31 - 1
        assert job.request["seed"] == job.seed
    assert len({job.seed for job in plan.jobs}) == 16


def documented_auto_seed(recipe_name: str, job_name: str, combination: dict[str, Any],
                         replicate: int) -> int:
    """`identity.auto_seed` as its docstring defines it, the slow and obvious way."""
    values = {k: v.identity if isinstance(v, InputFile) else v for k, v in combination.items()}
    text = identity.canonical_json([recipe_name, job_name, values, replicate])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 2**31


_SCALARS = st.one_of(st.text(), st.integers(), st.floats(), st.booleans(), st.none(),
                     st.builds(InputFile, st.text(min_size=1), st.text("0123456789abcdef",
                                                                    min_size=64, max_size=64)))
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3),
                    st.dictionaries(st.text(), _SCALARS, max_size=3))
_COMBINATIONS = st.dictionaries(st.text(), _VALUES, max_size=4)


@settings(max_examples=examples(200), deadline=None)
@given(st.text(), st.text(), st.lists(st.tuples(_COMBINATIONS, st.integers(1, 10**6)),
                                      min_size=1, max_size=6))
def test_auto_seed_is_its_documented_definition(recipe_name: str, job_name: str,
                                                images: list[tuple[dict[str, Any], int]]) -> None:
    """The planner's `AutoSeeds` (a combination's JSON shared by its replicates) and
    `identity.auto_seed` give the seed the docstring defines, for any values."""
    seeds = identity.AutoSeeds(recipe_name, job_name)
    for combination, replicate in [*images, *images[::-1]]:  # (each combination again)
        for _ in range(2):  # (its replicates: the same mapping, called again)
            expected = documented_auto_seed(recipe_name, job_name, combination, replicate)
            assert seeds(combination, replicate) == expected
            assert identity.auto_seed(recipe_name, job_name, combination, replicate) == expected
            replicate += 1


def test_keys_are_identity_job_key() -> None:
    for job in plan_of(MATRIX_JOBS).jobs:
        assert job.key == identity.job_key(job.model, job.request)


def test_templated_output_format_keys_each_image_by_its_own_format() -> None:
    jobs = plan_of("""
        - name: j
          prompt: x
          seed: 1
          matrix: {fmt: [png, webp, jpeg]}
          params: {output_format: "{{ fmt }}"}
    """).jobs
    assert [job.output for job in jobs] == ["j/png-1.png", "j/webp-1.webp", "j/jpeg-1.jpg"]
    assert [job.key for job in jobs] == [identity.job_key(job.model, job.request) for job in jobs]
    assert len({job.key for job in jobs}) == 3


def test_seed_may_be_an_integer_or_a_template() -> None:
    jobs = plan_of("""
        - {name: fixed, prompt: x, seed: 42, replicates: 2}
        - {name: templated, prompt: x, seed: "{{ n * 1000 + replicate }}", matrix: {n: [1, 2]}}
    """).jobs
    assert [job.seed for job in jobs] == [42, 42, 1001, 2001]


def test_renaming_the_recipe_or_job_changes_auto_seeds() -> None:
    base = single("- {name: j, prompt: x}").seed
    assert single("- {name: k, prompt: x}").seed != base
    assert single("- {name: j, prompt: x}", HEAD.replace("name: r", "name: r2")).seed != base


def identities(values_a: list[Any], values_b: list[Any]) -> dict[tuple[str, str, int], Any]:
    jobs = f"""
        - name: j
          prompt: "{{{{ a }}}} {{{{ b }}}}"
          matrix: {{a: {yaml.safe_dump(values_a, default_flow_style=True).strip()},
                    b: {yaml.safe_dump(values_b, default_flow_style=True).strip()}}}
          replicates: 2
    """
    return {(repr(job.vars["a"]), repr(job.vars["b"]), job.replicate): (job.seed, job.key,
                                                                         job.output)
            for job in plan_of(jobs).jobs}


distinct_values = st.lists(
    st.integers(0, 50).map(lambda n: n if n % 2 else f"v{n}"), min_size=1, max_size=5,
    unique_by=str)


@settings(max_examples=examples(40), deadline=None)
@given(distinct_values, distinct_values, st.data())
def test_changing_matrix_values_never_changes_other_images(
        values_a: list[Any], values_b: list[Any], data: st.DataObject) -> None:
    before = identities(values_a, values_b)
    changed_a = data.draw(st.permutations([*values_a, f"new{len(values_a)}"]).map(
        lambda v: v[:len(v) - data.draw(st.integers(0, len(v) - 1))]))
    changed_b = data.draw(st.permutations(values_b))
    after = identities(changed_a, changed_b)
    shared = before.keys() & after.keys()
    assert shared == {k for k in after if k[0] != repr(f"new{len(values_a)}")}
    for image in shared:
        assert after[image] == before[image]


# -- canonical JSON, fast and slow ------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)
field_names = st.text(max_size=6)


@settings(max_examples=examples(200), deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=5),
       st.lists(st.dictionaries(field_names, json_values, max_size=5), min_size=1, max_size=4))
def test_object_json_is_canonical_json(constants: dict[str, Any],
                                       runs: list[dict[str, Any]]) -> None:
    encode = identity.ObjectJson(constants)
    for varying in runs:
        mapping = {**{k: v for k, v in varying.items() if k not in constants}, **constants}
        assert encode(mapping) == identity.canonical_json(mapping)


@settings(max_examples=examples(200), deadline=None)
@given(st.sampled_from(["flux-dev", "flux-2-pro", "ünïcode"]),
       st.dictionaries(field_names, scalars, max_size=4),
       st.lists(st.dictionaries(field_names, json_values, max_size=4), min_size=1, max_size=4),
       st.sampled_from([{}, {"webhook_url": "https://h/1"}, {"webhook_secret": "s"}]))
def test_key_hasher_is_job_key(model: str, constants: dict[str, Any],
                               runs: list[dict[str, Any]], webhooks: dict[str, str]) -> None:
    hasher = identity.KeyHasher(model, constants)
    for varying in runs:
        request = {**{k: v for k, v in varying.items() if k not in constants}, **constants,
                   **webhooks}
        assert hasher(request) == identity.job_key(model, request)


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert identity.canonical_json({"b": [1, 2.5, None], "a": "é", "c": True}) == \
        '{"a":"é","b":[1,2.5,null],"c":true}'


# -- job keys ---------------------------------------------------------------------------------

KEYED = """
    - name: j
      prompt: "{prompt}"
      seed: {seed}
      params: {{model: {model}, width: {width}, height: {height}, steps: {steps},
               guidance: {guidance}, safety_tolerance: {safety_tolerance},
               output_format: {output_format}, prompt_upsampling: {prompt_upsampling},
               webhook_url: "{webhook_url}", webhook_secret: "{webhook_secret}"}}
"""
BASE = {"prompt": "an owl", "seed": 1, "model": "flux-dev", "width": 1024, "height": 768,
        "steps": 28, "guidance": 3.5, "safety_tolerance": 2, "output_format": "jpeg",
        "prompt_upsampling": "false", "webhook_url": "https://example.com/hook",
        "webhook_secret": "s3cret"}


def key_with(**changes: Any) -> str:
    return single(KEYED.format(**{**BASE, **changes})).key


@pytest.mark.parametrize("change", [
    {"webhook_url": "https://example.com/other"},
    {"webhook_secret": "another"},
    {"webhook_url": "https://example.com/other", "webhook_secret": "another"},
])
def test_changing_a_webhook_keeps_the_key(change: dict[str, str]) -> None:
    assert key_with(**change) == key_with()


@pytest.mark.parametrize("change", [
    {"prompt": "an owl!"}, {"seed": 2}, {"model": "flux-2-flex"}, {"width": 1056},
    {"height": 800}, {"steps": 30}, {"guidance": 3.6}, {"safety_tolerance": 3},
    {"output_format": "png"}, {"prompt_upsampling": "true"},
], ids=lambda change: next(iter(change)))
def test_changing_what_makes_the_pixels_changes_the_key(change: dict[str, Any]) -> None:
    assert key_with(**change) != key_with()


# -- output paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("output,expected", [
    ("{{ n }}//x.png", "1/x.png"),
    ("./{{ n }}/x.png", "1/x.png"),
    ("a/./{{ n }}.png", "a/1.png"),
    ("a\\{{ n }}.png", "a/1.png"),
    ("{{ job }}/{{ n | pad }}.{{ ext }}", "j/001.jpg"),
])
def test_output_paths_are_normalised(output: str, expected: str) -> None:
    job = single(f"""
        - name: j
          prompt: x
          matrix: {{n: [1]}}
          output: '{output}'
    """)
    assert job.output == expected


@pytest.mark.parametrize("output,message", [
    ("../{{ n }}.png", "output path '../1.png' leaves the output root ('..')"),
    ("a/../../{{ n }}.png", "output path 'a/../../1.png' leaves the output root ('..')"),
    ("/tmp/{{ n }}.png", "output path '/tmp/1.png' is absolute; it must be relative to the "
     "output root"),
    ("C:/{{ n }}.png", "output path 'C:/1.png' is absolute; it must be relative to the "
     "output root"),
    ("..\\{{ n }}.png", "output path '..\\\\1.png' leaves the output root ('..')"),
    ("{{ n }}/", "output path '1/' names a directory, not a file"),
    ("{{ n }}/.", "output path '1/.' names a directory, not a file"),
    ('{{ "" }}', "the output path is empty"),
])
def test_output_paths_may_not_leave_the_root(output: str, message: str) -> None:
    assert problems_of(f"""
        - name: j
          prompt: x
          matrix: {{n: [1]}}
          output: '{output}'
    """) == [f"recipe.yaml:8:13: jobs[0].output: {message} (for n=1, replicate=1)"]


def test_two_jobs_writing_one_path_name_both() -> None:
    assert problems_of("""
        - {name: a, prompt: x, output: same.png}
        - {name: b, prompt: y, output: same.png, matrix: {n: [1]}}
    """) == ["recipe.yaml:6:34: jobs[1].output: two images would be written to 'same.png': a "
             "(replicate=1) and b (n=1, replicate=1); put the varying values in the output "
             "template"]


def test_paths_differing_only_in_case_clash() -> None:
    assert problems_of("""
        - name: a
          prompt: x
          matrix: {n: [Owl, owl]}
          output: "{{ n }}.png"
    """) == ["recipe.yaml:8:13: jobs[0].output: two images would be written to 'owl.png': a "
             "(n=Owl, replicate=1) and a (n=owl, replicate=1); their n values ('Owl' and "
             "'owl') differ only in case, which macOS and Windows ignore: put something else "
             "that varies in the output template"]


@pytest.mark.parametrize(("values", "output", "message"), [
    ('["🐱", "🐶"]', "{{ n | slug }}.png",
     "two images would be written to 'x.png': a (n=🐱, replicate=1) and a (n=🐶, "
     "replicate=1); their n values ('🐱' and '🐶') are alike once slugged ('x'): add "
     "`{{ n | hash }}` to the output template"),
    ("[" + "a" * 252 + "]", "{{ n }}.png",
     "output path '" + "a" * 59 + "…' has a name of 256 bytes, over the file system's limit "
     "of 255 for one file or folder name; shorten what the output template puts in it "
     "(`{{ value | hash }}` is 8 characters) (for n=" + "a" * 39 + "…, replicate=1)"),
    ('["' + "é" * 127 + '"]', "{{ n }}.png",
     "output path '" + "é" * 59 + "…' has a name of 258 bytes, over the file system's limit "
     "of 255 for one file or folder name; shorten what the output template puts in it "
     "(`{{ value | hash }}` is 8 characters) (for n=" + "é" * 39 + "…, replicate=1)"),
])
def test_outputs_the_disk_would_refuse_are_caught_by_validate(
        values: str, output: str, message: str) -> None:
    assert problems_of(f"""
        - name: a
          prompt: x
          matrix: {{n: {values}}}
          output: "{output}"
    """) == [f"recipe.yaml:8:13: jobs[0].output: {message}"]


def test_replicates_without_replicate_in_the_output_clash() -> None:
    assert problems_of("""
        - {name: a, prompt: x, replicates: 3, output: "{{ job }}.png"}
    """) == ["recipe.yaml:5:49: jobs[0].output: two images would be written to 'a.png': a "
             "(replicate=1) and a (replicate=2); put the varying values in the output "
             "template and 1 more"]


def write_recipe(root: Path, body: str, **files: str) -> Path:
    build_file_tree(root, {"recipe.yaml": recipe_text(body), **files})
    return root / "recipe.yaml"


def test_output_paths_through_a_symlink_out_of_the_root_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    path = write_recipe(tmp_path / "r", """
        - {name: a, prompt: x, output: link/a.png}
        - {name: b, prompt: x, output: file.png}
        - {name: c, prompt: x, output: inside/c.png}
    """)
    (tmp_path / "r" / "link").symlink_to(outside)
    (tmp_path / "r" / "file.png").symlink_to(outside / "file.png")
    (tmp_path / "r" / "inside").symlink_to(tmp_path / "r" / "sub", target_is_directory=True)
    with pytest.raises(RecipeError) as caught:
        load_plan(str(path))
    assert str(caught.value).replace(str(tmp_path), "T").splitlines() == [
        "T/r/recipe.yaml:5:34: jobs[0].output: output path 'link/a.png' leaves the output root "
        "through a symbolic link",
        "T/r/recipe.yaml:6:34: jobs[1].output: output path 'file.png' leaves the output root "
        "through a symbolic link",
    ]


# -- output root ------------------------------------------------------------------------------


def test_output_root_defaults_to_the_recipe_directory(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "- {name: a, prompt: x}")
    assert recipe.load(path).output_root == tmp_path


def test_output_root_key_is_relative_to_the_recipe(tmp_path: Path) -> None:
    # (a git work tree around the recipe's folder, so `..` stays inside its project)
    build_file_tree(tmp_path, {".git/HEAD": "ref: refs/heads/main\n", "r/recipe.yaml": recipe_text(
        "- {name: a, prompt: x}", HEAD + "output_root: ../renders\n")})
    assert recipe.load(tmp_path / "r" / "recipe.yaml").output_root == \
        tmp_path / "r" / ".." / "renders"


def test_out_option_is_relative_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_file_tree(tmp_path, {"r/recipe.yaml": recipe_text(
        "- {name: a, prompt: x}", HEAD + "output_root: ignored\n")})
    monkeypatch.chdir(tmp_path)
    loaded = recipe.load("r/recipe.yaml", output_root="out")
    assert loaded.output_root == Path("out")
    assert os.path.abspath(loaded.output_root) == str(tmp_path / "out")


# -- the size guard ---------------------------------------------------------------------------


def big_matrix(count_a: int, count_b: int, head: str = HEAD) -> str:
    return recipe_text(f"""
        - name: a
          prompt: "{{{{ a }}}} {{{{ b }}}}"
          matrix: {{a: {list(range(count_a))}, b: {list(range(count_b))}}}
    """, head)


def test_plan_over_the_default_cap_is_refused_with_its_size() -> None:
    parsed = recipe.parse(big_matrix(101, 100), "recipe.yaml")
    with pytest.raises(PlanTooLargeError) as caught:
        expand(parsed)
    assert str(caught.value) == (
        "recipe.yaml: the plan has 10,100 images, more than the recipe's limit of 10,000 "
        "(max_jobs); pass --yes to go ahead, or raise max_jobs in the recipe")
    assert len(expand(parsed, yes=True).jobs) == 10_100


def test_exclusions_count_before_the_guard_refuses() -> None:
    text = big_matrix(101, 100).replace("b: [0,", "exclude: [{a: 0}], b: [0,")
    assert len(expand(recipe.parse(text, "recipe.yaml")).jobs) == 10_000


def test_enormous_plan_is_refused_without_being_enumerated() -> None:
    with pytest.raises(PlanTooLargeError) as caught:
        expand(recipe.parse(big_matrix(2000, 1000), "recipe.yaml"))
    assert "the plan has up to 2,000,000 images, more than the recipe's limit of 10,000 " \
        "(max_jobs)" in str(caught.value)


def test_max_jobs_sets_the_cap() -> None:
    parsed = recipe.parse(big_matrix(2, 3, HEAD + "max_jobs: 5\n"), "recipe.yaml")
    with pytest.raises(PlanTooLargeError) as caught:
        expand(parsed)
    assert "the plan has 6 images, more than the recipe's limit of 5" in str(caught.value)


def test_a_recipe_cannot_raise_its_own_cap_past_the_ceiling() -> None:
    """A hundred million images would fill the memory of the machine that plans them; a
    recipe from a pull request may not decide that, only the operator (`--yes`)."""
    text = big_matrix(10000, 10000, HEAD + "max_jobs: 1000000000\n")
    with pytest.raises(PlanTooLargeError) as caught:
        expand(recipe.parse(text, "recipe.yaml"))
    assert str(caught.value) == (
        "recipe.yaml: the plan has up to 100,000,000 images, more than the 100,000 that a "
        "recipe's max_jobs may allow; pass --yes on the command line to go ahead")
    within = recipe.parse(big_matrix(400, 250, HEAD + "max_jobs: 1000000000\n"), "recipe.yaml")
    assert len(expand(within).jobs) == 100_000


def test_size_is_reported_with_the_recipes_other_problems(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, """
        - name: a
          prompt: "{{ a }}"
          matrix: {a: {from: missing.txt}, b: [1, 2, 3]}
          replicates: 5
    """)
    text = path.read_text().replace("defaults:", "max_jobs: 10\ndefaults:")
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_plan(str(path))
    assert str(caught.value).replace(str(tmp_path), "T").splitlines() == [
        "T/recipe.yaml: the plan has 15 images, more than the recipe's limit of 10 (max_jobs); "
        "pass --yes to go ahead, or raise max_jobs in the recipe",
        "T/recipe.yaml:8:24: jobs[0].matrix.a.from: file not found: missing.txt (relative to T)",
    ]


# -- problems found while expanding -----------------------------------------------------------


def test_job_level_problems_are_all_reported() -> None:
    assert problems_of("""
        - name: a
          prompt: "{{ shape }}"
          matrix: {shape: [cube, ball], exclude: [{shape: cube}, {shape: ball}]}
        - name: b
          prompt: "{{ job }}"
          matrix: {seed: [1], key: [2]}
        - name: c
          params: {model: flux-kontext-pro}
        - name: d
          prompt: x
          params: {prompt: y, seed: 3}
        - name: e
          prompt: x
          params: {model: "{{ m }}"}
          matrix: {m: [flux-dev, flux-dve]}
        - name: f
          prompt: x
          seed: "{{ n - 5 }}"
          matrix: {n: [1, 9]}
        - name: g
          prompt: x
          params: {width: "{{ w }}"}
          matrix: {w: [512, 513, 1024]}
    """) == [
        "recipe.yaml:7:13: jobs[0].matrix: the matrix produces no combinations (every one is "
        "excluded)",
        "recipe.yaml:10:20: jobs[1].matrix.seed: 'seed' is a reserved template variable; "
        "rename it",
        "recipe.yaml:10:30: jobs[1].matrix.key: 'key' is a reserved template variable; "
        "rename it",
        "recipe.yaml:11:5: jobs[2]: missing required parameter 'prompt' for flux-kontext-pro",
        "recipe.yaml:15:22: jobs[3].params.prompt: the prompt is set twice: use the job's "
        "'prompt' key, not a 'prompt' parameter",
        "recipe.yaml:15:31: jobs[3].params.seed: set the seed with the job's 'seed' key",
        "recipe.yaml:18:21: jobs[4].params.model: unknown model 'flux-dve' (did you mean "
        "'flux-dev'?) (for m=flux-dve, replicate=1)",
        "recipe.yaml:22:11: jobs[5].seed: the seed template gave '-4', not a non-negative "
        "integer (for n=1, replicate=1)",
        "recipe.yaml:26:21: jobs[6].params.width: 513 is not a multiple of 32 (for w=513, "
        "replicate=1)",
    ]


def test_no_model_anywhere_is_reported() -> None:
    assert problems_of("- {name: a, prompt: x}", "version: 1\nname: r\n") == [
        "recipe.yaml:4:5: jobs[0].params: no model: set 'model' in defaults or params"]


def test_a_problem_repeated_for_many_images_is_reported_once_with_a_count() -> None:
    assert problems_of("""
        - name: a
          prompt: "{{ color }}"
          matrix:
            shape: [cube, ball, cone]
            include: [{shape: cube, color: red}]
          replicates: 2
    """) == ["recipe.yaml:6:13: jobs[0].prompt: undefined variable 'color' (did you mean "
             "'combo'?) (for shape=ball, replicate=1) and 3 more"]


def test_a_variable_whose_values_failed_to_load_causes_no_follow_on_errors(
        tmp_path: Path) -> None:
    path = write_recipe(tmp_path, """
        - name: a
          prompt: "{{ s }} {{ t }} {{ shot }}"
          matrix:
            s: {from: missing.txt}
            t: [1, 2]
        - name: b
          prompt: "{{ shot }} {{ ligth }}"
          matrix:
            rows: {from: missing.csv}
            light: [x]
        - name: c
          prompt: "{{ s }}"
          matrix: {s: {from: empty.txt}}
    """, **{"empty.txt": "# nothing yet\n\n"})
    with pytest.raises(RecipeError) as caught:
        load_plan(str(path))
    assert str(caught.value).replace(f"{tmp_path}/", "").replace(f" (relative to {tmp_path})",
                                                                  "").splitlines() == [
        "recipe.yaml:6:13: jobs[0].prompt: undefined variable 'shot'",
        "recipe.yaml:8:17: jobs[0].matrix.s.from: file not found: missing.txt",
        "recipe.yaml:13:20: jobs[1].matrix.rows.from: file not found: missing.csv",
        "recipe.yaml:17:24: jobs[2].matrix.s.from: empty.txt holds no values (only blank lines "
        "and comments)",
    ]


def test_plan_is_deterministic() -> None:
    first, second = plan_of(MATRIX_JOBS), plan_of(MATRIX_JOBS)
    assert [(j.index, j.job, dict(j.vars), j.replicate, j.seed, j.key, j.output)
            for j in first.jobs] == [(j.index, j.job, dict(j.vars), j.replicate, j.seed, j.key,
                                      j.output) for j in second.jobs]
    assert [j.index for j in first.jobs] == list(range(len(first.jobs)))


def test_jobs_are_frozen() -> None:
    job = plan_of(MATRIX_JOBS).jobs[0]
    with pytest.raises(AttributeError):
        job.seed = 1  # type: ignore[misc]


def test_order_is_job_then_combination_then_replicate() -> None:
    jobs = plan_of("""
        - {name: a, prompt: "{{ n }}", matrix: {n: [2, 1]}, replicates: 2}
        - {name: b, prompt: x}
    """).jobs
    assert [(j.job, dict(j.vars), j.replicate) for j in jobs] == [
        ("a", {"n": 2}, 1), ("a", {"n": 2}, 2), ("a", {"n": 1}, 1), ("a", {"n": 1}, 2),
        ("b", {}, 1)]
    assert list(itertools.accumulate(1 for _ in jobs)) == [j.index + 1 for j in jobs]


def test_a_whole_path_over_the_limit_is_caught_by_validate() -> None:
    deep = "/".join(["{{ n }}"] * 25) + ".png"
    [problem] = problems_of(f"""
        - name: a
          prompt: x
          matrix: {{n: [{"b" * 200}]}}
          output: "{deep}"
    """)
    assert problem.startswith("recipe.yaml:8:13: jobs[0].output: output path 'bbbb")
    assert problem.endswith("makes a path of more than 4096 bytes under the output root, over "
                            "the file system's limit (for n=" + "b" * 39 + "…, replicate=1)")


# -- the validation edges: what the API would refuse, or what would surprise ------------------

ULTRA = "version: 1\nname: r\ndefaults: {model: flux-pro-1.1-ultra}\n"


@pytest.mark.parametrize(("ratio", "message"), [
    ("banana", "'banana' is not an aspect ratio like '16:9'"),
    ("16:0", "'16:0' is not an aspect ratio like '16:9'"),
    ("32:9", "'32:9' is wider than the documented range of 21:9 to 9:21"),
    ("1:3", "'1:3' is taller than the documented range of 21:9 to 9:21"),
])
def test_an_aspect_ratio_outside_the_documented_range_is_refused(ratio: str,
                                                                 message: str) -> None:
    assert problems_of(f"""
        - {{name: a, prompt: x, params: {{aspect_ratio: "{ratio}"}}}}
    """, ULTRA) == [f"recipe.yaml:5:49: jobs[0].params.aspect_ratio: {message}"]


@pytest.mark.parametrize("model", sorted(name for name, spec in models.catalogue().items()
                                          if "aspect_ratio" in spec.properties))
def test_every_model_that_takes_an_aspect_ratio_has_it_checked(model: str) -> None:
    assert model in {"flux-pro-1.1-ultra", "flux-kontext-pro", "flux-kontext-max"}
    assert problems_of("""
        - {name: a, prompt: x, params: {aspect_ratio: "banana"}}
    """, f"version: 1\nname: r\ndefaults: {{model: {model}}}\n") == [
        "recipe.yaml:5:49: jobs[0].params.aspect_ratio: 'banana' is not an aspect ratio like "
        "'16:9'"]


@pytest.mark.parametrize("ratio", ["21:9", "9:21", "16:9", "1:1", " 4 : 3 "])
def test_the_documented_aspect_ratios_pass(ratio: str) -> None:
    assert single(f"""
        - {{name: a, prompt: x, params: {{aspect_ratio: "{ratio}"}}}}
    """, ULTRA).request["aspect_ratio"] == ratio


def test_an_output_extension_that_disagrees_with_the_format_is_a_note() -> None:
    plan = plan_of("""
        - {name: a, prompt: x, params: {output_format: jpeg}, output: "a.png"}
    """)
    assert [job.output for job in plan.jobs] == ["a.png"]  # (written as a.jpg)
    assert [str(note) for note in plan.notes] == [
        "recipe.yaml:5:65: jobs[0].output: the output path ends in .png, but the image will "
        "be jpeg (output_format), so it is written as .jpg; end the output template with "
        "`.{{ ext }}`, or set output_format to match (for replicate=1)"]
    assert not plan_of("""
        - {name: a, prompt: x, params: {output_format: jpeg}, output: "a.jpeg"}
    """).notes  # (either spelling of JPEG is fine)


def test_validate_prints_notes_and_still_says_ok(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fluxbatch.main import main

    build_file_tree(tmp_path, {"recipe.yaml": recipe_text("""
        - {name: a, prompt: x, output: "{{ n }}.png", matrix: {n: [1, 2]}}
    """)})
    assert main(["validate", str(tmp_path / "recipe.yaml")]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'recipe.yaml'}: ok (2 images; flux-dev)\n"
    assert err == (f"{tmp_path / 'recipe.yaml'}:5:34: note: jobs[0].output: the output path "
                   "ends in .png, but the image will be jpeg (output_format), so it is "
                   "written as .jpg; end the output template with `.{{ ext }}`, or set "
                   "output_format to match (for n=1, replicate=1) and 1 more\n")


@pytest.mark.parametrize("prompt", ['""', '"   "'])
def test_an_empty_prompt_without_an_image_is_refused(prompt: str) -> None:
    assert problems_of(f"""
        - {{name: a, prompt: {prompt}}}
    """) == ["recipe.yaml:5:23: jobs[0].prompt: the prompt is empty, and no image is given: "
             "the model would draw anything at all (for replicate=1)"]


def test_an_integral_float_for_an_integer_parameter_is_the_integer() -> None:
    """`width: 512.0` is what YAML makes of a value someone typed with a point: the API takes
    the integer, so it is accepted, and keyed as the integer."""
    job = single("""
        - {name: a, prompt: x, params: {width: 512.0, height: 512}}
    """)
    assert job.request["width"] == 512 and isinstance(job.request["width"], int)
    assert job.key == single("""
        - {name: a, prompt: x, params: {width: 512, height: 512}}
    """).key
    assert problems_of("""
        - {name: a, prompt: x, params: {width: 512.5, height: 512}}
    """) == ["recipe.yaml:5:42: jobs[0].params.width: 512.5 is not of type 'integer'"]


@pytest.mark.parametrize(("seed", "message"), [
    ("-1", "-1 is less than the minimum of 0"),
    ("4294967296", "4294967296 is greater than the maximum of 4294967295 (seeds are 32-bit)"),
    ('"{{ 2 ** 32 }}"', "4294967296 is greater than the maximum of 4294967295 (seeds are "
     "32-bit) (for replicate=1)"),
])
def test_a_seed_outside_32_bits_is_refused(seed: str, message: str) -> None:
    [problem] = problems_of(f"""
        - {{name: a, prompt: x, seed: {seed}}}
    """)
    assert problem.endswith(f"jobs[0].seed: {message}")


def test_an_unknown_model_suggests_a_current_one_and_model_concurrency_is_checked() -> None:
    assert problems_of("""
        - {name: a, prompt: x, params: {model: flux-pro-2}}
    """, "version: 1\nname: r\nprovider: {name: emulator, model_concurrency: {flux-dve: 2}}\n"
         "defaults: {model: flux-dev}\n") == [
        "recipe.yaml:3:48: provider.model_concurrency.flux-dve: unknown model 'flux-dve' (did "
        "you mean 'flux-dev'?)",
        "recipe.yaml:6:42: jobs[0].params.model: unknown model 'flux-pro-2' (did you mean "
        "'flux-2-pro'?)"]
