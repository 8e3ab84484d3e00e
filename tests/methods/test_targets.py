"""The shared teacher step of the methods: `teacher_targets` cuts the student's output layer to the
teacher's vocabulary and drops the positions a teacher gave no distribution over, for a model, a
local teacher and a top-k teacher alike; `distill_loss` over them is one loss."""

import torch
from transformers import AutoModelForCausalLM

from lmdistill import losses
from lmdistill.data import TokenizedExample, collate
from lmdistill.forward import output_head, response_logits
from lmdistill.losses.chunked import CachedTargets
from lmdistill.methods.targets import distill_loss, teacher_targets
from lmdistill.teacher.local import DenseTargets, LocalTeacher


class PartlyKnownTopK:
    """A full top-k teacher over the first `rows` vocabulary entries that gives no distribution at the
    first response position of each row (as a server that skipped a token)."""

    def __init__(self, model, rows):
        self.model, self.vocab_size = model, rows
        self.checked = None

    def check_vocabulary(self, student_rows):
        self.checked = student_rows

    def targets(self, batch):
        logprobs = response_logits(self.model, batch).float()[..., : self.vocab_size].log_softmax(-1)
        top, ids = logprobs.sort(-1, descending=True)
        _, mask = batch.targets()
        known = mask.bool().clone()
        first = mask.float().argmax(-1)
        known[torch.arange(len(first)), first] = False
        return CachedTargets(ids, top, torch.full(mask.shape, float("-inf")), known)


def batch():
    return collate([TokenizedExample(list(range(5, 5 + n)), list(range(40, 40 + m)), []) for n, m in [(4, 6), (7, 3)]],
                   0)


def test_teacher_targets_for_a_model_and_a_local_teacher_are_dense_and_keep_the_mask(tiny_llama, tiny_llama_student):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_student, dtype=torch.float32)
    b = batch()
    for source in (teacher, LocalTeacher(teacher)):
        head, targets, mask = teacher_targets(output_head(student), source, b)
        assert isinstance(targets, DenseTargets)
        assert not targets.hidden.requires_grad
        torch.testing.assert_close(mask, b.targets()[1])
        assert head[0].shape[0] == min(output_head(student).weight.shape[0], output_head(teacher).weight.shape[0])


def test_teacher_targets_cut_the_student_head_and_mask_unknown_positions(tiny_llama, tiny_llama_student):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_student, dtype=torch.float32)
    b = batch()
    rows = output_head(student).weight.shape[0] - 5
    source = PartlyKnownTopK(teacher, rows)
    head, targets, mask = teacher_targets(output_head(student), source, b)
    assert source.checked == output_head(student).weight.shape[0]
    assert head[0].shape[0] == rows
    full = b.targets()[1]
    assert int(mask.sum()) == int(full.sum()) - 2  # one unknown position in each of the two rows
    assert bool((mask <= full).all())

    # distill_loss reads the same: the naive divergence over the known positions and the shared rows
    loss, _, _ = distill_loss(student, source, b, "forward_kl")
    student_logits = response_logits(student, b)[..., :rows]
    teacher_logits = response_logits(teacher, b).float()[..., :rows]
    expected = losses.forward_kl(student_logits, teacher_logits, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
