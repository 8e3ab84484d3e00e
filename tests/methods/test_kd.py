"""Word-level KD on tiny random-weight Llamas over GPT-2's vocabulary."""

import pytest
import torch
import torch.nn.functional as F

from kd_testing import make_trainer, metrics, objective_drops
from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.forward import response_logits


def test_kd_lowers_its_objective_on_a_fixed_batch(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run")
    batch = trainer.micro_batches()[0]
    before, after = objective_drops(trainer, batch, lambda b: trainer.method.loss(b, 0)[0])
    assert after < before - 0.1, (before, after)


def test_kd_loss_is_the_kd_ratio_mix_of_cross_entropy_and_forward_kl(tiny_llama, tiny_llama_student, instruct_file,
                                                                     tmp_path):
    trainer = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", kd_ratio=0.3)
    method = trainer.method
    batch = trainer.micro_batches()[0]
    labels, mask = batch.targets()
    with torch.no_grad():
        loss, logs = method.loss(batch, 0)
        s = F.log_softmax(response_logits(method.student, batch).double(), -1)
        t = F.log_softmax(response_logits(method.teacher, batch).double(), -1)
    # Naive reference: explicit per-token sums over the valid positions only.
    valid = mask.bool()
    kl = (t.exp() * (t - s)).sum(-1)[valid].mean()
    ce = -s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)[valid].mean()
    assert logs["forward_kl"] == pytest.approx(float(kl), rel=1e-4)
    assert logs["ce"] == pytest.approx(float(ce), rel=1e-4)
    assert float(loss) == pytest.approx(float(0.7 * ce + 0.3 * kl), rel=1e-4)


def test_kd_run_logs_its_terms(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", steps=2)
    trainer.train()
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["forward_kl"] >= 0 and r["ce"] > 0 for r in rows)
    assert (tmp_path / "run" / "student" / "config.json").exists()


def test_kd_config_errors_name_the_key(tiny_llama_student, instruct_file):
    base = ["method=kd", f"student={tiny_llama_student}", f"train_data={instruct_file}"]
    with pytest.raises(ConfigError, match="kd_ratio"):
        load_config(None, base + ["teacher=x", "kd_ratio=1.5"])
    with pytest.raises(ConfigError, match="'teacher'"):
        load_config(None, base)
