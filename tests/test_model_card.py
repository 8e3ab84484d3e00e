"""Model cards on every saved student and adapter (YAML front matter + Markdown naming the
method, teacher, data, budget and evaluations), and `lmdistill push` up to the upload call
(the Hub cannot be reached here: a recording stand-in for `HfApi` takes the calls)."""

import json
import re

import yaml

from kd_testing import make_trainer
from lmdistill.cli import main
from lmdistill.model_card import model_identity, push


def card(folder):
    text = (folder / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n\n(.*)", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def test_every_saved_folder_gets_a_card_naming_method_teacher_data_and_evaluations(
        tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    run = tmp_path / "run"
    dev = tmp_path / "dev.jsonl"  # prompts the training data does not hold (the contamination guard drops those)
    dev.write_text("".join(json.dumps({"prompt": f"Name a colour ({i}).", "output": "Blue."}) + "\n" for i in (1, 2)))
    make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, run, steps=2, lmbda=1.0,
                 student_lora="{r: 4}", eval_every=2, eval_data=dev, eval_examples=2,
                 eval_max_new_tokens=4).train()
    for folder, library in [(run / "student", "transformers"), (run / "student_adapter", "peft"),
                            (run / "best", "transformers")]:
        meta, body = card(folder)
        assert meta["library_name"] == library
        assert meta["tags"][:2] == ["distillation", "gkd"] and "lora" in meta["tags"]
        assert meta["pipeline_tag"] == "text-generation"
        assert "GKD" in body or "generalized KD" in body
        assert f"**Teacher:** `{tiny_llama}`" in body and f"`{instruct_file}`" in body
        assert "LoRA:** r 4" in body and "Trained parameters:" in body
        recipe = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
        assert recipe["method"] == "gkd" and recipe["student_lora"]["r"] == 4
    _, body = card(run / "student")
    dev = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "dev_rougeL" in line]
    assert f"| 2 | rougeL | {dev[0]['dev_rougeL']:.4f} |" in body  # the run's own evaluation figures


def test_identity_and_license_come_from_aliases_and_local_cards(tmp_path):
    assert model_identity("smollm2-135m-instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert model_identity("Qwen/Qwen2.5-7B-Instruct") == ("Qwen/Qwen2.5-7B-Instruct", None)
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "README.md").write_text("---\nbase_model: owner/base\nlicense: mit\n---\n\n# a model\n")
    assert model_identity(str(folder)) == ("owner/base", "mit")
    assert model_identity(str(tmp_path / "nothing-here/x")) == (None, None)


class RecordingHub:
    """Takes `HfApi`'s calls; the real Hub is out of reach on this machine."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        from pathlib import Path

        kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/0"})()


def test_push_uploads_the_student_or_the_adapter_with_a_fresh_card(tiny_llama, tiny_llama_student, instruct_file,
                                                                    tmp_path):
    run = tmp_path / "run"
    make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, run, steps=1, student_lora="{r: 2}").train()
    # The results file as `lmdistill eval --out` writes it (the real producer, not a hand-made copy).
    assert main(["eval", "--model", str(run / "student"), "--data", str(instruct_file), "--max-examples", "2",
                 "--seeds", "10,20", "--max-new-tokens", "4", "--prompt-format", "alpaca",
                 "--out", str(run / "eval_dolly.json")]) == 0
    ((dataset, written),) = json.loads((run / "eval_dolly.json").read_text()).items()
    hub = RecordingHub()
    url = push(run, "me/tiny-kd", api=hub)
    assert url.endswith("/commit/0")
    (_, repo, create), (_, repo2, upload) = hub.calls
    assert repo == repo2 == "me/tiny-kd" and create == {"private": False, "exist_ok": True}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(upload["files"])
    expected = f"`eval_dolly.json`: {dataset}: ROUGE-L {written['rougeL_mean']:.2f} ± {written['rougeL_std']:.2f}"
    assert expected in card(run / "student")[1]  # added after training, in the card
    push(run, "me/tiny-kd-adapter", adapter=True, api=hub)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.calls[-1][2]["files"])
    assert card(run / "student_adapter")[0]["library_name"] == "peft"


def test_push_names_what_is_missing(tmp_path):
    import pytest

    from lmdistill.data import DataError

    (tmp_path / "run").mkdir()
    with pytest.raises(DataError, match="no saved student"):
        push(tmp_path / "run", "me/x", api=RecordingHub())


def test_the_usage_code_is_valid_python_for_any_folder_name(tiny_llama_student, instruct_file, tmp_path):
    import ast

    from lmdistill.methods import load_config
    from lmdistill.model_card import model_card

    run = tmp_path / 'my "best" run\\x'
    config = load_config(None, ["method=sft", f"student={tiny_llama_student}", f"train_data={instruct_file}"])
    for adapter, folder in ((False, "student"), (True, "student_adapter")):
        code = model_card(config, run, adapter=adapter).split("```python\n")[1].split("```")[0]
        calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)]
        assert calls and all(c.args[0].value == f"{run.name}/{folder}" for c in calls)


def test_push_checks_the_repo_id_the_token_and_the_hub_before_anything_else(tmp_path, monkeypatch, capsys):
    """No run folder is even needed to be told: the id, then the token, then the Hub come first."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    run = str(tmp_path / "no-run")

    def error(*argv):
        code = main(["push", run, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and not any("Traceback" in line for line in err), err
        (line,) = [line for line in err if line.startswith("lmdistill push: error: ")]
        return line

    assert "repo id 'me/bad id!'" in error("me/bad id!")
    assert "no Hugging Face token" in error("me/tiny")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert "the Hugging Face Hub cannot be reached" in error("me/tiny")  # this machine is offline


def test_every_method_describes_itself_for_the_card():
    """Each method class carries its one-line description (the card's method line): none is missing."""
    from lmdistill.methods import METHODS

    missing = [name for name, cls in METHODS.items() if not cls.description.strip()]
    assert not missing, f"methods without a description: {missing}"
