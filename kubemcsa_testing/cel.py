"""A small evaluator for the Common Expression Language (CEL), as kube-apiserver uses it on JSON-like data.

For the in-memory API server: MutatingWebhookConfiguration `matchConditions`, and any other place that evaluates
CEL over objects (a CRD's `x-kubernetes-validations` rules, for instance). It covers the part of CEL such
expressions use, with CEL's semantics: literals (int, uint, double, string, bool, null, lists, maps), field
selection and indexing, `has()`, the operators `! - * / % + < <= > >= == != in && || ?:` (`&&` and `||`
absorb an error when the other side decides), the functions and methods `size`, `int`, `uint`, `double`,
`string`, `bool`, `startsWith`, `endsWith`, `contains`, `matches`, and the macros `all`, `exists`,
`exists_one`, `map`, `filter`.

Anything outside that subset fails loudly when compiled (CelError), so that an expression is never silently
taken to match: extend this module, faithfully to CEL, when a manifest needs more.

    program = compile_expression("has(object.metadata.annotations)", variables={"object"})
    program.evaluate({"object": pod})  -> True / False / any value; CelError on an evaluation error
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CelError", "Program", "compile_expression"]


class CelError(Exception):
    """A compilation error (the expression is not in the supported subset) or an evaluation error."""


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+\.\d*(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)|\.\d+(?:[eE][+-]?\d+)?|\d+)[uU]?)
  | (?P<string>[rR]?(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>&&|\|\||==|!=|<=|>=|[-+*/%!<>?:.,\[\]{}()])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"true": True, "false": False, "null": None}
_RESERVED = {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let", "loop",
             "package", "namespace", "return", "var", "void", "while"}  # fmt: skip
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f",
            "v": "\v", "?": "?", "`": "`"}  # fmt: skip
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_FUNCTIONS = {"size", "int", "uint", "double", "string", "bool"}
_METHODS = {"size", "startsWith", "endsWith", "contains", "matches"}


class _UInt(int):
    """A CEL uint (Python has one int type)."""


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokens(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if match is None:
            raise CelError(f"Syntax error: token recognition error at: '{expression[position]}' (column {position})")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), position))
        position = match.end()
    tokens.append(_Token("end", "", position))
    return tokens


def _unquote(text: str) -> str:
    raw = text[0] in "rR"
    body = text[2:-1] if raw else text[1:-1]
    if raw:
        return body
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char != "\\":
            out.append(char)
            index += 1
            continue
        code = body[index + 1]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            index += 2
        elif code in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[code]
            out.append(chr(int(body[index + 2 : index + 2 + width], 16)))
            index += 2 + width
        else:
            raise CelError(f"Syntax error: invalid escape sequence '\\{code}'")
    return "".join(out)


# The syntax tree: tuples whose first item says what they are.
Node = tuple[Any, ...]


class _Parser:
    def __init__(self, expression: str, variables: set[str]) -> None:
        self.tokens = _tokens(expression)
        self.index = 0
        self.variables = variables
        self.bound: list[str] = []  # macro variables in scope

    def peek(self, text: str | None = None) -> bool:
        token = self.tokens[self.index]
        return token.kind != "end" and (text is None or (token.kind == "op" and token.text == text))

    def take(self, text: str | None = None) -> _Token:
        token = self.tokens[self.index]
        if text is not None and not (token.kind == "op" and token.text == text):
            shown = token.text or "<EOF>"
            raise CelError(f"Syntax error: mismatched input '{shown}' expecting '{text}' (column {token.position})")
        self.index += 1
        return token

    def parse(self) -> Node:
        node = self.expression()
        token = self.tokens[self.index]
        if token.kind != "end":
            raise CelError(f"Syntax error: extraneous input '{token.text}' (column {token.position})")
        return node

    def expression(self) -> Node:
        condition = self.binary(0)
        if self.peek("?"):
            self.take("?")
            then = self.binary(0)
            self.take(":")
            return ("?:", condition, then, self.expression())
        return condition

    _LEVELS = (("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">=", "in"), ("+", "-"), ("*", "/", "%"))

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while True:
            token = self.tokens[self.index]
            operator = token.text if token.kind in ("op", "name") else None
            if operator not in self._LEVELS[level]:
                return node
            self.index += 1
            node = (operator, node, self.binary(level + 1))

    def unary(self) -> Node:
        if self.peek("!"):
            self.take("!")
            return ("!", self.unary())
        if self.peek("-"):
            self.take("-")
            return ("neg", self.unary())
        return self.member()

    def member(self) -> Node:
        node = self.primary()
        while True:
            if self.peek("."):
                self.take(".")
                name = self.name()
                node = self.method(node, name) if self.peek("(") else ("select", node, name)
            elif self.peek("["):
                self.take("[")
                index = self.expression()
                self.take("]")
                node = ("index", node, index)
            else:
                return node

    def name(self) -> str:
        token = self.take()
        if token.kind != "name":
            raise CelError(f"Syntax error: expected a field name at column {token.position}")
        return token.text

    def arguments(self) -> list[Node]:
        self.take("(")
        args: list[Node] = []
        while not self.peek(")"):
            args.append(self.expression())
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return args

    def method(self, target: Node, name: str) -> Node:
        if name in _MACROS:
            self.take("(")
            variable = self.name()
            self.take(",")
            self.bound.append(variable)
            try:
                body = self.expression()
                if name == "map" and self.peek(","):
                    raise CelError("the three-argument map() macro is not supported by this CEL evaluator")
            finally:
                self.bound.pop()
            self.take(")")
            return ("macro", name, target, variable, body)
        if name not in _METHODS:
            raise CelError(f"undeclared reference to '{name}' (in container ''): not supported by this CEL evaluator")
        return ("call", name, [target, *self.arguments()])

    def primary(self) -> Node:
        token = self.take()
        if token.kind == "number":
            return ("literal", _number(token.text))
        if token.kind == "string":
            return ("literal", _unquote(token.text))
        if token.kind == "name":
            if token.text in _KEYWORDS:
                return ("literal", _KEYWORDS[token.text])
            if token.text in _RESERVED:
                raise CelError(f"Syntax error: reserved identifier: {token.text}")
            if self.peek("("):
                if token.text == "has":
                    self.take("(")
                    argument = self.member()
                    self.take(")")
                    if argument[0] != "select":
                        raise CelError("invalid argument to has() macro")
                    return ("has", argument[1], argument[2])
                if token.text not in _FUNCTIONS:
                    raise CelError(
                        f"undeclared reference to '{token.text}' (in container ''): not supported by this CEL evaluator"
                    )
                return ("call", token.text, self.arguments())
            if token.text not in self.variables and token.text not in self.bound:
                raise CelError(f"undeclared reference to '{token.text}' (in container '')")
            return ("var", token.text)
        if token.kind == "op" and token.text == "(":
            node = self.expression()
            self.take(")")
            return node
        if token.kind == "op" and token.text == "[":
            items: list[Node] = []
            while not self.peek("]"):
                items.append(self.expression())
                if not self.peek("]"):
                    self.take(",")
            self.take("]")
            return ("list", items)
        if token.kind == "op" and token.text == "{":
            entries: list[tuple[Node, Node]] = []
            while not self.peek("}"):
                key = self.expression()
                self.take(":")
                entries.append((key, self.expression()))
                if not self.peek("}"):
                    self.take(",")
            self.take("}")
            return ("map", entries)
        shown = token.text or "<EOF>"
        raise CelError(f"Syntax error: mismatched input '{shown}' (column {token.position})")


def _number(text: str) -> Any:
    unsigned = text[-1] in "uU"
    digits = text[:-1] if unsigned else text
    if digits.lower().startswith("0x"):
        value: Any = int(digits, 16)
    elif any(c in digits for c in ".eE"):
        if unsigned:
            raise CelError(f"Syntax error: invalid uint literal {text}")
        return float(digits)
    else:
        value = int(digits)
    return _UInt(value) if unsigned else value


# --- evaluation ---------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null_type"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, _UInt):
        return "uint"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "map"
    return type(value).__name__


def _no_overload(operator: str, *values: Any) -> CelError:
    return CelError(f"no such overload: {operator}({', '.join(_type_name(v) for v in values)})")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return a == b
    both_lists = isinstance(a, list | tuple) and isinstance(b, list | tuple)
    both_maps = isinstance(a, Mapping) and isinstance(b, Mapping)
    if type(a) is not type(b) and not (both_lists or both_maps):
        return False
    if both_lists:
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if both_maps:
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _compare(operator: str, a: Any, b: Any) -> bool:
    comparable = (_is_number(a) and _is_number(b)) or (type(a) is type(b) and isinstance(a, str | bytes | bool))
    if not comparable:
        raise _no_overload(operator, a, b)
    if operator == "<":
        return bool(a < b)
    if operator == "<=":
        return bool(a <= b)
    if operator == ">":
        return bool(a > b)
    return bool(a >= b)


def _arithmetic(operator: str, a: Any, b: Any) -> Any:
    if operator == "+" and type(a) is type(b) and isinstance(a, str | bytes):
        return a + b
    if operator == "+" and isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return [*a, *b]
    same_kind = (isinstance(a, _UInt) == isinstance(b, _UInt)) and (isinstance(a, float) == isinstance(b, float))
    if not (_is_number(a) and _is_number(b) and same_kind):
        raise _no_overload(operator, a, b)
    if operator in ("/", "%") and b == 0 and not isinstance(a, float):
        raise CelError("division by zero" if operator == "/" else "modulus by zero")
    if operator == "+":
        result = a + b
    elif operator == "-":
        result = a - b
    elif operator == "*":
        result = a * b
    elif operator == "/":
        result = a / b if isinstance(a, float) else abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
    else:
        result = a - b * (abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1))
    if isinstance(a, _UInt):
        if result < 0:
            raise CelError("unsigned integer overflow")
        return _UInt(result)
    if isinstance(result, int) and not -(2**63) <= result < 2**63:
        raise CelError("integer overflow")
    return result


def _size(value: Any) -> int:
    if isinstance(value, str | bytes | list | tuple | Mapping):
        return len(value)
    raise _no_overload("size", value)


def _convert(function: str, value: Any) -> Any:
    try:
        if function == "int" and (_is_number(value) or isinstance(value, str)):
            return int(float(value)) if isinstance(value, float) else int(value)
        if function == "uint" and (_is_number(value) or isinstance(value, str)):
            result = int(value)
            if result < 0:
                raise CelError("unsigned integer overflow")
            return _UInt(result)
        if function == "double" and (_is_number(value) or isinstance(value, str)):
            return float(value)
        if function == "string" and isinstance(value, str | int | float | bool) and value is not None:
            if isinstance(value, bool):
                return "true" if value else "false"
            return str(value)
        if function == "bool" and isinstance(value, bool | str):
            if isinstance(value, bool):
                return value
            if value in ("true", "True", "TRUE", "t", "1"):
                return True
            if value in ("false", "False", "FALSE", "f", "0"):
                return False
    except ValueError as exc:
        raise CelError(f"{function}() conversion error: {exc}") from exc
    raise _no_overload(function, value)


def _string_method(name: str, target: Any, argument: Any) -> bool:
    if not (isinstance(target, str) and isinstance(argument, str)):
        raise _no_overload(name, target, argument)
    if name == "startsWith":
        return target.startswith(argument)
    if name == "endsWith":
        return target.endswith(argument)
    if name == "contains":
        return argument in target
    try:  # matches: RE2 syntax, close enough to Python's for the patterns manifests use
        return re.search(argument, target) is not None
    except re.error as exc:
        raise CelError(f"invalid regular expression {argument!r}: {exc}") from exc


class _Evaluator:
    def __init__(self, activation: Mapping[str, Any]) -> None:
        self.scopes: list[Mapping[str, Any]] = [activation]

    def lookup(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise CelError(f"no such attribute: {name}")

    def eval(self, node: Node) -> Any:
        kind = node[0]
        if kind == "literal":
            return node[1]
        if kind == "var":
            return self.lookup(node[1])
        if kind == "select":
            target = self.eval(node[1])
            if not isinstance(target, Mapping):
                raise CelError(f"no such key: {node[2]}" if target is None else f"type '{_type_name(target)}' does "
                               f"not support field selection")  # fmt: skip
            if node[2] not in target:
                raise CelError(f"no such key: {node[2]}")
            return target[node[2]]
        if kind == "has":
            target = self.eval(node[1])
            if not isinstance(target, Mapping):
                raise CelError(f"invalid type for field selection: {_type_name(target)}")
            # kube's objects are JSON: a field that is present with null is as good as absent.
            return node[2] in target and target[node[2]] is not None
        if kind == "index":
            target, index = self.eval(node[1]), self.eval(node[2])
            if isinstance(target, Mapping):
                if index not in target:
                    raise CelError(f"no such key: {index}")
                return target[index]
            if isinstance(target, list | tuple) and _is_number(index) and not isinstance(index, float):
                if not 0 <= index < len(target):
                    raise CelError(f"index out of bounds: {index}")
                return target[index]
            raise _no_overload("_[_]", target, index)
        if kind == "list":
            return [self.eval(item) for item in node[1]]
        if kind == "map":
            return {self.eval(key): self.eval(value) for key, value in node[1]}
        if kind == "!":
            value = self.eval(node[1])
            if not isinstance(value, bool):
                raise _no_overload("!_", value)
            return not value
        if kind == "neg":
            value = self.eval(node[1])
            if not _is_number(value) or isinstance(value, _UInt):
                raise _no_overload("-_", value)
            return -value
        if kind in ("&&", "||"):
            return self.logical(kind, node[1], node[2])
        if kind == "?:":
            condition = self.eval(node[1])
            if not isinstance(condition, bool):
                raise _no_overload("_?_:_", condition)
            return self.eval(node[2] if condition else node[3])
        if kind in ("==", "!="):
            equal = _equal(self.eval(node[1]), self.eval(node[2]))
            return equal if kind == "==" else not equal
        if kind in ("<", "<=", ">", ">="):
            return _compare(kind, self.eval(node[1]), self.eval(node[2]))
        if kind == "in":
            element, container = self.eval(node[1]), self.eval(node[2])
            if isinstance(container, Mapping):
                return element in container
            if isinstance(container, list | tuple):
                return any(_equal(element, item) for item in container)
            raise _no_overload("@in", element, container)
        if kind in ("+", "-", "*", "/", "%"):
            return _arithmetic(kind, self.eval(node[1]), self.eval(node[2]))
        if kind == "call":
            return self.call(node[1], [self.eval(argument) for argument in node[2]])
        if kind == "macro":
            return self.macro(node[1], self.eval(node[2]), node[3], node[4])
        raise CelError(f"unsupported expression node {kind}")

    def logical(self, operator: str, left: Node, right: Node) -> bool:
        # CEL's commutative && and ||: an error on one side is absorbed when the other side decides.
        deciding = operator == "||"
        error: CelError | None = None
        for side in (left, right):
            try:
                value = self.eval(side)
            except CelError as exc:
                error = error or exc
                continue
            if not isinstance(value, bool):
                error = error or _no_overload(f"_{operator}_", value)
                continue
            if value is deciding:
                return deciding
        if error is not None:
            raise error
        return not deciding

    def call(self, name: str, args: list[Any]) -> Any:
        if name == "size" and len(args) == 1:
            return _size(args[0])
        if name in ("int", "uint", "double", "string", "bool") and len(args) == 1:
            return _convert(name, args[0])
        if name in ("startsWith", "endsWith", "contains", "matches") and len(args) == 2:
            return _string_method(name, args[0], args[1])
        raise CelError(f"found no matching overload for '{name}' applied to {len(args)} arguments")

    def macro(self, name: str, target: Any, variable: str, body: Node) -> Any:
        if isinstance(target, Mapping):
            items: Iterable[Any] = list(target.keys())
        elif isinstance(target, list | tuple):
            items = target
        else:
            raise _no_overload(name, target)

        def each(item: Any) -> Callable[[], Any]:
            return lambda: self.with_variable(variable, item, body)

        if name in ("all", "exists"):
            node_op = "&&" if name == "all" else "||"
            result, error = name == "all", None
            for item in items:
                try:
                    value = each(item)()
                except CelError as exc:
                    error = error or exc
                    continue
                if not isinstance(value, bool):
                    error = error or _no_overload(f"_{node_op}_", value)
                elif value != result:
                    return value
            if error is not None:
                raise error
            return result
        if name == "exists_one":
            count = 0
            for item in items:
                value = each(item)()
                if not isinstance(value, bool):
                    raise _no_overload("exists_one", value)
                count += value
            return count == 1
        if name == "map":
            return [each(item)() for item in items]
        kept = []
        for item in items:
            value = each(item)()
            if not isinstance(value, bool):
                raise _no_overload("filter", value)
            if value:
                kept.append(item)
        return kept

    def with_variable(self, name: str, value: Any, body: Node) -> Any:
        self.scopes.append({name: value})
        try:
            return self.eval(body)
        finally:
            self.scopes.pop()


@dataclass(frozen=True)
class Program:
    """A compiled expression; `evaluate(activation)` gives its value or raises CelError."""

    expression: str
    tree: Node

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        try:
            return _Evaluator(activation).eval(self.tree)
        except RecursionError as exc:
            raise CelError("expression too deeply nested") from exc


def compile_expression(expression: str, variables: Iterable[str]) -> Program:
    """Parse `expression` with these variables declared; CelError if it is not valid CEL in the supported subset."""
    if not isinstance(expression, str) or not expression.strip():
        raise CelError("expression must not be empty")
    try:
        return Program(expression, _Parser(expression, set(variables)).parse())
    except RecursionError as exc:
        raise CelError("expression too deeply nested") from exc
    except IndexError as exc:
        raise CelError("Syntax error: unexpected end of input") from exc
