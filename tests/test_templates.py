"""Templates: the filters, the direct-rendering fast path (same text as Jinja), the sandbox,
and the messages for undefined variables and syntax errors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxbatch import templates
from fluxbatch.templates import TemplateProblem, compile_template
from tests.helpers import examples


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
    ("{{ x | slug }}", {"x": "猫"}, "猫"),  # other scripts keep their letters...
    ("{{ x | slug }}", {"x": "кот в сапогах"}, "кот-в-сапогах"),
    ("{{ x | slug }}", {"x": "Ärger_über ﬁne"}, "arger-uber-fine"),  # ...Latin loses accents
    ("{{ x | slug }}", {"x": "🐱"}, "x"),  # symbols and emoji are dropped
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


@settings(max_examples=examples(300), deadline=None)
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


# -- limits: a recipe from a pull request cannot take the machine -----------------------------

LONG = "template limit: a text longer than 100,000 characters"
ITEMS = "template limit: a list longer than 100,000 items"
BITS = "template limit: a number larger than 100,000 bits"
STEPS = "template limit: more than 1,000,000 steps of work"
DEEP = ("template limit: recursion too deep (a macro, block or loop calling itself, "
        "or lists in lists)")
S = "{% set s = 'x' * 100000 %}"  # the longest text a template may make
ST = S + "{% set t = s ~ '' %}"  # another, equal: comparing them reads every character
TUPLES = "{% set a = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10) %}" + "".join(  # 10,000,000 numbers
    f"{{% set {name} = ({', '.join([part] * 10)}) %}}" for part, name in pairwise("abcdefg"))
NESTED_LOOPS = ("{% for a in range(100000) %}{% for b in range(100000) BODY %}"
                "{% endfor %}{% endfor %}")


@pytest.mark.parametrize("source,message", [
    # huge text in one operation
    ("{{ lipsum(1000000) }}", LONG),
    ("{{ lipsum(1, max=1e9) }}", LONG),
    ("{{ '%0900000000d' % 1 }}", LONG),
    ("{{ '%*d' % (900000000, 1) }}", LONG),
    ("{{ '%(a).900000000f' % {'a': 1} }}", LONG),
    ("{{ 'x' | center(900000000) }}", LONG),
    ("{{ 'x' | pad(900000000) }}", LONG),
    ("{{ 'x'.center(9e8) }}", LONG),
    ("{{ 'x'.center(900000000) }}", LONG),
    ("{{ 'x'.ljust(900000000) }}", LONG),
    ("{{ 'x'.rjust(900000000) }}", LONG),
    ("{{ '1'.zfill(900000000) }}", LONG),
    ("{{ ('x' | e).center(900000000) }}", LONG),  # Markup's own str methods
    ("{{ ('\\t' * 1000).expandtabs(1000) }}", LONG),
    ("{{ ('x' * 1000).replace('', 'y' * 1000) }}", LONG),
    ("{{ '{:>900000000}'.format(1) }}", LONG),
    ("{{ '{:{}}'.format(1, 900000000) }}", LONG),
    ("{{ '{x:>900000000}'.format_map({'x': 1}) }}", LONG),
    ("{% set l = [0] %}{{ l.sort(key='{:>900000000}'.format) }}", LONG),
    ("{{ 'ab'.translate({97: 'x' * 100000}) }}", LONG),
    ("{{ (1).to_bytes(900000000, 'big') }}", LONG),
    ("{{ ('x\\n' * 1000) | indent(1000) }}", LONG),
    ("{{ ('x ' * 1000) | wordwrap(1, wrapstring='y' * 1000) }}", LONG),
    ("{{ '%0900000000d' | format(1) }}", LONG),
    ("{{ ('x' * 1000) | replace('x', 'y' * 1000) }}", LONG),
    ("{{ ('a.com ' * 1000) | urlize(target='x' * 1000) }}", LONG),
    ("{{ {'a': 1} | tojson(indent=900000000) }}", LONG),
    (S + "{{ s ~ 'y' }}", LONG),
    (S + "{{ s + 'y' }}", LONG),
    # a list of references to one long text, printed or joined
    (S + "{{ ([s] * 100000) | join }}", LONG),
    (S + "{{ [s] * 100000 }}", LONG),
    (S + "{{ ''.join([s] * 100000) }}", STEPS),
    (S + "{{ ([s] * 100000) | string }}", STEPS),
    ("{{ range(100000) | list | string }}", LONG),
    # doubling in a loop
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s | length }}", LONG),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s | length }}", LONG),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}"
     "{% endfor %}", ITEMS),
    ("{% set l = [1] %}{% for i in range(40) %}{{ l.extend(l) }}{% endfor %}", ITEMS),
    ("{{ [1] * 100001 }}", ITEMS),
    ("{{ [1] | batch(900000000, 0) | list }}", ITEMS),
    ("{{ [1] | slice(900000000) | list }}", ITEMS),
    # numbers
    ("{{ (9**999)**999 }}", BITS),
    ("{{ 9**999**999 }}", BITS),
    ("{{ 2 ** 100001 }}", BITS),
    ("{{ (2**60000) * (2**60000) }}", BITS),
    # loops: with and without output, filtered
    (NESTED_LOOPS.replace(" BODY %}", " %}"), STEPS),
    (NESTED_LOOPS.replace(" BODY %}", " %}x"), LONG),
    (NESTED_LOOPS.replace(" BODY %}", " if b < 0 %}"), STEPS),
    (S + "{% for i in range(100000) %}{% if 'y' in s %}{% endif %}{% endfor %}", STEPS),
    (S + "{% for i in range(100000) %}{% set x = s[1:] %}{% endfor %}", STEPS),
    (S + "{% for i in range(100000) %}{% set x = s | upper %}{% endfor %}", STEPS),
    ("{% set l = [[1]] * 100000 %}{{ l | sum(start=[]) | length }}", STEPS),
    # comparing or hashing what is cheap to build and costly to read
    (ST + "{{ [s, t] * 50000 == [t, s] * 50000 }}", STEPS),
    (ST + "{{ ([s, t] * 50000) | sort | length }}", STEPS),
    (ST + "{{ ([s, t] * 50000).count(s) }}", STEPS),
    (ST + "{{ t in [s] * 100000 }}", STEPS),
    (TUPLES + "{% set d = {g: 1} %}", STEPS),
    (TUPLES + "{{ dict([(g, 1)]) }}", STEPS),
    # recursion: endless, or exponential
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", DEEP),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
     STEPS),
    ("{% macro f() %}{{ caller() }}{% endmacro %}"
     "{% macro g() %}{% call f() %}{{ g() }}{% endcall %}{% endmacro %}{{ g() }}", DEEP),
    ("{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}", DEEP),
    ("{% block a %}{{ self.a() }}{% endblock %}", DEEP),
    ("{% set ns = namespace(l=[]) %}{% for i in range(5000) %}{% set ns.l = [ns.l] %}"
     "{% endfor %}{{ ns.l }}", DEEP),
])
def test_hostile_templates_stop_at_a_limit_with_a_clean_message(source: str, message: str) -> None:
    assert problem(source) == message


@pytest.mark.parametrize("source,context", [
    ("{{ a | center(900000000) }}", {"a": "x"}),  # a filter with a constant argument
    ("{{ a }}{{ a }}", {"a": "x" * 60000}),  # values from the recipe, together too long
])
def test_the_direct_rendering_keeps_the_limits(source: str, context: dict[str, Any]) -> None:
    assert compile_template(source)._direct is not None
    assert problem(source, **context) == LONG


@pytest.mark.parametrize("source,within,over,message", [
    ("{{ 'x' * n }}", 100000, 100001, LONG),
    ("{{ a }}{{ 'x' * n }}", 99997, 99998, LONG),  # (a is "owl")
    ("{{ ([1] * n) | length }}", 100000, 100001, ITEMS),
    ("{{ 2 ** n > 0 }}", 100000, 100001, BITS),
    ("{% for i in range(n) %}{% for j in range(100) %}{% endfor %}{% endfor %}", 1000, 10000,
     STEPS),
    ("{% for i in range(n) %}{{ 'red fox' | title }}, {% endfor %}", 1000, 100000, LONG),
    ("{% for i in range(n) %}{% set x = 'red fox' | title %}{% endfor %}", 1000, 100000, STEPS),
])
def test_limits_are_far_above_ordinary_templates(source: str, within: int, over: int,
                                                 message: str) -> None:
    render(source, a="owl", n=within)  # no problem
    assert problem(source, a="owl", n=over) == message


def test_each_rendering_has_its_own_budget() -> None:
    loop = "{% for i in range(100000) %}{% endfor %}"  # over half of the budget
    template = compile_template(loop)
    for _ in range(5):
        assert template.render_with_jinja({}) == ""
    assert problem(loop + loop) == STEPS


PLAN = ("template limit: the plan's templates together did more than 10,000,000 steps of "
        "work, plus 2,000 per rendering")


def renderings_until_the_plan_stops(source: str, contexts: Any) -> int | None:
    """How many renderings, with one plan's allowance, until a problem (None: never)."""
    template = compile_template(source)
    allowance = templates.Allowance()
    for count, context in enumerate(contexts):
        try:
            template.render(context, allowance)
        except TemplateProblem as caught:
            assert str(caught) == PLAN
            return count
    return None


def test_ordinary_templates_never_exhaust_a_plans_allowance() -> None:
    words = {"words": ["a" * 50] * 20}  # a loop over twenty words: about 1,700 steps a time
    loop = "{% for w in words %}{{ w | upper }}, {% endfor %}{{ n }}"
    assert renderings_until_the_plan_stops(loop, ({**words, "n": n} for n in range(20000))) \
        is None
    prompt = "a {{ subject }} in {{ style }}, {{ n }}"  # (the direct rendering)
    assert renderings_until_the_plan_stops(
        prompt, ({"subject": "x" * 1000, "style": "y" * 1000, "n": n}
                 for n in range(100000))) is None


@pytest.mark.parametrize("source,context,stops_after", [
    # each rendering half the limit (504,001 steps): twenty of them, then each has only its
    # share
    ("{% for i in range(9000) %}{% for j in range(9) %}{% endfor %}{% endfor %}{{ n }}", {}, 20),
    # a long text each time, kept by the plan: 100 to 200 of them (10 to 20 MB), through
    # Jinja (made, then output: charged twice) or direct
    ("{{ 'x' * 99990 }}{{ n }}", {}, 102),
    ("{{ a }}{{ n }}", {"a": "x" * 99990}, 208),
])
def test_a_plans_renderings_share_an_allowance(source: str, context: dict[str, Any],
                                                stops_after: int) -> None:
    found = renderings_until_the_plan_stops(source, ({**context, "n": n} for n in range(1000)))
    assert found is not None and abs(found - stops_after) <= 2, found


@pytest.mark.parametrize("source,message", [
    ("{{ x }}" + " " * 50000, "template limit: the template is longer than 50,000 characters"),
    ("{{ " + "(" * 1000 + "x" + ")" * 1000 + " }}",
     "template limit: the template is nested too deeply"),
    ("{{ x" + " | e" * 1000 + " }}", "template limit: the template is nested too deeply"),
    ("{% for x in y %}" * 30 + "{% endfor %}" * 30,
     "template limit: the template is nested too deeply"),
    ("{{ " + "9" * 5000 + " }}", "template error: Exceeds the limit (4300 digits) for integer "
     "string conversion: value has 5000 digits; use sys.set_int_max_str_digits() to increase "
     "the limit"),
])
def test_hostile_template_sources_are_refused_at_compile_time(source: str, message: str) -> None:
    with pytest.raises(TemplateProblem) as caught:
        compile_template(source)
    assert str(caught.value) == message


# -- compiled once per source -----------------------------------------------------------------


def test_templates_of_one_source_share_their_code_but_not_their_caches_or_budgets() -> None:
    compiler = templates.Compiler()
    source = "{% for i in range(50) %}{{ a }}{% endfor %}"
    first, second = compiler(source), compiler(source)
    assert first._compiled is second._compiled  # compiled once
    assert first is not second and first._cache is not second._cache
    allowance = templates.Allowance()
    before = allowance.steps
    assert first.render({"a": "x"}, allowance) == "x" * 50
    spent = before - allowance.steps  # (its work, less the share each rendering brings)
    assert spent != 0
    assert first.render({"a": "x"}, allowance) == "x" * 50  # from its own cache: free
    assert before - allowance.steps == spent
    assert second.render({"a": "x"}, allowance) == "x" * 50  # not from the first's cache
    assert before - allowance.steps == 2 * spent


def test_a_source_that_fails_to_compile_fails_alike_each_time() -> None:
    compiler = templates.Compiler()
    for _ in range(2):
        with pytest.raises(TemplateProblem) as caught:
            compiler("{{ a | nope }}")
        assert str(caught.value) == "template syntax error: unknown filter 'nope' (template " \
            "line 1)"


def test_a_direct_template_compiles_jinja_code_only_when_a_rendering_needs_it() -> None:
    template = templates.Compiler()("{{ a }} and {{ b | default('none') }}")
    assert template._compiled is not None and template._compiled._jinja is None
    assert template.render({"a": 1, "b": 2}) == "1 and 2"
    assert template._compiled._jinja is None
    assert template.render({"a": 1}) == "1 and none"  # (`default` needs Jinja proper)
    assert template._compiled._jinja is not None
    with pytest.raises(TemplateProblem) as caught:
        template.render({"b": 2})
    assert str(caught.value) == "undefined variable 'a'"


def test_the_jinja_internals_templates_rely_on_are_still_there() -> None:
    """fluxbatch/templates.py reaches into Jinja where its public API stops (it is pinned
    below its next minor in pyproject.toml). If this fails after moving the pin, Jinja
    changed one of these: adapt templates.py before anything else."""
    import inspect

    import jinja2
    from jinja2 import meta
    from jinja2.compiler import CodeGenerator
    from jinja2.utils import _PassArg

    # _bounded_filter and _direct_getter tell a filter that takes the context apart
    assert _PassArg.from_obj(jinja2.pass_context(lambda context, value: value)) is \
        _PassArg.context
    assert _PassArg.from_obj(lambda value: value) is None
    # _CodeGenerator overrides visit_Call to call the metering helpers directly
    assert list(inspect.signature(CodeGenerator.visit_Call).parameters) == [
        "self", "node", "frame", "forward_caller"]
    ast = templates.ENV.parse("{% for x in range(3) %}{{ x }}{% endfor %}")
    templates._meter(ast)
    code = templates.ENV.compile(ast, raw=True)
    assert "from fluxbatch.templates import _charge as t_1" in code
    assert "t_1(7, )" in code  # a direct call, not environment.call(...)
    # _Names turns off the optimizer of meta's tracking code generator
    assert "optimizer" in vars(meta.TrackingCodeGenerator(jinja2.Environment()))
