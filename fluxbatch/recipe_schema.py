"""The recipe's shape, declared once: each key is one field of the typed classes below.

From these classes (through `fluxbatch.declaration`) come the JSON Schema (draft 2020-12) that
editors read (`schemas/recipe.schema.json` is `fluxbatch schema`; a test keeps them equal),
the check of a recipe (`read`: every problem, located, in one run) and the typed objects the
stages after this one read. The enums (providers, models) come from the provider registry
and the model catalogue, so the schema never drifts from the code.

To add a key: add a field with `key(...)` to the class of the mapping it belongs in, and use
it. A condemned value (one with a problem) takes the field's default so that the rest is still
checked; `cost=` says what else that costs (by default, its job builds no image).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import TYPE_CHECKING

from fluxbatch import models, providers
from fluxbatch.declaration import (
    BAD,
    AnyOf,
    Anything,
    Choice,
    Const,
    Cost,
    ListOf,
    Loose,
    MapOf,
    Model,
    Reading,
    Salvage,
    Scalar,
    Template,
    derived,
    integer,
    key,
    number,
    schema_of,
    text,
)
from fluxbatch.errors import Problem
from fluxbatch.jsontypes import JSONObject
from fluxbatch.yamlsource import Path, Positions

if TYPE_CHECKING:
    from fluxbatch.inputs import Inputs
    from fluxbatch.project_models import ProjectCatalogue

SCHEMA_ID = "https://raw.githubusercontent.com/fluxbatch/fluxbatch/main/schemas/recipe.schema.json"
DEFAULT_MAX_JOBS = 10_000
DEFAULT_OUTPUT = "{{ job }}/{{ combo }}-{{ replicate }}.{{ ext }}"
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"
URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://"  # (schemes ignore case: `HTTPS://` is https)

NAME = text(pattern=NAME_PATTERN, mismatch=lambda value: (
    f"{value!r} must start with a letter or digit and use only letters, digits, '.', '_' "
    "and '-'"))
NON_EMPTY = text(min_length=1)
NEVER_LOST = Cost.NOTHING  # a condemned value that costs nothing but its own default


# -- the provider ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    name: str = key(Choice(providers.names), required=True, default="")
    base_url: str | None = key(text(pattern=URL_PATTERN, mismatch=lambda value: (
        f"{value!r} is not an http(s) URL")))
    concurrency: int | None = key(integer(minimum=1))
    model_concurrency: Mapping[str, int] = key(MapOf(integer(minimum=1)), factory=dict)
    timeout: float | None = key(number(above=0))


# Where renders are uploaded, and where images placed as paid come from, is the operator's
# decision: a recipe (from a pull request, say) that names a shared store is told so.
STORE_REFUSED = "a shared store is the operator's choice, never the recipe's: name it with " \
    "`--store URL` or FLUXBATCH_STORE where fluxbatch runs"
REFUSED = {name: STORE_REFUSED for name in ("store", "shared_store", "store_url")}

PROVIDER = AnyOf(Choice(providers.names).converted(ProviderSpec),
                 Model(ProviderSpec, closed=True, refused=REFUSED))


# -- a job's matrix -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FromFile:
    """`{from: subjects.txt}`: a variable's values read from a file."""

    source: str = key(NON_EMPTY, name="from", required=True, default="")
    column: str | None = key(NON_EMPTY, "CSV column name")


@dataclass(frozen=True, slots=True)
class Files:
    """`{files: photos/*.png}`: a variable whose values are image files."""

    pattern: str = key(NON_EMPTY, name="files", required=True, default="")


@dataclass(frozen=True, slots=True)
class RowsFile:
    """`rows: {from: table.csv}`: a table of combinations read from a file."""

    source: str = key(NON_EMPTY, name="from", required=True, default="")
    files: tuple[str, ...] = key(
        ListOf(NON_EMPTY, min_items=1, unique=True),
        "Columns that name image files: each is checked, and counts by its content in seeds, "
        "like a files: variable.", default=())


VALUE = Loose({
    "label": Scalar("string", "number", min_length=1,
                    description="How this object value is shown and selected."),
    "name": Anything("Labels this object value when it has no `label`."),
}, description="A value: text, a number, or an object whose fields templates read "
   "(`{{ aspect.w }}`). An object is shown (the plan's table, gallery captions, messages) and "
   "selected (`--only aspect=square`) by its `label`, else its `name`.")
# A misspelt key in one of these could change how the file reads: it condemns the variable.
AXIS = AnyOf(
    ListOf(VALUE, min_items=1),
    Model(FromFile, ref="from_file", noun="a mapping with 'from'", closed=True,
          description="Values read from a file next to the recipe: .txt (one per line; blank "
          "lines and # comments skipped), .yaml/.yml/.json (a list), or a .csv column."),
    Model(Files, ref="files", noun="a mapping with 'files'", closed=True,
          description="Image files matching a glob relative to the recipe (`photos/*.png`; "
          "`**` spans folders), sorted. Each renders as its path and offers .stem, .name and "
          ".path; its content, not its name, counts in seeds and keys."),
    ref="axis", description="A matrix variable: a list of values, values from a file, or "
    "image files.")
AxisSpec = tuple[object, ...] | FromFile | Files  # a variable as written (the builder reads files)
ZIP_GROUP = MapOf(AXIS, min_properties=1, ref="zip_group", noun="a mapping of lists")
COMBINATION = MapOf(min_properties=1)
ROWS_FILE = Model(RowsFile, ref="rows_file", noun="a mapping with 'from'", closed=True,
                  description="Rows read from a .csv (one per line, under a header), .yaml, "
                  ".yml or .json file next to the recipe.")
LOSES_NAMES = Cost.IMAGES | Cost.NAMES  # the job's variables are no longer all known


@dataclass(frozen=True, slots=True)
class Axis:
    """One factor of the product: a variable's values, a zip group, or a row table.

    `rows[i]` holds one value per name in `names`; `kind` and `origin` feed `plan --explain`.
    """

    kind: str  # "values" | "zip" | "rows"
    names: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]
    origin: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Matrix:
    """A job's `matrix:` as written, and (filled in by the builder) its values, loaded."""

    include: tuple[Mapping[str, object], ...] = key(ListOf(COMBINATION), cost=LOSES_NAMES,
                                                 default=())
    exclude: tuple[Mapping[str, object], ...] = key(ListOf(COMBINATION), default=())
    zip: Mapping[str, AxisSpec] | tuple[Mapping[str, AxisSpec], ...] | None = key(
        AnyOf(ZIP_GROUP, ListOf(ZIP_GROUP, min_items=1)),
        "Lists that advance in lock-step (one group or several).", cost=LOSES_NAMES)
    rows: tuple[Mapping[str, object], ...] | RowsFile | None = key(
        AnyOf(ListOf(COMBINATION, min_items=1), ROWS_FILE),
        "A table whose rows are combinations.", cost=LOSES_NAMES)
    variables: Mapping[str, AxisSpec] = derived(factory=dict)  # (a condemned one: no values)
    written: tuple[str, ...] = derived(())  # every key, in the recipe's order
    # loaded by the builder:
    axes: tuple[Axis, ...] = derived(())
    declared: tuple[str, ...] = derived(())  # every variable named, even one that failed
    complete: bool = derived(True)  # False when a row table failed to load: its columns are unknown
    too_costly: bool = derived(False)  # its combinations would cost too much to make

    @property
    def loaded(self) -> bool:
        """Whether every variable's values loaded; if not (a problem says why), the
        combinations are not the ones the recipe means and are not worth rendering."""
        named = {name for axis in self.axes for name in axis.names}
        return self.complete and not self.too_costly and named.issuperset(self.declared)


MATRIX = Model(Matrix, ref="matrix", salvage=True, others=AXIS, rest="variables",
               rest_salvage=Salvage(keep=True, value=()), order="written",
               description="Variables whose product makes the combinations (GitHub Actions "
               "strategy.matrix rules), plus zip groups and row tables.")


# -- a job --------------------------------------------------------------------------------------


def _parameter_properties(defs: JSONObject) -> JSONObject:
    """Every request parameter any model knows, for editor completion (checked per model)."""
    props: JSONObject = {"model": MODEL.schema(defs)}
    for model in models.catalogue().values():
        for name, prop in model.properties.items():
            if name in props or name in models.INTERNAL_FIELDS:
                continue
            description = prop.get("description") or prop.get("title") or name
            props[name] = {"description": f"{description} (may be a template)"}
    return props


MODEL = AnyOf(Choice(models.known_names), Template(),
              description="Model endpoint, e.g. flux-pro-1.1 (POST /v1/{model}); may be a "
              "template.", unknown=models.unknown_model_message)
PARAMS = MapOf(known={"model": MODEL}, ref="params", listed=_parameter_properties,
               description="Request parameters; values may be Jinja2 templates.",
               salvage=Salvage(costs={"model": Cost.IMAGES | Cost.MODEL}))


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One `jobs[i]` entry, validated; templates are still source text."""

    name: str = key(NAME, required=True, as_text=True, default="")
    description: str | None = key(text(), cost=NEVER_LOST)
    prompt: str | None = key(text(), "Jinja2 prompt template.")
    matrix: Matrix = key(MATRIX, factory=Matrix, cost=LOSES_NAMES)
    replicates: int = key(integer(minimum=1), default=1, show=1)
    params: Mapping[str, object] = key(PARAMS, factory=dict, cost=Cost.IMAGES | Cost.MODEL)
    seed: int | str = key(AnyOf(Const("auto"), integer(minimum=0), Template()),
                          "auto (derived from the combination), an integer, or a template.",
                          default="auto", show="auto")  # an integer, "auto", or a template
    output: str | None = key(NON_EMPTY)  # as written; built, the recipe's `output` if None
    index: int = derived(0)  # in the recipe's list of jobs
    # Set when a problem took out one of its values: the job is still checked, but no image
    # is built from it. Its model, or the names of its variables, may be unknown too.
    damaged: bool = derived(False)
    model_known: bool = derived(True)
    names_known: bool = derived(True)


def _job_cost(fields: dict[str, object], cost: Cost) -> None:
    if cost:
        fields.update(damaged=True, model_known=Cost.MODEL not in cost,
                      names_known=Cost.NAMES not in cost)


JOB = Model(JobSpec, ref="job", salvage=True, index="index", costed=_job_cost)


# -- the recipe ---------------------------------------------------------------------------------


def _default_provider() -> ProviderSpec:
    return ProviderSpec(providers.DEFAULT)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """A recipe, validated: what it says, and (filled in by the builder) where it is."""

    json_schema: str | None = key(text(), name="$schema", cost=NEVER_LOST)
    version: int | None = key(Const(1), "Recipe format version.", required=True,
                              cost=NEVER_LOST)
    name: str = key(NAME, "Recipe name; part of every auto seed, so renaming reseeds.",
                    required=True, as_text=True, cost=NEVER_LOST, default="")
    description: str | None = key(text(), cost=NEVER_LOST)
    provider: ProviderSpec = key(PROVIDER, "Where requests go: a provider name or a mapping.",
                                 factory=_default_provider, show=providers.DEFAULT,
                                 cost=NEVER_LOST)
    output: str = key(NON_EMPTY, "Output path template, relative to the output root.",
                      default=DEFAULT_OUTPUT, show=DEFAULT_OUTPUT, cost=Cost.OUTPUT)
    written_output_root: str | None = key(
        NON_EMPTY, "Output root, relative to the recipe (default: its directory).",
        name="output_root", cost=NEVER_LOST)
    max_jobs: int = key(integer(minimum=1), "Size guard: a plan of more images than this "
                        "needs --yes.", default=DEFAULT_MAX_JOBS, show=DEFAULT_MAX_JOBS,
                        cost=NEVER_LOST)
    defaults: Mapping[str, object] = key(PARAMS, factory=dict, cost=Cost.IMAGES | Cost.MODEL)
    vars: Mapping[str, object] = key(MapOf(salvage=Salvage(keep=True)),
                                  "Constants available to every template.", factory=dict,
                                  cost=LOSES_NAMES)
    jobs: tuple[JobSpec, ...] = key(
        ListOf(JOB, min_items=1, salvage=True),
        "Groups of images: each job is a prompt template over a matrix of values, one image "
        "per combination and replicate.", required=True, fatal=True, default=())
    # filled in by the builder:
    path: FsPath = derived(FsPath())
    sha256: str = derived("")
    output_root: FsPath = derived(FsPath())
    positions: Positions = derived(factory=lambda: Positions(""))
    problems: tuple[Problem, ...] = ()
    # the recipe's image inputs: the facts of its files, and the bytes of its data: URIs
    inputs: Inputs | None = derived(None)
    # the models its project adds to fluxbatch's (`fluxbatch.models.json`), if any
    catalogue: ProjectCatalogue | None = derived(None)

    def problem(self, path: Path, message: str) -> Problem:
        return self.positions.problem(path, message)

    def job(self, name: str) -> JobSpec:
        return next(spec for spec in self.jobs if spec.name == name)


RECIPE = Model(Recipe, salvage=True, description="A batch of Flux image requests: Jinja2 "
               "templates over variable matrices.", refused=REFUSED)


def recipe_schema() -> JSONObject:
    return schema_of(RECIPE, {"$schema": "https://json-schema.org/draft/2020-12/schema",
                              "$id": SCHEMA_ID, "title": "fluxbatch recipe"})


@dataclass(frozen=True, slots=True)
class Read:
    """A document read as a recipe: `recipe` is None when nothing is left to check."""

    recipe: Recipe | None
    cost: Cost  # what the recipe's own condemned values cost every job
    problems: list[Problem]


def read(document: object, positions: Positions, damaged: frozenset[Path] = frozenset()) -> Read:
    """`document` as a typed `Recipe`, with every problem in it. `damaged` are the paths whose
    values the YAML reader could not read (it reported them)."""
    reading = Reading(positions, damaged)
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        reading.fault((), f"a recipe must be a mapping, but this document is {kind}")
        return Read(None, reading.cost, reading.problems)
    recipe = reading.read(RECIPE, document, ())
    return Read(None if recipe is BAD else recipe, reading.cost, reading.problems)
