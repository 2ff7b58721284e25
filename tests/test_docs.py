"""The documentation staying in step with the code: the README's commands that CI runs, the
command reference generated from `--help`, the command and option tables, every relative
link and anchor, and the Python API page's examples (the gallery's tests are in
test_gallery.py)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

from fluxbatch.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


# -- the README ---------------------------------------------------------------------------------


def marked_block(text: str, marker: str) -> str:
    """The fenced block after `<!-- marker -->`, read as .ci/run's awk reads it."""
    after = text[text.index(f"<!-- {marker} -->"):]
    match = re.search(r"^```[^\n]*\n(.*?)^```", after, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no fenced block after <!-- {marker} --> in README.md"
    return match.group(1)


def test_the_readme_keeps_the_two_commands_ci_and_newcomers_run() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert marked_block(readme, "main-command") == (
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && "
        ".venv/bin/fluxbatch render examples/quickstart/recipe.yaml\n")
    assert marked_block(readme, "test-command") == (
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
        ".venv/bin/python -m pytest -q\n")


def session_steps(block: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, the lines it prints)."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def matches_with_elisions(expected: list[str], printed: list[str]) -> bool:
    """`…` on a line of its own stands for one or more lines left out."""
    pattern = "\n".join(".+?" if line == "…" else re.escape(line) for line in expected)
    return re.fullmatch(pattern, "\n".join(printed), re.DOTALL) is not None


@pytest.mark.slow
def test_the_readme_quickstart_session_prints_what_the_readme_shows(tmp_path: Path) -> None:
    """After the main command, each command of the README's session prints exactly what the
    README says it prints (a newcomer compares the two)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    root = fresh_clone(tmp_path)
    rendered = subprocess.run([sys.executable, "-m", "fluxbatch", "render",
                               "examples/quickstart/recipe.yaml"], cwd=root,
                              capture_output=True, text=True, timeout=300, check=True)
    assert rendered.stdout.startswith("10 written")
    for command, expected in session_steps(marked_block(readme, "quickstart-session")):
        if command.startswith("fluxbatch "):
            argv = [sys.executable, "-m", "fluxbatch", *command.split()[1:]]
            done = subprocess.run(argv, cwd=root, capture_output=True, text=True,
                                  timeout=300, check=False)
        else:
            done = subprocess.run(command, shell=True, cwd=root, capture_output=True,
                                  text=True, timeout=300, check=False)
        printed = (done.stdout + done.stderr).splitlines()
        assert done.returncode == 0, (command, done.stderr)
        assert matches_with_elisions(expected, printed), (command, printed)


def test_the_readme_links_the_license_and_the_changelog() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](LICENSE)" in readme
    assert "](CHANGELOG.md)" in readme


# -- the command reference ------------------------------------------------------------------------


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_cli", DOCS / "generate_cli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_line_reference_is_the_help_of_every_command() -> None:
    expected = generator().generate()
    written = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert written == expected, (
        "docs/cli.md differs from the parser's --help: run `.venv/bin/python "
        "docs/generate_cli.py` to rewrite it, and commit the result")


def test_the_command_line_reference_keeps_the_help_texts_laid_out_as_written() -> None:
    """The top-level help's "words:" table is a table, as `fluxbatch --help` prints it: a
    formatter that reflows it into one paragraph differs from the real help."""
    from fluxbatch.main import WORDS

    reference = generator().generate()
    assert WORDS + "\n```" in section(reference, "## fluxbatch\n", "## fluxbatch validate")


def test_the_command_line_reference_does_not_depend_on_the_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    narrow = generator().generate()
    monkeypatch.setenv("COLUMNS", "250")
    assert generator().generate() == narrow
    assert "## fluxbatch render" in narrow
    assert all(f"## fluxbatch {name}\n" in narrow for name in subcommands())


def test_every_command_is_in_the_command_table() -> None:
    commands = (DOCS / "commands.md").read_text(encoding="utf-8")
    table = section(commands, "| command |", "## Exit codes")
    documented = set(re.findall(r"^\| `([a-z]+)", table, re.MULTILINE))
    assert documented == set(subcommands())


def test_every_render_option_is_in_the_render_options_table() -> None:
    commands = (DOCS / "commands.md").read_text(encoding="utf-8")
    table = section(commands, "## `render` options", "## The gallery")
    render = subcommands()["render"]
    options = {o for a in render._actions for o in a.option_strings if o.startswith("--")}
    options -= {"--help", "--jobs", "--quiet"}  # documented as -j and -q
    missing = sorted(o for o in options if f"`{o}" not in table)
    assert missing == []


# -- links ----------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: the text as rendered (no code marks, link
    targets or emphasis), lower-cased, without punctuation or symbols (letters, digits,
    `-` and `_` stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*|_)(\S(?:.*?\S)?)\1", r"\2", text)
    kept = "".join(ch for ch in text.strip().lower()
                   if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor the page's headings make, numbered as GitHub numbers repeats."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", text, re.MULTILINE):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The targets of the page's links and images, outside code."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def test_anchors_are_made_as_github_makes_them() -> None:
    assert slug("The `plan --json` and `--jsonl` contract") == \
        "the-plan---json-and---jsonl-contract"
    assert slug("What `.fluxbatch/` holds") == "what-fluxbatch-holds"
    assert slug("Validation, seeds, keys and output paths") == \
        "validation-seeds-keys-and-output-paths"
    assert slug("fluxbatch plan") == "fluxbatch-plan"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_a_heading(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # https:, mailto: and the like: not checked here
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: {destination.name} has no heading #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_every_page_of_the_docs_is_linked_from_the_readme() -> None:
    linked = {Path(target.partition("#")[0]).name for target in links(ROOT / "README.md")
              if target.startswith("docs/")}
    assert linked == {page.name for page in DOCS.glob("*.md")}


# -- the Python API page --------------------------------------------------------------------------


def api_examples() -> list[str]:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def run_example(code: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=120, check=False)


def fresh_clone(tmp_path: Path) -> Path:
    """The part of a clone the examples read: the quickstart, never rendered."""
    shutil.copytree(ROOT / "examples/quickstart", tmp_path / "examples/quickstart",
                    ignore=shutil.ignore_patterns("renders", ".fluxbatch", "*.json",
                                                  "*.html"))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(api_examples())))
def test_each_example_of_the_api_page_runs_from_a_fresh_clone(
        index: int, tmp_path: Path) -> None:
    done = run_example(api_examples()[index], fresh_clone(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.slow
def test_the_api_pages_first_script_prints_what_the_page_says(tmp_path: Path) -> None:
    root = fresh_clone(tmp_path)
    first = run_example(api_examples()[0], root)
    lines = first.stdout.splitlines()
    assert all(" new submit " in line for line in lines[:10])
    assert lines[10].startswith("{'new': 10} ")  # and the estimate
    assert sorted(line.split()[0] for line in lines[11:-1]) == \
        ["ready"] * 10 + ["submitted"] * 10 + ["written"] * 10
    assert lines[-1] == "True 0.4"
    again = run_example(api_examples()[0], root)
    assert again.stdout.splitlines()[-1] == "True None"
    assert " up-to-date skip " in again.stdout


@pytest.mark.slow
def test_the_api_pages_error_example_prints_what_the_page_says(tmp_path: Path) -> None:
    example = next(code for code in api_examples() if "budget=0.10" in code)
    done = run_example(example, fresh_clone(tmp_path))
    assert done.stdout == ("not rendered: the estimated cost $0.40 of the 10 images to render "
                           "is over the budget of $0.10 (it counts this run and the unfinished "
                           "runs it continues); nothing was sent\n")


# -- CONTRIBUTING.md's map ----------------------------------------------------------------------

MAP_ROW = re.compile(r"^\| `(fluxbatch/[\w/]+\.py)` \| [^|]+ \| ([^|]+) \|$", re.MULTILINE)


def fluxbatch_imports(path: Path) -> set[str]:
    """The modules of fluxbatch that `path` imports, anywhere in it (`state.ledger`)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fluxbatch"):
            for alias in node.names:  # (`from fluxbatch import models` names a module)
                full = f"{node.module}.{alias.name}"
                where = ROOT / full.replace(".", "/")
                is_module = where.with_suffix(".py").exists() or where.is_dir()
                found.add(full if is_module else node.module or "")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fluxbatch"))
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    return {name.removeprefix("fluxbatch.") for name in found - {module}}


def test_contributings_map_names_every_module_and_what_it_imports() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    rows = {path: cell for path, cell in MAP_ROW.findall(text)}
    modules = {path.relative_to(ROOT).as_posix()
               for path in (ROOT / "fluxbatch").rglob("*.py")}
    assert sorted(modules - rows.keys()) == [], "modules missing from CONTRIBUTING.md's map"
    assert sorted(rows.keys() - modules) == [], "CONTRIBUTING.md maps modules that are gone"
    for path, cell in rows.items():
        written = set(re.findall(r"`([\w.]+)`", cell))
        assert written == fluxbatch_imports(ROOT / path), path
