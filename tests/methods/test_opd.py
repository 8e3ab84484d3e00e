"""On-policy distillation (sampled-token reverse KL): the expected gradient against exact enumeration,
gradients into the student only, a served teacher against a local one, and training."""

import itertools
import math
import types

import pytest
import torch

from kd_testing import make_trainer, metrics, objective_drops
from lmdistill.config import ConfigError
from lmdistill.data import TokenizedExample, collate
from lmdistill.forward import response_logits
from lmdistill.losses import token_reverse_kl
from lmdistill.methods import load_config
from lmdistill.methods.opd import OPD, OPDConfig, Rollout, discounted_returns
from lmdistill.sampling import sample_responses
from lmdistill.teacher.local import LocalTeacher
from servers import FakeVLLMServer

EOS, PROMPT, LENGTH = 3, [0, 1], 3
EOS_GPT2 = 50256  # the tiny Llamas' EOS and pad (GPT-2's tokenizer)


def vocab4_model(seed, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=EOS, pad_token_id=EOS, initializer_range=0.6, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


class Vocab4Tokenizer:
    pad_token_id = EOS

    def __len__(self):
        return 4


def opd_on(student, teacher, **fields) -> OPD:
    """OPD over two in-memory vocab-4 models, without a Trainer (no tokenizer folder exists for them)."""
    method = OPD.__new__(OPD)
    method.config = OPDConfig(student="s", teacher="t", train_data="d", max_new_tokens=LENGTH, max_length=32,
                              **fields)
    method.student, method.teacher, method.tokenizer = student, teacher, Vocab4Tokenizer()
    method.accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    method.eos_ids, method.sampler, method.teacher_source = [EOS], None, LocalTeacher(teacher)
    return method


def every_response() -> list[list[int]]:
    """Every response of at most LENGTH tokens: ended by EOS, or cut at LENGTH without one."""
    out = [list(p) + [EOS] for n in range(LENGTH) for p in itertools.product(range(3), repeat=n)]
    return out + [list(p) for p in itertools.product(range(3), repeat=LENGTH)]


def sequence_logprobs(model, batch):
    labels, mask = batch.targets()
    logits = response_logits(model, batch).float().log_softmax(-1)
    return (logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(1), logits, mask


def flat_grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, model.parameters())])


def test_discounted_returns_match_a_loop():
    torch.manual_seed(0)
    rewards, mask = torch.randn(3, 5), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    for discount in (0.0, 0.5, 1.0):
        got = discounted_returns(rewards, mask, discount)
        for b in range(3):
            T = int(mask[b].sum())
            for t in range(5):
                want = sum(discount ** (u - t) * rewards[b, u].item() for u in range(t, T)) if t < T else 0.0
                assert got[b, t].item() == pytest.approx(want, abs=1e-5), (discount, b, t)


def exact_targets(student, teacher):
    """By enumeration of all 40 responses: grad of the sequence-level KL(q_S || p_T), and grad of
    sum_t KL(q_S(. | y_<t) || p_T(. | y_<t)) with the prefix distribution held fixed (what discount 0 follows)."""
    batch = collate([TokenizedExample(PROMPT, r, []) for r in every_response()], EOS)
    log_q, q_rows, mask = sequence_logprobs(student, batch)
    with torch.no_grad():
        log_p, p_rows, _ = sequence_logprobs(teacher, batch)
    q = log_q.exp()
    assert float(q.sum().detach()) == pytest.approx(1.0, abs=1e-5)  # the enumeration is a whole distribution
    sequence_kl = (q * (log_q - log_p)).sum()
    per_position = (token_reverse_kl(q_rows, p_rows) * mask).sum(1)  # each response's own positions
    myopic = (q.detach() * per_position).sum()
    return batch, q.detach(), flat_grad(sequence_kl, student), flat_grad(myopic, student)


def expected_opd_gradient(method, batch, q):
    """sum_y q(y) grad L(y) from the method's own score and loss on all responses at once: L is linear in
    each response's advantages and the loss averages the responses, so advantages scaled by B q(y) weight them."""
    work = method.score(batch)
    work.advantages = work.advantages * (len(q) * q).unsqueeze(1)
    return flat_grad(method.loss(work, 0)[0], method.student)


def test_expected_opd_gradient_is_the_sequence_level_reverse_kl_gradient_exactly():
    student, teacher = vocab4_model(1), vocab4_model(2, layers=2)
    batch, q, sequence_kl, myopic = exact_targets(student, teacher)
    assert (sequence_kl - myopic).norm() > 0.1 * sequence_kl.norm()  # the two targets are told apart
    full = expected_opd_gradient(opd_on(student, teacher, discount=1.0), batch, q)
    torch.testing.assert_close(full, sequence_kl, rtol=1e-4, atol=1e-6)
    # The reference's default, discount 0: each token answers for its own reward only, i.e. the
    # per-position reverse KL on the student's prefixes, their distribution held fixed.
    per_token = expected_opd_gradient(opd_on(student, teacher, discount=0.0), batch, q)
    torch.testing.assert_close(per_token, myopic, rtol=1e-4, atol=1e-6)


def test_sampled_opd_gradient_converges_to_the_sequence_level_reverse_kl_gradient():
    """Monte Carlo through the method's own sampling (prepare -> loss), 8 batches of 300 samples:
    within 3 standard errors of the exact gradient, and the discount-0 target is rejected."""
    student, teacher = vocab4_model(1), vocab4_model(2, layers=2)
    _, _, sequence_kl, myopic = exact_targets(student, teacher)
    method = opd_on(student, teacher, discount=1.0)
    prompts = collate([TokenizedExample(PROMPT, [EOS], [])] * 300, EOS)
    torch.manual_seed(0)
    grads = torch.stack([flat_grad(method.loss(method.prepare(prompts, 0), 0)[0], student) for _ in range(8)])
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    noise = se.norm()
    assert noise < 0.15 * sequence_kl.norm(), "too few samples for a sharp check"
    assert (mean - sequence_kl).norm() < 3 * noise, ((mean - sequence_kl).norm(), noise)
    assert (mean - myopic).norm() > 3 * noise


def test_gradients_reach_the_student_only_through_log_q_of_the_sampled_tokens(tiny_llama, tiny_llama_student,
                                                                              instruct_file, tmp_path):
    trainer = make_trainer("opd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", precision="fp32",
                           discount=0.5)
    method = trainer.method
    torch.manual_seed(0)
    work = method.prepare(trainer.micro_batches()[0], 0)
    assert not any(t.requires_grad for t in (work.old_log_probs, work.rewards, work.advantages))
    # An older sampler: old log-probs 0.3 nats off, so rho != 1.
    work = Rollout(work.samples, work.old_log_probs - 0.3 * work.mask, work.rewards, work.advantages, work.mask)
    loss, _ = method.loss(work, 0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    got = [p.grad.clone() for p in method.student.parameters()]
    method.student.zero_grad()
    # Naive: full logits, -(1/B) sum_t exp(log q - log q_old) A_t with A_t and log q_old constants.
    labels, _ = work.samples.targets()
    log_q = response_logits(method.student, work.samples).float().log_softmax(-1)
    log_q = log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    naive = -(torch.exp(log_q - work.old_log_probs) * work.advantages * work.mask).sum() / labels.shape[0]
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    naive.backward()
    for g, p in zip(got, method.student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_a_few_opd_steps_lower_the_exact_sequence_level_reverse_kl():
    student, teacher = vocab4_model(1), vocab4_model(2, layers=2)
    method = opd_on(student, teacher)  # the reference's defaults: discount 0, one step per rollout
    optimiser = torch.optim.AdamW(student.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    prompts = collate([TokenizedExample(PROMPT, [EOS], [])] * 128, EOS)
    batch = collate([TokenizedExample(PROMPT, r, []) for r in every_response()], EOS)

    def sequence_kl():
        with torch.no_grad():
            log_q, log_p = sequence_logprobs(student, batch)[0], sequence_logprobs(teacher, batch)[0]
        return float((log_q.exp() * (log_q - log_p)).sum())

    torch.manual_seed(0)
    before = sequence_kl()
    for step in range(10):
        loss, _ = method.loss(method.prepare(prompts, step), step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert sequence_kl() < 0.5 * before, (before, sequence_kl())


def test_trainer_updates_lower_the_opd_loss_of_a_rollout(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    """The loop's updates on one rollout lower its importance-weighted loss (rho moves off 1 as it should)."""
    trainer = make_trainer("opd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", lr=3e-3)
    torch.manual_seed(0)
    work = trainer.method.prepare(trainer.micro_batches()[0], 0)
    before, after = objective_drops(trainer, work, lambda w: trainer.method.loss(w, 0)[0])
    assert after < before - 0.1 * abs(before), (before, after)


def test_training_run_and_substeps_keep_the_sampler_between_rollouts(tiny_llama, tiny_llama_student, instruct_file,
                                                                     tmp_path):
    trainer = make_trainer("opd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", substeps=2,
                           steps=3, max_new_tokens=6)
    trainer.train()
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "reverse_kl" in r] == [1, 2, 3]
    method = trainer.method
    sampler = method.sampler
    method.begin_step(3)  # within the rollout of step 2: the same sampler
    assert method.sampler is sampler
    method.begin_step(4)  # a new rollout: the student as it is now
    assert method.sampler is not sampler
    assert all(torch.equal(a, b) for a, b in zip(method.sampler.parameters(), method.student.parameters()))
    assert not any(p.requires_grad for p in method.sampler.parameters())


def test_served_vllm_teacher_equals_the_local_teacher(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    server = FakeVLLMServer(tiny_llama)
    try:
        served = make_trainer("opd", f"openai:{server.url}#tiny", tiny_llama_student, instruct_file,
                              tmp_path / "served", precision="fp32", teacher_server="vllm", discount=0.5)
        local = make_trainer("opd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "local",
                             precision="fp32", discount=0.5)
        assert served.method.teacher is None
        batch = local.micro_batches()[0]
        torch.manual_seed(0)
        got = served.method.prepare(batch, 0)
        torch.manual_seed(0)
        want = local.method.prepare(batch, 0)
    finally:
        server.close()
    assert torch.equal(got.samples.input_ids, want.samples.input_ids)
    assert server.requests == batch.input_ids.shape[0] and got.missing == 0.0
    torch.testing.assert_close(got.rewards, want.rewards, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.advantages, want.advantages, rtol=0, atol=1e-5)
    assert got.rewards.abs().sum() > 0
    torch.testing.assert_close(served.method.loss(got, 0)[0], local.method.loss(want, 0)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("missing_token", ["tail", "drop"])
def test_served_llama_cpp_teacher_reads_the_top_k_and_treats_absent_tokens_as_stated(
        missing_token, tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    from teacher.test_served_teacher import FakeLlamaServer

    server = FakeLlamaServer(tiny_llama)
    try:
        served = make_trainer("opd", f"openai:{server.url}#tiny", tiny_llama_student, instruct_file,
                              tmp_path / "served", precision="fp32", teacher_top_k=20, missing_token=missing_token)
        local = make_trainer("opd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "local",
                             precision="fp32")
        # Row 0: the teacher's own greedy response (its tokens are in its top k); row 1: a student sample
        # (a random model over 50k tokens: outside the teacher's top 20).
        prompts = local.micro_batches()[0].prompts()
        greedy = sample_responses(local.method.teacher, prompts, local.method.eos_ids, EOS_GPT2, 8, do_sample=False,
                                  no_repeat_ngram_size=1)
        torch.manual_seed(0)
        sampled = sample_responses(local.method.student, prompts, local.method.eos_ids, EOS_GPT2, 8)
        rows = [TokenizedExample(*greedy.sequences()[0], []), TokenizedExample(*sampled.sequences()[1], [])]
        samples = collate(rows, EOS_GPT2)
        got, want = served.method.score(samples), local.method.score(samples)
        top = served.method.teacher_source.targets(samples)
    finally:
        server.close()
    labels, mask = want.samples.targets()
    found = (top.ids == labels.unsqueeze(-1)).any(-1) & mask.bool() & top.known
    absent = mask.bool() & top.known & ~found
    assert found.any() and absent.any()  # both cases occur on these samples
    assert got.missing == pytest.approx(float((mask.bool() & ~found).sum()) / float(mask.sum()))
    # A token in the teacher's top k: exactly the local teacher's reward.
    torch.testing.assert_close(got.rewards[found], want.rewards[found], rtol=0, atol=1e-4)
    if missing_token == "drop":
        assert not got.mask[absent].any() and (got.rewards[absent] == 0).all()
        return
    # Outside it: log p_T(rest) - log q_old(rest), rest = the tokens outside the teacher's top k.
    student = local.method.student
    with torch.no_grad():
        q = response_logits(student, want.samples).float().log_softmax(-1)
    ids = top.ids.clamp(min=0)
    q_rest = torch.log1p(-(q.gather(-1, ids).exp() * (top.ids >= 0)).sum(-1).clamp(max=1 - 1e-7))
    torch.testing.assert_close(got.rewards[absent], (top.rest - q_rest)[absent], rtol=0, atol=1e-4)
    assert got.mask[absent].all()


def test_a_top_k_teacher_cache_is_refused_with_the_reason(tiny_llama_student, instruct_file, tmp_path):
    with pytest.raises(ConfigError, match="config key .teacher_cache.*drawn during training.*fixed before training"):
        load_config(None, ["method=opd", f"student={tiny_llama_student}", "teacher=t", f"train_data={instruct_file}",
                           f"teacher_cache={tmp_path}"])


@pytest.mark.parametrize("key,value", [("discount", 1.5), ("kl_coef", 0), ("substeps", 0), ("missing_token", "x")])
def test_opd_config_checks(tiny_llama_student, instruct_file, key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["method=opd", f"student={tiny_llama_student}", "teacher=t",
                           f"train_data={instruct_file}", f"{key}={value}"])
