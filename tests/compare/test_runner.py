"""`lmdistill compare` on tiny models: the protocol stages, each method's start and optimiser settings,
dev selection, the table, failures reported, finished runs not rerun."""

import json

import pytest
import yaml

from conftest import DATA_DIR
from lmdistill.compare import runner
from lmdistill.compare.config import load_compare_config
from lmdistill.config import ConfigError



def configs_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def eval_files(tmp_path):
    """Two small evaluation sets of short rows that are not in the training file."""
    files = []
    for name, source in (("dolly", "instruct/dolly/valid.jsonl"), ("vicuna", "instruct/vicuna/valid.jsonl")):
        rows = [r for r in map(json.loads, (DATA_DIR / source).read_text().splitlines()) if len(r["prompt"]) < 300]
        (tmp_path / "eval" / name).mkdir(parents=True)
        files.append(tmp_path / "eval" / name / "valid.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return files


@pytest.fixture
def train_file(tmp_path):
    """24 short Dolly dev rows: the first 4 become the dev split."""
    rows = [r for r in map(json.loads, (DATA_DIR / "instruct/dolly/dev.jsonl").read_text().splitlines())
            if len(r["prompt"]) + len(r["output"]) < 500][:24]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(tmp_path, tiny_llama, tiny_llama_student, train_file, eval_files, **extra):
    recipes = {name: str(configs_dir() / f"{name}_dolly.yaml") for name in ("kd", "gkd", "distillm")}
    recipe = {
        "output_dir": str(tmp_path / "cmp"), "student": str(tiny_llama_student), "teacher": str(tiny_llama),
        "methods": ["kd", "gkd", "distillm"], "recipes": recipes,
        "train": {"train_data": str(train_file), "steps": 2, "batch_size": 2, "max_new_tokens": 4,
                  "prompt_format": "alpaca", "max_length": 160, "max_prompt_length": 128, "progress": False,
                  "precision": "fp32"},
        "teacher_sft_recipe": str(configs_dir() / "teacher_sft_dolly.yaml"),
        "student_init_recipe": str(configs_dir() / "student_init_dolly.yaml"),
        "dev_examples": 4, "eval_every": 1,
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


def test_compare_runs_the_protocol_and_each_methods_settings(tiny_llama, tiny_llama_student, train_file, eval_files,
                                                             tmp_path, monkeypatch):
    from lmdistill.cli import main

    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, train_file, eval_files)
    assert main(["compare", str(recipe)]) == 0
    out = tmp_path / "cmp"
    table = (out / "comparison.md").read_text()
    rouge_table = table.split("## Each run")[0]
    rows = {line.split("|")[1].strip(): line for line in rouge_table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"model", "teacher", "initial student", "student init", "kd", "gkd", "distillm"}
    for name in ("teacher", "initial student", "student init", "kd", "gkd"):
        assert rows[name].count("±") == 2, rows[name]
    assert "failed: DataError" in rows["distillm"] and "missing.jsonl" in rows["distillm"]

    # Stage 0 fine-tuned the teacher, stage 1 built the init; both selected on the dev split.
    teacher = out / "teacher_sft" / "best"
    init = out / "student_init" / "best"
    assert (teacher / "config.json").exists() and (init / "config.json").exists()
    stage0 = yaml.safe_load((out / "teacher_sft" / "config.yaml").read_text())
    assert (stage0["student"], stage0["lr"], stage0["eval_data"]) == (str(tiny_llama), 5e-5, str(out / "dev.jsonl"))
    dev_prompts = [json.loads(line)["instruction"] for line in (out / "dev.jsonl").read_text().splitlines()]
    assert len(dev_prompts) == 4

    # Each method from its reference's start, with the fine-tuned teacher and its recipe's optimiser.
    configs = {name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in ("kd", "gkd")}
    assert configs["kd"]["student"] == str(tiny_llama_student)
    assert configs["gkd"]["student"] == str(init)
    assert configs["kd"]["teacher"] == configs["gkd"]["teacher"] == str(teacher)
    assert (configs["kd"]["lr"], configs["kd"]["lr_schedule"], configs["kd"]["weight_decay"]) == (5e-4, "cosine", 0.01)
    assert configs["gkd"]["temperature"] == 0.9
    for config in configs.values():
        assert (config["steps"], config["train_data"], config["eval_data"]) == (2, str(train_file),
                                                                                str(out / "dev.jsonl"))
        assert set(config["test_data"]) == {str(f) for f in eval_files}
    # The dev rows never trained: the guard dropped them from every run (20 of 24 rows left).
    from lmdistill.instruct.data import load_training_data
    from lmdistill.methods import load_config

    kd = load_config(out / "kd" / "config.yaml", ["resume=false", f"output_dir={tmp_path / 'x'}"])
    assert len(load_training_data(kd)) == 20
    # The selected checkpoint was evaluated, and the settings table says which and each run's lr.
    settings = table.split("## Each run's start and optimiser settings")[1]
    assert "| kd | kd | `" in settings and "| 0.0005 | cosine |" in settings and "best/ (step" in settings
    assert (out / "comparison.png").stat().st_size > 1000
    results = json.loads((out / "comparison.json").read_text())
    assert results["results"]["kd"]["dolly"]["seeds"] == [1, 2]
    assert results["runs"]["gkd"]["lr"] == 5e-4 and results["runs"]["teacher_sft"]["lr"] == 5e-5
    for name in ("kd", "gkd"):
        assert not list((out / name).glob("checkpoint-*"))  # cleaned once finished
        curve = json.loads((out / name / "exposure_bias.json").read_text())
        assert sorted(curve, key=int) == ["0", "2"] and len(curve["2"]["exacc_err"]) == 3

    # Repeating the command: finished stages, methods and reference rows are neither retrained nor re-evaluated.
    trained, evaluated = [], []
    original_train, original_eval = runner.train_method, runner.evaluate_model
    monkeypatch.setattr(runner, "train_method", lambda config: trained.append(config.output_dir) or
                        original_train(config))
    monkeypatch.setattr(runner, "evaluate_model", lambda cc, spec: evaluated.append(spec) or original_eval(cc, spec))
    runner.run_compare(load_compare_config(recipe))
    assert trained == [str(out / "distillm")] and evaluated == []
    assert (out / "comparison.md").read_text() == table

    # A repeat with another budget or evaluation must not mix its numbers with the stored ones.
    with pytest.raises(ConfigError, match=r"teacher/eval.json.*evaluation\.eval_seeds"):
        runner.run_compare(load_compare_config(recipe, ["eval_seeds=[1,3]"]))
    with pytest.raises(ConfigError, match=r"kd/eval.json.*training\.steps.*new output_dir"):
        runner.run_compare(load_compare_config(recipe, ["train.steps=3"]))


def test_compare_config_errors_name_the_key(tiny_llama, tiny_llama_student, train_file, eval_files, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, train_file, eval_files,
                          method_overrides={"kd": {"steps": 10}})
    with pytest.raises(ConfigError, match=r"compare.yaml:\d+: config key 'method_overrides'.*steps"):
        load_compare_config(recipe)
    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, train_file, eval_files, methods=["kd", "nope"])
    with pytest.raises(ConfigError, match="config key 'methods'.*nope"):
        load_compare_config(recipe)
    recipe = write_recipe(tmp_path, tiny_llama, tiny_llama_student, train_file, eval_files)
    with pytest.raises(ConfigError, match="unknown config key 'eval_seed'"):
        load_compare_config(recipe, ["eval_seed=1"])
    # The shared block is the budget: one lr for every method is refused.
    with pytest.raises(ConfigError, match=r"config key 'train'.*optimiser settings come from each method's recipe"):
        load_compare_config(recipe, ["train.lr=1e-4"])
    config = load_compare_config(recipe, ["train.steps=7", "method_overrides.kd.kd_ratio=0.2",
                                          "method_overrides.kd.lr=0.001"])
    assert config.train["steps"] == 7 and config.method_overrides["kd"] == {"kd_ratio": 0.2, "lr": 1e-3}
    protocol = runner.Protocol(str(tiny_llama), "init-folder", None)
    kd = runner.method_config(config, "kd", protocol)
    assert (kd.method, kd.steps, kd.kd_ratio, kd.lr, kd.save_every, kd.keep_checkpoints) == ("kd", 7, 0.2, 1e-3, 2, 4)
    assert kd.output_dir == str(tmp_path / "cmp" / "kd") and kd.student == str(tiny_llama_student)
    assert runner.method_config(config, "gkd", protocol).student == "init-folder"
    # A warm-up is scaled with the steps: PromptKD's recipe warms up 46 of its 500 steps.
    config = load_compare_config(recipe, ["methods=[promptkd]", "recipes={}", "method_overrides={}",
                                          "train.steps=100"])
    config.recipes = {"promptkd": str(configs_dir() / "promptkd_dolly.yaml")}
    assert runner.method_config(config, "promptkd", protocol).warmup_steps == round(46 * 100 / 500)
