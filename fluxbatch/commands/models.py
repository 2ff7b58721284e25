"""`fluxbatch models [MODEL]` and `fluxbatch schema`."""

from __future__ import annotations

import json

from fluxbatch import models as catalogue
from fluxbatch.commands.output import money, table
from fluxbatch.errors import EXIT_OK, FluxbatchError
from fluxbatch.recipe_schema import recipe_schema


def models(*, model: str | None) -> int:
    if model is None:
        rows = []
        for m in catalogue.catalogue().values():
            price = catalogue.PRICES.get(m.name)
            cost = "unknown" if price is None else money(price.usd) + (
                f" + {money(price.per_extra_mp)}/MP" if price.per_extra_mp else "")
            rows.append([m.name, cost + ("" if price is None or price.verified else " (?)"),
                         str(catalogue.concurrency_cap(m.name)),
                         "deprecated" if m.deprecated else m.sized_by])
        print(table(["MODEL", "PRICE", "CAP", "SIZE BY"], rows))
        print(f"\nRequest schemas: BFL OpenAPI {catalogue.SPEC_DATE}; (?) marks an unverified "
              "price. `fluxbatch models NAME` lists a model's parameters.")
        return EXIT_OK
    found = catalogue.get(model)
    if found is None:
        raise FluxbatchError(catalogue.unknown_model_message(model))
    print(f"{found.name}: {found.summary}")
    print(f"schema {found.source}{' (deprecated)' if found.deprecated else ''}")
    rows = []
    for name, prop in found.properties.items():
        limits = []
        for key, label in (("minimum", "min"), ("maximum", "max"), ("multipleOf", "×")):
            value = _find(prop, key)
            if value is not None:
                limits.append(f"{label} {value}")
        enum = _find(prop, "enum")
        if isinstance(enum, list):
            limits.append("|".join(enum))
        default = prop.get("default")
        rows.append([name + (" *" if name in found.required else ""),
                     "|".join(found.types_of(name)), " ".join(limits),
                     "" if default is None else json.dumps(default)])
    print(table(["PARAMETER", "TYPE", "LIMITS", "DEFAULT"], rows))
    print("* required")
    return EXIT_OK


def _find(schema: object, key: str) -> object:
    if isinstance(schema, dict):
        if key in schema:
            return schema[key]
        for branch in schema.get("anyOf", ()):
            found = _find(branch, key)
            if found is not None:
                return found
    return None


def schema(*, manifest: bool = False) -> int:
    from fluxbatch.write import manifest_schema

    print(json.dumps(manifest_schema() if manifest else recipe_schema(), indent=2))
    return EXIT_OK
