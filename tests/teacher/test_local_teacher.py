"""The one teacher interface: a local model, its top-k cache and (in test_served_teacher.py) a
server answer `targets(batch)`, and `distill_loss` reads any of them."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdistill.teacher.cache import topk_rows
from lmdistill.data import TokenizedExample, collate
from lmdistill.forward import response_logits
from lmdistill.losses.chunked import CachedTargets
from lmdistill.methods.targets import distill_loss
from lmdistill.teacher.local import DenseTargets, LocalTeacher, teacher_for


class FullTopK:
    """A top-k teacher with k = V, built from the local model: the cache/served layout, exact."""

    def __init__(self, model):
        self.model = model
        self.vocab_size = model.config.vocab_size

    def check_vocabulary(self, student_rows):
        assert student_rows >= self.vocab_size

    def targets(self, batch):
        logprobs = response_logits(self.model, batch).float().log_softmax(-1)
        ids, values, rest = topk_rows(logprobs.flatten(0, 1), self.vocab_size)
        shape = logprobs.shape[:-1]
        return CachedTargets(ids.view(*shape, -1), values.view(*shape, -1), rest.view(shape))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_a_local_teacher_a_model_and_a_full_top_k_give_one_loss_and_gradient(divergence, tiny_llama,
                                                                             tiny_llama_student):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_student, dtype=torch.float32)
    batch = collate([TokenizedExample(list(range(5, 5 + n)), list(range(40, 40 + m)), [])
                     for n, m in [(4, 6), (7, 3)]], 0)
    params = [p for p in student.parameters() if p.requires_grad]
    results = []
    for source in (teacher, LocalTeacher(teacher), FullTopK(teacher)):
        loss, _, _ = distill_loss(student, source, batch, divergence)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    assert isinstance(LocalTeacher(teacher).targets(batch), DenseTargets)
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_for_picks_the_cache_the_server_or_the_model(tiny_llama):
    from types import SimpleNamespace

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert isinstance(teacher_for(SimpleNamespace(teacher=str(tiny_llama), teacher_cache=None), None, model),
                      LocalTeacher)
    assert teacher_for(SimpleNamespace(teacher=str(tiny_llama), teacher_cache=None), None, None) is None
