"""Templates: the filters, the direct-rendering fast path (same text as Jinja), the sandbox,
and the messages for undefined variables and syntax errors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxbatch import templates
from fluxbatch.templates import TemplateProblem, compile_template


def render(source: str, **context: Any) -> str:
    return compile_template(source).render(context)


def problem(source: str, **context: Any) -> str:
    with pytest.raises(TemplateProblem) as caught:
        render(source, **context)
    return str(caught.value)


# -- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source,context,expected", [
    ("{{ x | slug }}", {"x": "Crème Brûlée, 2 cups!"}, "creme-brulee-2-cups"),
    ("{{ x | slug('_') }}", {"x": "Studio Photo"}, "studio_photo"),
    ("{{ x | slug }}", {"x": "!!!"}, "x"),
    ("{{ x | slug }}", {"x": ["Red", "Blue Sky"]}, "red-blue-sky"),
    ("{{ x | slug }}", {"x": {"a": "Wide", "b": 24}}, "wide-24"),
    ("{{ x | article }}", {"x": "owl"}, "an owl"),
    ("{{ x | article }}", {"x": "unicorn"}, "a unicorn"),
    ("{{ x | article }}", {"x": "umbrella"}, "an umbrella"),
    ("{{ x | article }}", {"x": "user"}, "a user"),
    ("{{ x | article }}", {"x": "hour"}, "an hour"),
    ("{{ x | article }}", {"x": "Honest man"}, "an Honest man"),
    ("{{ x | article }}", {"x": "teapot"}, "a teapot"),
    ("{{ x | article }}", {"x": ""}, "a "),
    ("{{ x | oxford }}", {"x": []}, ""),
    ("{{ x | oxford }}", {"x": ["red"]}, "red"),
    ("{{ x | oxford }}", {"x": ["red", "green"]}, "red and green"),
    ("{{ x | oxford }}", {"x": ["red", "green", "blue"]}, "red, green, and blue"),
    ("{{ x | oxford('or') }}", {"x": ["tea", "coffee", "water"]}, "tea, coffee, or water"),
    ("{{ x | pad }}", {"x": 7}, "007"),
    ("{{ x | pad(5) }}", {"x": 42}, "00042"),
    ("{{ x | pad }}", {"x": 1234}, "1234"),
    ("{{ x | hash }}", {"x": "owl"}, hashlib.sha256(b"owl").hexdigest()[:8]),
    ("{{ x | hash(12) }}", {"x": "owl"}, hashlib.sha256(b"owl").hexdigest()[:12]),
    ("{{ x | hash }}", {"x": {"b": 1, "a": 2}},
     hashlib.sha256(b'{"a": 2, "b": 1}').hexdigest()[:8]),
])
def test_filter_output(source: str, context: dict[str, Any], expected: str) -> None:
    assert render(source, **context) == expected


def test_builtin_globals_are_available() -> None:
    assert render("{% for i in range(3) %}{{ i }}{% endfor %}") == "012"


# -- the direct-rendering fast path -----------------------------------------------------------

NAMES = ("a", "b", "subject", "style_2")
FILTER_CALLS = (
    "", " | slug", " | slug('_')", " | article", " | pad", " | pad(5)", " | hash", " | hash(4)",
    " | oxford", " | upper", " | lower", " | title", " | capitalize", " | trim", " | string",
    " | length", " | first", " | last", " | int", " | float", " | round", " | abs",
    " | default('none')", " | list", " | wordcount", " | center(9)",
    " | join('-')", " | replace('a', 'o')", " | truncate(4)", " | e",
)
values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
    st.text(max_size=12), st.lists(st.text(max_size=4) | st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
plain_text = st.text(
    st.characters(blacklist_characters="{}%#", blacklist_categories=("Cs",)), max_size=8)
placeholders = st.builds(lambda name, call: f"{{{{ {name}{call} }}}}",
                         st.sampled_from(NAMES), st.sampled_from(FILTER_CALLS))
pieces = st.one_of(plain_text, st.sampled_from(["{ ", " }", "}", "{{ '{' }}"]), placeholders)
contexts = st.one_of(
    st.fixed_dictionaries({name: values for name in NAMES}),  # every name defined
    st.dictionaries(st.sampled_from(NAMES), values),  # some missing: the fallback to Jinja
)


def outcome(render: Callable[[dict[str, Any]], str],
            context: dict[str, Any]) -> str | type[Exception]:
    try:
        return render(context)
    except TemplateProblem:
        return TemplateProblem


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(pieces, placeholders), min_size=1, max_size=6).map("".join), contexts)
def test_direct_rendering_gives_jinjas_text(source: str, context: dict[str, Any]) -> None:
    template = compile_template(source)
    if template.is_constant:
        assert template.render(context) == source
        return
    expected = outcome(compile_template(source).render_with_jinja, context)
    assert outcome(template.render, context) == expected
    assert outcome(template.render, context) == expected  # the second time from the cache


@pytest.mark.parametrize("source", [
    "plain {{ a }} and {{ b | slug }}, {{ a | pad(4) }}",
    "{{ a | upper }}",
    "{ literal braces } {{ a }}",
])
def test_simple_templates_take_the_direct_path(source: str) -> None:
    assert compile_template(source)._direct is not None


@pytest.mark.parametrize("source", [
    "{{ a.b }}", "{{ a ~ b }}", "{% if a %}x{% endif %}", "{{ a | replace('x', 'y') }}",
    "{{ a | pad(b) }}",
])
def test_other_templates_use_jinja_proper(source: str) -> None:
    assert compile_template(source)._direct is None


def test_many_distinct_renderings_stay_correct_after_the_cache_switches_off() -> None:
    template = compile_template("{{ a }}-{{ b | pad }}")
    for i in range(1200):
        assert template.render({"a": i, "b": i % 7}) == f"{i}-{i % 7:03d}"
    assert template.render({"a": 0, "b": 0}) == "0-000"


def test_constant_template_is_not_compiled() -> None:
    template = compile_template("a plain prompt")
    assert template.is_constant
    assert template.names == ()
    assert template.render({}) == "a plain prompt"


def test_names_lists_the_variables_a_template_reads() -> None:
    template = compile_template("{{ b }} {% for x in items %}{{ x }}{{ a }}{% endfor %}")
    assert template.names == ("a", "b", "items")


# -- the sandbox and messages -----------------------------------------------------------------


@pytest.mark.parametrize("source,context,message", [
    ("{{ ''.__class__ }}", {},
     "not allowed in a template: access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", {},
     "not allowed in a template: access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ x.__class__ }}", {"x": 1},
     "not allowed in a template: access to attribute '__class__' of 'int' object is unsafe"),
    ("{{ cycler.__init__.__globals__ }}", {},
     "not allowed in a template: access to attribute '__init__' of 'type' object is unsafe"),
    ("{{ x.__len__() }}", {"x": [1]},
     "not allowed in a template: access to attribute '__len__' of 'list' object is unsafe"),
])
def test_sandbox_blocks_attribute_escapes_with_a_clean_message(
        source: str, context: dict[str, Any], message: str) -> None:
    assert problem(source, **context) == message


@pytest.mark.parametrize("source,context,message", [
    ("{{ subjct }}", {"subject": "owl"}, "undefined variable 'subjct' (did you mean 'subject'?)"),
    ("{{ x }}", {"y": 1}, "undefined variable 'x'"),
    ("{{ sytle | slug }}", {"style": "ink"}, "undefined variable 'sytle' (did you mean 'style'?)"),
    ("{{ x.nope }}", {"x": {}}, "'dict object' has no attribute 'nope'"),
    ("{{ 1 / x }}", {"x": 0}, "ZeroDivisionError: division by zero"),
    ("{{ x | int + 'a' }}", {"x": 1},
     "TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
])
def test_render_problems_are_one_clean_line(source: str, context: dict[str, Any],
                                            message: str) -> None:
    assert problem(source, **context) == message


@pytest.mark.parametrize("source,message", [
    ("{{ x", "template syntax error: unexpected end of template, expected 'end of print "
     "statement' (template line 1)"),
    ("line\n{% for %}", "template syntax error: Expected an expression, got 'end of statement "
     "block' (template line 2)"),
    ("{{ x | slugify }}",
     "template syntax error: unknown filter 'slugify' (did you mean 'slug'?) (template line 1)"),
    ("{{ x is evne }}",
     "template syntax error: unknown test 'evne' (did you mean 'even'?) (template line 1)"),
    ("{% endfor %}", "template syntax error: Encountered unknown tag 'endfor' (template line 1)"),
])
def test_syntax_errors_are_reported_at_compile_time(source: str, message: str) -> None:
    with pytest.raises(TemplateProblem) as caught:
        compile_template(source)
    assert str(caught.value) == message


def test_filters_table_is_what_templates_see() -> None:
    assert set(templates.FILTERS) == {"slug", "article", "oxford", "pad", "hash"}
    # templates see each filter wrapped in the size limits, the filter itself underneath
    assert all(templates.ENV.filters[name].__wrapped__ is f  # type: ignore[attr-defined]
               for name, f in templates.FILTERS.items())
