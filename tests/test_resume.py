"""Runs that survive: a run SIGKILLed after a checkpoint (or in the middle of writing one)
and resumed ends exactly where an uninterrupted run ends.

Every run here is a real child process (`tests/run_training.py`, one thread, fp32, CPU),
so "exact" means bit-identical: same final student tensors, same method artifacts
(e.g. PromptKD's soft prompt), same metrics rows (wall-clock throughput aside).
The recipes are six steps with a checkpoint every two, so the kill lands after
checkpoint-4 with step 5 already logged: the resumed run must drop that row, restore
the optimisers, schedules, data position, RNG streams (on-policy sampling, GKD's coin)
and the soft prompt, and redo step 5 identically. (Method state such as DistiLLM's replay
buffer is checked in-process in test_trainer.py, which is cheaper than two more children.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA_DIR
from run_training import recipe, run_child, run_child_until

# Measurements of the machine (wall-clock throughput, the process's peak memory so far) are
# the only metrics allowed to differ between two runs.
TIMING_KEYS = {"tokens_per_s", "peak_rss_mb"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return out


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_run(reference: Path, resumed: Path) -> None:
    ref, got = weights(reference / "student"), weights(resumed / "student")
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"final student differs from the uninterrupted run in {differ}"
    ref_extra, got_extra = weights(reference), weights(resumed)  # method artifacts, e.g. the soft prompt
    assert ref_extra.keys() == got_extra.keys()
    assert all(torch.equal(ref_extra[k], got_extra[k]) for k in ref_extra), "method artifacts differ"
    assert metrics(reference) == metrics(resumed)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("promptkd", {}), ("gkd", {}), ("step_by_step", {}),
                                           ("gkd", {"student_lora": {"r": 4, "alpha": 8.0}})],
                         ids=["promptkd", "gkd", "step_by_step", "gkd-lora"])
def test_run_killed_after_checkpoint_resumes_bit_identical(method, extra, tmp_path, tiny_llama, tiny_llama_student,
                                                           instruct_file):
    config = recipe(method, tmp_path, tiny_llama, tiny_llama_student, instruct_file, DATA_DIR, **extra)
    reference, killed, log = tmp_path / "reference", tmp_path / "killed", tmp_path / "child.log"

    # One child: the uninterrupted reference run, then the same recipe stalled after step 5 and SIGKILLed.
    code = run_child_until([str(config), f"output_dir={reference}", "--", str(config), f"output_dir={killed}"],
                           log, marker=killed / "STALLED", LMDISTILL_TEST_STALL_AT_STEP="5")
    assert code == -9, f"child was not killed (exit {code}):\n{log.read_text()[-3000:]}"
    assert checkpoint_steps(killed) == [2, 4]
    assert [row["step"] for row in metrics(killed)] == [1, 2, 3, 4, 5]
    assert not (killed / "student").exists()

    code = run_child([str(config), f"output_dir={killed}", "--resume"], log)
    assert code == 0, log.read_text()[-3000:]
    assert f"resumed from {killed / 'checkpoint-4'} at step 4" in log.read_text()
    assert_same_run(reference, killed)
    assert checkpoint_steps(killed) == [4, 6]  # keep_checkpoints: 2
    if extra:  # a LoRA run's checkpoints and adapter folder hold the adapters alone
        assert (killed / "checkpoint-6/student/adapter_config.json").exists()
        a, b = (weights(run / "student_adapter") for run in (reference, killed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_llama, tiny_llama_student,
                                                                 instruct_file):
    config = recipe("sft", tmp_path, tiny_llama, tiny_llama_student, instruct_file, DATA_DIR, steps=4)
    reference, killed, log = tmp_path / "reference", tmp_path / "killed", tmp_path / "child.log"

    # SIGKILL lands inside checkpoint-4's write: the student is on disk, the trainer state is not.
    code = run_child_until([str(config), f"output_dir={reference}", "--", str(config), f"output_dir={killed}"],
                           log, marker=None, LMDISTILL_TEST_KILL_IN_CHECKPOINT="4")
    assert code == -9, f"child was not killed (exit {code}):\n{log.read_text()[-3000:]}"
    partial = list(killed.glob(".tmp-checkpoint-4-*"))
    assert len(partial) == 1 and (partial[0] / "student").is_dir() and not (partial[0] / "COMPLETE").exists()
    assert checkpoint_steps(killed) == [2]
    assert (killed / "checkpoint-2" / "COMPLETE").exists()

    code = run_child([str(config), f"output_dir={killed}", "resume=true"], log)
    assert code == 0, log.read_text()[-3000:]
    assert f"resumed from {killed / 'checkpoint-2'} at step 2" in log.read_text()
    assert not list(killed.glob(".tmp-checkpoint-*")), "the half-written checkpoint was not cleaned up"
    assert_same_run(reference, killed)
