"""Reasoning accuracy: scoring rules, the teacher's accuracy, and train -> eval end to end."""

import json

import pytest

from lmdistill.reasoning.data import load_reasoning_dataset
from lmdistill.reasoning.evaluate import evaluate_reasoning, is_correct, metric_for, teacher_accuracy


def test_scoring_rules():
    assert metric_for("svamp") == "equation" and metric_for("cqa") == metric_for("esnli") == "exact"
    assert is_correct("equation", "(84 / 2)", "( 84.0 / 2.0 )")
    assert is_correct("equation", "( 2.0 * 21.0 )", "( 84.0 / 2.0 )")      # same value, other equation
    assert not is_correct("equation", "(84 / 2", "( 84.0 / 2.0 )")         # does not evaluate
    assert not is_correct("equation", "42 apples", "( 84.0 / 2.0 )")
    assert is_correct("exact", "  Wooded  Area.", "wooded area")
    assert not is_correct("exact", "wooded", "wooded area")
    assert is_correct("exact", "Entailment", "entailment")
    assert not is_correct("exact", None, "entailment")
    with pytest.raises(ValueError, match="metric"):
        metric_for("jsonl", "rouge")


@pytest.mark.parametrize("dataset, expected", [("svamp", 74.0), ("anli1", 65.6), ("cqa", 78.2)])
def test_teacher_accuracy_on_test_splits(dataset, expected):
    records = load_reasoning_dataset(dataset, "test").records
    # README: SVAMP 74.0, ANLI-R1 65.6; CQA 77.2 case-sensitive, 78.2 with normalised labels.
    assert teacher_accuracy(records, metric_for(dataset)) == pytest.approx(expected, abs=0.05)


def test_train_then_evaluate_end_to_end(tiny_llama_student, tmp_path, capsys):
    """A tiny student that memorises two labels scores 100%; the saved prefixes are used."""
    from lmdistill.cli import main

    path = tmp_path / "tiny.jsonl"
    rows = [{"id": "a", "input": "Ann has 3 pens and 4 pencils. How many things?", "label": "(3 + 4)",
             "rationale": "3 + 4 = 7."},
            {"id": "b", "input": "Bob had 9 cakes and ate 2. How many are left?", "label": "(9 - 2)",
             "rationale": "9 - 2 = 7."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: step_by_step\nstudent: {tiny_llama_student}\ntrain_data: {path}\n"
                      "label_prefix: '<L> '\nlr_schedule: constant\nbatch_size: 2\nprogress: false\nprecision: fp32\n")
    assert main(["train", str(recipe), f"output_dir={run}", "steps=45", "lr=1e-2"]) == 0
    student = str(run / "student")
    result = evaluate_reasoning(student, "jsonl", source=str(path), metric="equation", with_rationale=True,
                                max_new_tokens=12, rationale_max_new_tokens=12)
    assert result.n == 2 and result.accuracy == 100.0, result.samples
    assert [s["prediction"] for s in result.samples] == ["(3 + 4)", "(9 - 2)"]
    assert all(s["rationale"].startswith(("3 + 4", "9 - 2")) for s in result.samples)
    # The saved label prefix matters: with another prefix the student no longer answers.
    other = evaluate_reasoning(student, "jsonl", source=str(path), metric="equation", label_prefix="",
                               max_new_tokens=12)
    assert other.accuracy < 100.0
    # The same through the command line.
    capsys.readouterr()
    assert main(["eval", "--model", student, "--task", "jsonl", "--data", str(path), "--metric", "equation",
                 "--max-new-tokens", "12", "--out", str(tmp_path / "acc.json")]) == 0
    assert "| 100.0 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "acc.json").read_text())["accuracy"] == 100.0
