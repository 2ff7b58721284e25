"""A recipe is untrusted: every file it names must be a regular file inside its project (its
folder, or the enclosing git work tree), and its output_root must stay there too. Each case
is a hostile recipe checked through `fluxbatch validate`, with the exact message a user sees."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from fluxbatch.main import main
from fluxbatch.project import MAX_FILE_BYTES, MAX_RECIPE_BYTES, Project, ProjectFileError
from tests.helpers import build_file_tree

Capsys = pytest.CaptureFixture[str]

READ_RULE = "a recipe may read only files inside its project"
OUT_RULE = ("a recipe's output_root must be a folder inside its project; to write elsewhere, "
            "pass --out DIR on the command line")
STATE = "is inside a .fluxbatch directory, where fluxbatch keeps its state; choose another " \
    "output root"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recipe's folder, also the working directory: messages name `recipe.yaml`."""
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def recipe(matrix: str = "{v: [x]}", head: str = "", output: str = "{{ job }}.png") -> str:
    """`head` is one line (or none), so every case's position below is the same."""
    return textwrap.dedent(f"""\
        version: 1
        name: r
        defaults: {{model: flux-dev}}
        {head or "description: d"}
        jobs:
          - name: a
            prompt: x
            output: "{output}"
            matrix: {matrix}
    """)


def validate(capsys: Capsys, *argv: str) -> tuple[int, str]:
    code = main(["validate", "recipe.yaml", *argv])
    return code, capsys.readouterr().err


def one_problem(message: str) -> str:
    return f"{message}\nrecipe.yaml: 1 problem\n"


def real(path: Path | str) -> str:
    return os.path.realpath(path)


# A case: how to lay out the tree around the project, the recipe's matrix, and the message,
# with {root} for the project's real path and {outside} for its parent's.
Setup = Callable[[Path], None]


def nothing(project: Path) -> None:
    pass


def symlink(name: str, target: str) -> Setup:
    return lambda project: os.symlink(target, project / name)


def secret_outside(project: Path) -> None:
    build_file_tree(project.parent, {"secret.txt": "API_KEY=hunter2\n",
                                     "rows.csv": "v\nx\n"})


def escaping_chain(project: Path) -> None:
    secret_outside(project)
    os.symlink("b.txt", project / "a.txt")
    os.symlink("../secret.txt", project / "b.txt")


def fifo(project: Path) -> None:
    os.mkfifo(project / "pipe.txt")


def directory(project: Path) -> None:
    (project / "dir.txt").mkdir()


def too_large(project: Path) -> None:
    with open(project / "big.txt", "wb") as handle:  # sparse: no real disk used
        handle.truncate(MAX_FILE_BYTES + 1)


FROM = "recipe.yaml:9:24: jobs[0].matrix.v.from: "
HOSTILE_FILES = [
    pytest.param(nothing, "{v: {from: /etc/hostname}}",
                 FROM + "/etc/hostname is an absolute path; a recipe may read only files inside "
                 "its project ({root}), named relative to the recipe", id="absolute path"),
    pytest.param(secret_outside, "{v: {from: ../secret.txt}}",
                 FROM + "../secret.txt resolves to {outside}/secret.txt, outside the recipe's "
                 "project ({root}); " + READ_RULE, id="dot-dot"),
    pytest.param(symlink("env.txt", "/proc/self/environ"), "{v: {from: env.txt}}",
                 FROM + "env.txt resolves to {environ}, outside the recipe's project ({root}); "
                 + READ_RULE, id="link to the environment"),
    pytest.param(symlink("users.txt", "/etc/passwd"), "{v: {from: users.txt}}",
                 FROM + "users.txt resolves to /etc/passwd, outside the recipe's project "
                 "({root}); " + READ_RULE, id="link to /etc/passwd"),
    pytest.param(escaping_chain, "{v: {from: a.txt}}",
                 FROM + "a.txt resolves to {outside}/secret.txt, outside the recipe's project "
                 "({root}); " + READ_RULE, id="chain of links that escapes"),
    pytest.param(directory, "{v: {from: dir.txt}}",
                 FROM + "dir.txt is a directory, not a regular file", id="directory"),
    pytest.param(too_large, "{v: {from: big.txt}}",
                 FROM + "big.txt is larger than the limit of 16 MiB", id="over the size limit"),
    pytest.param(nothing, '{v: {from: "a\\0b.txt"}}',
                 FROM + "'a\\x00b.txt' contains a NUL character", id="NUL in the name"),
    pytest.param(secret_outside, "{rows: {from: ../rows.csv}}",
                 "recipe.yaml:9:27: jobs[0].matrix.rows.from: ../rows.csv resolves to "
                 "{outside}/rows.csv, outside the recipe's project ({root}); " + READ_RULE,
                 id="rows from outside"),
    pytest.param(secret_outside, "{v: {from: ../rows.csv, column: v}}",
                 FROM + "../rows.csv resolves to {outside}/rows.csv, outside the recipe's "
                 "project ({root}); " + READ_RULE, id="a CSV column from outside"),
]


@pytest.mark.parametrize("setup,matrix,message", HOSTILE_FILES)
def test_a_recipe_reads_only_regular_files_inside_its_project(
        project: Path, capsys: Capsys, setup: Setup, matrix: str, message: str) -> None:
    setup(project)
    build_file_tree(project, {"recipe.yaml": recipe(matrix)})
    expected = message.format(root=real(project), outside=real(project.parent),
                              environ=real("/proc/self/environ"))
    assert validate(capsys) == (1, one_problem(expected))


def validate_in_child(folder: Path) -> tuple[int, str]:
    """`fluxbatch validate recipe.yaml` in a child process with a deadline and a memory cap:
    for the files that, were their guard gone, would block forever (a FIFO) or be read until
    memory runs out (/dev/zero). A regression then fails its test instead of hanging or
    killing the suite."""
    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run([sys.executable, "-m", "fluxbatch", "validate", "recipe.yaml"],
                          cwd=folder, capture_output=True, text=True, timeout=60,
                          preexec_fn=cap_memory)
    return done.returncode, done.stderr


@pytest.mark.parametrize("setup,matrix,message", [
    pytest.param(symlink("zeros.txt", "/dev/zero"), "{v: {from: zeros.txt}}",
                 FROM + "zeros.txt resolves to /dev/zero, outside the recipe's project "
                 "({root}); " + READ_RULE, id="link to /dev/zero"),
    pytest.param(fifo, "{v: {from: pipe.txt}}",
                 FROM + "pipe.txt is a FIFO (named pipe), not a regular file", id="FIFO"),
])
def test_files_without_end_are_refused_without_reading_them(
        project: Path, setup: Setup, matrix: str, message: str) -> None:
    setup(project)
    build_file_tree(project, {"recipe.yaml": recipe(matrix)})
    expected = message.format(root=real(project))
    assert validate_in_child(project) == (1, one_problem(expected))


def test_the_files_a_recipe_names_are_bounded_together(project: Path) -> None:
    """One 16 MiB file named by forty jobs was read and held forty times: 1.4 GB for a 4 kB
    recipe. Each naming counts against one limit for the whole recipe."""
    with open(project / "values.txt", "w") as handle:
        handle.write(("y" * 99 + "\n") * (MAX_FILE_BYTES // 100))
    jobs = "".join(f"  - {{name: j{i}, prompt: x, matrix: {{v: {{from: values.txt}}}}}}\n"
                   for i in range(40))
    build_file_tree(project, {"recipe.yaml": "version: 1\nname: r\ndefaults: {model: "
                              f"flux-dev}}\noutput: '{{{{ job }}}}-{{{{ v }}}}'\njobs:\n{jobs}"})
    code, err = validate_in_child(project)
    assert (code, err.splitlines()[-2:]) == (1, [
        "recipe.yaml:8:46: jobs[2].matrix.v.from: the value and row files this recipe names "
        "come to more than 32 MiB together (a file named several times counts each time); "
        "values.txt and the files named after it are not read",
        "recipe.yaml: 2 problems"])


def test_links_inside_the_project_are_followed(project: Path, capsys: Capsys) -> None:
    build_file_tree(project, {"recipe.yaml": recipe("{v: {from: link.txt}, w: {from: env.txt}}"),
                              "data/values.txt": "x\ny\n"})
    os.symlink("data/values.txt", project / "link.txt")
    os.symlink("/proc/self/environ", project / "env.txt")
    assert validate(capsys) == (1, one_problem(
        f"recipe.yaml:9:45: jobs[0].matrix.w.from: env.txt resolves to "
        f"{real('/proc/self/environ')}, outside the recipe's project ({real(project)}); "
        + READ_RULE))


@pytest.mark.parametrize("marker", [
    pytest.param({".git/HEAD": "ref: refs/heads/main\n"}, id="a .git directory"),
    pytest.param({".git": "gitdir: /elsewhere/.git/worktrees/repo\n"},
                 id="the .git file of a worktree or submodule"),
])
def test_a_git_work_tree_is_the_project_of_every_recipe_in_it(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch,
        marker: dict[str, str]) -> None:
    work_tree = tmp_path / "repo"
    build_file_tree(work_tree, marker)
    build_file_tree(tmp_path, {
        "secret.txt": "API_KEY=hunter2\n",
        "repo/shared/values.txt": "x\n",
        "repo/recipes/recipe.yaml": recipe(
            "{v: {from: ../shared/values.txt}, w: {from: ../../secret.txt}}"),
    })
    monkeypatch.chdir(work_tree / "recipes")
    assert validate(capsys) == (1, one_problem(
        f"recipe.yaml:9:57: jobs[0].matrix.w.from: ../../secret.txt resolves to "
        f"{real(tmp_path)}/secret.txt, outside the recipe's project ({real(work_tree)}); "
        + READ_RULE))


def test_a_work_tree_at_the_home_directory_is_no_project(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A "dotfiles" repository at ~ would open ~/.ssh to every recipe under it."""
    home = tmp_path / "home"
    build_file_tree(home, {
        ".git/HEAD": "ref: refs/heads/main\n",
        ".ssh/id_ed25519": "PRIVATE KEY\n",
        "work/recipe.yaml": recipe("{v: {from: ../.ssh/id_ed25519}}"),
    })
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    assert validate(capsys) == (1, one_problem(
        f"recipe.yaml:9:24: jobs[0].matrix.v.from: ../.ssh/id_ed25519 resolves to "
        f"{real(home)}/.ssh/id_ed25519, outside the recipe's project ({real(home / 'work')}); "
        + READ_RULE))


# -- output_root and the state directory -----------------------------------------------------

OUTPUT_ROOT = "recipe.yaml:4:14: output_root: "
HOSTILE_OUTPUTS = [
    ("absolute output_root", nothing, "output_root: /srv/images", "{{ job }}.png",
     OUTPUT_ROOT + "/srv/images is an absolute path; a recipe's output_root must be a folder "
     "inside its project ({root}), named relative to the recipe; to write elsewhere, pass "
     "--out DIR on the command line"),
    ("output_root with dot-dot", nothing, "output_root: ../images", "{{ job }}.png",
     OUTPUT_ROOT + "../images resolves to {outside}/images, outside the recipe's project "
     "({root}); " + OUT_RULE),
    ("output_root through a link", symlink("renders", "../elsewhere"),
     "output_root: renders/final", "{{ job }}.png",
     OUTPUT_ROOT + "renders/final resolves to {outside}/elsewhere/final, outside the recipe's "
     "project ({root}); " + OUT_RULE),
    ("output_root in a state directory", nothing, "output_root: renders/.fluxbatch",
     "{{ job }}.png", OUTPUT_ROOT + "renders/.fluxbatch " + STATE),
    ("output_root linked into a state directory", symlink("renders", ".fluxbatch"),
     "output_root: renders", "{{ job }}.png",
     OUTPUT_ROOT + "renders resolves to {root}/.fluxbatch, which " + STATE),
    ("output in the state directory", nothing, "", ".fluxbatch/{{ job }}.png",
     "recipe.yaml:8:13: jobs[0].output: output path '.fluxbatch/a.png' is inside "
     ".fluxbatch/, where fluxbatch keeps the output root's state; images may not be written "
     "there (for v=x, replicate=1)"),
    ("output in the state directory, spelt otherwise", nothing, "",
     "./.FluxBatch/{{ job }}.png",
     "recipe.yaml:8:13: jobs[0].output: output path './.FluxBatch/a.png' is inside "
     ".fluxbatch/, where fluxbatch keeps the output root's state; images may not be written "
     "there (for v=x, replicate=1)"),
    ("output linked into the state directory", symlink("images", ".fluxbatch"), "",
     "images/{{ job }}.png",
     "recipe.yaml:8:13: jobs[0].output: output path 'images/a.png' leads into .fluxbatch/, "
     "the output root's state directory, through a symbolic link"),
]


@pytest.mark.parametrize("setup,head,output,message",
                         [case[1:] for case in HOSTILE_OUTPUTS],
                         ids=[case[0] for case in HOSTILE_OUTPUTS])
def test_a_recipe_writes_only_inside_its_project_and_never_into_the_state(
        project: Path, capsys: Capsys, setup: Setup, head: str, output: str,
        message: str) -> None:
    setup(project)
    build_file_tree(project, {"recipe.yaml": recipe(head=head, output=output)})
    expected = message.format(root=real(project), outside=real(project.parent))
    assert validate(capsys) == (1, one_problem(expected))


def test_out_on_the_command_line_may_point_anywhere_but_the_state(
        project: Path, tmp_path: Path, capsys: Capsys) -> None:
    build_file_tree(project, {"recipe.yaml": recipe(head="output_root: /srv/images")})
    assert validate(capsys)[0] == 1
    elsewhere = tmp_path / "elsewhere"
    assert main(["plan", "recipe.yaml", "--out", str(elsewhere)]) == 0
    assert f"output root {elsewhere}" in capsys.readouterr().out
    state = elsewhere / ".fluxbatch" / "images"
    assert main(["plan", "recipe.yaml", "--out", str(state)]) == 1
    assert capsys.readouterr().err == f"recipe.yaml: --out {state} {STATE}\n"


def test_a_recipe_in_a_state_directory_has_no_output_root_by_default(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    build_file_tree(tmp_path, {".fluxbatch/recipe.yaml": recipe()})
    monkeypatch.chdir(tmp_path / ".fluxbatch")
    assert validate(capsys) == (1, one_problem(
        f"recipe.yaml: the output root . (the recipe's folder) {STATE}"))


# -- the recipe file itself --------------------------------------------------------------------


def test_a_recipe_that_is_a_fifo_is_refused_without_waiting(project: Path) -> None:
    os.mkfifo(project / "recipe.yaml")
    assert validate_in_child(project) == (1, one_problem("recipe.yaml: the recipe is a FIFO (named "
                                               "pipe), not a regular file"))


def test_a_recipe_over_the_size_limit_is_refused(project: Path, capsys: Capsys) -> None:
    with open(project / "recipe.yaml", "wb") as handle:
        handle.write(recipe().encode())
        handle.truncate(MAX_RECIPE_BYTES + 1)
    assert validate(capsys) == (1, one_problem("recipe.yaml: the recipe is larger than the "
                                               "limit of 2 MiB"))


# -- the policy itself -------------------------------------------------------------------------


def test_system_paths_are_refused_even_inside_the_project() -> None:
    dev = Project(Path("/dev"), "/dev")
    with pytest.raises(ProjectFileError) as caught:
        dev.resolve("null")
    assert str(caught.value) == ("null resolves to /dev/null, under /dev, which a recipe may "
                                 "never name; " + READ_RULE)


# -- version control's folders and fluxbatch's state -----------------------------------------

# What `actions/checkout` leaves in .git/config: a link committed in a pull request must never
# turn it into prompts (printed by `plan --json`, sent to the provider, kept in the images).
TOKEN = "AUTHORIZATION: basic eC1hY2Nlc3MtdG9rZW46Z2hzX3NlY3JldA=="
CREDENTIALS = "version control keeps its settings and credentials there"


def git_dir(files: dict[str, str]) -> dict[str, str]:
    """A repository's own folder, as git lays it out, with the token in its config."""
    return {"HEAD": "ref: refs/heads/main\n", "objects/info/packs": "", "refs/heads/main": "",
            "config": f'[http "https://github.com/"]\n\textraheader = {TOKEN}\n', **files}


def checkout(project: Path, links: dict[str, str], files: dict[str, str] | None = None) -> None:
    """A CI checkout of the project, with the links a pull request committed."""
    build_file_tree(project, {f".git/{name}": text for name, text in git_dir({}).items()})
    build_file_tree(project, {".fluxbatch/inputs.json": "{}\n", "lists/ok.txt": "x\n",
                              **(files or {})})
    for name, target in links.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, project / name)


def image_recipe(matrix: str, params: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        name: r
        defaults: {{model: flux-kontext-pro}}
        jobs:
          - name: a
            prompt: x
            output: "{{{{ job }}}}/{{{{ combo | hash }}}}.png"
            matrix: {matrix}
            params: {params}
    """)


LEAK = "lists/leak.txt"
INTO_GIT = "resolves to {root}/.git/config, inside .git/, which a recipe may never read: " \
    + CREDENTIALS
PRIVATE_READS = [
    pytest.param({LEAK: "../.git/config"}, None, "{v: {from: lists/leak.txt}}",
                 "{}", "recipe.yaml:8:24: jobs[0].matrix.v.from: lists/leak.txt " + INTO_GIT,
                 id="from: a link to .git/config"),
    pytest.param({"lists/leak.csv": "../.git/config"}, None, "{rows: {from: lists/leak.csv}}",
                 "{}", "recipe.yaml:8:27: jobs[0].matrix.rows.from: lists/leak.csv " + INTO_GIT,
                 id="rows: a CSV table linked to .git/config"),
    pytest.param({"lists/leak.csv": "../.git/config"}, None,
                 "{v: {from: lists/leak.csv, column: v}}", "{}",
                 "recipe.yaml:8:24: jobs[0].matrix.v.from: lists/leak.csv " + INTO_GIT,
                 id="a CSV column linked to .git/config"),
    pytest.param({"photos/leak.png": "../.git/config"}, None, "{v: [x]}",
                 "{input_image: photos/leak.png}",
                 "recipe.yaml:9:27: jobs[0].params.input_image: photos/leak.png " + INTO_GIT,
                 id="an image input linked to .git/config"),
    pytest.param({}, {"shots.csv": "photo\n.git/config\n"},
                 "{rows: {from: shots.csv, files: [photo]}}", "{input_image: '{{ photo }}'}",
                 "recipe.yaml:8:27: jobs[0].matrix.rows.from: shots.csv:2: photo: .git/config "
                 + INTO_GIT, id="a files: column of a CSV table naming .git/config"),
    pytest.param({"photos/leak.png": "../.git/config"}, None, "{photo: {files: 'photos/*.png'}}",
                 "{input_image: '{{ photo }}'}",
                 "recipe.yaml:8:29: jobs[0].matrix.photo.files: photos/leak.png " + INTO_GIT,
                 id="a files: pattern matching a link to .git/config"),
    pytest.param({}, None, "{photo: {files: '.*/conf*'}}", "{input_image: '{{ photo }}'}",
                 "recipe.yaml:8:29: jobs[0].matrix.photo.files: '.*/conf*' would list .git/, "
                 "inside .git/, which a recipe may never read; a files: pattern matches only "
                 "files inside the recipe's project", id="a files: pattern that lists .git/"),
    pytest.param({}, None, "{v: {from: .git/config}}", "{}",
                 "recipe.yaml:8:24: jobs[0].matrix.v.from: .git/config " + INTO_GIT,
                 id="naming .git/config"),
    pytest.param({}, None, "{v: {from: lists/../.GIT/config}}", "{}",
                 "recipe.yaml:8:24: jobs[0].matrix.v.from: lists/../.GIT/config resolves to "
                 "{root}/.GIT/config, inside .git/, which a recipe may never read: "
                 + CREDENTIALS, id="naming .GIT/config, as a file system that ignores case would "
                 "open it"),
    pytest.param({"lists/hg.txt": "../.hg/hgrc"}, {".hg/hgrc": "[auth]\n"},
                 "{v: {from: lists/hg.txt}}", "{}",
                 "recipe.yaml:8:24: jobs[0].matrix.v.from: lists/hg.txt resolves to "
                 "{root}/.hg/hgrc, inside .hg/, which a recipe may never read: " + CREDENTIALS,
                 id="a link into .hg/"),
    pytest.param({}, {".svn/wc.db": "x\n"}, "{v: {from: .Svn./wc.db}}", "{}",
                 "recipe.yaml:8:24: jobs[0].matrix.v.from: .Svn./wc.db resolves to "
                 "{root}/.Svn./wc.db, inside .svn/, which a recipe may never read: "
                 + CREDENTIALS, id="naming .svn/ as Windows would open it"),
    pytest.param({"lists/state.txt": "../out/.fluxbatch/inputs.json"},
                 {"out/.fluxbatch/inputs.json": "{}\n"}, "{v: {from: lists/state.txt}}", "{}",
                 "recipe.yaml:8:24: jobs[0].matrix.v.from: lists/state.txt resolves to "
                 "{root}/out/.fluxbatch/inputs.json, inside .fluxbatch/, which a recipe may "
                 "never read: fluxbatch keeps its state there", id="a link into a state folder"),
]


@pytest.mark.parametrize("links,files,matrix,params,message", PRIVATE_READS)
def test_a_recipe_never_reads_version_control_or_state_folders(
        project: Path, capsys: Capsys, links: dict[str, str], files: dict[str, str] | None,
        matrix: str, params: str, message: str) -> None:
    checkout(project, links, files)
    build_file_tree(project, {"recipe.yaml": image_recipe(matrix, params)})
    code, err = validate(capsys)
    assert (code, err) == (1, one_problem(message.replace("{root}", real(project))))
    assert main(["plan", "recipe.yaml", "--json"]) == 1
    out, err = capsys.readouterr()
    assert (out, TOKEN in err) == ("", False)


def test_a_folder_a_git_file_points_to_is_never_read(project: Path, capsys: Capsys) -> None:
    """A worktree's, a submodule's or `--separate-git-dir`'s `.git` is a file naming the
    folder git keeps the repository in: that folder holds the token, whatever its name."""
    build_file_tree(project, {".git": "gitdir: vault\n", "lists/ok.txt": "x\n",
                              **{f"vault/{name}": text for name, text in git_dir({}).items()},
                              "recipe.yaml": image_recipe("{v: {from: lists/leak.txt}}", "{}")})
    os.symlink("../vault/config", project / LEAK)
    assert validate(capsys) == (1, one_problem(
        f"recipe.yaml:8:24: jobs[0].matrix.v.from: lists/leak.txt resolves to "
        f"{real(project)}/vault/config, inside {real(project)}/vault, a folder where git keeps "
        f"a repository, which a recipe may never read: {CREDENTIALS}"))


def test_an_output_root_is_never_in_version_control(project: Path, capsys: Capsys) -> None:
    checkout(project, {})
    build_file_tree(project, {"recipe.yaml": recipe(head="output_root: .git/hooks")})
    assert validate(capsys) == (1, one_problem(
        f"recipe.yaml:4:14: output_root: .git/hooks resolves to {real(project)}/.git/hooks, "
        f"inside .git/, which a recipe may never write into: {CREDENTIALS}"))


# -- files: patterns never list a folder outside the project ---------------------------------

OUT_OF_PROJECT = ("a files: pattern matches only files inside the recipe's project")


@pytest.mark.parametrize("pattern,message", [
    pytest.param("{../../../../etc,photos}/*",
                 "'{../../../../etc,photos}/*' would list ../, outside the recipe's project "
                 "({root}); " + OUT_OF_PROJECT, id="a brace that leads out"),
    pytest.param("photos/*/*", "'photos/*/*' would list photos/far/, outside the recipe's "
                 "project ({root}); " + OUT_OF_PROJECT, id="a linked folder matched by *"),
    pytest.param("photos/{x,../../*}/*",
                 "'photos/{x,../../*}/*' would list photos/../../, outside the recipe's "
                 "project ({root}); " + OUT_OF_PROJECT, id="dot-dot after a brace"),
])
def test_a_files_pattern_never_lists_a_folder_outside_the_project(
        project: Path, capsys: Capsys, pattern: str, message: str) -> None:
    """The listing itself is refused, so no name from outside is seen or said."""
    build_file_tree(project.parent, {"outside/secret-name.png": b"\x89PNG\r\n\x1a\n"})
    build_file_tree(project, {".git/HEAD": "ref: refs/heads/main\n", "photos/x/a.txt": "x",
                              "recipe.yaml": image_recipe(
                                  "{photo: {files: '" + pattern + "'}}",
                                  "{input_image: '{{ photo }}'}")})
    os.symlink("../../outside", project / "photos" / "far")
    code, err = validate(capsys)
    expected = "recipe.yaml:8:29: jobs[0].matrix.photo.files: " + message
    assert (code, err) == (1, one_problem(expected.replace("{root}", real(project))))
    assert "secret-name" not in err
