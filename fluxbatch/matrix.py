"""Matrix → combinations, with exactly GitHub Actions' `strategy.matrix` rules.

1. The product of the axes, in declaration order (the first axis varies slowest).
2. `exclude` entries remove every combination they partially match — applied first.
3. Each `include` entry is merged into every *original* combination whose original values it
   does not overwrite (values added by earlier includes may be overwritten); an entry that
   fits none is appended as a new combination. An include-only matrix runs its entries.

Beyond GitHub: an axis may be a `zip` group (lists advancing in lock-step) or a `rows` table;
either contributes several variables at once and counts as one factor of the product. An
`exclude` entry that matches no combination is a problem (it excludes nothing, and what it
was meant to exclude is paid for), and an `include` entry that names a value its variable
does not have is worth a note (see `dead_excludes` and `new_includes`). An object value is
shown and selected by its label (see `label`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from fluxbatch.models import did_you_mean
from fluxbatch.recipe import Axis, Matrix

# The keys that label an object value, in order: a `label` given for the purpose, else the
# object's `name`.
LABEL_KEYS = ("label", "name")


class Combination(NamedTuple):
    """One set of variable values, and the rule that produced it (for `plan --explain`).

    `rule` is "product" (with `position`, its place in the full product, from which the row
    picked on each axis is derived), "include-new" (with `include`, the entry's index), or
    "single" (a job with no matrix). `merged` lists the include entries merged into it.
    A NamedTuple (immutable, like a frozen dataclass) because a plan makes one per
    combination and tuples are built four times faster.
    """

    values: Mapping[str, object]
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
    values: Mapping[str, object]
    exclude: int


def upper_bound(matrix: Matrix) -> int:
    """How many combinations at most, computed without enumerating them."""
    product = math.prod(len(axis.rows) for axis in matrix.axes) if matrix.axes else 0
    if not matrix.axes and not matrix.include:
        return 1
    return product + len(matrix.include)


def combinations(matrix: Matrix) -> tuple[list[Combination], list[Removed]]:
    """All combinations in order, and the ones `exclude` removed."""
    kept: list[tuple[dict[str, object], int]] = []
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


def _excluded_by(values: Mapping[str, object],
                 exclude: tuple[Mapping[str, object], ...]) -> int | None:
    for index, entry in enumerate(exclude):
        if all(k in values and values[k] == v for k, v in entry.items()):
            return index
    return None


def explain(combination: Combination, axes: tuple[Axis, ...]) -> str:
    """Which rule made this combination, in words."""
    if combination.rule == "single":
        return "no matrix: one combination"
    if combination.rule == "include-new":
        why = _doubtful(combination.values, axes)
        return f"include[{combination.include}]: new combination (fits no original one)" \
            f"{'' if why is None else ': ' + why}"
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


def labelled(value: object) -> str | None:
    """The label of an object value (its `label`, else its `name`, when that is text or a
    number), or None."""
    if isinstance(value, Mapping):
        for key in LABEL_KEYS:
            found = value.get(key)
            if isinstance(found, str) and found:
                return found
            if isinstance(found, int | float) and not isinstance(found, bool):
                return json.dumps(found)
    return None


def label(value: object) -> str:
    """How a matrix value is shown (the plan table, captions, messages) and named
    (`--only aspect=square`): text as itself, an object by its label, anything else as
    compact JSON."""
    if isinstance(value, str):
        return value
    found = labelled(value)
    return found if found is not None else json.dumps(value, ensure_ascii=False, default=str)


def dead_excludes(matrix: Matrix) -> list[tuple[int, str]]:
    """The `exclude` entries that match no combination of the product, as (index, why).

    A renamed or misspelt value quietly disables an exclude entry, and the images it was
    meant to remove are planned and paid for. (An entry's keys that are not matrix
    variables are reported on their own.)"""
    if not matrix.axes:
        return []
    return [(index, why) for index, entry in enumerate(matrix.exclude)
            if (why := _unmatched(entry, matrix.axes)) is not None]


def new_includes(matrix: Matrix) -> list[tuple[int, str]]:
    """The `include` entries that name a value their variable does not have, and leave some
    variable out, as (index, why). Such an entry fits no combination, so it is added as one
    of its own: GitHub's own examples do so on purpose (`fruit: banana`), so it is no error;
    but it may be a typo in an entry meant to add to some combinations. (An entry that gives
    every variable a value is plainly a combination of its own.)"""
    return [(index, why) for index, entry in enumerate(matrix.include)
            if (why := _doubtful(entry, matrix.axes)) is not None]


def _doubtful(entry: Mapping[str, object], axes: Sequence[Axis]) -> str | None:
    if not axes or all(name in entry for axis in axes for name in axis.names):
        return None
    return _unmatched(entry, axes, together=False)


def _unmatched(entry: Mapping[str, object], axes: Sequence[Axis], *,
               together: bool = True) -> str | None:
    """Why no combination of the product has the entry's values, or None. The product of
    the axes has every choice of row on each: a combination has the values when each axis
    has a row with those of them that are on it."""
    on_axis: dict[int, list[tuple[str, int, object]]] = {}
    for name, wanted in entry.items():
        for a, axis in enumerate(axes):
            if name in axis.names:
                column = axis.names.index(name)
                on_axis.setdefault(a, []).append((name, column, wanted))
                if not any(row[column] == wanted for row in axis.rows):
                    return _missing(name, wanted, [row[column] for row in axis.rows])
    if not together:
        return None
    for a, pairs in on_axis.items():
        if not any(all(row[column] == wanted for _, column, wanted in pairs)
                   for row in axes[a].rows):
            shown = " with ".join(f"{name} {_shown(wanted)}" for name, _, wanted in pairs)
            return f"no combination has {shown}"
    return None


def _missing(name: str, wanted: object, values: list[object]) -> str:
    if isinstance(wanted, str) and any(labelled(value) == wanted for value in values):
        hint = " (an object value is matched whole, not by its label)"
    else:
        hint = value_hint(label(wanted), values)
    return f"{name} has no value {_shown(wanted)}{hint}"


def value_hint(wanted: str, values: Sequence[object]) -> str:
    """For a value that is not among `values`: the one it is close to, as a "did you mean",
    else the values themselves when they are few (or nothing)."""
    hint = did_you_mean(wanted, list(dict.fromkeys(map(label, values))))
    shown = list(dict.fromkeys(map(_shown, values)))
    if not hint and len(shown) <= 6:
        hint = f" (its values: {', '.join(shown)})"
    return hint


def _shown(value: object) -> str:
    """A value in a message: text quoted, anything else by its label."""
    return repr(value) if isinstance(value, str) else label(value)
