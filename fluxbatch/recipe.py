"""Stage 1: read a recipe into the typed `Recipe` its declaration (`recipe_schema.py`)
makes, then read the files it names and resolve its paths.

Every problem is collected (never only the first) and located (`recipe.yaml:14:9`). Values
from files (`{from: ...}`) are read here, so the stages after this one do no I/O.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path as FsPath

import yaml

from fluxbatch import models, project_models, yamlsource
from fluxbatch.declaration import Cost
from fluxbatch.errors import Problem, RecipeError
from fluxbatch.inputs import FactsCache, InputProblem, Inputs
from fluxbatch.layout import INPUT_FACTS, state_path
from fluxbatch.models import did_you_mean
from fluxbatch.project import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DATA,
    Project,
    ProjectFileError,
    read_regular,
    state_dir_problem,
)
from fluxbatch.project_models import ProjectCatalogue
from fluxbatch.providers import REGISTRY, recipe_base_url_problem
from fluxbatch.recipe_schema import (
    Axis,
    AxisSpec,
    Files,
    JobSpec,
    Matrix,
    ProviderSpec,
    Recipe,
    RowsFile,
    read,
)
from fluxbatch.yamlsource import Path, Positions

__all__ = ["Axis", "JobSpec", "Matrix", "ProviderSpec", "Recipe", "load", "parse"]

_FAILED = object()


def load(path: str | os.PathLike[str], *, output_root: str | None = None,
         strict: bool = True, verify: bool = False) -> Recipe:
    """Read and validate the recipe at `path`; raise `RecipeError` listing every problem.

    With `strict=False`, problems that leave something to check are carried in
    `Recipe.problems` (the jobs they touch marked `damaged`), so the next stage can report
    its own problems in the same run. With `verify`, every image input is hashed again,
    whatever the output root's cache of their facts holds.
    """
    filename = os.fspath(path)
    try:  # the operator named this file, so it may be anywhere; but no FIFO, no huge file
        raw = read_regular(filename, limit=MAX_RECIPE_BYTES, name="the recipe")
    except OSError as error:
        message = error.strerror or str(error)
        raise RecipeError([Problem(filename, None, None, "", message)]) from None
    except ProjectFileError as error:
        raise RecipeError([Problem(filename, None, None, "", str(error))]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        message = f"not UTF-8 text (byte {error.start})"
        raise RecipeError([Problem(filename, None, None, "", message)]) from None
    return parse(text, filename, sha256=hashlib.sha256(raw).hexdigest(), output_root=output_root,
                 strict=strict, verify=verify)


def parse(text: str, filename: str, *, sha256: str | None = None,
          output_root: str | None = None, strict: bool = True, verify: bool = False) -> Recipe:
    with collector_paused():
        return _parse(text, filename, sha256, output_root, strict, verify)


def _parse(text: str, filename: str, sha256: str | None, output_root: str | None,
           strict: bool, verify: bool) -> Recipe:
    problems: list[Problem] = []
    damaged: frozenset[Path] = frozenset()
    project = Project.of_recipe(filename)
    catalogue = _project_catalogue(project, filename)  # (its models are the recipe's to name)
    models.use_project_models(catalogue.models if catalogue is not None else {})
    try:
        document, positions = yamlsource.load(text, filename)
    except yamlsource.DocumentError as error:
        if error.partial is None:
            raise RecipeError(error.problems) from None
        document, positions, damage = error.partial  # e.g. a duplicate key: report the rest too
        problems = [d.problem for d in damage]
        damaged = frozenset(d.path for d in damage if not d.kept)
    declared = read(document, positions, damaged)
    problems += declared.problems
    if declared.recipe is None:
        raise RecipeError(problems)
    builder = _Builder(FsPath(filename), positions, project, verify=verify)
    recipe = builder.recipe(declared.recipe, declared.cost,
                            sha256 or hashlib.sha256(text.encode()).hexdigest(), output_root)
    recipe = dataclasses.replace(recipe, catalogue=catalogue)
    problems.extend(builder.problems)
    if problems and (strict or not recipe.jobs):
        raise RecipeError(problems)
    return dataclasses.replace(recipe, problems=tuple(problems))


def _project_catalogue(project: Project, filename: str) -> ProjectCatalogue | None:
    """The project's own models (`fluxbatch.models.json` at its top), read like any file a
    recipe reads; a catalogue that cannot be used is the recipe's problem too."""
    place = os.path.join(project.root, project_models.FILE)
    if not os.path.lexists(place):
        return None
    name = os.path.relpath(place, os.path.realpath(project.folder))
    try:
        data = project.read_bytes(name, limit=project_models.MAX_BYTES)
        return project_models.read(FsPath(place), data)
    except (ProjectFileError, project_models.CatalogueError) as error:
        shown = os.path.normpath(os.path.join(project.folder, name))
        message = str(error).removeprefix(f"{project_models.FILE}: ")
        raise RecipeError([Problem(shown, None, None, "", message)]) from None


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Reading and planning allocate hundreds of thousands of small objects and free none
    of them (or, streaming, free them by reference count): the cyclic collector would only
    walk them again and again (about 12% of planning's time, and half of reading's)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


# What building one job's combinations may cost: each check takes about half a microsecond,
# and a hand-written matrix makes a few thousand.
MAX_MATRIX_CHECKS = 20_000_000


class _Builder:
    def __init__(self, path: FsPath, positions: Positions, project: Project, *,
                 verify: bool = False) -> None:
        self.path = path
        self.verify = verify
        self.base = path.parent
        self.project = project
        self.positions = positions
        self.problems: list[Problem] = []
        self.inputs = Inputs(self.project)
        self.data_read = 0  # characters of value and row files, each counted every time named

    def problem(self, path: Path, message: str, *, key: bool = False) -> None:
        self.problems.append(self.positions.problem(path, message, key=key))

    def recipe(self, declared: Recipe, cost: Cost, sha256: str,
               output_root: str | None) -> Recipe:
        """`declared` with its files read and its paths resolved; `cost` is what its own
        condemned values cost every job."""
        root = self.output_root(output_root, declared.written_output_root)
        self.inputs.cache = FactsCache(state_path(root, INPUT_FACTS), trusted=not self.verify)
        jobs = tuple(self.job(spec, declared.output, cost) for spec in declared.jobs)
        names: dict[str, int] = {}
        for job in jobs:
            if not job.name:
                continue  # (its own problem says why it has none)
            if job.name in names:
                self.problem(("jobs", job.index, "name"),
                             f"duplicate job name {job.name!r} (also jobs[{names[job.name]}])")
            names.setdefault(job.name, job.index)
        self.check_provider(declared.provider)
        return dataclasses.replace(declared, path=self.path, sha256=sha256, output_root=root,
                                   jobs=jobs, positions=self.positions, inputs=self.inputs)

    def output_root(self, from_command_line: str | None, from_recipe: str | None) -> FsPath:
        """`--out` is relative to the working directory and may point anywhere (the operator
        chose it); `output_root:` is relative to the recipe and stays inside its project."""
        where: Path | None = None
        if from_command_line is not None:
            root, shown = FsPath(from_command_line), f"--out {from_command_line}"
        elif from_recipe is not None:
            where, shown = ("output_root",), from_recipe
            try:
                root = self.project.output_root(from_recipe)
            except ProjectFileError as error:
                self.problem(where, str(error))
                return self.base / from_recipe
        else:
            root, shown = self.base, f"the output root {self.base} (the recipe's folder)"
        problem = state_dir_problem(root, shown)
        if problem is not None and where is not None:
            self.problem(where, problem)
        elif problem is not None:  # not written in the recipe: no line to point at
            self.problems.append(Problem(self.positions.file, None, None, "", problem))
        return root

    def check_provider(self, spec: ProviderSpec) -> None:
        if spec.base_url and REGISTRY[spec.name].default_base_url is None:
            self.problem(("provider", "base_url"), f"provider {spec.name!r} takes no base_url")
        elif spec.base_url:  # a recipe may not decide where the key goes
            refused = recipe_base_url_problem(REGISTRY[spec.name], spec.base_url)
            if refused is not None:
                self.problem(("provider", "base_url"), refused)
        for model in spec.model_concurrency:
            if models.get(model) is None:  # a typo would silently leave the cap unset
                self.problem(("provider", "model_concurrency", model),
                             models.unknown_model_message(model), key=True)

    def job(self, spec: JobSpec, output: str, cost: Cost) -> JobSpec:
        """`spec` with its matrix loaded, and what the recipe's own condemned values cost
        it: the jobs that use a condemned default lose it too."""
        inherits_output = spec.output is None
        own_model = "model" in spec.params
        damaged = spec.damaged or Cost.IMAGES in cost \
            or (Cost.OUTPUT in cost and inherits_output)
        return dataclasses.replace(
            spec,
            matrix=self.matrix(spec.matrix, ("jobs", spec.index, "matrix")),
            output=output if inherits_output else spec.output,
            damaged=damaged,
            model_known=spec.model_known and not (Cost.MODEL in cost and not own_model),
            names_known=spec.names_known and Cost.NAMES not in cost,
        )

    def matrix(self, spec: Matrix, path: Path) -> Matrix:
        axes: list[Axis] = []
        declared: list[str] = []
        for key in spec.written:
            if key == "zip" and spec.zip is not None:
                groups = spec.zip if isinstance(spec.zip, tuple) else (spec.zip,)
                for g, group in enumerate(groups):
                    declared.extend(group)
                    where = (*path, "zip", g) if isinstance(spec.zip, tuple) else (*path, "zip")
                    axes.extend(self.zip_group(group, where))
            elif key == "rows" and spec.rows is not None:
                axes.extend(self.rows(spec.rows, (*path, "rows")))
                declared.extend(name for axis in axes[-1:] if axis.kind == "rows"
                                for name in axis.names)
            elif key in spec.variables:
                value = spec.variables[key]
                declared.append(key)
                values = self.values(value, (*path, key))
                if values:
                    origin = f"{key} (files {value.pattern})" if isinstance(value, Files) else key
                    axes.append(Axis("values", (key,), tuple((v,) for v in values), origin))
        self.check_exclude(spec.exclude, axes, path)
        complete = spec.rows is None or any(axis.kind == "rows" for axis in axes)
        too_costly = not self.within_check_limit(axes, spec.exclude, spec.include, path)
        return dataclasses.replace(spec, axes=tuple(axes), declared=tuple(declared),
                                   complete=complete, too_costly=too_costly)

    def within_check_limit(self, axes: list[Axis], exclude: tuple[object, ...],
                           include: tuple[object, ...], path: Path) -> bool:
        """Each combination of the product is compared with every `exclude` and `include`
        entry: 10,000 combinations and 40,000 entries (a 470 kB recipe) took minutes."""
        product = math.prod(len(axis.rows) for axis in axes) if axes else 0
        checks = product * (len(exclude) + len(include))
        if checks <= MAX_MATRIX_CHECKS:
            return True
        where = "exclude" if len(exclude) >= len(include) else "include"
        self.problem((*path, where), f"{product:,} combinations compared with "
                     f"{len(exclude) + len(include):,} exclude and include entries make "
                     f"{checks:,} checks, more than the limit of {MAX_MATRIX_CHECKS:,}; use "
                     "fewer entries (a list of values leaves out what it does not name), or "
                     "split the job")
        return False

    def check_exclude(self, exclude: Iterable[Mapping[str, object]], axes: list[Axis],
                      path: Path) -> None:
        known = [name for axis in axes for name in axis.names]
        for i, entry in enumerate(exclude):
            for key in entry:
                if key not in known:
                    self.problem((*path, "exclude", i, key),
                                 f"exclude names {key!r}, which is not a matrix variable"
                                 + did_you_mean(key, known), key=True)

    def zip_group(self, group: Mapping[str, AxisSpec], path: Path) -> list[Axis]:
        columns = {name: self.values(v, (*path, name)) for name, v in group.items()}
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{name} has {n}" for name, n in lengths.items())
            self.problem(path, f"zip lists must have the same length: {detail}")
            return []
        names = tuple(columns)
        rows = tuple(zip(*columns.values(), strict=True))
        return [Axis("zip", names, rows, f"zip({', '.join(names)})")] if rows else []

    def rows(self, spec: tuple[Mapping[str, object], ...] | RowsFile, path: Path) -> list[Axis]:
        table: Sequence[Mapping[str, object]]
        if isinstance(spec, RowsFile):
            table = self.read_table(spec.source, (*path, "from"))
            origin = f"rows from {spec.source}"
            if table and spec.files:
                table = self.file_columns(table, spec.files, spec.source, path)
        else:
            table = spec
            origin = "rows"
        if not table:
            return []
        names: list[str] = []
        for row in table:
            names.extend(k for k in row if k not in names)
        missing = [(i, [n for n in names if n not in row]) for i, row in enumerate(table)]
        for i, absent in missing:
            if absent:
                self.problem((*path, i) if isinstance(spec, tuple) else (*path, "from"),
                             f"row {i + 1} has no value for {', '.join(map(repr, absent))}")
        return [Axis("rows", tuple(names), tuple(tuple(r.get(n) for n in names) for r in table),
                     origin)]

    def file_columns(self, table: list[dict[str, object]], columns: Sequence[str], source: str,
                     path: Path) -> list[dict[str, object]]:
        """The table with each value of `columns` an `InputFile` (checked, hashed), or []."""
        for column in columns:
            if column not in table[0]:
                self.problem((*path, "files"), f"{source} has no column {column!r}"
                             + did_you_mean(column, list(table[0])))
                return []
        failed = False
        for i, row in enumerate(table):
            for column in columns:
                try:
                    row[column] = self.inputs.file(str(row[column]))
                except InputProblem as problem:
                    line = f"{source}:{i + 2}" if source.lower().endswith(".csv") \
                        else f"{source} row {i + 1}"
                    self.problem((*path, "from"), f"{line}: {column}: {problem}")
                    failed = True
        return [] if failed else table

    def values(self, spec: AxisSpec, path: Path) -> list[object]:
        if isinstance(spec, tuple):
            return list(spec)
        if isinstance(spec, Files):
            try:
                return list(self.inputs.files(spec.pattern))
            except InputProblem as problem:
                self.problem((*path, "files"), str(problem))
                return []
        source = spec.source
        suffix = FsPath(source).suffix.lower()
        where = (*path, "from")
        if spec.column is not None:
            if suffix != ".csv":
                self.problem((*path, "column"), "'column' applies only to .csv files")
                return []
            table = self.read_table(source, where)
            column = spec.column
            if table and column not in table[0]:
                self.problem((*path, "column"), f"{source} has no column {column!r}"
                             + did_you_mean(column, list(table[0])))
                return []
            return [row[column] for row in table]
        text = self.read(source, where)
        if text is None:
            return []
        if suffix == ".txt":
            lines = (line.strip() for line in text.splitlines())
            found: list[object] = [line for line in lines if line and not line.startswith("#")]
            if not found:
                self.problem(where, f"{source} holds no values (only blank lines and comments)")
            return found
        if suffix in (".yaml", ".yml", ".json"):
            data = self.parse_data(text, source, where)
            if data is _FAILED:
                return []
            if not isinstance(data, list) or not data:
                self.problem(where, f"{source} must hold a non-empty list of values")
                return []
            return data
        if suffix == ".csv":
            self.problem(where, f"{source} is a CSV file: say which column with 'column:'")
            return []
        self.problem(where, f"{source}: unsupported file type {suffix or '(none)'!r} "
                     "(use .txt, .yaml, .yml, .json or .csv)")
        return []

    def read_table(self, source: str, where: Path) -> list[dict[str, object]]:
        text = self.read(source, where)
        if text is None:
            return []
        suffix = FsPath(source).suffix.lower()
        if suffix == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            rows = [dict(row) for row in reader]
            if not reader.fieldnames:
                self.problem(where, f"{source} has no header row")
                return []
            for i, row in enumerate(rows):
                if None in row or None in row.values():
                    self.problem(where, f"{source}:{i + 2}: row does not have "
                                 f"{len(reader.fieldnames)} columns")
                    return []
            if not rows:
                self.problem(where, f"{source} has a header but no rows")
            return rows
        if suffix in (".yaml", ".yml", ".json"):
            data = self.parse_data(text, source, where)
            if data is _FAILED:
                return []
            if not isinstance(data, list) or not all(isinstance(r, dict) and r for r in data):
                self.problem(where, f"{source} must hold a list of mappings (one per row)")
                return []
            return data
        self.problem(where, f"{source}: rows come from .csv, .yaml, .yml or .json files")
        return []

    def read(self, source: str, where: Path) -> str | None:
        """A value or row file's text. Each file may hold 16 MiB, and all that one recipe
        names together MAX_RECIPE_DATA: a file named by a thousand jobs is parsed a thousand
        times, and its values held as often (a 4 kB recipe could ask for tens of GB)."""
        if self.data_read > MAX_RECIPE_DATA:
            return None  # (said once, where the limit was passed)
        try:
            text = self.project.read_text(source)
        except ProjectFileError as error:
            self.problem(where, str(error))
            return None
        self.data_read += len(text)
        if self.data_read > MAX_RECIPE_DATA:
            self.problem(where, f"the value and row files this recipe names come to more than "
                         f"{MAX_RECIPE_DATA / 1024 / 1024:g} MiB together (a file named "
                         f"several times counts each time); {source} and the files named after "
                         "it are not read")
            return None
        return text

    def parse_data(self, text: str, source: str, where: Path) -> object:
        try:
            if source.lower().endswith(".json"):
                data = json.loads(text)
            else:  # the recipe's own reader: same YAML rules, same limits on aliases and depth
                data = yamlsource.load(text, source)[0]
        except yamlsource.DocumentError as error:
            for problem in error.problems:
                self.problem(where, str(problem))
            return _FAILED
        except json.JSONDecodeError as error:
            self.problem(where, f"{source}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}")
            return _FAILED
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            self.problem(where, f"{source}{at}: YAML syntax error: {error.problem}")
            return _FAILED
        except Exception as error:  # a YAML tag's constructor fails in its own ways
            self.problem(where, f"{source}: YAML error: {error}")
            return _FAILED
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
            self.problem(where, f"{source} holds values that are not JSON (bytes, dates, sets "
                         "or unpaired surrogates)")
            return _FAILED
        return data

