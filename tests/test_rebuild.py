"""Make-style rebuilds against the emulator: an unchanged recipe costs nothing, an edit
re-renders exactly the images it touches, and `--only`, `--shard`, `--budget`, `--force` and
`--dry-run` select (or refuse) exactly what they say."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fluxbatch import imagemeta
from fluxbatch.emulator import Emulator
from fluxbatch.front import load_plan
from fluxbatch.state.store import Store
from tests.helpers import (
    STORED,
    Cli,
    Run,
    aligned,
    build_file_tree,
    check_manifest,
    images,
    money,
    status_table,
)

ALL = ("grid/circle.png", "grid/square.png", "grid/star.png", "solo/tree.png")


def status_verbose(rows: Sequence[tuple[str, ...]], counts: Sequence[tuple[str, int]],
                   root: Path) -> str:
    """The exact `status -v` text for these counts and not-up-to-date rows."""
    return status_table(root, counts) + "\n" + aligned(
        ("JOB", "VALUES", "OUTPUT", "STATE", "REASON"), rows)


PLACE_ONE = "not up to date: `fluxbatch render` makes them (1 to place or collect, at no cost)\n"


def to_render(count: int) -> str:
    return f"not up to date: `fluxbatch render` makes them ({count} to render)\n"


# -- 1. make-style rebuilds -----------------------------------------------------------------


def test_rerender_of_an_unchanged_recipe_submits_nothing_and_rewrites_nothing(
        rendered: Cli, emulator: Emulator) -> None:
    before, sent = images(rendered.root), len(emulator.submissions)
    polls, downloads = emulator.stats.polls, emulator.stats.downloads

    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    assert rendered.status() == Run(0, f"recipe rebuild, output root {rendered.root}\n"
                                       "STATE       IMAGES\nup-to-date       4\n"
                                       "everything is up to date\n", "")
    assert (len(emulator.submissions), emulator.stats.polls, emulator.stats.downloads) == (
        sent, polls, downloads)
    assert images(rendered.root) == before
    assert sorted(check_manifest(rendered)) == sorted(ALL)


def test_a_deleted_image_is_placed_again_from_the_store_and_not_paid_again(
        rendered: Cli, emulator: Emulator) -> None:
    before, sent = images(rendered.root), len(emulator.submissions)
    (rendered.root / "grid" / "square.png").unlink()

    assert rendered.status("-v") == Run(1, status_verbose(
        [("grid", "shape=square colour=green", "grid/square.png", "stored", STORED)],
        [("up-to-date", 3), ("stored", 1)], rendered.root), PLACE_ONE)
    assert rendered.render() == Run(0, rendered.placed(1, up_to_date=3), "")
    assert rendered.prompts_sent(sent) == []
    after = images(rendered.root)
    assert {p: v for p, v in after.items() if p != "grid/square.png"} == \
        {p: v for p, v in before.items() if p != "grid/square.png"}
    assert sorted(check_manifest(rendered)) == sorted(ALL)


def test_a_deleted_image_without_its_store_copy_is_collected_again_for_free(
        rendered: Cli, emulator: Emulator) -> None:
    """The content store pruned (`clean --store`) and the file deleted: the task that made
    it is polled again for a fresh URL and downloaded again; nothing is submitted."""
    sent, polls = len(emulator.submissions), emulator.stats.polls
    assert rendered.clean("--store", "--delete").code == 0
    (rendered.root / "grid" / "square.png").unlink()

    assert rendered.render() == Run(0, rendered.written(1, up_to_date=3).replace(
        "cost $0.040 (reported by the provider)",
        "nothing paid, and $0.040 paid by earlier runs for the tasks collected"), "")
    assert rendered.prompts_sent(sent) == []
    assert emulator.stats.polls > polls
    assert sorted(check_manifest(rendered)) == sorted(ALL)


@pytest.mark.parametrize(("edit", "touched", "prompts", "changed"), [
    ({"colours": ("red", "green", "violet")}, ["grid/star.png"], ["a violet star"],
     ['prompt "a blue star" → "a violet star"; seed 1643153948 → 1684473033']),
    ({"tolerance": 3}, ["solo/tree.png"], ["a lone tree"], ["safety_tolerance 2 → 3"]),
    ({"prompt": "a {{ colour }} {{ shape }}, flat"},
     ["grid/circle.png", "grid/square.png", "grid/star.png"],
     ["a blue star, flat", "a green square, flat", "a red circle, flat"],
     ['prompt "a red circle" → "a red circle, flat"',
      'prompt "…green square" → "…green square, flat"',
      'prompt "a blue star" → "a blue star, flat"']),
], ids=["matrix-value", "param", "prompt-template"])
def test_an_edit_makes_exactly_the_touched_images_stale_and_replaces_them(
        rendered: Cli, emulator: Emulator, edit: dict[str, Any], touched: list[str],
        prompts: list[str], changed: list[str]) -> None:
    before, sent = images(rendered.root), len(emulator.submissions)
    rendered.write(**edit)
    plan = {job.output: job for job in load_plan(str(rendered.recipe)).jobs}
    rows = [(plan[o].job, " ".join(f"{k}={v}" for k, v in plan[o].vars.items()) or "-", o,
             "stale", f"the request changed: {what}") for o, what in zip(touched, changed,
                                                                          strict=True)]

    assert rendered.status("-v") == Run(1, status_verbose(
        rows, [("up-to-date", 4 - len(touched)), ("stale", len(touched))], rendered.root),
        to_render(len(touched)))
    assert rendered.render() == Run(0, rendered.written(len(touched), 4 - len(touched)), "")
    assert rendered.prompts_sent(sent) == prompts
    after = images(rendered.root)
    assert sorted(after) == sorted(ALL)
    for path in ALL:
        if path in touched:
            assert after[path][1] != before[path][1], f"{path} was not replaced"
            embedded = imagemeta.extract((rendered.root / path).read_bytes())
            assert embedded is not None and embedded["key"] == plan[path].key
        else:
            assert after[path] == before[path], f"{path} was rewritten"
    check_manifest(rendered)
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")


def test_a_stale_image_in_another_format_replaces_the_old_file(
        tmp_path: Path, emulator: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(emulator, capsys, tmp_path)
    cli.name = "formats"
    sent = len(emulator.submissions)
    text = """
        version: 1
        name: formats
        provider: emulator
        output: "img/{{ n }}.png"
        defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: FORMAT}
        jobs:
          - {name: a, prompt: "a {{ n }}", matrix: {n: [one]}}
        """
    build_file_tree(tmp_path, {"recipe.yaml": text.replace("FORMAT", "jpeg")})
    assert cli.render().code == 0
    assert sorted(images(tmp_path)) == ["img/one.jpg"]  # the extension follows the bytes

    build_file_tree(tmp_path, {"recipe.yaml": text.replace("FORMAT", "png")})
    assert cli.render() == Run(0, cli.written(1), "")
    assert sorted(images(tmp_path)) == ["img/one.png"]
    assert len(emulator.submissions) == sent + 2
    manifest = json.loads((tmp_path / "formats.manifest.json").read_text())
    assert [e["path"] for e in manifest["images"]] == ["img/one.png"]


def test_adding_a_matrix_value_renders_only_the_new_image(
        rendered: Cli, emulator: Emulator) -> None:
    before, sent = images(rendered.root), len(emulator.submissions)
    rendered.write(shapes=("circle", "square", "star", "heart"),
                   colours=("red", "green", "blue", "black"))

    assert rendered.render() == Run(0, rendered.written(1, up_to_date=4), "")
    assert rendered.prompts_sent(sent) == ["a black heart"]
    after = images(rendered.root)
    assert {p: v for p, v in after.items() if p != "grid/heart.png"} == before
    assert sorted(check_manifest(rendered)) == sorted([*ALL, "grid/heart.png"])


def test_force_rerenders_everything_selected_and_nothing_else(
        rendered: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    assert rendered.render("--force") == Run(0, rendered.written(4), "")
    assert len(emulator.submissions) == sent + 4

    before = images(rendered.root)
    assert rendered.render("--force", "--only", "solo") == Run(0, rendered.written(1), "")
    assert rendered.prompts_sent(sent + 4) == ["a lone tree"]
    after = images(rendered.root)
    assert after["solo/tree.png"] != before["solo/tree.png"]
    assert {p: v for p, v in after.items() if p != "solo/tree.png"} == \
        {p: v for p, v in before.items() if p != "solo/tree.png"}
    check_manifest(rendered)


VALUES = {"grid/circle.png": "shape=circle colour=red",
          "grid/square.png": "shape=square colour=green",
          "grid/star.png": "shape=star colour=blue", "solo/tree.png": "-"}


def dry_run_text(outputs: list[str], up_to_date: int = 0) -> str:
    rows = [(output.split("/")[0], VALUES[output], "1", "flux-pro-1.1", output, "submit")
            for output in outputs]
    noun = "image" if len(outputs) == 1 else "images"
    return (aligned(("JOB", "VALUES", "REP", "MODEL", "OUTPUT", "WOULD"), rows,
                    right=frozenset({2})) +
            f"dry run: would submit {len(outputs)} {noun} (estimated "
            f"{money(len(outputs) * 0.04)}), re-attach 0, "
            f"skip {up_to_date} up to date; nothing was sent or written\n")


@pytest.mark.parametrize(("patterns", "selected"), [
    (["solo"], ["solo/tree.png"]),
    (["grid/s*.png"], ["grid/square.png", "grid/star.png"]),
    (["*/*e.png"], ["grid/circle.png", "grid/square.png", "solo/tree.png"]),
    (["colour=red"], ["grid/circle.png"]),
    (["colour=[gb]*"], ["grid/square.png", "grid/star.png"]),
    (["colour=g*", "solo"], ["grid/square.png", "solo/tree.png"]),
    (["c*"], ["grid/circle.png"]),
    (["tree*"], ["solo/tree.png"]),
], ids=["job-name", "output-glob", "glob-across-jobs", "matrix-value", "value-glob",
        "repeated", "file-name-glob", "file-name-glob-no-extension"])
def test_only_selects_exactly_the_matching_images(
        cli: Cli, emulator: Emulator, patterns: list[str], selected: list[str]) -> None:
    options = [part for pattern in patterns for part in ("--only", pattern)]
    sent = len(emulator.submissions)
    assert cli.render("--dry-run", *options) == Run(0, dry_run_text(selected), "")
    assert len(emulator.submissions) == sent


def test_only_matching_nothing_is_an_error_not_a_silent_success(
        cli: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    assert cli.render("--only", "shape=tree") == Run(
        1, "", "fluxbatch: --only shape=tree: no image matches: no shape is 'tree' (its "
        "values: 'circle', 'square', 'star')\n")
    assert len(emulator.submissions) == sent


def test_only_renders_exactly_the_selected_images_and_leaves_the_rest_new(
        cli: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    only = ("--only", "colour=g*", "--only", "solo")
    assert cli.render(*only) == Run(0, cli.written(2), "")
    assert sorted(images(cli.root)) == ["grid/square.png", "solo/tree.png"]
    assert cli.prompts_sent(sent) == ["a green square", "a lone tree"]

    assert cli.render(*only) == Run(0, "nothing to render: 2 images up to date, 2 not "
                                       "selected\n", "")
    assert cli.render() == Run(0, cli.written(2, up_to_date=2), "")
    assert len(emulator.submissions) == sent + 4
    check_manifest(cli)


def test_two_shards_partition_the_plan(cli: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    first = cli.render("--shard", "1/2")
    one = sorted(images(cli.root))
    second = cli.render("--shard", "2/2")
    two = sorted(set(images(cli.root)) - set(one))

    assert (first, second) == (Run(0, cli.written(len(one)), ""),
                               Run(0, cli.written(len(two)), ""))
    assert one and two and sorted(one + two) == sorted(ALL)
    assert len(emulator.submissions) == sent + 4
    assert cli.render() == Run(0, "nothing to render: 4 images up to date\n", "")


def test_budget_below_the_estimate_refuses_and_sends_nothing(
        cli: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    assert cli.render("--budget", "0.01") == Run(
        1, "", "fluxbatch: the estimated cost $0.16 of the 4 images to render is over the "
               "budget of $0.01 (it counts this run and the unfinished runs it continues); "
               "nothing was sent\n")
    assert (len(emulator.submissions), images(cli.root)) == (sent, {})
    assert not (cli.root / "rebuild.manifest.json").exists()

    assert cli.render("--budget", "0.16") == Run(0, cli.written(4), "")


def test_dry_run_on_a_fresh_root_prints_the_submits_and_cost_and_creates_nothing(
        cli: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    assert cli.render("--dry-run") == Run(0, dry_run_text(list(ALL)), "")
    assert len(emulator.submissions) == sent
    assert sorted(p.name for p in cli.root.iterdir()) == ["recipe.yaml"]


def test_dry_run_after_an_edit_lists_only_the_stale_image_and_changes_nothing(
        rendered: Cli, emulator: Emulator) -> None:
    rendered.write(tolerance=5)
    state = rendered.root / ".fluxbatch" / "state.sqlite"
    before = (images(rendered.root), (rendered.root / "rebuild.manifest.json").read_bytes(),
              state.read_bytes(), len(emulator.submissions))

    expected = Run(0, (
        "JOB   VALUES  REP  MODEL         OUTPUT         WOULD\n"
        "solo  -         1  flux-pro-1.1  solo/tree.png  submit\n"
        "  ↳ the request changed: safety_tolerance 2 → 5\n"
        "dry run: would submit 1 image (estimated $0.040), re-attach 0, skip 3 up to date; "
        "nothing was sent or written\n"), "")
    assert rendered.render("--dry-run") == expected
    assert rendered.render("--dry-run") == expected
    after = (images(rendered.root), (rendered.root / "rebuild.manifest.json").read_bytes(),
             state.read_bytes(), len(emulator.submissions))
    assert before == after


# -- 2. trusting size and mtime, checking by sha256 -------------------------------------------


def change_bytes(path: Path, *, keep_mtime: bool) -> None:
    """Flip bytes in the middle of the file: same size, different content."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))
    mtime = stat.st_mtime_ns if keep_mtime else stat.st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(stat.st_atime_ns, mtime))


def test_changed_bytes_with_a_new_mtime_are_replaced_from_the_store(
        rendered: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    change_bytes(rendered.root / "grid" / "circle.png", keep_mtime=False)

    assert rendered.status("-v") == Run(1, status_verbose(
        [("grid", "shape=circle colour=red", "grid/circle.png", "stored", STORED)],
        [("up-to-date", 3), ("stored", 1)], rendered.root), PLACE_ONE)
    assert rendered.render() == Run(0, rendered.placed(1, up_to_date=3), "")
    assert rendered.prompts_sent(sent) == []
    check_manifest(rendered)


def test_a_touched_image_is_up_to_date_by_sha256_and_its_new_mtime_is_remembered(
        rendered: Cli, emulator: Emulator) -> None:
    target = rendered.root / "solo" / "tree.png"
    stat = target.stat()
    touched = stat.st_mtime_ns + 7_000_000_000
    os.utime(target, ns=(stat.st_atime_ns, touched))
    sent = len(emulator.submissions)

    assert rendered.status().code == 0
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    assert len(emulator.submissions) == sent
    with Store.open(rendered.root, create=False) as store:
        placed = {p.output: p for p in store.placements("rebuild")}
        assert placed["solo/tree.png"].mtime_ns == touched
    assert target.stat().st_mtime_ns == touched


def test_verify_finds_changed_bytes_that_size_and_mtime_hide(
        rendered: Cli, emulator: Emulator) -> None:
    sent = len(emulator.submissions)
    change_bytes(rendered.root / "grid" / "star.png", keep_mtime=True)

    assert rendered.status().code == 0  # the fast path trusts size and mtime
    assert rendered.render() == Run(0, "nothing to render: 4 images up to date\n", "")
    assert rendered.status("--verify").code == 1
    assert rendered.render("--verify") == Run(0, rendered.placed(1, up_to_date=3), "")
    assert rendered.prompts_sent(sent) == []
    assert rendered.status("--verify").code == 0
    check_manifest(rendered)
