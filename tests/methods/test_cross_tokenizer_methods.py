"""ULD and GOLD: a teacher with another tokenizer. On one tokenizer GOLD is GKD exactly and
ULD the naive sorted-probability L1; across the GPT-2 and T5 vocabularies the losses equal the
pure functions of lmdistill.cross_tokenizer on the aligned rows, and a few steps lower them,
off-policy and on the student's own samples."""

import json

import pytest
import torch

from conftest import DATA_DIR
from kd_testing import make_trainer, objective_drops
from lmdistill.cross_tokenizer import shared_vocabulary
from lmdistill.forward import response_logits
from lmdistill.losses.cross_vocab import gold_loss, token_uld
from lmdistill.methods.uld import pairs_and_weights


@pytest.fixture(scope="module")
def t5_vocab_llama(tmp_path_factory):
    """A tiny random decoder-only Llama over t5-small's SentencePiece vocabulary (a student whose
    tokenizer differs from the GPT-2-vocabulary tiny_llama teacher)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(DATA_DIR / "tokenizers/t5"))
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    folder = tmp_path_factory.mktemp("t5_vocab_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def ascii_file(tmp_path):
    """Dolly rows with plain ASCII text: one tokenizer then splits no character across tokens."""
    rows = []
    for line in open(DATA_DIR / "instruct/dolly/dev.jsonl"):
        r = json.loads(line)
        if len(r["prompt"]) + len(r["output"]) < 500 and (r["prompt"] + r["output"]).isascii():
            rows.append(r)
        if len(rows) == 8:
            break
    path = tmp_path / "ascii.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gradients(trainer, loss):
    params = [p for p in trainer.method.student.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gold_on_one_tokenizer_is_gkd_exactly(beta, tiny_llama, tiny_llama_student, ascii_file, tmp_path):
    common = dict(precision="fp32", lmbda=0.0, beta=beta)
    gold = make_trainer("gold", tiny_llama, tiny_llama_student, ascii_file, tmp_path / "gold", **common)
    gkd = make_trainer("gkd", tiny_llama, tiny_llama_student, ascii_file, tmp_path / "gkd", **common)
    batch = gold.micro_batches()[0]
    a, logs = gold.method.loss(batch, 0)
    b, _ = gkd.method.loss(batch, 0)
    assert logs["aligned_rows"] == float(batch.targets()[1].sum()) and logs["unaligned_rows"] == 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(gradients(gold, a), gradients(gkd, b)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_uld_on_one_tokenizer_is_the_naive_per_sequence_sorted_l1_plus_ce(tiny_llama, tiny_llama_student, ascii_file,
                                                                         tmp_path):
    trainer = make_trainer("uld", tiny_llama, tiny_llama_student, ascii_file, tmp_path / "uld", precision="fp32")
    batch = trainer.micro_batches()[0]
    work = trainer.method.prepare(batch, 0)
    loss, logs = trainer.method.loss(work, 0)
    with torch.no_grad():
        q = response_logits(trainer.method.student, batch).float().softmax(-1)
        p = response_logits(trainer.method.teacher, batch).float().softmax(-1)
    labels, mask = batch.targets()
    per_sequence = []
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        rows = [float((q[b, j].sort(descending=True).values - p[b, j].sort(descending=True).values).abs().sum())
                for j in range(n)]
        per_sequence.append(sum(rows) / n)
    ce = float(-(q.log().gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum())
    assert logs["uld"] == pytest.approx(sum(per_sequence) / len(per_sequence), rel=1e-4)
    assert logs["ce"] == pytest.approx(ce, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(logs["uld"] + logs["ce"], rel=1e-6)


@pytest.mark.parametrize("method, extra", [("gold", {"lmbda": 0.0}), ("uld", {"alignment": "spans"}),
                                           ("uld", {"alignment": "positions"})])
def test_across_gpt2_and_t5_vocabularies_the_loss_is_the_pure_function_on_the_aligned_rows(
        method, extra, tiny_llama, t5_vocab_llama, instruct_file, tmp_path):
    trainer = make_trainer(method, tiny_llama, t5_vocab_llama, instruct_file, tmp_path / method, precision="fp32",
                           **extra)
    m = trainer.method
    batch = trainer.micro_batches()[0]
    cross = m.cross.retokenize(batch)
    assert cross.unaligned == 0 and all(cross.spans)
    with torch.no_grad():
        s = response_logits(m.student, batch).float().log_softmax(-1)
        t = response_logits(m.teacher, cross.teacher_batch).float()[..., : m.cross.vocab_size].log_softmax(-1)
    (B, R_s, V_s), R_t = s.shape, t.shape[1]
    alignment = "spans" if method == "gold" else extra["alignment"]
    s_idx, t_idx, weights = pairs_and_weights(cross.spans, cross.lengths, alignment, R_s, R_t)
    s_rows, t_rows = s.reshape(-1, V_s)[s_idx], t.reshape(B * R_t, -1)[t_idx]
    if method == "gold":
        shared = shared_vocabulary(m.cross.teacher_tokenizer, m.tokenizer)
        assert 0 < len(shared[0]) < min(V_s, t.shape[-1])  # some strings shared, most not
        want = gold_loss(s_rows, t_rows, torch.ones(len(s_idx), dtype=torch.bool), shared, beta=0.5)
        got = m.loss(batch, 0)[0]
    else:
        want = (token_uld(s_rows, t_rows) * weights).sum()
        got = torch.tensor(m.loss(m.prepare(batch, 0), 0)[1]["uld"])
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, extra, value", [
    ("gold", {"lmbda": 0.0}, "gold"), ("gold", {"lmbda": 1.0}, "gold"),
    ("uld", {"ce_weight": 0.0}, "uld"), ("uld", {"lmbda": 1.0, "alignment": "spans"}, "uld")])
def test_a_few_steps_lower_the_loss_off_and_on_policy(method, extra, value, tiny_llama, t5_vocab_llama, instruct_file,
                                                     tmp_path):
    trainer = make_trainer(method, tiny_llama, t5_vocab_llama, instruct_file, tmp_path / method, precision="fp32",
                           lr=1e-2, **extra)
    torch.manual_seed(0)
    work = trainer.method.prepare(trainer.micro_batches()[0], 0)
    if extra.get("lmbda") == 1.0:  # the student's own samples, re-tokenized for the teacher
        assert (work.sampled if method == "uld" else True)
    before, after = objective_drops(trainer, work, lambda w: trainer.method.loss(w, 0)[1][value], updates=5)
    assert after < before


def test_a_token_level_method_still_refuses_another_tokenizer(tiny_llama, t5_vocab_llama, instruct_file, tmp_path):
    from lmdistill.models import ModelError

    for method in ("kd", "gkd", "rkl"):  # the refusal names the methods that do work across tokenizers
        with pytest.raises(ModelError, match="must share one vocabulary.*uld, gold"):
            make_trainer(method, tiny_llama, t5_vocab_llama, instruct_file, tmp_path / method)


def test_uld_and_gold_log_the_tokens_they_train_on(tiny_llama, t5_vocab_llama, instruct_file, tmp_path):
    for method in ("uld", "gold"):
        run = make_trainer(method, tiny_llama, t5_vocab_llama, instruct_file, tmp_path / method, steps=1).train()
        (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0


def test_an_encoder_decoder_teacher_is_refused_for_uld_by_check_and_by_training(tiny_t5, tiny_llama_student,
                                                                                 instruct_file, tmp_path, capsys):
    from lmdistill.cli import main
    from lmdistill.models import ModelError

    assert main(["check", "--teacher", str(tiny_t5), "--student", str(tiny_llama_student), "--method", "uld"]) == 1
    assert "encoder-decoder" in capsys.readouterr().out
    with pytest.raises(ModelError, match="encoder-decoder"):
        make_trainer("uld", tiny_t5, tiny_llama_student, instruct_file, tmp_path / "uld")
