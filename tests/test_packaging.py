"""What an install ships besides the code: the typing marker and the licence the metadata
names."""

from __future__ import annotations

import fnmatch
import tomllib
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_py_typed_is_in_the_package_and_its_package_data() -> None:
    marker = resources.files("fluxbatch").joinpath("py.typed")
    assert marker.is_file()
    assert marker.read_bytes() == b""
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["fluxbatch"]
    assert any(fnmatch.fnmatch("py.typed", pattern) for pattern in globs)


def test_the_licence_file_is_the_mit_licence_the_metadata_names() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n\nCopyright (c) 2026 fluxbatch contributors\n")
