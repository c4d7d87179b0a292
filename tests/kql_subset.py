"""A tiny evaluator for the KQL the workbook and the alerts use (infra/app/queries/*.kql), over rows.

Kusto cannot run here, so tests/test_workbook.py runs each query over recorded Application Insights
rows (``timestamp``, ``message``, ``severityLevel``, ``customDimensions``) with this. It knows only
the subset the queries use, and refuses anything else (a query that grows past it fails the test
rather than being half-understood):

- tabular operators ``where``, ``extend``, ``project``, ``summarize ... [by ...]``, ``order by``,
  ``render`` (recorded, not drawn);
- scalar functions ``tostring``, ``tolower``, ``toint``, ``todouble``, ``todatetime``, ``bin``,
  ``datetime_diff("second", a, b)``; aggregations ``count()``, ``countif(predicate)``, ``dcount``,
  ``min``, ``max``, ``percentile``, ``arg_max(col, *)``;
- operators ``==`` ``!=`` (case-sensitive), ``startswith`` (case-insensitive, as KQL's),
  ``in (...)``, ``< <= > >=``, ``and``, ``or``, ``+ - * /``; dynamic property access
  ``customDimensions.name``, which :attr:`Query.dimensions` records.

KQL rules it keeps (learn.microsoft.com/kusto/query): ``order by`` sorts descending unless told
``asc``; ``tostring(null)`` is ``""``; comparisons with null are false; aggregations skip nulls;
``summarize`` without ``by`` gives one row even over no rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

Row = dict[str, Any]

_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<span>\d+(?:\.\d+)?[smhd]\b)|(?P<num>\d+(?:\.\d+)?)'
    r"|(?P<op>==|!=|<=|>=|[<>()+\-*/,.=|])|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)
_SPANS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_AGGREGATES = {"count", "countif", "dcount", "min", "max", "percentile", "arg_max"}


class Unsupported(ValueError):
    """The query uses KQL beyond this subset."""


def tokenize(text: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise Unsupported(f"cannot read {text[pos : pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup
        value = match.group(kind or "")
        if kind == "str":
            tokens.append(("str", value[1:-1].replace('\\"', '"')))
        elif kind == "span":
            tokens.append(("span", timedelta(**{_SPANS[value[-1]]: float(value[:-1])})))
        elif kind == "num":
            tokens.append(("num", float(value) if "." in value else int(value)))
        elif kind == "op":
            tokens.append(("op", value))
        else:
            tokens.append(("name", value))
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return tokens


# --------------------------------------------------------------------------------------- expressions


@dataclass
class Expr:
    kind: str  # lit, col, dim, call, bin, star
    value: Any = None
    args: list[Expr] = field(default_factory=list)


class Parser:
    def __init__(self, tokens: list[tuple[str, Any]], dimensions: set[str]) -> None:
        self.tokens, self.i, self.dimensions = tokens, 0, dimensions

    def peek(self, offset: int = 0) -> tuple[str, Any] | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def take(self, kind: str | None = None, value: Any = None) -> tuple[str, Any]:
        token = self.peek()
        if token is None or (kind and token[0] != kind) or (value is not None and token[1] != value):
            raise Unsupported(f"expected {value or kind}, found {token}")
        self.i += 1
        return token

    def at(self, kind: str, value: Any = None) -> bool:
        token = self.peek()
        return token is not None and token[0] == kind and (value is None or token[1] == value)

    def done(self) -> bool:
        return self.i >= len(self.tokens)

    def expression(self) -> Expr:
        left = self.conjunction()
        while self.at("name", "or"):
            self.take()
            left = Expr("bin", "or", [left, self.conjunction()])
        return left

    def conjunction(self) -> Expr:
        left = self.comparison()
        while self.at("name", "and"):
            self.take()
            left = Expr("bin", "and", [left, self.comparison()])
        return left

    def comparison(self) -> Expr:
        left = self.additive()
        if self.at("op") and self.peek() is not None and self.peek()[1] in ("==", "!=", "<", "<=", ">", ">="):  # type: ignore[index]
            op = self.take()[1]
            return Expr("bin", op, [left, self.additive()])
        if self.at("name", "startswith"):
            self.take()
            return Expr("bin", "startswith", [left, self.additive()])
        if self.at("name", "in"):
            self.take()
            self.take("op", "(")
            items = [self.additive()]
            while self.at("op", ","):
                self.take()
                items.append(self.additive())
            self.take("op", ")")
            return Expr("bin", "in", [left, *items])
        return left

    def additive(self) -> Expr:
        left = self.term()
        while self.at("op", "+") or self.at("op", "-"):
            op = self.take()[1]
            left = Expr("bin", op, [left, self.term()])
        return left

    def term(self) -> Expr:
        left = self.atom()
        while self.at("op", "*") or self.at("op", "/"):
            op = self.take()[1]
            left = Expr("bin", op, [left, self.atom()])
        return left

    def atom(self) -> Expr:
        kind, value = self.take()
        if kind in ("str", "num", "span"):
            return Expr("lit", value)
        if kind == "op" and value == "(":
            inner = self.expression()
            self.take("op", ")")
            return inner
        if kind == "op" and value == "*":
            return Expr("star")
        if kind != "name":
            raise Unsupported(f"unexpected {value!r}")
        if value in ("true", "false"):
            return Expr("lit", value == "true")
        if self.at("op", "("):
            self.take()
            args: list[Expr] = []
            if not self.at("op", ")"):
                args.append(self.expression())
                while self.at("op", ","):
                    self.take()
                    args.append(self.expression())
            self.take("op", ")")
            if value not in _FUNCTIONS and value not in _AGGREGATES:
                raise Unsupported(f"function {value}()")
            return Expr("call", value, args)
        if self.at("op", "."):
            if value != "customDimensions":
                raise Unsupported(f"property access on {value}")
            self.take()
            name = self.take("name")[1]
            self.dimensions.add(name)
            return Expr("dim", name)
        return Expr("col", value)


def _to_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _to_number(value: Any, kind: Callable[[Any], Any]) -> Any:
    if value is None or value == "":
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def _to_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _bin(value: Any, span: timedelta) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + span * math.floor((value - epoch) / span)


def _datetime_diff(unit: str, a: Any, b: Any) -> int | None:
    if unit != "second":
        raise Unsupported(f"datetime_diff unit {unit!r}")
    if not isinstance(a, datetime) or not isinstance(b, datetime):
        return None
    return int((a - b).total_seconds())


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "tostring": _to_string,
    "tolower": lambda v: _to_string(v).lower(),
    "toint": lambda v: _to_number(v, int),
    "todouble": lambda v: _to_number(v, float),
    "todatetime": _to_datetime,
    "bin": _bin,
    "datetime_diff": _datetime_diff,
}


def evaluate(expr: Expr, row: Row) -> Any:
    if expr.kind == "lit":
        return expr.value
    if expr.kind == "col":
        if expr.value not in row:
            raise KeyError(f"no column {expr.value!r} (columns: {sorted(row)})")
        return row[expr.value]
    if expr.kind == "dim":
        dims = row.get("customDimensions")
        return dims.get(expr.value) if isinstance(dims, dict) else None
    if expr.kind == "call":
        if expr.value in _AGGREGATES:
            raise Unsupported(f"{expr.value}() outside summarize")
        return _FUNCTIONS[expr.value](*(evaluate(a, row) for a in expr.args))
    if expr.kind == "bin":
        op = expr.value
        if op == "and":
            return bool(evaluate(expr.args[0], row)) and bool(evaluate(expr.args[1], row))
        if op == "or":
            return bool(evaluate(expr.args[0], row)) or bool(evaluate(expr.args[1], row))
        left = evaluate(expr.args[0], row)
        if op == "in":
            return left in [evaluate(a, row) for a in expr.args[1:]]
        right = evaluate(expr.args[1], row)
        if op == "startswith":
            return _to_string(left).lower().startswith(_to_string(right).lower())
        if left is None or right is None:
            return None if op in "+-*/" else False
        if op == "==":
            return left == right
        if op == "!=":
            return left != right
        comparisons = (
            {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}
            if op
            in (
                "<",
                "<=",
                ">",
                ">=",
            )
            else {}
        )
        if comparisons:
            return comparisons[op]
        if op == "/":
            return None if right == 0 else left / right
        return {"+": left + right, "-": left - right, "*": left * right}[op]
    raise Unsupported(expr.kind)


# ----------------------------------------------------------------------------------- tabular layer


def _assignments(parser: Parser) -> list[tuple[str | None, Expr]]:
    """``name = expr, expr, ...`` (a name is None when the column is named after the expression)."""
    items: list[tuple[str | None, Expr]] = []
    while True:
        name = None
        if parser.at("name") and parser.peek(1) == ("op", "="):
            name = parser.take()[1]
            parser.take("op", "=")
        items.append((name, parser.expression()))
        if not parser.at("op", ","):
            return items
        parser.take()


def _default_name(expr: Expr) -> str:
    if expr.kind == "col":
        return str(expr.value)
    if expr.kind == "dim":
        return f"customDimensions_{expr.value}"
    if expr.kind == "call" and expr.value == "bin" and expr.args and expr.args[0].kind == "col":
        return str(expr.args[0].value)
    if expr.kind == "call" and expr.value == "count":
        return "count_"
    if expr.kind == "call" and expr.args:
        return f"{expr.value}_{_default_name(expr.args[0])}"
    raise Unsupported("a column needs a name")


def _aggregate(expr: Expr, rows: list[Row]) -> Any:
    name = expr.value
    if name == "count":
        return len(rows)
    if name == "countif":  # the rows for which the predicate is true (null counts as false)
        return sum(1 for r in rows if evaluate(expr.args[0], r) is True)
    values = [evaluate(expr.args[0], r) for r in rows]
    present = [v for v in values if v is not None and v != ""]
    if name == "dcount":
        return len(set(present))
    if name in ("min", "max"):
        return (min if name == "min" else max)(present) if present else None
    if name == "percentile":
        p = evaluate(expr.args[1], {})
        if not present:
            return None
        ordered = sorted(present)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]
    raise Unsupported(f"{name}()")


@dataclass
class Query:
    """A parsed query: its table, its steps, and what it reads."""

    text: str
    table: str = ""
    steps: list[tuple[str, Any]] = field(default_factory=list)
    dimensions: set[str] = field(default_factory=set)
    render: str | None = None

    @classmethod
    def parse(cls, text: str) -> Query:
        query = cls(text)
        segments = _split_pipes(text)
        head = tokenize(segments[0])
        if len(head) != 1 or head[0][0] != "name":
            raise Unsupported(f"a query starts with a table name, not {segments[0]!r}")
        query.table = head[0][1]
        for segment in segments[1:]:
            parser = Parser(tokenize(segment), query.dimensions)
            word = parser.take("name")[1]
            if word == "where":
                query.steps.append(("where", parser.expression()))
            elif word in ("extend", "project"):
                query.steps.append((word, _assignments(parser)))
            elif word == "summarize":
                aggregates: list[tuple[str | None, Expr]] = []
                while True:
                    name = None
                    if parser.at("name") and parser.peek(1) == ("op", "="):
                        name = parser.take()[1]
                        parser.take("op", "=")
                    aggregates.append((name, parser.expression()))
                    if not parser.at("op", ","):
                        break
                    parser.take()
                groups: list[tuple[str | None, Expr]] = []
                if parser.at("name", "by"):
                    parser.take()
                    groups = _assignments(parser)
                query.steps.append(("summarize", (aggregates, groups)))
            elif word == "order":
                parser.take("name", "by")
                keys: list[tuple[str, bool]] = []
                while True:
                    column = parser.take("name")[1]
                    ascending = False
                    if parser.at("name", "asc") or parser.at("name", "desc"):
                        ascending = parser.take()[1] == "asc"
                    keys.append((column, ascending))
                    if not parser.at("op", ","):
                        break
                    parser.take()
                query.steps.append(("order", keys))
            elif word == "render":
                query.render = parser.take("name")[1]
            else:
                raise Unsupported(f"operator {word}")
            if not parser.done():
                raise Unsupported(f"left over in {segment!r}: {parser.tokens[parser.i :]}")
        return query

    def run(self, tables: dict[str, Iterable[Row]]) -> list[Row]:
        rows = [dict(r) for r in tables[self.table]]
        for kind, arg in self.steps:
            if kind == "where":
                rows = [r for r in rows if evaluate(arg, r) is True]
            elif kind == "extend":
                for r in rows:
                    for name, expr in arg:
                        r[name or _default_name(expr)] = evaluate(expr, r)
            elif kind == "project":
                rows = [{(n or _default_name(e)): evaluate(e, r) for n, e in arg} for r in rows]
            elif kind == "summarize":
                rows = _summarize(rows, *arg)
            elif kind == "order":
                for column, ascending in reversed(arg):
                    present = [r for r in rows if r.get(column) is not None]
                    missing = [r for r in rows if r.get(column) is None]
                    present.sort(key=lambda r, c=column: r[c], reverse=not ascending)
                    rows = present + missing
        return rows


def _summarize(
    rows: list[Row], aggregates: list[tuple[str | None, Expr]], groups: list[tuple[str | None, Expr]]
) -> list[Row]:
    buckets: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        key = tuple(evaluate(e, r) for _, e in groups)
        buckets.setdefault(key, []).append(r)
    if not groups and not buckets:
        buckets[()] = []
    out: list[Row] = []
    for key, members in buckets.items():
        result: Row = {(n or _default_name(e)): k for (n, e), k in zip(groups, key, strict=True)}
        for name, expr in aggregates:
            if expr.kind != "call" or expr.value not in _AGGREGATES:
                raise Unsupported("summarize takes aggregations")
            if expr.value == "arg_max":
                by, star = expr.args
                if star.kind != "star":
                    raise Unsupported("arg_max(col, *) only")
                best = max(members, key=lambda r: evaluate(by, r))
                result.update({k: v for k, v in best.items() if k not in result})
                continue
            result[name or _default_name(expr)] = _aggregate(expr, members)
        out.append(result)
    return out


def _split_pipes(text: str) -> list[str]:
    parts, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(text):
        if c == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
        elif not quoted and depth == 0 and c == "|":
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]
