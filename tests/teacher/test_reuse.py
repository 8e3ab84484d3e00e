"""`teacher_reuse_top_k`: the dense teacher on an example's first batch, its remembered top-k after."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdistill import losses
from lmdistill.data import TokenizedExample, collate
from lmdistill.forward import response_logits
from lmdistill.losses.chunked import CachedTargets
from lmdistill.methods.targets import distill_loss
from lmdistill.teacher.cache import topk_rows
from lmdistill.teacher.local import DenseTargets, LocalTeacher
from lmdistill.teacher.reuse import ReusedTopKTeacher


def examples(shapes, offset=5):
    return [TokenizedExample(list(range(offset + 3 * i, offset + 3 * i + n)), list(range(40 + i, 40 + i + m)), [])
            for i, (n, m) in enumerate(shapes)]


@pytest.fixture(scope="module")
def pair(tiny_llama, tiny_llama_student):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_student, dtype=torch.float32)
    return teacher, student


def test_the_second_epoch_reads_the_first_epochs_top_k_and_no_teacher_forward(pair):
    teacher, student = pair
    rows = examples([(4, 6), (7, 3), (5, 5)])
    reused = ReusedTopKTeacher(LocalTeacher(teacher), k=7)
    calls = []
    hook = teacher.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        epoch1 = [collate(rows[:2], 0), collate(rows[2:], 0)]
        dense = [distill_loss(student, reused, b, "forward_kl")[0] for b in epoch1]
        assert len(calls) == 2
        epoch2 = collate([rows[2], rows[0]], 0)  # another batching of remembered examples: other padding
        targets = reused.targets(epoch2)
        assert len(calls) == 2, "a remembered batch must not run the teacher"
    finally:
        hook.remove()
    assert isinstance(reused.targets(collate([rows[0], *examples([(2, 2)], offset=90)], 0)), DenseTargets)
    # the naive reference: full logits of the teacher on that batch, their top-7
    assert isinstance(targets, CachedTargets)
    logprobs = losses.log_probs(response_logits(teacher, epoch2))
    _, mask = epoch2.targets()
    ids, values, rest = topk_rows(logprobs[mask.bool()], 7)
    torch.testing.assert_close(targets.ids[mask.bool()], ids)
    torch.testing.assert_close(targets.logprobs[mask.bool()], values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets.rest[mask.bool()], rest, rtol=1e-5, atol=1e-5)
    # the first epoch's loss was the dense one
    torch.testing.assert_close(dense[0], distill_loss(student, teacher, epoch1[0], "forward_kl")[0])


def test_with_k_the_whole_vocabulary_the_reused_loss_is_the_dense_loss(pair):
    teacher, student = pair
    rows = examples([(4, 6), (7, 3)])
    batch = collate(rows, 0)
    reused = ReusedTopKTeacher(LocalTeacher(teacher), k=teacher.config.vocab_size)
    first = distill_loss(student, reused, batch, "forward_kl")[0]
    params = [p for p in student.parameters() if p.requires_grad]
    second = distill_loss(student, reused, batch, "forward_kl")[0]
    assert isinstance(reused.targets(batch), CachedTargets)
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-6)
    dense_grads = torch.autograd.grad(distill_loss(student, teacher, batch, "forward_kl")[0], params)
    for a, b in zip(torch.autograd.grad(second, params), dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kd_with_reuse_trains_and_its_second_epoch_runs_no_teacher(tiny_llama, tiny_llama_student, instruct_file,
                                                                  tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kd_testing import make_trainer, metrics

    trainer = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run",
                           teacher_reuse_top_k=8, kd_ratio=1.0, batch_size=4, max_train_examples=8, steps=6)
    per_epoch = trainer.order.batches_per_epoch
    assert per_epoch == 2
    method = trainer.method
    assert isinstance(method.teacher_source, ReusedTopKTeacher)
    batch = method.collate(trainer.examples)

    def dense_kl() -> float:  # the objective against the dense teacher, on all 8 training examples
        with torch.no_grad():
            return distill_loss(method.student, method.teacher, batch, "forward_kl")[0].item()

    before = dense_kl()
    calls = []
    method.teacher.base_model.register_forward_hook(lambda *_: calls.append(trainer.order.position))
    trainer.train()
    assert len(calls) == per_epoch and max(calls) <= per_epoch  # epoch 1 only (3 epochs run)
    assert len([m for m in metrics(tmp_path / "run") if "forward_kl" in m]) == 6
    assert dense_kl() < before


def test_the_switch_is_validated(tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    from lmdistill.config import ConfigError
    from lmdistill.methods import load_config

    common = [f"student={tiny_llama_student}", f"teacher={tiny_llama}", f"train_data={instruct_file}"]
    with pytest.raises(ConfigError, match="teacher_reuse_top_k"):
        load_config(None, ["method=kd", *common, "teacher_reuse_top_k=-1"])
    with pytest.raises(ConfigError, match="teacher_reuse_top_k"):  # samples are new every step
        load_config(None, ["method=gkd", *common, "teacher_reuse_top_k=8", "lmbda=0.5"])
    with pytest.raises(ConfigError, match="teacher_reuse_top_k"):
        load_config(None, ["method=kd", *common, "teacher_reuse_top_k=8", "teacher=openai:http://localhost:1/v1#m"])
    assert load_config(None, ["method=gkd", *common, "teacher_reuse_top_k=8", "lmbda=0"]).teacher_reuse_top_k == 8
