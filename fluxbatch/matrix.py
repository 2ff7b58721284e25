"""Matrix → combinations, with exactly GitHub Actions' `strategy.matrix` rules.

1. The product of the axes, in declaration order (the first axis varies slowest).
2. `exclude` entries remove every combination they partially match — applied first.
3. Each `include` entry is merged into every *original* combination whose original values it
   does not overwrite (values added by earlier includes may be overwritten); an entry that
   fits none is appended as a new combination. An include-only matrix runs its entries.

Beyond GitHub: an axis may be a `zip` group (lists advancing in lock-step) or a `rows` table;
either contributes several variables at once and counts as one factor of the product.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from fluxbatch.recipe import Axis, Matrix


class Combination(NamedTuple):
    """One set of variable values, and the rule that produced it (for `plan --explain`).

    `rule` is "product" (with `position`, its place in the full product, from which the row
    picked on each axis is derived), "include-new" (with `include`, the entry's index), or
    "single" (a job with no matrix). `merged` lists the include entries merged into it.
    A NamedTuple (immutable, like a frozen dataclass) because a plan makes one per
    combination and tuples are built four times faster.
    """

    values: Mapping[str, Any]
    rule: str
    position: int = 0
    include: int | None = None
    merged: tuple[int, ...] = ()

    def picks(self, axes: tuple[Axis, ...]) -> tuple[int, ...]:
        """The row chosen on each axis (mixed-radix digits of `position`)."""
        picks = []
        rest = self.position
        for axis in reversed(axes):
            rest, pick = divmod(rest, len(axis.rows))
            picks.append(pick)
        return tuple(reversed(picks))


@dataclass(frozen=True, slots=True)
class Removed:
    values: Mapping[str, Any]
    exclude: int


def upper_bound(matrix: Matrix) -> int:
    """How many combinations at most, computed without enumerating them."""
    product = math.prod(len(axis.rows) for axis in matrix.axes) if matrix.axes else 0
    if not matrix.axes and not matrix.include:
        return 1
    return product + len(matrix.include)


def combinations(matrix: Matrix) -> tuple[list[Combination], list[Removed]]:
    """All combinations in order, and the ones `exclude` removed."""
    kept: list[tuple[dict[str, Any], int]] = []
    removed: list[Removed] = []
    if matrix.axes:
        names = tuple(name for axis in matrix.axes for name in axis.names)
        flatten = itertools.chain.from_iterable
        exclude = matrix.exclude
        for position, choice in enumerate(itertools.product(*(a.rows for a in matrix.axes))):
            values = dict(zip(names, flatten(choice), strict=True))
            excluded_by = _excluded_by(values, exclude) if exclude else None
            if excluded_by is None:
                kept.append((values, position))
            else:
                removed.append(Removed(values, excluded_by))
    elif not matrix.include:
        return [Combination({}, "single")], []
    if not matrix.include:
        return [Combination(values, "product", position) for values, position in kept], removed

    original_keys = {name for axis in matrix.axes for name in axis.names}
    merged: list[list[int]] = [[] for _ in kept]
    appended: list[Combination] = []
    for index, entry in enumerate(matrix.include):
        fixed = {k: v for k, v in entry.items() if k in original_keys}
        matched = False
        for i, (values, _) in enumerate(kept):
            if all(k in values and values[k] == v for k, v in fixed.items()):
                values.update(entry)
                merged[i].append(index)
                matched = True
        if not matched:
            appended.append(Combination(dict(entry), "include-new", include=index))
    result = [
        Combination(values, "product", position, merged=tuple(merged[i]))
        for i, (values, position) in enumerate(kept)
    ]
    return result + appended, removed


def _excluded_by(values: Mapping[str, Any], exclude: tuple[Mapping[str, Any], ...]) -> int | None:
    for index, entry in enumerate(exclude):
        if all(k in values and values[k] == v for k, v in entry.items()):
            return index
    return None


def explain(combination: Combination, axes: tuple[Axis, ...]) -> str:
    """Which rule made this combination, in words."""
    if combination.rule == "single":
        return "no matrix: one combination"
    if combination.rule == "include-new":
        return f"include[{combination.include}]: new combination (fits no original one)"
    parts = []
    for axis, pick in zip(axes, combination.picks(axes), strict=True):
        if axis.kind == "values":
            parts.append(f"{axis.origin}[{pick}]")
        else:
            parts.append(f"{axis.origin} row {pick + 1}")
    text = "product " + " × ".join(parts)
    if combination.merged:
        text += "; merged " + ", ".join(f"include[{i}]" for i in combination.merged)
    return text
