"""Shared fixtures. Every test runs away from the real home directory and real API keys."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

KEY_VARIABLES = ("BFL_API_KEY", "BFL_API_KEY_FILE", "COMETAPI_KEY", "COMETAPI_KEY_FILE")


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith(("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                            "https_proxy", "all_proxy")):
            monkeypatch.delenv(name, raising=False)


def build_file_tree(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """Write `files` (relative path → text, dedented, or bytes) under `root`."""
    for relative, content in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(textwrap.dedent(content).lstrip("\n"), encoding="utf-8")
    return root
