"""PromptKD on a tiny random-weight Llama built from GPT-2's real tokenizer."""

import pytest
import torch

from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.losses import reverse_kl
from lmdistill.methods.promptkd import SoftPrompt
from lmdistill.forward import response_logits
from lmdistill.trainer import Trainer


def promptkd_config(tiny_llama, tiny_llama_student, instruct_file, tmp_path, **extra):
    overrides = [f"student={tiny_llama_student}", f"teacher={tiny_llama}", f"train_data={instruct_file}",
                 f"output_dir={tmp_path / 'run'}", "steps=3", "batch_size=2", "max_new_tokens=12",
                 "prompt_format=alpaca", "progress=false", "lr=1e-3", "prompt_lr=1e-2",
                 "lr_schedule=constant", "warmup_steps=0"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, ["method=promptkd"] + overrides)


def test_promptkd_steps_train_prompt_and_student_and_freeze_teacher(
    tiny_llama, tiny_llama_student, instruct_file, tmp_path
):
    trainer = Trainer(promptkd_config(tiny_llama, tiny_llama_student, instruct_file, tmp_path))
    method = trainer.method
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in method.unwrapped_student.state_dict().items()}
    prompt_before = method.soft_prompt.embeddings.detach().clone()
    trainer.train()

    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher weight {k} changed"
    assert not torch.equal(method.soft_prompt.embeddings.detach(), prompt_before), "soft prompt did not train"
    changed = [k for k, v in method.unwrapped_student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed, "student did not train"
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    import json

    for row in map(json.loads, rows):
        for key in ("prompt_loss", "prompt_kl_student", "prompt_kl_teacher", "reverse_kl"):
            assert torch.isfinite(torch.tensor(row[key])), (key, row)
    # The run folder holds an HF student and the prompt.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    prompt = SoftPrompt.load(tmp_path / "run" / "soft_prompt.safetensors")
    assert prompt.embeddings.shape == (7, 32)
    assert torch.equal(prompt.embeddings, method.soft_prompt.embeddings.detach())


def test_soft_prompt_is_initialised_from_text_embeddings(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = Trainer(promptkd_config(tiny_llama, tiny_llama_student, instruct_file, tmp_path, prompt_len=10))
    method = trainer.method
    ids = method.tokenizer("Suppose you are a student.", add_special_tokens=False)["input_ids"]
    tiled = (ids * 3)[:10]
    expected = method.teacher.get_input_embeddings().weight[tiled]
    assert torch.equal(method.soft_prompt.embeddings.detach(), expected)
    assert method.soft_prompt.embeddings.numel() == 10 * 32


def test_regulariser_weight_decays_linearly_to_zero(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    method = Trainer(
        promptkd_config(tiny_llama, tiny_llama_student, instruct_file, tmp_path, steps=4, reg_weight=2.0)
    ).method
    # The reference counts steps from 1: weight (1 - step / steps) c_reg for step = 1..steps.
    assert [method.regulariser_weight(s) for s in range(4)] == [1.5, 1.0, 0.5, 0.0]


def test_student_steps_lower_reverse_kl_to_prompted_teacher_on_a_fixed_batch(
    tiny_llama, tiny_llama_student, instruct_file, tmp_path
):
    trainer = Trainer(promptkd_config(tiny_llama, tiny_llama_student, instruct_file, tmp_path, lr=3e-3))
    method = trainer.method
    torch.manual_seed(0)
    samples = method.prepare(trainer.micro_batches()[0], 0)
    _, mask = samples.targets()
    assert mask.sum() > 0

    def rkl():
        with torch.no_grad():
            prompted = response_logits(method.teacher, samples, prefix=method.soft_prompt())
            return reverse_kl(response_logits(method.student, samples), prompted, mask).item()

    before = rkl()
    for _ in range(8):
        trainer.update("student", [samples])
    after = rkl()
    assert after < 0.7 * before, (before, after)


def test_prompt_step_lowers_prompt_objective_on_a_fixed_batch(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = Trainer(
        promptkd_config(
            tiny_llama, tiny_llama_student, instruct_file, tmp_path, prompt_lr=1e-2, reg_weight=0.0, precision="fp32"
        )
    )
    method = trainer.method
    torch.manual_seed(0)
    samples = method.prepare(trainer.micro_batches()[0], 0)
    # A prompt can only move a random tiny teacher a little towards the student, so the
    # check is that the objective falls at every step, not by how much (in fp32: the steps
    # are smaller than bf16 rounding).
    history = [trainer.update("soft_prompt", [samples])["prompt_kl_student"] for _ in range(8)]
    assert all(b < a for a, b in zip(history, history[1:])), history


def test_promptkd_requires_a_teacher(tiny_llama_student, instruct_file, tmp_path):
    with pytest.raises(ConfigError, match="teacher"):
        load_config(None, ["method=promptkd", f"student={tiny_llama_student}", f"train_data={instruct_file}"])


def test_prompt_update_leaves_no_gradient_in_the_student(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    """The prompt loss KL(p_T^P || q_S) treats the student as a fixed target: its backward
    reaches the soft prompt only. (It used to reach the student's tied lm_head/embeddings
    through the chunked loss, and the next student update added that forward-KL gradient.)"""
    trainer = Trainer(promptkd_config(tiny_llama, tiny_llama_student, instruct_file, tmp_path, precision="fp32"))
    method = trainer.method
    torch.manual_seed(0)
    samples = method.prepare(trainer.micro_batches()[0], 0)
    loss, _ = method.prompt_loss(samples, 0)
    loss.backward()
    assert method.soft_prompt.embeddings.grad is not None and method.soft_prompt.embeddings.grad.abs().sum() > 0
    leaked = [n for n, p in method.unwrapped_student.named_parameters() if p.grad is not None]
    assert leaked == [], f"the prompt update left gradients in the student: {leaked}"


def test_promptkd_dropout_modes_match_the_reference(tiny_gpt2, instruct_file, tmp_path):
    """A spy on every forward call of one step: the prompt update runs the student target and the
    plain teacher in eval mode and the prompted teacher in train mode; the student update runs the
    student in train mode and the prompted teacher in eval mode (train_promptkd.py, 383182f)."""
    trainer = Trainer(promptkd_config(tiny_gpt2, tiny_gpt2, instruct_file, tmp_path))
    method = trainer.method
    calls = []

    def spy(name):
        def hook(module, args, kwargs):
            prefixed = kwargs.get("inputs_embeds") is not None and name == "teacher"
            calls.append((phase[0], "prompted teacher" if prefixed else name, module.training))
        return hook

    phase = ["sample"]
    handles = [method.unwrapped_student.base_model.register_forward_pre_hook(spy("student"), with_kwargs=True),
               method.teacher.base_model.register_forward_pre_hook(spy("teacher"), with_kwargs=True)]
    samples = method.prepare(trainer.micro_batches()[0], 0)
    phase[0] = "prompt"
    method.prompt_loss(samples, 0)
    phase[0] = "student"
    method.student_loss(samples, 0)
    for h in handles:
        h.remove()
    seen = {(p, who): mode for p, who, mode in calls if p != "sample"}
    assert seen == {
        ("prompt", "student"): False,
        ("prompt", "teacher"): False,
        ("prompt", "prompted teacher"): True,
        ("student", "student"): True,
        ("student", "prompted teacher"): False,
    }, calls
    assert method.teacher.training is False and method.unwrapped_student.training is True
