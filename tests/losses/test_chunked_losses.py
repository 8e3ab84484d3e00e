"""Chunked losses equal the naive full-logits losses (values and gradients), and never
build a full [rows, vocab] tensor."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lmdistill import losses
from lmdistill.data import collate
from lmdistill.forward import _whole_sequence_shift, output_head, response_hidden, response_logits
from lmdistill.losses.chunked import (
    chunked_cross_entropy,
    chunked_divergence,
    chunked_kd_loss,
    chunked_token_logprobs,
    token_divergence,
)

DIVERGENCES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5}), ("generalized_jsd", {"beta": 0.2}),
    ("generalized_jsd", {"beta": 0.0}), ("generalized_jsd", {"beta": 1.0}), ("skewed_forward_kl", {"skew": 0.1}),
    ("skewed_reverse_kl", {"skew": 0.3}), ("total_variation", {}),
]
B, T, H_S, H_T, V = 3, 9, 8, 12, 37


def heads_and_states(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    student_head, teacher_head = nn.Linear(H_S, V, bias=bias), nn.Linear(H_T, V, bias=False)
    with torch.no_grad():
        for p in [*student_head.parameters(), *teacher_head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    h_s = torch.randn(B, T, H_S, generator=g, requires_grad=True)
    h_t = torch.randn(B, T, H_T, generator=g, requires_grad=True)
    return student_head, teacher_head, h_s, h_t


MASKS = {
    "all rows": torch.ones(B, T, dtype=torch.bool),
    "some rows masked": torch.rand(B, T, generator=torch.Generator().manual_seed(1)) > 0.4,
    "one row": torch.zeros(B, T, dtype=torch.bool).index_put_(
        (torch.tensor([1]), torch.tensor([4])), torch.tensor(True)
    ),
}


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("chunk_size", [1, 4, 256])
@pytest.mark.parametrize("name,params", DIVERGENCES)
def test_chunked_divergence_equals_naive_values_and_gradients(name, params, chunk_size, mask_name):
    student_head, teacher_head, h_s, h_t = heads_and_states()
    mask = MASKS[mask_name]
    wrt = [h_s, h_t, student_head.weight, student_head.bias, teacher_head.weight]
    naive = losses.DIVERGENCES[name](student_head(h_s), teacher_head(h_t), mask, **params)
    chunked = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, name, chunk_size=chunk_size, **params)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    for ours, ref, what in zip(grads(chunked, wrt), grads(naive, wrt), ["h_s", "h_t", "W_s", "b_s", "W_t"]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"d/d{what}: {m}")


def test_empty_mask_gives_zero_loss_and_zero_gradients():
    student_head, teacher_head, h_s, h_t = heads_and_states()
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, "reverse_kl")
    assert loss.item() == 0.0
    g_h, g_w = grads(loss, [h_s, student_head.weight])
    assert torch.count_nonzero(g_h) == 0 and torch.count_nonzero(g_w) == 0


@pytest.mark.parametrize("chunk_size", [1, 5, 256])
def test_chunked_cross_entropy_equals_naive(chunk_size):
    student_head, _, h_s, _ = heads_and_states(bias=False)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    mask = MASKS["some rows masked"]
    naive = losses.cross_entropy(student_head(h_s), labels, mask)
    chunked = chunked_cross_entropy(h_s, student_head, labels, mask, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    for ours, ref in zip(grads(chunked, [h_s, student_head.weight]), grads(naive, [h_s, student_head.weight])):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_frozen_teacher_gets_no_gradient_and_student_gradient_is_unchanged():
    student_head, teacher_head, h_s, h_t = heads_and_states()
    teacher_head.requires_grad_(False)
    h_t = h_t.detach()
    mask = MASKS["some rows masked"]
    chunked = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, "generalized_jsd", chunk_size=2)
    chunked.backward()
    assert teacher_head.weight.grad is None
    naive_grad = torch.autograd.grad(losses.generalized_jsd(student_head(h_s), teacher_head(h_t), mask), h_s)[0]
    torch.testing.assert_close(h_s.grad, naive_grad, rtol=1e-4, atol=1e-6)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_full_vocabulary_tensor_exists_in_forward_or_backward():
    big_v, rows, chunk = 1000, 40, 8
    g = torch.Generator().manual_seed(0)
    student_head, teacher_head = nn.Linear(H_S, big_v, bias=False), nn.Linear(H_T, big_v, bias=False)
    h_s = torch.randn(2, rows // 2, H_S, generator=g, requires_grad=True)
    h_t = torch.randn(2, rows // 2, H_T, generator=g)
    mask = torch.ones(2, rows // 2, dtype=torch.bool)
    recorder = ShapeRecorder()
    with recorder:
        loss = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, "generalized_jsd", chunk_size=chunk)
        loss.backward()
    vocab_sized = [s for s in recorder.shapes if big_v in s]
    assert vocab_sized, "the recorder saw no projection at all"
    # Each vocabulary-sized tensor is a chunk ([<=chunk, V], the 2-way JSD mixture stack
    # [2, <=chunk, V]) or the weight gradient [V, H]; never [rows, V].
    worst = max(torch.Size(s).numel() for s in vocab_sized)
    assert worst <= max(2 * chunk * big_v, big_v * max(H_S, H_T)), sorted(set(vocab_sized))
    # The naive loss on the same inputs does build [.., rows, V] tensors (so the recorder can see them).
    recorder = ShapeRecorder()
    with recorder:
        losses.generalized_jsd(student_head(h_s), teacher_head(h_t), mask)
    assert max(torch.Size(s).numel() for s in recorder.shapes) >= rows * big_v


def test_unknown_divergence_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence("kl")
    with pytest.raises(ValueError, match="beta"):
        token_divergence("generalized_jsd", beta=1.5)
    with pytest.raises(ValueError, match="takes"):
        token_divergence("forward_kl", beta=0.5)


def test_bf16_autocast_stays_close_to_the_float32_loss():
    student_head, teacher_head, h_s, h_t = heads_and_states()
    mask = MASKS["some rows masked"]
    exact = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, "forward_kl", chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, "forward_kl", chunk_size=4)
        naive_mixed = losses.forward_kl(student_head(h_s), teacher_head(h_t), mask)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.05)
    torch.testing.assert_close(mixed, naive_mixed, rtol=0.02, atol=0.02)
    g_mixed, g_exact = grads(mixed, [h_s])[0], grads(exact, [h_s])[0]
    assert g_mixed.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g_mixed.flatten(), g_exact.flatten(), dim=0) > 0.99


# ----- with real models: response_hidden + output_head reproduce response_logits -----


@pytest.fixture(scope="module")
def tiny_models(tiny_llama, tiny_llama_student, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(path).eval()
        for name, path in [("llama", tiny_llama), ("llama_student", tiny_llama_student), ("gpt2", tiny_gpt2)]
    }


def ragged_batch():
    from lmdistill.data import TokenizedExample

    examples = [
        TokenizedExample([5, 6, 7, 8], [9, 10, 50256], []),
        TokenizedExample([11, 12], [13, 14, 15, 16, 50256], []),
    ]
    return collate(examples, pad_id=50256)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_response_hidden_projected_by_output_head_is_response_logits(tiny_models, name):
    model = tiny_models[name]
    batch = ragged_batch()
    # P + R = 9 columns, but no row is longer than 7 tokens: the backbone runs 7 wide.
    assert _whole_sequence_shift(batch).tolist() == [0, -2]
    with torch.no_grad():
        logits = response_logits(model, batch)
        projected = output_head(model)(response_hidden(model, batch))
    torch.testing.assert_close(projected, logits, rtol=1e-5, atol=1e-5)


def test_response_hidden_with_a_soft_prompt_prefix(tiny_models):
    model = tiny_models["llama"]
    batch = ragged_batch()
    prefix = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        logits = response_logits(model, batch, prefix=prefix)
        projected = output_head(model)(response_hidden(model, batch, prefix=prefix))
    torch.testing.assert_close(projected, logits, rtol=1e-5, atol=1e-5)


def test_chunked_kd_on_models_matches_naive_with_an_inference_mode_teacher(tiny_models):
    student, teacher = tiny_models["llama_student"], tiny_models["llama"]
    batch = ragged_batch()
    _, mask = batch.targets()
    with torch.inference_mode():
        teacher_hidden = response_hidden(teacher, batch)
        teacher_logits = response_logits(teacher, batch)
    params = [p for p in student.parameters()]
    chunked = chunked_divergence(
        response_hidden(student, batch),
        output_head(student),
        teacher_hidden,
        output_head(teacher),
        mask,
        "forward_kl",
        chunk_size=3,
    )
    g_chunked = torch.autograd.grad(chunked, params)
    naive = losses.forward_kl(response_logits(student, batch), teacher_logits.clone(), mask)
    g_naive = torch.autograd.grad(naive, params)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunked, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_output_head_refuses_models_that_rescale_logits(tiny_models):
    import copy

    model = copy.deepcopy(tiny_models["gpt2"])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        output_head(model)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_kd_objective_mixes_divergence_and_cross_entropy_in_one_pass(ce_weight):
    student_head, teacher_head, h_s, h_t = heads_and_states()
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    mask = MASKS["some rows masked"]
    loss, kl, ce = chunked_kd_loss(
        h_s,
        student_head,
        mask,
        teacher_hidden=h_t,
        teacher_head=teacher_head,
        divergence="generalized_jsd",
        labels=labels,
        ce_weight=ce_weight,
        chunk_size=4,
        beta=0.3,
    )
    s_logits, t_logits = student_head(h_s), teacher_head(h_t)
    naive_kl = losses.generalized_jsd(s_logits, t_logits, mask, beta=0.3)
    naive_ce = losses.cross_entropy(s_logits, labels, mask)
    naive = (1 - ce_weight) * naive_kl + ce_weight * naive_ce
    torch.testing.assert_close(kl, naive_kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, naive_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    assert not kl.requires_grad and not ce.requires_grad  # reported terms carry no graph
    wrt = [h_s, h_t, student_head.weight]
    for ours, ref in zip(grads(loss, wrt), grads(naive, wrt)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_token_logprobs_and_an_empty_batch_with_reported_terms():
    student_head, teacher_head, h_s, h_t = heads_and_states()
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    mask = MASKS["some rows masked"]
    picked = chunked_token_logprobs(h_s, student_head, labels, mask, chunk_size=3)
    naive = torch.log_softmax(student_head(h_s), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked, torch.where(mask, naive, torch.zeros_like(naive)).detach())
    empty = torch.zeros(B, T, dtype=torch.bool)
    loss, kl, ce = chunked_kd_loss(
        h_s, student_head, empty, teacher_hidden=h_t, teacher_head=teacher_head, labels=labels, ce_weight=0.5
    )
    assert loss.item() == kl.item() == ce.item() == 0.0


@pytest.mark.parametrize(
    "name,params",
    [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}), ("skewed_forward_kl", {"skew": 0.1})],
)
def test_masked_teacher_vocabulary_gives_the_naive_values_and_finite_gradients(name, params):
    """Teacher logits of -inf (a masked vocabulary) follow the naive loss's 0 log 0 = 0 convention."""
    student_head, _, h_s, h_t = heads_and_states()
    teacher_head = nn.Linear(H_T, V)
    with torch.no_grad():
        teacher_head.bias.zero_()
        teacher_head.bias[::5] = float("-inf")
    teacher_head.requires_grad_(False)
    mask = MASKS["some rows masked"]
    naive = losses.DIVERGENCES[name](student_head(h_s), teacher_head(h_t), mask, **params)
    chunked = chunked_divergence(h_s, student_head, h_t, teacher_head, mask, name, chunk_size=4, **params)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(
        grads(chunked, [h_s, h_t, student_head.weight]), grads(naive, [h_s, h_t, student_head.weight])
    ):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_outcome_logprobs_of_labels_among_the_top_k_and_the_rest_equal_the_naive_ones():
    from lmdistill.losses.chunked import CachedTargets, outcome_logprobs

    student_head, _, h_s, _ = heads_and_states(seed=5)
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, V, (B, T), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:4] for _ in range(B * T)]).view(B, T, 4)
    ids[..., 0] = torch.where(torch.rand(B, T, generator=g) > 0.5, labels, ids[..., 0])  # half the labels inside
    ids[0, :, 3] = -1  # empty slots (a served row with fewer than k usable entries)
    mask = MASKS["some rows masked"]
    got = chunked_token_logprobs(h_s, student_head, labels, mask, chunk_size=4, outcomes=ids)
    q = torch.log_softmax(student_head(h_s).detach(), -1)
    teacher_values = torch.randn(B, T, 4, generator=g)
    teacher_rest = torch.randn(B, T, generator=g)
    teacher = outcome_logprobs(CachedTargets(ids, teacher_values, teacher_rest), labels)
    inside = 0
    for b in range(B):
        for t in range(T):
            kept = [i for i in ids[b, t].tolist() if i >= 0]
            y = int(labels[b, t])
            if y in kept:
                inside += 1
                want_q, want_t = q[b, t, y], teacher_values[b, t, ids[b, t].tolist().index(y)]
            else:
                want_q, want_t = torch.log1p(-q[b, t, kept].exp().sum()), teacher_rest[b, t]
            assert float(got[b, t]) == pytest.approx(float(want_q) if mask[b, t] else 0.0, abs=1e-5)
            assert float(teacher[b, t]) == pytest.approx(float(want_t), abs=1e-6)
    assert 0 < inside < B * T


def test_shared_rows_leaves_a_head_of_the_right_size_out_of_the_graph_as_it_is():
    """A full-length slice still adds a SliceBackward node that zero-fills and copies a whole [V, H]
    weight gradient each step (21% of the Qwen pair's KD step); only a longer head is cut."""
    from lmdistill.losses.chunked import shared_rows

    same, longer = torch.nn.Linear(4, 10), torch.nn.Linear(4, 12)
    (w_same, b_same), (w_longer, b_longer) = shared_rows(same, longer)
    assert w_same is same.weight and b_same is same.bias
    assert w_longer.shape == (10, 4) and b_longer.shape == (10,) and w_longer.grad_fn is not None
    (w_only, _), = shared_rows(same, rows=10)
    assert w_only is same.weight
