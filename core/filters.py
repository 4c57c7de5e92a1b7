"""Metadata filters: one small expression grammar, parsed and validated here, never passed through as raw SQL or
raw Milvus expressions.

    label in ("Blue_Jay", "Cardinal") and shop = "north"
    not (year < 2024 or shop != 'south')

Grammar (keywords `and`, `or`, `not`, `in` in any case; `not` binds tighter than `and`, `and` than `or`)::

    expr       := and_expr ("or" and_expr)*
    and_expr   := unary ("and" unary)*
    unary      := "not" unary | "(" expr ")" | comparison
    comparison := FIELD OP literal | FIELD ["not"] "in" "(" literal ("," literal)* [","] ")"
    OP         := "=" | "==" | "!=" | "<" | "<=" | ">" | ">="
    literal    := a "double" or 'single' quoted string (escapes \\\\, \\" and \\' only; no control characters
                  but tab, newline and CR) | a number (-1, 2.5, 1e3)
    FIELD      := a name [A-Za-z_][A-Za-z0-9_]* or any other name in `backticks` (no quotes or control characters)

The fields are `label` and the index's user metadata columns; any other name is refused with the list of fields.

Values and comparisons. Metadata values are text (they come from a CSV or an upload). A comparison with a
**string** compares the value's text (`=`, `!=`, and `<`... in code-point order, which is UTF-8 byte order, as
SQLite's BINARY collation). A comparison with a **number** compares numerically: the value counts as a number
when its text is a JSON number (`-?digits[.digits][e[+-]digits]`, surrounding blanks allowed: "9.5", "10", "1e3";
not "10 EUR", "", ".5" or "0x10"), so `price < 10` matches the items whose price reads as a number below 10.
Logic is two-valued: a comparison with a missing field, or a numeric comparison with a value that is not a number,
is false (so `price != 3` does not match an item without a price), and `not` turns false into true (`not price = 3`
matches it).

`Filter.to_sqlite` (the faiss backend's metadata) and `Filter.to_milvus` (the Milvus backend) translate the parsed
tree; `Filter.matches` is the plain-Python reference both are tested against. Values always travel as bound
parameters (SQLite) or escaped literals (Milvus); identifiers are validated and quoted.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

from asymsearch.core.errors import UserError

MAX_FILTER_CHARS = 4096  # longer filters are refused (the wire carries at most this)
MAX_DEPTH = 32  # nesting of parentheses and `not`
MAX_COMPARISONS = 256  # comparisons and `in` tests in one filter
MAX_VALUES = 1024  # literals in one filter (all `in` lists together)
KEYWORDS = ("and", "or", "not", "in")
OPS = ("=", "!=", "<", "<=", ">", ">=")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_JSON_BLANKS = " \t\n\r"


class FilterError(UserError):
    """A filter that does not parse or names an unknown field; `position` is the 0-based character offset."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


def as_number(value: Any) -> float | None:
    """The number a metadata value counts as in a numeric comparison (see the module docstring), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip(_JSON_BLANKS)
    return float(text) if _JSON_NUMBER.fullmatch(text) else None


def numeric_metadata(record: Mapping[str, Any]) -> dict[str, float]:
    """{field: number} for the values of `record` that count as numbers (for a backend that stores them apart, as
    `to_milvus`'s default layout does); non-finite results are left out."""
    out = {}
    for key, value in record.items():
        number = as_number(value)
        if number is not None and math.isfinite(number):
            out[str(key)] = number
    return out


def _as_text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


# -- the tree ----------------------------------------------------------------------------------------------------

Literal = Union[str, float]


@dataclasses.dataclass(frozen=True)
class Compare:
    field: str
    op: str  # one of OPS
    value: Literal


@dataclasses.dataclass(frozen=True)
class In:
    field: str
    values: tuple[Literal, ...]
    negated: bool = False


@dataclasses.dataclass(frozen=True)
class And:
    parts: tuple["Node", ...]


@dataclasses.dataclass(frozen=True)
class Or:
    parts: tuple["Node", ...]


@dataclasses.dataclass(frozen=True)
class Not:
    part: "Node"


Node = Union[Compare, In, And, Or, Not]

_PY_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _literal_text(value: Literal) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _number_text(value)


def _number_text(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _field_text(name: str) -> str:
    return name if _NAME.fullmatch(name) and name.lower() not in KEYWORDS else f"`{name}`"


class Filter:
    """A parsed, validated filter. `str(f)` is its canonical text (equal filters have equal texts: a cache or
    batching key); `fields` the fields it names."""

    def __init__(self, root: Node, text: str) -> None:
        self.root = root
        self.text = text  # as the user wrote it
        self.canonical = _canonical(root)
        self.fields = tuple(sorted(_fields(root)))

    def __str__(self) -> str:
        return self.canonical

    def __repr__(self) -> str:
        return f"Filter({self.canonical!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and other.canonical == self.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    # -- the reference ----------------------------------------------------------------------------------------

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether `record` ({"label": ..., column: value, ...}; a missing key is a missing value) matches."""
        return _match(self.root, record)

    # -- SQLite -----------------------------------------------------------------------------------------------

    def to_sqlite(self, column_of: Callable[[str], Any] | Mapping[str, Any] | None = None
                  ) -> tuple[str, list[Any]]:
        """(WHERE clause, parameters) for SQLite. `column_of(field)` (or a mapping) gives a field's column: a
        plain column name (validated and quoted here), or an (sql expression, parameters) pair the caller vouches
        for. Default: `label` is the column "label" and every other field is `json_extract("extra", ?)` with the
        field's JSON path bound as a parameter (the layout of index/metadata.py). Every value is a parameter."""
        if column_of is None:
            lookup: Callable[[str], Any] = _default_sqlite_column
        elif isinstance(column_of, Mapping):
            lookup = column_of.__getitem__
        else:
            lookup = column_of
        params: list[Any] = []
        sql = _sql(self.root, lambda f: _sqlite_column(lookup(f), f), params)
        return sql, params

    # -- Milvus -----------------------------------------------------------------------------------------------

    def to_milvus(self, column_of: Callable[[str, str], str] | None = None) -> str:
        """The Milvus boolean expression. `column_of(field, kind)` gives the expression of a field's value as
        text (kind "text") or as a number (kind "number"). The default layout (`default_milvus_column`): the
        VARCHAR field `label`; the other metadata as dynamic fields holding text (`$meta["shop"]`); and, for
        numeric comparisons, a dynamic field `asym_num` holding an object of the values that count as numbers
        (`numeric_metadata` of the row, label included: `$meta["asym_num"]["price"]`), since Milvus does not compare
        text with numbers. Strings are escaped (`milvus_string`); every test on a JSON key is guarded with `exists`
        so that a missing key is false and `not` true, as in `matches` (Milvus alone drops a missing key from
        `not (shop == "x")` too). `in` on a JSON key becomes `==` tests joined by `or` (Milvus takes `in` on a
        plain field only)."""
        return _milvus(self.root, column_of or default_milvus_column)


MILVUS_NUMBERS = "asym_num"  # the dynamic field holding a row's numeric values in the default Milvus layout


def default_milvus_column(field: str, kind: str) -> str:
    if kind == "text":
        return "label" if field == "label" else f"$meta[{milvus_string(field)}]"
    return f"$meta[{milvus_string(MILVUS_NUMBERS)}][{milvus_string(field)}]"


_MILVUS_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def milvus_string(value: str) -> str:
    """A Milvus string literal of `value`: double-quoted, with backslash, quote, newline, CR and tab escaped (the
    escapes Milvus's parser takes; it has no \\u or \\x). Other control characters are refused (`ValueError`);
    the filter grammar never lets one into a string."""
    bad = [c for c in value if _is_control(c) and c not in _MILVUS_ESCAPES]
    if bad:
        raise ValueError(f"a Milvus string cannot hold the control character U+{ord(bad[0]):04X}")
    return '"' + "".join(_MILVUS_ESCAPES.get(c, c) for c in value) + '"'


def _is_control(c: str) -> bool:
    return ord(c) < 0x20 or ord(c) == 0x7F


def quote_identifier(name: str) -> str:
    """An SQLite identifier, double-quoted; names with control characters are refused."""
    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError(f"not a usable column name: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _default_sqlite_column(field: str) -> Any:
    if field == "label":
        return "label"
    return 'json_extract("extra", ?)', [f'$."{field}"']


def _sqlite_column(column: Any, field: str) -> tuple[str, list[Any]]:
    if isinstance(column, str):
        return quote_identifier(column), []
    sql, params = column
    return str(sql), list(params)


def _canonical(node: Node) -> str:
    if isinstance(node, Compare):
        return f"{_field_text(node.field)} {node.op} {_literal_text(node.value)}"
    if isinstance(node, In):
        return (f"{_field_text(node.field)} {'not in' if node.negated else 'in'} "
                f"({', '.join(_literal_text(v) for v in node.values)})")
    if isinstance(node, Not):
        return f"not ({_canonical(node.part)})"
    word = " and " if isinstance(node, And) else " or "
    return word.join(f"({_canonical(p)})" for p in node.parts)


def _fields(node: Node) -> set[str]:
    if isinstance(node, (Compare, In)):
        return {node.field}
    if isinstance(node, Not):
        return _fields(node.part)
    return set().union(*(_fields(p) for p in node.parts))


def _test(value: Any, op: str, literal: Literal) -> bool:
    if isinstance(literal, str):
        text = _as_text(value)
        return text is not None and _PY_OPS[op](text, literal)
    number = as_number(value)
    return number is not None and _PY_OPS[op](number, literal)


def _match(node: Node, record: Mapping[str, Any]) -> bool:
    if isinstance(node, Compare):
        return _test(record.get(node.field), node.op, node.value)
    if isinstance(node, In):
        value = record.get(node.field)
        found = any(_test(value, "=", v) for v in node.values)
        return not found if node.negated else found
    if isinstance(node, Not):
        return not _match(node.part, record)
    if isinstance(node, And):
        return all(_match(p, record) for p in node.parts)
    return any(_match(p, record) for p in node.parts)


def _sql_number(column: str, params_of_column: list[Any], params: list[Any]) -> str:
    """The column's value as REAL when it counts as a number, else NULL (the same rule as `as_number`; json_valid
    with one argument accepts canonical JSON only). The column is read once, in a subquery; the nested CASEs never
    call json_type on invalid JSON."""
    params.extend(params_of_column)
    return ("(SELECT CASE WHEN typeof(v) IN ('integer', 'real') THEN CAST(v AS REAL) WHEN typeof(v) = 'text' THEN "
            "(CASE WHEN json_valid(v) THEN (CASE WHEN json_type(v) IN ('integer', 'real') THEN CAST(v AS REAL) END) "
            f"END) END FROM (SELECT {column} AS v))")


def _sql_value(column: tuple[str, list[Any]], literal: Literal, params: list[Any]) -> str:
    sql, own = column
    if isinstance(literal, str):
        params.extend(own)
        return f"CAST({sql} AS TEXT)"
    return _sql_number(sql, own, params)


def _sql(node: Node, column: Callable[[str], tuple[str, list[Any]]], params: list[Any]) -> str:
    # every test is COALESCEd to 0/1 so that NULL (missing, not a number) is false and NOT is two-valued
    if isinstance(node, Compare):
        value = _sql_value(column(node.field), node.value, params)
        params.append(node.value)
        return f"COALESCE(({value} {node.op} ?), 0)"
    if isinstance(node, In):
        tests = []
        texts = [v for v in node.values if isinstance(v, str)]
        numbers = [v for v in node.values if not isinstance(v, str)]
        for group in (texts, numbers):
            if group:
                value = _sql_value(column(node.field), group[0], params)
                params.extend(group)
                tests.append(f"COALESCE(({value} IN ({', '.join('?' * len(group))})), 0)")
        found = " OR ".join(tests)
        return f"(NOT ({found}))" if node.negated else f"({found})"
    if isinstance(node, Not):
        return f"(NOT {_sql(node.part, column, params)})"
    word = " AND " if isinstance(node, And) else " OR "
    return "(" + word.join(_sql(p, column, params) for p in node.parts) + ")"


_MILVUS_OPS = {"=": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _milvus_literal(value: Literal) -> str:
    if isinstance(value, str):
        return milvus_string(value)
    return _number_text(value)


def _milvus_guard(expr: str) -> str:
    return f"exists {expr}" if expr.endswith("]") else ""


def _milvus(node: Node, column: Callable[[str, str], str]) -> str:
    if isinstance(node, Compare):
        expr = column(node.field, "text" if isinstance(node.value, str) else "number")
        test = f"{expr} {_MILVUS_OPS[node.op]} {_milvus_literal(node.value)}"
        guard = _milvus_guard(expr)
        return f"({guard} and {test})" if guard else f"({test})"
    if isinstance(node, In):
        tests = []
        for kind, group in (("text", [v for v in node.values if isinstance(v, str)]),
                            ("number", [v for v in node.values if not isinstance(v, str)])):
            if group:
                expr = column(node.field, kind)
                guard = _milvus_guard(expr)
                if guard:
                    tests.append(f"({guard} and ({' or '.join(f'{expr} == {_milvus_literal(v)}' for v in group)}))")
                else:
                    tests.append(f"({expr} in [{', '.join(_milvus_literal(v) for v in group)}])")
        found = " or ".join(tests)
        return f"(not ({found}))" if node.negated else f"({found})"
    if isinstance(node, Not):
        return f"(not {_milvus(node.part, column)})"
    word = " and " if isinstance(node, And) else " or "
    return "(" + word.join(_milvus(p, column) for p in node.parts) + ")"


# -- the parser --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Token:
    kind: str  # "name", "keyword", "string", "number", "op", "(", ")", ",", "end"
    value: Any
    pos: int

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the filter"
        if self.kind == "string":
            return "a string"
        if self.kind == "number":
            return f"the number {self.value!r}"
        return f"{self.value!r}"


def _fail(message: str, pos: int) -> FilterError:
    return FilterError(f"invalid filter at position {pos}: {message}", pos)


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch in "(),":
            out.append(_Token(ch, ch, i))
            i += 1
        elif ch in "=!<>":
            two = text[i:i + 2]
            if two in ("==", "!=", "<=", ">="):
                out.append(_Token("op", "=" if two == "==" else two, i))
                i += 2
            elif ch == "!":
                raise _fail("'!' must be followed by '=' (use 'not' to negate)", i)
            else:
                out.append(_Token("op", ch, i))
                i += 1
        elif ch in "\"'":
            start, i, chars = i, i + 1, []
            while True:
                if i >= n:
                    raise _fail(f"unterminated string (opened with {ch} here)", start)
                c = text[i]
                if c == "\\":
                    if i + 1 >= n or text[i + 1] not in "\\\"'":
                        raise _fail("a backslash in a string must be followed by \\, \" or '", i)
                    chars.append(text[i + 1])
                    i += 2
                elif c == ch:
                    i += 1
                    break
                elif _is_control(c) and c not in "\t\n\r":
                    raise _fail(f"control character U+{ord(c):04X} in a string (tab, newline and CR only)", i)
                else:
                    chars.append(c)
                    i += 1
            out.append(_Token("string", "".join(chars), start))
        elif ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise _fail("unterminated `field name`", i)
            name = text[i + 1:end]
            if not name or any(ord(c) < 0x20 or ord(c) == 0x7F or c in "\"'\\" for c in name):
                raise _fail("a `field name` must be non-empty, without quotes, backslashes or control characters", i)
            out.append(_Token("name", name, i))
            i = end + 1
        elif ch.isdigit() or ch in "-." and i + 1 < n and (text[i + 1].isdigit() or text[i + 1] == "."):
            m = _NUMBER.match(text, i)
            if not m:
                raise _fail(f"malformed number {text[i:i + 12]!r}", i)
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] in "_."):
                raise _fail(f"malformed number {text[i:end + 1]!r}", i)
            value = float(m.group())
            if not math.isfinite(value):
                raise _fail(f"the number {m.group()[:20]!r} is out of range", i)
            out.append(_Token("number", value, i))
            i = end
        elif ch.isascii() and (ch.isalpha() or ch == "_"):
            m = _NAME.match(text, i)
            word = m.group()
            kind = "keyword" if word.lower() in KEYWORDS else "name"
            out.append(_Token(kind, word.lower() if kind == "keyword" else word, i))
            i = m.end()
        else:
            shown = ch if ch.isprintable() else f"U+{ord(ch):04X}"
            raise _fail(f"unexpected character {shown!r} (a filter holds field names, quoted strings, numbers, "
                        f"= != < <= > >=, in, and, or, not and parentheses)", i)
    out.append(_Token("end", None, n))
    return out


class _Parser:
    def __init__(self, text: str, fields: Sequence[str]) -> None:
        self.tokens = _tokens(text)
        self.at = 0
        self.fields = list(dict.fromkeys(fields))
        self.known = set(self.fields)
        self.comparisons = 0
        self.values = 0

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        tok = self.tokens[self.at]
        self.at += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok.kind == "keyword" and tok.value == word:
            self.at += 1
            return True
        return False

    def expect(self, kind: str, what: str) -> _Token:
        tok = self.take()
        if tok.kind != kind:
            raise _fail(f"expected {what}, found {tok.describe()}", tok.pos)
        return tok

    def parse(self) -> Node:
        node = self.expr(0)
        tok = self.peek()
        if tok.kind != "end":
            raise _fail(f"expected 'and', 'or' or the end of the filter, found {tok.describe()}", tok.pos)
        return node

    def expr(self, depth: int) -> Node:
        parts = [self.and_expr(depth)]
        while self.keyword("or"):
            parts.append(self.and_expr(depth))
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_expr(self, depth: int) -> Node:
        parts = [self.unary(depth)]
        while self.keyword("and"):
            parts.append(self.unary(depth))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def unary(self, depth: int) -> Node:
        tok = self.peek()
        if depth >= MAX_DEPTH:
            raise _fail(f"nested more than {MAX_DEPTH} deep (parentheses and 'not')", tok.pos)
        if self.keyword("not"):
            return Not(self.unary(depth + 1))
        if tok.kind == "(":
            self.take()
            node = self.expr(depth + 1)
            self.expect(")", "')'")
            return node
        return self.comparison()

    def literal(self) -> Literal:
        tok = self.take()
        if tok.kind not in ("string", "number"):
            raise _fail(f"expected a quoted string or a number, found {tok.describe()}", tok.pos)
        self.values += 1
        if self.values > MAX_VALUES:
            raise _fail(f"more than {MAX_VALUES} values in one filter", tok.pos)
        return tok.value

    def comparison(self) -> Node:
        tok = self.take()
        if tok.kind != "name":
            raise _fail(f"expected a field name, 'not' or '(', found {tok.describe()}", tok.pos)
        if tok.value not in self.known:
            raise FilterError(f"invalid filter at position {tok.pos}: unknown field {tok.value!r}; the fields are: "
                              f"{', '.join(_field_text(f) for f in self.fields) or '(none)'}", tok.pos)
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            raise _fail(f"more than {MAX_COMPARISONS} comparisons in one filter", tok.pos)
        negated = self.keyword("not")
        if negated or self.peek().kind == "keyword" and self.peek().value == "in":
            if not self.keyword("in"):
                bad = self.peek()
                raise _fail(f"expected 'in' after 'not', found {bad.describe()}", bad.pos)
            self.expect("(", "'(' after 'in'")
            values = [self.literal()]
            while self.peek().kind == ",":
                self.take()
                if self.peek().kind == ")":
                    break
                values.append(self.literal())
            self.expect(")", "',' or ')'")
            return In(tok.value, tuple(values), negated)
        op = self.take()
        if op.kind != "op":
            raise _fail(f"expected a comparison (= != < <= > >=) or 'in' after {tok.value!r}, found "
                        f"{op.describe()}", op.pos)
        return Compare(tok.value, op.value, self.literal())


def parse_filter(text: str, fields: Sequence[str]) -> Filter | None:
    """The parsed filter, or None for an empty or blank text. `FilterError` (a `UserError`) naming the position
    for a malformed filter, and listing `fields` for an unknown field."""
    if text is None or not str(text).strip():
        return None
    text = str(text)
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"invalid filter at position {MAX_FILTER_CHARS}: longer than {MAX_FILTER_CHARS} "
                          f"characters ({len(text)})", MAX_FILTER_CHARS)
    return Filter(_Parser(text, fields).parse(), text)


__all__ = ["Filter", "FilterError", "MAX_FILTER_CHARS", "MILVUS_NUMBERS", "as_number", "default_milvus_column",
           "milvus_string",
           "numeric_metadata", "parse_filter", "quote_identifier"]
