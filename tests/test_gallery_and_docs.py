"""The README staying in step with the command line (the gallery's tests are in
test_gallery.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fluxbatch.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_every_command_is_in_the_readme_command_table() -> None:
    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Commands"):readme.index("Exit codes:")]
    documented = set(re.findall(r"^\| `([a-z]+)", table, re.MULTILINE))
    assert documented == set(subparsers.choices)


def test_every_render_option_is_in_the_readme() -> None:
    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    readme = (ROOT / "README.md").read_text()
    render = subparsers.choices["render"]
    options = {o for a in render._actions for o in a.option_strings if o.startswith("--")}
    options -= {"--help", "--jobs", "--quiet"}  # documented as -j and -q
    missing = sorted(o for o in options if f"`{o}" not in readme)
    assert missing == []
