"""Stage 2: a `Recipe` becomes a `Plan`: frozen `Job`s, each with its request, seed and key.

Pure and deterministic: no I/O, no clock, no randomness. Every template problem and every
request the model's schema rejects is collected and reported together, located at the recipe
node it came from.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluxbatch import matrix as matrix_rules
from fluxbatch import models
from fluxbatch.errors import PlanTooLargeError, Problem, RecipeError
from fluxbatch.recipe import JobSpec, Recipe
from fluxbatch.templates import Template, TemplateProblem, compile_template, slug
from fluxbatch.yamlsource import Path

SEED_MODULUS = 2**31  # auto seeds lie in [0, 2**31 - 1]: valid for every Flux endpoint
RESERVED_NAMES = ("job", "replicate", "replicates", "combo", "prompt", "seed", "ext", "key",
                  "model")


@dataclass(frozen=True, slots=True)
class Job:
    """One image to make. `key` identifies its pixels: same key, same image."""

    index: int
    job: str
    vars: Mapping[str, Any]
    replicate: int
    model: str
    request: Mapping[str, Any]
    seed: int
    key: str
    output: str
    combination: matrix_rules.Combination

    @property
    def prompt(self) -> str | None:
        prompt = self.request.get("prompt")
        return prompt if isinstance(prompt, str) else None


@dataclass(frozen=True, slots=True)
class Plan:
    recipe: Recipe
    jobs: tuple[Job, ...]
    removed: tuple[tuple[str, matrix_rules.Removed], ...]

    def explain(self, job: Job) -> str:
        spec = next(s for s in self.recipe.jobs if s.name == job.job)
        return matrix_rules.explain(job.combination, spec.matrix.axes)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def job_key(model: str, request: Mapping[str, Any]) -> str:
    """sha256 of what determines the pixels: the model and the body minus webhooks."""
    pixels = {k: v for k, v in request.items() if k not in models.NON_PIXEL_FIELDS}
    return hashlib.sha256(canonical_json({"model": model, "request": pixels}).encode()).hexdigest()


def auto_seed(recipe_name: str, job_name: str, combination: Mapping[str, Any],
              replicate: int) -> int:
    """Derived from content, never from position: reordering values changes no seed."""
    text = canonical_json([recipe_name, job_name, combination, replicate])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def count_upper_bound(recipe: Recipe) -> int:
    return sum(matrix_rules.upper_bound(s.matrix) * s.replicates for s in recipe.jobs)


def expand(recipe: Recipe, *, yes: bool = False) -> Plan:
    """Build the plan; raise `RecipeError` with every problem, or `PlanTooLargeError`."""
    problems: list[Problem] = list(recipe.problems)
    per_job = []
    for spec in recipe.jobs:
        combos, removed = matrix_rules.combinations(spec.matrix)
        per_job.append((spec, combos, removed))
    total = sum(len(combos) * spec.replicates for spec, combos, _ in per_job)
    if total > recipe.max_jobs and not yes:
        raise PlanTooLargeError(
            f"{recipe.path}: the plan has {total:,} jobs, more than the limit of "
            f"{recipe.max_jobs:,}; pass --yes to go ahead, or raise max_jobs in the recipe"
        )
    jobs: list[Job] = []
    outputs: dict[str, Job] = {}
    folded: dict[str, Job] = {}
    removed_all: list[tuple[str, matrix_rules.Removed]] = []
    for spec, combos, removed in per_job:
        removed_all.extend((spec.name, r) for r in removed)
        builder = _JobBuilder(recipe, spec, problems)
        if not combos:
            problems.append(recipe.problem(("jobs", spec.index, "matrix"),
                                           "the matrix produces no combinations "
                                           "(every one is excluded)"))
        if not builder.ready:
            continue
        for combo in combos:
            for replicate in range(1, spec.replicates + 1):
                job = builder.build(len(jobs), combo, replicate)
                if job is None:
                    continue
                clash = outputs.get(job.output) or folded.get(job.output.casefold())
                if clash is not None:
                    problems.append(builder.output_clash(job, clash))
                    continue
                outputs[job.output] = job
                folded[job.output.casefold()] = job
                jobs.append(job)
    if problems:
        raise RecipeError(_dedupe(problems))
    return Plan(recipe, tuple(jobs), tuple(removed_all))


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """One problem per place and message: a template failing for 10,000 combinations is
    reported once, for the first combination, with the count of the others."""
    first: dict[tuple[Any, ...], Problem] = {}
    others: dict[tuple[Any, ...], int] = {}
    for problem in problems:
        key = (problem.file, problem.line, problem.column, problem.path,
               problem.message.split(" (for ")[0])
        if key in first:
            others[key] += problem != first[key]
        else:
            first[key], others[key] = problem, 0
    result = []
    for key, problem in first.items():
        if others[key]:
            more = others[key]
            problem = Problem(problem.file, problem.line, problem.column, problem.path,
                              f"{problem.message} and {more:,} more")
        result.append(problem)
    return result


def describe(values: Mapping[str, Any], replicate: int | None = None) -> str:
    parts = [f"{k}={v}" for k, v in values.items()]
    if replicate is not None:
        parts.append(f"replicate={replicate}")
    return ", ".join(parts) or "no matrix"


class _JobBuilder:
    """Renders one `jobs[i]` entry for each of its combinations."""

    def __init__(self, recipe: Recipe, spec: JobSpec, problems: list[Problem]) -> None:
        self.recipe = recipe
        self.spec = spec
        self.problems = problems
        self.path: Path = ("jobs", spec.index)
        self.ready = True
        self.templates: dict[Path, Template] = {}
        self.params: dict[str, tuple[Path, Any]] = {}
        for name, value in recipe.defaults.items():
            self.params[name] = (("defaults", name), value)
        for name, value in spec.params.items():
            self.params[name] = ((*self.path, "params", name), value)
        if "prompt" in self.params and spec.prompt is not None:
            self.fail(self.params["prompt"][0], "the prompt is set twice: use the job's "
                      "'prompt' key, not a 'prompt' parameter")
        if "seed" in self.params:
            self.fail(self.params["seed"][0], "set the seed with the job's 'seed' key")
        if "model" not in self.params:
            self.fail((*self.path, "params"), "no model: set 'model' in defaults or params")
        for where, value in [*self.params.values(), ((*self.path, "prompt"), spec.prompt),
                             ((*self.path, "output"), spec.output),
                             ((*self.path, "seed"), spec.seed)]:
            if isinstance(value, str):
                self.compile(where, value)
        self.check_matrix_names()
        if spec.matrix.complete:
            self.static_names()  # else a row table failed to load: its columns are unknown
        self.model = self.constant_model()
        if self.model is not None:
            self.check_constants(self.model)

    def constant_model(self) -> models.Model | None:
        where, raw = self.params.get("model", ((), None))
        if raw is None or (isinstance(raw, str) and not self.templates[where].is_constant):
            return None
        model = models.get(raw) if isinstance(raw, str) else None
        if model is None:
            self.fail(where, models.unknown_model_message(raw))
        return model

    def check_constants(self, model: models.Model) -> None:
        """Check every parameter that is not a template once, not once per image."""
        constants = {}
        for name, (where, raw) in self.params.items():
            if name != "model" and not (isinstance(raw, str) and
                                        not self.templates[where].is_constant):
                constants[name] = models.normalise_value(raw, model.types_of(name)) \
                    if name in model.properties else raw
        for field, message in model.check_fields(constants):
            self.fail(self.params[field or ""][0], message)

    def fail(self, where: Path, message: str) -> None:
        self.problems.append(self.recipe.problem(where, message))
        self.ready = False

    def compile(self, where: Path, source: str) -> None:
        try:
            self.templates[where] = compile_template(source)
        except TemplateProblem as problem:
            self.fail(where, str(problem))

    def check_matrix_names(self) -> None:
        for axis in self.spec.matrix.axes:
            for name in axis.names:
                if name in RESERVED_NAMES:
                    where = (*self.path, "matrix", name)
                    self.fail(where, f"{name!r} is a reserved template variable; rename it")

    def static_names(self) -> None:
        """A variable that no combination defines is a typo: say so before rendering."""
        known = set(self.recipe.vars) | set(RESERVED_NAMES) | set(self.spec.matrix.declared)
        for entry in self.spec.matrix.include:
            known.update(entry)
        for where, template in self.templates.items():
            for name in template.names:
                if name not in known and name not in _JINJA_GLOBALS:
                    self.fail(where, f"undefined variable {name!r}"
                              + models.did_you_mean(name, sorted(known)))

    def render(self, where: Path, context: Mapping[str, Any], values: Mapping[str, Any],
               replicate: int) -> str | None:
        try:
            return self.templates[where].render(context)
        except TemplateProblem as problem:
            self.problems.append(self.recipe.problem(
                where, f"{problem} (for {describe(values, replicate)})"))
            return None

    def value(self, where: Path, raw: Any, context: Mapping[str, Any],
              values: Mapping[str, Any], replicate: int) -> tuple[bool, Any]:
        if not isinstance(raw, str) or self.templates[where].is_constant:
            return True, raw
        text = self.render(where, context, values, replicate)
        return text is not None, text

    def build(self, index: int, combo: matrix_rules.Combination, replicate: int) -> Job | None:
        spec = self.spec
        values = combo.values
        context = {**self.recipe.vars, **values, "job": spec.name, "replicate": replicate,
                   "replicates": spec.replicates, "combo": _combo_slug(values)}
        model = self.model or self.templated_model(context, values, replicate)
        if model is None:
            return None
        context["model"] = model.name
        request: dict[str, Any] = {}
        sources: dict[str, Path] = {}
        if spec.prompt is not None:
            prompt = self.render((*self.path, "prompt"), context, values, replicate)
            if prompt is None:
                return None
            request["prompt"] = prompt
            sources["prompt"] = (*self.path, "prompt")
            context["prompt"] = prompt
        for name, (where, raw) in self.params.items():
            if name == "model":
                continue
            ok, value = self.value(where, raw, context, values, replicate)
            if not ok:
                return None
            if name in model.properties:
                types = model.types_of(name)
                if isinstance(raw, str) and isinstance(value, str) and raw is not value:
                    value = models.coerce_text(value, types)
                value = models.normalise_value(value, types)
            request[name] = value
            sources[name] = where
        if "output_format" in model.properties and request.get("output_format") is None:
            request["output_format"] = model.default_format
        seed = self.seed(context, values, replicate)
        if seed is None:
            return None
        request["seed"] = seed
        sources["seed"] = (*self.path, "seed")
        if not self.validate(model, request, sources, values, replicate):
            return None
        key = job_key(model.name, request)
        fmt = request.get("output_format") or model.default_format
        context.update(seed=seed, key=key, ext=models.EXTENSIONS.get(str(fmt), str(fmt)))
        output_path = (*self.path, "output")
        rendered = self.render(output_path, context, values, replicate)
        if rendered is None:
            return None
        output = self.check_output(rendered, values, replicate)
        if output is None:
            return None
        return Job(index, spec.name, values, replicate, model.name, request, seed, key, output,
                   combo)

    def templated_model(self, context: Mapping[str, Any], values: Mapping[str, Any],
                        replicate: int) -> models.Model | None:
        where = self.params["model"][0]
        name = self.render(where, context, values, replicate)
        if name is None:
            return None
        model = models.get(name.strip())
        if model is None:
            self.problems.append(self.recipe.problem(
                where, f"{models.unknown_model_message(name)} (for {describe(values, replicate)})"))
        return model

    def seed(self, context: Mapping[str, Any], values: Mapping[str, Any],
             replicate: int) -> int | None:
        raw = self.spec.seed
        if raw == "auto":
            return auto_seed(self.recipe.name, self.spec.name, values, replicate)
        if isinstance(raw, int):
            return raw
        where = (*self.path, "seed")
        text = self.render(where, context, values, replicate)
        if text is None:
            return None
        value = models.coerce_text(text, ("integer",))
        if isinstance(value, int) and value >= 0:
            return value
        self.problems.append(self.recipe.problem(
            where, f"the seed template gave {text!r}, not a non-negative integer "
            f"(for {describe(values, replicate)})"))
        return None

    def validate(self, model: models.Model, request: Mapping[str, Any],
                 sources: Mapping[str, Path], values: Mapping[str, Any], replicate: int) -> bool:
        if self.model is None:
            found = model.validate(request)  # a templated model: check everything per job
        else:
            dynamic = {k: request[k] for k in sources if k in request and self.is_dynamic(k)}
            found = model.missing(request) + model.check_fields(dynamic)
        for field, message in found:
            where = sources.get(field, (*self.path, "params")) if field else self.path
            suffix = f" (for {describe(values, replicate)})" if values and field != "seed" else ""
            self.problems.append(self.recipe.problem(where, message + suffix))
        return not found

    def is_dynamic(self, field: str) -> bool:
        if field in ("prompt", "seed", "output_format"):
            return True
        where, raw = self.params[field]
        return isinstance(raw, str) and not self.templates[where].is_constant

    def check_output(self, rendered: str, values: Mapping[str, Any], replicate: int) -> str | None:
        where = (*self.path, "output")
        problem = output_path_problem(rendered)
        if problem is None:
            return posixpath.normpath(rendered.replace("\\", "/"))
        self.problems.append(self.recipe.problem(
            where, f"{problem} (for {describe(values, replicate)})"))
        return None

    def output_clash(self, job: Job, other: Job) -> Problem:
        where = (*self.path, "output")
        return self.recipe.problem(
            where, f"two jobs write {job.output!r}: {other.job} "
            f"({describe(other.vars, other.replicate)}) and {job.job} "
            f"({describe(job.vars, job.replicate)}); put the varying values in the "
            "output template")


_JINJA_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "true",
                            "false", "none", "True", "False", "None", "loop"})
_DRIVE = re.compile(r"^[A-Za-z]:")


def output_path_problem(path: str) -> str | None:
    """Why `path` may not be used as an output path (lexically), or None."""
    text = path.replace("\\", "/")
    if not text.strip():
        return "the output path is empty"
    if "\x00" in text:
        return "the output path contains a NUL character"
    if text.startswith("/") or _DRIVE.match(text):
        return f"output path {path!r} is absolute; it must be relative to the output root"
    parts = text.split("/")
    if ".." in parts:
        return f"output path {path!r} leaves the output root ('..')"
    if text.endswith("/") or parts[-1] in ("", "."):
        return f"output path {path!r} names a directory, not a file"
    return None


def _combo_slug(values: Mapping[str, Any]) -> str:
    if not values:
        return "default"
    return "-".join(slug(v) for v in values.values())
