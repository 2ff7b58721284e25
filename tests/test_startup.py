"""`validate` and `plan` run in every pull request and send nothing: they load no HTTP client
and no progress bar. Checked in a fresh interpreter, from Python's own import log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fluxbatch
from tests.helpers import build_file_tree

SOURCE_ROOT = Path(fluxbatch.__file__).resolve().parents[1]
# http: http.client; jsonschema: the recipe is checked by its own declaration
UNUSED = {"httpx", "httpx_aiohttp", "aiohttp", "tqdm", "http", "ssl", "jsonschema"}


def imported(argv: list[str], cwd: Path) -> set[str]:
    """The top-level packages `python -m fluxbatch ARGV` imports."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fluxbatch", *argv], cwd=cwd,
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(SOURCE_ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


@pytest.mark.parametrize("argv", [
    ["validate", "recipe.yaml"],
    ["plan", "recipe.yaml"],
    ["plan", "recipe.yaml", "--json", "--shard", "1/2"],
    ["plan", "recipe.yaml", "--jsonl", "--only", "owls"],
], ids=["validate", "plan", "plan-json", "plan-jsonl"])
def test_validate_and_plan_load_no_http_client_and_no_progress_bar(
        tmp_path: Path, argv: list[str]) -> None:
    build_file_tree(tmp_path, {"recipe.yaml": """
        version: 1
        name: r
        provider: bfl
        defaults: {model: flux-dev}
        jobs:
          - {name: owls, prompt: "a {{ mood }} owl", matrix: {mood: [calm, wise]}}
    """})
    loaded = imported(argv, tmp_path)
    assert {"fluxbatch", "jinja2", "yaml"} <= loaded  # (the log is read right)
    assert loaded & UNUSED == set()


@pytest.mark.parametrize("argv", [
    ["merge", "recipe.yaml", "elsewhere"],
    ["clean", "recipe.yaml"],
    ["clean", "recipe.yaml", "--store", "--delete"],
], ids=["merge", "clean", "clean-store"])
def test_merge_and_clean_load_no_http_stack(tmp_path: Path, argv: list[str]) -> None:
    """They place, list and delete files: the HTTP client, its TLS and the emulator's server
    are not theirs to load (placing images lives beside the writer, not in `network`)."""
    build_file_tree(tmp_path, {"recipe.yaml": """
        version: 1
        name: r
        provider: emulator
        defaults: {model: flux-dev, width: 256, height: 256}
        output: "owls/{{ mood }}.{{ ext }}"
        jobs:
          - name: owls
            prompt: "a {{ mood }} owl"
            params: {output_format: "{{ {'calm': 'png', 'wise': 'jpeg', 'odd': 'webp'}[mood] }}"}
            matrix: {mood: [calm, wise, odd]}
    """})
    rendered = subprocess.run(
        [sys.executable, "-m", "fluxbatch", "render", "recipe.yaml", "--out", "elsewhere", "-q"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(SOURCE_ROOT)})
    assert rendered.returncode == 0, rendered.stderr
    loaded = imported(argv, tmp_path)
    assert {"fluxbatch", "sqlite3"} <= loaded  # (the log is read right)
    assert loaded & {"aiohttp", "httpx", "httpx_aiohttp", "ssl", "h11"} == set()
    if argv[0] == "merge":  # (and it did place every image, writing provenance in each)
        names = sorted(p.name for p in (tmp_path / "owls").iterdir())
        assert names == ["calm.png", "odd.webp", "wise.jpg"]
