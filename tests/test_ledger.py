"""An image is its key: what was paid for is never paid for again, wherever it is needed.
Each case below paid again, or lost paid work, before the ledger was keyed by the job key."""

from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
from pathlib import Path

import pytest

from fluxbatch.emulator import Emulator
from fluxbatch.front import load_plan
from fluxbatch.main import main
from fluxbatch.state import migrations
from tests.helpers import build_file_tree

Capsys = pytest.CaptureFixture[str]


def recipe(name: str = "mugs", output: str = "renders/{{ subject }}-{{ style }}.{{ ext }}",
           subjects: str = "[teapot, kettle, mug]") -> str:
    return textwrap.dedent(f"""\
        version: 1
        name: {name}
        provider: emulator
        output: "{output}"
        defaults: {{model: flux-pro-1.1, width: 256, height: 256, output_format: png}}
        jobs:
          - name: mugs
            prompt: "a {{{{ subject }}}}, {{{{ style }}}}"
            matrix:
              subject: {subjects}
              style: [watercolor, photo]
        """)


def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def render(capsys: Capsys, emulator: Emulator, path: Path, *options: str) -> tuple[int, str]:
    code, out, err = run(capsys, "render", str(path), "--base-url", emulator.base_url, "-q",
                         *options)
    return code, out + err


def pngs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))
            if ".fluxbatch" not in p.parts}


def test_a_reproduce_recipe_places_the_image_free_and_its_clean_deletes_nothing_else(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": recipe()})
    assert render(capsys, emulator, tmp_path / "recipe.yaml")[0] == 0
    before, paid = pngs(tmp_path), len(emulator.submissions)

    again = tmp_path / "again.yaml"
    assert run(capsys, "reproduce", str(tmp_path / "renders" / "mug-watercolor.png"),
               "-o", str(again))[0] == 0
    assert "name: mugs-mug-watercolor" in again.read_text()
    assert run(capsys, "reproduce", str(tmp_path / "renders" / "mug-watercolor.png"),
               "-o", str(again)) == (1, "", f"fluxbatch: {again} exists: choose another file, "
                                            "or pass --force to replace it\n")
    assert render(capsys, emulator, again) == (0, "nothing to render: 1 image up to date\n")
    assert run(capsys, "clean", str(again), "--delete")[1] == (
        "no orphans: every image of this recipe belongs to a job in it\n")

    assert len(emulator.submissions) == paid  # the same key: nothing paid
    assert pngs(tmp_path) == before  # and none of the original's images touched
    assert run(capsys, "status", str(tmp_path / "recipe.yaml"))[0] == 0
    assert run(capsys, "status", str(again))[0] == 0


def test_renaming_the_outputs_places_the_images_again_without_paying(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": recipe()})
    assert render(capsys, emulator, tmp_path / "recipe.yaml")[0] == 0
    paid = len(emulator.submissions)

    build_file_tree(tmp_path, {"recipe.yaml": recipe(
        output="by-style/{{ style }}/{{ subject }}.{{ ext }}")})
    code, said = render(capsys, emulator, tmp_path / "recipe.yaml")
    assert (code, said) == (0, f"6 written (6 from images already paid for); nothing paid; "
                               f"manifest {tmp_path / 'mugs.manifest.json'}\n")
    assert len(emulator.submissions) == paid
    assert sorted(pngs(tmp_path / "by-style")) == [
        "photo/kettle.png", "photo/mug.png", "photo/teapot.png", "watercolor/kettle.png",
        "watercolor/mug.png", "watercolor/teapot.png"]
    code, out, _ = run(capsys, "clean", str(tmp_path / "recipe.yaml"), "--delete")
    assert out.endswith("deleted 6 orphans\n")
    assert not (tmp_path / "renders").exists()


def test_two_outputs_of_one_request_are_paid_for_once(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": textwrap.dedent("""\
        version: 1
        name: twins
        provider: emulator
        defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: png, seed: 7}
        jobs:
          - {name: left, prompt: "a mug", seed: 7, output: "left.png"}
          - {name: right, prompt: "a mug", seed: 7, output: "right.png"}
        """).replace("output_format: png, seed: 7", "output_format: png")})
    paid = len(emulator.submissions)
    code, said = render(capsys, emulator, tmp_path / "recipe.yaml")
    assert code == 0, said
    assert len(emulator.submissions) == paid + 1
    assert sorted(pngs(tmp_path)) == ["left.png", "right.png"]
    assert said.startswith("2 written")


def test_shards_rendered_apart_are_merged_without_a_request(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": recipe()})
    path = tmp_path / "recipe.yaml"
    for shard, folder in (("1/2", "a"), ("2/2", "b")):
        assert run(capsys, "render", str(path), "--shard", shard, "--out", str(tmp_path / folder),
                   "--base-url", emulator.base_url, "-q")[0] == 0
    paid = len(emulator.submissions)

    code, out, err = run(capsys, "merge", str(path), str(tmp_path / "a"), str(tmp_path / "b"))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    placed = [int(line.split(": ")[1].split()[0]) for line in lines[:2]]
    assert sum(placed) == 6 and all(placed)
    assert lines[2] == (f"mugs: 6 of 6 images present; manifest "
                        f"{tmp_path / 'mugs.manifest.json'}")
    assert run(capsys, "status", str(path))[0] == 0
    assert render(capsys, emulator, path)[1] == "nothing to render: 6 images up to date\n"
    assert len(emulator.submissions) == paid


def test_images_copied_in_from_a_shard_are_recognised_by_their_provenance(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": recipe()})
    path = tmp_path / "recipe.yaml"
    assert run(capsys, "render", str(path), "--shard", "1/2", "-q",
               "--base-url", emulator.base_url)[0] == 0
    assert run(capsys, "render", str(path), "--shard", "2/2", "--out", str(tmp_path / "b"),
               "-q", "--base-url", emulator.base_url)[0] == 0
    paid = len(emulator.submissions)
    shutil.copytree(tmp_path / "b" / "renders", tmp_path / "renders", dirs_exist_ok=True)

    assert render(capsys, emulator, path)[1] == "nothing to render: 6 images up to date\n"
    assert len(emulator.submissions) == paid


def test_two_recipes_share_a_folder_each_with_its_own_manifest_status_clean_and_gallery(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {
        "recipes/a.yaml": recipe("a", output="a/{{ subject }}-{{ style }}.{{ ext }}"),
        "recipes/b.yaml": recipe("b", output="b/{{ subject }}-{{ style }}.{{ ext }}",
                                 subjects="[teapot, vase]"),
    })
    folder = tmp_path / "recipes"
    before = len(emulator.submissions)
    for name in ("a", "b"):
        assert render(capsys, emulator, folder / f"{name}.yaml")[0] == 0
    assert len(emulator.submissions) == before + 6 + 4  # (auto seeds differ per recipe)
    for name, count in (("a", 6), ("b", 4)):
        manifest = json.loads((folder / f"{name}.manifest.json").read_text())
        assert (manifest["recipe"]["name"], len(manifest["images"])) == (name, count)
        assert run(capsys, "status", str(folder / f"{name}.yaml"))[0] == 0
        assert run(capsys, "clean", str(folder / f"{name}.yaml"))[1] == (
            "no orphans: every image of this recipe belongs to a job in it\n")
        assert run(capsys, "gallery", str(folder / f"{name}.yaml"))[1] == (
            f"wrote {folder / f'{name}.gallery.html'} ({count} images)\n")
    assert sorted(pngs(folder)) == sorted(
        [f"a/{s}-{t}.png" for s in ("teapot", "kettle", "mug") for t in ("watercolor", "photo")]
        + [f"b/{s}-{t}.png" for s in ("teapot", "vase") for t in ("watercolor", "photo")])


def test_two_recipes_of_one_name_in_one_root_are_refused(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"one.yaml": recipe("same"), "two.yaml": recipe("same")})
    assert render(capsys, emulator, tmp_path / "one.yaml")[0] == 0
    assert render(capsys, emulator, tmp_path / "two.yaml") == (1, (
        f"fluxbatch: {tmp_path} already holds the images of another recipe named 'same' "
        f"({tmp_path / 'one.yaml'}): give this one ({tmp_path / 'two.yaml'}) another name, or "
        "another output root\n"))


V1_SCHEMA = """
CREATE TABLE images (output TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
    provider TEXT, base_url TEXT, task_id TEXT, polling_url TEXT, cost REAL,
    submitted_at REAL, reported_seed INTEGER, reason TEXT, updated_at REAL NOT NULL,
    written_key TEXT, entry TEXT, path TEXT, sha256 TEXT, bytes INTEGER, mtime_ns INTEGER);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_a_root_written_by_the_first_release_upgrades_in_place_without_paying(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    """Made as release 0.1 left it: a store of schema 1 (images by output), manifest.json,
    and one task still in flight."""
    build_file_tree(tmp_path, {"recipe.yaml": recipe()})
    path = tmp_path / "recipe.yaml"
    assert render(capsys, emulator, path)[0] == 0
    manifest = json.loads((tmp_path / "mugs.manifest.json").read_text())
    jobs = {job.output: job for job in load_plan(str(path)).jobs}
    (tmp_path / "mugs.manifest.json").unlink()
    shutil.rmtree(tmp_path / ".fluxbatch")
    database = tmp_path / ".fluxbatch" / "state.sqlite"
    database.parent.mkdir()
    in_flight = jobs["renders/mug-photo.png"]
    (tmp_path / "renders" / "mug-photo.png").unlink()
    answer = emulator_submit(emulator, in_flight.model, dict(in_flight.request))
    with sqlite3.connect(database) as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('schema', '1'), ('recipe', 'mugs')")
        for entry in manifest["images"]:
            if entry["output"] == in_flight.output:
                continue
            db.execute("INSERT INTO images (output, key, status, updated_at, written_key, "
                       "entry, path, sha256, bytes) VALUES (?, ?, 'written', 0, ?, ?, ?, ?, ?)",
                       (entry["output"], entry["key"], entry["key"], json.dumps(entry),
                        entry["path"], entry["sha256"], entry["bytes"]))
        db.execute("INSERT INTO images (output, key, status, provider, base_url, task_id, "
                   "polling_url, cost, updated_at) VALUES (?, ?, 'submitted', 'emulator', ?, "
                   "?, ?, 4.0, 0)", (in_flight.output, in_flight.key, emulator.base_url,
                                     answer["id"], answer["polling_url"]))
    legacy = dict(manifest, manifest_version=1, images=[
        e for e in manifest["images"] if e["output"] != in_flight.output])
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    paid = len(emulator.submissions)

    code, said = render(capsys, emulator, path)
    assert (code, said) == (0, f"1 written, 5 up to date; nothing paid, and $0.040 paid by "
                               f"earlier runs for the tasks collected; manifest "
                               f"{tmp_path / 'mugs.manifest.json'}\n")
    assert len(emulator.submissions) == paid
    assert not (tmp_path / "manifest.json").exists()
    assert len(json.loads((tmp_path / "mugs.manifest.json").read_text())["images"]) == 6
    with sqlite3.connect(database) as db:
        schema = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        assert schema == (str(migrations.LATEST),)


def emulator_submit(emulator: Emulator, model: str, body: dict[str, object]) -> dict[str, str]:
    import httpx

    response = httpx.post(f"{emulator.base_url}/v1/{model}", json=body,
                          headers={"x-key": "earlier-run"}, timeout=120)
    response.raise_for_status()
    answer: dict[str, str] = response.json()
    return answer


def seeded(name: str, output: str, subjects: str) -> str:
    """A recipe whose requests do not depend on its name: two of them can share images."""
    return recipe(name, output, subjects).replace("    prompt:", "    seed: 7\n    prompt:")


def test_clean_never_deletes_a_file_that_another_recipe_placed_or_plans(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    shared = "x/{{ subject }}-{{ style }}.{{ ext }}"
    build_file_tree(tmp_path, {"a.yaml": seeded("a", shared, "[teapot, kettle]"),
                               "b.yaml": seeded("b", shared, "[teapot]")})
    for name in ("a", "b"):
        assert render(capsys, emulator, tmp_path / f"{name}.yaml")[0] == 0
    # b also plans the kettles now (not rendered yet); a moves all of its images elsewhere
    build_file_tree(tmp_path, {"b.yaml": seeded("b", shared, "[teapot, kettle]"),
                               "a.yaml": seeded("a", "y/{{ subject }}-{{ style }}.{{ ext }}",
                                                "[teapot, kettle]")})
    assert render(capsys, emulator, tmp_path / "a.yaml")[0] == 0
    before = pngs(tmp_path)

    code, out, err = run(capsys, "clean", str(tmp_path / "a.yaml"), "--delete")

    assert (code, err) == (0, "")
    assert sorted(out.splitlines()) == sorted([
        "orphan entry: x/kettle-photo.png (the file is planned by recipe 'b', and is kept)",
        "orphan entry: x/kettle-watercolor.png (the file is planned by recipe 'b', and is kept)",
        "orphan entry: x/teapot-photo.png (the file is also the image of recipe 'b', and is "
        "kept)",
        "orphan entry: x/teapot-watercolor.png (the file is also the image of recipe 'b', and "
        "is kept)",
        "deleted 4 orphans"])
    assert pngs(tmp_path) == before
    assert run(capsys, "status", str(tmp_path / "a.yaml"))[0] == 0
    paid = len(emulator.submissions)
    assert render(capsys, emulator, tmp_path / "b.yaml")[0] == 0  # its kettles: a's images
    assert len(emulator.submissions) == paid


def test_merge_reports_a_conflict_and_leaves_out_an_image_of_another_request(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": recipe()})
    path = tmp_path / "recipe.yaml"
    assert run(capsys, "render", str(path), "--only", "subject=teapot", "-q",
               "--base-url", emulator.base_url)[0] == 0
    older = tmp_path / "older"  # another version of the recipe, rendered elsewhere
    build_file_tree(older, {"recipe.yaml": recipe().replace('prompt: "a ', 'prompt: "one ')})
    assert run(capsys, "render", str(older / "recipe.yaml"), "-q",
               "--base-url", emulator.base_url)[0] == 0
    mine = pngs(tmp_path / "renders")
    paid = len(emulator.submissions)

    code, out, err = run(capsys, "merge", str(path), str(older))

    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == f"{older}: 0 images placed, 0 tasks to collect, 4 conflicts"
    assert [line.split(": ")[1] for line in lines[1:5]] == [
        f"renders/{s}-{t}.png" for s in ("kettle", "mug") for t in ("watercolor", "photo")]
    assert all(line.startswith("  conflict: renders/") and line.endswith("…); left out")
               and f"{older} holds an image of another request there (key " in line
               for line in lines[1:5])
    assert lines[5] == (f"mugs: 2 of 6 images present; manifest {tmp_path / 'mugs.manifest.json'}"
                        "; `fluxbatch render` makes (or collects) the rest")
    assert pngs(tmp_path / "renders") == mine  # nothing of the other request came in
    assert len(emulator.submissions) == paid
    assert run(capsys, "status", str(path))[0] != 0


def test_a_reproduce_recipe_written_in_another_folder_shares_the_originals_root(
        tmp_path: Path, emulator: Emulator, capsys: Capsys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`fluxbatch reproduce IMAGE -o again.yaml` run from the top of a repository: the new
    recipe lives elsewhere than the original, and rendered into its own folder it paid again."""
    build_file_tree(tmp_path, {".git/HEAD": "ref: refs/heads/main\n",
                               "recipes/recipe.yaml": recipe()})
    assert render(capsys, emulator, tmp_path / "recipes" / "recipe.yaml")[0] == 0
    paid, before = len(emulator.submissions), pngs(tmp_path)
    monkeypatch.chdir(tmp_path)

    key = load_plan(str(tmp_path / "recipes" / "recipe.yaml")).jobs[4].key

    assert run(capsys, "reproduce", "recipes/renders/mug-watercolor.png", "-o", "again.yaml") \
        == (0, "wrote again.yaml: `fluxbatch render again.yaml` makes the image again (key "
               f"{key[:12]}…)\n", "")
    assert "\noutput_root: recipes\n" in (tmp_path / "again.yaml").read_text()
    assert render(capsys, emulator, Path("again.yaml")) == (
        0, "nothing to render: 1 image up to date\n")
    assert run(capsys, "clean", "again.yaml", "--delete")[1] == (
        "no orphans: every image of this recipe belongs to a job in it\n")
    assert len(emulator.submissions) == paid
    assert pngs(tmp_path) == before


def test_a_reproduce_recipe_outside_the_originals_project_says_how_to_place_it_free(
        tmp_path: Path, emulator: Emulator, capsys: Capsys) -> None:
    build_file_tree(tmp_path, {"one/recipe.yaml": recipe()})
    assert render(capsys, emulator, tmp_path / "one" / "recipe.yaml")[0] == 0
    paid = len(emulator.submissions)
    again = tmp_path / "two" / "again.yaml"
    again.parent.mkdir()

    code, out, _ = run(capsys, "reproduce", str(tmp_path / "one/renders/mug-watercolor.png"),
                       "-o", str(again))

    assert code == 0 and "output_root" not in again.read_text()
    assert out.endswith(f"; it renders into {again.parent}, where the original's image is "
                        f"unknown: pass --out {tmp_path / 'one'} to place it from there without "
                        "paying\n")
    assert render(capsys, emulator, again, "--out", str(tmp_path / "one")) == (
        0, "nothing to render: 1 image up to date\n")
    assert len(emulator.submissions) == paid


@pytest.mark.parametrize("lost", ["ledger and manifest", "manifest"])
def test_plan_status_and_render_recognise_images_alike_after_the_ledger_is_lost(
        tmp_path: Path, emulator: Emulator, capsys: Capsys, lost: str) -> None:
    """With another recipe's manifest in the root, `plan` and `status` counted the images
    of a recipe whose ledger and manifest were lost as new ("6 new … $0.24"), while
    `render` recognised them by their embedded provenance and paid nothing: a budget gate
    built on `plan --json` was misled."""
    build_file_tree(tmp_path, {
        "a.yaml": recipe("a", output="a/{{ subject }}-{{ style }}.{{ ext }}"),
        "b.yaml": recipe("b", output="b/{{ subject }}-{{ style }}.{{ ext }}", subjects="[vase]"),
    })
    for name in ("a", "b"):
        assert render(capsys, emulator, tmp_path / f"{name}.yaml")[0] == 0
    (tmp_path / "a.manifest.json").unlink()
    if lost == "ledger and manifest":
        for state in (tmp_path / ".fluxbatch").glob("state.sqlite*"):
            state.unlink()
    sent = len(emulator.submissions)

    code, out, _ = run(capsys, "plan", str(tmp_path / "a.yaml"), "--json")
    planned = json.loads(out)
    assert code == 0
    assert [job["state"] for job in planned["jobs"]] == ["up-to-date"] * 6
    assert planned["summary"]["estimated_usd"] == 0
    code, out, _ = run(capsys, "plan", str(tmp_path / "a.yaml"), "--jsonl")
    streamed = [json.loads(line) for line in out.splitlines()]
    assert [line["state"] for line in streamed if "state" in line] == ["up-to-date"] * 6
    assert run(capsys, "status", str(tmp_path / "a.yaml"))[0] == 0  # 0: everything up to date
    assert render(capsys, emulator, tmp_path / "a.yaml") == (
        0, "nothing to render: 6 images up to date\n")
    assert len(emulator.submissions) == sent


@pytest.mark.parametrize(("provider", "polling_url", "said"), [
    ("bfl", "https://api.bfl.ai/v1/get_result?id=t-1",
     "1 image held back: paid earlier through provider 'bfl', which this render does not "
     "use: render with provider: bfl to collect it, or --force to pay for a new one."),
    ("emulator", "",
     "1 image held back: paid earlier, but no polling URL was recorded for its task, so it "
     "cannot be collected. Re-run with --retry-unknown to submit it again."),
])
def test_a_task_paid_earlier_that_this_render_cannot_collect_is_held_not_paid_again(
        tmp_path: Path, emulator: Emulator, capsys: Capsys, provider: str, polling_url: str,
        said: str) -> None:
    """A task in flight that this render cannot poll (paid through another provider, or
    with no polling URL recorded) was submitted, and paid for, again."""
    from fluxbatch.state.store import Store

    build_file_tree(tmp_path, {"recipe.yaml": recipe(subjects="[teapot]")})
    path = tmp_path / "recipe.yaml"
    first = load_plan(str(path)).jobs[0]
    with Store.open(tmp_path) as store:
        store.submitting(first.key, provider, None)
        store.submitted(first.key, "t-1", polling_url, 4.0, 0.0)
    paid = len(emulator.submissions)

    code, out, err = run(capsys, "render", str(path), "--base-url", emulator.base_url, "-q")

    assert len(emulator.submissions) == paid + 1  # the other image only
    assert code == 1
    assert out.startswith("1 written, 1 held back")
    assert said in err.splitlines()
