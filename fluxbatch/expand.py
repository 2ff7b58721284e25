"""Stage 2: a `Recipe` becomes a `Plan`: frozen `Job`s, each with its request, seed and key.

Deterministic: no clock, no randomness, and no I/O but one: the image inputs a request names
are looked at (through `inputs.Inputs`, which hashes each file once and remembers it), since
a job's key holds their content. Every template problem and every request the model's schema
rejects is collected and reported together, located at the recipe node it came from.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping

from fluxbatch import matrix as matrix_rules
from fluxbatch import models
from fluxbatch.errors import Problem, RecipeError
from fluxbatch.identity import AutoSeeds, KeyHasher, canonical_json
from fluxbatch.imagemeta import EXTENSIONS
from fluxbatch.inputs import InputProblem, Inputs
from fluxbatch.jobs import Job, Plan, guard_size
from fluxbatch.layout import PATH_MAX, output_path_problem, plainly_safe
from fluxbatch.project import Project
from fluxbatch.recipe import JobSpec, Recipe, collector_paused
from fluxbatch.templates import Allowance, Compiler, Template, TemplateProblem, slug
from fluxbatch.yamlsource import Path

RESERVED_NAMES = ("job", "replicate", "replicates", "combo", "prompt", "seed", "ext", "key")
# `model` may be a matrix variable (compare models: `params: {model: "{{ model }}"}`); when it
# is not, templates read the resolved model under that name.


def expand(recipe: Recipe, *, yes: bool = False) -> Plan:
    """Build the plan; raise `RecipeError` with every problem, or `PlanTooLargeError`."""
    # (the models the recipe's project adds are the ones it may name: see recipe.load)
    models.use_project_models(recipe.catalogue.models if recipe.catalogue is not None else {})
    with collector_paused():
        expansion = Expansion(recipe, yes=yes)
        jobs = tuple(expansion)
    expansion.check()
    return Plan(recipe, jobs, tuple(expansion.removed), tuple(expansion.notes.found()))


class Expansion:
    """A recipe's jobs, made one at a time, and every problem found making them.

    Iterate to get the jobs, in plan order, then call `check()`, which raises `RecipeError`
    if there was any problem. What stays in memory is the combinations of one job at a time
    and, per image, its output path (for clashes): the jobs themselves are the caller's to
    keep or drop, so `plan --jsonl` can print a million of them in constant memory. Every
    job's own checks (templates, variable names, constant parameters) run before the first
    job is made; only per-image problems can come after it.
    """

    def __init__(self, recipe: Recipe, *, yes: bool = False) -> None:
        if not yes:
            guard_size(recipe)
        self.recipe = recipe
        self.problems = Findings(recipe.problems)
        self.notes = Findings()
        self.removed: list[tuple[str, matrix_rules.Removed]] = []
        shared = _Shared(recipe, self.problems, self.notes)
        self.builders = [_JobBuilder(spec, shared) for spec in recipe.jobs]

    def __iter__(self) -> Iterator[Job]:
        # output → (job, values, replicate) of the image that claimed it; case-folded paths
        # only where folding changes them (rarely), so the usual path is held once
        outputs: dict[str, tuple[str, Mapping[str, object], int]] = {}
        folded: dict[str, tuple[str, Mapping[str, object], int]] = {}
        index = 0
        builders, self.builders = self.builders, []  # (each is dropped once its images are made)
        builders.reverse()
        while builders:
            builder = builders.pop()
            spec = builder.spec
            if not spec.matrix.loaded:
                continue  # its problem is reported; rendering would only add follow-on errors
            combos, removed = matrix_rules.combinations(spec.matrix)
            self.removed.extend((spec.name, r) for r in removed)
            self.check_entries(spec)
            if not combos:
                self.problems.append(self.recipe.problem(("jobs", spec.index, "matrix"),
                                                         "the matrix produces no combinations "
                                                         "(every one is excluded)"))
            if not (builder.ready or builder.checking):
                continue
            for combo in combos:
                for replicate in range(1, spec.replicates + 1):
                    job = builder.build(index, combo, replicate)
                    if job is None:
                        continue
                    output = job.output
                    clash = outputs.get(output)
                    if clash is None:
                        fold = output.casefold()
                        if fold != output:
                            clash = folded.get(fold) or outputs.get(fold)
                            folded.setdefault(fold, (job.job, job.vars, replicate))
                        else:
                            clash = folded.get(fold)
                    if clash is not None:
                        self.problems.append(builder.output_clash(job, *clash))
                        continue
                    outputs[output] = (job.job, job.vars, replicate)
                    index += 1
                    yield job

    def check_entries(self, spec: JobSpec) -> None:
        """An exclude entry that excludes nothing is a problem (see `matrix.dead_excludes`)."""
        for index, why in matrix_rules.dead_excludes(spec.matrix):
            self.problems.append(self.recipe.problem(
                ("jobs", spec.index, "matrix", "exclude", index),
                f"matches no combination, so it excludes nothing: {why}"))

    def check(self) -> None:
        if self.problems:
            raise RecipeError(self.problems.found())


class Findings:
    """Problems (or notes) as they are found, each place and message kept once, with a count
    of the others: a template failing for 10,000 combinations is reported once, for the
    first combination, and a stream of a million images holds one note, not a million."""

    def __init__(self, problems: Iterable[Problem] = ()) -> None:
        self.first: dict[tuple[object, ...], Problem] = {}
        self.others: dict[tuple[object, ...], int] = {}
        for problem in problems:
            self.append(problem)

    def append(self, problem: Problem) -> None:
        key = (problem.file, problem.line, problem.column, problem.path, _gist(problem.message))
        first = self.first.get(key)
        if first is None:
            self.first[key], self.others[key] = problem, 0
        else:
            self.others[key] += problem != first

    def __bool__(self) -> bool:
        return bool(self.first)

    def found(self) -> list[Problem]:
        result = []
        for key, problem in self.first.items():
            if self.others[key]:
                more = self.others[key]
                problem = Problem(problem.file, problem.line, problem.column, problem.path,
                                  f"{problem.message} and {more:,} more")
            result.append(problem)
        return result


_CLASH = "two images would be written to "


def _gist(message: str) -> str:
    """What a problem says, without the image it is about: a constant output template clashes
    for every image, and one line says so."""
    return _CLASH if message.startswith(_CLASH) else message.split(" (for ")[0]


def describe(values: Mapping[str, object], replicate: int | None = None) -> str:
    parts = [f"{k}={_short(matrix_rules.label(v), 40)}" for k, v in values.items()]
    if replicate is not None:
        parts.append(f"replicate={replicate}")
    return ", ".join(parts) or "no matrix"


class _Shared:
    """What the job builders of one plan share: where problems and notes go, the work its
    templates may do together, and what is the same for many jobs (compiled templates, the
    model's verdict on a set of constant parameters, key hashers). A recipe of 34,000 small
    jobs spent most of its planning redoing these per job."""

    __slots__ = ("allowance", "compiler", "hashers", "known", "notes", "problems", "recipe",
                 "root_bytes", "verdicts")

    def __init__(self, recipe: Recipe, problems: Findings, notes: Findings) -> None:
        self.recipe = recipe
        self.problems = problems
        self.notes = notes
        self.allowance = Allowance()  # (the work every template of the plan may do, together)
        self.compiler = Compiler()  # (each distinct template source compiled once)
        self.verdicts: dict[tuple[str, str], list[tuple[str | None, str]]] = {}
        self.hashers: dict[tuple[str, str], KeyHasher] = {}
        self.known = frozenset(recipe.vars) | frozenset(RESERVED_NAMES)
        self.root_bytes = len(os.fsencode(os.path.abspath(recipe.output_root))) + 1

    def check_fields(self, model: models.Model,
                     constants: Mapping[str, object]) -> list[tuple[str | None, str]]:
        """`model.check_fields(constants)`, worked out once per model and set of values."""
        memo = (model.name, canonical_json(constants))
        found = self.verdicts.get(memo)
        if found is None:
            found = self.verdicts[memo] = model.check_fields(constants)
        return found

    def key_hasher(self, model: str, constants: Mapping[str, object]) -> KeyHasher:
        memo = (model, canonical_json(constants))
        hasher = self.hashers.get(memo)
        if hasher is None:
            hasher = self.hashers[memo] = KeyHasher(model, constants)
        return hasher


class _JobBuilder:
    """Renders one `jobs[i]` entry for each of its combinations.

    Everything that does not vary between images (compiled templates, constant parameters
    and their validation, the model when it is not a template) is prepared once here;
    `build` does only the per-image work. This is the hot loop of planning.

    A job with a broken template (a syntax error, an undefined variable) makes no images,
    but is still `checking`: each combination is built with the broken parts left out (a
    stand-in where the request or the output path needs one), so that the problems of its
    other parts (a parameter out of range for some values, an output path that leaves the
    root) are reported in the same run. Other problems of its own stop it.
    """

    __slots__ = ("allowance", "auto_seeds", "base_context", "broken", "checking", "combo_slug",
                 "constant_images", "constant_params", "constants_by_model", "dynamic",
                 "dynamic_templates", "fatal", "format_varies", "hashers", "image_templates",
                 "images", "inputs", "model", "notes", "output", "output_path", "param_values",
                 "params", "path", "problems", "prompt", "prompt_path", "ready", "recipe",
                 "required_checked", "root_bytes", "seed_path", "seed_template", "shared", "spec",
                 "stand_ins", "templates")

    def __init__(self, spec: JobSpec, shared: _Shared) -> None:
        recipe = shared.recipe
        self.recipe = recipe
        self.spec = spec
        self.shared = shared
        self.problems = shared.problems
        self.notes = shared.notes
        self.allowance = shared.allowance
        self.path: Path = ("jobs", spec.index)
        self.ready = True
        self.broken: set[Path] = set()  # templates that cannot be rendered
        self.fatal = False  # a problem that leaves nothing to check per combination
        self.templates: dict[Path, Template] = {}
        self.params: dict[str, tuple[Path, object]] = {}
        for name, value in recipe.defaults.items():
            self.params[name] = (("defaults", name), value)
        for name, value in spec.params.items():
            self.params[name] = ((*self.path, "params", name), value)
        if not spec.model_known:
            self.params.pop("model", None)  # (not the default's: the job may have named another)
        self.prompt_path: Path = (*self.path, "prompt")
        self.output_path: Path = (*self.path, "output")
        self.seed_path: Path = (*self.path, "seed")
        self.check_reserved_params()
        for where, value in [*self.params.values(), (self.prompt_path, spec.prompt),
                             (self.output_path, spec.output), (self.seed_path, spec.seed)]:
            if isinstance(value, str):
                self.compile(where, value)
        self.check_matrix_names()
        if spec.matrix.complete and spec.names_known:
            self.static_names()  # else a row table failed to load: its columns are unknown
        self.inputs = recipe.inputs or Inputs(Project.of_recipe(recipe.path))
        self.images = {name: (where, raw) for name, (where, raw) in self.params.items()
                       if models.is_image_field(name) and raw is not None}
        self.dynamic = [(name, where) for name, (where, raw) in self.params.items()
                        if name != "model" and name not in self.images
                        and self.is_template(where, raw)]
        self.constant_params = {name: raw for name, (where, raw) in self.params.items()
                                if name != "model" and name not in self.images
                                and not self.is_template(where, raw)}
        self.constant_images = self.resolve_constant_images()
        self.image_templates = [(name, where, self.templates[where])
                                for name, (where, raw) in self.images.items()
                                if name not in self.constant_images and where in self.templates]
        self.constants_by_model: dict[str, dict[str, object]] = {}
        model_where, model_raw = self.params.get("model", ((), None))
        self.model = None
        if model_raw is not None and not self.is_template(model_where, model_raw):
            self.model = self.resolve_model(model_raw, model_where, "")
            if self.model is None:
                self.ready, self.fatal = False, True
            else:
                self.constants_for(self.model)  # (reports what it refuses)
        if spec.damaged or model_where in self.broken:
            # checked above; its images would only repeat its problem
            self.ready, self.fatal = False, True
        self.checking = not self.ready and not self.fatal
        self.base_context = {**recipe.vars, "job": spec.name, "replicates": spec.replicates}
        uses_combo = any("combo" in t.names for t in self.templates.values())
        self.combo_slug = _combo_slug if uses_combo else None
        self.prompt = self.templates.get(self.prompt_path)
        self.output = self.templates.get(self.output_path)  # None only when not ready
        self.seed_template = self.templates.get(self.seed_path)
        self.auto_seeds = AutoSeeds(recipe.name, spec.name) if spec.seed == "auto" else None
        self.dynamic_templates = [(name, where, self.templates[where])
                                  for name, where in self.dynamic if where in self.templates]
        self.format_varies = any(name == "output_format" for name, _ in self.dynamic)
        self.stand_ins: dict[str, None] = {}
        if self.checking:
            self.leave_out_broken()
        self.required_checked: set[str] = set()  # the request's keys are the same per model
        self.param_values: dict[tuple[str, str, str], tuple[object, str | None]] = {}
        self.hashers: dict[str, KeyHasher] = {}
        self.root_bytes = shared.root_bytes

    def check_reserved_params(self) -> None:
        if "prompt" in self.params and self.spec.prompt is not None:
            self.fail(self.params["prompt"][0], "the prompt is set twice: use the job's "
                      "'prompt' key, not a 'prompt' parameter")
        if "seed" in self.params:
            self.fail(self.params["seed"][0], "set the seed with the job's 'seed' key")
        if "model" not in self.params and self.spec.model_known:
            self.fail((*self.path, "params"), "no model: set 'model' in defaults or params")

    def is_template(self, where: Path, raw: object) -> bool:
        """Whether `raw` varies per image (a template that failed to compile counts too)."""
        if not isinstance(raw, str):
            return False
        template = self.templates.get(where)
        return template is None or not template.is_constant

    def fail(self, where: Path, message: str, *, broken: bool = False) -> None:
        """A problem of the job's own: it makes no images. Only a `broken` template leaves
        its combinations to check."""
        self.problems.append(self.recipe.problem(where, message))
        self.ready = False
        if broken:
            self.broken.add(where)
        else:
            self.fatal = True

    def leave_out_broken(self) -> None:
        """For a job that is only checked: what reads a broken template's result is left
        out too (a parameter that reads the prompt), and the request gets a stand-in for each
        field left out, so that its required fields are not missing. A broken seed template
        gives way to auto seeds."""
        if self.prompt_path in self.broken:
            self.broken.update(where for where, template in self.templates.items()
                               if "prompt" in template.names)
        names = {where: name for name, (where, _) in self.params.items()}
        self.stand_ins = {names[where]: None for where in self.broken if where in names}
        if self.prompt_path in self.broken:
            self.stand_ins["prompt"] = None
            self.prompt = None
        if self.output_path in self.broken:
            self.output = None
        if self.seed_path in self.broken:
            self.auto_seeds = AutoSeeds(self.recipe.name, self.spec.name)
        self.dynamic_templates = [entry for entry in self.dynamic_templates
                                  if entry[1] not in self.broken]
        self.image_templates = [entry for entry in self.image_templates
                                if entry[1] not in self.broken]

    def compile(self, where: Path, source: str) -> None:
        try:
            self.templates[where] = self.shared.compiler(source)
        except TemplateProblem as problem:
            self.fail(where, str(problem), broken=True)

    def check_matrix_names(self) -> None:
        for axis in self.spec.matrix.axes:
            for name in axis.names:
                if name in RESERVED_NAMES:
                    where = (*self.path, "matrix", name)
                    self.fail(where, f"{name!r} is a reserved template variable; rename it")

    def static_names(self) -> None:
        """A variable that no combination defines is a typo: say so before rendering."""
        known = self.shared.known.union(self.spec.matrix.declared, *self.spec.matrix.include)
        for where, template in self.templates.items():
            for name in template.names:
                if name not in known and name not in _JINJA_GLOBALS:
                    self.fail(where, f"undefined variable {name!r}"
                              + models.did_you_mean(name, sorted(known)), broken=True)

    def resolve_constant_images(self) -> dict[str, dict[str, object] | None]:
        """The image inputs that are the same for every image, resolved once (None: the
        field is left out, as an empty value asks)."""
        found: dict[str, dict[str, object] | None] = {}
        for name, (where, raw) in self.images.items():
            if self.is_template(where, raw):
                continue
            if isinstance(raw, str) and where in self.templates:
                raw = self.templates[where].render({})  # a constant template: its text
            if isinstance(raw, str) and not raw.strip():
                found[name] = None
                continue
            try:
                found[name] = self.inputs.resolve(raw, name)
            except InputProblem as problem:
                self.fail(where, str(problem))
        return found

    def resolve_model(self, name: object, where: Path, suffix: str) -> models.Model | None:
        model = models.get(name.strip()) if isinstance(name, str) else None
        if model is None:
            self.problems.append(self.recipe.problem(
                where, models.unknown_model_message(name) + suffix))
        elif models.project_model(model.name) is not None and self.recipe.catalogue:
            self.notes.append(self.recipe.problem(where, (
                f"{model.name} is not one this release of fluxbatch knows: it comes from the "
                f"project's {self.recipe.catalogue.path.name}, whose schema checks its "
                "parameters; its price is unknown (plan shows no cost, and --budget refuses "
                "it)")))
        return model

    def constants_for(self, model: models.Model) -> dict[str, object]:
        """The constant parameters, normalised and checked once per model. Those the model
        refuses are reported and left out, a stand-in in their place: the job then makes no
        images, but its combinations are still checked (their templated parameters too)."""
        constants = self.constants_by_model.get(model.name)
        if constants is not None:
            return constants
        constants = {name: models.normalise_value(raw, model.types_of(name))
                     for name, raw in self.constant_params.items()}
        found = [*self.shared.check_fields(model, constants)]
        found.extend((name, model.unknown_field_message(name)) for name in self.images
                     if name not in model.properties)
        for field, message in found:
            self.problems.append(self.recipe.problem(self.params[field or ""][0], message))
            constants[field or ""] = None
        if found:
            self.ready = False
            self.checking = not self.fatal
        if "output_format" in model.properties and constants.get("output_format") is None:
            constants["output_format"] = model.default_format
        constants.update((name, value) for name, value in self.constant_images.items()
                         if value is not None)
        self.constants_by_model[model.name] = constants
        return constants

    def build(self, index: int, combo: matrix_rules.Combination, replicate: int) -> Job | None:
        values = combo.values
        context = {**self.base_context, **values, "replicate": replicate}
        if self.combo_slug is not None:
            context["combo"] = self.combo_slug(values)
        where: Path = self.path
        try:
            model = self.model
            if model is None:
                where = self.params["model"][0]
                chosen = self.templates[where].render(context, self.allowance)
                model = self.resolve_model(chosen, where, f" (for {describe(values, replicate)})")
                if model is None:
                    return None
            constants = self.constants_for(model)
            context.setdefault("model", model.name)
            refused = False  # (a part refused: the image is not made, its other parts checked)
            request = dict(constants)
            if self.stand_ins:
                request.update(self.stand_ins)
            if self.prompt is not None:
                where = self.prompt_path
                request["prompt"] = context["prompt"] = self.prompt.render(context, self.allowance)
            for name, where, template in self.dynamic_templates:
                text = template.render(context, self.allowance)
                value, message = self.param_value(model, name, text)
                if message is not None:
                    self.problems.append(self.recipe.problem(
                        where, f"{message} (for {describe(values, replicate)})"))
                    refused, value = True, None
                request[name] = value
            for name, where, template in self.image_templates:
                text = template.render(context, self.allowance)
                if text.strip():  # (an empty value: no image for this combination)
                    request[name] = self.image(name, text, where, values, replicate)
                    refused |= request[name] is None
            if "mask" in request and not self.same_size(request, values, replicate):
                refused = True
            if self.format_varies and request.get("output_format", "") is None:
                request["output_format"] = model.default_format
            where = self.seed_path
            if self.auto_seeds is not None:
                seed = self.auto_seeds(values, replicate)
            else:
                templated = self.seed(combo, context, replicate)
                if templated is None:
                    return None
                seed = templated
            request["seed"] = seed
            if model.name not in self.required_checked and not self.check_required(model, request):
                refused = True
            hasher = self.hashers.get(model.name)
            if hasher is None:
                hasher = self.hashers[model.name] = self.key_hasher(model.name, constants)
            key = hasher(request)
            fmt = str(request.get("output_format") or model.default_format)
            context["seed"], context["key"] = seed, key
            context["ext"] = ext = EXTENSIONS.get(fmt, fmt)
            where = self.output_path
            if self.output is None:
                return None  # (a job only checked, whose output template is broken)
            output = self.output.render(context, self.allowance)
        except TemplateProblem as problem:
            self.problems.append(self.recipe.problem(
                where, f"{problem} (for {describe(values, replicate)}"
                f"{self.added_by(combo, str(problem))})"))
            return None
        if not plainly_safe(output):
            checked_output = self.check_output(output, values, replicate)
            if checked_output is None:
                return None
            output = checked_output
        if not output.endswith(ext) and output.rpartition(".")[2].lower() in _IMAGE_SUFFIXES:
            suffix = output.rpartition(".")[2]
            if suffix.lower() not in ("jpg", "jpeg") or ext != "jpg":
                self.notes.append(self.recipe.problem(
                    self.output_path, f"the output path ends in .{suffix}, but the image will "
                    f"be {fmt} (output_format), so it is written as .{ext}; end "
                    "the output template with `.{{ ext }}`, or set output_format to match "
                    f"(for {describe(values, replicate)})"))
        if self.prompt is not None and not str(request.get("prompt", "x")).strip() and \
                not any(value for name, value in request.items() if "image" in name):
            self.problems.append(self.recipe.problem(
                self.prompt_path, "the prompt is empty, and no image is given: the model "
                f"would draw anything at all (for {describe(values, replicate)})"))
            return None
        if len(output) * 4 + self.root_bytes > PATH_MAX and \
                len(output.encode("utf-8", "surrogatepass")) + self.root_bytes > PATH_MAX:
            self.problems.append(self.recipe.problem(
                self.output_path, f"output path {_short(output)!r} makes a path of more than "
                f"{PATH_MAX} bytes under the output root, over the file system's limit "
                f"(for {describe(values, replicate)})"))
            return None
        if refused or self.checking:
            return None
        return Job(index, self.spec.name, values, replicate, model.name, request, seed, key,
                   output, combo)

    def image(self, name: str, text: str, where: Path, values: Mapping[str, object],
              replicate: int) -> dict[str, object] | None:
        """The input `text` names, or None (its problem reported)."""
        try:
            return self.inputs.resolve(text, name)
        except InputProblem as problem:
            self.problems.append(self.recipe.problem(
                where, f"{problem} (for {describe(values, replicate)})"))
            return None

    def same_size(self, request: Mapping[str, object], values: Mapping[str, object],
                  replicate: int) -> bool:
        """Fill's mask must match its image, as the API checks: said here, before paying."""
        image, mask = request.get("image"), request.get("mask")
        if not (isinstance(image, Mapping) and isinstance(mask, Mapping)) or \
                "width" not in image or "width" not in mask:
            return True  # (a URL's size is unknown here: the API checks it)
        if (image["width"], image["height"]) == (mask["width"], mask["height"]):
            return True
        self.problems.append(self.recipe.problem(
            self.images["mask"][0], f"the mask is {mask['width']}×{mask['height']} but the "
            f"image is {image['width']}×{image['height']}; the API needs them the same size "
            f"(for {describe(values, replicate)})"))
        return False

    def added_by(self, combo: matrix_rules.Combination, problem: str) -> str:
        """For a template that reads a matrix variable a combination of an include entry's
        own lacks: which entry made it (a renamed value turns an entry meant to add to some
        combinations into one of its own)."""
        missing = re.match(r"undefined variable '([^']+)'", problem)
        if combo.rule != "include-new" or missing is None or \
                missing.group(1) not in self.spec.matrix.declared:
            return ""
        return (f"; include[{combo.include}] fits no combination, so it makes one of its own, "
                f"without {missing.group(1)}")

    def key_hasher(self, model: str, constants: Mapping[str, object]) -> KeyHasher:
        # A templated parameter may shadow a constant (the default output_format): the
        # hasher must encode its value per image, not the first image's value for all.
        varying = {name for name, _ in self.dynamic}
        return self.shared.key_hasher(model, {k: v for k, v in constants.items()
                                              if k not in varying})

    def param_value(self, model: models.Model, name: str, text: str) -> tuple[object, str | None]:
        """A rendered parameter as the schema's type, and the schema's verdict on it —
        remembered: templated parameters take a handful of distinct values."""
        memo = (model.name, name, text)
        found = self.param_values.get(memo)
        if found is None:
            types = model.field_types.get(name)
            value = models.normalise_value(models.coerce_text(text, types), types) \
                if types else text
            verdicts = model.check_fields({name: value})
            found = (value, verdicts[0][1] if verdicts else None)
            self.param_values[memo] = found
        return found

    def check_required(self, model: models.Model, request: Mapping[str, object]) -> bool:
        """Required parameters, checked once per model: every image of a job has the same
        request keys."""
        self.required_checked.add(model.name)
        for _, message in model.missing(request):
            self.problems.append(self.recipe.problem(self.path, message))
        return not model.missing(request)

    def seed(self, combo: matrix_rules.Combination, context: Mapping[str, object],
             replicate: int) -> int | None:
        """An integer or templated seed (`auto` seeds come from `self.auto_seeds`, in `build`)."""
        raw = self.spec.seed
        for_what = f" (for {describe(combo.values, replicate)})"
        if isinstance(raw, int):
            value = raw
            for_what = ""
        else:
            assert self.seed_template is not None
            text = self.seed_template.render(context, self.allowance)
            coerced = models.coerce_text(text, ("integer",))
            if not isinstance(coerced, int) or coerced < 0:
                self.problems.append(self.recipe.problem(
                    self.seed_path, f"the seed template gave {text!r}, not a non-negative "
                    f"integer{for_what}"))
                return None
            value = coerced
        refused = models.documented_rule("seed", value)
        if refused is not None:
            self.problems.append(self.recipe.problem(self.seed_path, refused + for_what))
            return None
        return int(value)

    def check_output(self, rendered: str, values: Mapping[str, object],
                     replicate: int) -> str | None:
        problem = output_path_problem(rendered)
        if problem is None:
            if "\\" in rendered or "//" in rendered or "./" in rendered:
                return posixpath.normpath(rendered.replace("\\", "/"))
            return rendered
        self.problems.append(self.recipe.problem(
            self.output_path, f"{problem} (for {describe(values, replicate)})"))
        return None

    def output_clash(self, job: Job, other: str, values: Mapping[str, object],
                     replicate: int) -> Problem:
        return self.recipe.problem(
            self.output_path, f"{_CLASH}{job.output!r}: {other} "
            f"({describe(values, replicate)}) and {job.job} "
            f"({describe(job.vars, job.replicate)}); {_clash_hint(job.vars, values)}")


def _clash_hint(ours: Mapping[str, object], others: Mapping[str, object]) -> str:
    """What to change. Values that differ only in case clash on file systems that ignore
    case; values that slug alike (`🐱` and `🐶` are both `x`) need more than `slug`."""
    for name, value in ours.items():
        theirs = others.get(name, value)
        if theirs == value:
            continue
        if str(theirs).casefold() == str(value).casefold():
            return (f"their {name} values ({theirs!r} and {value!r}) differ only in case, which "
                    "macOS and Windows ignore: put something else that varies in the output "
                    "template")
        if slug(theirs) == slug(value):
            return (f"their {name} values ({theirs!r} and {value!r}) are alike once slugged "
                    f"({slug(value)!r}): add `{{{{ {name} | hash }}}}` to the output template")
    return "put the varying values in the output template"


_JINJA_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "true",
                            "false", "none", "True", "False", "None", "loop"})
_IMAGE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "webp"})


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _combo_slug(values: Mapping[str, object]) -> str:
    if not values:
        return "default"
    return "-".join(slug(v) for v in values.values())
