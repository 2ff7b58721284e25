"""`fluxbatch plan RECIPE --diff REF` and `gallery --diff`, in temporary git repositories: the
images a change adds, removes, changes and moves, why, what it costs, as a table, a
pull-request comment and JSON; the recipe's files read at the ref, under the same rules as
in the working tree; and nothing sent anywhere."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from fluxbatch import wire
from fluxbatch.commands.diff import MAX_COMMENT
from fluxbatch.main import main
from fluxbatch.state import read_state
from tests.helpers import SHOP_RECIPE, build_file_tree, commit, git, git_repository

Capsys = pytest.CaptureFixture[str]


SUBJECTS = "teapot\nkettle\nmug\n"


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shop recipe, committed on main; the tests run from the work tree's top."""
    root = git_repository(tmp_path / "shop", {"recipe.yaml": SHOP_RECIPE,
                                              "subjects.txt": SUBJECTS})
    monkeypatch.chdir(root)
    return root


@contextlib.contextmanager
def refusing_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every way out fails the test: a `Wire` (what talks to providers) gets a transport that
    fails if called, and so does any socket's connect."""
    attempts: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(str(request.url))
        raise AssertionError(f"a request was sent: {request.method} {request.url}")

    def no_connect(self: socket.socket, address: Any) -> None:
        attempts.append(repr(address))
        raise AssertionError(f"a connection was attempted: {address!r}")

    with monkeypatch.context() as patch:
        patch.setattr(wire.Wire, "open",
                      classmethod(lambda cls, *a, **k: cls(httpx.MockTransport(refuse))))
        patch.setattr(socket.socket, "connect", no_connect)
        yield attempts
    assert attempts == []


def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def render(capsys: Capsys, recipe: str = "recipe.yaml") -> None:
    code, _, err = run(capsys, "render", recipe, "-q")
    assert code == 0, err


def edit(repo: Path) -> None:
    """Add a value (cup), remove one (mug), and change a parameter of the hero shot."""
    (repo / "subjects.txt").write_text("teapot\nkettle\ncup\n")
    (repo / "recipe.yaml").write_text(SHOP_RECIPE.replace(
        'output: "{{ job }}/lighthouse.{{ ext }}"',
        'output: "{{ job }}/lighthouse.{{ ext }}"\n    params: {width: 1024}'))


# -- what a change does ---------------------------------------------------------------------


def test_adding_removing_and_changing_give_the_right_images_reasons_and_cost(
        repo: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    render(capsys)
    edit(repo)
    short = git(repo, "rev-parse", "--short=7", "main").strip()
    with refusing_network(monkeypatch):
        code, out, err = run(capsys, "plan", "recipe.yaml", "--diff", "main")
    assert (code, err) == (0, "")
    assert out == f"""\
recipe shop (recipe.yaml) against main ({short})
This change renders 3 images (~$0.12): 2 new, 1 changed; removes 2; 4 unchanged.
What changed: width 768 → 1024 (1 image).

CHANGE   JOB   VALUES       REP  OUTPUT               STATE    COST
added    mugs  subject=cup    1  mugs/cup-1.png       new    $0.040
added    mugs  subject=cup    2  mugs/cup-2.png       new    $0.040
removed  mugs  subject=mug    1  mugs/mug-1.png       -
removed  mugs  subject=mug    2  mugs/mug-2.png       -
changed  hero  -              1  hero/lighthouse.png  stale  $0.040
  ↳ the request changed: width 768 → 1024

JOB    ADDED  CHANGED  MOVED  REMOVED  UNCHANGED  TO RENDER  EST. COST
mugs       2        0      0        2          4          2     $0.080
hero       0        1      0        0          0          1     $0.040
total      2        1      0        2          4          3      $0.12
"""


def test_the_comment_for_a_pull_request_has_a_headline_a_table_and_the_details(
        repo: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    edit(repo)
    short = git(repo, "rev-parse", "--short=7", "main").strip()
    with refusing_network(monkeypatch):
        code, out, err = run(capsys, "plan", "recipe.yaml", "--diff", "main", "--format",
                             "markdown")
    assert (code, err) == (0, "")
    assert out == f"""\
<!-- fluxbatch plan --diff: recipe.yaml -->
### fluxbatch: `shop` (`recipe.yaml`) against `main` ({short})

This change renders **3 images (\\~\\$0.12)**: 2 new, 1 changed; removes 2; 4 unchanged.

What changed: `width 768 → 1024` (1 image).

| job | added | changed | moved | removed | unchanged | to render | est. cost |
|:--|--:|--:|--:|--:|--:|--:|--:|
| `mugs` | 2 | 0 | 0 | 2 | 4 | 2 | \\$0.080 |
| `hero` | 0 | 1 | 0 | 0 | 0 | 1 | \\$0.040 |
| **total** | 2 | 1 | 0 | 2 | 4 | 3 | \\$0.12 |

<details><summary>The 5 images that change</summary>

#### `mugs`

| | image | values | what changes |
|:--|:--|:--|:--|
| added | `mugs/cup-1.png` | `subject=cup #1` | new · \\$0.040 |
| added | `mugs/cup-2.png` | `subject=cup #2` | new · \\$0.040 |
| removed | `mugs/mug-1.png` | `subject=mug #1` |  |
| removed | `mugs/mug-2.png` | `subject=mug #2` |  |

#### `hero`

| | image | values | what changes |
|:--|:--|:--|:--|
| changed | `hero/lighthouse.png` | `- #1` | `width 768 → 1024` |

</details>
"""
    # the same change gives the same comment: CI updates it in place
    assert run(capsys, "plan", "recipe.yaml", "--diff", "main", "--format", "markdown")[1] == out


def test_json_is_the_same_data_for_other_tools(repo: Path, capsys: Capsys) -> None:
    edit(repo)
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main", "--format", "json")
    assert code == 0
    document = json.loads(out)
    assert document["base"] == {
        "ref": "main", "commit": git(repo, "rev-parse", "main").strip(), "path": "recipe.yaml",
        "exists": True, "renamed_from": None,
        "sha256": hashlib.sha256(SHOP_RECIPE.encode()).hexdigest()}
    assert [(i["change"], i["output"], i["pays"], i["changes"]) for i in document["images"]] == [
        ("added", "mugs/cup-1.png", True, []), ("added", "mugs/cup-2.png", True, []),
        ("removed", "mugs/mug-1.png", False, []), ("removed", "mugs/mug-2.png", False, []),
        ("changed", "hero/lighthouse.png", True, ["width 768 → 1024"])]
    hero = document["images"][-1]
    assert hero["was"]["key"] != hero["key"] and hero["estimated_usd"] == 0.04
    assert document["summary"] == {
        "added": 2, "changed": 1, "moved": 0, "removed": 2, "unchanged": 4, "to_render": 3,
        "free": 0, "estimated_usd": 0.12, "selection": None, "why": {"width 768 → 1024": 1},
        "headline": "This change renders 3 images (~$0.12): 2 new, 1 changed; removes 2; "
                    "4 unchanged."}
    assert document["by_job"]["hero"]["changed"] == 1
    assert out.count("\n") == 8 + 5  # each image that differs on a line of its own


def test_a_moved_image_is_not_paid_for_and_a_reverted_one_comes_from_the_ledger(
        repo: Path, capsys: Capsys) -> None:
    # rendered with width 1024 once, then reverted: the ledger holds those images
    (repo / "recipe.yaml").write_text(SHOP_RECIPE.replace("width: 768", "width: 1024"))
    render(capsys)
    (repo / "recipe.yaml").write_text(SHOP_RECIPE.replace("width: 768", "width: 1024")
                                      .replace('output: "{{ job }}/{{', 'output: "shop/{{'))
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main")
    assert code == 0
    lines = out.splitlines()
    assert lines[1:3] == [
        "This change renders no images; 7 images are placed at no cost; removes 6; 0 unchanged.",
        "What changed: width 768 → 1024 (1 image)."]
    assert lines[4:7] == [
        "CHANGE   JOB   VALUES          REP  OUTPUT               STATE       COST",
        "added    mugs  subject=kettle    1  shop/kettle-1.png    stored      free",
        "  ↳ the output root holds it: placed at no cost"]
    assert lines[-7:-5] == [
        "changed  hero  -                 1  hero/lighthouse.png  up-to-date  free",
        "  ↳ the request changed: width 768 → 1024; already rendered at its path"]
    # the same images at new paths: moved, not paid for
    commit(repo, "width 1024, in shop/")
    (repo / "recipe.yaml").write_text(SHOP_RECIPE.replace("width: 768", "width: 1024")
                                      .replace('output: "{{ job }}/{{', 'output: "all/{{'))
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "HEAD")
    assert out.splitlines()[1] == "This change renders no images; moves 6; 1 unchanged."
    assert out.splitlines()[4:6] == [
        "moved   mugs  subject=kettle    1  all/kettle-1.png  stored",
        "  ↳ moved from shop/kettle-1.png"]


def test_an_unchanged_recipe_says_so(repo: Path, capsys: Capsys) -> None:
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main")
    assert code == 0
    assert out.splitlines()[1:] == [
        "This change renders no images: its plan is the same as at main (7 images).", "",
        "JOB    ADDED  CHANGED  MOVED  REMOVED  UNCHANGED  TO RENDER  EST. COST",
        "mugs       0        0      0        0          6          0      $0.00",
        "hero       0        0      0        0          1          0      $0.00",
        "total      0        0      0        0          7          0      $0.00"]


def test_only_reviews_part_of_the_change(repo: Path, capsys: Capsys) -> None:
    edit(repo)
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main", "--only", "hero")
    assert code == 0
    short = git(repo, "rev-parse", "--short=7", "main").strip()
    assert out.splitlines()[:2] == [
        f"recipe shop (recipe.yaml) against main ({short}), --only hero",
        "This change renders 1 image (~$0.040): 1 changed; 0 unchanged."]
    code, _, err = run(capsys, "plan", "recipe.yaml", "--diff", "main", "--only", "subject=vase")
    assert code == 1 and err.startswith("fluxbatch: --only subject=vase: no image matches")


# -- the files a recipe reads, at the ref ---------------------------------------------------


def photo(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, "PNG")
    return buffer.getvalue()


EDIT_RECIPE = """\
version: 1
name: edits
provider: emulator
defaults: {model: flux-kontext-pro, output_format: png}
jobs:
  - name: looks
    prompt: "the same object as {{ look }}"
    matrix:
      photo: {files: "photos/*.png"}
      look: [a sketch]
    params: {input_image: "{{ photo }}"}
    output: "looks/{{ photo.stem }}.{{ ext }}"
  - name: fixes
    prompt: "{{ instruction }}"
    matrix:
      rows: {from: fixes.csv, files: [photo]}
    params: {input_image: "{{ photo }}"}
    output: "fixes/{{ photo.stem }}.{{ ext }}"
"""


def test_an_input_photo_edited_in_the_working_tree_shows_as_changed(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    red, blue = photo((200, 30, 30)), photo((30, 30, 200))
    root = git_repository(tmp_path / "edits", {
        "recipe.yaml": EDIT_RECIPE, "photos/mug.png": red, "photos/vase.png": red,
        "fixes.csv": "photo,instruction\nphotos/mug.png,remove the shadow\n"})
    monkeypatch.chdir(root)
    (root / "photos" / "mug.png").write_bytes(blue)  # edited, not committed
    (root / "fixes.csv").write_text("photo,instruction\nphotos/mug.png,remove the glare\n")
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main")
    assert code == 0
    old, new = (hashlib.sha256(data).hexdigest()[:12] for data in (red, blue))
    seeds = [re.findall(r"seed \d+ → \d+", line)[0] for line in out.splitlines()
             if line.startswith("  ↳")]
    assert out.splitlines()[1] == \
        "This change renders 2 images (~$0.080): 2 changed; 1 unchanged."
    # (a file of a matrix stands for its content in the seed too: a new photo, a new seed)
    assert [line for line in out.splitlines() if "↳" in line] == [
        f"  ↳ the request changed: input_image photos/mug.png (sha256 {old}…) → "
        f"photos/mug.png (sha256 {new}…); {seeds[0]}",
        '  ↳ the request changed: prompt "remove the shadow" → "remove the glare"; '
        f"input_image photos/mug.png (sha256 {old}…) → photos/mug.png (sha256 {new}…); "
        f"{seeds[1]}"]


def test_a_renamed_photo_changes_nothing(tmp_path: Path, capsys: Capsys,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = git_repository(tmp_path / "edits", {
        "recipe.yaml": EDIT_RECIPE, "photos/mug.png": photo((1, 2, 3)),
        "fixes.csv": "photo,instruction\nphotos/mug.png,remove the shadow\n"})
    monkeypatch.chdir(root)
    git(root, "mv", "photos/mug.png", "photos/cup.png")
    (root / "fixes.csv").write_text("photo,instruction\nphotos/cup.png,remove the shadow\n")
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main")
    assert code == 0
    assert out.splitlines()[1] == "This change renders no images; moves 2; 0 unchanged."


def test_a_link_at_the_ref_into_git_is_refused_as_in_the_working_tree(
        repo: Path, capsys: Capsys) -> None:
    (repo / "subjects.txt").unlink()
    os.symlink(".git/config", repo / "subjects.txt")
    commit(repo, "a list that is git's config")
    (repo / "subjects.txt").unlink()
    (repo / "subjects.txt").write_text(SUBJECTS)  # the working tree is fine
    code, out, err = run(capsys, "plan", "recipe.yaml", "--diff", "HEAD")
    assert (code, out) == (1, "")
    assert err == (
        "fluxbatch: the recipe at HEAD (recipe.yaml) does not load, so there is nothing to "
        "compare with:\n"
        "HEAD:recipe.yaml:10:23: jobs[0].matrix.subject.from: subjects.txt resolves to "
        "HEAD:.git/config, inside .git/, which a recipe may never read: version control keeps "
        "its settings and credentials there\n")


def test_a_link_at_the_ref_out_of_the_project_is_refused(repo: Path, capsys: Capsys) -> None:
    outside = repo.parent / "secret.txt"
    outside.write_text("hunter2\n")
    (repo / "subjects.txt").unlink()
    os.symlink("../secret.txt", repo / "subjects.txt")
    commit(repo, "a list outside")
    (repo / "subjects.txt").unlink()
    (repo / "subjects.txt").write_text(SUBJECTS)
    code, _, err = run(capsys, "plan", "recipe.yaml", "--diff", "HEAD")
    assert code == 1
    assert err == (
        "fluxbatch: the recipe at HEAD (recipe.yaml) does not load, so there is nothing to "
        "compare with:\n"
        "HEAD:recipe.yaml:10:23: jobs[0].matrix.subject.from: subjects.txt resolves to "
        "HEAD:../secret.txt, outside the recipe's project (HEAD:.); a recipe may read only "
        "files inside its project\n")


def test_a_recipe_in_a_subfolder_reads_the_project_at_the_ref(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    root = git_repository(tmp_path / "studio", {
        "recipes/shop.yaml": SHOP_RECIPE.replace("from: subjects.txt",
                                                 "from: ../lists/subjects.txt"),
        "lists/subjects.txt": SUBJECTS})
    monkeypatch.chdir(tmp_path)
    (root / "lists" / "subjects.txt").write_text("teapot\n")
    code, out, _ = run(capsys, "plan", "studio/recipes/shop.yaml", "--diff", "main")
    assert code == 0
    assert out.splitlines()[1] == "This change renders no images; removes 4; 3 unchanged."


def test_a_file_kept_in_git_lfs_is_read_from_the_local_lfs_store(
        repo: Path, capsys: Capsys) -> None:
    red = photo((200, 30, 30))
    oid = hashlib.sha256(red).hexdigest()
    build_file_tree(repo, {
        "recipe.yaml": EDIT_RECIPE.split("  - name: fixes")[0],
        "photos/mug.png": f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\n"
                          f"size {len(red)}\n"})
    commit(repo, "a photo in LFS")
    store = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4]
    store.mkdir(parents=True)
    (store / oid).write_bytes(red)
    (repo / "photos" / "mug.png").write_bytes(red)  # as git lfs checks it out
    code, out, err = run(capsys, "plan", "recipe.yaml", "--diff", "HEAD")
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == "This change renders no images: its plan is the same as " \
        "at HEAD (1 image)."


# -- refs that cannot be read ---------------------------------------------------------------


def test_an_unknown_ref_is_one_line(repo: Path, capsys: Capsys) -> None:
    assert run(capsys, "plan", "recipe.yaml", "--diff", "mian") == (
        1, "", "fluxbatch: --diff mian: this repository has no commit, branch or tag of that "
               "name (`git branch -a` lists the branches, a remote's once fetched)\n")


def test_a_branch_known_only_as_a_remotes_is_suggested(repo: Path, tmp_path: Path,
                                                      capsys: Capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    git(repo, "checkout", "-q", "-b", "cups")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--branch", "cups", repo.as_uri(), str(clone))
    monkeypatch.chdir(clone)
    assert git(clone, "branch").split() == ["*", "cups"]  # (main only as origin/main)
    assert run(capsys, "plan", "recipe.yaml", "--diff", "main") == (
        1, "", "fluxbatch: --diff main: this repository has no commit, branch or tag of that "
               "name (did you mean origin/main?)\n")
    assert run(capsys, "plan", "recipe.yaml", "--diff", "origin/main")[0] == 0


def test_a_repository_without_a_commit_has_nothing_to_compare_with(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": SHOP_RECIPE, "subjects.txt": SUBJECTS})
    git(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "plan", "recipe.yaml", "--diff", "HEAD") == (
        1, "", "fluxbatch: --diff HEAD: this repository has no commit yet: there is nothing "
               "to compare with\n")


def test_a_ref_that_looks_like_an_option_is_refused(repo: Path, capsys: Capsys) -> None:
    assert run(capsys, "plan", "recipe.yaml", "--diff=--output=x") == (
        1, "", "fluxbatch: --diff '--output=x': not a git ref (a branch, a tag or a commit)\n")
    assert not (repo / "x").exists()


def test_a_shallow_clone_without_the_ref_says_how_to_fetch_it(
        repo: Path, tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    edit(repo)
    commit(repo, "the change")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--depth=1", repo.as_uri(), str(clone))
    monkeypatch.chdir(clone)
    assert run(capsys, "plan", "recipe.yaml", "--diff", "origin/main~1") == (
        1, "", "fluxbatch: --diff origin/main~1: this clone is shallow (only the last commits "
               "were fetched) and does not have origin/main~1; fetch it first: `git fetch "
               "--depth=1 origin main~1`, or actions/checkout with fetch-depth: 0\n")


def test_a_recipe_new_since_the_ref_is_all_added_and_says_so(repo: Path, capsys: Capsys) -> None:
    shutil.copy(repo / "recipe.yaml", repo / "more.yaml")
    code, out, _ = run(capsys, "plan", "more.yaml", "--diff", "main")
    assert code == 0
    assert out.splitlines()[1:3] == [
        "more.yaml did not exist at main: every image is added.",
        "This change renders 7 images (~$0.28): 7 new; 0 unchanged."]


def test_a_recipe_moved_since_the_ref_is_compared_with_where_it_was(
        repo: Path, capsys: Capsys) -> None:
    (repo / "recipes").mkdir()
    git(repo, "checkout", "-q", "-b", "tidy")
    git(repo, "mv", "recipe.yaml", "recipes/shop.yaml")
    (repo / "recipes" / "shop.yaml").write_text(
        SHOP_RECIPE.replace("from: subjects.txt", "from: ../subjects.txt"))
    commit(repo, "recipes in a folder")
    code, out, _ = run(capsys, "plan", "recipes/shop.yaml", "--diff", "main")
    assert code == 0
    assert out.splitlines()[1:3] == [
        "The recipe was recipe.yaml at main.",
        "This change renders no images: its plan is the same as at main (7 images)."]


def test_outside_a_git_work_tree_is_one_line(tmp_path: Path, capsys: Capsys) -> None:
    build_file_tree(tmp_path / "loose", {"recipe.yaml": SHOP_RECIPE, "subjects.txt": SUBJECTS})
    code, out, err = run(capsys, "plan", str(tmp_path / "loose" / "recipe.yaml"), "--diff", "main")
    assert (code, out) == (1, "")
    assert re.fullmatch(r"fluxbatch: --diff main: the recipe is not in a git work tree \(.*"
                        r"loose: not a git repository.*\)\n", err)


def test_a_partial_clone_fetches_nothing(repo: Path, tmp_path: Path, capsys: Capsys,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    edit(repo)
    commit(repo, "the change")
    git(repo, "config", "uploadpack.allowFilter", "true")
    clone = tmp_path / "partial"
    git(tmp_path, "clone", "-q", "--filter=blob:none", repo.as_uri(), str(clone))
    monkeypatch.chdir(clone)
    old = git(clone, "rev-parse", "HEAD~1:recipe.yaml").strip()
    code, out, err = run(capsys, "plan", "recipe.yaml", "--diff", "HEAD~1")
    assert (code, out) == (1, "")
    assert err.startswith("fluxbatch: --diff HEAD~1: this clone does not have the content of "
                          "recipe.yaml at HEAD~1 (a partial clone), and fluxbatch fetches "
                          "nothing; ")
    # still not fetched (asked without letting git fetch it either)
    assert git(clone, "-c", "protocol.allow=never", "cat-file", "--batch-check",
               "--batch-all-objects").find(old) == -1


def test_usage_errors(repo: Path, capsys: Capsys) -> None:
    assert run(capsys, "plan", "recipe.yaml", "--format", "markdown")[::2] == (
        2, "fluxbatch: plan --format markdown: a comment is of a change; add --diff REF\n")
    assert run(capsys, "plan", "recipe.yaml", "--diff", "main", "--jsonl")[::2] == (
        2, "fluxbatch: plan --diff: --jsonl is not available; use --format json\n")
    assert run(capsys, "gallery", "recipe.yaml", "--diff", "main", "--rows", "subject")[0] == 2


# -- a comment for any change ---------------------------------------------------------------


def test_a_20000_image_change_fits_one_comment_with_its_summary(
        tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    big = SHOP_RECIPE.replace("replicates: 2", "replicates: 20").replace(
        "name: shop\n", "name: shop\nmax_jobs: 100000\n")
    root = git_repository(tmp_path / "big", {
        "recipe.yaml": big, "subjects.txt": "".join(f"subject {n}\n" for n in range(600))})
    monkeypatch.chdir(root)
    (root / "subjects.txt").write_text("".join(f"subject {n}\n" for n in range(100, 1100)))
    (root / "recipe.yaml").write_text(big.replace("width: 768", "width: 1024"))
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main", "--format", "markdown")
    assert code == 0
    assert len(out.encode("utf-8")) <= MAX_COMMENT
    assert "This change renders **20,001 images (\\~\\$800.04)**: 10,000 new, 10,001 changed; " \
        "removes 2,000; 0 unchanged." in out
    assert "| **total** | 10,000 | 10,001 | 0 | 2,000 | 0 | 20,001 | \\$800.04 |" in out
    assert re.search(r"\n… and [\d,]+ more, left out to fit one comment: `fluxbatch plan "
                     r"recipe.yaml --diff main` lists them all.\n\n</details>\n$", out)
    listed = out.count("\n| added |") + out.count("\n| changed |") + out.count("\n| removed |")
    assert listed > 100 and f"… and {22001 - listed:,} more" in out


def test_values_from_a_pull_request_cannot_format_the_comment(
        repo: Path, capsys: Capsys) -> None:
    (repo / "subjects.txt").write_text(
        "teapot\nkettle\nmug\n`a|b` @maintainer </details><img src=x>\n")
    code, out, _ = run(capsys, "plan", "recipe.yaml", "--diff", "main", "--format", "markdown")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("| added") and "#1" in line)
    assert row == ("| added | `mugs/a-b-maintainer-details-img-src-x-1.png` | "
                   "``subject=`a\\|b` @maintainer </details><… #1`` | new · \\$0.040 |")
    assert out.count("</details>") == 3  # its own, and inside the two replicates' code spans
    assert out.count("@maintainer") == 2  # inside code spans only (the second replicate's)


# -- before and after ------------------------------------------------------------------------


def sheet_rows(page: str) -> list[tuple[str, ...]]:
    """Each row of the before/after sheet: its label, and what each cell shows (an image's
    link, or a marker's state)."""
    rows = []
    row = r"<tr><th>((?:(?!<th>).)*?)</th><td>(.*?)</td><td>(.*?)</td></tr>"
    for label, *cells in re.findall(row, page):
        shown = []
        for cell in cells:
            found = re.search(r'<img loading=lazy src="([^"]+)"|data-state="([^"]+)"', cell)
            assert found is not None, cell
            shown.append(found[1] or found[2])
        rows.append((re.sub(r"<div class=notes>.*", "", label), *shown))
    return rows


def test_gallery_diff_shows_each_changed_image_before_and_after(
        repo: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    render(capsys)
    (repo / "hero" / "lighthouse.png").unlink()  # before comes from the content store then
    edit(repo)
    hero = json.loads(run(capsys, "plan", "recipe.yaml", "--diff", "main", "--format",
                          "json")[1])["images"][-1]
    blob = read_state(repo, "shop").tasks[hero["was"]["key"]].blob
    assert blob is not None
    with refusing_network(monkeypatch):
        code, out, err = run(capsys, "gallery", "recipe.yaml", "--diff", "main", "--png",
                             "sheet.png")
    assert (code, err) == (0, "")
    assert out == ("wrote shop.gallery-diff.html (5 images, 3 of them with a picture before "
                   "or after)\n"
                   f"wrote sheet.png ({Image.open(repo / 'sheet.png').width:,} × "
                   f"{Image.open(repo / 'sheet.png').height:,} px)\n")
    page = (repo / "shop.gallery-diff.html").read_text()
    assert sheet_rows(page) == [
        ("cup-1.png", "added", "not rendered yet"),
        ("cup-2.png", "added", "not rendered yet"),
        ("mug-1.png", "mugs/mug-1.png", "removed"),
        ("mug-2.png", "mugs/mug-2.png", "removed"),
        ("lighthouse.png", f".fluxbatch/blobs/{blob[:2]}/{blob}", "not rendered yet")]
    assert "<h1>shop: 5 images differ from main (" in page
    assert "width 768 → 1024" in page
    # rendered, the after column fills in
    render(capsys)
    assert run(capsys, "gallery", "recipe.yaml", "--diff", "main")[0] == 0
    assert [row[2] for row in sheet_rows((repo / "shop.gallery-diff.html").read_text())] == [
        "mugs/cup-1.png", "mugs/cup-2.png", "removed", "removed", "hero/lighthouse.png"]


def test_gallery_diff_before_any_render_marks_what_is_not_there(
        repo: Path, capsys: Capsys) -> None:
    edit(repo)
    code, out, _ = run(capsys, "gallery", "recipe.yaml", "--diff", "main", "-o", "diff.html")
    assert (code, out) == (0, "wrote diff.html (5 images, 0 of them with a picture before or "
                              "after)\n")
    assert [row[1:] for row in sheet_rows((repo / "diff.html").read_text())] == [
        ("added", "not rendered yet"), ("added", "not rendered yet"),
        ("not in the store", "removed"), ("not in the store", "removed"),
        ("not in the store", "not rendered yet")]


def test_gallery_diff_of_an_unchanged_recipe_says_so(repo: Path, capsys: Capsys) -> None:
    assert run(capsys, "gallery", "recipe.yaml", "--diff", "main", "--png", "none.png") == (
        0, "wrote shop.gallery-diff.html (no image differs from main)\n"
           "wrote none.png (368 × 76 px)\n", "")


def test_gallery_diff_reads_no_blob_through_a_link(repo: Path, capsys: Capsys,
                                                   tmp_path: Path) -> None:
    render(capsys)
    (repo / "hero" / "lighthouse.png").unlink()
    edit(repo)
    blobs = repo / ".fluxbatch" / "blobs"
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(blobs), elsewhere)
    os.symlink(elsewhere, blobs)
    assert run(capsys, "gallery", "recipe.yaml", "--diff", "main")[0] == 0
    rows = sheet_rows((repo / "shop.gallery-diff.html").read_text())
    assert rows[-1] == ("lighthouse.png", "not in the store", "not rendered yet")
