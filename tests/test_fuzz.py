"""Property-based tests (hypothesis): random bytes and random JSON thrown at the data
loaders, and random text and random expression trees at the SVAMP equation evaluator.
Only the project's own errors (DataError, EquationError) may come out: never a traceback
from deep inside (KeyError, UnicodeDecodeError, RecursionError, ...), and never a hang
(each call runs under a SIGALRM deadline)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import string
import tempfile
from fractions import Fraction
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmdistill.reasoning.arithmetic import MAX_MAGNITUDE, EquationError, evaluate_equation
from lmdistill.data import DataError
from lmdistill.instruct.data import load_instruction_data
from lmdistill.reasoning.data import DATASETS, load_reasoning_dataset, parse_continuation

# Deterministic, no example database written into the checkout, no per-example deadline
# on a loaded shared machine (the SIGALRM guard below catches hangs instead).
FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
HANG_SECONDS = 5


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    def timeout(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def only_data_errors(load, path: Path):
    """`load(path)` returns normally or raises a DataError that names the file."""
    with no_hang():
        try:
            return load(path)
        except DataError as e:
            assert str(path) in str(e) or "train_fraction" in str(e), f"error does not name the file: {e}"
            return None


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["prompt", "instruction", "input", "output", "id", "label", "rationale", "teacher_label", "question",
          "choices", "answer", "premise", "hypothesis", "uid"]
# Records that look almost right: the real field names with random values of random types.
records = st.dictionaries(st.sampled_from(FIELDS), json_values | st.text(max_size=30), max_size=6)
# Valid for both JSONL layouts (instruction: prompt + output; reasoning: input + label), plus noise.
some_text = st.text(min_size=1, max_size=30).filter(str.strip)
valid = st.fixed_dictionaries({"prompt": some_text, "output": some_text | st.lists(some_text, min_size=1, max_size=3),
                               "input": some_text, "label": some_text},
                              optional={"id": json_values, "rationale": some_text, "topic": json_values})
lines = st.lists(valid | valid | records | json_values, min_size=0, max_size=5).map(lambda rows: "\n".join(
    json.dumps(r) for r in rows).encode())
raw = st.binary(max_size=300) | lines | lines.map(lambda b: b[: len(b) // 2])  # also cut mid-record


@contextlib.contextmanager
def scratch_file(data: bytes, name: str = "data.jsonl"):
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        (Path(folder) / name).write_bytes(data)
        yield Path(folder) / name


@FUZZ
@given(raw)
def test_instruction_loader_only_raises_data_errors(data):
    with scratch_file(data) as path:
        examples = only_data_errors(load_instruction_data, path)
    if examples is not None:  # what loads is valid
        assert examples and all(e.references and e.references[0].strip() for e in examples)


@FUZZ
@given(raw)
def test_reasoning_jsonl_loader_only_raises_data_errors(data):
    with scratch_file(data) as path:
        dataset = only_data_errors(lambda p: load_reasoning_dataset("jsonl", "train", str(p)), path)
    if dataset is not None:
        assert all(isinstance(r.input, str) and r.input.strip() for r in dataset.records)


@FUZZ
@given(st.sampled_from(DATASETS), raw, st.one_of(st.none(), st.binary(max_size=200),
                                                  st.lists(st.text(max_size=40) | json_values, max_size=6)
                                                  .map(lambda v: json.dumps(v).encode())))
def test_benchmark_folder_loaders_only_raise_data_errors(name, gold, teacher):
    split = {"cqa": "train", "svamp": "train", "esnli": "valid", "anli1": "valid"}[name]
    with scratch_file(gold, f"{name}_{split}.json") as gold_file, no_hang():
        if teacher is not None:
            (gold_file.parent / "llm").mkdir()
            (gold_file.parent / "llm" / f"{split}_CoT_0.json").write_bytes(teacher)
        try:
            load_reasoning_dataset(name, "train", str(gold_file.parent))
        except DataError as e:
            assert str(gold_file.parent) in str(e), f"error does not name the file: {e}"


@FUZZ
@given(st.sampled_from(DATASETS), st.text(max_size=200) | st.builds(
    lambda a, m, b: a + m + b, st.text(max_size=40),
    st.sampled_from(["So the answer is", "The answer is", "Answer:", "\n\nQ:", "\n\nPremise:", "(a) ", "("]),
    st.text(max_size=40)))
def test_teacher_continuation_parser_never_raises(name, text):
    with no_hang():
        parsed = parse_continuation(name, text)
    assert parsed is None or (parsed[0].strip() and parsed[1].strip())


# ----- the SVAMP equation evaluator -----

EQUATION_CHARS = string.digits + " .,+-*/()×÷−eE_x^%"


@FUZZ
@given(st.text(alphabet=EQUATION_CHARS, max_size=80) | st.text(max_size=80) | st.integers(1, 60).map(
    lambda n: "(" * n + "1" + ")" * n) | st.integers(1, 2000).map(lambda n: "-" * n + "1"))
def test_equation_evaluator_returns_a_finite_number_or_equation_error(text):
    with no_hang():
        try:
            value = evaluate_equation(text)
        except EquationError:
            return
    assert math.isfinite(value) and abs(value) <= MAX_MAGNITUDE


def expressions(depth: int = 4):
    """(text, exact value or None when undefined) of random SVAMP-style expressions."""
    numbers = st.integers(0, 10_000).map(lambda n: (f"{n}.0" if n % 2 else str(n), Fraction(n)))
    if depth == 0:
        return numbers
    sub = expressions(depth - 1)

    def combine(op, left, right):
        (lt, lv), (rt, rv) = left, right
        if lv is None or rv is None or (op == "/" and rv == 0):
            value = None
        else:
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
        return f"( {lt} {op} {rt} )", value

    return numbers | st.builds(combine, st.sampled_from("+-*/"), sub, sub)


@FUZZ
@given(expressions())
def test_equation_evaluator_agrees_with_exact_arithmetic(expression):
    text, exact = expression
    with no_hang():
        try:
            value = evaluate_equation(text)
        except EquationError as e:  # only for a real reason
            assert exact is None or "out of range" in str(e) or "division by zero" in str(e), (text, e)
            return
    assert exact is not None, f"{text} evaluated although it divides by zero"
    assert math.isclose(value, float(exact), rel_tol=1e-9, abs_tol=1e-9), (text, value, exact)
