"""The `filter` of Compute Engine v1 list calls, as the API reference documents it (every list request's `filter`
field, e.g. compute_v1.ListImagesRequest):

- "Most Compute resources support two types of filter expressions: expressions that support regular expressions
  and expressions that follow API improvement proposal AIP-160. These two types of filter expressions cannot be
  mixed in one request."
- AIP-160 form: "the field name, an operator, and the value ... The value must be a string, a number, or a
  boolean. The operator must be either =, !=, >, <, <=, >= or :." "The :* comparison can be used to test whether a
  key has been defined", e.g. `labels.owner:*`; nested fields such as `scheduling.automaticRestart = false`.
- "To filter on multiple expressions, provide each separate expression within parentheses. For example:
  (scheduling.automaticRestart = true) (cpuPlatform = "Intel Skylake"). By default, each expression is an AND
  expression. However, you can include AND and OR expressions explicitly."
- Regular-expression form: `fieldname eq 'value'` / `fieldname ne 'value'`, the value an RE2 expression matched
  against the whole field, e.g. `name ne example-instance`, `name eq '(?!default).*'` ... several in parentheses.

So a filter of several expressions without parentheses (`labels.a=x AND labels.b=y`) is refused with 400, as is
one that mixes `=` and `eq`. What is not documented (the exact order of precedence of mixed AND/OR) is evaluated
left to right here.
"""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

AIP_OPS = ("!=", ">=", "<=", "=", ">", "<", ":")
REGEX_OPS = ("eq", "ne")
_TERM = re.compile(
    r'^\s*([A-Za-z][\w.\-]*)\s*(!=|>=|<=|=|>|<|:|\beq\b|\bne\b)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[^\s()]+)\s*$'
)


class FilterError(ValueError):
    """The filter is not in a documented form; the API answers 400 invalid."""


def _split_groups(text: str) -> list[str]:
    """'(a = b) AND (c = d)' -> ['a = b', 'AND', 'c = d']; a bare single expression -> [it]."""
    text = text.strip()
    if not text:
        return []
    if not text.startswith("("):
        if re.search(r"\)\s*\(|\s(AND|OR)\s", text):
            raise FilterError(text)
        return [text]
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            end = text.find(ch, i + 1)
            if end < 0:
                raise FilterError(text)
            i = end
        elif ch == "(":
            if depth == 0:
                between = text[start:i].strip()
                if between:
                    if between not in ("AND", "OR"):
                        raise FilterError(text)
                    parts.append(between)
                start = i + 1
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FilterError(text)
            if depth == 0:
                parts.append(("(", text[start:i].strip()))
                start = i + 1
        i += 1
    if depth or text[start:].strip():
        raise FilterError(text)
    return parts


def parse_filter(text: str) -> list[tuple[str, tuple[str, str, str]]]:
    """[(joiner, (field, op, value)), ...], joiner "AND" or "OR" (the first is "AND"); FilterError when the form
    is not a documented one."""
    pieces = _split_groups(text)
    terms: list[tuple[str, tuple[str, str, str]]] = []
    joiner = "AND"
    for piece in pieces:
        if piece in ("AND", "OR"):
            joiner = piece
            continue
        expression = piece[1] if isinstance(piece, tuple) else piece
        match = _TERM.match(expression)
        if not match:
            raise FilterError(text)
        value = match.group(3)
        if value[0] == '"':
            value = json.loads(value)
        elif value[0] == "'":
            value = value[1:-1]
        terms.append((joiner, (match.group(1), match.group(2), value)))
        joiner = "AND"
    kinds = {"regex" if op in REGEX_OPS else "aip" for _, (_, op, _) in terms}
    if len(kinds) > 1:
        raise FilterError(text)
    return terms


def field_value(resource: dict, path: str) -> Any:
    if path.startswith("labels."):
        return resource.get("labels", {}).get(path[len("labels."):])
    value: Any = resource
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _term_matches(resource: dict, field: str, op: str, want: str) -> bool:
    value = field_value(resource, field)
    text = _text(value)
    if op == ":":
        return value is not None if want == "*" else fnmatch.fnmatchcase(text, want)
    if op in ("eq", "ne"):
        hit = value is not None and re.fullmatch(want, text) is not None
        return hit if op == "eq" else not hit
    if op in ("=", "!="):
        hit = value is not None and text == want
        return hit if op == "=" else not hit
    if value is None:
        return False
    try:
        left, right = float(text), float(want)
    except ValueError:
        left, right = text, want  # type: ignore[assignment]
    return {">": left > right, "<": left < right, ">=": left >= right, "<=": left <= right}[op]


def matches(resource: dict, terms: list[tuple[str, tuple[str, str, str]]]) -> bool:
    result = True
    for i, (joiner, term) in enumerate(terms):
        hit = _term_matches(resource, *term)
        result = hit if i == 0 else (result or hit) if joiner == "OR" else (result and hit)
    return result
