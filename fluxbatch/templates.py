"""Jinja2 templates for prompts, parameters, seeds and output paths.

Templates run in a `SandboxedEnvironment` with `StrictUndefined`: a recipe is code that may
come from a pull request, and a typo must be an error, never an empty string. Each compiled
template knows which variables it reads, so a template that reads only `style` is rendered
once per distinct style, not once per job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import _PassArg

from fluxbatch.models import did_you_mean


def slug(value: Any, separator: str = "-") -> str:
    """`"Crème Brûlée, 2 cups!"` → `creme-brulee-2-cups` (ASCII, lower case, safe in paths)."""
    if isinstance(value, Mapping):
        value = separator.join(str(v) for v in value.values())
    elif isinstance(value, list | tuple):
        value = separator.join(str(v) for v in value)
    return _slug_text(str(value), separator)


@functools.lru_cache(maxsize=65536)
def _slug_text(text: str, separator: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9]+", separator, ascii_text).strip(separator).lower() or "x"


def article(word: Any) -> str:
    """`"owl" | article` → `an owl`; `"unicorn"` → `a unicorn` (by spelling, good enough)."""
    text = str(word)
    first = text.lstrip()[:1].lower()
    lowered = text.lstrip().lower()
    starts_vowel_sound = first in ("a", "e", "i", "o") or (
        first == "u" and not lowered.startswith(("uni", "use"))
    )
    if lowered.startswith(("hour", "honest", "heir")):
        starts_vowel_sound = True
    return f"{'an' if starts_vowel_sound else 'a'} {text}"


def oxford(values: Iterable[Any], conjunction: str = "and") -> str:
    """`["red", "green", "blue"] | oxford` → `red, green, and blue`."""
    items = [str(v) for v in values]
    if len(items) <= 2:
        return f" {conjunction} ".join(items)
    return f"{', '.join(items[:-1])}, {conjunction} {items[-1]}"


def pad(value: Any, width: int = 3) -> str:
    """`7 | pad` → `007`."""
    return str(value).zfill(width)


def short_hash(value: Any, length: int = 8) -> str:
    """A stable hex digest of any value: `{{ prompt | hash }}` for file names."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


FILTERS: dict[str, Callable[..., Any]] = {
    "slug": slug,
    "article": article,
    "oxford": oxford,
    "pad": pad,
    "hash": short_hash,
}


MAX_TEXT = 100_000  # characters (or items) one `*` may produce
MAX_EXPONENT = 1_000


class _Sandbox(SandboxedEnvironment):
    """The sandbox, plus limits on `*` and `**`: a recipe from a pull request must not be able
    to exhaust the memory of the machine that plans it (`{{ 'x' * 10**9 }}`)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise jinja2.exceptions.SecurityError(
                f"exponent {right} is larger than {MAX_EXPONENT}")
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(count, int) \
                        and len(sequence) * count > MAX_TEXT:
                    raise jinja2.exceptions.SecurityError(
                        f"the result would be longer than {MAX_TEXT:,} characters")
        return super().call_binop(context, operator, left, right)


def environment() -> SandboxedEnvironment:
    env = _Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        cache_size=0,
    )
    env.filters.update(FILTERS)
    return env


ENV = environment()


class TemplateProblem(Exception):
    """A template failed to compile or render; the message is for the user."""


Getter = Callable[[Mapping[str, Any]], Any]


@dataclass(slots=True)
class Template:
    """A compiled template plus the variables it reads and a render cache keyed by them.

    Templates made only of text, `{{ name }}` and `{{ name | filter(constants) }}` — most
    prompts and output paths — also get a direct rendering (a format string and one getter
    per placeholder) that skips Jinja's per-call set-up and gives the same text; anything
    unusual (an error, an undefined name under `default`) falls back to Jinja proper.
    The cache switches itself off when it does not pay (a template that differs per image).
    """

    source: str
    names: tuple[str, ...]
    _template: jinja2.Template | None
    _direct: tuple[str, tuple[Getter, ...]] | None = None
    _cache: dict[tuple[Any, ...], str] | None = field(default_factory=dict)
    _lookups: int = 0
    _hits: int = 0
    _key: Callable[[Mapping[str, Any]], Any] = field(default=lambda context: ())

    def __post_init__(self) -> None:
        if self.names:
            self._key = operator.itemgetter(*self.names)

    @property
    def is_constant(self) -> bool:
        return self._template is None

    def render(self, context: Mapping[str, Any]) -> str:
        if self._template is None:
            return self.source
        cache = self._cache
        if cache is None:
            return self._render(context)
        try:
            key = self._key(context)
            cached = cache.get(key)
        except (KeyError, TypeError):  # a name not defined here, or an unhashable value
            return self._render(context)
        self._lookups += 1
        if cached is not None:
            self._hits += 1
            return cached
        if self._lookups == 512 and self._hits < 128:
            self._cache = None  # nearly every image differs: caching only costs
        text = self._render(context)
        if self._cache is not None:
            cache[key] = text
        return text

    def _render(self, context: Mapping[str, Any]) -> str:
        if self._direct is not None:
            fmt, getters = self._direct
            try:
                return fmt.format(*[get(context) for get in getters])
            except Exception:
                pass  # (an undefined name under `default`, or the real error message)
        return self.render_with_jinja(context)

    def render_with_jinja(self, context: Mapping[str, Any]) -> str:
        assert self._template is not None
        template = self._template
        try:
            ctx = template.new_context(dict(context))  # not shared: keep the globals (range)
            return "".join(template.root_render_func(ctx))
        except jinja2.UndefinedError as error:
            raise TemplateProblem(_undefined_message(error, context)) from None
        except jinja2.exceptions.SecurityError as error:
            raise TemplateProblem(f"not allowed in a template: {str(error).rstrip('.')}") from None
        except jinja2.TemplateError as error:
            raise TemplateProblem(f"template error: {error}") from None
        except Exception as error:  # any Python error raised while evaluating an expression
            raise TemplateProblem(f"{type(error).__name__}: {error}") from None


def compile_template(source: str) -> Template:
    """Compile `source`; raise `TemplateProblem` on a syntax error."""
    if "{" not in source:
        return Template(source, (), None)
    try:
        ast = ENV.parse(source)
        names = tuple(sorted(meta.find_undeclared_variables(ast)))  # (an unknown filter fails here)
        template = ENV.from_string(ast)
    except jinja2.TemplateSyntaxError as error:
        raise TemplateProblem(_syntax_message(error)) from None
    return Template(source, names, template, _direct_rendering(ast))


def _syntax_message(error: jinja2.TemplateSyntaxError) -> str:
    text = (error.message or "").rstrip(".")
    unknown = re.match(r"No (filter|test) named '([^']+)'", text)
    if unknown:
        kind, name = unknown.groups()
        known = ENV.filters if kind == "filter" else ENV.tests
        text = f"unknown {kind} {name!r}" + did_you_mean(name, list(known))
    return f"template syntax error: {text} (template line {error.lineno})"


def _direct_rendering(ast: nodes.Template) -> tuple[str, tuple[Getter, ...]] | None:
    """The template as a format string and getters, or None if it needs Jinja proper."""
    fmt: list[str] = []
    getters: list[Getter] = []
    for output in ast.body:
        if not isinstance(output, nodes.Output):
            return None
        for node in output.nodes:
            if isinstance(node, nodes.TemplateData):
                fmt.append(node.data.replace("{", "{{").replace("}", "}}"))
                continue
            getter = _direct_getter(node)
            if getter is None:
                return None
            fmt.append("{}")
            getters.append(getter)
    return "".join(fmt), tuple(getters)


def _direct_getter(node: nodes.Node) -> Getter | None:
    if isinstance(node, nodes.Name):
        return operator.itemgetter(node.name)
    if not isinstance(node, nodes.Filter) or not isinstance(node.node, nodes.Name):
        return None
    if node.kwargs or node.dyn_args or node.dyn_kwargs:
        return None
    if not all(isinstance(arg, nodes.Const) for arg in node.args):
        return None
    function = ENV.filters.get(node.name)
    if function is None or _PassArg.from_obj(function) is not None:
        return None
    name = node.node.name
    args = tuple(arg.value for arg in node.args if isinstance(arg, nodes.Const))
    return lambda context: str(function(context[name], *args))


def _undefined_message(error: jinja2.UndefinedError, context: Mapping[str, Any]) -> str:
    message = str(error.message or error)
    found = re.match(r"'([^']+)' is undefined", message)
    if found:
        name = found.group(1)
        return f"undefined variable {name!r}" + did_you_mean(name, list(context))
    return message
