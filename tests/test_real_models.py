"""The real Qwen2.5-Coder 1.5B -> 0.5B pair through its aliases (skipped unless `make real-models` ran)."""

import json

import pytest

from lmdistill.model_zoo import CHUNKED_MODELS, chunked_model_installed

TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
pytestmark = pytest.mark.skipif(not all(chunked_model_installed(a) for a in (TEACHER, STUDENT)),
                                reason="the Qwen pair is not installed (make real-models)")


def test_the_qwen_pair_checks_and_trains_two_gkd_steps(instruct_file, tmp_path, capsys):
    from lmdistill.cli import main
    from lmdistill.methods import load_config
    from lmdistill.trainer import Trainer

    assert main(["check", "--teacher", TEACHER, "--student", STUDENT, "--method", "gkd", "--batch-size", "2",
                 "--max-length", "128", "max_prompt_length=96"]) == 0
    out = capsys.readouterr().out
    assert "one tokenizer" in out and "151936" in out.replace(",", "") and "memory" in out
    overrides = {"method": "gkd", "teacher": TEACHER, "student": STUDENT, "train_data": instruct_file,
                 "output_dir": tmp_path / "run", "steps": 2, "batch_size": 2, "max_length": 128,
                 "max_prompt_length": 96, "max_new_tokens": 8, "lmbda": 1.0, "progress": "false",
                 "prompt_format": "chat", "lr": 1e-5, "warmup_steps": 0}
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    run = Trainer(config).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["jsd"] >= 0 for r in rows)


def test_the_recorded_checksums_are_the_data_readmes():
    assert CHUNKED_MODELS[TEACHER].size == 1_117_320_768 and CHUNKED_MODELS[STUDENT].size == 491_400_064
