"""Label and field selectors, parsed and matched as kube-apiserver does (pure functions)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from kubemcsa_testing.errors import StatusError, bad_request

Matcher = Callable[[Mapping[str, str]], bool]

_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
_KEY_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" + _KEY_NAME + "$")
_VALUE_RE = re.compile("^" + _VALUE + "$")
_SET = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*(?:(notin|in)\s*\(([^()]*)\))?\s*$")
_CMP = re.compile(r"^\s*([^\s!=(),]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")

SUPPORTED_FIELDS = ("metadata.name", "metadata.namespace")


def _split_requirements(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` parentheses."""
    parts, depth, current = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    if depth != 0:
        raise bad_request(f"unable to parse requirement: unbalanced parentheses in {selector!r}")
    return parts


def _check_key(key: str) -> None:
    if len(key.rpartition("/")[2]) > 63 or not _KEY.match(key):
        raise bad_request(f"unable to parse requirement: invalid label key {key!r}")


def _check_value(value: str) -> None:
    if len(value) > 63 or not _VALUE_RE.match(value):
        raise bad_request(f"unable to parse requirement: invalid label value {value!r}")


def parse_label_selector(selector: str | None) -> Matcher:
    """A matcher for a label selector string (`a=b,c!=d,e in (f,g),!h,i`); 400 BadRequest if malformed."""
    if not selector or not selector.strip():
        return lambda labels: True
    checks: list[Matcher] = []
    for part in _split_requirements(selector):
        if not part.strip():
            raise bad_request(f"unable to parse requirement: empty requirement in {selector!r}")
        checks.append(_parse_requirement(part))
    return lambda labels: all(check(labels) for check in checks)


def _parse_requirement(part: str) -> Matcher:
    m = _CMP.match(part)
    if m:
        key, op, value = m.group(1), m.group(2), m.group(3)
        _check_key(key)
        _check_value(value)
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    m = _SET.match(part)
    if not m:
        raise bad_request(f"unable to parse requirement: {part.strip()!r} is not a valid label requirement")
    negated, key, op, raw_values = m.group(1), m.group(2), m.group(3), m.group(4)
    _check_key(key)
    if op:
        if negated:
            raise bad_request(f"unable to parse requirement: {part.strip()!r}")
        values = {v.strip() for v in raw_values.split(",")}
        for v in values:
            _check_value(v)
        if op == "in":
            return lambda labels: key in labels and labels[key] in values
        return lambda labels: key not in labels or labels[key] not in values
    if negated:
        return lambda labels: key not in labels
    return lambda labels: key in labels


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def parse_field_selector(
    selector: str | None, extra_fields: tuple[str, ...] = ()
) -> Callable[[Mapping[str, Any]], bool]:
    """A matcher on objects for `metadata.name=x,metadata.namespace!=y` (plus the resource's `extra_fields`).

    Other fields are 400 BadRequest, as kube answers.
    """
    if not selector or not selector.strip():
        return lambda obj: True
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for part in selector.split(","):
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f"invalid selector: {selector!r}; can't understand {part!r}")
        field_name, op, value = m.groups()
        if field_name not in SUPPORTED_FIELDS and field_name not in extra_fields:
            raise bad_request(
                f'"{field_name}" is not a known field selector: only "metadata.name", "metadata.namespace"'
            )
        if op == "!=":
            checks.append(lambda obj, f=field_name, v=value: _field_value(obj, f) != v)
        else:
            checks.append(lambda obj, f=field_name, v=value: _field_value(obj, f) == v)
    return lambda obj: all(check(obj) for check in checks)


def field_selector_pins(selector: str | None) -> dict[str, str]:
    """`metadata.name=x` terms of a field selector, used to narrow a list without scanning the store."""
    pins: dict[str, str] = {}
    for part in (selector or "").split(","):
        m = re.match(r"^\s*metadata\.(name|namespace)\s*==?\s*(.*?)\s*$", part)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def label_selector_from_dict(selector: Mapping[str, Any] | None) -> Matcher:
    """A matcher for a structured LabelSelector (matchLabels + matchExpressions), as in webhook configurations.

    Raises StatusError (400) for an unknown operator. None or {} match everything.
    """
    if not selector:
        return lambda labels: True
    checks: list[Matcher] = []
    for key, value in (selector.get("matchLabels") or {}).items():
        checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), set(expr.get("values") or [])
        if op == "In":
            checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
        elif op == "NotIn":
            checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif op == "Exists":
            checks.append(lambda labels, k=key: k in labels)
        elif op == "DoesNotExist":
            checks.append(lambda labels, k=key: k not in labels)
        else:
            raise StatusError(400, "BadRequest", f"{op!r} is not a valid label selector operator")
    return lambda labels: all(check(labels) for check in checks)
