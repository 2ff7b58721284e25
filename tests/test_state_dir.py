"""The output root's state directory keeps itself out of version control: fluxbatch writes a
`.gitignore` of `*` into `.fluxbatch/` (as pytest does for its cache), never over a user's own,
and nothing that prunes the state removes it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fluxbatch.state.files import ignore_in_git
from tests.helpers import Cli

GITIGNORE = "# Written by fluxbatch: its state stays out of version control.\n*\n"


def git(root: Path, *args: str) -> str:
    """git in `root`, reading no configuration but the repository's own."""
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ["HOME"],
                   "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(["git", *args], cwd=root, env=environment, check=True,
                          capture_output=True, text=True).stdout


def untracked(root: Path) -> list[str]:
    return sorted(line[3:] for line in
                  git(root, "status", "--porcelain", "--untracked-files=all").splitlines())


def test_a_render_into_a_git_work_tree_leaves_its_state_out_of_git(cli: Cli) -> None:
    has_git = shutil.which("git") is not None
    if has_git:
        git(cli.root, "init", "-q")

    assert cli.render().code == 0

    state = cli.root / ".fluxbatch"
    assert (state / "state.sqlite").is_file()
    assert (state / ".gitignore").read_text(encoding="utf-8") == GITIGNORE
    assert [p.name for p in state.iterdir() if p.name.startswith(".gitignore")] == [".gitignore"]
    if has_git:
        assert untracked(cli.root) == ["grid/circle.png", "grid/square.png", "grid/star.png",
                                       "rebuild.manifest.json", "recipe.yaml", "solo/tree.png"]


def test_a_state_directory_from_an_earlier_release_gains_its_gitignore(rendered: Cli) -> None:
    ignore = rendered.root / ".fluxbatch" / ".gitignore"
    ignore.unlink()

    assert rendered.render().out == "nothing to render: 4 images up to date\n"
    assert ignore.read_text(encoding="utf-8") == GITIGNORE


def test_a_gitignore_of_the_users_own_is_never_replaced(cli: Cli) -> None:
    own = "# we commit the ledger\n!state.sqlite\n"
    (cli.root / ".fluxbatch").mkdir(parents=True)
    (cli.root / ".fluxbatch" / ".gitignore").write_text(own, encoding="utf-8")

    assert cli.render().code == 0
    assert (cli.root / ".fluxbatch" / ".gitignore").read_text(encoding="utf-8") == own


def test_clean_and_pruning_the_store_leave_the_gitignore_alone(rendered: Cli) -> None:
    rendered.write(shapes=("circle", "square"), colours=("red", "green"))  # an orphan: star

    assert rendered.clean("--delete").out.endswith("deleted 1 orphan\n")
    assert rendered.clean("--store", "--delete").out.splitlines()[-1].startswith(
        "removed 3 images (")
    assert (rendered.root / ".fluxbatch" / ".gitignore").read_text(encoding="utf-8") == GITIGNORE


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_a_gitignore_that_cannot_be_written_is_no_error(tmp_path: Path, where: str) -> None:
    directory = tmp_path / "state"
    if where == "a file":
        directory.write_text("not a folder", encoding="utf-8")

    ignore_in_git(directory)  # (a render goes on without it)

    assert not (directory / ".gitignore").exists()
