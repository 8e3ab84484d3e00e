"""Reasoning data: the four parsers on real teacher outputs, inputs, splits, JSONL, errors."""

import json
import re

import pytest

from conftest import DATA_DIR
from lmdistill.data import DataError
from lmdistill.reasoning.data import (
    format_input,
    holdout_indices,
    load_reasoning_dataset,
    normalize_label,
    parse_continuation,
    read_records,
    read_teacher_outputs,
)

SBS = DATA_DIR / "step_by_step"


def teacher_outputs(name, split):
    return read_teacher_outputs(SBS / name, split)[0]


# ----- parsers on real records -----

def test_parse_cqa_real_records():
    outs = teacher_outputs("cqa", "train")
    # Row 0 runs on into an invented exemplar; the cut at "\n\nQ:" keeps only its own answer.
    assert parse_continuation("cqa", outs[0]) == (
        "The answer must be something that has to do with the above problem. Of the above choices, "
        "only math problem has to do with the above problem.", "math problem")
    assert parse_continuation("cqa", outs[1])[1] == "train station"
    # Row 3362 answers "one of these four." (no "(x) " choice): it does not parse.
    assert "So the answer is one of these four." in outs[3362]
    assert parse_continuation("cqa", outs[3362]) is None


def test_parse_svamp_real_records():
    outs = teacher_outputs("svamp", "train")
    rationale, label = parse_continuation("svamp", outs[0])
    assert label == "(84 / 2)"
    assert rationale == "Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42."
    assert parse_continuation("svamp", outs[2])[1] == "(17 + 15 + 2)"
    # Row 65 never reaches "The answer is" (it loops); row 80 stops at " ((491 - 21".
    assert "The answer is" not in outs[65].split("\n\nQ:")[0]
    assert parse_continuation("svamp", outs[65]) is None
    assert parse_continuation("svamp", outs[80]) is None


def test_svamp_rule_parses_every_palm_output_as_the_papers_split_does():
    """Accepting "so the answer is" changes nothing on PaLM's outputs: the paper's rule is
    `split("The answer is")`, then the outermost parentheses."""
    for split in ("train", "test"):
        for text in teacher_outputs("svamp", split):
            body = text.split("\n\nQ:")[0].rstrip()
            rationale, found, after = body.partition("The answer is")
            equation = re.search(r"\(.*\)", after) if found else None
            expected = (rationale.rstrip(), equation.group(0)) if equation and rationale.strip() else None
            assert parse_continuation("svamp", text) == expected


def test_parse_esnli_real_records():
    outs = teacher_outputs("esnli", "valid")
    assert parse_continuation("esnli", outs[0]) == ("The to go packages are not necessarily from lunch.", "neutral")
    assert parse_continuation("esnli", outs[2])[1] == "contradiction"
    assert "Answer:" not in outs[133]  # runs on without ever answering
    assert parse_continuation("esnli", outs[133]) is None


def test_parse_anli_real_records():
    outs = teacher_outputs("anli1", "valid")
    rationale, label = parse_continuation("anli1", outs[0])
    assert label == "contradiction"  # "So the answer is contradiction." -> period removed
    assert rationale.startswith("Linguistics involves an analysis") and rationale.endswith("a crucial aspect.")
    # Row 100 says "so the answer is entailment" in lower case: not the rule's marker.
    assert "so the answer is entailment" in outs[100]
    assert parse_continuation("anli1", outs[100]) is None


@pytest.mark.parametrize("dataset, text, expected", [
    ("cqa", "Because. So the answer is (b) body of water.", ("Because.", "body of water")),
    ("cqa", "So the answer is (b) water.", None),                        # empty rationale
    ("cqa", "Because. So the answer is water.", None),                   # no (x) choice
    ("svamp", "3 + 4 = 7. The answer is (3 + 4).\n\nQ: x The answer is (1)", ("3 + 4 = 7.", "(3 + 4)")),
    ("svamp", "3 + 4 = 7. The answer is 7.", None),                      # no parenthesised equation
    ("svamp", "3 + 4 = 7, so the answer is (3 + 4).", ("3 + 4 = 7", "(3 + 4)")),  # smaller teachers' phrasing
    ("svamp", "3 + 4 = 7. So the answer is (3 + 4).", ("3 + 4 = 7.", "(3 + 4)")),
    ("esnli", "They sit.\nAnswer: entailment\n\nPremise: ...", ("They sit.", "entailment")),
    ("esnli", "They sit.\nAnswer: maybe", None),                         # not an NLI label
    ("anli1", "Clearly. So the answer is Neutral.\n\nPremise: p", ("Clearly.", "neutral")),
    ("anli1", "", None),
])
def test_parse_rules_on_constructed_text(dataset, text, expected):
    assert parse_continuation(dataset, text) == expected


def test_parse_unknown_dataset_and_non_text():
    with pytest.raises(DataError, match="unknown dataset"):
        parse_continuation("gsm8k", "So the answer is (a) b.")
    assert parse_continuation("cqa", None) is None


# ----- loaders, counts, splits -----

def test_svamp_counts_split_and_teacher_accuracy():
    from lmdistill.reasoning.arithmetic import equations_match

    train = load_reasoning_dataset("svamp", "train")
    valid = load_reasoning_dataset("svamp", "valid")
    test = load_reasoning_dataset("svamp", "test")
    assert (len(train.records), len(valid.records), len(test.records)) == (720, 80, 200)
    assert not {r.input for r in train.records} & {r.input for r in valid.records}
    # 13 of the 800 train continuations do not parse; they keep rationale/teacher_label None.
    assert (train.unparsed, valid.unparsed) == (12, 1)
    assert all((r.rationale is None) == (r.teacher_label is None) for r in train.records)
    assert test.unparsed == 2 and test.parsed == 198
    first = next(r for r in train.records if r.id == "0")
    assert first.input.endswith(
        "If he gained the same number of points each round\nHow many points did he score per round?"
    )
    assert first.label == "( 84.0 / 2.0 )" and first.teacher_label == "(84 / 2)"
    # The README's teacher accuracy on the test split.
    correct = sum(r.teacher_label is not None and equations_match(r.teacher_label, r.label) for r in test.records)
    assert correct / 200 == pytest.approx(0.740)


def test_nli_and_cqa_inputs_and_teacher_accuracy():
    esnli = load_reasoning_dataset("esnli", "test")
    anli = load_reasoning_dataset("anli1", "train")  # = the valid file
    assert len(esnli.records) == 9824 and len(anli.records) == 1000 and anli.unparsed == 9
    assert esnli.records[0].label in ("entailment", "neutral", "contradiction")
    assert anli.records[0].input.count("</s>") == 1 and anli.records[0].id == "bf628cf5-6948-4595-a6d0-daf99beb47b9"
    accuracy = sum(r.teacher_label == r.label for r in esnli.records) / len(esnli.records)
    assert accuracy == pytest.approx(0.730, abs=5e-4)
    cqa = load_reasoning_dataset("cqa", "test")
    r = cqa.records[0]
    assert r.input.split("\nAnswer Choices:\n")[1].count("\n") == 4 and r.input.split("\n")[-1].startswith("(e) ")
    # Case-sensitive, as the README computes it (77.2%); the normalised match is a little higher.
    assert sum(r.teacher_label == r.label for r in cqa.records) / 1221 == pytest.approx(0.772, abs=5e-4)
    normalised = sum(normalize_label(r.teacher_label) == normalize_label(r.label) for r in cqa.records) / 1221
    assert normalised == pytest.approx(0.782, abs=5e-4)


def test_format_input_cqa_layout():
    record = {"question": "Where do fish live?", "choices": ["sea", "tree", "sky", "desk", "car"], "answer": "sea"}
    assert format_input("cqa", record) == (
        "Where do fish live?\nAnswer Choices:\n(a) sea\n(b) tree\n(c) sky\n(d) desk\n(e) car"
    )
    assert format_input("esnli", {"premise": "A", "hypothesis": "B"}) == "A</s>B"


def test_holdout_matches_hugging_face_train_test_split():
    # datasets.Dataset.train_test_split(test_size=0.1, seed=0) on 800 rows holds out 80 rows:
    # the first ceil(0.1 * 800) indices of numpy default_rng(0).permutation(800).
    import numpy as np

    kept, held = holdout_indices(800, 0.1, 0)
    assert len(held) == 80 and len(kept) == 720 and sorted(kept + held) == list(range(800))
    assert held == np.random.default_rng(0).permutation(800)[:80].tolist()


def test_train_fraction_subsamples_with_seed():
    a = load_reasoning_dataset("svamp", "train", train_fraction=0.25, seed=0)
    b = load_reasoning_dataset("svamp", "train", train_fraction=0.25, seed=1)
    assert len(a.records) == len(b.records) == 180
    assert {r.id for r in a.records} != {r.id for r in b.records}
    assert {r.id for r in a.records} == {
        r.id for r in load_reasoning_dataset("svamp", "train", train_fraction=0.25).records
    }
    with pytest.raises(DataError, match="train_fraction"):
        load_reasoning_dataset("svamp", "train", train_fraction=0)


def test_train_fraction_is_drawn_before_the_holdout_as_the_released_code_does():
    """run.py: `train_test_split(test_size=1 - subsample, seed=run)`, then the 10% validation split (seed 0)."""
    rows = [row for _, row in read_records(DATA_DIR / "step_by_step/svamp/svamp_train.json")]
    ids = [str(row.get("id", i)) for i, row in enumerate(rows)]
    sub, _ = holdout_indices(800, 0.75, 3)
    sub = sorted(sub)
    kept, held = holdout_indices(len(sub), 0.1, 0)
    train = load_reasoning_dataset("svamp", "train", train_fraction=0.25, seed=3)
    valid = load_reasoning_dataset("svamp", "valid", train_fraction=0.25, seed=3)
    assert [r.id for r in train.records] == [ids[sub[i]] for i in sorted(kept)]
    assert [r.id for r in valid.records] == [ids[sub[i]] for i in sorted(held)]
    other = load_reasoning_dataset("svamp", "train", train_fraction=0.25, seed=3, subsample_first=False)
    assert len(other.records) == 180 and {r.id for r in other.records} != {r.id for r in train.records}


# ----- generic JSONL and errors -----


def test_generic_jsonl(tmp_path):
    path = tmp_path / "teacher.jsonl"
    rows = [
        {"id": "a", "input": "2 apples and 3 more?", "label": "(2 + 3)", "rationale": "2 + 3 = 5."},
        {"id": "b", "input": "Q2", "label": "x"},  # no rationale
        {"id": "c", "input": "Q3", "label": "y", "rationale": "  "},  # empty: not parsed
        {"input": "Q4", "label": "gold", "teacher_label": "teacher", "rationale": "r"},
        {"input": "Q5", "label": "teacher", "gold_label": "gold", "rationale": "r"},
    ]  # lmdistill generate
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_reasoning_dataset("jsonl", "train", str(path))
    assert [r.id for r in data.records] == ["a", "b", "c", "3", "4"]
    assert (data.teacher_outputs, data.unparsed) == (4, 1)
    assert data.records[0].rationale == "2 + 3 = 5." and data.records[0].teacher_label == "(2 + 3)"
    assert data.records[1].rationale is None and data.records[2].rationale is None
    assert (data.records[3].label, data.records[3].teacher_label) == ("gold", "teacher")
    assert (data.records[4].label, data.records[4].teacher_label) == ("gold", "teacher")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"input": "q"}\n', r":1: missing field 'label'"),
        ('{"input": "q", "label": "a"}\n{"input": 3, "label": "a"}\n', r":2: field 'input': expected a string"),
        ('{"input": "q", "label": "a", "rationale": [1]}\n', r":1: field 'rationale'"),
        ('{"input": "q", "label": "a"}\n{"input": \n', r":2: malformed JSON"),
        ("[1, 2]\n", r":\[0\]: expected a JSON object"),
        ('"text"\n', r":1: expected a JSON object"),
        ("\n\n", r"no records"),
        ("[" * 100_000 + "\n", r"nested too deeply|malformed JSON"),
        ('{"input": "q", "label": ' + "9" * 5000 + "}\n", r":1: malformed JSON"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_reasoning_dataset("jsonl", "train", str(path))
    assert str(path) in str(info.value)


def test_bad_bytes_and_missing_files(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"input": "q", "label": "a"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2: not valid UTF-8"):
        load_reasoning_dataset("jsonl", "train", str(path))
    with pytest.raises(DataError, match="cannot read"):
        load_reasoning_dataset("jsonl", "train", str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no split 'valid'"):
        load_reasoning_dataset("esnli", "valid")
    with pytest.raises(DataError, match="unknown reasoning dataset"):
        load_reasoning_dataset("gsm8k", "train")


def test_misaligned_or_malformed_teacher_files(tmp_path):
    folder = tmp_path / "svamp"
    (folder / "llm").mkdir(parents=True)
    (folder / "svamp_test.json").write_text('{"input": "q1", "label": "(1 + 1)"}\n{"input": "q2", "label": "2"}\n')
    (folder / "llm" / "test_CoT_0.json").write_text(json.dumps(["r. The answer is (1 + 1)."]))
    with pytest.raises(DataError, match="2 gold rows but 1 teacher continuations"):
        load_reasoning_dataset("svamp", "test", str(folder))
    (folder / "llm" / "test_CoT_1.json").write_text(json.dumps([7]))
    with pytest.raises(DataError, match=r"test_CoT_1.json: item 0: expected a string"):
        load_reasoning_dataset("svamp", "test", str(folder))
    (folder / "llm" / "test_CoT_1.json").write_text(json.dumps(["no answer here"]))
    data = load_reasoning_dataset("svamp", "test", str(folder))
    assert (data.parsed, data.unparsed) == (1, 1) and data.records[1].teacher_label is None
    # Gold NLI labels must be 0, 1 or 2.
    nli = tmp_path / "anli1"
    nli.mkdir()
    (nli / "anli1_test.json").write_text('{"premise": "p", "hypothesis": "h", "label": true}\n')
    with pytest.raises(DataError, match=r"anli1_test.json:1: field 'label': expected 0, 1 or 2"):
        load_reasoning_dataset("anli1", "test", str(nli))
