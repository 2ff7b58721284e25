"""Ctrl-C, proven: interrupt `render` while tasks are in flight; it exits 130 at once, the
store and the manifest are consistent, and the next run collects what was paid for without
paying for any image twice."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from fluxbatch.emulator import Emulator, EmulatorConfig, EmulatorThread
from fluxbatch.front import load_plan
from fluxbatch.identity import job_key
from fluxbatch.state.files import file_sha256
from tests.helpers import build_file_tree

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """\
version: 1
name: interrupt
provider: emulator
output: "{{ job }}/{{ colour }}-{{ shape }}.{{ ext }}"
defaults:
  model: flux-pro-1.1
  width: 256
  height: 256
  output_format: png
jobs:
  - name: grid
    prompt: "a {{ colour }} {{ shape }}"
    matrix:
      colour: [red, green, blue, cyan, magenta, yellow, black, white]
      shape: [circle, square, star, heart, moon]
"""
JOBS = 40
# After Ctrl-C a row is left as it was last committed: never mid-submit, never unknown.
ALLOWED = {"planned", "submitted", "ready", "written"}
STOPPING = ("stopping: nothing new is submitted; tasks already paid for are recorded and "
            "picked up by the next run (Ctrl-C again to quit now)")


def render_command(recipe: Path, base_url: str) -> list[str]:
    return [sys.executable, "-m", "fluxbatch", "render", str(recipe), "--base-url", base_url,
            "-q"]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def wait_for_first_submit(emulator: Emulator, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not emulator.submissions:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "render never submitted anything"
        time.sleep(0.02)


def store_rows(root: Path) -> tuple[list[tuple[str, str, str | None, str | None, str | None]],
                                    list[tuple[str, str, str, int, int | None]]]:
    """The ledger (key, status, task id, polling URL, blob) and the placements (output, path,
    sha256, size, mtime)."""
    database = sqlite3.connect(root / ".fluxbatch" / "state.sqlite")
    try:
        tasks = database.execute("SELECT key, status, task_id, polling_url, blob FROM tasks "
                                 "ORDER BY key").fetchall()
        placements = database.execute("SELECT output, path, sha256, bytes, mtime_ns FROM "
                                      "placements ORDER BY output").fetchall()
        return tasks, placements
    finally:
        database.close()


def check_consistent(root: Path) -> Counter[str]:
    """Every task in an allowed status, with a task id on every paid one and its bytes in the
    content store once fetched; every placed file as recorded; the manifest valid and naming
    exactly the placed files. Returns the counts by status ('written': placed)."""
    tasks, placements = store_rows(root)
    counts = Counter(row[1] for row in tasks if row[1] != "fetched")
    assert set(counts) <= ALLOWED, counts
    # kept in the content store, not yet placed (a quit landed between the two): in flight
    counts["kept"] = sum(row[1] == "fetched" for row in tasks) - len(placements)
    for key, status, task_id, polling_url, blob in tasks:
        if status in ("submitted", "ready", "fetched"):
            assert task_id and polling_url, key
        if status == "fetched":
            assert blob is not None
            assert file_sha256(root / ".fluxbatch" / "blobs" / blob[:2] / blob) == blob
    for output, path, sha256, size, mtime_ns in placements:
        stat = (root / path).stat()
        assert (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns), output
        assert file_sha256(root / path) == sha256, output
    counts["written"] = len(placements)
    manifest = json.loads((root / "interrupt.manifest.json").read_text())
    schema = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(manifest)
    for entry in manifest["images"]:
        assert file_sha256(root / entry["path"]) == entry["sha256"], entry["path"]
    assert sorted(e["path"] for e in manifest["images"]) == sorted(row[1] for row in placements)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")
                  if ".fluxbatch" not in p.parts) == sorted(e["path"] for e in manifest["images"])
    return counts


def summary(counts: Counter[str], root: Path) -> str:
    """The report line of the interrupted run, from what the store says happened."""
    written = counts["written"]
    pending = counts["submitted"] + counts["ready"] + counts["kept"]
    skipped = JOBS - written - pending
    parts = [f"{n} {word}" for n, word in ((written, "written"), (pending, "pending"),
                                           (skipped, "skipped")) if n]
    return (f"{', '.join(parts)}; cost ${(written + pending) * 0.04:.2f} (reported by the "
            f"provider); manifest {root / 'interrupt.manifest.json'}")


# One Ctrl-C in the fast run; two run with --slow (and a second Ctrl-C's report is checked in
# process below, in the fast run)
@pytest.mark.parametrize("presses", [1, pytest.param(2, marks=pytest.mark.slow)],
                         ids=["ctrl-c", "ctrl-c-twice"])
def test_ctrl_c_exits_130_with_consistent_state_and_the_rerun_pays_nothing_twice(
        tmp_path: Path, presses: int) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    recipe = tmp_path / "recipe.yaml"
    with EmulatorThread(EmulatorConfig(latency=1.0, latency_sigma=0.1, max_side=64)) as emu:
        process = subprocess.Popen(render_command(recipe, emu.base_url), env=environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_first_submit(emu, process)
        time.sleep(0.2)  # tasks are in flight (each takes about a second)
        for _ in range(presses):
            process.send_signal(signal.SIGINT)
            time.sleep(0.05)
        out, err = process.communicate(timeout=120)
        counts = check_consistent(tmp_path)

        rerun = subprocess.run(render_command(recipe, emu.base_url), env=environment(),
                               capture_output=True, timeout=60)
        submissions = list(emu.submissions)

    # A second Ctrl-C may land after the report, as the interpreter exits: killed by SIGINT.
    codes = {130} if presses == 1 else {130, -signal.SIGINT}
    assert process.returncode in codes, (out + err).decode()
    # (it did not wait for every task: some were still in flight when it stopped, below)
    # Whichever way it stopped, the report says what the ledger says: written, in flight
    # (paid, to collect) and spent (a quit now reported "nothing done; nothing paid").
    if process.returncode == 130:
        assert out.decode().splitlines()[-1] == summary(counts, tmp_path)
    if presses == 1:
        assert err.decode().splitlines()[0] == STOPPING
    assert counts["submitted"] + counts["ready"] > 0, "nothing was in flight"

    done, collected = counts["written"], counts["submitted"] + counts["ready"] + counts["kept"]
    earlier = f", and ${collected * 0.04:.2f} paid by earlier runs for the tasks collected" \
        if collected else ""
    assert (rerun.returncode, rerun.stdout.decode(), rerun.stderr.decode()) == (
        0, f"{JOBS - done} written{f', {done} up to date' if done else ''}; cost "
           f"${(JOBS - done - collected) * 0.04:.2f} (reported by the provider){earlier}; "
           f"manifest {tmp_path / 'interrupt.manifest.json'}\n", "")
    planned = {job.key for job in load_plan(str(recipe)).jobs}
    paid = Counter(job_key(str(s["model"]), s["request"]) for s in submissions)
    assert paid == Counter(planned), "a job was paid for twice, or never"
    assert check_consistent(tmp_path) == Counter(written=JOBS)


def test_a_render_stopped_at_once_reports_what_was_paid_and_what_is_left_to_collect(
        tmp_path: Path) -> None:
    """`stop(now=True)` (a second Ctrl-C) cancelled the executor, and the report kept only
    the images placed: "nothing done; nothing paid" while four tasks were paid and in
    flight. It now says what the ledger says."""
    import asyncio

    from fluxbatch.session import Options, Render

    build_file_tree(tmp_path, {"recipe.yaml": RECIPE.replace(
        "[red, green, blue, cyan, magenta, yellow, black, white]", "[red, green]").replace(
        "[circle, square, star, heart, moon]", "[circle, square, star]")})
    plan = load_plan(str(tmp_path / "recipe.yaml"))
    submitted = []

    def on_event(event: object) -> None:
        if getattr(event, "kind", None) == "submitted":
            submitted.append(event)
            if len(submitted) == 4:  # every slot taken: Ctrl-C, and again
                session.stop()
                session.stop(now=True)

    # (tasks that take minutes: the four are still in flight when the run stops)
    with EmulatorThread(EmulatorConfig(latency=600.0, latency_sigma=0.0, max_side=64)) as emu:
        session = Render(plan, Options(concurrency=4, base_url=emu.base_url),
                         on_event=on_event)  # type: ignore[arg-type]
        report = asyncio.run(session.run())

    assert report.interrupted
    assert Counter(o.status for o in report.outcomes) == Counter(pending=4, skipped=2)
    assert report.spent_usd() == pytest.approx(0.16)
    tasks, _ = store_rows(tmp_path)
    assert Counter(status for _, status, *_ in tasks) == Counter(submitted=4)


@pytest.mark.slow
def test_a_second_ctrl_c_while_requests_are_under_way_reports_what_the_ledger_says(
        tmp_path: Path) -> None:
    """With polls and downloads slow to answer, the first Ctrl-C waits for them and the
    second quits at once: the report said "nothing done; nothing paid" although tasks were
    paid and in flight."""
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    recipe = tmp_path / "recipe.yaml"
    slow = EmulatorConfig(latency=0.2, latency_sigma=0.0, max_side=64, fault_rate=1.0,
                          faults=frozenset({"slow"}), submit_faults=False,
                          slow_fault_seconds=600.0)
    with EmulatorThread(slow) as emu:
        process = subprocess.Popen(render_command(recipe, emu.base_url), env=environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_first_submit(emu, process)
        while len(emu.submissions) < 4:  # a few paid, their answers trickling out
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        assert process.stderr.readline().decode().rstrip("\n") == STOPPING
        process.send_signal(signal.SIGINT)  # while the slow answers are still under way
        out, err = process.communicate(timeout=120)
        counts = check_consistent(tmp_path)

    assert process.returncode == 130, (out + err).decode()
    assert counts["submitted"] + counts["ready"] >= 4
    assert out.decode().splitlines()[-1] == summary(counts, tmp_path)
