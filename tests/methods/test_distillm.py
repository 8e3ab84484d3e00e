"""DistiLLM: skewed KL, replay buffer, adaptive threshold schedule."""

import random

import pytest
import torch

from kd_testing import make_trainer, metrics, objective_drops
from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.data import TokenizedExample, collate
from lmdistill.losses import skewed_forward_kl, skewed_reverse_kl
from lmdistill.methods.distillm import AdaptiveSchedule, ReplayBuffer
from lmdistill.forward import response_logits

PAD = 0


def sampled_batch(rows):
    return collate([TokenizedExample(p, r, []) for p, r in rows], PAD)


def test_replay_buffer_strips_padding_keeps_the_newest_and_round_trips():
    buffer = ReplayBuffer(capacity=3)
    buffer.add(sampled_batch([([5, 6], [1, 2, 3]), ([7], [4])]))
    assert [(e.prompt, e.response) for e in buffer.items] == [([5, 6], [1, 2, 3]), ([7], [4])]
    assert not buffer.full
    buffer.add(sampled_batch([([8], [9, 9]), ([10], [11])]))
    assert buffer.full and len(buffer) == 3
    assert [e.prompt for e in buffer.items] == [[7], [8], [10]]  # the oldest went first
    random.seed(0)
    drawn = buffer.sample(2)
    assert len(drawn) == 2 and len({id(e) for e in drawn}) == 2 and all(e in buffer.items for e in drawn)
    copy = ReplayBuffer(capacity=3)
    copy.load_state_dict(buffer.state_dict())
    assert [(e.prompt, e.response) for e in copy.items] == [(e.prompt, e.response) for e in buffer.items]


def test_schedule_chooses_generate_replay_or_data():
    s = AdaptiveSchedule(init_threshold=0.6, threshold_step=0.1, loss_eps=0.1)
    # step 5 of 10: generation below tau (1 - 5/10) = 0.3, replay up to tau = 0.6 once the buffer is full
    assert s.choose(0.29, 5, 10, buffer_full=True) == "generate"
    assert s.choose(0.31, 5, 10, buffer_full=True) == "replay"
    assert s.choose(0.31, 5, 10, buffer_full=False) == "generate"  # the buffer fills first
    assert s.choose(0.61, 5, 10, buffer_full=True) == "data"
    assert s.choose(0.05, 10, 10, buffer_full=True) == "replay"  # at the end generation has decayed to 0
    assert AdaptiveSchedule(0.0, 0.1, 0.1).choose(0.0001, 0, 10, buffer_full=False) == "data"


def test_threshold_rises_when_validation_loss_stops_improving():
    s = AdaptiveSchedule(init_threshold=0.0, threshold_step=0.1, loss_eps=0.1)
    assert not s.update(2.0)  # the first loss is the reference
    assert not s.update(1.5)  # improving: no change (the reference stays, as in the paper's code)
    assert not s.update(2.05)  # risen by less than eps over the reference 2.0
    assert s.update(2.1) and s.threshold == pytest.approx(0.1) and s.reference_loss == 2.1
    for loss in (2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1, 4.3):
        s.update(loss)
    assert s.threshold == 1.0  # capped
    restored = AdaptiveSchedule(0.0, 0.1, 0.1)
    restored.load_state_dict(s.state_dict())
    assert (restored.threshold, restored.reference_loss) == (1.0, s.reference_loss)


@pytest.mark.parametrize("loss_type,reference", [("sfkl", skewed_forward_kl), ("srkl", skewed_reverse_kl)])
def test_distillm_lowers_its_skewed_kl_on_a_fixed_batch(tiny_llama, tiny_llama_student, instruct_file, tmp_path,
                                                        loss_type, reference):
    trainer = make_trainer("distillm", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           loss_type=loss_type, skew=0.2, valid_examples=4)
    batch = trainer.micro_batches()[0]
    _, mask = batch.targets()
    with torch.no_grad():
        loss, _ = trainer.method.loss(batch, 0)
        s, t = response_logits(trainer.method.student, batch), response_logits(trainer.method.teacher, batch)
    assert float(loss) == pytest.approx(float(reference(s, t, mask, skew=0.2)), rel=1e-5)
    before, after = objective_drops(trainer, batch, lambda b: trainer.method.loss(b, 0)[0])
    assert after < 0.8 * before, (before, after)


def test_distillm_holds_out_validation_data_and_fills_the_buffer_on_policy(tiny_llama, tiny_llama_student,
                                                                            instruct_file, tmp_path):
    trainer = make_trainer("distillm", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", steps=3,
                           valid_examples=4, valid_every=2, init_threshold=1.0, capacity=100)
    method = trainer.method
    assert len(method.valid_examples) == 4 and len(trainer.examples) == 12  # 16 rows, last 4 held out
    held_out = {tuple(e.prompt) for e in method.valid_examples}
    assert not held_out & {tuple(e.prompt) for e in trainer.examples}
    trainer.train()
    rows = metrics(tmp_path / "run")
    assert [r["buffer_size"] for r in rows] == [2, 4, 6]  # tau = 1: every step generates (batch of 2)
    assert all(r["valid_loss"] > 0 for r in rows)
    assert method.schedule.reference_loss is not None  # validated at steps 0 and 2
    state = method.state_dict()
    assert len(state["buffer"]["prompts"]) == 6 and state["schedule"]["threshold"] >= 1.0


@pytest.mark.parametrize("key,value", [("loss_type", "tvd"), ("skew", 1.0), ("capacity", 1), ("valid_every", 0)])
def test_distillm_config_checks(tiny_llama_student, instruct_file, key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["method=distillm", f"student={tiny_llama_student}", "teacher=t",
                           f"train_data={instruct_file}", f"{key}={value}"])
