"""MiniLLM: teacher-mixed sampling, length-normalised returns, PPO-style clipped policy gradient."""

import pytest
import torch

from kd_testing import make_trainer, metrics, objective_drops
from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.data import TokenizedExample, collate
from lmdistill.losses import reverse_kl
from lmdistill.methods.minillm import (Rollout, TeacherMixture, length_normalised_returns, reference_advantages,
                                       token_log_probs)
from lmdistill.forward import response_logits
from lmdistill.sampling import sample_responses

EOS = 3


def mixed_sample(student, teacher, prompts, alpha, max_new_tokens):
    """Responses from alpha p_T + (1 - alpha) q_S and their log importance weights."""
    mixture = TeacherMixture(teacher, alpha, temperature=1.0)
    samples = sample_responses(student, prompts, EOS, EOS, max_new_tokens, mixture=mixture)
    return samples, mixture.weights(samples)


def vocab4_model(seed, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=EOS, pad_token_id=EOS, initializer_range=0.6, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_length_normalised_returns_match_a_loop():
    torch.manual_seed(0)
    rewards = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    got = length_normalised_returns(rewards, mask)
    for b in range(3):
        T = int(mask[b].sum())
        for t in range(5):  # R_{t+1} = mean of the rewards after t (0 at the last token and on padding)
            expected = rewards[b, t + 1:T].mean().item() if t < T - 1 else 0.0
            assert got[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)


def test_reference_advantages_by_hand_for_a_4_token_response():
    """The released code on r = [1, 2, 3, 4], gamma 0.95: G = [9.037, 8.46, 6.8, 4] (each return includes
    its own reward), divided by the tokens left [4, 3, 2, 1]; then whitened over the response tokens
    (population variance, as trlx's `get_global_statistics` that the released code's `whiten` uses)."""
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    raw = reference_advantages(rewards, mask, gamma=0.95, whiten=False)
    torch.testing.assert_close(raw, torch.tensor([[2.25925, 2.82, 3.4, 4.0, 0.0, 0.0]]))
    # reward_scaling 0.5 doubles every reward, and so every advantage; a clip at 3 caps the scaled rewards.
    torch.testing.assert_close(reference_advantages(rewards, mask, 0.95, reward_scaling=0.5, whiten=False), 2 * raw)
    clipped = reference_advantages(rewards, mask, 1.0, reward_scaling=0.5, reward_clip=3.0, whiten=False)
    torch.testing.assert_close(clipped, torch.tensor([[11 / 4, 9 / 3, 6 / 2, 3.0, 0.0, 0.0]]))
    a = torch.tensor([2.25925, 2.82, 3.4, 4.0])
    expected = (a - a.mean()) / torch.sqrt(a.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(reference_advantages(rewards, mask, 0.95)[0, :4], expected)
    assert reference_advantages(rewards, mask, 0.95)[0, 4:].abs().sum() == 0


def test_whitening_covers_every_micro_batch_and_process_of_the_step():
    """The step's advantages are whitened together: two micro-batches whitened as one set of tokens
    (mean 0, population variance 1 over the union, padding 0), not each on its own; with a second process
    the statistics are summed across both (here a stand-in `reduce` adds the other process's sums)."""
    from lmdistill.methods.minillm import whiten_advantages

    torch.manual_seed(0)
    a1, a2 = torch.randn(2, 5), 3 + torch.randn(3, 4)
    m1 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    m2 = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    w1, w2 = whiten_advantages([a1, a2], [m1, m2])
    tokens = torch.cat([a1[m1.bool()], a2[m2.bool()]])
    expected = (tokens - tokens.mean()) / torch.sqrt(tokens.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(torch.cat([w1[m1.bool()], w2[m2.bool()]]), expected)
    assert w1[~m1.bool()].abs().sum() == 0 and w2[~m2.bool()].abs().sum() == 0
    alone = whiten_advantages([a1], [m1])[0]
    assert not torch.allclose(alone, w1), "per-micro-batch whitening would give the same numbers"

    # Process 0 holds a1, process 1 holds a2: each whitens its own tokens with the joint statistics.
    mean = []

    def reduce_with_other(local):  # adds what process 1 contributes to each all-reduce, in call order
        if not mean:  # first call: (sum, count)
            total = local + torch.stack([(a2 * m2).sum(), m2.sum()]).double()
            mean.append(total[0] / total[1])
            return total
        return local + (((a2.double() - mean[0]) * m2) ** 2).sum()  # second: squared deviations

    (distributed,) = whiten_advantages([a1], [m1], reduce_with_other)
    torch.testing.assert_close(distributed, w1)


def test_mixed_sampling_follows_the_mixture_and_reports_importance_weights():
    student, teacher = vocab4_model(1), vocab4_model(2, layers=2)
    alpha, n = 0.3, 3000
    prompts = collate([TokenizedExample([0, 1], [], []) for _ in range(n // 2)]
                      + [TokenizedExample([2], [], []) for _ in range(n // 2)], EOS, with_responses=False)
    torch.manual_seed(0)
    samples, log_w = mixed_sample(student, teacher, prompts, alpha, max_new_tokens=3)
    P = samples.prompt_width
    with torch.no_grad():
        for prompt, rows in (([0, 1], slice(0, n // 2)), ([2], slice(n // 2, n))):
            q = torch.softmax(student(torch.tensor([prompt])).logits[0, -1], -1)
            p = torch.softmax(teacher(torch.tensor([prompt])).logits[0, -1], -1)
            mixture = alpha * p + (1 - alpha) * q
            first = samples.input_ids[rows, P]
            freq = torch.bincount(first, minlength=4).float() / first.numel()
            se = (mixture * (1 - mixture) / first.numel()).sqrt()
            assert ((freq - mixture).abs() < 4 * se + 1e-3).all(), (freq, mixture)
            # log w of the first token = log q - log(mixture), from unpadded reference forwards
            expected = (q.log() - mixture.log())[first]
            assert torch.allclose(log_w[rows, 0], expected, atol=1e-4)
    # Later tokens: the KV-cached student log-probs equal a full teacher-forced forward over the left-padded batch.
    labels, mask = samples.targets()
    with torch.no_grad():
        q_full = token_log_probs(response_logits(student, samples), labels)
        p_full = token_log_probs(response_logits(teacher, samples), labels)
    mix_full = torch.logaddexp(p_full + torch.tensor(alpha).log(), q_full + torch.tensor(1 - alpha).log())
    assert torch.allclose(log_w, (q_full - mix_full) * mask, atol=1e-4)


def test_teacher_mix_zero_samples_from_the_student_alone():
    student, teacher = vocab4_model(1), vocab4_model(2)
    prompts = collate([TokenizedExample([0, 1], [], [])] * 4, EOS, with_responses=False)
    _, log_w = mixed_sample(student, teacher, prompts, 0.0, max_new_tokens=3)
    assert torch.all(log_w == 0)  # w = q / q


def test_clipped_ratio_stops_the_policy_gradient(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("minillm", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           single_step_weight=0.0, clip_range=0.2)
    method = trainer.method
    torch.manual_seed(0)
    rollout = method.prepare(trainer.micro_batches()[0], 0)
    _, mask = rollout.samples.targets()

    def grad_norm(work):
        method.student.zero_grad()
        method.loss(work, 0)[0].backward()
        return sum(float(p.grad.abs().sum()) for p in method.student.parameters() if p.grad is not None)

    assert grad_norm(rollout) > 0  # ratio 1: inside the clip range, a gradient flows
    # Old log-probs 1 nat lower: ratio e > 1 + eps; with positive returns the clipped term is the max -> no gradient.
    pushed = Rollout(rollout.samples, rollout.old_log_probs - 1.0, torch.zeros_like(rollout.log_weights),
                     torch.ones_like(rollout.returns) * mask, rollout.rewards)
    assert grad_norm(pushed) == 0.0


def test_minillm_lowers_reverse_kl_on_a_fixed_rollout(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("minillm", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", lr=3e-3)
    torch.manual_seed(0)
    rollout = trainer.method.prepare(trainer.micro_batches()[0], 0)
    _, mask = rollout.samples.targets()

    def rkl(work):
        return reverse_kl(response_logits(trainer.method.student, work.samples),
                          response_logits(trainer.method.teacher, work.samples), mask)

    before, after = objective_drops(trainer, rollout, rkl)
    assert after < 0.8 * before, (before, after)


def test_rollouts_are_reused_for_ppo_epochs_steps(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("minillm", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", ppo_epochs=2,
                           steps=2, max_new_tokens=4)
    trainer.train()  # one rollout, two clipped updates on it
    rows = metrics(tmp_path / "run")
    assert all(r["reverse_kl"] >= 0 and "pg_loss" in r and 0 <= r["clip_fraction"] <= 1 for r in rows)
    assert rows[0]["reward"] == rows[1]["reward"]  # the same frozen rewards at steps 0 and 1
    method = trainer.method
    trained_on = method.rollouts[0]
    batches = [trainer.micro_batches()[0] for _ in range(3)]

    def prepare(batch, step):
        method.begin_step(step)
        return method.prepare(batch, step)

    first = prepare(batches[0], 2)
    assert first is not trained_on  # step 2 samples afresh
    assert prepare(batches[1], 3) is first  # step 3 updates on step 2's rollout
    assert prepare(batches[2], 4) is not first  # step 4 samples afresh


@pytest.mark.parametrize("key,value", [("teacher_mix", 1.0), ("clip_range", 0), ("ppo_epochs", 0), ("top_p", 0.9)])
def test_minillm_config_checks(tiny_llama_student, instruct_file, key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["method=minillm", f"student={tiny_llama_student}", "teacher=t",
                           f"train_data={instruct_file}", f"{key}={value}"])
