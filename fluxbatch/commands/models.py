"""`fluxbatch models [MODEL]`, `fluxbatch models --add OPENAPI` and `fluxbatch schema`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fluxbatch import models as catalogue
from fluxbatch import project_models
from fluxbatch.commands.output import money, table
from fluxbatch.errors import EXIT_OK, FluxbatchError
from fluxbatch.project import ProjectFileError, find_root, read_regular
from fluxbatch.recipe_schema import recipe_schema
from fluxbatch.state.files import replacing


def models(*, model: str | None) -> int:
    own = _own_catalogue(Path(find_root(os.path.realpath("."))))
    catalogue.use_project_models(own.models if own is not None else {})
    if model is None:
        rows = []
        for m in catalogue.catalogue().values():
            price = catalogue.PRICES.get(m.name)
            cost = "unknown" if price is None else money(price.usd) + (
                f" + {money(price.per_extra_mp)}/MP" if price.per_extra_mp else "")
            rows.append([m.name, cost + ("" if price is None or price.verified else " (?)"),
                         str(catalogue.concurrency_cap(m.name)),
                         "deprecated" if m.deprecated else m.sized_by])
        rows += [[m.name, "unknown", str(catalogue.concurrency_cap(m.name)),
                  f"{m.sized_by} (project)"] for m in (own.models.values() if own else ())]
        print(table(["MODEL", "PRICE", "CAP", "SIZE BY"], rows))
        ours = f"; (project): from {own.path}" if own is not None else ""
        print(f"\nRequest schemas: BFL OpenAPI {catalogue.SPEC_DATE}{ours}; (?) marks an "
              "unverified price. `fluxbatch models NAME` lists a model's parameters.")
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


def add_models(*, spec: str, project: str | None) -> int:
    """Keep the models of `spec` (a provider's OpenAPI document) that this release does not
    know in the project's `fluxbatch.models.json`, for its recipes to name."""
    root = Path(find_root(os.path.realpath(project or ".")))
    target = root / project_models.FILE
    try:
        data = read_regular(spec, limit=project_models.MAX_BYTES, name=spec)
        current = read_regular(target, limit=project_models.MAX_BYTES, name=str(target)) \
            if os.path.lexists(target) else None
        document, names = project_models.added(data, spec, current)
    except FileNotFoundError:
        raise FluxbatchError(f"{spec}: no such file") from None
    except OSError as error:
        raise FluxbatchError(f"{spec}: {error.strerror or error}") from None
    except (ProjectFileError, project_models.CatalogueError) as error:
        raise FluxbatchError(str(error)) from None
    if not names:
        print(f"nothing to add: every model of {spec} is one this release of fluxbatch knows "
              f"(BFL OpenAPI {catalogue.SPEC_DATE}) or {target} holds already")
        return EXIT_OK
    try:
        with replacing(target, target.parent, "w") as handle:
            handle.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    except OSError as error:
        raise FluxbatchError(f"cannot write {target}: {error.strerror or error}") from None
    added = project_models.read(target, target.read_bytes())
    print(f"added {', '.join(names)} to {target}: commit it with your recipes, which may now "
          "name them")
    for name in names:
        unchecked = project_models.unchecked_keywords(added.models[name])
        if unchecked:
            print(f"note: {name}: not checked before sending (the provider checks it): "
                  f"{', '.join(unchecked)}")
    return EXIT_OK


def _own_catalogue(root: Path) -> project_models.ProjectCatalogue | None:
    """The catalogue of the project around the current folder, if it has one."""
    target = root / project_models.FILE
    if not os.path.lexists(target):
        return None
    try:
        data = read_regular(target, limit=project_models.MAX_BYTES, name=str(target))
        return project_models.read(target, data)
    except (OSError, ProjectFileError, project_models.CatalogueError) as error:
        raise FluxbatchError(f"{target}: {getattr(error, 'strerror', None) or error}") \
            from None
