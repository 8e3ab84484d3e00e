import json

from lmdistill.cli import main


def test_train_then_eval_from_the_command_line(tiny_llama_student, instruct_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: sft\nstudent: {tiny_llama_student}\ntrain_data: {instruct_file}\n"
                      f"output_dir: {tmp_path / 'run'}\nprompt_format: alpaca\nsteps: 2\nbatch_size: 2\n")
    assert main(["train", str(recipe), "progress=false", "lr=1e-3"]) == 0
    assert "student (Hugging Face format)" in capsys.readouterr().out
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(tmp_path / "run" / "student"), "--data", str(instruct_file),
                 "--max-examples", "2", "--seeds", "1", "--max-new-tokens", "4", "--prompt-format", "alpaca",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())


def test_cli_errors_are_one_clear_line_with_exit_code_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sft\nstudent: x\ntrain_data: d.jsonl\nbogus: 1\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:4: unknown config key 'bogus'" in err and "Traceback" not in err


def test_prune_command(tiny_llama, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_llama), "--keep-layers", "0,2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "config.json").exists()
