"""A small, safe evaluator for SVAMP-style equations such as `( 10.0 - ( 6.0 + 3.0 ) )`.

Grammar (a recursive-descent parser; never Python `eval`):

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := ("+" | "-") unary | atom
    atom   := number | "(" expr ")"
    number := digits ["." [digits]] | "." digits    (no exponents; "1,000"-style groups allowed)

The Unicode signs `×`, `÷`, `−` are read as `*`, `/`, `-`. Everything is
bounded so that no input can take long or blow up: the text length, the number of
tokens, the nesting depth, the digits of a number, and the magnitude of every
intermediate value. Any invalid input raises `EquationError` (a ValueError).
"""

from __future__ import annotations

import math
import re

MAX_CHARS = 512          # longest equation text accepted
MAX_DEPTH = 32           # deepest nesting of parentheses / unary signs
MAX_DIGITS = 30          # longest number literal
MAX_MAGNITUDE = 1e15     # largest |value| of any literal or intermediate result

_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+", re.ASCII)
_SIGNS = {"×": "*", "÷": "/", "−": "-", "–": "-"}


class EquationError(ValueError):
    """The text is not a valid, bounded arithmetic expression (or divides by zero)."""


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = _SIGNS.get(text[i], text[i])
        if ch in " \t\n\r":
            i += 1
        elif ch in "+-*/()":
            out.append(ch)
            i += 1
        elif (match := _NUMBER.match(text, i)) is not None:
            digits = match.group(0).replace(",", "")
            if len(digits) > MAX_DIGITS:
                raise EquationError(f"number longer than {MAX_DIGITS} digits at column {i + 1}")
            out.append(digits)
            i = match.end()
        else:
            raise EquationError(f"unexpected character {ch!r} at column {i + 1}")
    return out


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise EquationError("unexpected end of equation")
        self.pos += 1
        return token

    def expr(self, depth: int) -> float:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            value = _checked(value + self.term(depth) if op == "+" else value - self.term(depth))
        return value

    def term(self, depth: int) -> float:
        value = self.unary(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.unary(depth)
            if op == "/" and right == 0:
                raise EquationError("division by zero")
            value = _checked(value * right if op == "*" else value / right)
        return value

    def unary(self, depth: int) -> float:
        if depth > MAX_DEPTH:
            raise EquationError(f"nested deeper than {MAX_DEPTH} levels")
        if self.peek() in ("+", "-"):
            sign = -1.0 if self.take() == "-" else 1.0
            return sign * self.unary(depth + 1)
        return self.atom(depth)

    def atom(self, depth: int) -> float:
        token = self.take()
        if token == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise EquationError("expected ')'")
            return value
        if token in "+-*/)":
            raise EquationError(f"unexpected {token!r}")
        return _checked(float(token))


def _checked(value: float) -> float:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise EquationError(f"value out of range (|x| > {MAX_MAGNITUDE:g})")
    return value


def evaluate_equation(text: str) -> float:
    """The value of an arithmetic expression, e.g. `( 84.0 / 2.0 )` -> 42.0.

    Raises EquationError on anything else: other characters or names, unbalanced
    parentheses, division by zero, or inputs beyond the size, depth and magnitude bounds.
    """
    if not isinstance(text, str):
        raise EquationError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise EquationError(f"equation longer than {MAX_CHARS} characters")
    tokens = _tokens(text)
    if not tokens:
        raise EquationError("empty equation")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.peek() is not None:
        raise EquationError(f"unexpected {parser.peek()!r} after the expression")
    return value


def equations_match(predicted: str, gold: str, rel_tol: float = 1e-4) -> bool:
    """True when both evaluate and agree within `rel_tol` (SVAMP accuracy); an
    equation that does not evaluate is wrong."""
    try:
        return math.isclose(evaluate_equation(predicted), evaluate_equation(gold), rel_tol=rel_tol, abs_tol=1e-9)
    except EquationError:
        return False
