"""The safe equation evaluator: valid SVAMP equations, and everything it must refuse."""

import math
import time

import pytest

from lmdistill.reasoning.arithmetic import MAX_CHARS, MAX_DEPTH, EquationError, equations_match, evaluate_equation


@pytest.mark.parametrize("text, value", [
    ("( 84.0 / 2.0 )", 42.0),                      # gold SVAMP layout
    ("(84 / 2)", 42.0),                            # the teacher's layout
    ("( 10.0 - ( 6.0 + 3.0 ) )", 1.0),
    ("( ( 17.0 + 15.0 ) + 2.0 )", 34.0),
    ("2 + 3 * 4", 14.0),                           # precedence
    ("(2 + 3) * 4", 20.0),
    ("10 - 4 - 3", 3.0),                           # left associativity
    ("48 / 4 / 2", 6.0),
    ("-(3 - 5)", 2.0),                             # unary minus
    ("1,000 + 2.5", 1002.5),                       # thousands groups
    ("2 × 3 ÷ 4 − 1", 0.5),                        # Unicode signs
    (".5 + 3.", 3.5),
])
def test_valid_equations(text, value):
    assert evaluate_equation(text) == pytest.approx(value, rel=1e-12)


def test_real_svamp_equations_evaluate(tmp_path):
    from lmdistill.reasoning.data import load_reasoning_dataset

    records = load_reasoning_dataset("svamp", "test").records
    # Every gold equation of the test split evaluates (nothing there is out of bounds).
    values = [evaluate_equation(r.label) for r in records]
    assert len(values) == 200 and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("text, message", [
    ("1 / 0", "division by zero"),
    ("( 5.0 / ( 3.0 - 3.0 ) )", "division by zero"),
    ("", "empty"),
    ("   ", "empty"),
    ("()", "unexpected"),
    ("(1 + 2", "end of equation"),
    ("1 + 2)", "after the expression"),
    ("1 2", "after the expression"),
    ("2 ** 3", "unexpected"),
    ("x + 1", "character 'x'"),
    ("__import__('os')", "character '_'"),
    ("1e308 * 10", "character 'e'"),               # no exponent notation
    ("(3,4)", "character ','"),
    ("1..2", "unexpected '.2'"),
    ("9" * 31, "longer than"),
    ("99999999999999999 + 1", "out of range"),     # literal over the magnitude bound
    ("999999999 * 999999999", "out of range"),     # result over the bound
])
def test_invalid_equations_raise(text, message):
    with pytest.raises(EquationError, match=message):
        evaluate_equation(text)


def test_huge_inputs_are_refused_quickly():
    started = time.perf_counter()
    for text in ["(" * 10_000 + "1" + ")" * 10_000,          # deep nesting: length bound first
                 "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1),  # short but too deep
                 "-" * (MAX_DEPTH + 5) + "1",                  # deep unary chain
                 "1+" * 10**6 + "1",                           # very long
                 "1" * 10**6]:
        with pytest.raises(EquationError):
            evaluate_equation(text)
    assert time.perf_counter() - started < 1.0
    # Right at the bounds still works.
    assert evaluate_equation("(" * (MAX_DEPTH - 1) + "7" + ")" * (MAX_DEPTH - 1)) == 7.0
    assert evaluate_equation("+".join(["1"] * (MAX_CHARS // 2))) == MAX_CHARS // 2


def test_non_string_input_is_an_equation_error():
    for value in (None, 42, b"1+1", ["1"]):
        with pytest.raises(EquationError):
            evaluate_equation(value)
    assert issubclass(EquationError, ValueError)


def test_equations_match_uses_relative_tolerance():
    assert equations_match("(84 / 2)", "( 84.0 / 2.0 )")
    assert equations_match("(1 / 3)", "0.33333")                    # within 1e-4 relative
    assert not equations_match("(1 / 3)", "0.333")                  # 1e-3 off
    assert equations_match("100000", "100009")                      # 9e-5 relative
    assert not equations_match("100000", "100011")                  # 1.1e-4 relative
    assert not equations_match("(84 / 0)", "( 84.0 / 2.0 )")        # does not evaluate: wrong
    assert not equations_match("(x + 2)", "( 1.0 + 2.0 )")
    assert not equations_match("42", "garbage")
