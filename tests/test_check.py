"""`lmdistill check`: each kind of teacher/student mismatch is named, before training; padded
vocabularies train with every same-vocabulary method and give the unpadded pair's losses."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_testing import make_trainer
from lmdistill.check import Report, check_chat_templates, check_special_tokens, check_vocabulary, predict_memory
from lmdistill.methods import METHODS


def padded_copy(source, folder, extra_rows: int):
    """The same model with its embedding matrix padded by `extra_rows` rows (as Qwen2.5's sizes differ)."""
    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(model.config.vocab_size + extra_rows, mean_resizing=False)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def padded_teacher(tiny_llama, tmp_path_factory):
    return padded_copy(tiny_llama, tmp_path_factory.mktemp("padded_teacher"), 128)


@pytest.fixture(scope="module")
def padded_student(tiny_llama_student, tmp_path_factory):
    return padded_copy(tiny_llama_student, tmp_path_factory.mktemp("padded_student"), 64)


def test_vocabulary_findings(tiny_llama, padded_teacher, tiny_t5):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    config, padded = (AutoModelForCausalLM.from_pretrained(p).config for p in (tiny_llama, padded_teacher))
    same = Report()
    check_vocabulary(same, "kd", tok, tok, config, config)
    assert [f.level for f in same.findings] == ["ok", "ok"] and "both embedding matrices" in same.text()
    assert "this pair allows every method" in same.text()
    pad = Report()
    check_vocabulary(pad, "kd", tok, tok, config, padded)
    assert not pad.errors and "padded to" in pad.text() and "ignored" in pad.text()
    other_tok = AutoTokenizer.from_pretrained(tiny_t5)
    token_level = Report()
    check_vocabulary(token_level, "gkd", tok, other_tok, config, config)
    assert token_level.errors and "tokenizers differ" in token_level.text()
    text_level = Report()
    check_vocabulary(text_level, "seqkd", tok, other_tok, config, config)
    assert not text_level.errors and "WARNING" in text_level.text()
    assert "this pair allows sft, seqkd, step_by_step, finetune, distill, uld, gold" in text_level.text()
    for method in ("uld", "gold"):  # they align the two tokenizations by text
        across = Report()
        check_vocabulary(across, method, tok, other_tok, config, config)
        assert not across.errors and "aligns the two tokenizations" in across.text()
    assert "a cross-tokenizer method (uld, gold)" in token_level.text()


def test_a_teacher_end_of_turn_the_student_cannot_stop_at_is_a_warning_with_the_fix(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    report = Report()
    check_special_tokens(report, tok, tok, [tok.eos_token_id], [tok.eos_token_id, 42])
    warning = [f for f in report.findings if f.level == "warning"]
    assert warning and "42" in warning[0].message and "eos_token_id" in warning[0].message
    fine = Report()
    check_special_tokens(fine, tok, tok, [tok.eos_token_id], [tok.eos_token_id])
    assert all(f.level == "ok" for f in fine.findings)


def test_chat_template_findings(tiny_llama):
    student, teacher = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    student.chat_template = "{{ messages[0]['content'] }}"
    teacher.chat_template = "{{ 'User: ' + messages[0]['content'] }}"
    differ = Report()
    check_chat_templates(differ, student, teacher)
    assert "templates differ" in differ.text()
    teacher.chat_template = student.chat_template
    same = Report()
    check_chat_templates(same, student, teacher)
    assert same.findings[0].level == "ok"
    # texts that differ only in a branch that prompts never take (Qwen2.5-Coder 1.5B vs 0.5B: tool calls)
    student.chat_template = "{% if tools %}{{ '{x}' }}{% endif %}{{ messages[0]['content'] }}"
    teacher.chat_template = "{% if tools %}{{ '{{x}}' }}{% endif %}{{ messages[0]['content'] }}"
    same_prompts = Report()
    check_chat_templates(same_prompts, student, teacher)
    assert same_prompts.findings[0].level == "ok" and "same prompt" in same_prompts.text()


def test_memory_prediction_grows_with_the_batch_and_checkpointing_lowers_it(tiny_llama):
    config = AutoModelForCausalLM.from_pretrained(tiny_llama).config
    small = predict_memory(10**6, 10**6, config, 2, 128, 50257)
    big = predict_memory(10**6, 10**6, config, 64, 1024, 50257)
    ckpt = predict_memory(10**6, 10**6, config, 64, 1024, 50257, gradient_checkpointing=True)
    assert small.total < big.total and ckpt.parts["activations"] < big.parts["activations"]
    assert big.parts["gradients + AdamW"] == 12 * 10**6


def test_a_lora_students_memory_counts_only_the_adapters_as_trained(tiny_llama):
    """A LoRA run of the real pair warned that 30.7 GiB exceeded the memory: its prediction gave
    gradients and AdamW moments to all 1.5B weights. The count is peft's own, once added."""
    from lmdistill.config import LoraSettings
    from lmdistill.lora import adapter_parameters, add_adapter, parameter_counts

    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        predicted = adapter_parameters(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, targets)
        adapted = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama),
                              LoraSettings(r=4, target_modules=targets))
        assert predicted == parameter_counts(adapted)[0] > 0


def test_preflight_predicts_a_lora_students_memory_from_its_adapters(tiny_llama, tiny_llama_student, instruct_file,
                                                                     monkeypatch):
    from lmdistill import check
    from lmdistill.methods import load_config

    seen = []
    real = check.predict_memory
    monkeypatch.setattr(check, "predict_memory", lambda *a, **k: seen.append(k["trainable_params"]) or real(*a, **k))
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_student)
    tok = AutoTokenizer.from_pretrained(tiny_llama_student)
    common = ["method=sft", f"student={tiny_llama_student}", f"train_data={instruct_file}"]
    check.preflight(load_config(None, common), student, None, tok, None)
    check.preflight(load_config(None, common + ["student_lora={r: 4}"]), student, None, tok, None)
    assert seen == [None, check.adapter_parameters(student, 4, ["all-linear"])] and seen[1] > 0


def test_check_command_reports_and_train_records_the_peak(tiny_llama, padded_teacher, tiny_llama_student,
                                                          instruct_file, tmp_path, capsys):
    from lmdistill.cli import main

    assert main(["check", "--teacher", str(padded_teacher), "--student", str(tiny_llama_student),
                 "--method", "gkd", "--data", str(instruct_file)]) == 0
    out = capsys.readouterr().out
    assert "padded to" in out and "memory" in out
    run = make_trainer("kd", padded_teacher, tiny_llama_student, instruct_file, tmp_path / "run", steps=2).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_rss_mb"] > 0 for r in rows if "loss" in r or "forward_kl" in r)


TOKEN_LEVEL = [m for m in METHODS if m not in ("sft", "step_by_step", "finetune", "distill")]


@pytest.mark.parametrize("method", TOKEN_LEVEL)
def test_padded_teacher_gives_the_unpadded_pairs_loss(method, tiny_llama, padded_teacher, tiny_llama_student,
                                                      instruct_file, tmp_path):
    def first_loss(teacher, name):
        extra = {"valid_examples": 4, "init_threshold": 1.0} if method == "distillm" else {}
        trainer = make_trainer(method, teacher, tiny_llama_student, instruct_file, tmp_path / name, precision="fp32",
                               max_new_tokens=4, **extra)
        torch.manual_seed(0)
        work = trainer.method.prepare(trainer.micro_batches()[0], 0)
        torch.manual_seed(1)
        update = trainer.updates["student"]
        with torch.no_grad():
            return float(update.loss(work, 0)[0])

    torch.testing.assert_close(first_loss(padded_teacher, "padded"), first_loss(tiny_llama, "plain"), rtol=1e-4,
                               atol=1e-5)


def test_padded_student_trains_against_an_unpadded_teacher(tiny_llama, padded_student, instruct_file, tmp_path):
    trainer = make_trainer("kd", tiny_llama, padded_student, instruct_file, tmp_path / "run", precision="fp32")
    work = trainer.micro_batches()[0]
    before = trainer.method.loss(work, 0)[0].item()
    for _ in range(5):
        trainer.update("student", [work])
    assert trainer.method.loss(work, 0)[0].item() < before


def test_eos_tokens_in_the_recipe_stop_the_sampler_and_silence_the_check(tiny_llama, tiny_llama_student, instruct_file,
                                                                         tmp_path):
    from lmdistill.config import ConfigError

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    stop = tok.convert_ids_to_tokens(13)  # "."
    trainer = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           eos_tokens=stop, max_new_tokens=16, lmbda=1.0)
    assert 13 in trainer.method.eos_ids
    samples = trainer.method.sample_student(trainer.micro_batches()[0])
    P = samples.prompt_width
    for ids, mask in zip(samples.input_ids[:, P:].tolist(), samples.response_mask[:, P:].tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        assert 13 not in kept[:-1]  # a "." ends the response
    report = Report()
    check_special_tokens(report, tok, tok, trainer.method.eos_ids, [tok.eos_token_id, 13])
    assert all(f.level == "ok" for f in report.findings)
    with pytest.raises(ConfigError, match="eos_tokens"):
        make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "bad",
                     eos_tokens="no-such-token")


def _cached_kd_loss(teacher, student, instruct_file, folder, top_k):
    """kd's first loss (forward KL only) when its teacher is read from a top-k cache built for this pair."""
    from lmdistill.methods import load_config
    from lmdistill.cache_teacher import cache_teacher

    keys = [f"teacher={teacher}", f"student={student}", f"train_data={instruct_file}", "prompt_format=alpaca",
            "max_length=160", "max_prompt_length=128", "precision=fp32"]
    config = load_config(None, ["method=kd", *keys, f"output_dir={folder}/unused"])
    cache_teacher(config, folder / "cache", top_k=top_k)
    meta = json.loads((folder / "cache/meta.json").read_text())
    trainer = make_trainer("kd", teacher, student, instruct_file, folder / "run", precision="fp32", kd_ratio=1.0,
                           teacher_cache=folder / "cache")
    with torch.no_grad():
        return float(trainer.method.loss(trainer.micro_batches()[0], 0)[0]), meta


@pytest.mark.parametrize("top_k", [8, "all"])
def test_top_k_cache_of_a_padded_teacher_gives_the_unpadded_pairs_loss(top_k, tiny_llama, padded_teacher,
                                                                         tiny_llama_student, instruct_file, tmp_path):
    rows = AutoModelForCausalLM.from_pretrained(tiny_llama_student).config.vocab_size
    k = rows if top_k == "all" else top_k
    padded, meta = _cached_kd_loss(padded_teacher, tiny_llama_student, instruct_file, tmp_path / "padded", k)
    plain, _ = _cached_kd_loss(tiny_llama, tiny_llama_student, instruct_file, tmp_path / "plain", k)
    assert meta["vocab_size"] == rows and meta["teacher_rows"] == rows + 128  # the padding rows are not cached
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
    if top_k == "all":  # the full-vocabulary cache is the dense teacher, padding rows ignored
        dense = make_trainer("kd", padded_teacher, tiny_llama_student, instruct_file, tmp_path / "dense",
                             precision="fp32", kd_ratio=1.0)
        with torch.no_grad():
            torch.testing.assert_close(padded, float(dense.method.loss(dense.micro_batches()[0], 0)[0]), rtol=1e-4,
                                       atol=1e-5)


def test_a_padded_student_reads_a_cache_over_fewer_rows_and_a_smaller_one_is_refused(
        tiny_llama, padded_teacher, padded_student, tiny_llama_student, instruct_file, tmp_path):
    from lmdistill.data import DataError

    rows = AutoModelForCausalLM.from_pretrained(tiny_llama).config.vocab_size
    cached, _ = _cached_kd_loss(tiny_llama, padded_student, instruct_file, tmp_path / "padded", rows)
    dense = make_trainer("kd", tiny_llama, padded_student, instruct_file, tmp_path / "dense", precision="fp32",
                         kd_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(cached, float(dense.method.loss(dense.micro_batches()[0], 0)[0]), rtol=1e-4,
                                   atol=1e-5)
    # padded teacher (+128) and padded student (+64): the cache covers the 64 rows both have, which
    # a student without them cannot read
    _, meta = _cached_kd_loss(padded_teacher, padded_student, instruct_file, tmp_path / "both", 8)
    assert meta["vocab_size"] == rows + 64
    unpadded = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "small", precision="fp32",
                            teacher_cache=tmp_path / "both/cache")
    with pytest.raises(DataError, match=f"built over {rows + 64} vocabulary rows; the student has only {rows}"):
        unpadded.method.loss(unpadded.micro_batches()[0], 0)


def test_check_of_a_served_teacher_says_what_it_can_check(tiny_llama_student, capsys):
    from lmdistill.cli import main

    code = main(["check", "--teacher", "openai:http://127.0.0.1:9/v1#tiny", "--student", str(tiny_llama_student)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not any("Traceback" in line for line in err), err
    (line,) = [line for line in err if line.startswith("lmdistill check: error: ")]
    assert "served teacher" in line and "does not exist" not in line and "first answers" in line
