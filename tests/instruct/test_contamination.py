"""The contamination guard: training rows whose prompt is an evaluation prompt never train."""

import json
import logging

import pytest

from conftest import DATA_DIR
from lmdistill.data import DataError
from lmdistill.instruct.data import load_training_data
from lmdistill.methods import load_config
from lmdistill.trainer import Trainer

DOLLY_TEST = DATA_DIR / "instruct/dolly/valid.jsonl"


def planted_file(instruct_file, tmp_path):
    """The 16-row training file with the first Dolly test row planted at line 9, its whitespace changed
    (one space doubled, a trailing newline) and another response, as a scraped copy would be."""
    rows = [json.loads(line) for line in instruct_file.read_text().splitlines()]
    test_row = json.loads(DOLLY_TEST.read_text().splitlines()[0])
    planted = {"instruction": test_row["instruction"].replace(" ", "  ", 1) + "\n", "input": test_row["input"],
               "output": "A scraped answer."}
    rows.insert(8, planted)
    path = tmp_path / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, test_row


def sft_config(student, train_file, tmp_path, *extra):
    return load_config(None, ["method=sft", f"student={student}", f"train_data={train_file}",
                              f"output_dir={tmp_path / 'run'}", "steps=1", "batch_size=2", "prompt_format=alpaca",
                              "progress=false", *extra])


def test_the_guard_drops_a_planted_evaluation_prompt_and_logs_the_count(tiny_llama_student, instruct_file, tmp_path,
                                                                       caplog):
    train_file, test_row = planted_file(instruct_file, tmp_path)
    config = sft_config(tiny_llama_student, train_file, tmp_path, f"test_data=[{DOLLY_TEST}]")
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        trainer = Trainer(config)
    assert len(trainer.examples) == 16  # 17 rows, the planted one dropped
    kept = [e.instruction for e in load_training_data(config)]
    assert not any(test_row["instruction"] in text for text in kept)
    assert "contamination guard: 1 of 17 training rows dropped" in caplog.text
    assert f"1 in {DOLLY_TEST}" in caplog.text
    # Without the test file named, the row stays (the guard compares with what the run evaluates on).
    assert len(load_training_data(sft_config(tiny_llama_student, train_file, tmp_path))) == 17


def test_eval_data_is_guarded_too_and_contamination_error_stops(tiny_llama_student, instruct_file, tmp_path):
    train_file, _ = planted_file(instruct_file, tmp_path)
    config = sft_config(tiny_llama_student, train_file, tmp_path, f"eval_data={DOLLY_TEST}", "eval_every=1")
    assert len(load_training_data(config)) == 16
    strict = sft_config(tiny_llama_student, train_file, tmp_path, f"eval_data={DOLLY_TEST}", "eval_every=1",
                        "contamination=error")
    with pytest.raises(DataError, match=rf"{train_file}:9: this training prompt is the evaluation prompt at "
                                        rf"{DOLLY_TEST}:1 \(config key 'contamination'"):
        load_training_data(strict)


def test_the_cli_stops_with_an_error_line_under_contamination_error(tiny_llama_student, instruct_file, tmp_path,
                                                                    capsys):
    from lmdistill.cli import main

    train_file, _ = planted_file(instruct_file, tmp_path)
    code = main(["train", str(_recipe(tmp_path, tiny_llama_student, train_file)), "contamination=error"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmdistill train: error: ") and f"{train_file}:9" in err[-1]


def _recipe(tmp_path, student, train_file):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"method: sft\nstudent: {student}\ntrain_data: {train_file}\noutput_dir: {tmp_path / 'cli'}\n"
                    f"test_data: [{DOLLY_TEST}]\nsteps: 1\nbatch_size: 2\nprompt_format: alpaca\nprogress: false\n")
    return path
