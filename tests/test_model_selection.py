"""Dev-set evaluation during training (`eval_every`), the best checkpoint in `best/`, and the
language-modelling term on a pre-training corpus (`lm_data`), for any method."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd_testing import make_trainer, metrics
from lmdistill.data import DataError, corpus_blocks, read_corpus
from lmdistill.losses import cross_entropy, forward_kl
from lmdistill.forward import response_logits


def test_dev_evaluation_logs_the_score_and_keeps_the_best_student(tiny_llama, tiny_llama_student, instruct_file,
                                                                  dev_file, tmp_path):
    run = make_trainer("sft", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", steps=4,
                       eval_every=2, eval_data=dev_file, eval_examples=3, eval_max_new_tokens=4).train()
    scores = {r["step"]: r["dev_rougeL"] for r in metrics(run) if "dev_rougeL" in r}
    assert sorted(scores) == [2, 4]
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["metric"] == "rougeL" and best["value"] == max(scores.values())
    assert scores[best["step"]] == best["value"]
    AutoModelForCausalLM.from_pretrained(run / "best")  # a complete HF model
    assert not (run / "best.partial").exists()


def test_dev_evaluation_leaves_training_unchanged(tiny_llama, tiny_llama_student, instruct_file, dev_file, tmp_path):
    """It forks the random streams: an on-policy run gives the same student with or without it."""
    def final_weights(name, **extra):
        run = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / name, steps=3, lmbda=1.0,
                           precision="fp32", **extra).train()
        return AutoModelForCausalLM.from_pretrained(run / "student").state_dict()

    plain = final_weights("plain")
    evaluated = final_weights("evaluated", eval_every=1, eval_data=dev_file, eval_examples=2,
                              eval_max_new_tokens=3)
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_reasoning_methods_select_on_dev_accuracy(tiny_llama_student, tmp_path):
    from lmdistill.methods import load_config
    from lmdistill.trainer import Trainer

    values = {"method": "step_by_step", "student": str(tiny_llama_student), "output_dir": str(tmp_path / "sbs"),
              "train_data": "${LMDISTILL_DATA_DIR}/step_by_step/svamp", "steps": 2, "batch_size": 2,
              "progress": False, "max_prompt_length": 192, "max_length": 320, "max_target_length": 16,
              "train_fraction": 0.05, "eval_every": 2, "eval_examples": 3, "eval_max_new_tokens": 4}
    run = Trainer(load_config(None, [f"{k}={v}" for k, v in values.items()])).train()
    rows = [r for r in metrics(run) if "dev_accuracy" in r]
    assert len(rows) == 1 and 0.0 <= rows[0]["dev_accuracy"] <= 100.0
    assert (run / "best" / "reasoning_task.json").exists()  # best/ is evaluated as student/ is


def test_eval_every_needs_a_dev_set(tiny_llama_student, instruct_file):
    from lmdistill.config import ConfigError
    from lmdistill.methods import load_config

    with pytest.raises(ConfigError, match="eval_data"):
        load_config(None, ["method=sft", f"student={tiny_llama_student}", f"train_data={instruct_file}",
                           "eval_every=5"])


# ----- the language-modelling term -----

@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The cat sat on the mat. It was warm and the sun was out.\n\n"
                    "A second document, about rivers: they run to the sea, slowly, all year long.\n")
    return path


def test_corpus_blocks_join_documents_with_eos_and_cut_equal_blocks(corpus, tmp_path):
    from conftest import gpt2_tokenizer

    gpt2_tokenizer = gpt2_tokenizer()
    documents = read_corpus(corpus)
    assert len(documents) == 2
    stream = []
    for d in documents:
        stream += gpt2_tokenizer(d, add_special_tokens=False)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    blocks = corpus_blocks(documents, gpt2_tokenizer, 8)
    assert [b.prompt + b.response for b in blocks] == [stream[i:i + 8] for i in range(0, len(stream) - 7, 8)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: .*'text'"):
        read_corpus(jsonl)


def test_lm_term_is_lm_coef_times_the_corpus_cross_entropy_and_is_optimised(tiny_llama, tiny_llama_student,
                                                                          instruct_file, corpus, tmp_path):
    trainer = make_trainer("sft", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", lm_data=corpus,
                           lm_coef=0.5, lm_block_length=16, precision="fp32", lr=1e-2)
    work = trainer.micro_batches()[0]
    lm = trainer.lm_micro_batches()
    assert len(lm) == 1 and lm[0].input_ids.shape == (2, 16)  # batch_size blocks of max_length tokens
    student = trainer.method.unwrapped_student

    def naive(batch):
        labels, mask = batch.targets()
        with torch.no_grad():
            return float(cross_entropy(response_logits(student, batch), labels, mask))

    lm_before = naive(lm[0])
    logs = trainer.update("student", [work], lm)
    assert logs["lm_loss"] == pytest.approx(lm_before, rel=1e-4)  # measured before this step's update
    for _ in range(6):
        logs = trainer.update("student", [work], lm)
    assert naive(lm[0]) < 0.8 * lm_before  # the corpus loss is optimised too


def test_minillm_lm_term_mixes_the_teacher_in(tiny_llama, tiny_llama_student, instruct_file, corpus, tmp_path):
    """The released code's L_PT = (1 - r) CE + r KL(p_T || q_S) on the corpus blocks (r = lm_kd_ratio)."""
    trainer = make_trainer("minillm", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           lm_data=corpus, lm_block_length=16, precision="fp32", lm_kd_ratio=0.25)
    batch = trainer.lm_micro_batches()[0]
    labels, mask = batch.targets()
    method = trainer.method
    with torch.no_grad():
        s, t = response_logits(method.unwrapped_student, batch), response_logits(method.teacher, batch)
        expected = 0.75 * cross_entropy(s, labels, mask) + 0.25 * forward_kl(s, t, mask)
        got = method.lm_loss(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_dropout_option_sets_the_students_mode(tiny_llama, tiny_gpt2, instruct_file, tmp_path):
    on = make_trainer("sft", tiny_llama, tiny_gpt2, instruct_file, tmp_path / "on")
    off = make_trainer("sft", tiny_llama, tiny_gpt2, instruct_file, tmp_path / "off", dropout=False)
    assert on.method.unwrapped_student.training and not off.method.unwrapped_student.training
