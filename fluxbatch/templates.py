"""Jinja2 templates for prompts, parameters, seeds and output paths.

Templates run in a `SandboxedEnvironment` with `StrictUndefined`: a recipe is code that may
come from a pull request, and a typo must be an error, never an empty string. Each compiled
template knows which variables it reads, so a template that reads only `style` is rendered
once per distinct style, not once per job.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from fluxbatch.models import did_you_mean

_MISSING = object()


def slug(value: Any, separator: str = "-") -> str:
    """`"Crème Brûlée, 2 cups!"` → `creme-brulee-2-cups` (ASCII, lower case, safe in paths)."""
    if isinstance(value, Mapping):
        value = separator.join(str(v) for v in value.values())
    elif isinstance(value, list | tuple):
        value = separator.join(str(v) for v in value)
    text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", separator, text).strip(separator).lower()
    return text or "x"


def article(word: Any) -> str:
    """`"owl" | article` → `an owl`; `"unicorn"` → `a unicorn` (by spelling, good enough)."""
    text = str(word)
    first = text.lstrip()[:1].lower()
    lowered = text.lstrip().lower()
    starts_vowel_sound = first in "aeio" or (
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


def environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
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


@dataclass(slots=True)
class Template:
    """A compiled template plus the variables it reads and a render cache keyed by them."""

    source: str
    names: tuple[str, ...]
    _template: jinja2.Template | None
    _cache: dict[tuple[Any, ...], str] = field(default_factory=dict)

    @property
    def is_constant(self) -> bool:
        return self._template is None

    def render(self, context: Mapping[str, Any]) -> str:
        if self._template is None:
            return self.source
        try:
            key = tuple(context.get(n, _MISSING) for n in self.names)
            cached = self._cache.get(key)
        except TypeError:  # an unhashable value (an object-valued matrix variable)
            key, cached = None, None
        if cached is not None:
            return cached
        text = self._render(context)
        if key is not None:
            self._cache[key] = text
        return text

    def _render(self, context: Mapping[str, Any]) -> str:
        assert self._template is not None
        template = self._template
        try:
            ctx = template.new_context(dict(context), shared=True)
            return "".join(template.root_render_func(ctx))
        except jinja2.UndefinedError as error:
            raise TemplateProblem(_undefined_message(error, context)) from None
        except jinja2.exceptions.SecurityError as error:
            raise TemplateProblem(f"not allowed in a template: {error}") from None
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
    except jinja2.TemplateSyntaxError as error:
        message = f"template syntax error: {error.message} (template line {error.lineno})"
        raise TemplateProblem(message) from None
    names = tuple(sorted(meta.find_undeclared_variables(ast)))
    return Template(source, names, ENV.from_string(ast))


def _undefined_message(error: jinja2.UndefinedError, context: Mapping[str, Any]) -> str:
    message = str(error.message or error)
    found = re.match(r"'([^']+)' is undefined", message)
    if found:
        name = found.group(1)
        return f"undefined variable {name!r}" + did_you_mean(name, list(context))
    return message
