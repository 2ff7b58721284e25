"""`provider: emulator` without --base-url starts an emulator for the run; its tasks die with
it, so a later run sends them again (for free) instead of waiting on a dead host."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxbatch.front import load_plan
from fluxbatch.main import main
from fluxbatch.state.store import Store
from tests.helpers import build_file_tree

RECIPE = """\
version: 1
name: inproc
provider: emulator
defaults: {model: flux-pro-1.1, width: 256, height: 256, output_format: png}
jobs:
  - name: grid
    prompt: "a {{ shape }}"
    matrix: {shape: [circle, square, star]}
"""


def test_tasks_of_an_earlier_in_process_emulator_are_sent_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": RECIPE})
    jobs = load_plan(str(tmp_path / "recipe.yaml")).jobs
    with Store.open(tmp_path) as store:  # as an interrupted run would have left it
        store.submitting(jobs[0].key, "emulator", "http://127.0.0.1:9")
        store.submitted(jobs[0].key, "gone-1", "http://127.0.0.1:9/v1/get_result?id=gone-1",
                        4.0, 0.0)
        store.submitting(jobs[1].key, "emulator", "http://127.0.0.1:9")

    code = main(["render", str(tmp_path / "recipe.yaml"), "-q"])

    assert (code, capsys.readouterr().out) == (
        0, f"3 written; cost $0.12 (reported by the provider); manifest "
           f"{tmp_path / 'inproc.manifest.json'}\n")
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == [
        "circle-1.png", "square-1.png", "star-1.png"]
