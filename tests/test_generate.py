"""`lmdistill generate` with the local backend: prompts, parsing, the rationales and responses tasks,
resuming (the generators and the writer themselves: tests/teacher/test_generation.py)."""

import json
import re

import pytest

from conftest import DATA_DIR
from lmdistill.cli import main
from lmdistill.config import ConfigError
from lmdistill.data import DataError
from lmdistill.instruct.data import load_instruction_data
from lmdistill.generate import PROMPTS_DIR, PromptTemplate, fill_rationale, generate, parse_generic
from lmdistill.teacher.generation import GenerateConfig, rejected_path
from lmdistill.reasoning.data import DATASETS, load_reasoning_dataset, parse_continuation, read_teacher_outputs

SVAMP_TEST = DATA_DIR / "step_by_step/svamp/svamp_test.json"
ANSWER_MARKER = {"svamp": "A:", "cqa": "A:", "esnli": "Reasoning:", "anli1": "Answer:"}


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----- built-in few-shot prompts -----

@pytest.mark.parametrize("dataset", DATASETS)
def test_builtin_prompt_exemplars_parse_with_the_loader_rules(dataset):
    """Each exemplar's answer, read as a teacher continuation, parses to a sensible label."""
    template = PromptTemplate.load(PROMPTS_DIR / f"{dataset}.txt")
    *exemplars, query = template.text.split("\n\n")
    marker = ANSWER_MARKER[dataset]
    assert query.endswith(marker) and len(exemplars) >= 3
    labels = []
    for block in exemplars:
        continuation = block.split("\n" + marker, 1)[1]
        parsed = parse_continuation(dataset, continuation + "\n\n" + query)  # the run-on a teacher may add
        assert parsed is not None, block
        rationale, label = parsed
        assert rationale and "\n\n" not in rationale
        labels.append(label)
        if dataset == "svamp":  # the equation computes the number the rationale states
            assert eval(label) == float(re.findall(r"\d+", rationale)[-1])  # noqa: S307 (our own text)
        if dataset == "cqa":
            assert f") {label}\n" in block
    if dataset in ("esnli", "anli1"):
        assert sorted(labels) == ["contradiction", "entailment", "neutral"]


def test_template_fill_default_stop_and_placeholder_errors(tmp_path):
    svamp = PromptTemplate.load(PROMPTS_DIR / "svamp.txt")
    prompt = svamp.fill({"input": "Ann has 3 cats.\nHow many cats?"}, "x:1")
    assert prompt.endswith("\n\nQ: Ann has 3 cats.\nHow many cats?\nA:")
    assert svamp.default_stop() == ["\n\nQ:"]
    assert PromptTemplate.load(PROMPTS_DIR / "anli1.txt").default_stop() == ["\n\nPremise:"]

    bad = tmp_path / "mine.txt"
    bad.write_text("Q: 2+2?\nA: 4.\n\nQ: {question}\nA:\n")
    with pytest.raises(DataError, match=r"mine.txt:4: placeholder \{question\} has no field 'question' in d.jsonl:7"):
        PromptTemplate.load(bad).fill({"input": "x"}, "d.jsonl:7")
    (tmp_path / "none.txt").write_text("no placeholder here")
    with pytest.raises(DataError, match="none.txt: prompt template has no placeholder"):
        PromptTemplate.load(tmp_path / "none.txt")


def test_parse_generic():
    assert parse_generic(" Two and two make four. So the answer is 4.") == ("Two and two make four.", "4")
    assert parse_generic("First. Answer: yes\nQ: more") == ("First.", "yes")
    assert parse_generic("no marker at all") is None
    assert parse_generic("The answer is ") is None


def test_palm_continuations_become_records_the_step_by_step_loader_reads(tmp_path):
    """fill_rationale applied to PaLM's real SVAMP outputs: the same parse count as the loader
    computes from the raw files, and the written file loads as a `jsonl` reasoning dataset."""
    continuations, _ = read_teacher_outputs(DATA_DIR / "step_by_step/svamp", "test")
    continuations = continuations[:60]
    out, rejected = tmp_path / "out.jsonl", []
    with out.open("w") as f:
        for i, text in enumerate(continuations):
            record = {"id": str(i), "input": f"question {i}"}
            if fill_rationale(record, text, "svamp"):
                f.write(json.dumps(record) + "\n")
            else:
                rejected.append(record)
    expected = sum(parse_continuation("svamp", t) is not None for t in continuations)
    assert expected > 40 and len(rejected) == 60 - expected and all("raw" in r for r in rejected)
    data = load_reasoning_dataset("jsonl", "train", str(out))
    assert len(data.records) == expected and data.unparsed == 0
    first = next(r for r in data.records)
    assert first.teacher_label == parse_continuation("svamp", continuations[int(first.id)])[1]


def jsonl_inputs(tmp_path, n):
    path = tmp_path / "inputs.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "input": f"What is {i} plus {i}?", "label": str(2 * i)}) + "\n"
                            for i in range(n)))
    template = tmp_path / "prompt.txt"
    template.write_text("Q: What is 1 plus 2?\nA: One and two make three. So the answer is 3.\n\nQ: {input}\nA:\n")
    return path, template


def tear_line(path, record_id):
    """As if the run was killed while writing `record_id`: only its first bytes are in the file."""
    rows = path.read_text().splitlines()
    torn = next(line for line in rows if json.loads(line)["id"] == record_id)
    path.write_text("".join(line + "\n" for line in rows if line != torn) + torn[:15])


def test_generate_rationales_resumes_without_losing_or_repeating(tiny_llama, tmp_path):
    data, template = jsonl_inputs(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    args = dict(
        task="rationales",
        teacher=str(tiny_llama),
        data=str(data),
        out=str(out),
        prompt_template=str(template),
        parse_as="generic",
        max_new_tokens=8,
        batch_size=2,
        progress=False,
    )
    first = generate(GenerateConfig(limit=3, **args))
    assert first.total == 3 and first.written + first.rejected == 3 and first.tokens > 0
    tear_line(next(p for p in (out, rejected_path(out)) if '"q2"' in p.read_text()), "q2")
    second = generate(GenerateConfig(**args))
    assert second.skipped == 2 and second.written + second.rejected == 4
    rows = lines(out) + lines(rejected_path(out))
    assert sorted(r["id"] for r in rows) == [f"q{i}" for i in range(6)]
    for r in lines(rejected_path(out)):  # a random-weight teacher: kept out of training, raw text kept
        assert r["input"].startswith("What is") and "raw" in r and r["gold_label"] == str(2 * int(r["id"][1:]))
    assert generate(GenerateConfig(**args)).skipped == 6


def test_generate_responses_in_minillm_layout_with_samples(tiny_llama, instruct_file, tmp_path):
    out = tmp_path / "responses.jsonl"
    code = main(
        [
            "generate",
            "--task",
            "responses",
            "--teacher",
            str(tiny_llama),
            "--data",
            str(instruct_file),
            "--out",
            str(out),
            "--limit",
            "3",
            "--num-samples",
            "2",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            "6",
            "--prompt-format",
            "alpaca",
            "--no-progress",
        ]
    )
    assert code == 0
    rows = lines(out)
    assert sorted((r["id"], r["sample"]) for r in rows + lines(rejected_path(out))) == [
        (str(i), k) for i in range(3) for k in range(2)
    ]
    assert all(r["output"].strip() for r in rows)
    originals = load_instruction_data(str(instruct_file), limit=3)
    assert {r["prompt"] for r in rows} <= {ex.alpaca_prompt for ex in originals}
    if rows:  # SeqKD reads the file as ordinary MiniLLM-layout data
        assert len(load_instruction_data(str(out))) == len(rows)


def test_bad_settings_and_data_name_the_key_or_line(tiny_llama, tmp_path):
    data, template = jsonl_inputs(tmp_path, 2)
    base = dict(
        task="rationales",
        teacher=str(tiny_llama),
        data=str(data),
        out=str(tmp_path / "o.jsonl"),
        prompt_template=str(template),
        progress=False,
    )
    with pytest.raises(ConfigError, match="'num_samples'"):
        generate(GenerateConfig(num_samples=2, **base))
    with pytest.raises(ConfigError, match="'teacher'.*#MODEL"):
        generate(GenerateConfig(**{**base, "teacher": "openai:http://127.0.0.1:1/v1"}))
    with pytest.raises(DataError, match="not a built-in dataset file"):
        generate(GenerateConfig(**{**base, "prompt_template": None}))
    data.write_text('{"id": "a", "input": "x"}\n{"id": "a", "input": "y"}\n')
    with pytest.raises(DataError, match=r"inputs.jsonl:\d: field 'id': 'a' is used by more than one record"):
        generate(GenerateConfig(**base))
    data.write_text('{"id": "a", "input": "x"}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"inputs.jsonl:2: missing field 'input'"):
        generate(GenerateConfig(**base))


def test_builtin_dataset_is_inferred_from_the_gold_file(tiny_llama, tmp_path):
    out = tmp_path / "svamp.jsonl"
    stats = generate(
        GenerateConfig(
            task="rationales",
            teacher=str(tiny_llama),
            data=str(SVAMP_TEST),
            out=str(out),
            limit=2,
            max_new_tokens=4,
            progress=False,
        )
    )
    rows = lines(out) + lines(rejected_path(out))
    assert stats.total == 2 and sorted(r["id"] for r in rows) == ["0", "1"]
    gold = [json.loads(line) for line in SVAMP_TEST.read_text().splitlines()[:2]]
    assert {r["input"] for r in rows} == {g["input"] for g in gold}
    assert {r["gold_label"] for r in rows} == {g["label"] for g in gold}
