"""GKD (generalized JSD, lmbda on-policy mixture) on tiny random-weight Llamas."""

import pytest
import torch

from kd_testing import make_trainer, metrics, objective_drops
from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.losses import generalized_jsd
from lmdistill.forward import response_logits


def test_gkd_lowers_jsd_on_a_fixed_student_sampled_batch(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", lmbda=1.0,
                           beta=0.5, lr=3e-3)
    batch = trainer.micro_batches()[0]
    torch.manual_seed(0)
    samples = trainer.method.prepare(batch, 0)  # on-policy: the student's own responses, then held fixed
    before, after = objective_drops(trainer, samples, lambda b: trainer.method.loss(b, 0)[0])
    assert after < 0.8 * before, (before, after)


def test_gkd_lmbda_picks_student_samples_or_dataset_responses(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    off = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "off", lmbda=0.0)
    batch = off.micro_batches()[0]
    assert off.method.prepare(batch, 0) is batch

    on = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "on", lmbda=1.0,
                      max_new_tokens=5)
    sampled = on.method.prepare(batch, 0)
    P = batch.prompt_width
    assert sampled.prompt_width == P and torch.equal(sampled.input_ids[:, :P], batch.input_ids[:, :P])
    assert sampled.input_ids.shape[1] <= P + 5  # at most max_new_tokens sampled
    assert not torch.equal(sampled.response_mask, batch.response_mask)


def test_gkd_loss_uses_beta(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", beta=0.9)
    batch = trainer.micro_batches()[0]
    _, mask = batch.targets()
    with torch.no_grad():
        loss, _ = trainer.method.loss(batch, 0)
        s, t = response_logits(trainer.method.student, batch), response_logits(trainer.method.teacher, batch)
    assert float(loss) == pytest.approx(float(generalized_jsd(s, t, mask, beta=0.9)), rel=1e-5)
    # (beta and 1 - beta agree to first order for close distributions, so compare with 0.5)
    assert float(loss) < 0.5 * float(generalized_jsd(s, t, mask, beta=0.5))


def test_gkd_run_mixes_on_and_off_policy_steps(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", steps=2, lmbda=0.5)
    trainer.train()
    assert all(r["jsd"] >= 0 for r in metrics(tmp_path / "run"))


@pytest.mark.parametrize("key,value", [("beta", 1.5), ("lmbda", -0.1)])
def test_gkd_config_ranges(tiny_llama_student, instruct_file, key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["method=gkd", f"student={tiny_llama_student}", "teacher=t", f"train_data={instruct_file}",
                           f"{key}={value}"])


def test_gkd_samples_at_trls_temperature_and_scores_at_one(tiny_llama, tiny_llama_student, instruct_file, tmp_path,
                                                          monkeypatch):
    """TRL's GKDConfig: generation temperature 0.9; its loss reads the logits at temperature 1."""
    import lmdistill.methods.base as base

    trainer = make_trainer("gkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", lmbda=1.0)
    assert trainer.config.temperature == 0.9
    seen = {}
    real = base.sample_responses

    def spy(model, prompts, eos, pad, room, temperature, top_p, **kw):
        seen["temperature"] = temperature
        return real(model, prompts, eos, pad, room, temperature, top_p, **kw)

    monkeypatch.setattr(base, "sample_responses", spy)
    work = trainer.method.prepare(trainer.micro_batches()[0], 0)
    assert seen["temperature"] == 0.9
    _, mask = work.targets()
    method = trainer.method
    with torch.no_grad():
        expected = generalized_jsd(response_logits(method.unwrapped_student, work),
                                   response_logits(method.teacher, work), mask, beta=0.5)
        got, _ = method.loss(work, 0)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-3)
