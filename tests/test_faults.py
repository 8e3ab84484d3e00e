"""Faults during a run (issue 28; the table is docs/reliability.md): a failed save, a failing
tracker, a damaged checkpoint, a resume with other settings. Each ends with ONE `error:` line
(exit status 2, no traceback) or a warning, and keeps what was already computed."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import DATA_DIR
from lmdistill import checkpoint as ckpt
from lmdistill import cli
from run_training import recipe


def one_error(capsys, code: int, command: str = "train") -> str:
    """The single `error:` line of a command that failed cleanly (exit 2, no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"lmdistill {command}: error: ")]
    assert code == 2 and len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.fixture
def sft(tmp_path, tiny_llama, tiny_llama_student, instruct_file):
    """A tiny sft recipe: 4 steps, a checkpoint every 2; returns (recipe path, run folder)."""
    path = recipe("sft", tmp_path, tiny_llama, tiny_llama_student, instruct_file, DATA_DIR, steps=4,
                  grad_accum=1, report_to=["none"])
    return str(path), tmp_path / "run"


@pytest.fixture
def small_disk(monkeypatch):
    """limit(after_step): from then on no file may exceed 8 MB, as under `ulimit -f 8000` (Python
    ignores SIGXFSZ, so a write past it fails with EFBIG, File too large): the tiny student's
    6.5 MB weights fit, a checkpoint's 13 MB of AdamW state does not. Lifted at the end."""
    import resource

    from lmdistill.trainer import Trainer

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    real_step = Trainer.train_step

    def limit(after_step: int) -> None:
        def train_step(self):
            if self.step == after_step:
                resource.setrlimit(resource.RLIMIT_FSIZE, (8_000_000, hard))
            return real_step(self)

        monkeypatch.setattr(Trainer, "train_step", train_step)

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_final_checkpoint_keeps_the_student_and_names_the_last_good_one(sft, small_disk, capsys):
    recipe_path, run = sft
    small_disk(after_step=2)  # checkpoint-2 is written, the final one does not fit
    message = one_error(capsys, cli.main(["train", recipe_path, f"output_dir={run}"]))
    assert "File too large" in message and f"{run / 'checkpoint-2'}" in message
    assert "student" in message
    assert load_file(str(run / "student" / "model.safetensors"))  # the student the user wanted is there
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not list(run.glob(".tmp-checkpoint-*"))


def test_a_failed_checkpoint_during_the_run_is_an_error_line_naming_what_is_kept(sft, small_disk, capsys):
    recipe_path, run = sft
    small_disk(after_step=0)
    message = one_error(capsys, cli.main(["train", recipe_path, f"output_dir={run}"]))
    assert "checkpoint-2" in message and "File too large" in message and "No checkpoint was written yet" in message
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".tmp-checkpoint-*"))


def test_a_failed_student_write_still_writes_the_last_checkpoint_and_resume_writes_the_student(sft, monkeypatch,
                                                                                                capsys):
    from lmdistill.trainer import Trainer

    recipe_path, run = sft
    real = Trainer.write_student

    def full_disk(self, folder, adapter=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "write_student", full_disk)
    message = one_error(capsys, cli.main(["train", recipe_path, f"output_dir={run}"]))
    assert f"{run / 'student'}: cannot write the student (No space left on device)" in message
    assert f"{run / 'checkpoint-4'}" in message and "--resume" in message
    monkeypatch.setattr(Trainer, "write_student", real)
    assert cli.main(["train", recipe_path, f"output_dir={run}", "--resume"]) == 0
    assert load_file(str(run / "student" / "model.safetensors"))


# ----- resume -----

def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_applies_a_changed_lr_and_steps_and_records_what_it_trains_with(sft, caplog):
    recipe_path, first = sft
    common = ["lr_schedule=constant", "warmup_steps=0"]
    assert cli.main(["train", recipe_path, *common, f"output_dir={first}", "steps=2"]) == 0
    run = first.rename(first.parent / "moved")  # a run folder moved before the resume
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        assert cli.main(["train", recipe_path, *common, f"output_dir={run}", "steps=4", "lr=5e-2", "--resume"]) == 0
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr_student"] for r in rows] == pytest.approx([1e-3, 1e-3, 5e-2, 5e-2])
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 5e-2
    assert "lr (0.001 -> 0.05)" in caplog.text and "steps (2 -> 4)" in caplog.text


def test_resume_with_settings_it_cannot_apply_is_refused_listing_the_keys(sft, capsys):
    recipe_path, run = sft
    assert cli.main(["train", recipe_path, f"output_dir={run}", "steps=2", "student_lora={r: 4, alpha: 8.0}"]) == 0
    capsys.readouterr()
    message = one_error(capsys, cli.main(["train", recipe_path, f"output_dir={run}", "steps=4",
                                          "student_lora={r: 8, alpha: 8.0}", "weight_decay=0.1", "--resume"]))
    assert "student_lora.r (4 -> 8)" in message and "weight_decay (0.0 -> 0.1)" in message
    assert f"{run / 'checkpoint-2'}" in message
    assert [r["step"] for r in metric_rows(run)] == [1, 2]  # nothing trained, nothing recorded


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(sft, caplog):
    recipe_path, run = sft
    assert cli.main(["train", recipe_path, f"output_dir={run}"]) == 0
    weights = run / "checkpoint-4" / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # e.g. a disk error after the write
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        assert cli.main(["train", recipe_path, f"output_dir={run}", "--resume"]) == 0
    assert f"{run / 'checkpoint-4'} is damaged" in caplog.text
    assert f"resumed from {run / 'checkpoint-2'} at step 2" in caplog.text
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3, 4]
    assert ckpt.load_state(run / "checkpoint-4")["step"] == 4  # the damaged one was written anew


def test_a_failed_best_write_keeps_the_previous_best_and_is_an_error_line(sft, monkeypatch, capsys, tmp_path):
    from lmdistill.trainer import Trainer

    recipe_path, run = sft
    dev = tmp_path / "dev.jsonl"  # prompts the training data does not hold
    dev.write_text("".join(json.dumps({"prompt": f"Name a colour ({i}).", "output": "Blue."}) + "\n" for i in (1, 2)))
    real = Trainer.write_student

    def full_disk_after_the_first_best(self, folder, adapter=False):
        if folder.name == "best.partial" and (run / "best").exists():
            (folder / "half-written").mkdir(parents=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, folder, adapter)

    monkeypatch.setattr(Trainer, "write_student", full_disk_after_the_first_best)
    monkeypatch.setattr(Trainer, "evaluate_dev", _improving(Trainer.evaluate_dev))
    message = one_error(capsys, cli.main(["train", recipe_path, f"output_dir={run}", "eval_every=2",
                                          f"eval_data={dev}", "eval_examples=2", "eval_max_new_tokens=2"]))
    assert f"{run / 'best'}: cannot write the best student so far (step 4" in message
    assert "No space left on device" in message and f"{run / 'checkpoint-2'}" in message
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 2
    assert not (run / "best.partial").exists()


def _improving(evaluate_dev):
    """Each dev evaluation scores better than the last (a random tiny student's ROUGE-L is often 0)."""
    def wrapped(self):
        score = self.step
        self.method.dev_score = lambda: ("rougeL", float(score))
        return evaluate_dev(self)
    return wrapped
