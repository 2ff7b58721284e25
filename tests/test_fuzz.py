"""Whatever the file holds, `fluxbatch validate` answers 0 or 1 with a message: never a crash,
never "internal error"."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxbatch import yamlsource
from fluxbatch.main import main
from tests.helpers import examples

FUZZ = settings(max_examples=examples(150), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

KEYS = ["version", "name", "provider", "output", "output_root", "max_jobs", "defaults", "vars",
        "jobs", "prompt", "matrix", "replicates", "params", "seed", "model", "width", "height",
        "steps", "guidance", "output_format", "include", "exclude", "zip", "rows", "from",
        "column", "base_url", "webhook_url", "aspect_ratio"]
TEXTS = ["", "auto", "bfl", "emulator", "flux-dev", "flux-pro-1.1", "flux-kontext-pro",
         "flux-2-pro", "{{ a }}", "{{ a | slug }}", "{{", "{% if %}", "{{ x | nope }}",
         "{{ ''.__class__ }}", "{{ 1 / 0 }}", "../x.png", "/abs.png", "a.txt", "rows.csv",
         "{{ job }}/{{ combo }}.{{ ext }}", "{{ 3 * 2 }}", "{{ a }}.png", "16:9", "png", "a"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2000), st.floats(),
    st.sampled_from(TEXTS), st.text(max_size=6),
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=25,
)
# mostly-sensible values, so that many documents get past the schema into expansion
sensible_params = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["flux-dev", "flux-pro-1.1", "flux-2-pro", "flux-kontext-pro",
                              "flux-pro-1.0-fill", "{{ m }}", "nope"]),
    "width": st.sampled_from([512, 1024, 1000, 2000, "{{ 512 + 32 * a }}", "{{ a }}"]),
    "steps": st.sampled_from([1, 28, 51, "{{ 3 * 2 }}", "x"]),
    "guidance": st.sampled_from([2.5, 3, "{{ a }}", None]),
    "output_format": st.sampled_from(["png", "jpeg", "webp", "gif", "{{ f }}"]),
    "webhook_url": st.sampled_from(["https://example.com/hook"]),
})
variables = st.sampled_from(["a", "a", "b", "m", "f", "seed"])
values = st.lists(st.one_of(st.integers(0, 3), st.sampled_from(["x", "y", "png", "flux-dev"])),
                  min_size=1, max_size=3)
sensible_matrix = st.dictionaries(
    variables, values | st.sampled_from([{"from": "a.txt"}, {"from": "nope.txt"}]),
    max_size=3,
).flatmap(lambda axes: st.fixed_dictionaries({k: st.just(v) for k, v in axes.items()}, optional={
    "include": st.lists(st.dictionaries(variables, st.integers(0, 3), min_size=1, max_size=2),
                        max_size=2),
    "exclude": st.lists(st.dictionaries(variables, st.integers(0, 3), min_size=1, max_size=2),
                        max_size=2),
    "zip": st.just({"c": [1, 2], "d": [3, 4]}),
    "rows": st.sampled_from([{"from": "rows.csv"}, [{"r": 1}, {"r": 2, "s": 3}]]),
}))
sensible_jobs = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "A"])},
    optional={
        "prompt": st.sampled_from(TEXTS),
        "matrix": sensible_matrix,
        "params": sensible_params,
        "seed": st.sampled_from(["auto", 0, 7, "{{ a }}", "{{ a - 1 }}"]),
        "replicates": st.integers(1, 3),
        "output": st.sampled_from(["{{ a }}.png", "x.png", "../x", "{{ combo }}/{{ seed }}"]),
    },
)
sensible_recipes = st.fixed_dictionaries(
    {"version": st.just(1), "name": st.just("r"),
     "jobs": st.lists(sensible_jobs, min_size=1, max_size=3, unique_by=lambda j: j["name"]),
     "defaults": sensible_params.map(lambda d: {"model": "flux-dev", **d})},
    optional={"provider": st.sampled_from(["bfl", "emulator"]),
              "max_jobs": st.integers(1, 20), "output_root": st.sampled_from(["out", "../o"])},
)
wild_params = st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4)
wild_jobs = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "bad name"])},
    optional={"prompt": scalars, "matrix": documents, "params": wild_params, "seed": scalars,
              "replicates": scalars, "output": scalars},
)
wild_recipes = st.fixed_dictionaries(
    {"version": st.just(1), "name": st.just("r"),
     "jobs": st.lists(wild_jobs | sensible_jobs, min_size=1, max_size=3)},
    optional={"defaults": wild_params, "vars": documents, "provider": scalars,
              "output": scalars, "max_jobs": scalars, "output_root": scalars},
)
# fragments that reach the corners of the YAML reader: tags, anchors, merges, flow syntax
yaml_soup = st.lists(st.sampled_from([
    "a", ": ", " ", "\n", "- ", "  ", "!!int ", "!!float ", "!!binary ", "!!timestamp ",
    "!!set ", "!!omap ", "!!python/tuple ", "!custom ", "&x ", "*x ", "<<: ", "{", "}", "[",
    "]", ", ", "? ", "'", '"', "# ", "|\n", ">\n", "%YAML 1.1\n", "---\n", "...\n", "1", "1.5",
    ".inf", ".nan", "0x1", "1:30", "2024-13-45", "null", "~", "\t", "\\ud800", "é", "\x00",
    "\ufeff", "jobs", "version: 1\n", "name: r\n", "jobs:\n", "  - name: a\n",
    "    prompt: x\n", "defaults: {model: flux-dev}\n",
]), max_size=40).map("".join)


def validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    assert "internal error" not in captured.err
    assert "Traceback" not in captured.err
    if code == 1:
        assert captured.err.strip(), "a failure says why"


def dumped(document: Any) -> str:
    return yaml.safe_dump(document, allow_unicode=False, sort_keys=False)


@FUZZ
@given(st.text())
def test_any_text_is_answered(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              text: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    validate(path, capsys)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_are_answered(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                data: bytes) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    validate(path, capsys)


@FUZZ
@given(documents)
def test_any_yaml_document_is_answered(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       document: Any) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(dumped(document), encoding="utf-8")
    validate(path, capsys)


@FUZZ
@given(sensible_recipes | wild_recipes)
def test_any_recipe_shaped_document_is_answered(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], document: Any) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(dumped(document), encoding="utf-8")
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    validate(path, capsys)


@FUZZ
@given(yaml_soup)
def test_yaml_soup_is_answered(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               text: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    validate(path, capsys)


# -- hostile templates: through the real command, in a process with hard limits -----------------
# The rlimits are a safety net, not a measurement: the template limits stop each of these far
# below them; without the template limits, each would run out of memory or CPU time instead.

MEMORY_LIMIT = 1024**3
CPU_SECONDS = 20
LONG = "template limit: a text longer than 100,000 characters"
STEPS = "template limit: more than 1,000,000 steps of work"


def hard_limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))


def validate_within_hard_limits(tmp_path: Path, prompt: str, matrix: str = "",
                                command: str = "validate") -> list[str]:
    """`fluxbatch validate` of a recipe with this prompt: exit code 1, and what it said."""
    (tmp_path / "recipe.yaml").write_text(
        "version: 1\nname: r\ndefaults: {model: flux-dev}\njobs:\n  - name: a\n"
        f"    prompt: {json.dumps(prompt)}\n" + (f"    matrix: {matrix}\n" if matrix else ""),
        encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "fluxbatch", command, "recipe.yaml"],
                            cwd=tmp_path, capture_output=True, text=True,
                            preexec_fn=hard_limits, timeout=300)
    assert result.returncode == 1, result.stderr
    return result.stderr.splitlines()


@pytest.mark.parametrize("prompt,message", [
    ("{{ lipsum(1000000) }}", LONG),
    ("{{ (9**999)**999 }}", "template limit: a number larger than 100,000 bits"),
    ("{{ 9**999**999 }}", "template limit: a number larger than 100,000 bits"),
    ("{{ '%0900000000d' % 1 }}", LONG),
    ("{{ 'x' | center(900000000) }}", LONG),
    ("{{ 'x'.center(9e8) }}", LONG),
    ("{{ '{:>900000000}'.format(1) }}", LONG),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s|length }}", LONG),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s|length }}", LONG),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", STEPS),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
     LONG),
    ("{% set s = 'x' * 100000 %}{{ ([s] * 100000) | join }}", LONG),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "template limit: recursion too deep "
     "(a macro, block or loop calling itself, or lists in lists)"),
])
def test_hostile_template_is_a_located_error_within_hard_limits(
        tmp_path: Path, prompt: str, message: str) -> None:
    assert validate_within_hard_limits(tmp_path, prompt) == [
        f"recipe.yaml:6:13: jobs[0].prompt: {message} (for replicate=1)",
        "recipe.yaml: 1 problem"]


@pytest.mark.parametrize("prompt,message", [
    ("{{ " + "(" * 1000 + "1" + ")" * 1000 + " }}",
     "template limit: the template is nested too deeply"),
    ("{{ a }}" * 8000, "template limit: the template is longer than 50,000 characters"),
])
def test_hostile_template_source_is_a_located_error_within_hard_limits(
        tmp_path: Path, prompt: str, message: str) -> None:
    assert validate_within_hard_limits(tmp_path, prompt) == [
        f"recipe.yaml:6:13: jobs[0].prompt: {message}", "recipe.yaml: 1 problem"]


# Each rendering within the limits, the plan as a whole not: thousands of images of a
# template just under a limit would cost hours of CPU or gigabytes (4 min 46 s of CPU for
# 2,000 images below; 930 MB for 9,000 prompts of 100,000 characters).
PLAN = ("template limit: the plan's templates together did more than 10,000,000 steps of "
        "work, plus 2,000 per rendering")
MANY = "{v: [" + ", ".join(str(n) for n in range(9000)) + "]}"


# (seconds of CPU each, by design: `plan` in the fast run, `validate`, which reads the plan
# the same way, with --slow; the hostile templates above go through `validate`)
@pytest.mark.parametrize("command", [pytest.param("validate", marks=pytest.mark.slow), "plan"])
@pytest.mark.parametrize(("prompt", "first"), [
    pytest.param("{% for i in range(90000) %}{% for j in range(9) %}{% endfor %}{% endfor %}"
                 "{{ v }}", STEPS, id="CPU: each rendering over the limit"),
    pytest.param("{% for i in range(9000) %}{% for j in range(9) %}{% endfor %}{% endfor %}"
                 "{{ v }}", None, id="CPU: each rendering half the limit"),
    pytest.param("{{ 'x' * 99990 }}{{ v }}", None, id="memory: long prompts, each allowed"),
])
def test_a_plan_of_many_costly_renderings_is_a_located_error_within_hard_limits(
        tmp_path: Path, prompt: str, first: str | None, command: str) -> None:
    found = [line for line in validate_within_hard_limits(tmp_path, prompt, MANY, command)
             if line.startswith("recipe.yaml:6:13: ")]
    assert len(found) == 1 + (first is not None)
    assert found[-1].startswith(f"recipe.yaml:6:13: jobs[0].prompt: {PLAN} (for v=")
    assert found[-1].endswith(" more")
    if first is not None:
        assert found[0].startswith(f"recipe.yaml:6:13: jobs[0].prompt: {first} (for v=0, ")


AXES = ("a: [" + ", ".join(f"a{n}" for n in range(100)) + "], b: ["
        + ", ".join(f"b{n}" for n in range(100)) + "]")


@pytest.mark.parametrize(("entries", "where", "count"), [
    pytest.param("exclude: [" + ", ".join(f"{{a: z{n}}}" for n in range(40000)) + "]",
                 "exclude", 40000, id="exclude"),
    pytest.param("include: [" + ", ".join(f"{{a: a{n % 100}, c: c{n}}}" for n in range(20000))
                 + "]", "include", 20000, id="include"),
])
def test_a_matrix_of_many_entries_is_a_located_error_within_hard_limits(
        tmp_path: Path, entries: str, where: str, count: int) -> None:
    """10,000 combinations, each compared with tens of thousands of entries: minutes of CPU
    from a recipe of 400 kB."""
    found = validate_within_hard_limits(tmp_path, "{{ a }} {{ b }}", f"{{{AXES}, {entries}}}")
    assert found == [
        f"recipe.yaml:7:{found[0].split(':')[2]}: jobs[0].matrix.{where}: 10,000 combinations "
        f"compared with {count:,} exclude and include entries make {count * 10000:,} checks, "
        "more than the limit of 20,000,000; use fewer entries (a list of values leaves out "
        "what it does not name), or split the job",
        "recipe.yaml: 1 problem"]


def read_yaml(text: str) -> str:
    """All that `yamlsource.load` makes of `text`: the value and every position, or the
    problems (and what was still read)."""
    try:
        value, positions = yamlsource.load(text, "f.yaml")
    except yamlsource.DocumentError as error:
        partial = error.partial and (error.partial[0], error.partial[1].values,
                                     error.partial[1].keys)
        return repr(([str(p) for p in error.problems], partial))
    return repr((value, positions.values, positions.keys))


@settings(FUZZ, max_examples=examples(300))
@given(yaml_soup | documents.map(dumped) | wild_recipes.map(dumped))
def test_libyaml_and_the_python_parser_read_any_text_alike(text: str) -> None:
    """Recipes are read by libyaml when PyYAML has it, by PyYAML's Python parser when not (and
    when libyaml finds a problem, to word it): the plan must not depend on which."""
    assert yamlsource._FastLoader is not None  # (PyYAML's wheels have libyaml)
    fast = read_yaml(text)
    slow = yamlsource._FastLoader
    try:
        yamlsource._FastLoader = None
        assert read_yaml(text) == fast
    finally:
        yamlsource._FastLoader = slow
