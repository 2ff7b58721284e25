"""Crash safety, proven: kill `render` at random points, restart, and check that every image
exists exactly once and the provider saw every job submitted exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
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
name: crash
provider: emulator
output: "{{ job }}/{{ colour }}-{{ shape }}-{{ replicate }}.{{ ext }}"
defaults:
  model: flux-pro-1.1
  width: 256
  height: 256
  output_format: png
jobs:
  - name: grid
    prompt: "a {{ colour }} {{ shape }}"
    matrix:
      colour: [red, green, blue, cyan, magenta, yellow, black, white, grey, orange]
      shape: [circle, square, star, heart, moon, cloud, drop, leaf, bolt, key]
    replicates: 2
"""


def start_render(recipe: Path, base_url: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "fluxbatch", "render", str(recipe), "--base-url", base_url, "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def render_until_done(recipe: Path, emulator: Emulator, rng: random.Random,
                      kills: int) -> list[int]:
    """Kill the render process `kills` times at random moments while it renders, then let
    one run finish. Every kill lands mid-run, by construction: it comes after a random number
    of new submits, at most half of those still to make, so the render has more to do."""
    total = len(load_plan(str(recipe)).jobs)
    codes = []
    for _ in range(kills):
        submitted = {job_key(str(s["model"]), s["request"])  # type: ignore[arg-type]
                     for s in emulator.submissions}
        left = total - len(submitted)
        assert left >= 2, "too few jobs left to kill a render in the middle"
        target = len(emulator.submissions) + rng.randint(1, left // 2)
        process = start_render(recipe, emulator.base_url)
        deadline = time.monotonic() + 60
        while len(emulator.submissions) < target:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the render stopped submitting"
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL, "the kill did not land"
        codes.append(process.returncode)
    process = start_render(recipe, emulator.base_url)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, (out + err).decode()
    codes.append(process.returncode)
    return codes


def check_outcome(tmp_path: Path, emulator_submissions: list[dict[str, object]]) -> None:
    plan = load_plan(str(tmp_path / "recipe.yaml"))
    planned = {job.key: job for job in plan.jobs}
    submitted = Counter(job_key(str(s["model"]), s["request"])  # type: ignore[arg-type]
                        for s in emulator_submissions)
    assert set(submitted) == set(planned)
    assert max(submitted.values()) == 1, "a job was paid for twice"
    images = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert images == sorted(job.output for job in plan.jobs)
    debris = [p for p in tmp_path.rglob("*.tmp")]
    assert debris == []
    manifest = json.loads((tmp_path / "crash.manifest.json").read_text())
    schema = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(manifest)
    assert len(manifest["images"]) == len(plan.jobs)
    for entry in manifest["images"]:
        assert file_sha256(tmp_path / entry["path"]) == entry["sha256"]


# One seed in the fast run: crash recovery keeps a representative there (CONTRIBUTING.md)
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_never_pays_twice(tmp_path: Path, seed: int) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    config = EmulatorConfig(latency=0.4, latency_sigma=0.3, seed=seed, max_side=64)
    with EmulatorThread(config) as emulator:
        render_until_done(tmp_path / "recipe.yaml", emulator, random.Random(seed), kills=4)
        submissions = list(emulator.submissions)
    check_outcome(tmp_path, submissions)


@pytest.mark.slow
def test_sigkill_with_dropped_connections_and_server_errors(tmp_path: Path) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    # Faults on polls and downloads are retried; a fault on a submit makes a job *unknown*
    # by design (it may have been billed) and is tested on its own elsewhere.
    config = EmulatorConfig(latency=0.4, latency_sigma=0.3, seed=7, max_side=64,
                            fault_rate=0.1, faults=frozenset({"500", "drop"}),
                            submit_faults=False)
    with EmulatorThread(config) as emulator:
        render_until_done(tmp_path / "recipe.yaml", emulator, random.Random(7), kills=3)
        submissions = list(emulator.submissions)
        assert sum(emulator.stats.faults.values()) > 0
    check_outcome(tmp_path, submissions)
