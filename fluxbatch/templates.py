"""Jinja2 templates for prompts, parameters, seeds and output paths.

Templates run in a `SandboxedEnvironment` with `StrictUndefined`: a recipe is code that may
come from a pull request, and a typo must be an error, never an empty string. Each compiled
template knows which variables it reads, so a template that reads only `style` is rendered
once per distinct style, not once per job. A template is also bounded in time and memory (see
the limits below): whatever a recipe holds, planning it costs seconds, not the machine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import operator
import re
import string
import threading
import unicodedata
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from types import BuiltinMethodType
from typing import Any, cast

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import Namespace, _PassArg, generate_lorem_ipsum

from fluxbatch.models import did_you_mean


def slug(value: object, separator: str = "-") -> str:
    """`"Crème Brûlée, 2 cups!"` → `creme-brulee-2-cups`: lower case and safe in paths.
    Latin letters lose their accents; other letters (`猫`, `кот`) are kept, so values in
    other scripts do not all become `x`. Symbols and emoji are dropped."""
    if isinstance(value, Mapping):
        value = separator.join(str(v) for v in value.values())
    elif isinstance(value, list | tuple):
        value = separator.join(str(v) for v in value)
    return _slug_text(str(value), separator)


@functools.lru_cache(maxsize=65536)
def _slug_text(text: str, separator: str) -> str:
    kept = []
    for char in unicodedata.normalize("NFKC", text):
        base = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
        if base.isalnum():
            kept.append(base)  # é → e, ﬁ → fi
        elif char.isalnum():
            kept.append(char)  # 猫, к: a letter of another script
        else:
            kept.append(" ")
    words = re.split(r"[^\w]+|_+", "".join(kept).lower())
    return separator.join(word for word in words if word) or "x"


def article(word: object) -> str:
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


def oxford(values: Iterable[object], conjunction: str = "and") -> str:
    """`["red", "green", "blue"] | oxford` → `red, green, and blue`."""
    items = [str(v) for v in values]
    if len(items) <= 2:
        return f" {conjunction} ".join(items)
    return f"{', '.join(items[:-1])}, {conjunction} {items[-1]}"


def pad(value: object, width: int = 3) -> str:
    """`7 | pad` → `007`."""
    return str(value).zfill(width)


def short_hash(value: object, length: int = 8) -> str:
    """A stable hex digest of any value: `{{ prompt | hash }}` for file names."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


FILTERS: dict[str, Callable[..., object]] = {
    "slug": slug,
    "article": article,
    "oxford": oxford,
    "pad": pad,
    "hash": short_hash,
}


# -- limits -----------------------------------------------------------------------------------
# A recipe may come from a pull request, and CI plans it: no template may cost more than a few
# seconds or a few hundred MB. Each limit is far above what a prompt, a parameter or a path
# needs, so an ordinary recipe never meets one.

MAX_SOURCE = 50_000  # characters in a template; compiling one costs up to ~50 µs and 4 kB
MAX_TEXT = 100_000  # characters in any text a template makes, its result included
MAX_ITEMS = 100_000  # items in a list a template makes (`*`, `+`, `append`, `split`, ...)
MAX_INT_BITS = 100_000  # 30,000 digits (Python prints at most 4,300); multiplying stays fast
MAX_STEPS = 1_000_000  # work per rendering; a step is about a microsecond at most
CHARS_PER_STEP = 2  # characters an operation reads or writes for one step (regexes: ~0.4 µs)
# The templates of one plan together: each rendering may stay under MAX_STEPS and still cost a
# plan of 10,000 images hours and gigabytes. So a plan's renderings share an allowance: this
# much, plus a share per rendering that is far above what an ordinary one takes (tens to a
# few hundred steps; a loop over a list of twenty words, under 2,000). The texts the plan keeps
# are counted in it too, so they hold a few tens of MB at most.
PLAN_STEPS = 10 * MAX_STEPS
STEPS_PER_RENDERING = 2_000


class TemplateLimit(Exception):
    """A template would take too much time or memory; the message names the limit."""


_TOO_DEEP = "recursion too deep (a macro, block or loop calling itself, or lists in lists)"


_OVER_STEPS = f"more than {MAX_STEPS:,} steps of work"
_OVER_PLAN = (f"the plan's templates together did more than {PLAN_STEPS:,} steps of work, "
              f"plus {STEPS_PER_RENDERING:,} per rendering")


class _Budget(threading.local):
    steps = MAX_STEPS  # what the rendering under way may still spend; reset for each
    exceeded = _OVER_STEPS  # what running out of it means


_BUDGET = _Budget()


def _charge(steps: int) -> bool:
    """Spend `steps` of this rendering's budget (True: a loop's `if` may call it)."""
    _BUDGET.steps -= steps
    if _BUDGET.steps < 0:
        raise TemplateLimit(_BUDGET.exceeded)
    return True


class Allowance:
    """The work that the renderings of one plan may still do together (see PLAN_STEPS)."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps = PLAN_STEPS

    def grant(self) -> int:
        """The budget of the next rendering (its share is added first)."""
        self.steps += STEPS_PER_RENDERING
        return min(self.steps, MAX_STEPS)

    def spend(self, steps: int, granted: int) -> None:
        self.steps -= min(max(steps, 0), granted)


def _check_text(size: float) -> None:
    if size > MAX_TEXT:
        raise TemplateLimit(f"a text longer than {MAX_TEXT:,} characters")


def _check_items(count: float) -> None:
    if count > MAX_ITEMS:
        raise TemplateLimit(f"a list longer than {MAX_ITEMS:,} items")


def _check_bits(bits: float) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimit(f"a number larger than {MAX_INT_BITS:,} bits")


_CONTAINERS: tuple[type[Collection[object]], ...] = (
    list, tuple, set, frozenset, dict, type({}.keys()), type({}.values()), type({}.items()))


def _size(value: object, limit: int = MAX_TEXT) -> int:
    """About how long `str(value)` is, counted no further than just past `limit`: what printing,
    comparing or hashing `value` costs. (A short list may hold one long string many times.)"""
    if isinstance(value, str | bytes):
        return len(value)
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            total += len(item) + 2
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, _CONTAINERS):
            total += 2 + 2 * len(item)  # (before the items are stacked: the walk stays bounded)
            if total <= limit:
                stack.extend(item)
                if isinstance(item, dict):
                    stack.extend(item.values())
        elif isinstance(item, Namespace):
            stack.append(item._Namespace__attrs)  # (what its repr shows)
        else:
            total += 16
    return total


def _charged_size(value: object) -> int:
    size = _size(value, _BUDGET.steps * CHARS_PER_STEP)
    _charge(-(-size // CHARS_PER_STEP))  # (rounded up: a walk cut short is over the budget)
    return size


def _made(value: object) -> object:
    """`value`, a new result, once it is within the limits (and paid for)."""
    if isinstance(value, str | bytes):
        _check_text(len(value))
        _charge(len(value) // CHARS_PER_STEP)
    elif isinstance(value, list | dict):
        _check_items(len(value))
        _charge(len(value) // CHARS_PER_STEP)
    return value


def _text(value: object) -> str:
    """`str(value)` for `{{ value }}` and `~`, refused before it is made if it is too long."""
    if isinstance(value, str):
        return value
    size = _size(value)
    _check_text(size)
    _charge(size // CHARS_PER_STEP)
    text = str(value)
    _check_text(len(text))
    return text


def _joined(parts: Iterable[str]) -> str:
    """`"".join(parts)`, stopped as soon as it is too long: the rendered output as it streams,
    the body of a macro, block or `{% set %}` block, `~`, JSON."""
    pieces = []
    total = 0
    for part in parts:
        total += len(part)
        _check_text(total)
        pieces.append(part)
    _charge(total // CHARS_PER_STEP)
    return "".join(pieces)


def _join_text(*values: object) -> str:  # `a ~ b ~ c`
    return _joined([_text(value) for value in values])


def _compared(value: object) -> object:  # an operand of `==`, `<`, `in`... or a dict display's key
    _charged_size(value)
    return value


def _sliced(value: object) -> object:  # `x[a:b]`: slices bypass the sandbox's getitem
    _charge(len(value) // CHARS_PER_STEP if isinstance(value, str | list | tuple) else 1)
    return value


def _amount(value: object) -> float:
    """A width, count or size argument as a number (anything else fails in the call itself)."""
    return value if isinstance(value, int | float) else 0


def _number(digits: str) -> int:
    """`int(digits)`, saturated (no 4,300-digit conversion error, no huge int)."""
    digits = digits.lstrip("0")
    return int(digits or 0) if len(digits) < 10 else 10**10


_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")


def _printf_size(template: str | bytes, values: object) -> int:
    """At most how long `template % values` is: no field prints more than all the values."""
    text = template if isinstance(template, str) else template.decode("latin-1")
    whole = _size(values)
    numbers = values if isinstance(values, tuple) else (values,)
    widest = max((v for v in numbers if isinstance(v, int)), default=0)
    total = len(text)
    for width, precision in _PRINTF_FIELD.findall(text):
        total += whole + sum(widest if n == "*" else _number(n) for n in (width, precision))
        if total > MAX_TEXT:
            break
    return total


def _check_format_call(template: str, args: tuple[object, ...],
                       kwargs: Mapping[str, object]) -> None:
    """Refuse `template.format(*args, **kwargs)` if it could be too long (format_map: args is
    `(mapping,)`); charge its fields, which the sandbox formats in Python (~10 µs each)."""
    whole = _size([args, kwargs])
    widest = max((v for v in (*args, *kwargs.values()) if isinstance(v, int)), default=0)
    total = len(template)
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            digits = re.findall(r"\d+", spec or "")
            total += whole + (widest if "{" in (spec or "") else max(map(_number, digits),
                                                                     default=0))
            _charge(10)
        _check_text(total)


def _replaced_size(text: object, old: object, new: object, count: object = -1) -> int:
    """How long `text.replace(old, new, count)` is, if longer than `text` (else 0)."""
    if (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)) \
            or (isinstance(text, bytes) and isinstance(old, bytes) and isinstance(new, bytes)):
        found = text.count(old)  # type: ignore[arg-type]  # ("ab".count("") is 3)
    else:
        return 0
    if len(new) <= len(old):
        return 0
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * (len(new) - len(old))


def _method_args(owner: object, name: str, args: tuple[object, ...],
                 kwargs: Mapping[str, object]) -> tuple[object, ...]:
    """The arguments of the built-in method `owner.name`, refused when its result would be
    over a limit: `'x'.center(10**9)` would allocate before anything could check."""
    if isinstance(owner, int) and name == "to_bytes":
        _check_text(_amount(args[0] if args else kwargs.get("length", 1)))
    if not isinstance(owner, str | bytes):
        return args
    _charge(len(owner) // CHARS_PER_STEP)
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_text(_amount(args[0] if args else kwargs.get("width")))
    elif name == "expandtabs":
        tabs = owner.count("\t") if isinstance(owner, str) else len(owner)
        _check_text(len(owner) + tabs * _amount(args[0] if args else kwargs.get("tabsize", 8)))
    elif name == "replace" and len(args) >= 2:
        _check_text(_replaced_size(owner, *args))
    elif name == "join" and args:
        items = list(cast(Iterable[object], args[0]))  # (else `join` fails, as it would)
        _check_text(_total_size(items) + len(owner) * (len(items) - 1))
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _check_text(len(owner) * longest)
    return args


def _total_size(items: Iterable[object]) -> int:
    total = 0
    for item in items:
        total += _size(item, MAX_TEXT - total)
        if total > MAX_TEXT:
            break
    return total


# Filters whose arguments can ask for a huge result: each check sees the filter's arguments
# (after the context, if the filter takes one) and returns the value to filter (a `join`
# materialises its input to measure it).

# center, pad
def _check_width(value: object, width: object = 80, *_: object, **__: object) -> object:
    _check_text(_amount(width))
    return value


def _check_indent(value: object, width: object = 4, *_: object, **__: object) -> object:
    text = _text(value)
    unit = len(width) if isinstance(width, str) else _amount(width)
    _check_text(len(text) + (len(text.splitlines()) + 1) * unit)
    return value


def _check_wordwrap(value: object, width: object = 79, break_long_words: object = True,
                    wrapstring: object = None, *_: object, **kwargs: object) -> object:
    text = _text(value)
    wrapstring = _text(kwargs.get("wrapstring", wrapstring) or "\n")
    width = _amount(kwargs.get("width", width))
    paragraphs = len(text.splitlines()) + 1
    lines = paragraphs + (2 * len(text) // width if width >= 1 else 0)  # 2 lines hold > width
    _check_text(len(text) + lines * len(wrapstring))
    return value


def _check_format(value: object, *args: object, **kwargs: object) -> object:
    _check_text(_printf_size(_text(value), kwargs or args))
    return value


def _check_replace(value: object, old: object = "", new: object = "",
                   count: object = None) -> object:
    _check_text(_replaced_size(_text(value), _text(old), _text(new), count))
    return value


def _check_join(value: Iterable[object], d: object = "", *_: object, **__: object) -> object:
    items = list(value)
    _check_text(_total_size(items) + len(_text(d)) * (len(items) - 1))
    return items


def _check_batch(value: object, linecount: object = 1, fill_with: object = None) -> object:
    if fill_with is not None:
        _check_items(_amount(linecount))
    return value


def _check_slice(value: object, slices: object = 1, *_: object) -> object:
    _check_items(_amount(slices))
    return value


def _check_sum(value: Iterable[object], attribute: object = None, start: object = 0) -> object:
    if isinstance(start, int | float):
        return value
    items = list(value)  # adding lists copies each prefix: quadratic
    _charge(len(items) * _size(items) // CHARS_PER_STEP)
    return items


def _check_urlize(value: object, *args: object, **kwargs: object) -> object:
    extra = sum(len(v) for v in (*args, *kwargs.values()) if isinstance(v, str))
    if extra:
        _check_text(len(_text(value).split()) * extra)  # each link repeats `target` and `rel`
    return value


_FILTER_CHECKS: dict[str, Callable[..., object]] = {
    "center": _check_width, "pad": _check_width, "indent": _check_indent,
    "wordwrap": _check_wordwrap, "format": _check_format, "replace": _check_replace,
    "join": _check_join, "batch": _check_batch, "slice": _check_slice, "sum": _check_sum,
    "urlize": _check_urlize,
}
# O(1) whatever their input: they do not pay for its size
_CHEAP_FILTERS = frozenset({"length", "count", "first", "last", "default", "d", "attr",
                            "random", "int", "float", "abs", "round"})
# the tests that compare (or scan) their arguments
_SIZED_TESTS = frozenset({"in", "eq", "equalto", "==", "ne", "!=", "lt", "lessthan", "<", "le",
                          "<=", "gt", "greaterthan", ">", "ge", ">=", "lower", "upper"})


def _bounded_filter(name: str, function: Callable[..., object]) -> Callable[..., object]:
    """`function`, paying for the size of its input, refusing arguments that ask for too much
    and results that are too long. Keeps the filter's `pass_context`-style marker."""
    check = _FILTER_CHECKS.get(name)
    cheap = name in _CHEAP_FILTERS
    lead = 0 if _PassArg.from_obj(function) is None else 1

    @functools.wraps(function)
    def bounded(*args: object, **kwargs: object) -> object:
        if len(args) > lead:
            value = args[lead]
            if check is not None:
                checked = check(value, *args[lead + 1:], **kwargs)
                if checked is not value:
                    args = (*args[:lead], checked, *args[lead + 1:])
            if not cheap:
                _charged_size(value)
        return _made(function(*args, **kwargs))

    return bounded


def _bounded_test(function: Callable[..., object]) -> Callable[..., object]:
    @functools.wraps(function)
    def bounded(*args: object, **kwargs: object) -> object:
        _charged_size(args)
        return function(*args, **kwargs)

    return bounded


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    _check_text(_amount(n) * _amount(max) * 14)  # a word: at most 12 letters, a space, a comma
    return str(generate_lorem_ipsum(n, html, min, max))


def _json_dumps(value: object, **kwargs: Any) -> str:  # `tojson`: an `indent` multiplies its text
    indent = kwargs.get("indent")
    _check_text(len(indent) if isinstance(indent, str) else _amount(indent))
    return _joined(json.JSONEncoder(**kwargs).iterencode(value))


_HELPERS = f"{__name__}._"


class _CodeGenerator(CodeGenerator):
    """Calls this module's helpers (see `_meter`) directly: through the sandbox each would
    cost a safety check, and `_charge` runs once per loop iteration."""

    def visit_Call(self, node: nodes.Call, frame: Frame, forward_caller: bool = False) -> None:
        helper = node.node
        if not (isinstance(helper, nodes.ImportedName)
                and helper.importname.startswith(_HELPERS)):
            return super().visit_Call(node, frame, forward_caller=forward_caller)
        self.visit(helper, frame)
        self.write("(")
        for arg in node.args:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")")
        return None


class _Names(meta.TrackingCodeGenerator):
    """`meta.find_undeclared_variables` without the optimizer, which is cubic in the depth of
    nested expressions (`a|e|e|e|...`) and folds constants it need not fold here."""

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        self.optimizer = None


def _helper(name: str, *args: nodes.Expr, lineno: int) -> nodes.Call:
    return nodes.Call(nodes.ImportedName(f"{__name__}.{name}"), list(args), [], None, None,
                      lineno=lineno)


_REPEATED = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.Block)


def _meter(node: nodes.Node) -> int:
    """Rewrite the tree under `node` so that what the sandbox cannot see is paid for; return
    its size in nodes. A loop iteration, a macro, block or `caller()` call pays its body's
    size; `~` goes through `_join_text`; what compares, hashes or slices pays for the size of
    its operands (a comparison of two long lists is as costly as printing them)."""
    size = 1
    for name, value in node.iter_fields():
        if isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, nodes.Node):
                    size += _meter(item)
                    value[index] = _metered(item)
        elif isinstance(value, nodes.Node):
            size += _meter(value)
            setattr(node, name, _metered(value))
    if isinstance(node, _REPEATED):
        charge = _helper("_charge", nodes.Const(size), lineno=node.lineno)
        node.body.insert(0, nodes.ExprStmt(charge, lineno=node.lineno))
        if isinstance(node, nodes.For) and node.test is not None:  # runs for every item
            charge = _helper("_charge", nodes.Const(size), lineno=node.lineno)
            node.test = nodes.And(charge, node.test, lineno=node.lineno)
    return size


def _metered(node: nodes.Node) -> nodes.Node:
    if isinstance(node, nodes.Concat):
        return _helper("_join_text", *node.nodes, lineno=node.lineno)
    if isinstance(node, nodes.Compare):
        node.expr = _priced(node.expr)
        for operand in node.ops:
            operand.expr = _priced(operand.expr)
    elif isinstance(node, nodes.Pair):
        node.key = _priced(node.key)
    elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        node.node = _helper("_sliced", node.node, lineno=node.lineno)
    return node


def _priced(node: nodes.Expr) -> nodes.Expr:
    return node if isinstance(node, nodes.Const) else _helper("_compared", node,
                                                              lineno=node.lineno)


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox (no unsafe attributes), plus the limits above, through its own hooks."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _CodeGenerator

    def call_binop(self, context: Context, operator: str, left: object, right: object) -> object:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, str | bytes) and isinstance(count, int):
                    _check_text(len(sequence) * count)
                elif isinstance(sequence, list | tuple) and isinstance(count, int):
                    _check_items(len(sequence) * count)
            if isinstance(left, int) and isinstance(right, int):
                _check_bits(left.bit_length() + right.bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _check_bits(right if right > MAX_INT_BITS else math.log2(abs(left)) * right)
        elif operator == "+":
            if isinstance(left, str | bytes) and isinstance(right, str | bytes):
                _check_text(len(left) + len(right))
            elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
                _check_items(len(left) + len(right))
        elif operator == "%" and isinstance(left, str | bytes):
            _check_text(_printf_size(left, right))
        return _made(super().call_binop(context, operator, left, right))

    # (`obj` is whatever a template calls: a built-in method's `__name__` is read below)
    def call(self, context: Context, obj: Any, /, *args: object, **kwargs: object) -> object:
        _charge(1)
        owner = getattr(obj, "__self__", None)
        growing: Sized = ()
        # built-ins run in C, out of the sandbox's sight; `Markup`'s str methods call them
        if isinstance(obj, BuiltinMethodType | type) or isinstance(owner, str | bytes):
            _charged_size(args)
            args = _method_args(owner, obj.__name__, args, kwargs)
            if isinstance(owner, list | dict):
                growing = owner
                if obj.__name__ in ("count", "index", "remove", "sort"):
                    _charged_size(owner)
                if callable(kwargs.get("key")):  # `sort(key=...)` calls it without the sandbox
                    kwargs["key"] = functools.partial(self.call, context, kwargs["key"])
        before = len(growing)
        result = super().call(context, obj, *args, **kwargs)
        if len(growing) > before:
            _check_items(len(growing))
        return _made(result)

    def getitem(self, obj: object, argument: object) -> object:
        if isinstance(argument, tuple):  # a tuple's hash walks all of it, every time
            _charged_size(argument)
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        template = value.__self__
        mapping = value.__name__ == "format_map"

        @functools.wraps(formatter)
        def bounded(*args: object, **kwargs: object) -> str:
            _check_format_call(template, args, {} if mapping else kwargs)
            return str(_made(formatter(*args, **kwargs)))

        return bounded


def environment() -> SandboxedEnvironment:
    env = _Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        cache_size=0,
        finalize=_text,
        optimized=False,  # constant folding is cubic in the depth of nested expressions
    )
    env.concat = _joined  # type: ignore[method-assign]
    env.filters.update(FILTERS)
    env.filters.update({name: _bounded_filter(name, function)
                        for name, function in env.filters.items()})
    env.tests.update({name: _bounded_test(cast(Callable[..., object], env.tests[name]))
                      for name in _SIZED_TESTS})
    env.globals["lipsum"] = _lipsum
    env.policies["json.dumps_function"] = _json_dumps
    return env


ENV = environment()


class TemplateProblem(Exception):
    """A template failed to compile or render; the message is for the user."""


Getter = Callable[[Mapping[str, object]], object]


class _Compiled:
    """What compiling one source gives, shared by every `Template` of that source: its
    names, its direct rendering, and its Jinja code. Nothing in it changes with use (the
    budgets and caches of rendering live in each `Template` and each plan's `Allowance`).

    A template with a direct rendering gets its Jinja code only when a rendering first needs
    it (an error to word, an undefined name under `default`): generating and compiling the
    code is two thirds of compiling, and most prompts and output paths never need it.
    """

    __slots__ = ("_ast", "_jinja", "_lock", "direct", "names")

    def __init__(self, names: tuple[str, ...], direct: tuple[str, tuple[Getter, ...]] | None,
                 ast: nodes.Template) -> None:
        self.names = names
        self.direct = direct
        self._ast: nodes.Template | None = ast
        self._jinja: jinja2.Template | None = None
        self._lock = threading.Lock()
        if direct is None:
            self.jinja()  # (its problems are said when it is compiled, not when it renders)

    def jinja(self) -> jinja2.Template:
        with self._lock:
            if self._jinja is None:
                assert self._ast is not None
                self._jinja = _from_ast(self._ast)
                self._ast = None
            return self._jinja


@dataclass(slots=True)
class Template:
    """A compiled template plus the variables it reads and a render cache keyed by them.

    Templates made only of text, `{{ name }}` and `{{ name | filter(constants) }}` — most
    prompts and output paths — also get a direct rendering (a format string and one getter
    per placeholder) that skips Jinja's per-call set-up and gives the same text; anything
    unusual (an error, an undefined name under `default`) falls back to Jinja proper.
    The cache switches itself off when it does not pay (a template that differs per image).
    Each `Template` has its own cache and counters, even when its compiled code is shared.
    """

    source: str
    names: tuple[str, ...]
    _compiled: _Compiled | None
    _direct: tuple[str, tuple[Getter, ...]] | None = None
    _cache: dict[Hashable, str] | None = field(default_factory=dict)
    _lookups: int = 0
    _hits: int = 0
    _key: Callable[[Mapping[str, object]], Hashable] = field(default=lambda context: ())

    def __post_init__(self) -> None:
        if self.names:
            self._key = operator.itemgetter(*self.names)

    @property
    def is_constant(self) -> bool:
        return self._compiled is None

    def render(self, context: Mapping[str, object], allowance: Allowance | None = None) -> str:
        """The text for `context`. With `allowance` (a plan's), each rendering that is not
        answered from the cache is paid from it."""
        if self._compiled is None:
            return self.source
        cache = self._cache
        if cache is None:
            return self._render(context, allowance)
        try:
            key = self._key(context)
            cached = cache.get(key)
        except (KeyError, TypeError):  # a name not defined here, or an unhashable value
            return self._render(context, allowance)
        self._lookups += 1
        if cached is not None:
            self._hits += 1
            return cached
        if self._lookups == 512 and self._hits < 128:
            self._cache = None  # nearly every image differs: caching only costs
        text = self._render(context, allowance)
        if self._cache is not None:
            cache[key] = text
        return text

    def _render(self, context: Mapping[str, object], allowance: Allowance | None = None) -> str:
        if self._direct is not None:
            fmt, getters = self._direct
            try:
                text = fmt.format(*[get(context) for get in getters])
            except Exception:
                pass  # (an undefined name under `default`, or the real error message)
            else:
                if len(text) <= MAX_TEXT:  # (else Jinja proper reports the limit)
                    if allowance is not None:  # (inline: the hot path of planning)
                        left = allowance.steps + STEPS_PER_RENDERING - len(text) // CHARS_PER_STEP
                        allowance.steps = max(left, 0)
                        if left < 0:
                            raise TemplateProblem(f"template limit: {_OVER_PLAN}")
                    return text
        return self.render_with_jinja(context, allowance)

    def render_with_jinja(self, context: Mapping[str, object],
                          allowance: Allowance | None = None) -> str:
        assert self._compiled is not None
        template = self._compiled.jinja()
        granted = MAX_STEPS if allowance is None else allowance.grant()
        _BUDGET.steps = granted
        _BUDGET.exceeded = _OVER_STEPS if granted == MAX_STEPS else _OVER_PLAN
        try:
            ctx = template.new_context(dict(context))  # not shared: keep the globals (range)
            return _joined(template.root_render_func(ctx))
        except TemplateLimit as error:
            raise TemplateProblem(f"template limit: {error}") from None
        except RecursionError:
            raise TemplateProblem(f"template limit: {_TOO_DEEP}") from None
        except jinja2.UndefinedError as error:
            raise TemplateProblem(_undefined_message(error, context)) from None
        except jinja2.exceptions.SecurityError as error:
            raise TemplateProblem(f"not allowed in a template: {str(error).rstrip('.')}") from None
        except jinja2.TemplateError as error:
            raise TemplateProblem(f"template error: {error}") from None
        except Exception as error:  # any Python error raised while evaluating an expression
            raise TemplateProblem(f"{type(error).__name__}: {error}") from None
        finally:
            if allowance is not None:
                allowance.spend(granted - _BUDGET.steps, granted)


def compile_template(source: str) -> Template:
    """Compile `source`; raise `TemplateProblem` on a syntax error or a template too large."""
    return _template(source, _compile(source))


class Compiler:
    """`compile_template`, compiling each distinct source once: one plan's jobs share their
    output path, their defaults and often their prompts (a recipe of 34,000 jobs compiled the
    same output template 34,000 times). Each call still returns a `Template` of its own, so no
    rendering's cache or counters are shared; a failed source fails the same way each time.
    Held by one plan: what it keeps is freed with the plan."""

    def __init__(self) -> None:
        self._done: dict[str, _Compiled | TemplateProblem | None] = {}

    def __call__(self, source: str) -> Template:
        try:
            compiled = self._done[source]
        except KeyError:
            try:
                compiled = _compile(source)
            except TemplateProblem as problem:
                compiled = problem
            self._done[source] = compiled
        if isinstance(compiled, TemplateProblem):
            raise TemplateProblem(str(compiled))
        return _template(source, compiled)


def _template(source: str, compiled: _Compiled | None) -> Template:
    if compiled is None:
        return Template(source, (), None)
    return Template(source, compiled.names, compiled, compiled.direct)


def _compile(source: str) -> _Compiled | None:
    """The compiled form of `source` (None: it is plain text)."""
    if "{" not in source:
        return None
    if len(source) > MAX_SOURCE:
        raise TemplateProblem(f"template limit: the template is longer than {MAX_SOURCE:,} "
                              "characters")
    with _compile_problems():
        ast = ENV.parse(source)
        names = _Names(ENV)
        names.visit(ast)  # (an unknown filter fails here)
        direct = _direct_rendering(ast)
        _meter(ast)
        return _Compiled(tuple(sorted(names.undeclared_identifiers)), direct, ast)


def _from_ast(ast: nodes.Template) -> jinja2.Template:
    with _compile_problems():
        return ENV.from_string(ast)


@contextlib.contextmanager
def _compile_problems() -> Iterator[None]:
    """Compiling's errors as `TemplateProblem`s, for the user."""
    try:
        yield
    except jinja2.TemplateSyntaxError as error:
        raise TemplateProblem(_syntax_message(error)) from None
    except (RecursionError, SyntaxError):  # Python's limits on nested code
        raise TemplateProblem("template limit: the template is nested too deeply") from None
    except TemplateProblem:
        raise
    except Exception as error:  # e.g. a 5,000-digit number
        raise TemplateProblem(f"template error: {error}") from None


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
    if node.name not in _FILTER_CHECKS:  # no argument can make it amplify: skip the accounting
        function = getattr(function, "__wrapped__", function)
    name = node.node.name
    args = tuple(arg.value for arg in node.args if isinstance(arg, nodes.Const))
    return lambda context: str(function(context[name], *args))


def _undefined_message(error: jinja2.UndefinedError, context: Mapping[str, object]) -> str:
    message = str(error.message or error)
    found = re.match(r"'([^']+)' is undefined", message)
    if found:
        name = found.group(1)
        return f"undefined variable {name!r}" + did_you_mean(name, list(context))
    return message
