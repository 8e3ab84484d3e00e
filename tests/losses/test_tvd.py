"""The `tvd` divergence (total variation, DistillSpec): the naive loss against a hand loop, the chunked
closed form against the naive loss and against autograd (values and gradients), the top-k path at k = V,
and KD with `divergence: tvd` lowering it."""

import pytest
import torch
from kd_testing import make_trainer, objective_drops
from test_chunked_losses import MASKS, grads, heads_and_states

from lmdistill import losses
from lmdistill.config import ConfigError
from lmdistill.forward import response_logits
from lmdistill.losses.chunked import CachedTargets, chunked_divergence, chunked_kd_loss, chunked_loss, token_divergence
from lmdistill.methods import load_config
from lmdistill.model_card import model_card


def test_naive_tvd_is_half_the_l1_distance_and_one_minus_the_overlap():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    p, q = teacher.softmax(-1), student.softmax(-1)
    loop, overlap = [], []
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                loop.append(0.5 * sum(abs(float(p[b, t, v]) - float(q[b, t, v])) for v in range(7)))
                overlap.append(sum(min(float(p[b, t, v]), float(q[b, t, v])) for v in range(7)))
    got = losses.DIVERGENCES["tvd"](student, teacher, mask)
    assert float(got) == pytest.approx(sum(loop) / len(loop), abs=1e-6)
    assert float(got) == pytest.approx(1 - sum(overlap) / len(overlap), abs=1e-6)
    assert losses.DIVERGENCES["tvd"] is losses.total_variation


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("chunk_size", [1, 4, 256])
def test_chunked_tvd_equals_naive_values_and_gradients(chunk_size, mask_name):
    student_head, teacher_head, h_s, h_t = heads_and_states()
    mask = MASKS[mask_name]
    wrt = [h_s, h_t, student_head.weight, student_head.bias, teacher_head.weight]
    naive = losses.total_variation(student_head(h_s), teacher_head(h_t), mask)
    chunked = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, "tvd", chunk_size=chunk_size)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    closed_form = grads(chunked, wrt)
    for ours, ref, what in zip(closed_form, grads(naive, wrt), ["h_s", "h_t", "W_s", "b_s", "W_t"]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"d/d{what}: {m}")
    # The closed form is what ran; autograd on the token function gives the same gradients.
    by_autograd = chunked_loss(token_divergence("tvd"), h_s, student_head, mask, h_t, teacher_head,
                               chunk_size=chunk_size)
    for ours, ref in zip(closed_form, grads(by_autograd, wrt)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_chunked_tvd_mixed_with_cross_entropy_equals_naive():
    student_head, teacher_head, h_s, h_t = heads_and_states()
    mask = MASKS["some rows masked"]
    labels = torch.randint(0, student_head.weight.shape[0], mask.shape, generator=torch.Generator().manual_seed(3))
    loss, tv, ce = chunked_kd_loss(h_s, student_head, mask, h_t, teacher_head, divergence="tvd", labels=labels,
                                   ce_weight=0.3)
    z_s, z_t = student_head(h_s), teacher_head(h_t)
    naive = 0.7 * losses.total_variation(z_s, z_t, mask) + 0.3 * losses.cross_entropy(z_s, labels, mask)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    for ours, ref in zip(grads(loss, [h_s, student_head.weight]), grads(naive, [h_s, student_head.weight])):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_top_k_tvd_with_the_whole_vocabulary_is_the_dense_tvd():
    student_head, teacher_head, h_s, h_t = heads_and_states()
    mask = MASKS["all rows"]
    with torch.no_grad():
        t = teacher_head(h_t).float().log_softmax(-1)
    values, ids = t.sort(-1, descending=True)
    cached = CachedTargets(ids, values, torch.full(mask.shape, float("-inf")))
    top_k, _, _ = chunked_kd_loss(h_s, student_head, mask, cached=cached, divergence="tvd")
    dense = losses.total_variation(student_head(h_s), teacher_head(h_t).detach(), mask)
    torch.testing.assert_close(top_k, dense, rtol=1e-5, atol=1e-6)


def test_kd_with_tvd_lowers_the_total_variation_to_the_teacher(tiny_llama, tiny_llama_student, instruct_file,
                                                               tmp_path):
    trainer = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", kd_ratio=1.0,
                           divergence="tvd", precision="fp32")
    batch = trainer.micro_batches()[0]
    loss, logs = trainer.method.loss(batch, 0)
    _, mask = batch.targets()

    def tv(work):
        return losses.total_variation(response_logits(trainer.method.student, work),
                                      response_logits(trainer.method.teacher, work), mask)

    assert float(loss.detach()) == pytest.approx(float(tv(batch).detach()), rel=1e-4) and "tvd" in logs
    before, after = objective_drops(trainer, batch, tv)
    assert after < 0.9 * before, (before, after)
    assert "with divergence `tvd` in place of the forward KL" in model_card(trainer.config, tmp_path / "run")
    with pytest.raises(ConfigError, match="config key 'divergence'"):
        load_config(None, ["method=kd", f"student={tiny_llama_student}", "teacher=t", f"train_data={instruct_file}",
                           "divergence=jsd"])
