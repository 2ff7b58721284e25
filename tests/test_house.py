"""Rules of the house that hold across the package, checked over its source."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import fluxbatch

PACKAGE = Path(fluxbatch.__file__).resolve().parent
# `Any` only where a value really is arbitrary: what a sqlite row, `json.loads` or a template
# hands over before it is checked, a sandbox hook that sees whatever a template calls. Known
# shapes get TypedDicts or dataclasses, JSON the `fluxbatch.jsontypes` aliases, values only
# passed through or narrowed `object`.
MAX_ANY = 200


def any_names(source: str) -> int:
    """How many times the name `Any` is written as code (not in comments or strings)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return sum(1 for token in tokens if token.type == tokenize.NAME and token.string == "Any")


def test_any_names_counts_code_only() -> None:
    source = ('"""Any docstring."""\nimport typing\nfrom typing import Any  # Any\n'
              'x: typing.Any = "Any"\ny: dict[str, Any] = {}\n')
    assert any_names(source) == 3


def test_the_package_writes_any_at_most_max_any_times() -> None:
    counts = {str(path.relative_to(PACKAGE.parent)): any_names(path.read_text(encoding="utf-8"))
              for path in sorted(PACKAGE.rglob("*.py"))}
    total = sum(counts.values())
    listed = "\n".join(f"{count:4} {name}" for name, count in
                       sorted(counts.items(), key=lambda item: -item[1]) if count)
    print(f"`Any` in the package: {total}\n{listed}")
    assert total <= MAX_ANY, f"`Any` is written {total} times (at most {MAX_ANY}):\n{listed}"
