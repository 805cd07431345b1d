"""The in-memory server's CEL evaluator: CEL's semantics on JSON data, and loud failure outside its subset."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubemcsa_testing.cel import CelError, compile_expression


def cel(expression: str, **activation: Any) -> Any:
    return compile_expression(expression, activation.keys()).evaluate(activation)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3),
        ("-7 / 2", -3),
        ("-7 % 3", -1),
        ("7.0 / 2.0", 3.5),
        ("3u + 4u", 7),
        ("'a' + \"b\"", "ab"),
        ("'\\u00e9\\n'", "é\n"),
        ("r'\\n'", "\\n"),
        ("[1, 2] + [3]", [1, 2, 3]),
        ("{'a': 1}['a']", 1),
        ("1 < 2 && 2 <= 2 && 3 > 2 && 3 >= 4 == false", True),
        ("1 == 1.0", True),
        ("'a' in ['a', 'b'] && !('c' in {'a': 1})", True),
        ("true ? 'y' : 'n'", "y"),
        ("null == null", True),
        ("size('abc') + 'ab'.size() + size([1]) + size({'a': 1})", 7),
        ("int('12') + int(2.9) + int(3u)", 17),
        ("string(12) + string(true)", "12true"),
        ("double(1) == 1.0 && uint(3) == 3u && bool('true')", True),
        ("'hello'.startsWith('he') && 'hello'.endsWith('lo') && 'hello'.contains('ell')", True),
        ("'abc123'.matches('^[a-z]+[0-9]+$')", True),
        ("[1, 2, 3].all(x, x > 0) && [1, 2, 3].exists(x, x == 2) && [1, 2, 3].exists_one(x, x > 2)", True),
        ("[1, 2, 3].map(x, x * 2)", [2, 4, 6]),
        ("[1, 2, 3].filter(x, x % 2 == 1)", [1, 3]),
        ("{'a': 1, 'b': 2}.all(k, k in ['a', 'b'])", True),
        ("[[1], [2]].all(x, x.all(y, y > 0))", True),
    ],
)
def test_expressions(expression: str, expected: Any) -> None:
    assert cel(expression) == expected


def test_objects_fields_and_has() -> None:
    pod = {"metadata": {"name": "p", "annotations": {"a.io/x": "1"}, "labels": None}}
    assert cel("object.metadata.name", object=pod) == "p"
    assert cel("has(object.metadata.annotations)", object=pod) is True
    assert cel("has(object.metadata.labels)", object=pod) is False  # null is absent in kube's JSON
    assert cel("has(object.spec)", object=pod) is False
    assert cel("'a.io/x' in object.metadata.annotations", object=pod) is True
    assert cel("object.metadata.annotations['a.io/x'] == '1'", object=pod) is True


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("object.spec.containers", "no such key: spec"),
        ("object.metadata.name.size() > 'a'", "no such overload"),
        ("1 / 0", "division by zero"),
        ("[1][3]", "index out of bounds"),
        ("1 + 'a'", "no such overload"),
        ("1 + 1u", "no such overload"),
        ("!1", "no such overload"),
        ("9223372036854775807 + 1", "overflow"),
        ("oldObject.x", "no such key: x"),
        ("has(oldObject.x)", "invalid type for field selection"),
    ],
)
def test_evaluation_errors(expression: str, error: str) -> None:
    with pytest.raises(CelError, match=error):
        cel(expression, object={"metadata": {"name": "p"}}, oldObject=None)


def test_and_or_absorb_errors_when_the_other_side_decides() -> None:
    empty: dict[str, Any] = {}
    assert cel("object.x == 1 || true", object=empty) is True
    assert cel("true || object.x == 1", object=empty) is True
    assert cel("object.x == 1 && false", object=empty) is False
    with pytest.raises(CelError, match="no such key"):
        cel("object.x == 1 && true", object=empty)
    assert cel("[1, 0].exists(x, 1 / x == 1)") is True


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("", "must not be empty"),
        ("1 +", "Syntax error"),
        ("(1", "Syntax error"),
        ("object object", "Syntax error"),
        ("1 $ 2", "token recognition"),
        ("unknown", "undeclared reference to 'unknown'"),
        ("frobnicate(1)", "not supported"),
        ("'a'.lowerAscii()", "not supported"),
        ("[1].map(x, x > 0, x)", "not supported"),
        ("has(1)", "invalid argument to has"),
        ("'\\q'", "invalid escape"),
        ("if", "reserved"),
    ],
)
def test_what_it_cannot_compile_fails_loudly(expression: str, error: str) -> None:
    with pytest.raises(CelError, match=error):
        compile_expression(expression, ["object"])


@given(st.text(max_size=40))
def test_any_text_compiles_or_raises_cel_error(text: str) -> None:
    try:
        program = compile_expression(text, ["object"])
    except CelError:
        return
    try:
        program.evaluate({"object": {"a": [1, "b", None]}})
    except CelError:
        pass
