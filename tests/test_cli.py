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


def test_eval_loads_the_weights_in_the_precision_asked_for(tiny_llama, instruct_file, monkeypatch, capsys):
    import torch

    import lmdistill.models as models

    dtypes, real = [], models.load_model

    def spy(spec, dtype=torch.float32, *args, **kwargs):
        dtypes.append(dtype)
        return real(spec, dtype, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", spy)
    common = ["eval", "--model", str(tiny_llama), "--data", str(instruct_file), "--max-examples", "1", "--seeds", "1",
              "--max-new-tokens", "2", "--prompt-format", "alpaca"]
    assert main(common + ["--precision", "bf16"]) == 0 and main(common) == 0
    assert dtypes == [torch.bfloat16, torch.float32]


def test_cli_errors_are_one_clear_line_with_exit_code_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sft\nstudent: x\ntrain_data: d.jsonl\nbogus: 1\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:4: unknown config key 'bogus'" in err and "Traceback" not in err


def test_prune_command(tiny_llama, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_llama), "--keep-layers", "0,2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "config.json").exists()


def test_every_command_in_the_readme_parses():
    """The README's `lmdistill ...` lines are read by the real parser (an example that lacks a
    required flag, e.g. `eval` without --model, fails here rather than for a reader)."""
    import re
    import shlex
    from pathlib import Path

    from lmdistill.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands, language = [], None  # language: of the open code block, None outside one
    for line in text.splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            language = None if language is not None else fence.group(1)
        elif language in ("", "bash", "sh", "shell") and line.strip().startswith("lmdistill "):
            commands.append(line.strip())
    assert len(commands) >= 5
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command, comments=True)[1:])
        except SystemExit:
            raise AssertionError(f"README command does not parse: {command}") from None
