"""The state around a render, against the emulator: in-flight tasks re-attached without paying
again, unknown submits held back, `status`, `clean`, `inspect` and `reproduce`, damaged or lost
state, and the output root's lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxbatch.emulator import Emulator, EmulatorConfig, EmulatorThread
from fluxbatch.errors import StateError
from fluxbatch.expand import Job
from fluxbatch.front import load_plan
from fluxbatch.selection import ImageState, SelectOptions, classify_with_store
from fluxbatch.state.database import unreadable_store
from fluxbatch.state.ledger import keys_in_flight
from fluxbatch.state.lock import RootLock
from fluxbatch.state.store import Store
from tests.helpers import (
    STORED,
    Cli,
    Run,
    aligned,
    build_file_tree,
    check_manifest,
    images,
    status_table,
)

ROOT = Path(__file__).resolve().parent.parent
ALL = ["grid/circle.png", "grid/square.png", "grid/star.png", "solo/tree.png"]
HELD_BACK = ("{n} held back: an earlier submit's outcome was never learned (it may have been "
             "billed). Re-run with --retry-unknown to submit {them} again.\n")
UNKNOWN_ADVICE = ("{n} unknown: a submit's answer was never learned (it may have been billed); "
                  "`fluxbatch render --retry-unknown` submits again\n")


def planned(cli: Cli) -> dict[str, Job]:
    return {job.output: job for job in load_plan(str(cli.recipe)).jobs}


# -- 3. in flight and unknown -----------------------------------------------------------------


def submit_directly(emulator: Emulator, job: Job) -> dict[str, Any]:
    """A submit made by an earlier run that died before its first poll."""
    response = httpx.post(f"{emulator.base_url}/v1/{job.model}", json=dict(job.request),
                          headers={"x-key": "earlier-run"})
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def test_a_task_submitted_but_never_polled_is_collected_without_submitting_again(
        cli: Cli, emulator: Emulator) -> None:
    jobs = planned(cli)
    paid = {output: submit_directly(emulator, jobs[output])
            for output in ("grid/circle.png", "solo/tree.png")}
    cli.root.mkdir(parents=True, exist_ok=True)
    with Store.open(cli.root) as store:
        for output, answer in paid.items():
            store.submitting(jobs[output].key, "emulator", emulator.base_url)
            store.submitted(jobs[output].key, answer["id"], answer["polling_url"],
                            answer["cost"], time.time())
    sent = len(emulator.submissions)

    status = cli.status("--json")
    assert status.code == 1
    document = json.loads(status.out)
    assert document["counts"] == {
        "up-to-date": 0, "stored": 0, "new": 2, "missing": 0, "stale": 0, "in-flight": 2,
        "failed": 0, "moderated": 0, "unknown": 0, "orphaned": 0}
    attach = "submitted by an earlier run; the next render collects it without paying again"
    assert document["not_up_to_date"] == [
        {"output": "grid/circle.png", "state": "in-flight", "reason": attach},
        {"output": "grid/square.png", "state": "new", "reason": None},
        {"output": "grid/star.png", "state": "new", "reason": None},
        {"output": "solo/tree.png", "state": "in-flight", "reason": attach}]
    assert cli.render("--dry-run").out.splitlines()[-1] == (
        "dry run: would submit 2 images (estimated $0.080), re-attach 2, skip 0 up to date; "
        "nothing was sent or written")

    assert cli.render() == Run(0, cli.written(2).replace("2 written", "4 written").replace(
        "(reported by the provider)", "(reported by the provider), and $0.080 paid by earlier "
        "runs for the tasks collected"), "")
    assert cli.prompts_sent(sent) == ["a blue star", "a green square"]
    entries = check_manifest(cli)
    assert {p: entries[p]["task_id"] for p in paid} == {p: a["id"] for p, a in paid.items()}
    assert cli.render() == Run(0, "nothing to render: 4 images up to date\n", "")


def forced_and_interrupted(cli: Cli, emulator: Emulator, output: str,
                           age: float = 0.0) -> dict[str, Any]:
    """What `render --force` leaves when it is stopped after paying for `output` again: an
    up-to-date image, and a task in flight for the same key (submitted `age` seconds ago)."""
    job = planned(cli)[output]
    answer = submit_directly(emulator, job)
    with Store.open(cli.root) as store:
        store.submitting(job.key, "emulator", emulator.base_url)
        store.submitted(job.key, answer["id"], answer["polling_url"], answer["cost"],
                        time.time() - age)
    return answer


def test_a_forced_re_render_stopped_before_collecting_is_collected_by_the_next_render(
        rendered: Cli, emulator: Emulator) -> None:
    """The next plain render saw the image as up to date (its key had not changed) and never
    collected the task the stopped --force run had paid for; a second --force paid again."""
    cli = rendered
    answer = forced_and_interrupted(cli, emulator, "grid/circle.png")
    sent = len(emulator.submissions)

    status = json.loads(cli.status("--json").out)
    assert status["counts"]["in-flight"] == 1
    assert status["not_up_to_date"] == [{
        "output": "grid/circle.png", "state": "in-flight",
        "reason": "re-rendered by a --force run that stopped before collecting it: the next "
                  "render collects it without paying again"}]

    assert cli.render().code == 0
    assert len(emulator.submissions) == sent  # collected, not paid again
    assert check_manifest(cli)["grid/circle.png"]["task_id"] == answer["id"]
    assert cli.render() == Run(0, "nothing to render: 4 images up to date\n", "")


def test_the_keys_in_flight_of_a_lazily_read_ledger_take_one_query_and_no_row(
        rendered: Cli, emulator: Emulator) -> None:
    """classify asks every run which keys are in flight; reading the whole ledger for it
    would undo what the lazy ledger saves a null build."""
    cli = rendered
    forced_and_interrupted(cli, emulator, "grid/circle.png")
    with Store.open(cli.root) as store:
        classified, state = classify_with_store(load_plan(str(cli.recipe)), store,
                                                SelectOptions())
        assert state.tasks.every is None  # type: ignore[attr-defined]
        assert keys_in_flight(state.tasks) == keys_in_flight(store.tasks()) == {
            planned(cli)["grid/circle.png"].key}
    assert classified.states.count(ImageState.IN_FLIGHT) == 1


@pytest.mark.parametrize(("age", "paid"), [(0.0, 3), (3600.0, 4)])
def test_force_collects_a_fresh_task_of_an_interrupted_force_and_pays_for_a_stuck_one(
        rendered: Cli, emulator: Emulator, age: float, paid: int) -> None:
    """A second --force paid again for the task the first had paid for and not collected.
    It collects a task in flight for less than a task may take; one waiting for longer (its
    image may never come) is what --force is the way out of: paid for anew."""
    cli = rendered
    answer = forced_and_interrupted(cli, emulator, "grid/circle.png", age)
    sent = len(emulator.submissions)

    assert cli.render("--force").code == 0

    assert len(emulator.submissions) == sent + paid
    collected = check_manifest(cli)["grid/circle.png"]["task_id"] == answer["id"]
    assert collected == (paid == 3)


@pytest.mark.parametrize("cost", [float("inf"), -5.0, float("nan")])
def test_a_cost_an_earlier_release_recorded_as_infinite_or_negative_counts_as_unreported(
        cli: Cli, emulator: Emulator, cost: float) -> None:
    """A ledger written before costs were checked may hold `1e999` (infinity), which no image
    can embed: every run that collected it died. Read back, it counts as unreported."""
    jobs = planned(cli)
    answer = submit_directly(emulator, jobs["solo/tree.png"])
    cli.root.mkdir(parents=True, exist_ok=True)
    with Store.open(cli.root) as store:
        store.submitting(jobs["solo/tree.png"].key, "emulator", emulator.base_url)
        store.submitted(jobs["solo/tree.png"].key, answer["id"], answer["polling_url"], cost,
                        time.time())

    assert cli.render() == Run(0, cli.written(3).replace("3 written", "4 written"), "")
    assert check_manifest(cli)["solo/tree.png"]["cost"] is None
    assert cli.render() == Run(0, "nothing to render: 4 images up to date\n", "")


def test_a_task_the_provider_forgot_is_paid_again_only_after_it_says_so_and_the_summary_tells(
        cli: Cli, emulator: Emulator) -> None:
    """The one case where a paid image is paid again: the provider answers `Task not found`
    (results expire), several times in a row."""
    jobs = planned(cli)
    forgotten = jobs["grid/circle.png"]
    cli.root.mkdir(parents=True, exist_ok=True)
    with Store.open(cli.root) as store:
        store.submitting(forgotten.key, "emulator", emulator.base_url)
        store.submitted(forgotten.key, "forgotten-1",
                        f"{emulator.base_url}/v1/get_result?id=forgotten-1", 4.0, time.time())
    sent = len(emulator.submissions)

    first = cli.render()

    assert first.code == 1
    assert first.out.startswith("3 written, 1 gone; ")
    assert "grid/circle.png" in first.err and "the provider no longer knows task forgotten-1 " \
        "('Task not found'; results expire)" in first.err
    assert cli.prompts_sent(sent) == ["a blue star", "a green square", "a lone tree"]
    status = json.loads(cli.status("--json").out)
    assert status["not_up_to_date"] == [{
        "output": "grid/circle.png", "state": "new",
        "reason": "paid before, but the provider no longer has the task and its bytes were "
                  "lost"}]
    assert cli.render().code == 0  # paid again, now that the provider said it is gone
    assert cli.prompts_sent(sent + 3) == ["a red circle"]


def test_a_submit_recorded_but_never_answered_is_held_back_until_retry_unknown(
        rendered: Cli, emulator: Emulator) -> None:
    rendered.write(colours=("red", "green", "violet"))  # the star is re-rendered ...
    star = planned(rendered)["grid/star.png"]
    with Store.open(rendered.root) as store:  # ... and that run died while submitting it
        store.submitting(star.key, "emulator", emulator.base_url)
    sent = len(emulator.submissions)

    assert rendered.status("-v") == Run(1, status_table(
        rendered.root, [("up-to-date", 3), ("unknown", 1)]) + "\n" + aligned(
        ("JOB", "VALUES", "OUTPUT", "STATE", "REASON"),
        [("grid", "shape=star colour=violet", "grid/star.png", "unknown",
          "a run stopped while submitting it: the answer was never recorded, and it may have "
          "been billed")]),
        UNKNOWN_ADVICE.format(n=1))
    held = Run(1, "nothing rendered: 1 image held back, 3 up to date\n",
               HELD_BACK.format(n="1 image", them="it"))
    assert rendered.render() == held
    assert rendered.render() == held
    assert len(emulator.submissions) == sent

    assert rendered.render("--retry-unknown") == Run(0, rendered.written(1, 3), "")
    assert rendered.prompts_sent(sent) == ["a violet star"]
    check_manifest(rendered)


def test_submits_whose_answer_was_dropped_are_unknown_and_never_resent_silently(
        cli: Cli, emulator: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    dropping = EmulatorConfig(latency=0.02, max_side=64, fault_rate=1.0,
                              faults=frozenset({"drop-after-submit"}))
    with EmulatorThread(dropping) as faulty:
        first = Cli(faulty, capsys, cli.root).render()
        created = len(faulty.submissions)
    lost = ("the submit may have reached the provider, but its answer was lost "
            "(RemoteProtocolError: Server disconnected)")
    rows = [("grid", "shape=circle colour=red", "grid/circle.png", "unknown", lost),
            ("grid", "shape=square colour=green", "grid/square.png", "unknown", lost),
            ("grid", "shape=star colour=blue", "grid/star.png", "unknown", lost),
            ("solo", "-", "solo/tree.png", "unknown", lost)]

    assert created == 4  # the provider made (and may bill) every task
    assert first == Run(1, "4 unknown; cost not reported by the provider; manifest "
                           f"{cli.root / 'rebuild.manifest.json'}\n",
                        aligned(("JOB", "VALUES", "OUTPUT", "STATUS", "REASON"), rows) +
                        "4 submits ended without an answer and may have been billed; they are "
                        "not resubmitted unless you pass --retry-unknown.\n")
    assert cli.status("-v") == Run(1, status_table(cli.root, [("unknown", 4)]) + "\n" + aligned(
        ("JOB", "VALUES", "OUTPUT", "STATE", "REASON"), rows), UNKNOWN_ADVICE.format(n=4))
    sent = len(emulator.submissions)
    assert cli.render() == Run(1, "nothing rendered: 4 images held back\n",
                               HELD_BACK.format(n="4 images", them="them"))
    assert len(emulator.submissions) == sent
    assert cli.render("--retry-unknown") == Run(0, cli.written(4), "")
    assert len(emulator.submissions) == sent + 4


def test_a_render_with_only_images_held_back_says_so_first(cli: Cli) -> None:
    """Not "nothing to render: 0 images up to date": what is held back, then why, and what
    to do."""
    cli.write(prompt="[[request-moderated]] a {{ colour }} {{ shape }}")
    assert cli.render().code == 1  # (3 moderated, the tree written)

    assert cli.render() == Run(1, "nothing rendered: 3 images held back, 1 up to date\n",
                               "3 images were moderated before and are not retried (change the "
                               "prompt, or use --force).\n")
    assert cli.render("--only", "grid") == Run(
        1, "nothing rendered: 3 images held back, 1 not selected\n",
        "3 images were moderated before and are not retried (change the prompt, or use "
        "--force).\n")


# -- 4. status and clean ------------------------------------------------------------------------


def test_status_json_counts_every_state_and_exits_0_only_when_up_to_date(
        rendered: Cli) -> None:
    (rendered.root / "solo" / "tree.png").unlink()
    rendered.write(shapes=("circle", "square", "heart"), colours=("red", "cyan", "black"))

    result = rendered.status("--json")
    assert (result.code, result.err) == (1, "")
    assert json.loads(result.out) == {
        "recipe": "rebuild",
        "output_root": str(rendered.root),
        "up_to_date": False,
        "counts": {"up-to-date": 1, "stored": 1, "new": 1, "missing": 0, "stale": 1,
                   "in-flight": 0, "failed": 0, "moderated": 0, "unknown": 0, "orphaned": 1},
        "not_up_to_date": [
            {"output": "grid/square.png", "state": "stale",
             "reason": "the request changed (prompt, parameters, model or seed)",
             "changes": ['prompt "a green square" → "a cyan square"',
                         "seed 992147670 → 156120859"]},
            {"output": "grid/heart.png", "state": "new", "reason": None},
            {"output": "solo/tree.png", "state": "stored", "reason": STORED},
        ],
        "orphans": ["grid/star.png"],
        "orphan_images": [{"output": "grid/star.png", "job": "grid",
                           "vars": {"shape": "star", "colour": "blue"}}],
        "in_flight_by_account": [],
    }
    advice = ("not up to date: `fluxbatch render` makes them (2 to render, 1 to place or "
              "collect, at no cost)\norphans: `fluxbatch clean --delete` removes them\n")
    counts = [("up-to-date", 1), ("stored", 1), ("new", 1), ("stale", 1), ("orphaned", 1)]
    assert rendered.status() == Run(1, status_table(rendered.root, counts), advice)
    # the orphan's row says what the manifest knows of it: its job and values
    assert rendered.status("-v") == Run(1, status_table(rendered.root, counts) + "\n" + aligned(
        ("JOB", "VALUES", "OUTPUT", "STATE", "REASON"), [
            ("grid", "shape=square colour=cyan", "grid/square.png", "stale",
             'the request changed: prompt "a green square" → "a cyan square"; '
             "seed 992147670 → 156120859"),
            ("grid", "shape=heart colour=black", "grid/heart.png", "new", ""),
            ("solo", "-", "solo/tree.png", "stored", STORED),
            ("grid", "colour=blue shape=star", "grid/star.png", "orphaned",
             "no longer in the recipe")]), advice)

    assert rendered.render().code == 0
    assert rendered.status().code == 1  # the orphan is still there
    assert rendered.clean("--delete").code == 0
    result = rendered.status("--json")
    assert (result.code, json.loads(result.out)["up_to_date"]) == (0, True)


def test_clean_lists_orphans_and_delete_removes_exactly_them_and_their_entries(
        rendered: Cli, emulator: Emulator) -> None:
    build_file_tree(rendered.root, {"notes.txt": "mine\n", "grid/hand-made.png": b"not ours",
                                    "grid/star.png.bak": b"a backup"})
    rendered.write(shapes=("circle", "square"), colours=("red", "green"))
    before = images(rendered.root)
    sent = len(emulator.submissions)

    assert rendered.clean() == Run(0, "orphan: grid/star.png\n1 orphan; run with --delete to "
                                      "remove them and their manifest entries\n", "")
    assert images(rendered.root) == before
    assert rendered.clean("--delete") == Run(
        0, "deleting: grid/star.png\ndeleted 1 orphan\n", "")
    assert rendered.clean() == Run(
        0, "no orphans: every image of this recipe belongs to a job in it\n", "")

    del before["grid/star.png"]
    assert images(rendered.root) == before
    assert (rendered.root / "notes.txt").read_text() == "mine\n"
    assert (rendered.root / "grid" / "star.png.bak").read_bytes() == b"a backup"
    assert sorted(check_manifest(rendered)) == ["grid/circle.png", "grid/square.png",
                                                "solo/tree.png"]
    assert rendered.render() == Run(0, "nothing to render: 3 images up to date\n", "")
    assert len(emulator.submissions) == sent


def test_clean_delete_removes_a_directory_left_empty_but_not_the_root(rendered: Cli) -> None:
    build_file_tree(rendered.root, {"recipe.yaml": """
        version: 1
        name: rebuild
        provider: emulator
        defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: png}
        jobs:
          - {name: solo, prompt: "a lone tree", output: "solo/tree.png",
             params: {safety_tolerance: 2}}
        """})
    assert rendered.clean("--delete") == Run(0, "deleting: grid/circle.png\ndeleting: "
                                                "grid/square.png\ndeleting: grid/star.png\n"
                                                "deleted 3 orphans\n", "")
    assert not (rendered.root / "grid").exists()
    assert sorted(images(rendered.root)) == ["solo/tree.png"]
    assert sorted(check_manifest(rendered)) == ["solo/tree.png"]


def test_clean_keeps_a_file_that_a_job_in_the_recipe_has_written_since(cli: Cli) -> None:
    head = ("version: 1\nname: rebuild\nprovider: emulator\ndefaults: {model: flux-pro-1.1, "
            "width: 256, height: 256, output_format: jpeg}\njobs:\n")
    build_file_tree(cli.root, {"recipe.yaml": head + '  - {name: a, prompt: "a cat", '
                                                     'output: "img/x.png"}\n'})
    assert cli.render().code == 0  # a JPEG: written as img/x.jpg
    build_file_tree(cli.root, {"recipe.yaml": head + '  - {name: b, prompt: "a dog", '
                                                     'output: "img/x.jpg"}\n'})
    assert cli.render().code == 0  # job b's image replaces it at the same path
    image = (cli.root / "img" / "x.jpg").read_bytes()

    # Writing job b's image there retired job a's record of the file: nothing is orphaned.
    assert cli.clean("--delete") == Run(0, "no orphans: every image of this recipe belongs to "
                                           "a job in it\n", "")
    assert (cli.root / "img" / "x.jpg").read_bytes() == image
    assert cli.status().code == 0
    manifest = json.loads((cli.root / "rebuild.manifest.json").read_text())
    assert [e["job"] for e in manifest["images"]] \
        == ["b"]


# -- 5. inspect and reproduce ---------------------------------------------------------------------


def embedded_entry(cli: Cli, path: str) -> dict[str, Any]:
    """The manifest entry, minus what the image cannot carry (its own hash and size)."""
    document = json.loads((cli.root / "rebuild.manifest.json").read_text())
    entry = next(e for e in document["images"] if e["path"] == path)
    return {k: v for k, v in entry.items() if k not in ("sha256", "bytes")}


def test_inspect_prints_the_provenance_the_image_carries(rendered: Cli) -> None:
    entry = embedded_entry(rendered, "grid/star.png")
    width = max(len(name) for name in entry)
    lines = [f"{name.ljust(width)}  "
             f"{entry[name] if isinstance(entry[name], str) else json.dumps(entry[name])}"
             for name in sorted(entry) if name != "cost"]
    image = str(rendered.root / "grid" / "star.png")

    shown = rendered("inspect", image)
    assert shown.code == 0 and shown.err == ""
    assert f"{'cost'.ljust(width)}  4.0 credits ($0.04)" in shown.out.splitlines()
    assert [line for line in shown.out.splitlines() if not line.startswith("cost ")] == lines
    as_json = rendered("inspect", image, "--json")
    assert (as_json.code, json.loads(as_json.out)) == (0, entry)
    assert entry["key"] == planned(rendered)["grid/star.png"].key


def test_inspect_of_a_file_without_provenance_says_so(rendered: Cli) -> None:
    other = rendered.root / "other.png"
    other.write_bytes(b"\x89PNG\r\n\x1a\n")
    result = rendered("inspect", str(other))
    assert result.code == 1 and result.out == ""
    assert result.err.startswith(f"fluxbatch: {other}: ")


@pytest.mark.parametrize(("prompt", "sent"), [
    ("a {{ colour }} {{ shape }}", "a blue star"),
    ("{% raw %}{{literal}} {% if %} {#{% endraw %} a {{ colour }} {{ shape }}",
     "{{literal}} {% if %} {# a blue star"),
    ("{{ '{% endraw %}' }} a {{ colour }} {{ shape }}", "{% endraw %} a blue star"),
], ids=["plain", "template-syntax", "raw-end-tag"])
def test_reproduce_writes_a_recipe_with_the_same_key(
        cli: Cli, emulator: Emulator, prompt: str, sent: str) -> None:
    cli.write(prompt=prompt)
    assert cli.render("--only", "grid/star.png").code == 0
    star = planned(cli)["grid/star.png"]
    assert star.prompt == sent
    again = cli.root.parent / "again" / "r.yaml"
    again.parent.mkdir()

    assert cli("reproduce", str(cli.root / "grid" / "star.png"), "-o", str(again)) == Run(
        0, f"wrote {again}: `fluxbatch render {again}` makes the image again (key "
           f"{star.key[:12]}…); it renders into {again.parent}, where the original's image is "
           f"unknown: pass --out {cli.root} to place it from there without paying\n", "")
    from_manifest = cli("reproduce", str(cli.root / "rebuild.manifest.json"), "--entry",
                        "grid/star.png")
    assert from_manifest == Run(0, again.read_text(), "")
    # editors load the schema from the modeline: the raw JSON, not a page about it
    assert again.read_text().splitlines()[0] == (
        "# yaml-language-server: $schema=https://raw.githubusercontent.com/fluxbatch/fluxbatch/"
        "main/schemas/recipe.schema.json")
    assert json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())["$id"] == \
        again.read_text().splitlines()[0].split("$schema=")[1]

    result = cli("plan", str(again), "--json")
    assert result.code == 0
    [job] = json.loads(result.out)["jobs"]
    assert (job["key"], job["request"], job["output"], job["state"]) == (
        star.key, dict(star.request), "grid/star.png", "new")


def test_reproduce_from_a_manifest_needs_an_existing_entry(rendered: Cli) -> None:
    manifest = str(rendered.root / "rebuild.manifest.json")
    assert rendered("reproduce", manifest) == Run(
        1, "", f"fluxbatch: {manifest} is a manifest: say which image with --entry PATH\n")
    assert rendered("reproduce", manifest, "--entry", "grid/moon.png") == Run(
        1, "", f"fluxbatch: {manifest} has no image 'grid/moon.png'\n")


# -- 6. damaged or lost state -------------------------------------------------------------------


def untouched(cli: Cli, before: dict[str, tuple[int, str]], sent: int) -> None:
    assert images(cli.root) == before
    assert len(cli.emulator.submissions) == sent


def test_a_truncated_manifest_without_a_store_is_an_error_that_says_how_to_recover(
        rendered: Cli, emulator: Emulator) -> None:
    shutil.rmtree(rendered.root / ".fluxbatch")
    manifest = rendered.root / "rebuild.manifest.json"
    text = manifest.read_text()
    cut = text[:text.index('"images"') + 40]  # in the middle of the first entry
    manifest.write_text(cut)
    with pytest.raises(json.JSONDecodeError) as where:
        json.loads(cut)
    line, column, what = where.value.lineno, where.value.colno, where.value.msg
    before, sent = images(rendered.root), len(emulator.submissions)
    error = Run(1, "", f"fluxbatch: {manifest}:{line}:{column}: the manifest is not valid JSON "
                       f"({what}). Restore it (from version control), "
                       "or delete it: fluxbatch then recognises your images by the provenance "
                       "embedded in them. No image is touched.\n")

    assert rendered.render() == error
    assert rendered.render() == error  # the failed run left no empty store behind
    assert rendered.status() == error
    assert not (rendered.root / ".fluxbatch" / "state.sqlite").exists()
    assert manifest.read_text() == cut
    untouched(rendered, before, sent)

    manifest.write_text(text)  # restored: everything is up to date again
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    untouched(rendered, before, sent)


def test_a_manifest_of_the_wrong_shape_is_an_error_naming_the_entry(rendered: Cli) -> None:
    shutil.rmtree(rendered.root / ".fluxbatch")
    manifest = rendered.root / "rebuild.manifest.json"
    document = json.loads(manifest.read_text())
    document["images"][1]["bytes"] = "many"
    manifest.write_text(json.dumps(document))
    assert rendered.status() == Run(
        1, "", f"fluxbatch: {manifest}: the manifest is damaged: images[1].bytes is missing or "
               "not a int. Restore it (from version control), or delete it: fluxbatch then "
               "recognises your images by the provenance embedded in them. No image is "
               "touched.\n")


@pytest.mark.parametrize("command", ["render", "status", "clean"])
def test_a_garbage_store_is_an_error_naming_it(rendered: Cli, emulator: Emulator,
                                               command: str) -> None:
    store = rendered.root / ".fluxbatch" / "state.sqlite"
    store.write_bytes(b"this is not an SQLite database, just garbage " * 200)
    before, sent = images(rendered.root), len(emulator.submissions)
    result = rendered.render() if command == "render" else rendered(command,
                                                                    str(rendered.recipe))
    assert result == Run(1, "", (
        f"fluxbatch: {store}: the state store is unreadable (file is not a database). No "
        f"image is touched: move it away (for example `mv {store} {store}.broken`) and run "
        f"again, and fluxbatch rebuilds it from the manifests in {rendered.root}/\n"))
    untouched(rendered, before, sent)


def test_a_damaged_page_of_the_store_is_an_error_naming_it(rendered: Cli,
                                                           emulator: Emulator) -> None:
    store = rendered.root / ".fluxbatch" / "state.sqlite"
    assert not store.with_name("state.sqlite-wal").exists()
    with open(store, "r+b") as handle:  # page 2: the images table (page 1 and meta are fine)
        handle.seek(4096)
        handle.write(b"\xa5" * 4096)
    before, sent = images(rendered.root), len(emulator.submissions)
    error = Run(1, "", (
        f"fluxbatch: {store}: the state store is unreadable (database disk image is malformed). "
        f"No image is touched: move it away (for example `mv {store} {store}.broken`) and run "
        f"again, and fluxbatch rebuilds it from the manifests in {rendered.root}/\n"))
    assert rendered.render() == error
    assert rendered.status() == error
    untouched(rendered, before, sent)

    store.rename(store.with_name("state.sqlite.broken"))  # as the message says
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    untouched(rendered, before, sent)


def test_an_empty_store_file_is_rebuilt_from_the_manifest_without_rendering(
        rendered: Cli, emulator: Emulator) -> None:
    (rendered.root / ".fluxbatch" / "state.sqlite").write_bytes(b"")
    before, sent = images(rendered.root), len(emulator.submissions)
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    untouched(rendered, before, sent)


def test_a_deleted_store_is_rebuilt_from_the_manifest_without_rendering(
        rendered: Cli, emulator: Emulator) -> None:
    shutil.rmtree(rendered.root / ".fluxbatch")
    manifest = (rendered.root / "rebuild.manifest.json").read_text()
    before, sent = images(rendered.root), len(emulator.submissions)

    assert rendered.status().code == 0
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    untouched(rendered, before, sent)
    with Store.open(rendered.root, create=False) as store:
        placed = {p.output: p for p in store.placements("rebuild")}
    assert sorted(placed) == ALL
    assert {o: p.mtime_ns for o, p in placed.items()} == {o: before[o][0] for o in ALL}
    assert (rendered.root / "rebuild.manifest.json").read_text() == manifest


@pytest.mark.parametrize("cost", ["1e999", "-5", "NaN"])
def test_a_manifest_cost_that_is_infinite_negative_or_nan_is_not_taken_into_a_rebuilt_store(
        rendered: Cli, emulator: Emulator, cost: str) -> None:
    """A manifest is data anyone can edit. Its `1e999` was taken into the rebuilt store as
    infinity, and the next manifest written from the store said `"cost": Infinity` (not
    JSON); a negative cost lowered its totals."""
    shutil.rmtree(rendered.root / ".fluxbatch")
    manifest = rendered.root / "rebuild.manifest.json"
    lines = manifest.read_text().splitlines(keepends=True)
    edited = [i for i, line in enumerate(lines) if '"path": "grid/circle.png"' in line]
    assert len(edited) == 1
    lines[edited[0]] = re.sub(r'"cost": [^,]+,', f'"cost": {cost},', lines[edited[0]])
    manifest.write_text("".join(lines))
    (rendered.root / "solo" / "tree.png").unlink()  # (so that the manifest is written again)

    assert rendered.render().code == 0
    text = manifest.read_text()
    document = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))
    costs = {entry["path"]: entry["cost"] for entry in document["images"]}
    assert costs["grid/circle.png"] is None
    assert all(isinstance(costs[path], float) and costs[path] > 0 for path in ALL[1:])
    assert document["totals"]["cost_credits"] == round(sum(costs[path] for path in ALL[1:]), 4)


def test_a_deleted_store_and_manifest_are_recovered_from_the_images_themselves(
        rendered: Cli, emulator: Emulator) -> None:
    original = json.loads((rendered.root / "rebuild.manifest.json").read_text())["images"]
    shutil.rmtree(rendered.root / ".fluxbatch")
    (rendered.root / "rebuild.manifest.json").unlink()
    before, sent = images(rendered.root), len(emulator.submissions)

    assert rendered.status().code == 0
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    untouched(rendered, before, sent)
    assert json.loads((rendered.root / "rebuild.manifest.json").read_text())["images"] == original


# -- 7. one render per output root -----------------------------------------------------------------


def test_a_held_lock_stops_another_holder_with_a_clear_message(tmp_path: Path) -> None:
    with RootLock(tmp_path):
        started = time.monotonic()
        with pytest.raises(StateError) as raised, RootLock(tmp_path, wait=0.3):
            pass
        waited = time.monotonic() - started
    assert str(raised.value) == (
        f"{tmp_path} is being rendered by another fluxbatch (pid {os.getpid()}); wait for it to "
        "finish, or render into another output root")
    assert waited >= 0.3
    with RootLock(tmp_path, wait=0):  # released on exit
        pass


HOLD_LOCK = """
import sys, time
from pathlib import Path
from fluxbatch.state.lock import RootLock
with RootLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_render_waits_for_the_lock_held_by_another_process(
        cli: Cli, emulator: Emulator) -> None:
    cli.root.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cli.root), "1.0"],
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        started = time.monotonic()
        assert cli.render() == Run(0, cli.written(4), "")
        waited = time.monotonic() - started
        assert holder.wait(timeout=120) == 0
    finally:
        holder.kill()
        holder.wait()
    assert waited >= 0.8  # it did not start while the other process held the root
    check_manifest(cli)


def test_the_hint_for_an_unreadable_store_in_the_current_folder_reads_as_a_sentence() -> None:
    error = unreadable_store(Path(".fluxbatch/state.sqlite"),
                             sqlite3.DatabaseError("file is not a database"))
    assert str(error) == (
        ".fluxbatch/state.sqlite: the state store is unreadable (file is not a database). No "
        "image is touched: move it away (for example `mv .fluxbatch/state.sqlite "
        ".fluxbatch/state.sqlite.broken`) and run again, and fluxbatch rebuilds it from the "
        "manifests in ./")
