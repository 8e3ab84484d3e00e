"""ImitKD (forward KL on student samples through DistiLLM's replay buffer)."""

import pytest
import torch

from kd_testing import make_trainer, objective_drops
from lmdistill.config import ConfigError
from lmdistill.methods import load_config


def rows(batch):
    """The (prompt, response) token lists of a batch, without padding."""
    P, out = batch.prompt_width, set()
    for ids, attn, resp in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), batch.response_mask.tolist()):
        out.add((tuple(t for t, a in zip(ids[:P], attn[:P]) if a), tuple(t for t, r in zip(ids[P:], resp[P:]) if r)))
    return out


def test_imitkd_student_ratio_zero_keeps_the_data(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    off = make_trainer("imitkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "off", student_ratio=0.0)
    batch = off.micro_batches()[0]
    assert off.method.prepare(batch, 0) is batch
    assert len(off.method.buffer) == 0


def test_imitkd_trains_on_a_random_draw_from_the_buffer_of_its_samples(tiny_llama, tiny_llama_student,
                                                                      instruct_file, tmp_path):
    trainer = make_trainer("imitkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "on",
                           max_new_tokens=4, batch_size=2, capacity=5)
    method = trainer.method
    pushed = set()
    torch.manual_seed(0)
    for step in range(4):
        batch = trainer.micro_batches()[0]
        work = method.prepare(batch, step)
        assert len(method.buffer) == min(2 * (step + 1), 5)  # FIFO of the last `capacity` samples
        buffered = {(tuple(e.prompt), tuple(e.response)) for e in method.buffer.items}
        pushed |= buffered
        assert rows(work) <= buffered  # trained rows are buffer rows (student responses, <= 4 tokens)
        assert (work.response_mask.sum(1) <= 4).all()
    # The draw is uniform over the buffer, not the newest samples: over a few draws older rows appear.
    newest = {(tuple(e.prompt), tuple(e.response)) for e in list(method.buffer.items)[-2:]}
    draws = set()
    for _ in range(20):
        draws |= rows(method.prepare(trainer.micro_batches()[0], 5)) - newest
        draws -= {(tuple(e.prompt), tuple(e.response)) for e in list(method.buffer.items)[-2:]}
    assert draws, "the buffer draw never returned an older sample"


def test_imitkd_without_replay_trains_on_the_fresh_samples(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("imitkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "fresh",
                           max_new_tokens=4, replay=False)
    batch = trainer.micro_batches()[0]
    work = trainer.method.prepare(batch, 0)
    assert torch.equal(work.input_ids[:, :batch.prompt_width], batch.input_ids[:, :batch.prompt_width])
    assert len(trainer.method.buffer) == 0


def test_imitkd_lowers_forward_kl_on_a_fixed_batch(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    # lr 3e-3: at 1e-2 Adam overshoots on some sampled batches (the objective is ~0.01 here).
    trainer = make_trainer("imitkd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           batch_size=4, lr=3e-3)
    torch.manual_seed(3)
    work = trainer.method.prepare(trainer.micro_batches()[0], 0)
    before, after = objective_drops(trainer, work, lambda b: trainer.method.loss(b, 0)[0])
    assert after < 0.8 * before, (before, after)


def test_imitkd_config_range(tiny_llama_student, instruct_file):
    base = ["method=imitkd", f"student={tiny_llama_student}", "teacher=t", f"train_data={instruct_file}"]
    with pytest.raises(ConfigError, match="student_ratio"):
        load_config(None, base + ["student_ratio=2"])
    with pytest.raises(ConfigError, match="capacity"):
        load_config(None, base + ["capacity=2", "batch_size=4"])
