"""Matrix rules: every documented GitHub Actions `strategy.matrix` example, plus zip, rows and
values from files. Vectors V1–V10 are quoted in ../shared/reference/peers.md §6."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from fluxbatch import matrix, recipe
from fluxbatch.errors import RecipeError
from tests.helpers import build_file_tree


def combos(matrix_yaml: str, tmp_path: Path | None = None,
           files: dict[str, str] | None = None) -> list[dict[str, Any]]:
    found, _ = expand_matrix(matrix_yaml, tmp_path, files)
    return [dict(c.values) for c in found]


def expand_matrix(matrix_yaml: str, tmp_path: Path | None = None,
                  files: dict[str, str] | None = None
                  ) -> tuple[list[matrix.Combination], list[matrix.Removed]]:
    body = textwrap.indent(textwrap.dedent(matrix_yaml).strip(), " " * 6)
    text = f"version: 1\nname: t\njobs:\n  - name: j\n    matrix:\n{body}\n"
    if tmp_path is not None:
        build_file_tree(tmp_path, {"recipe.yaml": text, **(files or {})})
        parsed = recipe.load(tmp_path / "recipe.yaml")
    else:
        parsed = recipe.parse(text, "recipe.yaml")
    return matrix.combinations(parsed.jobs[0].matrix)


def listing(text: str) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(textwrap.dedent(text))
    return loaded


def test_v1_product_follows_declaration_order() -> None:
    assert combos("""
        version: [10, 12, 14]
        os: [ubuntu-latest, windows-latest]
    """) == listing("""
        - {version: 10, os: ubuntu-latest}
        - {version: 10, os: windows-latest}
        - {version: 12, os: ubuntu-latest}
        - {version: 12, os: windows-latest}
        - {version: 14, os: ubuntu-latest}
        - {version: 14, os: windows-latest}
    """)


def test_v2_include_merges_into_originals_or_appends() -> None:
    assert combos("""
        fruit: [apple, pear]
        animal: [cat, dog]
        include:
          - color: green
          - color: pink
            animal: cat
          - fruit: apple
            shape: circle
          - fruit: banana
          - fruit: banana
            animal: cat
    """) == listing("""
        - {fruit: apple, animal: cat, color: pink, shape: circle}
        - {fruit: apple, animal: dog, color: green, shape: circle}
        - {fruit: pear, animal: cat, color: pink}
        - {fruit: pear, animal: dog, color: green}
        - {fruit: banana}
        - {fruit: banana, animal: cat}
    """)


def test_v3_include_adds_new_combinations() -> None:
    assert combos("""
        os: [ubuntu-latest]
        perl: ['5.16', '5.20', '5.26', '5.30', latest]
        include:
          - os: macos-latest
            perl: '5.26'
          - os: macos-latest
            perl: latest
    """) == listing("""
        - {os: ubuntu-latest, perl: '5.16'}
        - {os: ubuntu-latest, perl: '5.20'}
        - {os: ubuntu-latest, perl: '5.26'}
        - {os: ubuntu-latest, perl: '5.30'}
        - {os: ubuntu-latest, perl: latest}
        - {os: macos-latest, perl: '5.26'}
        - {os: macos-latest, perl: latest}
    """)


def test_v4_include_expands_one_existing_combination() -> None:
    found = combos("""
        os: [windows-latest, ubuntu-latest]
        node: [12, 14, 16]
        include:
          - os: windows-latest
            node: 16
            npm: 6
    """)
    assert len(found) == 6
    assert [c for c in found if "npm" in c] == [{"os": "windows-latest", "node": 16, "npm": 6}]


def test_v5_include_adds_one_combination() -> None:
    found = combos("""
        os: [macos-latest, windows-latest, ubuntu-latest]
        version: [12, 14, 16]
        include:
          - os: windows-latest
            version: 17
    """)
    assert len(found) == 10
    assert found[-1] == {"os": "windows-latest", "version": 17}


def test_v6_include_only_matrix_runs_its_entries() -> None:
    assert combos("""
        include:
          - site: "production"
            datacenter: "site-a"
          - site: "staging"
            datacenter: "site-b"
    """) == listing("""
        - {site: production, datacenter: site-a}
        - {site: staging, datacenter: site-b}
    """)


def test_v7_exclude_removes_partial_matches() -> None:
    found, removed = expand_matrix("""
        os: [macos-latest, windows-latest]
        version: [12, 14, 16]
        environment: [staging, production]
        exclude:
          - os: macos-latest
            version: 12
            environment: production
          - os: windows-latest
            version: 16
    """)
    assert [dict(c.values) for c in found] == listing("""
        - {os: macos-latest, version: 12, environment: staging}
        - {os: macos-latest, version: 14, environment: staging}
        - {os: macos-latest, version: 14, environment: production}
        - {os: macos-latest, version: 16, environment: staging}
        - {os: macos-latest, version: 16, environment: production}
        - {os: windows-latest, version: 12, environment: staging}
        - {os: windows-latest, version: 12, environment: production}
        - {os: windows-latest, version: 14, environment: staging}
        - {os: windows-latest, version: 14, environment: production}
    """)
    assert [(dict(r.values), r.exclude) for r in removed] == [
        ({"os": "macos-latest", "version": 12, "environment": "production"}, 0),
        ({"os": "windows-latest", "version": 16, "environment": "staging"}, 1),
        ({"os": "windows-latest", "version": 16, "environment": "production"}, 1),
    ]


def test_v8_object_valued_variables() -> None:
    assert combos("""
        os: [ubuntu-latest, macos-latest]
        node:
          - version: 14
          - version: 20
            env: NODE_OPTIONS=--openssl-legacy-provider
    """) == listing("""
        - {os: ubuntu-latest, node: {version: 14}}
        - {os: ubuntu-latest, node: {version: 20, env: NODE_OPTIONS=--openssl-legacy-provider}}
        - {os: macos-latest, node: {version: 14}}
        - {os: macos-latest, node: {version: 20, env: NODE_OPTIONS=--openssl-legacy-provider}}
    """)


def test_v9_include_appends_what_cannot_merge() -> None:
    assert combos("""
        version: [6, 7, 8]
        experimental: [false]
        include:
          - version: 9
            experimental: true
    """) == listing("""
        - {version: 6, experimental: false}
        - {version: 7, experimental: false}
        - {version: 8, experimental: false}
        - {version: 9, experimental: true}
    """)


def test_include_can_add_back_an_excluded_combination() -> None:
    # "All include combinations are processed after exclude."
    assert combos("""
        a: [1, 2]
        b: [x, y]
        exclude: [{a: 2, b: y}]
        include: [{a: 2, b: y, extra: back}]
    """) == listing("""
        - {a: 1, b: x}
        - {a: 1, b: y}
        - {a: 2, b: x}
        - {a: 2, b: y, extra: back}
    """)


def test_later_include_overwrites_value_added_by_earlier_include() -> None:
    assert combos("""
        a: [1, 2]
        include:
          - {tag: first}
          - {a: 2, tag: second}
    """) == [{"a": 1, "tag": "first"}, {"a": 2, "tag": "second"}]


def test_no_matrix_is_one_combination() -> None:
    parsed = recipe.parse("version: 1\nname: t\njobs: [{name: j}]\n", "r.yaml")
    found, removed = matrix.combinations(parsed.jobs[0].matrix)
    assert [dict(c.values) for c in found] == [{}]
    assert removed == []


def test_zip_group_advances_in_lock_step_and_multiplies_with_other_axes() -> None:
    assert combos("""
        style: [ink, oil]
        zip:
          subject: [cat, dog]
          colour: [black, brown]
    """) == listing("""
        - {style: ink, subject: cat, colour: black}
        - {style: ink, subject: dog, colour: brown}
        - {style: oil, subject: cat, colour: black}
        - {style: oil, subject: dog, colour: brown}
    """)


def test_several_zip_groups_are_separate_factors() -> None:
    assert combos("""
        zip:
          - {a: [1, 2], b: [3, 4]}
          - {c: [5, 6], d: [7, 8]}
    """) == listing("""
        - {a: 1, b: 3, c: 5, d: 7}
        - {a: 1, b: 3, c: 6, d: 8}
        - {a: 2, b: 4, c: 5, d: 7}
        - {a: 2, b: 4, c: 6, d: 8}
    """)


def test_zip_lengths_must_match() -> None:
    with pytest.raises(RecipeError) as caught:
        combos("""
            zip:
              a: [1, 2, 3]
              b: [1, 2]
        """)
    assert str(caught.value) == (
        "recipe.yaml:7:9: jobs[0].matrix.zip: zip lists must have the same length: "
        "a has 3, b has 2"
    )


def test_rows_inline_are_one_combination_each() -> None:
    assert combos("""
        rows:
          - {shot: wide, lens: 24mm}
          - {shot: close, lens: 85mm}
        light: [dawn, noon]
    """) == listing("""
        - {shot: wide, lens: 24mm, light: dawn}
        - {shot: wide, lens: 24mm, light: noon}
        - {shot: close, lens: 85mm, light: dawn}
        - {shot: close, lens: 85mm, light: noon}
    """)


def test_rows_from_csv(tmp_path: Path) -> None:
    assert combos("rows: {from: shots.csv}", tmp_path, {
        "shots.csv": "shot,lens\nwide,24mm\nclose,85mm\n",
    }) == [{"shot": "wide", "lens": "24mm"}, {"shot": "close", "lens": "85mm"}]


@pytest.mark.parametrize("name,content", [
    ("shots.yaml", "- {shot: wide, lens: 24mm}\n- {shot: close, lens: 85mm}\n"),
    ("shots.json", '[{"shot": "wide", "lens": "24mm"}, {"shot": "close", "lens": "85mm"}]'),
])
def test_rows_from_yaml_and_json(tmp_path: Path, name: str, content: str) -> None:
    assert combos(f"rows: {{from: {name}}}", tmp_path, {name: content}) == [
        {"shot": "wide", "lens": "24mm"}, {"shot": "close", "lens": "85mm"}]


@pytest.mark.parametrize("name,content", [
    ("v.txt", "# lighting\nsoft light\n\n  rim light  \n# golden hour\nneon\n"),
    ("v.yaml", "- soft light\n- rim light\n- neon\n"),
    ("v.yml", "[soft light, rim light, neon]\n"),
    ("v.json", '["soft light", "rim light", "neon"]'),
])
def test_values_from_files(tmp_path: Path, name: str, content: str) -> None:
    assert combos(f"light: {{from: {name}}}", tmp_path, {name: content}) == [
        {"light": "soft light"}, {"light": "rim light"}, {"light": "neon"}]


def test_values_from_csv_column(tmp_path: Path) -> None:
    assert combos("light: {from: l.csv, column: name}", tmp_path, {
        "l.csv": "id,name\n1,soft\n2,rim\n",
    }) == [{"light": "soft"}, {"light": "rim"}]


@pytest.mark.parametrize("spec,files,message", [
    ("light: {from: nope.txt}", {},
     "recipe.yaml:6:21: jobs[0].matrix.light.from: file not found: nope.txt"),
    ("light: {from: l.csv}", {"l.csv": "a\n1\n"},
     "recipe.yaml:6:21: jobs[0].matrix.light.from: l.csv is a CSV file: say which column "
     "with 'column:'"),
    ("light: {from: l.csv, column: nmae}", {"l.csv": "name\n1\n"},
     "recipe.yaml:6:36: jobs[0].matrix.light.column: l.csv has no column 'nmae' "
     "(did you mean 'name'?)"),
    ("light: {from: l.yaml}", {"l.yaml": "a: 1\n"},
     "recipe.yaml:6:21: jobs[0].matrix.light.from: l.yaml must hold a non-empty list of values"),
    ("light: {from: l.yaml}", {"l.yaml": "[unclosed\n"},
     "recipe.yaml:6:21: jobs[0].matrix.light.from: l.yaml:2:1: YAML syntax error: expected "
     "',' or ']', but got '<stream end>' (while parsing a flow sequence at line 1)"),
    ("light: {from: l.json}", {"l.json": "[1,"},
     "recipe.yaml:6:21: jobs[0].matrix.light.from: l.json:1:4: invalid JSON: Expecting value"),
    ("light: {from: l.docx}", {"l.docx": "x"},
     "recipe.yaml:6:21: jobs[0].matrix.light.from: l.docx: unsupported file type '.docx' "
     "(use .txt, .yaml, .yml, .json or .csv)"),
    ("rows: {from: r.csv}", {"r.csv": "a,b\n1\n"},
     "recipe.yaml:6:20: jobs[0].matrix.rows.from: r.csv:2: row does not have 2 columns"),
    ("rows: {from: r.yaml}", {"r.yaml": "[1, 2]"},
     "recipe.yaml:6:20: jobs[0].matrix.rows.from: r.yaml must hold a list of mappings "
     "(one per row)"),
])
def test_file_problems_are_located(tmp_path: Path, spec: str, files: dict[str, str],
                                   message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        combos(spec, tmp_path, files)
    text = str(caught.value).replace(str(tmp_path) + "/", "")
    assert text.split(" (relative to")[0] == message


def test_exclude_naming_an_unknown_variable_is_an_error() -> None:
    with pytest.raises(RecipeError) as caught:
        combos("""
            subject: [a, b]
            exclude: [{subjet: a}]
        """)
    assert str(caught.value) == (
        "recipe.yaml:7:18: jobs[0].matrix.exclude[0].subjet: exclude names 'subjet', which is "
        "not a matrix variable (did you mean 'subject'?)"
    )


def test_explain_names_the_rule_for_each_combination() -> None:
    text = """
        a: [1, 2]
        zip: {b: [x, y], c: [p, q]}
        exclude: [{a: 2, b: y}]
        include: [{a: 1, tag: t}, {a: 9}]
    """
    found, removed = expand_matrix(text)
    parsed_axes = recipe.parse(
        "version: 1\nname: t\njobs:\n  - name: j\n    matrix:\n"
        + textwrap.indent(textwrap.dedent(text).strip(), " " * 6) + "\n", "r.yaml"
    ).jobs[0].matrix.axes
    assert [matrix.explain(c, parsed_axes) for c in found] == [
        "product a[0] × zip(b, c) row 1; merged include[0]",
        "product a[0] × zip(b, c) row 2; merged include[0]",
        "product a[1] × zip(b, c) row 1",
        "include[1]: new combination (fits no original one): a has no value 9 (its values: "
        "1, 2)",
    ]
    assert [r.exclude for r in removed] == [0]


def parsed_matrix(matrix_yaml: str) -> recipe.Matrix:
    body = textwrap.indent(textwrap.dedent(matrix_yaml).strip(), " " * 6)
    text = f"version: 1\nname: t\njobs:\n  - name: j\n    matrix:\n{body}\n"
    return recipe.parse(text, "recipe.yaml").jobs[0].matrix


def test_only_include_entries_that_may_be_typos_are_noted() -> None:
    """GitHub's own example adds `fruit: banana`: an entry with a value its variable lacks is
    a combination of its own, noted when it leaves a variable out (it may have been meant to
    add to some combinations); one that gives every variable a value is plainly meant."""
    found = parsed_matrix("""
        fruit: [apple, pear]
        animal: [cat, dog]
        include:
          - {color: green}
          - {fruit: apple, shape: circle}
          - {fruit: banana}
          - {fruit: banana, animal: cat}
          - {fruit: aple, shape: square}
    """)
    assert matrix.new_includes(found) == [
        (2, "fruit has no value 'banana' (its values: 'apple', 'pear')"),
        (4, "fruit has no value 'aple' (did you mean 'apple'?)"),
    ]
    assert matrix.dead_excludes(found) == []


def test_exclude_entries_that_match_no_combination_say_why() -> None:
    found = parsed_matrix("""
        size: [1, 2]
        zip: {animal: [cat, dog], colour: [black, brown]}
        aspect: [{name: square, w: 1}, {w: 2}]
        exclude:
          - {size: 3}
          - {animal: cat, colour: brown}
          - {aspect: square}
          - {aspect: {w: 3}}
          - {animal: cat, size: 2}
          - {aspect: {w: 2}}
    """)
    assert matrix.dead_excludes(found) == [
        (0, "size has no value 3 (its values: 1, 2)"),
        (1, "no combination has animal 'cat' with colour 'brown'"),
        (2, "aspect has no value 'square' (an object value is matched whole, not by its "
            "label)"),
        (3, 'aspect has no value {"w": 3} (did you mean \'{"w": 2}\'?)'),
    ]
