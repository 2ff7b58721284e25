"""Names for values whose shape is JSON's and nothing narrower.

`JSON` is what a recipe, a schema or a wire body holds: read-only containers (`Mapping`,
`Sequence`), so that a `dict[str, str]` is one too. `JSONObject` is a mapping being built.
Where a value is only passed through or narrowed with `isinstance`, the code says `object`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

JSON: TypeAlias = "bool | int | float | str | Sequence[JSON] | Mapping[str, JSON] | None"
JSONObject: TypeAlias = "dict[str, JSON]"
