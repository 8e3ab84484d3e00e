"""Bad input, end to end through `lmdistill train`: each case gives exit code 2 and ONE
line on stderr naming the file and line, field or key (and what was expected), before any
training starts (no metrics, no checkpoint). Long inputs are dropped or truncated with
counts in the log. Models are safe by default (no remote code, no unpickling)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from conftest import DATA_DIR, gpt2_tokenizer
from lmdistill import cli
from lmdistill.instruct.data import prompt_ids
from lmdistill.models import ModelError, load_model

GOOD = {"prompt": "Name a colour.", "output": "Blue."}


def write_jsonl(path, lines: list) -> str:
    path.write_bytes(b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines))
    return str(path)


def write_recipe(path, values: dict, extra_lines: str = "") -> str:
    path.write_text(yaml.safe_dump(values, sort_keys=False) + extra_lines)
    return str(path)


def line_of(path, key: str) -> int:
    return next(i for i, line in enumerate(open(path), start=1) if line.startswith(f"{key}:"))


def train_fails(capsys, tmp_path, recipe: str, *overrides: str) -> str:
    """Run `lmdistill train`; assert a clean exit-2 error before training; return the message."""
    code = cli.main(["train", recipe, f"output_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lmdistill train: error: ")]
    assert code == 2 and len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not list((tmp_path / "run").glob("checkpoint-*"))
    return errors[0]


@pytest.fixture
def sft_recipe(tmp_path, tiny_llama_student):
    def make(train_data: str, **values) -> str:
        base = {"method": "sft", "student": str(tiny_llama_student), "train_data": train_data,
                "prompt_format": "alpaca", "steps": 1, "batch_size": 1, "progress": False}
        return write_recipe(tmp_path / "recipe.yaml", {**base, **values})
    return make


@pytest.mark.parametrize("bad_line, expected", [
    (b'{"prompt": "Name a colour.", "output": "Blue."', "train.jsonl:2: malformed JSON"),
    ({"prompt": "Name a colour."}, "train.jsonl:2: missing field 'output'"),
    ({"prompt": 5, "output": "Blue."}, "train.jsonl:2: field 'prompt': expected a string, got int"),
    ({"prompt": "Hi", "output": ["a", 3]}, "train.jsonl:2: field 'output': expected a string or a non-empty list"),
    ({"prompt": "   ", "output": "Blue."}, "train.jsonl:2: field 'prompt': empty prompt"),
    ({"prompt": "Name a colour.", "output": ""}, "train.jsonl:2: field 'output': empty response"),
    (["not", "an", "object"], "train.jsonl:2: expected a JSON object, got list"),
    (b'{"prompt": "caf\xe9", "output": "x"}', "train.jsonl:2: not UTF-8 text"),
])
def test_bad_instruction_line_names_file_line_and_field(bad_line, expected, tmp_path, sft_recipe, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad_line, GOOD])
    message = train_fails(capsys, tmp_path, sft_recipe(data))
    assert f"{tmp_path}/{expected}" in message


def test_unknown_dataset_name(tmp_path, sft_recipe, capsys):
    assert "dolly-typo: data file not found" in train_fails(capsys, tmp_path, sft_recipe("dolly-typo"))
    recipe = sft_recipe(str(DATA_DIR / "step_by_step" / "svamp"), method="step_by_step", dataset="gsm8k")
    message = train_fails(capsys, tmp_path, recipe)
    assert f"recipe.yaml:{line_of(recipe, 'dataset')}: config key 'dataset': expected auto, jsonl or one of" in message
    assert "'gsm8k'" in message
    from lmdistill.data import DataError
    from lmdistill.reasoning.data import load_reasoning_dataset

    with pytest.raises(DataError, match=r"unknown reasoning dataset 'gsm8k'; expected one of \['esnli'"):
        load_reasoning_dataset("gsm8k")


def test_bad_reasoning_line_names_file_line_and_field(tmp_path, sft_recipe, capsys):
    data = write_jsonl(tmp_path / "cot.jsonl", [{"input": "1 + 1?", "label": "(1 + 1)", "rationale": "Add."},
                                                {"input": "2 + 2?", "rationale": "Add."}])
    message = train_fails(capsys, tmp_path, sft_recipe(data, method="step_by_step", dataset="jsonl"))
    assert f"{data}:2: missing field 'label'" in message


def test_unknown_key_out_of_range_value_and_wrong_type_name_the_recipe_line(tmp_path, sft_recipe, capsys,
                                                                            instruct_file):
    recipe = sft_recipe(str(instruct_file))
    with open(recipe, "a") as f:
        f.write("learning_rate: 0.001\n")
    message = train_fails(capsys, tmp_path, recipe)
    assert f"recipe.yaml:{line_of(recipe, 'learning_rate')}: unknown config key 'learning_rate'" in message

    recipe = sft_recipe(str(instruct_file), steps=0)
    message = train_fails(capsys, tmp_path, recipe)
    assert f"recipe.yaml:{line_of(recipe, 'steps')}: config key 'steps': expected > 0, got 0" in message

    recipe = sft_recipe(str(instruct_file), batch_size="two")
    assert f"recipe.yaml:{line_of(recipe, 'batch_size')}: key 'batch_size': expected int, got 'two'" in \
        train_fails(capsys, tmp_path, recipe)
    recipe = sft_recipe(str(instruct_file))
    assert "command line: unknown config key 'stepz'" in train_fails(capsys, tmp_path, recipe, "stepz=3")
    recipe = sft_recipe(str(instruct_file), method="kd", teacher=None)
    assert "config key 'teacher'" in train_fails(capsys, tmp_path, recipe)


@pytest.fixture(scope="module")
def other_vocab_teacher(tmp_path_factory):
    """A tiny Llama whose tokenizer has one token more than GPT-2's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("other_vocab")
    tok = gpt2_tokenizer()
    tok.add_tokens(["<extra_token>"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["kd", "promptkd"])
def test_teacher_with_another_vocabulary_is_refused(method, other_vocab_teacher, tmp_path, sft_recipe, capsys,
                                                    instruct_file):
    recipe = sft_recipe(str(instruct_file), method=method, teacher=str(other_vocab_teacher))
    message = train_fails(capsys, tmp_path, recipe)
    assert f"teacher '{other_vocab_teacher}'" in message and "must share one vocabulary" in message


def test_pickled_weights_are_refused_unless_allowed(tmp_path, tiny_llama_student, sft_recipe, capsys, instruct_file):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_student)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    gpt2_tokenizer().save_pretrained(folder)
    message = train_fails(capsys, tmp_path, sft_recipe(str(instruct_file), student=str(folder)))
    assert f"{folder / 'pytorch_model.bin'} holds pickled weights" in message and "allow_pickle: true" in message

    loaded = load_model(str(folder), allow_pickle=True)  # explicitly allowed (weights_only unpickler)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)


def test_remote_code_never_runs_unless_trusted(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_model(str(folder))
    assert not marker.exists()


def test_long_inputs_are_dropped_or_truncated_with_counts_in_the_log(tmp_path, sft_recipe, instruct_file, caplog):
    """The trainer's log line reports exactly what a naive recount finds."""
    from lmdistill.methods import load_config
    from lmdistill.instruct.data import load_instruction_data
    from lmdistill.trainer import Trainer

    max_prompt, max_length = 45, 90
    tok = gpt2_tokenizer()
    dropped = truncated = 0
    for ex in load_instruction_data(str(instruct_file)):
        p = prompt_ids(ex, tok, "alpaca")
        if len(p) > max_prompt:
            dropped += 1
        elif len(tok(ex.references[0])["input_ids"]) + 1 > max_length - len(p):
            truncated += 1
    assert dropped and truncated, "pick limits that exercise both policies"
    config = load_config(sft_recipe(str(instruct_file), max_prompt_length=max_prompt, max_length=max_length),
                         [f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        trainer = Trainer(config)
    assert f"{16 - dropped} examples kept, {dropped} dropped (prompt too long), {truncated} responses truncated" \
        in caplog.text
    assert len(trainer.examples) == 16 - dropped
    assert all(len(e.prompt) + len(e.response) <= max_length for e in trainer.examples)


def test_every_input_path_is_checked_before_step_1(tmp_path, sft_recipe, capsys, instruct_file):
    missing = tmp_path / "dev-typo.jsonl"
    recipe = sft_recipe(str(instruct_file), eval_every=2, eval_data=str(missing), steps=4)
    assert f"{missing}: data file not found" in train_fails(capsys, tmp_path, recipe)
    recipe = sft_recipe(str(instruct_file), lm_data=str(missing))
    assert str(missing) in train_fails(capsys, tmp_path, recipe)


def test_a_key_given_twice_in_a_recipe_is_refused_naming_both_lines(tmp_path, sft_recipe, capsys, instruct_file):
    recipe = sft_recipe(str(instruct_file))
    with open(recipe, "a") as f:
        f.write("steps: 5\n")
    message = train_fails(capsys, tmp_path, recipe)
    lines = open(recipe).read().splitlines()
    twice = [i for i, line in enumerate(lines, start=1) if line.startswith("steps:")]
    assert f"recipe.yaml:{twice[1]}: key 'steps' given twice (first at line {twice[0]})" in message
    recipe = sft_recipe(str(instruct_file), student_lora={"r": 4})
    with open(recipe, "a") as f:
        f.write("  r: 8\n")
    assert "key 'student_lora.r' given twice" in train_fails(capsys, tmp_path, recipe)
