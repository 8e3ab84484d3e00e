"""`lmdistill compare` on tiny models: table, plot, failures reported, finished methods not rerun."""

import json
import shutil

import pytest
import yaml

from lmdistill.instruct import compare
from lmdistill.config import ConfigError


@pytest.fixture
def eval_files(instruct_file, tmp_path):
    files = []
    for name in ("dolly", "vicuna"):
        (tmp_path / "eval" / name).mkdir(parents=True)
        files.append(tmp_path / "eval" / name / "valid.jsonl")
        shutil.copy(instruct_file, files[-1])
    return files


def write_recipe(tmp_path, tiny_llama, tiny_llama_student, instruct_file, eval_files, **extra):
    recipe = {
        "output_dir": str(tmp_path / "cmp"), "student": str(tiny_llama_student), "teacher": str(tiny_llama),
        "methods": ["sft", "kd", "distillm"],
        "train": {"train_data": str(instruct_file), "steps": 2, "batch_size": 2, "lr": 1e-3, "max_new_tokens": 4,
                  "prompt_format": "alpaca", "max_length": 160, "max_prompt_length": 128, "progress": False},
        # A method that fails at start-up: its validation file does not exist.
        "method_overrides": {"distillm": {"valid_data": str(tmp_path / "missing.jsonl")}, "kd": {"kd_ratio": 0.5}},
        "eval_data": [str(f) for f in eval_files], "eval_seeds": [1, 2], "eval_max_examples": 2,
        "eval_max_new_tokens": 4, "prompt_format": "alpaca",
        "exposure_bias_every": 2, "exposure_bias_examples": 2, "exposure_bias_length": 3,
    }
    recipe.update(extra)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compare_trains_evaluates_reports_failures_and_skips_finished(tiny_llama, tiny_llama_student, instruct_file,
                                                                      eval_files, tmp_path, monkeypatch):
    from lmdistill.cli import main

    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, instruct_file, eval_files)
    assert main(["compare", str(recipe)]) == 0
    out = tmp_path / "cmp"
    table = (out / "comparison.md").read_text()
    rouge_table = table.split("## ExAccErr")[0]
    rows = {line.split("|")[1].strip(): line for line in rouge_table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"model", "teacher", "initial student", "sft", "kd", "distillm"}
    assert "dolly" in rows["model"] and "vicuna" in rows["model"]
    for name in ("teacher", "initial student", "sft", "kd"):
        assert rows[name].count("±") == 2, rows[name]
    assert "failed: DataError" in rows["distillm"] and "missing.jsonl" in rows["distillm"]
    assert (out / "comparison.png").stat().st_size > 1000
    results = json.loads((out / "comparison.json").read_text())
    assert results["sft"]["dolly"]["seeds"] == [1, 2] and len(results["kd"]["vicuna"]["rougeL_per_seed"]) == 2
    # Every method trained from the same student with the same steps and data.
    for name in ("sft", "kd"):
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert (config["student"], config["steps"], config["train_data"]) == (str(tiny_llama_student), 2,
                                                                             str(instruct_file))
        assert (out / name / "student" / "config.json").exists()
        assert not list((out / name).glob("checkpoint-*"))  # cleaned once finished
        curve = json.loads((out / name / "exposure_bias.json").read_text())
        assert sorted(curve, key=int) == ["0", "2"] and len(curve["2"]["exacc_err"]) == 3
    assert "ExAccErr(3) over training steps" in table and (out / "exposure_bias.png").exists()
    assert "DataError" in (out / "distillm" / "error.txt").read_text()

    # Repeating the command: finished methods and reference rows are neither retrained nor re-evaluated.
    trained, evaluated = [], []
    original_train, original_eval = compare.train_method, compare.evaluate_model
    monkeypatch.setattr(compare, "train_method", lambda cc, name: trained.append(name) or original_train(cc, name))
    monkeypatch.setattr(compare, "evaluate_model", lambda cc, spec: evaluated.append(spec) or original_eval(cc, spec))
    compare.run_compare(compare.load_compare_config(recipe))
    assert trained == ["distillm"] and evaluated == []
    assert (out / "comparison.md").read_text() == table

    # A repeat with another budget or evaluation must not mix its numbers with the stored ones.
    with pytest.raises(ConfigError, match=r"teacher/eval.json.*evaluation\.eval_seeds"):
        compare.run_compare(compare.load_compare_config(recipe, ["eval_seeds=[1,3]"]))
    with pytest.raises(ConfigError, match=r"sft/eval.json.*training\.steps.*new output_dir"):
        compare.run_compare(compare.load_compare_config(recipe, ["train.steps=3"]))
    assert trained == ["distillm"] and evaluated == []


def test_compare_config_errors_name_the_key(tiny_llama, tiny_llama_student, instruct_file, eval_files, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, instruct_file, eval_files,
                          method_overrides={"kd": {"steps": 10}})
    with pytest.raises(ConfigError, match=r"compare.yaml:\d+: config key 'method_overrides'.*steps"):
        compare.load_compare_config(recipe)
    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, instruct_file, eval_files, methods=["kd", "nope"])
    with pytest.raises(ConfigError, match="config key 'methods'.*nope"):
        compare.load_compare_config(recipe)
    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, instruct_file, eval_files)
    with pytest.raises(ConfigError, match="unknown config key 'eval_seed'"):
        compare.load_compare_config(recipe, ["eval_seed=1"])
    config = compare.load_compare_config(recipe, ["train.steps=7", "method_overrides.kd.kd_ratio=0.2"])
    assert config.train["steps"] == 7 and config.method_overrides["kd"] == {"kd_ratio": 0.2}
    kd = compare.method_config(config, "kd")
    assert (kd.method, kd.steps, kd.kd_ratio, kd.save_every, kd.keep_checkpoints) == ("kd", 7, 0.2, 2, 4)
    assert kd.output_dir == str(tmp_path / "cmp" / "kd") and kd.student == str(tiny_llama_student)
