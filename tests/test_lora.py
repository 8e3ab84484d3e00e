"""LoRA students (`student_lora`): only the adapters train, the merged student is base +
(alpha / r) B A, the loss falls for an on-policy baseline and for PromptKD, and both saved
folders load for evaluation."""

import pytest
import torch
from safetensors.torch import load_file

from kd_testing import make_trainer, objective_drops
from lmdistill.config import ConfigError, LoraSettings
from lmdistill.lora import add_adapter, load_merged
from lmdistill.methods import load_config
from lmdistill.models import load_model


def lora_trainer(method, tiny_llama, tiny_llama_student, instruct_file, run, **extra):
    return make_trainer(method, tiny_llama, tiny_llama_student, instruct_file, run, precision="fp32",
                        student_lora="{r: 4, alpha: 8.0, dropout: 0.0}", **extra)


def base_and_adapters(model):
    named = dict(model.named_parameters())
    adapters = {k: p for k, p in named.items() if "lora_" in k}
    return {k: p.detach().clone() for k, p in named.items() if k not in adapters}, adapters


@pytest.mark.parametrize("method, update", [("gkd", "student"), ("promptkd", "student")])
def test_only_the_adapters_train_and_the_loss_falls(method, update, tiny_llama, tiny_llama_student, instruct_file,
                                                    tmp_path):
    extra = {"lmbda": 1.0} if method == "gkd" else {"prompt_len": 2}
    trainer = lora_trainer(method, tiny_llama, tiny_llama_student, instruct_file, tmp_path / method, **extra)
    student = trainer.method.unwrapped_student
    base_before, adapters = base_and_adapters(student)
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for k, p in student.named_parameters() if k not in adapters)
    trainer.method.begin_step(0)
    work = trainer.method.prepare(trainer.micro_batches()[0], 0)
    before, after = objective_drops(trainer, work, lambda w: trainer.updates[update].loss(w, 0)[0])
    assert after < before
    if method == "promptkd":  # the prompt update leaves the adapters alone (the loop also checks for leaks)
        _, adapters_now = base_and_adapters(student)
        frozen = {k: p.detach().clone() for k, p in adapters_now.items()}
        trainer.update("soft_prompt", [work])
        assert all(torch.equal(frozen[k], p) for k, p in base_and_adapters(student)[1].items())
    base_after, adapters_after = base_and_adapters(student)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "a frozen weight moved"
    lora_b = [p.detach() for k, p in adapters_after.items() if "lora_B" in k]
    assert any(float(p.abs().max()) > 0 for p in lora_b), "B never left zero"


def test_the_run_saves_the_adapter_and_the_merged_student_equal_to_base_plus_adapter(
        tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    run = tmp_path / "run"
    trainer = lora_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, run, lmbda=1.0, lr=1e-2)
    trainer.train()
    adapter = load_file(str(run / "student_adapter/adapter_model.safetensors"))
    merged = load_file(str(run / "student/model.safetensors"))
    base = load_file(str(tiny_llama_student / "model.safetensors"))
    scale = 8.0 / 4
    checked = 0
    for key, weight in base.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        a, b = adapter.get(prefix + ".lora_A.weight"), adapter.get(prefix + ".lora_B.weight")
        if a is None:
            torch.testing.assert_close(merged[key], weight, rtol=0, atol=0)  # not adapted: unchanged
            continue
        checked += 1
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(merged[key], weight + scale * b @ a, rtol=1e-5, atol=1e-6)
    assert checked >= 2 * 7  # all-linear: q, k, v, o, gate, up, down in each of the 2 layers
    # `lmdistill eval` (load_model) takes either folder: the same model
    batch = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        from_adapter = load_model(str(run / "student_adapter"))(batch).logits
        from_merged = load_model(str(run / "student"))(batch).logits
    torch.testing.assert_close(from_adapter, from_merged, rtol=1e-5, atol=1e-5)


def test_lora_settings_are_typed_documented_and_checked(tiny_llama_student, instruct_file, tmp_path):
    keys = [f"student={tiny_llama_student}", f"train_data={instruct_file}", f"output_dir={tmp_path}"]
    config = load_config(None, ["method=sft", *keys, "student_lora.r=8", "student_lora.target_modules=q_proj,v_proj"])
    assert (config.student_lora.r, config.student_lora.alpha, config.student_lora.target_modules) == (
        8, 32.0, ["q_proj", "v_proj"])
    assert load_config(None, ["method=sft", *keys]).student_lora is None
    with pytest.raises(ConfigError, match="command line: config key 'student_lora.r': expected > 0"):
        load_config(None, ["method=sft", *keys, "student_lora.r=0"])
    with pytest.raises(ConfigError, match="unknown config key 'student_lora.rank'"):
        load_config(None, ["method=sft", *keys, "student_lora.rank=8"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sft\nstudent_lora:\n  r: 4\n  dropout: 1.5\n")
    with pytest.raises(ConfigError, match=r"r.yaml:2: config key 'student_lora.dropout'"):
        load_config(recipe, keys)


@pytest.mark.parametrize("targets, named", [("[lm_head]", "'lm_head'"), ("[q_proj,lm_head]", "'lm_head'"),
                                            ("[embed_tokens]", "'embed_tokens'")])
def test_head_and_embedding_targets_are_refused_at_start_naming_them(targets, named, tiny_llama_student,
                                                                     instruct_file, tmp_path):
    """The chunked losses read the base output head, and a tied student's merged copy would
    differ from its adapter: such targets would not train as reported, so the run refuses them."""
    with pytest.raises(ConfigError, match=rf"student_lora.target_modules.*{named}.*(output head|embeddings)"):
        make_trainer("sft", tiny_llama_student, tiny_llama_student, instruct_file, tmp_path / "run",
                     student_lora=f"{{r: 4, target_modules: {targets}}}")


def test_every_target_that_matches_nothing_is_named(tiny_llama_student, instruct_file, tmp_path):
    with pytest.raises(ConfigError, match=r"'q_prj', 'v_prj'.*match no layer of the student"):
        make_trainer("sft", tiny_llama_student, tiny_llama_student, instruct_file, tmp_path / "run",
                     student_lora="{r: 4, target_modules: [q_prj, k_proj, v_prj]}")


@pytest.mark.filterwarnings("error::FutureWarning")
def test_adding_and_merging_an_adapter_warns_nothing(tiny_llama_student, tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing`: no FutureWarning reaches the user."""
    add_adapter(load_model(str(tiny_llama_student)), LoraSettings(r=4)).save_pretrained(tmp_path)
    merged = load_merged(tmp_path, load_model(str(tiny_llama_student)))
    assert not any("lora_" in name for name, _ in merged.named_parameters())
