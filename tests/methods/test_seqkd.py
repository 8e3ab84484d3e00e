"""SeqKD: teacher responses generated once, cached as JSONL, reused; SFT on them."""

import json

import pytest
import torch

from kd_testing import make_trainer, objective_drops
from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.data import collate
from lmdistill.instruct.data import load_instruction_data, tokenize_examples
from lmdistill.methods import seqkd as seqkd_module
from lmdistill.losses import cross_entropy, forward_kl
from lmdistill.models import load_model, load_tokenizer
from lmdistill.forward import response_logits


def test_teacher_responses_are_cached_as_jsonl_and_reused(tiny_llama, tiny_llama_student, instruct_file, tmp_path,
                                                          monkeypatch):
    first = make_trainer("seqkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "a", max_train_examples=6,
                         max_new_tokens=6)
    cache = seqkd_module.cache_path(first.config)
    assert cache.parent == tmp_path / "seqkd-cache"  # beside the run folders, shared by runs with the same parent
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert 0 < len(records) <= 6 and len(first.examples) == len(records)
    source = load_instruction_data(str(instruct_file), limit=6)
    assert [r["instruction"] for r in records] == [ex.instruction for ex in source][:len(records)]
    assert all(r["output"].strip() for r in records)
    # The training targets are the teacher's responses, not the dataset's.
    assert first.examples[0].references == [records[0]["output"]]

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached teacher responses should have been reused")

    monkeypatch.setattr(seqkd_module, "teacher_responses", no_generation)
    stamp = cache.stat().st_mtime_ns
    second = make_trainer("seqkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "b", max_train_examples=6,
                          max_new_tokens=6, seed=7)  # another training seed shares the teacher data
    assert seqkd_module.cache_path(second.config) == cache and cache.stat().st_mtime_ns == stamp
    other = seqkd_module.cache_path(load_config(None, [
        "method=seqkd", f"student={tiny_llama_student}", f"teacher={tiny_llama}", f"train_data={instruct_file}",
        f"output_dir={tmp_path / 'c'}", "max_train_examples=6", "max_new_tokens=6", "teacher_decoding=greedy"]))
    assert other != cache  # other generation settings, another file


def untied_teacher(folder):
    """A random Llama whose greedy output is not just its input echoed (tied random embeddings do that)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import gpt2_tokenizer

    tok = gpt2_tokenizer()
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id, tie_word_embeddings=False, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_greedy_cache_holds_the_teachers_greedy_continuations(tiny_llama_student, instruct_file, tmp_path):
    teacher_dir = untied_teacher(tmp_path / "teacher")
    trainer = make_trainer("seqkd", teacher_dir, tiny_llama_student, instruct_file, tmp_path / "run",
                           max_train_examples=2, max_new_tokens=5, teacher_decoding="greedy")
    records = [json.loads(line) for line in seqkd_module.cache_path(trainer.config).read_text().splitlines()]
    tok = load_tokenizer(str(teacher_dir))
    teacher = load_model(str(teacher_dir)).eval()
    examples, _ = tokenize_examples(load_instruction_data(str(instruct_file), limit=1), tok, "alpaca", 128, 160)
    prompt = torch.tensor([examples[0].prompt])
    with torch.no_grad():  # one unpadded prompt: a plain argmax loop
        ids = prompt
        for _ in range(5):
            nxt = teacher(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt == tok.eos_token_id:
                break
    expected = tok.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True)
    assert records[0]["output"] == expected


def test_seqkd_lowers_cross_entropy_on_teacher_responses(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("seqkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           max_train_examples=4, max_new_tokens=8)
    batch = collate(trainer.examples[:2], trainer.tokenizer.pad_token_id)
    before, after = objective_drops(trainer, batch, lambda b: trainer.method.loss(b, 0)[0])
    assert after < before - 0.1, (before, after)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
def test_seqkd_loss_mixes_cross_entropy_and_forward_kl_by_kd_ratio(kd_ratio, tiny_llama, tiny_llama_student,
                                                                   instruct_file, tmp_path):
    """(1 - kd_ratio) CE + kd_ratio KL(p_T || q_S) on the teacher's responses, against full logits."""
    trainer = make_trainer("seqkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           max_train_examples=4, max_new_tokens=8, kd_ratio=kd_ratio, precision="fp32")
    method = trainer.method
    batch = collate(trainer.examples[:2], trainer.tokenizer.pad_token_id)
    labels, mask = batch.targets()
    with torch.no_grad():
        student = response_logits(method.student, batch)
        ce = cross_entropy(student, labels, mask)
        kl = forward_kl(student, response_logits(method.teacher, batch), mask)
        loss, logs = method.loss(batch, 0)
    assert float(loss) == pytest.approx(float((1 - kd_ratio) * ce + kd_ratio * kl), rel=1e-5)
    assert logs["ce"] == pytest.approx(float(ce), rel=1e-5)
    if kd_ratio:
        assert logs["forward_kl"] == pytest.approx(float(kl), rel=1e-5)


def test_seqkd_config_checks(tiny_llama_student, instruct_file):
    with pytest.raises(ConfigError, match="teacher_decoding"):
        load_config(None, ["method=seqkd", f"student={tiny_llama_student}", "teacher=t", f"train_data={instruct_file}",
                           "teacher_decoding=beam"])
