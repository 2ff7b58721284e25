"""The plan cache: a null build reads back the plan it expanded last time, and sees every
change to what the plan is made of (the recipe, its `from:` files and CSV tables, its image
inputs, fluxbatch's version and its model catalogue). A damaged or hostile cache file is
ignored, and a plan read back is trusted only to find that nothing needs doing."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from fluxbatch import plan_cache
from fluxbatch.emulator import Emulator
from fluxbatch.front import load_plan
from fluxbatch.main import main
from fluxbatch.state.store import Store
from tests.helpers import build_file_tree

Capsys = pytest.CaptureFixture[str]

RECIPE = """\
    version: 1
    name: cached
    provider: emulator
    defaults: {model: flux-kontext-pro}
    jobs:
      - name: words
        prompt: "a {{ word }} in {{ colour }}"
        matrix:
          word: {from: words.txt}
          colour: {from: colours.csv, column: colour}
        output: "words/{{ word }}-{{ colour }}.{{ ext }}"
      - name: looks
        prompt: "the same object, as a sketch"
        matrix:
          photo: {files: "photos/*.png"}
        params: {input_image: "{{ photo }}"}
        output: "looks/{{ photo.stem }}.{{ ext }}"
      - name: redrawn
        prompt: "the reference, redrawn"
        params: {input_image: "ref/{{ 'base' }}.png"}
        output: "redrawn.{{ ext }}"
    """


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def render(emulator: Emulator) -> Callable[..., int]:
    def run(recipe: Path, *options: str) -> int:
        return main(["render", str(recipe), "--base-url", emulator.base_url, *options])
    return run


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, emulator: Emulator) -> Path:
    """The project, its 7 images rendered once per module."""
    root = tmp_path_factory.mktemp("rendered") / "project"
    build_file_tree(root, {
        "recipe.yaml": RECIPE,
        "words.txt": "kettle\nteapot\n",
        "colours.csv": "colour,note\nred,warm\nblue,cold\n",
        "photos/mug.png": png((200, 40, 40)),
        "photos/vase.png": png((40, 40, 200)),
        "ref/base.png": png((90, 90, 90)),
    })
    (root / ".git").mkdir()  # the project: this folder
    assert main(["render", str(root / "recipe.yaml"), "--base-url", emulator.base_url,
                 "-q"]) == 0
    return root


@pytest.fixture
def project(rendered: Path, tmp_path: Path, render: Callable[..., int]) -> Path:
    """A copy of the rendered project (with its files' times: as up to date as the
    original), whose plan the null build of the copy has kept."""
    root = tmp_path / "project"
    shutil.copytree(rendered, root, symlinks=True)
    recipe = root / "recipe.yaml"
    assert not load_plan(recipe, reuse=True).reused  # (kept for the original's path)
    assert render(recipe, "-q") == 0
    assert load_plan(recipe, reuse=True).reused
    return recipe


def status(recipe: Path, capsys: Capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["status", str(recipe)])
    return code, capsys.readouterr().out


def states(text: str) -> list[str]:
    """The STATE table's rows of `status`, as `state count`."""
    lines = text.splitlines()
    rows = lines[lines.index("STATE       IMAGES") + 1:]
    return [" ".join(row.split()) for row in rows if not row.startswith("everything")]


def test_a_null_build_reads_the_plan_back(
        project: Path, capsys: Capsys, render: Callable[..., int]) -> None:
    capsys.readouterr()
    assert render(project) == 0
    assert capsys.readouterr().out == "nothing to render: 7 images up to date\n"
    plan = load_plan(project, reuse=True)
    fresh = load_plan(project)
    assert plan.reused and not fresh.reused
    assert [(j.index, j.job, dict(j.vars), j.replicate, j.model, j.seed, j.key, j.output,
             j.combination) for j in plan.jobs] == \
        [(j.index, j.job, dict(j.vars), j.replicate, j.model, j.seed, j.key, j.output,
          j.combination) for j in fresh.jobs]
    assert [dict(job.request) for job in plan.jobs] == [dict(job.request) for job in fresh.jobs]
    code, text = status(project, capsys)
    assert (code, states(text), text.splitlines()[-1]) == (
        0, ["up-to-date 7"], "everything is up to date")


def _edit_recipe(root: Path) -> None:
    path = root / "recipe.yaml"
    path.write_text(path.read_text().replace("the reference, redrawn", "the reference, inked"))


def _edit_words(root: Path) -> None:
    (root / "words.txt").write_text("kettle\njug\n")


def _edit_csv(root: Path) -> None:
    (root / "colours.csv").write_text("colour,note\nred,warm\ngreen,cold\n")


def _edit_photo(root: Path) -> None:
    (root / "photos" / "vase.png").write_bytes(png((40, 200, 40)))


def _add_photo(root: Path) -> None:
    (root / "photos" / "cup.png").write_bytes(png((10, 10, 10)))


def _edit_reference(root: Path) -> None:
    (root / "ref" / "base.png").write_bytes(png((250, 250, 250)))


@pytest.mark.parametrize(("edit", "seen"), [
    (_edit_recipe, ["up-to-date 6", "stale 1"]),
    (_edit_words, ["up-to-date 5", "new 2", "orphaned 2"]),
    (_edit_csv, ["up-to-date 5", "new 2", "orphaned 2"]),
    (_edit_photo, ["up-to-date 6", "stale 1"]),
    (_add_photo, ["up-to-date 7", "new 1"]),
    (_edit_reference, ["up-to-date 6", "stale 1"]),
], ids=["recipe", "from-file", "csv", "input-photo", "new-photo", "templated-input"])
def test_a_null_build_sees_each_kind_of_input_change(
        project: Path, capsys: Capsys, edit: Callable[[Path], None], seen: list[str],
        render: Callable[..., int]) -> None:
    edit(project.parent)
    assert not load_plan(project, reuse=True).reused
    code, text = status(project, capsys)
    assert (code, states(text)) == (1, seen)
    capsys.readouterr()
    assert render(project, "-q") == 0
    assert status(project, capsys)[0] == 0 or seen[-1].startswith("orphaned")
    assert load_plan(project, reuse=True).reused  # (kept again, as it is now)


def test_a_new_fluxbatch_version_or_catalogue_expands_again(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_cache, "__version__", "999.0")
    assert not load_plan(project, reuse=True).reused
    monkeypatch.undo()
    assert load_plan(project, reuse=True).reused
    changed = [*plan_cache._code(), ["bfl-openapi-2099-01-01.json", 1, 1]]
    monkeypatch.setattr(plan_cache, "_code", lambda: changed)
    assert not load_plan(project, reuse=True).reused


def test_a_change_to_the_projects_own_catalogue_expands_again(
        project: Path, render: Callable[..., int]) -> None:
    """`fluxbatch.models.json` (the project's own models) is read like any file a recipe
    reads: adding, editing or removing it changes what the plan is made of."""
    catalogue = project.parent / "fluxbatch.models.json"
    schema = {"type": "object", "properties": {"prompt": {"type": "string"}}}

    def write(*names: str) -> None:
        catalogue.write_text(json.dumps({"fluxbatch_models": 1, "added_from": [], "models": {
            name: {"schema": schema} for name in names}}))

    write("flux-x")
    assert not load_plan(project, reuse=True).reused
    assert render(project, "-q") == 0
    assert load_plan(project, reuse=True).reused
    write("flux-x", "flux-y")
    assert not load_plan(project, reuse=True).reused
    assert render(project, "-q") == 0
    catalogue.unlink()
    assert not load_plan(project, reuse=True).reused


def test_the_code_signature_covers_the_model_catalogue() -> None:
    from fluxbatch import models

    names = [name for name, _, _ in plan_cache._code()]
    assert models.SPEC_FILE in names and models.DEPRECATED_FILE in names
    assert "models.py" in names and "expand.py" in names and "templates.py" in names


def cache_file(recipe: Path) -> Path:
    return recipe.parent / ".fluxbatch" / "plan.cached.json"


@pytest.mark.parametrize("damage", [
    lambda data: data[:len(data) // 2],
    lambda data: data.replace(b"words/kettle", b"words/kettlf"),
    lambda data: b"",
    lambda data: b"\x00" * 64,
    lambda data: data.replace(b"fluxbatch plan cache 1", b"fluxbatch plan cache 7"),
], ids=["truncated", "changed", "empty", "zeros", "other-format"])
def test_a_damaged_cache_is_ignored_and_rebuilt(
        project: Path, capsys: Capsys, damage: Callable[[bytes], bytes],
        render: Callable[..., int]) -> None:
    path = cache_file(project)
    path.write_bytes(damage(path.read_bytes()))
    assert not load_plan(project, reuse=True).reused
    capsys.readouterr()
    assert render(project) == 0
    assert capsys.readouterr().out == "nothing to render: 7 images up to date\n"
    assert load_plan(project, reuse=True).reused


def rewrite(recipe: Path, change: Callable[[dict[str, object]], None]) -> None:
    """The cache file with `change` made to its document, and a header that matches it
    (as anyone who can write to the output root can make one)."""
    path = cache_file(recipe)
    _, _, body = path.read_bytes().partition(b"\n")
    document = json.loads(body)
    change(document)
    body = json.dumps(document).encode()
    import hashlib

    path.write_bytes(b"fluxbatch plan cache 1 " + hashlib.sha256(body).hexdigest().encode()
                     + b"\n" + body)


@pytest.mark.parametrize("change", [
    lambda d: d["outputs"].__setitem__(0, "../../outside.png"),
    lambda d: d["outputs"].__setitem__(0, ".fluxbatch/state.sqlite"),
    lambda d: d["outputs"].__setitem__(0, "/etc/passwd"),
    lambda d: d["seeds"].__setitem__(0, "12"),
    lambda d: d["keys"].pop(),
    lambda d: d["expanded"].append(["../outside.png", "0" * 64]),
    lambda d: d.__setitem__("basis", "0" * 64),
    lambda d: d["notes"].append(["x", "1", None, "", "m"]),
    lambda d: d.__setitem__("requests", None),
], ids=["leaves-root", "state-dir", "absolute", "seed-type", "short-column",
        "input-outside", "other-basis", "note-type", "no-requests"])
def test_a_cache_that_does_not_match_exactly_is_not_used(
        project: Path, change: Callable[[dict[str, object]], None]) -> None:
    rewrite(project, change)
    assert not load_plan(project, reuse=True).reused


def test_a_lying_cache_is_trusted_only_to_find_nothing_to_do(
        project: Path, capsys: Capsys, render: Callable[..., int]) -> None:
    """A cache of the right basis that says an image is of another request: the render
    finds something to do with it, so it expands again, and the fresh plan says every
    image is up to date. Nothing is sent, and the cache is made right."""
    rewrite(project, lambda d: d["keys"].__setitem__(0, "f" * 64))
    assert load_plan(project, reuse=True).reused
    assert status(project, capsys)[0] == 0
    capsys.readouterr()
    assert render(project, "--dry-run") == 0
    assert "would submit 0 images" in capsys.readouterr().out
    assert render(project) == 0
    assert capsys.readouterr().out == "nothing to render: 7 images up to date\n"
    plan = load_plan(project, reuse=True)
    assert plan.reused and plan.jobs[0].key == load_plan(project).jobs[0].key


def test_a_file_swapped_for_a_link_out_of_the_project_is_refused(
        project: Path, tmp_path: Path, capsys: Capsys, render: Callable[..., int]) -> None:
    """The same content, through a link that leaves the project: the cache's key does not
    change, but loading checks every file again."""
    outside = tmp_path / "outside"
    outside.mkdir()
    words = project.parent / "words.txt"
    (outside / "words.txt").write_bytes(words.read_bytes())
    words.unlink()
    words.symlink_to(outside / "words.txt")
    capsys.readouterr()
    assert render(project) == 1
    assert capsys.readouterr().err == (
        f"{project}:9:20: jobs[0].matrix.word.from: words.txt resolves to {outside}/words.txt, "
        f"outside the recipe's project ({project.parent}); a recipe may read only files "
        "inside its project\n")


def test_an_output_folder_swapped_for_a_link_out_of_the_root_is_refused(
        project: Path, tmp_path: Path, capsys: Capsys, render: Callable[..., int]) -> None:
    outside = tmp_path / "elsewhere"
    folder = project.parent / "looks"
    folder.rename(outside)
    folder.symlink_to(outside, target_is_directory=True)
    capsys.readouterr()
    assert render(project) == 1
    assert capsys.readouterr().err == "".join(
        f"{project}:17:13: jobs[1].output: output path 'looks/{name}.png' leaves the output "
        "root through a symbolic link\n" for name in ("mug", "vase"))


def test_a_cache_file_is_never_read_through_a_link(project: Path, tmp_path: Path) -> None:
    path = cache_file(project)
    kept = tmp_path / "kept.json"
    path.rename(kept)
    path.symlink_to(kept)
    assert not load_plan(project, reuse=True).reused


def test_a_plan_over_max_jobs_read_back_still_needs_yes(
        project: Path, capsys: Capsys, render: Callable[..., int]) -> None:
    path = project
    path.write_text(path.read_text().replace("provider: emulator",
                                             "provider: emulator\nmax_jobs: 8"))
    capsys.readouterr()
    assert render(project, "-q") == 0  # 7 images: within the limit, kept
    assert load_plan(project, reuse=True).reused
    (project.parent / "words.txt").write_text("kettle\nteapot\njug\n")  # 9 images
    assert render(project, "-q") != 0
    assert "max_jobs" in capsys.readouterr().err
    assert render(project, "-q", "--yes") == 0
    with pytest.raises(Exception, match="max_jobs"):
        load_plan(project, reuse=True)
    assert load_plan(project, reuse=True, yes=True).reused


def test_the_cache_lives_in_the_state_directory_written_whole(project: Path) -> None:
    path = cache_file(project)
    assert path.is_file()
    assert os.listdir(path.parent / "tmp") == []
    with Store.open(project.parent) as store:  # (the root is a render's, as before)
        assert store.placed_outputs("cached")
