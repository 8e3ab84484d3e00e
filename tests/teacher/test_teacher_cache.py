"""The top-k teacher cache: the coarsened loss, the cache files, lookups, and training from it."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from lmdistill import losses
from lmdistill.data import DataError, TokenizedExample, collate
from lmdistill.cache_teacher import build_cache
from lmdistill.teacher.cache import topk_rows
from lmdistill.losses.chunked import CachedTargets, chunked_kd_loss
from lmdistill.teacher.cache import TeacherCache

DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5}),
               ("skewed_forward_kl", {"skew": 0.1}), ("skewed_reverse_kl", {"skew": 0.1}), ("total_variation", {})]
B, T, H, V = 2, 6, 8, 29


def setup_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    h_s = torch.randn(B, T, H, generator=g, requires_grad=True)
    teacher_logits = torch.randn(B, T, V, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    return head, h_s, teacher_logits, mask


def cached_from_logits(teacher_logits, k):
    ids, values, rest = topk_rows(losses.log_probs(teacher_logits).flatten(0, 1), k)
    shape = teacher_logits.shape[:-1]
    return CachedTargets(ids.view(*shape, k), values.view(*shape, k), rest.view(shape))


@pytest.mark.parametrize("name,params", DIVERGENCES)
def test_full_vocabulary_cache_gives_the_dense_loss_and_gradient(name, params):
    head, h_s, teacher_logits, mask = setup_rows()
    dense = losses.DIVERGENCES[name](head(h_s), teacher_logits, mask, **params)
    cached = chunked_kd_loss(h_s, head, mask, cached=cached_from_logits(teacher_logits, V), divergence=name,
                             chunk_size=3, **params)[0]
    torch.testing.assert_close(cached, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(cached, h_s)[0], torch.autograd.grad(dense, h_s)[0],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", DIVERGENCES)
def test_topk_loss_is_the_divergence_of_the_coarsened_distributions(name, params):
    """D(p~, q~) over (top-k tokens, everything else), checked against a direct construction."""
    head, h_s, teacher_logits, mask = setup_rows(seed=1)
    k = 5
    cached = chunked_kd_loss(h_s, head, mask, cached=cached_from_logits(teacher_logits, k), divergence=name,
                             chunk_size=4, **params)[0]
    p, q = teacher_logits.double().softmax(-1), head(h_s).double().softmax(-1)
    top = p.topk(k, dim=-1).indices
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top, True)

    def coarse(d):
        return torch.cat([d.gather(-1, top), (d * ~in_top).sum(-1, keepdim=True)], -1)

    reference = losses.DIVERGENCES[name](coarse(q).log(), coarse(p).log(), mask, **params)
    torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-6)
    dense = losses.DIVERGENCES[name](head(h_s), teacher_logits, mask, **params)
    assert 0 < cached.item() <= dense.item() + 1e-6  # data-processing inequality
    assert cached.item() < dense.item()  # the tail carries information here (29 tokens, k = 5)


@pytest.mark.parametrize("name,params", DIVERGENCES)
def test_empty_slots_leave_the_loss_and_its_gradient_unchanged(name, params):
    """A row with fewer known tokens than k (a served teacher's shared texts) pads with id -1: the
    loss is that of the shorter top-k, not of a partition with phantom cells."""
    head, h_s, teacher_logits, mask = setup_rows(seed=2)
    short = cached_from_logits(teacher_logits, 3)
    empty = torch.full((B, T, 2), -1, dtype=short.ids.dtype)
    padded = CachedTargets(torch.cat([short.ids, empty], -1),
                           torch.cat([short.logprobs, torch.full((B, T, 2), float("-inf"))], -1), short.rest)
    want = chunked_kd_loss(h_s, head, mask, cached=short, divergence=name, chunk_size=4, **params)[0]
    got = chunked_kd_loss(h_s, head, mask, cached=padded, divergence=name, chunk_size=4, **params)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(got, h_s)[0], torch.autograd.grad(want, h_s)[0], rtol=1e-4,
                               atol=1e-7)


@pytest.fixture(scope="module")
def teacher_and_examples(tiny_llama):
    from transformers import AutoModelForCausalLM

    from conftest import gpt2_tokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    examples = [
        TokenizedExample([5, 6, 7, 8], [9, 10, 50256], []),
        TokenizedExample([11, 12], [13, 14, 15, 16, 50256], []),
        TokenizedExample([20, 21, 22], [23, 50256], []),
    ]
    return teacher, gpt2_tokenizer(), examples


def test_cache_holds_the_teachers_topk_and_a_batch_finds_its_rows(teacher_and_examples, tmp_path):
    from lmdistill.forward import response_logits

    teacher, tok, examples = teacher_and_examples
    build_cache(teacher, tok, examples, tmp_path / "cache", top_k=16, batch_size=2)
    cache = TeacherCache(tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["top_k"] == 16 and meta["rows"] == 3 + 5 + 2 and meta["has_rest"]
    assert isinstance(cache.arrays["ids"], np.memmap)
    assert [(e.prompt, e.response) for e in cache.examples()] == [(e.prompt, e.response) for e in examples]

    batch = collate([examples[2], examples[0]], tok.pad_token_id)  # another order and padding than when cached
    _, mask = batch.targets()
    targets = cache.targets(batch)
    with torch.no_grad():
        logprobs = losses.log_probs(response_logits(teacher, batch))
    values, ids = logprobs.topk(16, dim=-1)
    m = mask.bool()
    assert torch.equal(targets.ids[m], ids[m])
    torch.testing.assert_close(targets.logprobs[m], values[m], rtol=1e-5, atol=1e-5)
    rest = torch.log1p(-values[m].exp().sum(-1))
    torch.testing.assert_close(targets.rest[m], rest, rtol=1e-4, atol=1e-4)


def test_unknown_example_and_broken_cache_are_clear_errors(teacher_and_examples, tmp_path):
    teacher, tok, examples = teacher_and_examples
    build_cache(teacher, tok, examples[:1], tmp_path / "cache", top_k=4)
    cache = TeacherCache(tmp_path / "cache")
    with pytest.raises(DataError, match="not in this teacher cache"):
        cache.targets(collate([examples[1]], tok.pad_token_id))
    with pytest.raises(DataError, match="already exists"):
        build_cache(teacher, tok, examples[:1], tmp_path / "cache", top_k=4)
    (tmp_path / "cache" / "meta.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="meta.json"):
        TeacherCache(tmp_path / "cache")
    with pytest.raises(DataError, match="not a teacher cache"):
        TeacherCache(tmp_path)


def test_cli_cache_teacher_then_kd_trains_from_it_without_a_teacher(
    tiny_llama, tiny_llama_student, instruct_file, tmp_path
):
    from lmdistill.cli import main
    from lmdistill.methods import load_config
    from lmdistill.forward import output_head, response_hidden
    from lmdistill.trainer import Trainer

    common = [
        f"student={tiny_llama_student}",
        f"teacher={tiny_llama}",
        f"train_data={instruct_file}",
        "prompt_format=alpaca",
        "max_length=128",
        "max_prompt_length=96",
        "batch_size=4",
        "progress=false",
    ]
    assert main(["cache-teacher", "--out", str(tmp_path / "cache"), "--top-k", "8", "method=kd", *common]) == 0
    config = load_config(
        None,
        [
            "method=kd",
            *common,
            f"teacher_cache={tmp_path / 'cache'}",
            "kd_ratio=1.0",
            "steps=4",
            "lr=1e-2",
            "lr_schedule=constant",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(config)
    method = trainer.method
    assert method.teacher is None, "the teacher must not be loaded when training from the cache"
    batch = method.collate(trainer.examples[:4])
    _, mask = batch.targets()
    cache = TeacherCache(tmp_path / "cache")

    def objective():
        with torch.no_grad():
            return chunked_kd_loss(
                response_hidden(method.student, batch), output_head(method.student), mask, cached=cache.targets(batch)
            )[0].item()

    before = objective()
    trainer.order.next = lambda: list(range(4))  # the same fixed batch every step
    trainer.train()
    assert objective() < before


def test_seqkd_trains_on_teacher_responses_from_the_cache_and_gkd_needs_lmbda_zero(
    tiny_llama, tiny_llama_student, instruct_file, tmp_path
):
    from lmdistill.config import ConfigError
    from lmdistill.methods import load_config
    from lmdistill.cache_teacher import cache_teacher
    from lmdistill.trainer import Trainer

    common = [
        f"student={tiny_llama_student}",
        f"teacher={tiny_llama}",
        f"train_data={instruct_file}",
        "prompt_format=alpaca",
        "max_length=128",
        "max_prompt_length=96",
        "max_new_tokens=8",
        "batch_size=4",
        "progress=false",
        "max_train_examples=8",
    ]
    cache_teacher(load_config(None, ["method=seqkd", *common]), tmp_path / "cache", top_k=4, responses="teacher")
    cache = TeacherCache(tmp_path / "cache")
    assert cache.meta["responses"] == "teacher" and len(cache) == 8
    assert all(len(e.response) <= 8 for e in cache.examples())  # sampled by the teacher, not the dataset's
    trainer = Trainer(
        load_config(
            None,
            [
                "method=seqkd",
                *common,
                f"teacher_cache={tmp_path / 'cache'}",
                "steps=3",
                "lr=1e-2",
                "lr_schedule=constant",
                f"output_dir={tmp_path / 'run'}",
            ],
        )
    )
    assert trainer.method.teacher is None
    assert [e.response for e in trainer.examples] == [e.response for e in cache.examples()]
    batch = trainer.method.collate(trainer.examples[:4])
    before = trainer.method.loss(batch, 0)[0].item()
    for _ in range(3):
        trainer.update("student", [batch])
    assert trainer.method.loss(batch, 0)[0].item() < before

    with pytest.raises(ConfigError, match="teacher_cache"):  # not a cache folder
        load_config(None, ["method=seqkd", *common, f"teacher_cache={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="teacher_cache"):  # on-policy GKD cannot use a fixed cache
        load_config(None, ["method=gkd", *common, f"teacher_cache={tmp_path / 'cache'}", "lmbda=0.5"])
    load_config(None, ["method=gkd", *common, f"teacher_cache={tmp_path / 'cache'}", "lmbda=0.0"])


def test_a_cache_build_stopped_half_way_resumes_and_is_never_read_half_written(teacher_and_examples, tmp_path,
                                                                              monkeypatch, caplog):
    """Stopped after the first two of three examples (batch_size 1): the cache folder does not
    exist (a reader gets 'not a teacher cache', never half the rows); the rerun scores only the
    third example and the cache equals one built in a single go."""
    import logging

    from lmdistill import forward

    teacher, tok, examples = teacher_and_examples
    build_cache(teacher, tok, examples, tmp_path / "whole", top_k=16, batch_size=1)
    real, calls = forward.response_hidden, []

    def response_hidden(model, batch, stop_at=None):
        calls.append(batch.input_ids.shape[0])
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # Ctrl-C; a SIGKILL leaves the same files (nothing runs after it)
        return real(model, batch)

    monkeypatch.setattr(forward, "response_hidden", lambda m, b: response_hidden(m, b, stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, tok, examples, tmp_path / "cache", top_k=16, batch_size=1)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match="not a teacher cache"):
        TeacherCache(tmp_path / "cache")
    calls.clear()
    monkeypatch.setattr(forward, "response_hidden", lambda m, b: response_hidden(m, b))
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        build_cache(teacher, tok, examples, tmp_path / "cache", top_k=16, batch_size=1)
    assert "resuming: 2 of 3 examples already scored" in caplog.text
    assert calls == [1]
    resumed, whole = TeacherCache(tmp_path / "cache"), TeacherCache(tmp_path / "whole")
    for name in ("ids", "logprobs", "rest", "tokens", "row_offsets"):
        assert np.array_equal(resumed.arrays[name], whole.arrays[name])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A stopped build of other settings (here top_k) is not mixed in: it starts over.
    monkeypatch.setattr(forward, "response_hidden", lambda m, b: response_hidden(m, b, stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, tok, examples, tmp_path / "k8", top_k=16, batch_size=1)
    calls.clear()
    monkeypatch.setattr(forward, "response_hidden", lambda m, b: response_hidden(m, b))
    build_cache(teacher, tok, examples, tmp_path / "k8", top_k=8, batch_size=1)
    assert calls == [1, 1, 1]
    assert np.array_equal(TeacherCache(tmp_path / "k8").arrays["ids"], whole.arrays["ids"][:, :8])
