"""Loop-level behaviour of the shared trainer: the non-finite guard, refusing to clobber
a run, resume details (damaged checkpoints, cut-off metrics, method state), and the
multi-process launch check. Tiny SFT / DistiLLM runs on a 2-layer Llama, in-process."""

from __future__ import annotations

import json
import logging
import math
import os
import signal

import numpy as np
import pytest
import torch

from conftest import DATA_DIR
from lmdistill import checkpoint as ckpt
from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.methods import METHODS
from lmdistill import run_state
from lmdistill.run_state import rng_state
from lmdistill.trainer import Trainer, TrainingError
from run_training import recipe


def sft_config(tiny_llama_student, instruct_file, tmp_path, *overrides):
    base = ["method=sft", f"student={tiny_llama_student}", f"train_data={instruct_file}",
            f"output_dir={tmp_path / 'run'}", "prompt_format=alpaca", "max_prompt_length=128", "max_length=160",
            "batch_size=2", "steps=4", "lr=1e-2", "lr_schedule=constant", "progress=false", "precision=fp32"]
    return load_config(None, base + list(overrides))


def advance(trainer: Trainer, steps: int) -> list[dict]:
    """What `Trainer.train` does per step, without the final save."""
    out = []
    for _ in range(steps):
        out.append(trainer.train_step())
        trainer.step += 1
    return out


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def poison_loss(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the method's loss NaN (with its graph intact) on the given 0-based steps."""
    original = trainer.updates["student"].loss

    def loss(work, step):
        value, logs = original(work, step)
        if step in bad_steps:
            value = value * float("nan")
            logs = {**logs, "loss": float("nan")}
        return value, logs

    trainer.updates["student"].loss = loss


# ----- the non-finite guard -----

def test_nonfinite_loss_skips_the_step_and_leaves_weights_and_optimizer_untouched(
        tiny_llama_student, instruct_file, tmp_path):
    trainer = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path))
    poison_loss(trainer, {1})
    student = trainer.method.unwrapped_student
    advance(trainer, 1)
    weights = snapshot(student)
    optimizer = {k: v.clone() for k, v in trainer.optimizers["student"].state_dict()["state"][0].items()}

    (logs,) = advance(trainer, 1)
    assert logs["skipped"] == 1.0 and logs["nonfinite_term"] == "loss"
    assert trainer.skipped_steps == 1 and trainer.nonfinite_in_a_row == 1
    for k, v in student.state_dict().items():
        assert torch.equal(v, weights[k]), f"{k} changed on a skipped step"
    for k, v in trainer.optimizers["student"].state_dict()["state"][0].items():
        assert torch.equal(v, optimizer[k]), f"optimizer {k} changed on a skipped step"
    assert all(p.grad is None for p in student.parameters()), "gradients of the skipped step were kept"

    (logs,) = advance(trainer, 1)  # the next finite step trains again and resets the streak
    assert "skipped" not in logs and trainer.nonfinite_in_a_row == 0
    assert any(not torch.equal(v, weights[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_nonfinite_gradient_with_finite_loss_is_caught_with_or_without_clipping(
        clip, tiny_llama_student, instruct_file, tmp_path):
    trainer = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, f"max_grad_norm={clip}"))
    student = trainer.method.unwrapped_student
    weights = snapshot(student)
    hook = student.model.norm.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    (logs,) = advance(trainer, 1)
    hook.remove()
    assert math.isfinite(logs["loss"])
    assert logs["skipped"] == 1.0 and logs["nonfinite_term"] == "student gradient"
    assert all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())


def test_too_many_nonfinite_steps_stop_the_run_naming_step_term_and_last_checkpoint(
        tiny_llama_student, instruct_file, tmp_path):
    config = sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=8", "save_every=2",
                        "max_nonfinite_steps=2")
    trainer = Trainer(config)
    poison_loss(trainer, {2, 3, 4, 5, 6})  # steps 3.. are NaN; the 3rd in a row (step 5) stops the run
    with pytest.raises(TrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert "step 5" in message and "non-finite loss" in message and "3 steps in a row" in message
    assert "max_nonfinite_steps=2" in message and str(tmp_path / "run" / "checkpoint-4") in message
    # Skipped steps change nothing, so checkpoint-4 holds the weights after step 2 and loads.
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]
    state = ckpt.load_state(tmp_path / "run" / "checkpoint-4")
    assert state["step"] == 4 and state["skipped_steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", 0.0) for r in rows] == [0.0, 0.0, 1.0, 1.0]  # step 5 raised before logging


def test_a_diverged_model_is_never_checkpointed(tiny_llama_student, instruct_file, tmp_path):
    trainer = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path))
    with torch.no_grad():
        trainer.method.unwrapped_student.model.norm.weight[0] = float("nan")
    with pytest.raises(TrainingError, match="student parameter 'model.norm.weight' is non-finite"):
        run_state.save_checkpoint(trainer)
    assert ckpt.list_checkpoints(tmp_path / "run") == []


# ----- stopping cleanly -----

def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resume_matches(tiny_llama_student, instruct_file,
                                                                          tmp_path):
    """SIGTERM (a machine being reclaimed) goes through the same handler as Ctrl-C."""
    reference = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, f"output_dir={tmp_path / 'ref'}",
                                   "steps=3"))
    reference.train()
    trainer = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=3"))
    original = trainer.updates["student"].loss
    handlers = {}

    def loss(work, step):
        if step == 1:
            handlers.update({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)})
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 2
        return original(work, step)

    trainer.updates["student"].loss = loss
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt, match="stopped after step 2; checkpoint written"):
        trainer.train()
    assert handlers[signal.SIGINT] is handlers[signal.SIGTERM] is not before[signal.SIGINT]
    assert {sig: signal.getsignal(sig) for sig in before} == before, "the previous handlers were not restored"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]

    Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=3", "resume=true")).train()
    expected, got = _student(tmp_path / "ref" / "student"), _student(tmp_path / "run" / "student")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def _student(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ----- starting, resuming -----

def test_fresh_run_refuses_a_folder_holding_checkpoints(tiny_llama_student, instruct_file, tmp_path):
    Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=2")).train()
    written = [p.name for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert "model.safetensors" in written and "state.safetensors" in written
    assert not [n for n in written if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], "pickle written"
    with pytest.raises(ConfigError, match=r"config key 'output_dir'.*checkpoint-2.*resume=true"):
        Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=2"))


def test_resume_without_a_checkpoint_starts_at_step_zero(tiny_llama_student, instruct_file, tmp_path, caplog):
    trainer = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "resume=true"))
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        assert run_state.resume(trainer) is False
    assert trainer.step == 0 and "no complete checkpoint" in caplog.text


def test_resume_skips_a_damaged_checkpoint_and_drops_metrics_after_the_one_used(
        tiny_llama_student, instruct_file, tmp_path):
    run = tmp_path / "run"
    Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "save_every=2", "keep_checkpoints=3")).train()
    (run / "checkpoint-4" / "state.safetensors").write_bytes(b"\x00" * 10)  # e.g. a disk error
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a row cut off by the crash
    trainer = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "save_every=2", "resume=true"))
    assert run_state.resume(trainer) and trainer.step == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_resume_refuses_another_method_or_global_batch(tiny_llama_student, instruct_file, tmp_path):
    Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=1")).train()
    other = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=1", "resume=true", "batch_size=4"))
    with pytest.raises(TrainingError, match="global batch of 2 examples, this run has 4"):
        run_state.resume(other)
    state = ckpt.load_state(tmp_path / "run" / "checkpoint-1")
    state["method_name"] = "kd"
    ckpt.save_state(state, tmp_path / "run" / "checkpoint-1")
    again = Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path, "steps=1", "resume=true"))
    with pytest.raises(TrainingError, match="written by method 'kd', cannot resume it as method 'sft'"):
        run_state.resume(again)


def same(a, b) -> bool:
    """Deep equality of nested state with tensors (exact)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# Known gap, tracked here so that the fix flips this to a (strict) failure to remove the mark:
# MiniLLM keeps its current rollout (samples, old log-probs, returns) between PPO steps but
# not in Method.state_dict(), so a resume in the middle of a rollout samples a new one.
KNOWN_INEXACT: dict[str, str] = {}  # method -> why its resume is not exact (none today)
# Proven bit-exact after a real SIGKILL in test_resume.py (finetune/distill are step_by_step
# with the rationale task off: the same code and no state of their own).
COVERED_BY_SUBPROCESS = {"promptkd", "gkd", "step_by_step", "finetune", "distill"}


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.xfail(reason=KNOWN_INEXACT[m], strict=True))
                                    if m in KNOWN_INEXACT else m for m in sorted(METHODS)
                                    if m not in COVERED_BY_SUBPROCESS])
def test_every_method_resumes_exactly_in_process(method, tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    """Checkpoint after step 2 of 3; a fresh trainer resumed from it has the same method state
    and RNG streams and takes step 3 exactly as the original does (same process, same
    threads: bit-identical). Catches state the checkpoint misses (`Method.state_dict`):
    replay buffers, schedules, stored rollouts."""
    path = recipe(method, tmp_path, tiny_llama, tiny_llama_student, instruct_file, DATA_DIR, steps=3, grad_accum=1,
                  max_new_tokens=6)
    first = Trainer(load_config(path, [f"output_dir={tmp_path / 'run'}"]))
    advance(first, 2)
    saved, rng = first.method.state_dict(), rng_state()
    if method == "distillm":  # the recipe must exercise the state it means to check
        assert saved["buffer"]["prompts"] and saved["schedule"]["reference_loss"] is not None
    run_state.save_checkpoint(first)
    logs_first = advance(first, 1)

    second = Trainer(load_config(path, [f"output_dir={tmp_path / 'run'}", "resume=true"]))
    assert run_state.resume(second) and second.step == 2
    assert same(second.method.state_dict(), saved), f"{method}: method state differs after resume"
    assert same(rng_state(), rng)
    logs_second = advance(second, 1)
    pairs = zip(first.method.unwrapped_student.state_dict().items(),
                second.method.unwrapped_student.state_dict().items())
    differ = [k for (k, a), (_, b) in pairs if not torch.equal(a, b)]
    assert not differ and same(logs_first, logs_second), (
        f"{method}: the resumed step differs from the uninterrupted one (weights {differ[:3]}, logs "
        f"{logs_first} vs {logs_second}); some state the step depends on is not in Method.state_dict()"
    )


def test_multi_process_launch_that_set_up_one_process_is_refused(
    tiny_llama_student, instruct_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. `accelerate launch --multi_gpu` on a CPU-only machine
    with pytest.raises(TrainingError, match="launched as 2 processes.*ACCELERATE_USE_CPU=1"):
        Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path))


# ----- an update touches only its own module -----


def promptkd_trainer(tiny_llama, tiny_llama_student, instruct_file, tmp_path) -> Trainer:
    return Trainer(
        load_config(
            None,
            [
                "method=promptkd",
                f"student={tiny_llama_student}",
                f"teacher={tiny_llama}",
                f"train_data={instruct_file}",
                f"output_dir={tmp_path / 'run'}",
                "prompt_format=alpaca",
                "batch_size=2",
                "steps=3",
                "max_new_tokens=12",
                "lr=1e-3",
                "warmup_steps=0",
                "progress=false",
                "precision=fp32",
            ],
        )
    )


def test_each_update_changes_and_takes_gradients_from_its_own_module_only(
    tiny_llama, tiny_llama_student, instruct_file, tmp_path
):
    """PromptKD's two updates on one batch of samples: the prompt update leaves the student as it
    was, and the student update applies exactly the gradient of its own loss (reverse KL to the
    updated prompted teacher), nothing carried over from the prompt update."""
    trainer = promptkd_trainer(tiny_llama, tiny_llama_student, instruct_file, tmp_path)
    method = trainer.method
    student = method.unwrapped_student
    torch.manual_seed(0)
    samples = method.prepare(trainer.micro_batches()[0], 0)

    student_before = snapshot(student)
    trainer.update("soft_prompt", [samples])
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items()), (
        "prompt update moved the student"
    )
    assert all(p.grad is None for p in student.parameters())

    # The gradient the student optimiser steps with ...
    seen = {}
    optimizer = trainer.optimizers["student"]

    def capture(optimizer, args, kwargs):  # a step pre-hook: replacing .step would upset the lr scheduler
        seen.update({n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None})

    getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(capture)  # accelerate wraps the torch one
    # ... against the student loss alone, backpropagated from clean gradients.
    loss, _ = method.student_loss(samples, 0)
    expected = dict(
        zip([n for n, _ in student.named_parameters()], torch.autograd.grad(loss, list(student.parameters())))
    )
    prompt_before = method.soft_prompt.embeddings.detach().clone()
    trainer.update("student", [samples])
    assert torch.equal(method.soft_prompt.embeddings.detach(), prompt_before), "student update moved the prompt"
    assert seen.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(
            seen[name], grad, rtol=1e-5, atol=1e-8, msg=f"student gradient of {name} is not its loss's"
        )


def test_an_update_that_leaks_a_gradient_into_another_module_stops_the_run(
    tiny_llama, tiny_llama_student, instruct_file, tmp_path, monkeypatch
):
    """The loop's guard: reproduce PromptKD's old bug (the student's head not detached in the
    prompt loss) and the first prompt update fails, naming both modules."""
    import lmdistill.methods.promptkd as promptkd

    monkeypatch.setattr(promptkd, "fixed", lambda head: head)
    trainer = promptkd_trainer(tiny_llama, tiny_llama_student, instruct_file, tmp_path)
    student_before = snapshot(trainer.method.unwrapped_student)
    with pytest.raises(TrainingError, match="'soft_prompt' update put a gradient into 'student'"):
        trainer.train_step()
    assert all(torch.equal(v, student_before[k]) for k, v in trainer.method.unwrapped_student.state_dict().items())


def test_a_cpu_launch_asking_for_fsdp_stops_instead_of_running_ddp(tiny_llama_student, instruct_file, tmp_path,
                                                                  monkeypatch):
    # Accelerate applies FSDP only on GPU backends; on CPU it would quietly replicate the student.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TrainingError, match="asks for FSDP, but Accelerate set up NO .*fsdp_gpu.yaml"):
        Trainer(sft_config(tiny_llama_student, instruct_file, tmp_path))
